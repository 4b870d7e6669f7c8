"""vLLM's tokenizer endpoints: the served model's tokenizer, for clients that count or
build prompts in token ids without a copy of it (lm-evaluation-harness's
`local-completions` detects them and then needs no tokenizer of its own).

::

    GET  /tokenizer_info     the tokenizer's config: class, bos/eos tokens, chat template, ...
    POST /tokenize           {prompt, add_special_tokens?=true, return_token_strs?=false}
                             or {messages, add_generation_prompt?=true, continue_final_message?=false, ...}
                             -> {count, max_model_len, tokens, token_strs}
    POST /detokenize         {tokens} -> {prompt}

Each takes an optional `model` (the served model or one of its LoRA adapters: they
share the tokenizer) and, like the OpenAI routes, a tenant's API key. A body is at most
`max_body_bytes`; one of `OFF_LOOP_CHARS` or more is tokenized (or decoded), and answered, in a worker
thread (one at a time, each tenant's in turn: `TenantTurns`), as admission tokenizes long
prompts. They count no requests against
the key's `requests_per_minute` (vLLM's are not limited either), but a key that has used
them up is refused here too (429) until the minute frees one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import trio
from quart import Blueprint, Response, g, request

from actors.admission import OFF_LOOP_CHARS, TenantTurns
from gateway.errors import ApiError, decode_json
from gateway.routes_openai import ChatMessageIn, chat_messages, check_chat_ending, rejected_error
from gateway.tools import tool_calling

if TYPE_CHECKING:
    from actors.messages import TenantContext
    from gateway.app import GatewayState
    from gpu.tokenizer import Tokenizer


class TokenizeRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Body of POST /tokenize: a `prompt`, or chat `messages` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (vLLM)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # as chat completions: the last message left open
    return_token_strs: bool = False
    # chat tool calling: the tools the model reads in its system message, as chat completions adds them
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class DetokenizeRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str | None = None
    tokens: list[int]


def tokenize(tokenizer: Tokenizer, req: TokenizeRequest) -> list[int]:
    """The token ids of a /tokenize request (pure; 400 for a bad one)."""
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "give either prompt or messages", code="invalid_value", param="prompt")
    if req.messages is not None:
        from gpu.tokenizer import ChatTemplateError

        if not req.messages:  # as chat completions
            raise ApiError(400, "messages must not be empty", code="invalid_value", param="messages")
        calling = tool_calling(req.tools, req.tool_choice, req.parallel_tool_calls)
        rendered = chat_messages(req.messages, calling, may_end_on_calls=True)
        check_chat_ending(rendered, req.add_generation_prompt, req.continue_final_message, calling is not None)
        msgs = [{"role": m.role, "content": m.content} for m in rendered]
        try:
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=req.add_generation_prompt,
                                                 continue_final_message=req.continue_final_message)
        except ChatTemplateError as exc:
            raise ApiError(400, f"messages: {exc}", code="invalid_value", param="messages") from exc
        return tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
    if req.tools or req.tool_choice not in (None, "none"):  # as completions: tools belong to chat messages
        raise ApiError(400, "tools apply to chat messages; a prompt takes none", code="unsupported_value",
                       param="tools" if req.tools else "tool_choice")
    special = True if req.add_special_tokens is None else req.add_special_tokens
    return tokenizer.encode(req.prompt or "", add_special_tokens=special)


def tokenizer_blueprint(state: GatewayState) -> Blueprint:
    tokenize_limiter = trio.CapacityLimiter(1)
    turns = TenantTurns()
    bp = Blueprint("tokenizer", __name__)

    def tokenizer_of(model: str | None, tenant: TenantContext) -> Tokenizer:
        admission = getattr(state.runtime, "admission", None)
        refusal = admission.rpm_refusal(tenant, g.request_id) if admission is not None else None
        if refusal is not None:  # a key out of requests this minute: refused here too, not counted here
            raise rejected_error(refusal)
        if model is not None:
            state.check_generation_model(model, tenant)
        elif not [m for m in state.models_for(tenant) if m != getattr(state.runtime, "embedding_model_name", None)]:
            # (every generation model shares the tokenizer: any one will do)
            raise ApiError(404, "this key may use no model", code="model_not_found", param="model")
        tokenizer = getattr(state.runtime, "tokenizer", None)
        if tokenizer is None:
            raise ApiError(501, "this server has no tokenizer to offer", code="not_implemented")
        return tokenizer

    @bp.get("/tokenizer_info")
    async def tokenizer_info() -> Any:
        tenant = await state.authenticate(request.headers.get("Authorization"))
        tokenizer = tokenizer_of(None, tenant)
        return {**tokenizer.to_hf_tokenizer_config(), "model_max_length": state.runtime.max_model_len,
                "pad_token": None, "vocab_size": tokenizer.vocab_size}

    @bp.post("/tokenize")
    async def tokenize_route() -> Any:
        tenant = await state.authenticate(request.headers.get("Authorization"))
        body = await request.get_data(cache=False)
        req = decode_json(body, TokenizeRequest)
        tokenizer = tokenizer_of(req.model, tenant)
        max_model_len = state.runtime.max_model_len

        def answer() -> bytes:
            ids = tokenize(tokenizer, req)
            strs = [tokenizer.id_to_token(t) for t in ids] if req.return_token_strs else None
            return msgspec.json.encode({"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
                                        "token_strs": strs})

        if len(body) < OFF_LOOP_CHARS:  # (the body bounds what is rendered, and the answer's size)
            out = answer()
        else:  # a long text: tokenized, and its answer (~3 bytes a token) written, in a worker thread,
            # one at a time, so that other requests' streams go on, each tenant's in turn
            out = await turns.run(tenant.tenant_id, answer, tokenize_limiter)
        return Response(out, content_type="application/json")

    @bp.post("/detokenize")
    async def detokenize_route() -> Any:
        tenant = await state.authenticate(request.headers.get("Authorization"))
        body = await request.get_data(cache=False)
        req = decode_json(body, DetokenizeRequest)
        tokenizer = tokenizer_of(req.model, tenant)
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token ids must be in [0, {tokenizer.vocab_size}); got {bad[0]}",
                           code="invalid_value", param="tokens")

        def answer() -> bytes:
            return msgspec.json.encode({"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)})

        # (a long list: decoded, and its answer written, in a worker thread, as `/tokenize`
        # does: 0.7 MB of ids decode to 4.5 MB of text in a quarter of a second)
        out = answer() if len(body) < OFF_LOOP_CHARS else await turns.run(tenant.tenant_id, answer, tokenize_limiter)
        return Response(out, content_type="application/json")

    return bp


__all__ = ["DetokenizeRequest", "TokenizeRequest", "tokenize", "tokenizer_blueprint"]
