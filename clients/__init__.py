"""Python async client of lmgate (anyio-based: runs under trio and asyncio)."""

from clients.admin import AdminClient
from clients.client import (
    Choice,
    Completion,
    Delta,
    Embeddings,
    LmgateClient,
    Ranked,
    Ranking,
    Response,
    ResponseStream,
    RetryPolicy,
    Scores,
    TokenStream,
    Usage,
)
from clients.errors import (
    AuthError,
    BadRequest,
    ConnectionFailed,
    LmgateError,
    NotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
    ServerError,
)
from clients.ws import WsSession, WsStream

__all__ = [
    "AdminClient",
    "AuthError",
    "BadRequest",
    "Choice",
    "Completion",
    "ConnectionFailed",
    "Delta",
    "Embeddings",
    "LmgateClient",
    "LmgateError",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "RateLimited",
    "Ranked",
    "Ranking",
    "Response",
    "ResponseStream",
    "RetryPolicy",
    "Scores",
    "ServerError",
    "TokenStream",
    "Usage",
    "WsSession",
    "WsStream",
]
