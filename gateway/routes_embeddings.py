"""OpenAI's embeddings endpoint, served by the runtime's embedding model
(`actors.embeddings`: all-MiniLM-L6-v2 by default, `--embedding-model`)::

    POST /v1/embeddings  {model, input, encoding_format?="float", dimensions?, user?,
                          truncate_prompt_tokens?}
                         -> {object: "list", data: [{object: "embedding", index, embedding}],
                             model, usage: {prompt_tokens, total_tokens}}

`input` is a string, a list of strings, a list of token ids, or a list of such lists (up
to 2048 inputs, as OpenAI's); token ids are the embedding model's own vocabulary, used as
given. An input longer than the model takes (256 tokens for MiniLM) is a 400 unless
`truncate_prompt_tokens` (vLLM's: N, or -1 for the model's most) cuts it. `base64` is the
vectors' little-endian float32 bytes, what the openai SDK asks for by default and decodes.
`dimensions` other than the model's own is a 400: MiniLM was not trained to be cut
(OpenAI's text-embedding-3 models were). The API key, the tenant's model list and its
quotas (requests and tokens per minute, daily budget, concurrency) apply as to
generation; usage is recorded under the embedding model's name.
"""

from __future__ import annotations

import base64
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from quart import Blueprint, Response, g, has_request_context, request

from actors.messages import EmbedCall, Rejected
from gateway.errors import ApiError, decode_json
from gateway.routes_openai import rejected_error

if TYPE_CHECKING:
    from actors.messages import TenantContext
    from gateway.app import GatewayState

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request


class EmbeddingRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Body of POST /v1/embeddings."""

    model: str
    input: Any
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: at most N tokens per input (-1: the model's most)


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def embedding_inputs(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """`input` as texts or as token-id lists (pure; an ApiError 400 naming `input` for
    anything else: empty, mixed kinds, more than MAX_INPUTS)."""
    def bad(message: str) -> ApiError:
        return ApiError(400, f"input {message}", code="invalid_value", param="input")

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise bad("must be a string, a list of strings, a list of token ids or a list of token-id lists")
    if not value:
        raise bad("must not be empty")
    if all(_is_id(x) for x in value):
        value = [value]
    if len(value) > MAX_INPUTS:
        raise bad(f"holds {len(value)} inputs; {MAX_INPUTS} at most")
    if all(isinstance(x, str) for x in value):
        empty = next((i for i, x in enumerate(value) if not x), None)
        if empty is not None:
            raise bad(f"{empty} is an empty string")
        return value, None
    if all(isinstance(x, list) and all(_is_id(t) for t in x) for x in value):
        return None, value
    raise bad("must be a string, a list of strings, a list of token ids or a list of token-id lists, "
              "not a mix of them")


def embedding_body(vectors: np.ndarray, *, model: str, prompt_tokens: int, encoding_format: str) -> bytes:
    """The answer's JSON bytes (msgspec: thousands of floats encode in milliseconds)."""
    if encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = vectors.tolist()
    return msgspec.json.encode({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })


def check_embedding_model(state: GatewayState, model: str | None, tenant: TenantContext, *, serves: str) -> str:
    """The model a request for the embedding model names (None: the embedding model), if
    this tenant may use it: a 404 for a model not served or not the tenant's
    (`GatewayState.check_model`), a 400 for a served model that is not the embedding model
    (it `serves` no such thing) or when there is none."""
    name = getattr(state.runtime, "embedding_model_name", None)
    if model is None:
        if name is None:
            raise ApiError(400, f"this server has no embedding model to serve {serves}", code="invalid_value",
                           param="model")
        model = name
    state.check_model(model, tenant)
    if model not in getattr(state.runtime, "embedding_aliases", ()):
        raise ApiError(400, f"model {model[:100]!r} does not serve {serves}" +
                       (f"; {name!r} does" if name else ": this server has no embedding model"),
                       code="invalid_value", param="model")
    return model


def check_truncate(state: GatewayState, truncate: int | None) -> int | None:
    """vLLM's `truncate_prompt_tokens` as a cut: None, or N ≥ 1 (-1: the model's most);
    a 400 for other values (the embedding model says which N it takes)."""
    if truncate is not None and truncate < 1 and truncate != -1:
        raise ApiError(400, "truncate_prompt_tokens must be -1 (the model's most) or at least 1",
                       code="invalid_value", param="truncate_prompt_tokens")
    return state.runtime.embedding_max_tokens if truncate == -1 else truncate


def embeddings_blueprint(state: GatewayState) -> Blueprint:
    bp = Blueprint("embeddings", __name__)

    @bp.post("/v1/embeddings")
    async def embeddings() -> Any:
        tenant = await state.authenticate(request.headers.get("Authorization"))
        req = decode_json(await request.get_data(cache=False), EmbeddingRequest)
        check_embedding_model(state, req.model, tenant, serves="embeddings")
        name = getattr(state.runtime, "embedding_model_name", None)
        if req.encoding_format not in ("float", "base64"):
            raise ApiError(400, f"encoding_format must be float or base64, got {req.encoding_format[:50]!r}",
                           code="invalid_value", param="encoding_format")
        dim = state.runtime.embedding_dim
        if req.dimensions is not None and req.dimensions != dim:
            raise ApiError(400, f"dimensions: {name} gives vectors of {dim} dimensions only (it was not trained "
                           f"to be cut shorter)", code="invalid_value", param="dimensions")
        truncate = check_truncate(state, req.truncate_prompt_tokens)
        texts, ids = embedding_inputs(req.input)
        call = EmbedCall("embd-" + uuid.uuid4().hex, tenant, req.model, texts=texts, token_ids=ids, truncate=truncate)
        g.answer_id = call.request_id  # (named in the request's log line: `gateway.errors.log_failure`)
        reply = await state.runtime.embed(call)
        if isinstance(reply, Rejected):
            raise rejected_error(reply)
        if reply.rate_limits is not None and has_request_context():
            g.rate_limits = reply.rate_limits
        return Response(embedding_body(reply.vectors, model=name or req.model, prompt_tokens=reply.prompt_tokens,
                                       encoding_format=req.encoding_format), content_type="application/json")

    return bp


__all__ = ["EmbeddingRequest", "check_embedding_model", "check_truncate", "embedding_body", "embedding_inputs",
           "embeddings_blueprint"]
