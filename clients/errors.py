"""Typed errors of the lmgate client, built from the gateway's OpenAI-style error body.

``error_for(status, body, headers)`` picks the class by status; every error keeps
the server's ``message``/``type``/``code``/``param`` and, for 429/503, the
``retry_after`` seconds the server asked for (header ``Retry-After`` or the
WebSocket frame's ``retry_after``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class LmgateError(Exception):
    """An error reply from the gateway, or a failure on the client side (status 0:
    `ConnectionFailed`, `InvalidRequest`)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        # the answer's `x-should-retry` header (OpenAI's): False when retrying cannot help
        self.should_retry = should_retry

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"


class BadRequest(LmgateError):
    """400/413/409: the request itself is wrong; retrying will not help."""


class AuthError(LmgateError):
    """401: missing, unknown or revoked API key."""


class PermissionDenied(LmgateError):
    """403: e.g. an admin call without the admin key."""


class NotFound(LmgateError):
    """404: unknown model, tenant, key or route."""


class NotCached(NotFound):
    """504 `not_cached`: the request asked for a stored answer only (`cache_control=
    "only-if-cached"`) and the response cache holds none that satisfies it."""


class RateLimited(LmgateError):
    """429: over quota. ``retry_after`` says when trying again can succeed (None: never)."""


class Overloaded(LmgateError):
    """503: the server is busy or a dependency is down; retry after ``retry_after``."""


class ServerError(LmgateError):
    """5xx other than 503 and 504: a failure on the server side."""


class ConnectionFailed(LmgateError):
    """The gateway could not be reached, or the connection broke or timed out mid-request
    (status 0; the message always names what failed).

    ``retryable`` says whether sending the request again is safe and can help, which is
    what `RetryPolicy` goes by. True when the request cannot have reached the server
    (connect error or timeout, no pooled connection free in time; a WebSocket stream
    opened after its socket was gone), and for an idempotent request (GET, PUT, DELETE).
    False when a POST or PATCH failed after it was sent, since the server may be running
    (and billing) it already, a WebSocket stream whose socket dropped under it alike, and
    for a closed client, which stays closed."""

    def __init__(self, message: str, *, retryable: bool = True, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.retryable = retryable


class TimedOut(ConnectionFailed):
    """The request was sent but no answer came within the client's ``timeout`` (a read or
    write timeout; a stream that stayed silent that long mid-way, too). A subclass of
    `ConnectionFailed`, so existing handlers still catch it; a POST is not ``retryable``:
    it may still be generating on the server."""


class InvalidRequest(LmgateError):
    """The client cannot send the request as given (status 0, never retried: it would
    fail the same way). A malformed base URL (no ``http://``/``https://`` scheme, a bad
    host or port); an API key or ``cache_control`` value HTTP headers cannot carry
    (non-ASCII, control characters); a body that cannot be encoded; or a stream object
    entered a second time (one stream object is one request). Unlike `BadRequest`, the
    server never saw it."""


def _class_for(status: int) -> type[LmgateError]:
    if status in (400, 409, 413, 415, 422):
        return BadRequest
    by_status = {401: AuthError, 403: PermissionDenied, 404: NotFound, 429: RateLimited, 503: Overloaded,
                 504: NotCached}
    return by_status.get(status, ServerError if status >= 500 else BadRequest)


_STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "overloaded_error": 503,
    "server_error": 500,
}


def status_of_type(error_type: str | None) -> int:
    """HTTP status matching an OpenAI error `type` (for errors inside an SSE stream,
    which carry no status of their own)."""
    return _STATUS_OF_TYPE.get(error_type or "", 500)


def parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: not produced by lmgate; treat as absent


def error_for(status: int, body: Any, headers: Mapping[str, str] | None = None, retry_after: float | None = None) -> LmgateError:
    """The typed error for an error reply (`body` is the parsed JSON or None)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": f"HTTP {status}", "type": None, "code": None, "param": None}
    if retry_after is None and headers is not None:
        retry_after = parse_retry_after(headers.get("retry-after"))
    said = (headers.get("x-should-retry") or "").strip().lower() if headers is not None else ""
    return _class_for(status)(
        str(err.get("message") or f"HTTP {status}"),
        status=status,
        type=err.get("type"),
        code=err.get("code"),
        param=err.get("param"),
        retry_after=retry_after,
        should_retry={"true": True, "false": False}.get(said),
    )
