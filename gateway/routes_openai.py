"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

Three layers, kept apart so each can be tested on its own:

- request Structs (`CompletionRequest`, `ChatRequest`): the wire format, decoded
  with msgspec (wrong types → 400 naming the field);
- `to_generate_calls`: pure mapping to `actors.messages.GenerateCall` +
  `gpu.sampling.SamplingParams` (out-of-range values → 400 naming the field);
- rendering: `Collector` folds a request's events into a plain JSON response,
  `ChunkRenderer` turns each event into OpenAI stream chunks (SSE and the
  WebSocket share the event loop in `stream_events`).

Disconnect = abort: every path that holds an `Accepted` closes its events channel
and calls `cancel()` in a `finally`, so a client that goes away (quart-trio cancels
the handler or the body generator) stops generation within one engine step.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import trio
from quart import Blueprint, Response, g, has_request_context, request

from actors.messages import (
    Accepted,
    ChatMessage,
    Failed,
    Finished,
    GenerateCall,
    PromptLogprob,
    Rejected,
    TenantContext,
    TokenDelta,
    Usage,
)
from gateway import sse
from gateway.errors import ApiError, code_of, invalid_request, malformed_json, param_of
from gateway.sse import IDLE, Idle
from gateway.tools import ToolCalling, chat_role, render_message, tool_calling
from gpu.sampling import MAX_LOGPROBS, SamplingParams, SamplingParamsError
from gpu.structured import GuidedDecoding, closed_objects

if TYPE_CHECKING:
    from gateway.app import GatewayState

# ---------------------------------------------------------------- wire format


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class TextPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None  # required for a text part (`ChatMessageIn.text`); other types are refused
    refusal: str | None = None  # an assistant's refusal part (OpenAI's): read as its text


_TEXT_PARTS = ("text", "refusal")
# content that may be missing (null or []): an assistant's (with tool calls, or a turn
# replayed as it came); OpenAI requires it of the other roles
_MAY_BE_EMPTY = ("assistant",)


class ChatMessageIn(msgspec.Struct, frozen=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # an assistant turn's calls (`gateway.tools.render_message`)
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self, *, markers: bool = False) -> str:
        """The message as the model reads it (`markers`: tool calls as auto mode writes them)."""
        if self.content is None or self.content == []:
            if self.role not in _MAY_BE_EMPTY:  # as OpenAI: only an assistant's turn may come without
                raise ApiError(400, f"a {self.role} message needs content", code="invalid_value", param="messages")
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            other = next((part.type for part in self.content if part.type not in _TEXT_PARTS), None)
            if other is not None:
                raise ApiError(400, f"content parts of type {other[:50]!r} are not supported (this model reads "
                               "text only)", code="unsupported_value", param="messages")
            texts = [part.text if part.type == "text" else part.refusal for part in self.content]
            if any(t is None for t in texts):
                raise ApiError(400, "a text content part needs its text (a refusal part its refusal)",
                               code="invalid_value", param="messages")
            text = "\n".join(t or "" for t in texts)  # as vLLM joins them
        return render_message(self.role, text, self.tool_calls, markers=markers)


class _Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """Fields shared by both endpoints (OpenAI names, then lmgate extensions)."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, str] | None = None
    # extensions (vLLM names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False  # the stop string that ended a choice kept at its end
    skip_special_tokens: bool = True  # False: special tokens the model writes are in the text
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (as a string) -> bias in [-100, 100]
    priority: int | None = None
    use_beam_search: bool = False
    best_of: int | None = None  # beams (default n); OpenAI's legacy completions name
    prompt_logprobs: int | None = None  # each prompt token's logprob, rank and k alternatives (not streamed)
    length_penalty: float | None = None
    early_stopping: bool | str | None = None  # true, false or "never"
    # structured outputs (`guided_decoding`): OpenAI's response_format, or vLLM's names
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None  # JSON constraints: whitespace allowed between tokens
    structured_outputs: dict[str, Any] | None = None  # vLLM >= 0.10.2: {"json"|"regex"|"choice"|"grammar"|"json_object": ...}


COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class CompletionRequest(_Sampling, frozen=True, kw_only=True):
    """Body of POST /v1/completions.

    `prompt`: a string, a list of token ids, or a batch: a list of strings or of token id
    lists (`completion_prompts`). `echo` returns each prompt before its completion, with
    `logprobs` for the prompt's tokens too (the first has none); with `max_tokens` 0 the
    prompt alone: scoring a text."""

    prompt: str | list[int | str | list[int]]
    # absent: OpenAI's default for completions (COMPLETIONS_MAX_TOKENS); null: up to the context length
    max_tokens: int | None | msgspec.UnsetType = msgspec.UNSET
    logprobs: int | None = None  # number of top alternatives per token
    echo: bool = False
    suffix: str | None = None  # insertion: refused when set (not supported)
    tools: list[Any] | None = None  # chat only: refused when set
    tool_choice: str | dict[str, Any] | None = None


class ChatRequest(_Sampling, frozen=True, kw_only=True):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # tool calling (`gateway.tools`): auto, required or a named function, through structured outputs
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's: how the rendered chat ends — a new assistant turn (the default), nothing, or
    # the last message left open for the model to continue (a prefilled answer)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False  # vLLM's: the reply starts with the last message's text when it is an assistant's
    # the legacy form: refused, so that a client relying on it is told (`unsupported_chat_fields`)
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None


def unsupported_chat_fields(req: ChatRequest) -> None:
    """400 for what this server cannot honour: the legacy `functions` (tools replace them)."""
    for name in ("functions", "function_call"):
        if getattr(req, name):
            raise ApiError(400, f"{name} (the legacy form) is not supported; send tools and tool_choice",
                           code="unsupported_value", param=name)


def chat_messages(messages: list[ChatMessageIn], calling: ToolCalling | None, *,
                  may_end_on_calls: bool = False) -> list[ChatMessage]:
    """The conversation as the model reads it (chat completions and /tokenize alike): each
    message's text (`ChatMessageIn.text`), and with tool calling the tools described in the
    system message (`ToolCalling.system_prompt`: added to the first system message, or put
    first). The turns of tool calling must be as OpenAI takes them (`check_tool_turns`)."""
    check_tool_turns(messages, may_end_on_calls=may_end_on_calls)
    markers = calling is not None and calling.auto
    out = [ChatMessage(role=chat_role(m.role, markers=markers), content=m.text(markers=markers)) for m in messages]
    if calling is not None:
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{calling.system_prompt()}")
        else:
            out.insert(0, ChatMessage("system", calling.system_prompt()))
    return out


def check_tool_turns(messages: list[ChatMessageIn], *, may_end_on_calls: bool = False) -> None:
    """400 (`messages`) for tool-calling turns OpenAI refuses: an assistant message's tool
    calls (each with its own string `id`, of `type` "function") must each be answered by a
    tool message right after it, before any other message (the conversation's last too:
    else the model reads a call that never returned); a tool message must answer one of
    them, once. (A prefilled assistant turn with calls would leave them unanswered.)
    `may_end_on_calls`: the last turn's calls may be unanswered yet (/tokenize counts a
    history before its tools ran, as vLLM's does)."""
    pending: dict[str, bool] = {}  # the calls of the last assistant turn: answered yet?
    for i, m in enumerate(messages):
        if m.role == "tool":
            if m.tool_call_id not in pending or pending[m.tool_call_id]:
                what = "answered already" if pending.get(m.tool_call_id) else "not a call of the assistant " \
                    "message before it"
                raise ApiError(400, f"messages[{i}]: a message with role 'tool' must answer a tool call of the "
                               f"assistant message before it: tool_call_id {str(m.tool_call_id)[:100]!r} is {what}",
                               code="invalid_value", param="messages")
            pending[m.tool_call_id] = True
            continue
        _all_answered(pending)
        pending = {}
        if m.role == "assistant" and m.tool_calls:
            for call in m.tool_calls:
                ident = call.get("id") if isinstance(call, dict) else None
                if not isinstance(ident, str) or not ident or call.get("type", "function") != "function":
                    raise ApiError(400, f"messages[{i}].tool_calls: each call needs its \"id\" (a non-empty string) "
                                   "and \"type\": \"function\"", code="invalid_value", param="messages")
                if ident in pending:
                    raise ApiError(400, f"messages[{i}].tool_calls: the id {ident[:100]!r} is given twice",
                                   code="invalid_value", param="messages")
                pending[ident] = False
    if not may_end_on_calls:
        _all_answered(pending)


def _all_answered(calls: dict[str, bool]) -> None:
    unanswered = [c for c, done in calls.items() if not done]
    if unanswered:  # (OpenAI's words)
        raise ApiError(400, "An assistant message with 'tool_calls' must be followed by tool messages responding "
                       "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                       f"{', '.join(c[:100] for c in unanswered[:8])}", code="invalid_value", param="messages")


def check_chat_ending(messages: list[ChatMessage], add_generation_prompt: bool, continue_final_message: bool,
                      constrained: bool) -> None:
    """400 (`continue_final_message`) for an ending the chat cannot have (chat completions
    and /tokenize alike): a continued last message beside a generation prompt, without
    text, or under an output constraint or tool calling (which would start inside it)."""
    if not continue_final_message:
        return
    if add_generation_prompt:
        raise ApiError(400, "continue_final_message continues the last message: send it with "
                       "add_generation_prompt false", code="invalid_value", param="continue_final_message")
    if constrained:
        raise ApiError(400, "continue_final_message cannot be combined with an output constraint or tool "
                       "calling (the constraint would start inside the continued message)",
                       code="invalid_value", param="continue_final_message")
    if not messages or not messages[-1].content.strip():
        raise ApiError(400, "continue_final_message needs a last message with text to continue",
                       code="invalid_value", param="continue_final_message")


def streams_calls(req: CompletionRequest | ChatRequest) -> bool:
    """Whether a stream sends tool calls as they are written (`ChunkRenderer.stream_calls`):
    yes, unless a stop string or token may end the choice inside a call (auto mode; the
    other modes refuse stops), which then must be dropped, not half sent."""
    return not (req.stop or req.stop_token_ids)


def tools_of(req: CompletionRequest | ChatRequest) -> ToolCalling | None:
    """The chat request's tool calling (`gateway.tools`), None for plain text."""
    if not isinstance(req, ChatRequest):
        return None
    calling = tool_calling(req.tools, req.tool_choice, req.parallel_tool_calls)
    if calling is not None and calling.auto and (req.response_format or {}).get("type") in ("json_object",
                                                                                           "json_schema"):
        calling = dataclasses.replace(calling, leading=True)  # an answer in JSON, or calls first
    return calling


Endpoint = Literal["completions", "chat.completions"]
_REQUEST_TYPES: dict[str, type[CompletionRequest] | type[ChatRequest]] = {
    "completions": CompletionRequest,
    "chat.completions": ChatRequest,
}


def decode_request(endpoint: Endpoint, raw: bytes | str | Any) -> CompletionRequest | ChatRequest:
    """Decode a body (bytes/str JSON, or an already-parsed object) → request Struct, or 400."""
    kind = _REQUEST_TYPES[endpoint]
    try:
        if isinstance(raw, bytes | str):
            return msgspec.json.decode(raw, type=kind)
        return msgspec.convert(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, invalid_request(exc), code=code_of(exc), param=param_of(exc)) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec < 0.23 raised UnicodeDecodeError for bad UTF-8, 0.23 a DecodeError
        raise malformed_json(raw, exc) from exc
    except RecursionError as exc:  # msgspec's decoder recurses per nesting level
        raise ApiError(400, "malformed JSON: nested too deeply", code="invalid_json") from exc


# ---------------------------------------------------------------- mapping
_STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# vLLM's other `structured_outputs` keys: options, not constraints (see `guided_decoding`)
_STRUCTURED_OPTIONS = ("disable_any_whitespace", "whitespace_pattern", "disable_fallback",
                       "disable_additional_properties", "structural_tag")


def guided_decoding(req: CompletionRequest | ChatRequest) -> tuple[GuidedDecoding | None, str | None]:
    """The request's structured-output constraint, and the field it came from (for a 400's
    `param`): OpenAI's `response_format` (`json_object`, or `json_schema` with its
    `json_schema.schema`), vLLM's `guided_json` / `guided_regex` / `guided_choice` /
    `guided_grammar`, or vLLM's newer `structured_outputs` object. At most one may be given.
    Whether the spec compiles is admission's to say (`gpu.structured.GrammarCompiler`)."""
    found: list[tuple[GuidedDecoding, str]] = []
    fmt = req.response_format
    if fmt is not None:
        if "type" not in fmt:
            raise ApiError(400, "response_format needs a \"type\": \"text\", \"json_object\" or \"json_schema\"",
                           code="invalid_value", param="response_format")
        kind = fmt["type"]
        if kind == "json_object":
            found.append((GuidedDecoding("json_object"), "response_format"))
        elif kind == "json_schema":
            js = fmt.get("json_schema")
            if not isinstance(js, dict):
                raise ApiError(400, "response_format json_schema needs a \"json_schema\" object "
                               "({\"name\": ..., \"schema\": {...}})", code="invalid_value", param="response_format")
            schema = js.get("schema")
            if schema is None:  # OpenAI's schema is optional: then any JSON object
                found.append((GuidedDecoding("json_object"), "response_format"))
            else:  # the keys it names, and no others (`closed_objects`)
                found.append((GuidedDecoding("json", _schema_text(closed_objects(_parsed(schema)), "response_format")),
                              "response_format"))
        elif kind != "text":
            raise ApiError(400, f"response_format type must be \"text\", \"json_object\" or \"json_schema\", "
                           f"got {str(kind)[:100]!r}", code="invalid_value", param="response_format")
    if req.guided_json is not None:
        found.append((GuidedDecoding("json", _schema_text(req.guided_json, "guided_json")), "guided_json"))
    if req.guided_regex is not None:
        found.append((GuidedDecoding("regex", req.guided_regex), "guided_regex"))
    if req.guided_choice is not None:
        found.append((GuidedDecoding("choice", json.dumps(req.guided_choice)), "guided_choice"))
    if req.guided_grammar is not None:
        found.append((GuidedDecoding("grammar", req.guided_grammar), "guided_grammar"))
    so = req.structured_outputs or {}
    unknown = [k for k in so if k not in _STRUCTURED_KINDS and k not in _STRUCTURED_OPTIONS]
    if unknown:
        raise ApiError(400, f"structured_outputs has no field {unknown[0][:100]!r}; it takes one of "
                       f"{', '.join(_STRUCTURED_KINDS)} and the options disable_any_whitespace, whitespace_pattern",
                       code="invalid_value", param="structured_outputs")
    if so.get("structural_tag"):
        raise ApiError(400, "structured_outputs.structural_tag is not supported", code="unsupported_value",
                       param="structured_outputs")
    close = closed_objects if so.get("disable_additional_properties") else (lambda schema: schema)
    for kind in _STRUCTURED_KINDS:
        value = so.get(kind)
        if value is None or value is False:
            continue
        if kind == "json_object":
            if value is not True:
                raise ApiError(400, "structured_outputs.json_object must be true or false", code="invalid_value",
                               param="structured_outputs")
            found.append((GuidedDecoding("json_object"), "structured_outputs"))
        elif kind == "json":
            found.append((GuidedDecoding("json", _schema_text(close(_parsed(value)), "structured_outputs")),
                          "structured_outputs"))
        elif kind == "choice":
            if not isinstance(value, list):
                raise ApiError(400, "structured_outputs.choice must be a list of strings", code="invalid_value",
                               param="structured_outputs")
            found.append((GuidedDecoding("choice", json.dumps(value)), "structured_outputs"))
        elif not isinstance(value, str):
            raise ApiError(400, f"structured_outputs.{kind} must be a string", code="invalid_value",
                           param="structured_outputs")
        else:
            found.append((GuidedDecoding(kind, value), "structured_outputs"))
    calling = tools_of(req)
    if calling is not None:  # a text format goes with tools (as OpenAI's); any other constraint does not
        answer = [g for g, name in found if name == "response_format"]
        found = [(g, name) for g, name in found if name != "response_format"]
        found.append((calling.guided(answer[0] if answer else None), "tools"))
    if len(found) > 1:
        names = ", ".join(dict.fromkeys(name for _, name in found))
        raise ApiError(400, f"at most one output constraint per request; got {len(found)} ({names})",
                       code="invalid_value", param=found[1][1])
    whitespace, ws_field = None, None
    if so.get("disable_any_whitespace"):
        whitespace, ws_field = "", "structured_outputs"
    for pattern, name in ((so.get("whitespace_pattern"), "structured_outputs"),
                          (req.guided_whitespace_pattern, "guided_whitespace_pattern")):
        if pattern is not None:
            if not isinstance(pattern, str) or whitespace is not None:
                raise ApiError(400, "give one whitespace rule: disable_any_whitespace or a whitespace_pattern string",
                               code="invalid_value", param=name)
            whitespace, ws_field = pattern, name
    if not found:
        if whitespace is not None:
            raise ApiError(400, "a whitespace rule applies to a JSON constraint, and the request has none",
                           code="invalid_value", param=ws_field)
        return None, None
    guided, field = found[0]
    if whitespace is not None:
        if guided.kind not in ("json", "json_object"):
            raise ApiError(400, "a whitespace rule applies to JSON constraints only", code="invalid_value",
                           param=ws_field)
        guided = msgspec.structs.replace(guided, whitespace=whitespace)
    return guided, field


def _parsed(schema: Any) -> Any:
    """A schema given as its JSON text, parsed (so `closed_objects` can close it); anything
    else, or text that is not JSON (the compiler's 400 then says why), as it is."""
    if not isinstance(schema, str):
        return schema
    try:
        return json.loads(schema)
    except (ValueError, RecursionError):
        return schema


def _schema_text(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict | bool):
        return json.dumps(schema)
    raise ApiError(400, "a JSON schema must be an object (or its JSON text)", code="invalid_value", param=param)


def sampling_params(req: CompletionRequest | ChatRequest,
                    guided: tuple[GuidedDecoding | None, str | None] | None = None) -> SamplingParams:
    """The request's sampling settings; out-of-range values → 400 naming the field.

    Chat's ``logprobs: bool`` + ``top_logprobs: k`` and completions'
    ``logprobs: k`` both become ``SamplingParams.logprobs = k`` (None = off).
    ``max_tokens: null`` means "up to the context length" (the runtime caps it).
    `guided`: `guided_decoding(req)` if the caller has it already (else computed here).
    """
    logprobs_param = "logprobs"
    optional_prompt_lp = None
    if req.prompt_logprobs is not None:
        if req.stream:  # as vLLM: they would all come before the first token
            raise ApiError(400, "prompt_logprobs are not available when stream is true", code="invalid_value",
                           param="prompt_logprobs")
        if not 0 <= req.prompt_logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {req.prompt_logprobs}",
                           code="invalid_value", param="prompt_logprobs")
        optional_prompt_lp = req.prompt_logprobs
    if isinstance(req, ChatRequest):
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs=true", code="invalid_value", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None:
            logprobs_param = "top_logprobs"
        if max_tokens == 0:  # only completions may run a prompt alone (echo, scoring)
            field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            raise ApiError(400, f"{field} must be >= 1 here (only completions may run a prompt alone)",
                           code="invalid_value", param=field)
    else:
        max_tokens = COMPLETIONS_MAX_TOKENS if req.max_tokens is msgspec.UNSET else req.max_tokens
        logprobs = req.logprobs
        if req.echo and logprobs is not None:  # the echoed prompt comes with its logprobs
            optional_prompt_lp = max(logprobs, optional_prompt_lp or 0)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    optional: dict[str, Any] = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "min_tokens": req.min_tokens,
        "best_of": req.best_of,
        "length_penalty": req.length_penalty,
        "early_stopping": req.early_stopping,
        "prompt_logprobs": optional_prompt_lp,
    }
    kwargs = {k: v for k, v in optional.items() if v is not None}
    constraint, guided_param = guided if guided is not None else guided_decoding(req)
    if constraint is not None:
        kwargs["guided"] = constraint
    if req.logit_bias:
        try:
            kwargs["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids (integers as strings)", code="invalid_value",
                           param="logit_bias") from None
    try:
        return SamplingParams(
            n=req.n,
            stop=tuple(stop),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            use_beam_search=req.use_beam_search,
            logprobs=logprobs,
            **kwargs,
        )
    except SamplingParamsError as exc:
        param = logprobs_param if exc.field in ("logprobs", "prompt_logprobs") else exc.field
        if exc.field == "guided":
            raise ApiError(400, f"{guided_param}: {exc.reason}", code="invalid_value", param=guided_param) from exc
        if param == "max_tokens" and isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
            param = "max_completion_tokens"
        raise ApiError(400, str(exc), code="invalid_value", param=param) from exc


def new_request_id(endpoint: Endpoint) -> str:
    """A new answer's id; kept for the request's log line too (`gateway.errors.log_failure`:
    the server's own lines about the request name this id, not its `X-Request-Id`)."""
    answer_id = ("chatcmpl-" if endpoint == "chat.completions" else "cmpl-") + uuid.uuid4().hex
    if has_request_context():
        g.answer_id = answer_id
    return answer_id


@dataclass(frozen=True)
class CacheDirectives:
    """What a request's `Cache-Control` header (RFC 9111 §5.2.1) asks of the response cache.

    - `no-cache` (or `max-age=0`): do not answer from a stored response; the fresh answer
      is stored (it refreshes the entry).
    - `no-store`: do not store this answer (a stored one may still answer it).
    - `max-age=N`: answer only from a response stored at most N seconds ago; an older one
      is a miss (the fresh answer then replaces it).
    - `min-fresh=N`: answer only from a response that stays stored at least N more seconds.
    - `only-if-cached`: answer from a stored response or not at all (504 `not_cached`);
      nothing is generated.

    `Pragma: no-cache` is `no-cache` when the request has no `Cache-Control` (§5.4). Every
    other directive is ignored (as a cache that does not implement it may; `max-stale`
    asks for nothing here: an entry is gone when it goes stale), and so is a directive
    whose argument is not a number of seconds. The cache only ever holds deterministic
    requests (greedy, or sampling with a seed)."""

    lookup: bool = True
    store: bool = True
    max_age_s: int | None = None
    min_fresh_s: int | None = None
    only_if_cached: bool = False

    @classmethod
    def parse(cls, header: str | None) -> CacheDirectives:
        lookup = store = True
        only_if_cached = False
        max_age: int | None = None
        min_fresh: int | None = None
        for part in (header or "").split(","):
            name, _, arg = part.strip().partition("=")
            name, arg = name.strip().lower(), arg.strip().strip('"')
            seconds = int(arg) if arg.isascii() and arg.isdigit() else None  # "00" too
            if name == "no-cache" or (name == "max-age" and seconds == 0):
                lookup = False
            elif name == "no-store":
                store = False
            elif name == "only-if-cached":
                only_if_cached = True
            elif name == "max-age" and seconds is not None:
                max_age = seconds if max_age is None else min(max_age, seconds)
            elif name == "min-fresh" and seconds is not None:
                min_fresh = seconds if min_fresh is None else max(min_fresh, seconds)
        return cls(lookup, store, max_age, min_fresh, only_if_cached)

    @classmethod
    def of(cls, headers: Any) -> CacheDirectives:
        """The directives of a request's headers: its `Cache-Control` fields, or without
        any, `Pragma: no-cache`."""
        fields = headers.getlist("Cache-Control")
        if fields:
            return cls.parse(", ".join(fields))
        pragma = ", ".join(headers.getlist("Pragma"))
        return cls(lookup=False) if any(p.strip().lower() == "no-cache" for p in pragma.split(",")) else cls()

    def call_fields(self) -> dict[str, Any]:
        """The `GenerateCall` fields that carry these directives to admission."""
        return {"cache_lookup": self.lookup, "cache_store": self.store, "cache_max_age_s": self.max_age_s,
                "cache_min_fresh_s": self.min_fresh_s, "cache_only": self.only_if_cached}


MAX_BATCH_PROMPTS = 2048  # prompts in one completions request (OpenAI's limit)


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completions request: one for a string or a list of token ids,
    several for a list of strings or of token id lists (a batch). Other shapes → 400."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", code="invalid_value", param="prompt")
    kinds = {type(p) for p in prompt}
    if len(kinds) > 1:
        raise ApiError(400, "prompt must be a string, a list of token ids, a list of strings or a list of token "
                       "id lists; this list mixes them", code="invalid_value", param="prompt")
    if kinds == {int}:
        prompts: list[str | list[int]] = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if len(prompts) > MAX_BATCH_PROMPTS:
        raise ApiError(400, f"at most {MAX_BATCH_PROMPTS} prompts in one request, got {len(prompts)}",
                       code="invalid_value", param="prompt")
    for p in prompts:
        if isinstance(p, list):
            if not p:
                raise ApiError(400, "prompt must not be empty", code="invalid_value", param="prompt")
            if any(t < 0 for t in p):
                raise ApiError(400, "prompt token ids must be >= 0", code="invalid_value", param="prompt")
    return prompts


def prompt_logprob_copies(req: CompletionRequest | ChatRequest) -> dict[str, Any]:
    """`GenerateCall.prompt_logprob_copies` and `prompt_logprobs_param`: how many times the
    answer repeats each prompt's logprobs (admission bounds them), and the field to name."""
    if isinstance(req, ChatRequest):  # (vLLM's: once, beside the choices)
        return {"prompt_logprob_copies": 1 if req.prompt_logprobs is not None else 0}
    echoed = req.echo and req.logprobs is not None
    copies = req.n * (int(echoed) + int(req.prompt_logprobs is not None))
    param = "n" if req.n > 1 else "prompt_logprobs" if req.prompt_logprobs is not None else "logprobs"
    return {"prompt_logprob_copies": copies, "prompt_logprobs_param": param}


def sub_request_id(request_id: str, i: int, count: int) -> str:
    """The runtime's id of prompt `i` of a request with `count` prompts (one prompt: the
    request's own id)."""
    return request_id if count == 1 else f"{request_id}-{i}"


MAX_METADATA = (16, 64, 512)  # OpenAI's: pairs, characters of a key, of a value
MAX_APP_CHARS = 128  # an application tag (`metadata.app`, X-Lmgate-App)
MAX_USER_CHARS = 256  # `user`


def check_metadata(meta: dict[str, str] | None) -> None:
    """OpenAI's limits on `metadata` (16 pairs, keys of 64 characters, values of 512), a
    400 naming it beyond them."""
    pairs, key_len, value_len = MAX_METADATA
    meta = meta or {}
    if len(meta) > pairs or any(len(k) > key_len or len(v) > value_len for k, v in meta.items()):
        raise ApiError(400, f"metadata holds at most {pairs} pairs, keys of at most {key_len} characters and "
                       f"values of at most {value_len}", code="invalid_value", param="metadata")


def check_labels(app: str | None, user: str | None) -> None:
    """The application tag and `user` a request is known by (the length predictors keep
    statistics per tenant, app and user: bounded in count, so bounded in length here: a
    400 beyond `MAX_APP_CHARS` / `MAX_USER_CHARS`)."""
    if app is not None and len(app) > MAX_APP_CHARS:
        raise ApiError(400, f"the application tag (metadata.app or X-Lmgate-App) is at most {MAX_APP_CHARS} "
                       f"characters", code="invalid_value", param="metadata")
    if user is not None and len(user) > MAX_USER_CHARS:
        raise ApiError(400, f"user is at most {MAX_USER_CHARS} characters", code="invalid_value", param="user")


def to_generate_calls(
    req: CompletionRequest | ChatRequest,
    tenant: TenantContext,
    request_id: str,
    *,
    app_tag: str | None = None,
    cache: CacheDirectives = CacheDirectives(),
) -> list[GenerateCall]:
    """Pure mapping from a decoded request to the runtime's messages: one per prompt
    (`completion_prompts`), with ids from `sub_request_id`."""
    guided = guided_decoding(req)  # (the constraint, the field it came from): computed once
    params = sampling_params(req, guided)
    if req.priority is not None and req.priority < 0:
        raise ApiError(400, "priority must be >= 0", code="invalid_value", param="priority")
    check_metadata(req.metadata)
    app = app_tag or (req.metadata or {}).get("app")
    check_labels(app, req.user)
    common = dict(
        request_id=request_id,
        tenant=tenant,
        model=req.model,
        params=params,
        stream=req.stream,
        priority=req.priority,
        user=req.user,
        app=app,
        arrival_time=time.time(),
        **cache.call_fields(),
        guided_field=guided[1],
        max_tokens_param="max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None
        else "max_tokens",
        **prompt_logprob_copies(req),
    )
    if isinstance(req, ChatRequest):
        if not req.messages:
            raise ApiError(400, "messages must not be empty", code="invalid_value", param="messages")
        unsupported_chat_fields(req)
        if req.echo and params.guided is not None:
            raise ApiError(400, "echo cannot be combined with an output constraint or tool calling",
                           code="invalid_value", param="echo")
        messages = chat_messages(req.messages, tools_of(req))
        check_chat_ending(messages, req.add_generation_prompt, req.continue_final_message, params.guided is not None)
        return [GenerateCall(messages=messages, **common, add_generation_prompt=req.add_generation_prompt,
                             continue_final_message=req.continue_final_message)]
    if req.suffix:
        raise ApiError(400, "suffix (insertion) is not supported", code="unsupported_value", param="suffix")
    if req.tools or req.tool_choice not in (None, "none"):
        raise ApiError(400, "tool calling is a chat completions feature", code="unsupported_value",
                       param="tools" if req.tools else "tool_choice")
    prompts = completion_prompts(req)
    del common["request_id"]
    return [
        GenerateCall(request_id=sub_request_id(request_id, i, len(prompts)),
                     **({"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}), **common,
                     max_tokens_default=req.max_tokens is msgspec.UNSET,
                     batch_id=request_id if len(prompts) > 1 else None, batch_index=i, batch_size=len(prompts))
        for i, p in enumerate(prompts)
    ]


def rejected_error(rej: Rejected) -> ApiError:
    """The refusal as the HTTP error; a quota refusal's standing goes out as the answer's
    `x-ratelimit-*` headers, as OpenAI sends them with a 429."""
    if rej.rate_limits is not None and has_request_context():
        g.rate_limits = rej.rate_limits
    return ApiError(rej.status, rej.message, code=rej.code, param=rej.param, retry_after=rej.retry_after,
                    admission_saw=True)  # (admission counted it in `lmgate_rejections_total`)


def failed_error(fail: Failed) -> ApiError:
    """The error of a request that failed after admission; a 429 or 503 (a shutdown's grace
    end) says when to retry, as every 429 and 503 does."""
    retry_after = 1.0 if fail.status in (429, 503) else None
    return ApiError(fail.status, fail.message, code=fail.code, param=fail.param, retry_after=retry_after,
                    admission_saw=True)


def unfinished_error() -> ApiError:
    """The error of a request whose events ended without a Finished or a Failed (a runtime
    bug's shape): every route says it (a JSON 500, an SSE or WebSocket error event), so
    that what was streamed is not taken for a whole answer."""
    return ApiError(500, "the runtime closed the stream without finishing", code="internal_error")


def usage_json(finished: Finished) -> dict[str, Any]:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens`: the prompt tokens not computed
    (prefix-cache hits; all of them for an answer from the response cache)."""
    u = finished.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }


# ---------------------------------------------------------------- rendering


def _token_text(delta: TokenDelta, i: int, token_id: int) -> str:
    """The text of token i: from the runtime when it sent token texts, else the delta's
    text for a one-token delta, else a placeholder naming the id."""
    if delta.tokens is not None and i < len(delta.tokens):
        return delta.tokens[i]
    return delta.text if len(delta.token_ids) == 1 else f"<{token_id}>"


TokenBytes = Callable[[int], bytes]


def _bytes_of(token_bytes: TokenBytes | None, token_id: int, text: str) -> list[int]:
    """A token's bytes: exact from the tokenizer (a token that is part of a UTF-8
    character decodes alone to U+FFFD, whose bytes are not the token's), else its text's."""
    if token_bytes is not None:
        try:
            return list(token_bytes(token_id))
        except KeyError:  # outside the vocabulary: fall back to the text
            pass
    return list(text.encode())


def _chat_logprobs(delta: TokenDelta, token_bytes: TokenBytes | None = None,
                   leave_out: frozenset[int] = frozenset()) -> dict[str, Any] | None:
    """A delta's tokens as chat's `logprobs` (None: it asked for none); `leave_out`: ids
    whose entries are left out (`ChunkRenderer.lp_leave_out`)."""
    if delta.logprobs is None:
        return None
    items = []
    for i, (tok, lp) in enumerate(zip(delta.token_ids, delta.logprobs, strict=False)):
        if tok in leave_out:
            continue
        text = _token_text(delta, i, tok)
        tops = delta.top_logprobs[i] if delta.top_logprobs and i < len(delta.top_logprobs) else []
        items.append(
            {
                "token": text,
                "logprob": lp,
                "bytes": _bytes_of(token_bytes, tok, text),
                "top_logprobs": [{"token": t.token or f"<{t.token_id}>", "logprob": t.logprob,
                                  "bytes": _bytes_of(token_bytes, t.token_id, t.token or f"<{t.token_id}>")}
                                 for t in tops],
            }
        )
    return {"content": items}


class TextOffsets:
    """Where each token of one choice starts in its text (legacy logprobs' `text_offset`),
    counted from the tokens' own bytes: a delta's text is not its tokens' (a stop string's
    possible start is held back and goes out with a later token's text; beam search sends
    its answer in one delta). A token that is part of a character starts where the
    character does; a special token, which the text skips, is no characters long."""

    def __init__(self, start: int, special_ids: frozenset[int] = frozenset()) -> None:
        self.chars = start  # characters before the next token: the echoed prompt, then the tokens
        self.special_ids = special_ids
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def of(self, token_ids: Sequence[int], tokens: Sequence[str]) -> list[int]:
        offsets = []
        for tid, tok in zip(token_ids, tokens, strict=True):
            offsets.append(self.chars)
            if tid not in self.special_ids:
                self.chars += len(self._decoder.decode(_token_raw_bytes(tok)))
        return offsets


def _completion_logprobs(delta: TokenDelta, offsets: TextOffsets) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs for one delta of a choice whose `offsets` they go on."""
    if delta.logprobs is None:
        return None
    tokens = [_token_text(delta, i, t) for i, t in enumerate(delta.token_ids)]
    tops = [
        {t.token or f"<{t.token_id}>": t.logprob for t in row} for row in (delta.top_logprobs or [])
    ]
    return {"tokens": tokens, "token_logprobs": list(delta.logprobs), "top_logprobs": tops or None,
            "text_offset": offsets.of(delta.token_ids, tokens)}


def _token_raw_bytes(token: str) -> bytes:
    """A token's bytes from its logprobs text (`bytes:\\xNN...` for part of a character)."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
    return token.encode()


def _prompt_logprobs_json(prompt: list[PromptLogprob], text: str) -> dict[str, Any]:
    """Legacy logprobs of an echoed prompt (`text`): its first token has none (null).
    `text_offset[i]`: the characters decoded before token i (a token that starts inside a
    character starts where the character does)."""
    offsets, seen = [], 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for p in prompt:
        offsets.append(min(seen, len(text)))
        seen += len(decoder.decode(_token_raw_bytes(p.token)))
    return {
        "tokens": [p.token for p in prompt],
        "token_logprobs": [p.logprob for p in prompt],
        "top_logprobs": [None if p.logprob is None else {t.token or f"<{t.token_id}>": t.logprob for t in p.top}
                         for p in prompt],
        "text_offset": offsets,
    }


def _concat_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Legacy logprobs of consecutive pieces of one choice's text, as one."""
    return {
        "tokens": [t for p in parts for t in p["tokens"]],
        "token_logprobs": [t for p in parts for t in p["token_logprobs"]],
        "top_logprobs": [t for p in parts for t in (p["top_logprobs"] or [])] or None,
        "text_offset": [t for p in parts for t in p["text_offset"]],
    }


def _echo_parts(delta: TokenDelta, echo: str, logprobs: int | None) -> tuple[str, dict[str, Any] | None]:
    """The echoed prompt before a choice's first delta: its text, and its logprobs with
    `logprobs` alternatives when the request asked for them (they come with the delta; it
    may carry more alternatives, for `prompt_logprobs`)."""
    if delta.prompt_logprobs is None or logprobs is None:
        return echo, None
    return echo, _echo_logprobs(delta.prompt_logprobs, echo, logprobs)


def _echo_logprobs(prompt: list[PromptLogprob], echo: str, logprobs: int) -> dict[str, Any]:
    """The legacy logprobs of an echoed prompt, with `logprobs` alternatives."""
    return _prompt_logprobs_json([msgspec.structs.replace(p, top=p.top[:logprobs]) for p in prompt], echo)


def vllm_prompt_logprobs(prompt: list[PromptLogprob], k: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: {logprob,
    rank, decoded_token}} for the token itself and the k most likely there (ranks 1..k). A
    token that is part of a UTF-8 character decodes as vLLM's does, with U+FFFD."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for p in prompt:
        if p.logprob is None:
            out.append(None)
            continue
        entry = {str(p.token_id): {"logprob": p.logprob, "rank": p.rank, "decoded_token": _decoded(p.token)}}
        for rank, t in enumerate(p.top[:k], 1):
            entry.setdefault(str(t.token_id), {"logprob": t.logprob, "rank": rank, "decoded_token": _decoded(t.token)})
        out.append(entry)
    return out


def _decoded(token: str) -> str:
    """A token's text as `tokenizer.decode([id])` gives it (logprobs' `bytes:\\xNN` form → U+FFFD)."""
    return _token_raw_bytes(token).decode("utf-8", errors="replace") if token.startswith("bytes:") else token


@dataclass
class Collector:
    """Folds the events of one request into OpenAI's non-streaming response.

    `echo`: per prompt, its text, written before each of its choices (completions'
    `echo`); choice `i` belongs to prompt `i // n`."""

    endpoint: Endpoint
    request_id: str
    model: str
    n: int
    created: int = field(default_factory=lambda: int(time.time()))
    texts: dict[int, list[str]] = field(default_factory=dict)
    logprobs: dict[int, list[Any]] = field(default_factory=dict)  # per choice: dicts, or a thunk (echo)
    token_bytes: TokenBytes | None = None  # the tokenizer's, for logprobs' `bytes`
    echo: list[str] | None = None
    tools: ToolCalling | None = None  # chat: the text of each choice is its tool calls
    echo_logprobs: int | None = None  # completions' `logprobs`: the echoed prompt's alternatives
    prompt_logprobs_k: int | None = None  # vLLM's `prompt_logprobs` asked for (None: not in the answer)
    prompt_logprobs: dict[int, list[PromptLogprob]] = field(default_factory=dict)  # by choice
    special_ids: frozenset[int] = frozenset()  # the tokenizer's, which the text skips (text_offset)
    _offsets: dict[int, TextOffsets] = field(default_factory=dict)  # by choice
    # tokens with logprobs in the answer (its prompts' too, once a choice): a large answer is
    # built in a worker thread (`collect`)
    weight: int = 0
    _prompt_json: dict[Any, Any] = field(default_factory=dict)  # a prompt's logprobs list -> its JSON, built once

    def add(self, delta: TokenDelta) -> None:
        if delta.prompt_logprobs is not None and self.prompt_logprobs_k is not None:
            if delta.index not in self.prompt_logprobs:
                self.weight += len(delta.prompt_logprobs)
            self.prompt_logprobs.setdefault(delta.index, delta.prompt_logprobs)
        if self.echo is not None and delta.index not in self.texts:
            echo = self.echo[delta.index // self.n]
            self.texts[delta.index] = [echo]
            if delta.prompt_logprobs is not None and self.echo_logprobs is not None:
                # (built with the answer — in its worker thread for a large one — and once a
                # prompt, whose choices bring the same list: built here as each came, 64 choices
                # of a 2,000-token prompt took 0.9 s of the event loop)
                thunk = self._prompt_json.get(id(delta.prompt_logprobs))
                if thunk is None:
                    thunk = self._prompt_json[id(delta.prompt_logprobs)] = functools.cache(
                        functools.partial(_echo_logprobs, delta.prompt_logprobs, echo, self.echo_logprobs))
                self.logprobs[delta.index] = [thunk]
                self.weight += len(delta.prompt_logprobs)
        done = self.texts.setdefault(delta.index, [])
        if self.endpoint == "chat.completions":
            lp = _chat_logprobs(delta, self.token_bytes)
        else:
            offsets = self._offsets.get(delta.index)
            if offsets is None:  # (after the echoed prompt)
                offsets = self._offsets[delta.index] = TextOffsets(sum(map(len, done)), self.special_ids)
            lp = _completion_logprobs(delta, offsets)
        done.append(delta.text)
        if lp is not None:
            self.logprobs.setdefault(delta.index, []).append(lp)
            self.weight += max(1, len(delta.token_ids))  # (a beam's answer, a cache replay: one delta)

    def _merged_logprobs(self, index: int) -> dict[str, Any] | None:
        parts = self.logprobs.get(index)
        if not parts:
            return None
        parts = [p() if callable(p) else p for p in parts]  # (an echoed prompt's: `add`)
        if self.endpoint == "chat.completions":
            return {"content": [item for p in parts for item in p["content"]]}
        return _concat_logprobs(parts)

    def response(self, finished: Finished) -> dict[str, Any]:
        choices = []
        for i in range(max(self.n, len(finished.finish_reasons))):
            parts = self.texts.get(i) or ([self.echo[i // self.n]] if self.echo else [])  # (a choice without deltas)
            text = "".join(parts)
            reason = finished.finish_reasons[i] if i < len(finished.finish_reasons) else "stop"
            if self.endpoint == "chat.completions":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                parsed = None
                if self.tools is not None:  # (cut by max_tokens: the calls as written, still "length")
                    parsed = (self.tools.tool_calls_of(text) if reason == "stop"
                              else self.tools.cut_calls(text) if reason == "length" else None)
                if self.tools is not None and parsed is None:
                    message["content"] = self.tools.content_of(text, reason)
                if parsed is not None:
                    message = {"role": "assistant", "content": parsed[0], "tool_calls": parsed[1]}
                    reason = self.tools.finish_reason if reason == "stop" else reason
                choices.append(
                    {
                        "index": i,
                        "message": message,
                        "logprobs": self._merged_logprobs(i),
                        "finish_reason": reason,
                    }
                )
            else:
                choices.append(
                    {"index": i, "text": text, "logprobs": self._merged_logprobs(i), "finish_reason": reason}
                )
                if self.prompt_logprobs_k is not None:  # vLLM's: each choice its prompt's (built once a prompt)
                    prompt = self.prompt_logprobs.get(i, [])
                    key = ("vllm", id(prompt))
                    if key not in self._prompt_json:
                        self._prompt_json[key] = vllm_prompt_logprobs(prompt, self.prompt_logprobs_k)
                    choices[-1]["prompt_logprobs"] = self._prompt_json[key]
        out = {
            "id": self.request_id,
            "object": "chat.completion" if self.endpoint == "chat.completions" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_json(finished),
        }
        if self.prompt_logprobs_k is not None and self.endpoint == "chat.completions":  # vLLM's: once, beside
            first = next(iter(self.prompt_logprobs.values()), [])
            out["prompt_logprobs"] = vllm_prompt_logprobs(first, self.prompt_logprobs_k)
        return out


@dataclass
class ChunkRenderer:
    """Turns events into OpenAI stream chunks (``chat.completion.chunk`` / ``text_completion``)."""

    endpoint: Endpoint
    request_id: str
    model: str
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    _role_sent: set[int] = field(default_factory=set)
    token_bytes: TokenBytes | None = None  # the tokenizer's, for logprobs' `bytes`
    _offsets: dict[int, TextOffsets] = field(default_factory=dict)  # per choice (text_offset)
    special_ids: frozenset[int] = frozenset()  # as `Collector.special_ids`
    # token ids whose logprobs are left out: the Responses API's, whose logprobs belong to
    # an output_text and list what it holds (its end-of-turn token is not in it)
    lp_leave_out: frozenset[int] = frozenset()
    echo: list[str] | None = None  # as `Collector.echo`
    echo_logprobs: int | None = None  # as `Collector.echo_logprobs`
    n: int = 1
    _ended: set[int] = field(default_factory=set)  # choices whose finish_reason was sent
    # chat with tool calling: each choice's text is held back and sent as its tool calls
    # (`gateway.tools`); in auto mode only what may be a call is held
    # (`gateway.tools.streamable`), the logprobs of held text go out with the next chunk.
    # `stream_calls`: each call goes out as it is written (`call_chunks`: its id and name
    # once the name is whole, then its arguments in pieces, as OpenAI streams them); False:
    # whole when the choice ends — auto mode with `stop` / `stop_token_ids`, where a stop
    # may end the choice inside a call, which is then dropped (it cannot be unsent)
    tools: ToolCalling | None = None
    stream_calls: bool = True
    _held: dict[int, list[str]] = field(default_factory=dict)
    _held_lp: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    _streamed: dict[int, int] = field(default_factory=dict)  # auto mode: characters sent as content
    _calls: dict[int, list[list[Any]]] = field(default_factory=dict)  # per choice: [id, argument chars sent]

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.endpoint == "chat.completions" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def delta(self, d: TokenDelta) -> dict[str, Any] | None:
        """The chunk of one delta (None: nothing to send yet — a tool call's text is held)."""
        if self.tools is not None:
            held = self._held.setdefault(d.index, [])
            held.append(d.text)
            lp = _chat_logprobs(d, self.token_bytes, self.lp_leave_out)
            if lp is not None:
                self._held_lp.setdefault(d.index, []).extend(lp["content"])
            if not self.tools.auto:
                return None
            text = "".join(held)
            held[:] = [text]
            sent = self._streamed.get(d.index, 0)
            ready = self.tools.streamable(text)
            if not text[:ready].strip():  # blank so far: held, as the answer's content is None if a call follows
                ready = 0
            if ready <= sent:
                return None
            self._streamed[d.index] = ready
            return self._chunk([self._content_choice(d.index, text[sent:ready], self._held_lp.pop(d.index, None))])
        # A delta that adds no text and no logprobs (the end-of-sequence token; a piece of a
        # character) sends nothing, unless it is its choice's first (which starts the choice)
        if self.endpoint == "chat.completions":
            lp = _chat_logprobs(d, self.token_bytes, self.lp_leave_out)
            if not d.text and lp is None and d.index in self._role_sent:
                return None
            choice = self._content_choice(d.index, d.text, lp["content"] if lp is not None else None)
        else:
            head, head_lp = "", None
            offsets = self._offsets.get(d.index)
            first = offsets is None
            if first:  # the choice's first delta: the prompt before it, if echoed
                if self.echo is not None:
                    head, head_lp = _echo_parts(d, self.echo[d.index // self.n], self.echo_logprobs)
                offsets = self._offsets[d.index] = TextOffsets(len(head), self.special_ids)
            lp = _completion_logprobs(d, offsets)
            if head_lp is not None:
                lp = head_lp if lp is None else _concat_logprobs([head_lp, lp])
            if not first and not d.text and lp is None:
                return None
            choice = {"index": d.index, "text": head + d.text, "logprobs": lp, "finish_reason": None}
        return self._chunk([choice])

    def call_chunks(self, i: int) -> list[dict[str, Any]]:
        """Choice `i`'s tool calls as far as its text so far spells them, after its last
        delta (`stream_calls`): a call's first piece carries its `id`, `type` and name
        (arguments "" or their start), later pieces only `index` and more `arguments`.
        Nothing when calls go out whole, or nothing new is written."""
        if self.tools is None or not self.stream_calls or i in self._ended:
            return []
        text = "".join(self._held.get(i, []))
        sent = self._calls.setdefault(i, [])
        pieces: list[dict[str, Any]] = []
        for k, call in enumerate(self.tools.calls_so_far(text)):
            if call.name is None:
                break
            if k == len(sent):
                sent.append(["call_" + uuid.uuid4().hex[:24], 0])
                pieces.append({"index": k, "id": sent[k][0], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            if call.start is None:
                continue
            end = call.end if call.end is not None else len(text)
            new = text[call.start + sent[k][1]:end]
            if not new:
                continue
            sent[k][1] = end - call.start
            if pieces and pieces[-1]["index"] == k:
                pieces[-1]["function"]["arguments"] += new
            else:
                pieces.append({"index": k, "function": {"arguments": new}})
        if not pieces:
            return []
        body: dict[str, Any] = {"tool_calls": pieces}
        if i not in self._role_sent:
            self._role_sent.add(i)
            body = {"role": "assistant", "content": None, **body}
        lp = self._held_lp.pop(i, None)
        return [self._chunk([{"index": i, "delta": body, "logprobs": {"content": lp} if lp is not None else None,
                              "finish_reason": None}])]

    def opening(self) -> dict[str, Any] | None:
        """Chat with n > 1, before the stream's first chunk: one chunk starting every choice
        (its role, and the echoed message if any), in index order. Choices end in any
        order, and the openai SDK's stream helper takes a choice's first appearance as its
        position; with every choice started at once, any order after it is fine."""
        if self.endpoint != "chat.completions" or self.n <= 1 or self._role_sent:
            return None
        self._role_sent.update(range(self.n))
        # with tools, a choice that calls has no content (null, as OpenAI streams it): a ""
        # here would stay in what the SDK assembles; text that follows replaces the null
        blank = None if self.tools is not None else ""
        start = {"role": "assistant", "content": self.echo[0] if self.echo else blank}
        return self._chunk([{"index": i, "delta": dict(start), "logprobs": None, "finish_reason": None}
                            for i in range(self.n)])

    def _content_choice(self, i: int, text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
        """A chat choice's delta of content (the first time with the role, after the echoed
        message if any)."""
        body: dict[str, Any] = {"content": text}
        if i not in self._role_sent:
            self._role_sent.add(i)
            body = {"role": "assistant", "content": (self.echo[0] if self.echo else "") + text}
        return {"index": i, "delta": body, "logprobs": {"content": logprobs} if logprobs is not None else None,
                "finish_reason": None}

    def _finish_choice(self, i: int, reason: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Choice `i`'s end: its tool calls, if it made any (sent in a chunk of their own
        before the finish, as OpenAI does: the SDK's stream helper completes a call only
        when the finish comes after it), and the choice with its `finish_reason`."""
        self._ended.add(i)
        if self.endpoint != "chat.completions":
            return None, {"index": i, "text": "", "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {} if i in self._role_sent else {"role": "assistant",
                                                                 "content": self.echo[0] if self.echo else ""}
        calls = None
        logprobs = None
        if self.tools is not None:
            text = "".join(self._held.pop(i, []))
            sent = self._streamed.pop(i, 0)  # auto mode: content already streamed
            started = self._calls.pop(i, [])  # calls already streamed in part (`call_chunks`)
            parsed = self.tools.tool_calls_of(text) if reason == "stop" else None
            cut = parsed is None and reason == "length" and not started
            if cut:  # calls held whole (`stream_calls` False) that max_tokens cut: sent as written
                parsed = self.tools.cut_calls(text)
            held_lp = self._held_lp.pop(i, None)
            logprobs = {"content": held_lp} if held_lp is not None else None
            if parsed is not None:
                pieces = []
                for k, c in enumerate(parsed[1]):
                    if k < len(started):  # the rest of its arguments, under the id it went out with
                        rest = c["function"]["arguments"][started[k][1]:]
                        if rest:
                            pieces.append({"index": k, "function": {"arguments": rest}})
                    else:
                        pieces.append({"index": k, **c})
                body: dict[str, Any] = {"tool_calls": pieces} if pieces else {}
                if not started:
                    body = {"content": None, **body}
                if i not in self._role_sent:
                    body = {"role": "assistant", "content": parsed[0], **body}
                if body or logprobs is not None:
                    calls = {"index": i, "delta": body, "logprobs": logprobs, "finish_reason": None}
                delta, logprobs, reason = {}, None, reason if cut else self.tools.finish_reason
            elif started:  # cut inside a call (max_tokens): what was written of it has gone out
                delta = {}
            else:
                text = self.tools.content_of(text, reason)
                rest = text[sent:]
                delta = ({"content": rest} if rest else {}) if i in self._role_sent else {"role": "assistant",
                                                                                          "content": text}
            self._role_sent.add(i)
        return calls, {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def _end_chunks(self, ends: list[tuple[dict[str, Any] | None, dict[str, Any]]]) -> list[dict[str, Any]]:
        """The chunks ending some choices: their tool calls, then their finish reasons."""
        calls = [c for c, _ in ends if c is not None]
        finishes = [f for _, f in ends]
        return ([self._chunk(calls)] if calls else []) + ([self._chunk(finishes)] if finishes else [])

    def choice_end(self, d: TokenDelta) -> list[dict[str, Any]]:
        """The chunks ending `d`'s choice when `d` is its last (none otherwise), sent right
        after `d`'s own: with n > 1 each choice's finish_reason (and tool calls) goes out
        as that choice ends, not when the last one does."""
        if d.finish_reason is None or d.index in self._ended:
            return []
        return self._end_chunks([self._finish_choice(d.index, d.finish_reason)])

    def prompt_finished(self, p: PromptFinished) -> list[dict[str, Any]]:
        """The chunks ending one prompt's choices of a batch (`PromptFinished`) that have not
        ended yet."""
        return self._end_chunks([self._finish_choice(p.first_index + j, r) for j, r in enumerate(p.finish_reasons)
                                 if p.first_index + j not in self._ended])

    def finished(self, f: Finished) -> list[dict[str, Any]]:
        """The last chunks: the finish reasons of the choices not ended yet, then usage."""
        chunks = self._end_chunks([self._finish_choice(i, r) for i, r in enumerate(f.finish_reasons)
                                   if i not in self._ended])
        if self.include_usage:
            last = self._chunk([])
            last["usage"] = usage_json(f)
            chunks.append(last)
        return chunks


# ---------------------------------------------------------------- runtime glue


async def submit(state: GatewayState, call: GenerateCall) -> Accepted:
    """Submit to the runtime; a Rejected becomes the matching ApiError (4xx/429/503)."""
    reply = await state.runtime.submit(call)
    if isinstance(reply, Rejected):
        raise rejected_error(reply)
    note_accepted(reply)
    return reply


def note_accepted(accepted: Accepted) -> None:
    """Keep, for the response's headers, where the tenant stands against its per-minute
    limits after this request (`x-ratelimit-*`, `gateway.app.rate_limit_headers`), and how
    old the stored answer is when it came from the response cache (`Age`: only when every
    prompt of the request did, the oldest)."""
    if not has_request_context():
        return
    if accepted.rate_limits is not None:
        g.rate_limits = accepted.rate_limits
    if accepted.cached and accepted.cache_age_s is not None and not g.get("fresh_answer", False):
        g.cache_age_s = max(g.get("cache_age_s", 0.0), accepted.cache_age_s)
    else:
        g.fresh_answer = True
        g.pop("cache_age_s", None)


def echo_texts(state: GatewayState, req: CompletionRequest | ChatRequest, calls: list[GenerateCall]) -> list[str] | None:
    """Completions' `echo`: each call's prompt text (token ids decoded, special tokens
    kept). Chat's (vLLM's): the last message's text if it is an assistant's (a prefilled
    answer, with `continue_final_message`), which each choice then starts with. Else None."""
    if isinstance(req, ChatRequest):
        if not req.echo or req.messages[-1].role != "assistant":
            return None
        return [req.messages[-1].text()]
    if not req.echo:
        return None
    tokenizer = getattr(state.runtime, "tokenizer", None)
    texts = []
    for call in calls:
        if call.prompt is not None:
            texts.append(call.prompt)
        elif tokenizer is not None:
            texts.append(tokenizer.decode(list(call.prompt_token_ids or ()), skip_special_tokens=False))
        else:
            texts.append("")
    return texts


def token_bytes_of(state: GatewayState) -> TokenBytes | None:
    tokenizer = getattr(state.runtime, "tokenizer", None)
    return getattr(tokenizer, "token_bytes", None)


def special_ids_of(state: GatewayState, req: _Sampling) -> frozenset[int]:
    """The special token ids the request's text skips: the served tokenizer's (none without
    one), unless it asked for them (`skip_special_tokens: false`)."""
    if not req.skip_special_tokens:
        return frozenset()
    return frozenset(getattr(getattr(state.runtime, "tokenizer", None), "all_special_ids", ()))


SETTLE_WAIT_S = 2.0  # longest a last frame waits for the quota settlement (Redis retries)


class RequestHandle:
    """An accepted request plus whether it has ended; `abort()` is idempotent.

    Every path that receives an `Accepted` wraps it so there is exactly one place
    that decides "the client is gone before the end: cancel it".
    """

    def __init__(self, accepted: Accepted) -> None:
        self.accepted = accepted
        self.ended = False  # Finished or Failed was received
        self.aborted = False

    def abort(self, *, refund: bool = False) -> None:
        """Cancel the request unless it already ended; always close the channel. `refund`:
        the caller never gets any of it (its batch was refused), so its quota is released
        rather than charged with what it had computed (`Accepted.refund`)."""
        if not self.ended and not self.aborted:
            self.aborted = True
            if refund and self.accepted.refund is not None:
                self.accepted.refund()
            self.accepted.cancel()
        if self.accepted.events is not None:  # None: the events go to a shared sink (`BatchHandle`)
            self.accepted.events.close()

    def events(self, idle_after: float | None = None) -> AsyncIterator[TokenDelta | Finished | Failed | Idle]:
        """The request's events; with `idle_after`, an `IDLE` after each `idle_after`
        seconds without one."""
        return self.accepted.events if idle_after is None else Pinging(self.accepted.events, idle_after)

    async def wait_settled(self) -> None:
        """Until accounting has settled the request's quota (its `max_concurrent` slot is
        free again), for at most SETTLE_WAIT_S: a client that sends its next request on the
        last frame of this one is then never refused for this one."""
        if self.accepted.settled is not None:
            with trio.move_on_after(SETTLE_WAIT_S):
                await self.accepted.settled.wait()


class BatchHandle:
    """The requests of one API request with several prompts (`to_generate_calls`), read as
    one request: their events share one channel (`submit_all`), choice `j` of prompt `i`
    becomes choice `i * n + j`, each prompt that ends before the last is a `PromptFinished`,
    and one `Finished` ends it when every prompt has finished (finish reasons in choice
    order, usage summed). A `Failed` of any prompt ends it (the
    others are aborted). Same interface as `RequestHandle`."""

    def __init__(self, request_id: str, parts: list[RequestHandle], events: trio.MemoryReceiveChannel, n: int) -> None:
        self.request_id = request_id
        self.parts = parts
        self._events = events
        self.n = n
        self._prompt = {h.accepted.request_id: i for i, h in enumerate(parts)}
        self.ended = False
        self.aborted = False

    def abort(self) -> None:
        self.aborted = self.aborted or not self.ended
        for h in self.parts:
            h.abort()
        self._events.close()

    async def wait_settled(self) -> None:
        for h in self.parts:
            await h.wait_settled()

    async def events(self, idle_after: float | None = None,
                     ) -> AsyncIterator[TokenDelta | PromptFinished | Finished | Failed | Idle]:
        reasons: dict[int, list[str]] = {}
        prompt_tokens = completion_tokens = cached_prompt_tokens = 0
        cached = True
        async for event in (self._events if idle_after is None else Pinging(self._events, idle_after)):
            if event is IDLE:
                yield event
                continue
            i = self._prompt.get(event.request_id)
            if i is None:
                continue
            if isinstance(event, TokenDelta):
                yield msgspec.structs.replace(event, request_id=self.request_id, index=i * self.n + event.index)
            elif isinstance(event, Failed):
                self.parts[i].ended = True
                yield msgspec.structs.replace(event, request_id=self.request_id)
                return
            else:
                self.parts[i].ended = True
                reasons[i] = event.finish_reasons
                prompt_tokens += event.usage.prompt_tokens
                completion_tokens += event.usage.completion_tokens
                cached_prompt_tokens += event.usage.cached_prompt_tokens
                cached = cached and event.cached
                if len(reasons) == len(self.parts):
                    yield Finished(self.request_id, [r for k in range(len(self.parts)) for r in reasons[k]],
                                   Usage(prompt_tokens, completion_tokens, cached_prompt_tokens), cached)
                    return
                yield PromptFinished(i * self.n, event.finish_reasons)


@dataclass(frozen=True)
class PromptFinished:
    """A prompt of a batch (`BatchHandle`) ended before the request: its choices, from
    `first_index` on, ended with `finish_reasons`. A stream says so at once; the request's
    `Finished` comes after the last prompt."""

    first_index: int
    finish_reasons: list[str]


Handle = RequestHandle | BatchHandle


class Pinging:
    """A memory channel's items, with `sse.IDLE` after every `seconds` without one. A memory
    channel's receive may be cancelled without losing an item, so the timeout is safe."""

    def __init__(self, channel: trio.MemoryReceiveChannel, seconds: float) -> None:
        self.channel = channel
        self.seconds = seconds

    def __aiter__(self) -> Pinging:
        return self

    async def __anext__(self) -> Any:
        with trio.move_on_after(self.seconds):
            try:
                return await self.channel.receive()
            except trio.EndOfChannel:
                raise StopAsyncIteration from None
        return IDLE


async def submit_all(state: GatewayState, calls: list[GenerateCall], request_id: str, n: int) -> Handle:
    """Submit a request's calls (one per prompt). One call: a `RequestHandle`; several: a
    `BatchHandle` whose calls send their events into one unbounded channel. Any refusal
    aborts the calls accepted before it and is the whole request's error (each prompt is
    a request to admission and the quotas: a batch of k counts k requests)."""
    if len(calls) == 1:
        return RequestHandle(await submit(state, calls[0]))
    check_batch(state, calls)
    send, recv = trio.open_memory_channel[Any](math.inf)
    parts: list[RequestHandle] = []
    # a tenant's batches are admitted one at a time: two batches interleaving under
    # `max_concurrent` would each take a slot, each be refused its next, and both fail,
    # again on every retry; in turn, the first is admitted whole and the other refused
    tenant_id = calls[0].tenant.tenant_id
    lock = state.batch_locks.setdefault(tenant_id, trio.Lock())
    try:
        async with lock, send:  # the stream ends when every call's clone is closed
            for call in calls:
                reply = await state.runtime.submit(call, sink=send)
                if isinstance(reply, Rejected):
                    raise rejected_error(reply)
                note_accepted(reply)
                parts.append(RequestHandle(reply))
    except BaseException:
        for h in parts:
            h.abort(refund=True)  # the client gets the refusal, none of these answers
        recv.close()
        with trio.move_on_after(SETTLE_WAIT_S) as scope:  # the refusal goes out with their slots free
            scope.shield = True
            for h in parts:
                await h.wait_settled()
        raise
    finally:
        if not lock.locked() and not lock.statistics().tasks_waiting:
            state.batch_locks.pop(tenant_id, None)
    return BatchHandle(request_id, parts, recv, n)


def check_batch(state: GatewayState, calls: list[GenerateCall]) -> None:
    """A batch that could never be admitted whole is a 400 now, not a 429/503 on every retry:
    more prompts than the queue holds (`--max-waiting`), than the key may run at once
    (`max_concurrent`) or send in a minute (`requests_per_minute`), or more tokens than its
    `tokens_per_minute` or `daily_token_budget` hold."""
    k = len(calls)
    limits = [(state.config.max_waiting, "this server queues at most {} requests")]
    quota = calls[0].tenant.quota
    if quota is not None:
        limits += [(quota.max_concurrent, "this key runs at most {} requests at once"),
                   (quota.requests_per_minute, "this key may send at most {} requests a minute")]
    for limit, what in limits:
        if limit is not None and k > limit:
            raise ApiError(400, f"a batch of {k} prompts is {k} requests, and {what.format(limit)}: "
                           f"send at most {limit} prompts per request", code="invalid_value", param="prompt")
    # each prompt reserves its tokens plus max_tokens per sequence: a batch whose least
    # reservation (a token per prompt it has not tokenized yet) passes a token limit never fits
    tokens = [(quota.tokens_per_minute, "a minute"), (quota.daily_token_budget, "a day")] if quota is not None else []
    if any(limit is not None for limit, _ in tokens) and all(c.params.max_tokens is not None for c in calls):
        need = {"a minute": 0, "a day": 0}
        for c in calls:
            out = c.params.max_tokens or 0
            if c.max_tokens_default and quota is not None and quota.max_tokens_cap is not None:
                out = min(out, quota.max_tokens_cap)  # admission lowers the endpoint's default to the cap
            prompt = len(c.prompt_token_ids) if c.prompt_token_ids is not None else 1
            seqs = max(c.params.n, c.params.beam_width)
            need["a minute"] += prompt + out * seqs
            # (and the daily budget lowers a default to what is left of the day: a token)
            least = min(out, max(1, c.params.min_tokens)) if c.max_tokens_default and not c.cache_only else out
            need["a day"] += prompt + least * seqs
        for limit, per in tokens:
            if limit is not None and need[per] > limit:
                raise ApiError(400, f"a batch of {k} prompts reserves at least {need[per]} tokens (its prompts and "
                               f"max_tokens for each), and this key may use {limit} tokens {per}: send fewer "
                               "prompts or a lower max_tokens", code="invalid_value", param="prompt")


async def events_of(handle: Handle, idle_after: float | None = None,
                    ) -> AsyncIterator[TokenDelta | PromptFinished | Finished | Failed | Idle]:
    """Iterate a request's events, up to and including its Finished/Failed; with
    `idle_after`, an `IDLE` after each `idle_after` seconds without one (`Pinging`).

    Leaving early (client gone, cancel scope, exception) aborts the request.
    Callers use `aclosing(...)` so the abort happens at once, not at garbage collection.
    """
    try:
        async for event in handle.events(idle_after):
            if isinstance(event, Finished | Failed):
                handle.ended = True
                if not (isinstance(event, Failed) and event.code == "shutting_down"):
                    # the last frame goes out with the slot free (not at a shutdown: the
                    # client's next request goes elsewhere, and the cut is near)
                    await handle.wait_settled()
            yield event
            if handle.ended:
                return
    finally:
        handle.abort()


def echo_logprobs_of(req: Any) -> int | None:
    """Alternatives per token of an echoed completions prompt (its `logprobs`), or None."""
    return req.logprobs if isinstance(req, CompletionRequest) and req.echo else None


async def collect(state: GatewayState, endpoint: Endpoint, req: Any, calls: list[GenerateCall], request_id: str,
                  echo: list[str] | None = None) -> dict[str, Any] | Response:
    """The non-streamed answer. One with logprobs for `ANSWER_OFF_LOOP_TOKENS` tokens or
    more is built and encoded as JSON in a worker thread, one at a time and the tenants in
    turn (`GatewayState.answer_threads`, `answer_turns`): 64 choices of 100 tokens with 20
    alternatives each are ~10 MB, and built on the event loop (then encoded by Quart's
    `json`), one such answer stopped every other stream for 0.5-2.7 s, a 257 MB one for
    15 s (an audit)."""
    handle = await submit_all(state, calls, request_id, req.n)
    collector = Collector(endpoint, request_id, req.model, req.n, token_bytes=token_bytes_of(state), echo=echo,
                          special_ids=special_ids_of(state, req),
                          tools=tools_of(req), echo_logprobs=echo_logprobs_of(req),
                          prompt_logprobs_k=req.prompt_logprobs)
    async with aclosing(events_of(handle)) as events:
        async for event in events:
            if isinstance(event, TokenDelta):
                collector.add(event)
            elif isinstance(event, PromptFinished):
                continue  # the response has every finish reason at the end
            elif isinstance(event, Failed):
                raise failed_error(event)
            else:
                if collector.weight < ANSWER_OFF_LOOP_TOKENS:
                    return collector.response(event)
                body = await state.answer_turns.run(calls[0].tenant.tenant_id,
                                                    functools.partial(encode_answer, collector, event),
                                                    state.answer_threads)
                return Response(body, content_type="application/json")
    raise unfinished_error()


# a non-streamed answer with logprobs for at least this many tokens (its prompts' included)
# is built in a worker thread (`collect`); at 20 alternatives each, ~2 MB of JSON
ANSWER_OFF_LOOP_TOKENS = 2048
ENCODE_SLICE = 1024  # list items JSON-encoded at once by `encode_answer`


def encode_answer(collector: Collector, end: Finished) -> bytes:
    """The non-streamed answer as JSON (run in a worker thread: `collect`), its long lists
    encoded a slice at a time: one `msgspec.json.encode` of a 56 MB answer held the
    interpreter lock, and with it the event loop, for 190-250 ms (a review)."""
    return msgspec.json.encode(_in_slices(collector.response(end)))


def _in_slices(value: Any, depth: int = 0) -> Any:
    """`value` with each list of more than `ENCODE_SLICE` items (in the dicts and lists
    within, 4 levels deep) replaced by its JSON, encoded `ENCODE_SLICE` items at a time."""
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {k: _in_slices(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) <= ENCODE_SLICE:
            return [_in_slices(v, depth + 1) for v in value]
        # (the answer's choices — up to 2,048 prompts × n — are sliced inside as well: encoded
        # 1,024 whole at a time, one encode held the lock 35 ms; a long list deeper down is
        # of small items: encoded as they are)
        items = [_in_slices(v, depth + 1) for v in value] if depth <= 1 else value
        parts = [msgspec.json.encode(items[i:i + ENCODE_SLICE])[1:-1] for i in range(0, len(items), ENCODE_SLICE)]
        return msgspec.Raw(b"[" + b",".join(parts) + b"]")
    return value


class SseBody:
    """The SSE byte stream of one request, as a Quart response body.

    A class rather than a bare async generator because the body may be closed
    before it is ever iterated (client gone before the first byte): `aclose()` on
    an unstarted generator skips its `finally`, which would leak the request.
    Here `aclose()` (called by Quart on disconnect) and, as a last resort, garbage
    collection of a body Quart never opened both abort the request.
    """

    def __init__(self, handle: Handle, renderer: ChunkRenderer, ping_seconds: float = 0.0) -> None:
        self.handle = handle
        self.renderer = renderer
        self.idle_after = ping_seconds or None  # `GatewayConfig.sse_ping_seconds`; 0: never
        self._chunks = self._generate()

    def __aiter__(self) -> SseBody:
        return self

    async def __anext__(self) -> bytes:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()
        finally:
            self.handle.abort()

    def abandon(self) -> None:
        """The answer is over, read or not (`gateway.app.HttpConnection`): abort the request
        unless it ended. Idempotent."""
        if not self.handle.ended and not self.handle.aborted:
            self.handle.abort()

    def __del__(self) -> None:
        self.abandon()

    async def _generate(self) -> AsyncIterator[bytes]:
        ended = False  # a Finished or a failure came
        async with aclosing(events_of(self.handle, self.idle_after)) as events:
            async for event in events:
                if event is IDLE:
                    yield sse.PING
                    continue
                if isinstance(event, TokenDelta | Finished) and (opening := self.renderer.opening()) is not None:
                    yield sse.event(opening)
                if isinstance(event, TokenDelta):
                    chunk = self.renderer.delta(event)
                    for c in (([chunk] if chunk is not None else []) + self.renderer.call_chunks(event.index)
                              + self.renderer.choice_end(event)):
                        yield sse.event(c)
                elif isinstance(event, PromptFinished):
                    for chunk in self.renderer.prompt_finished(event):
                        yield sse.event(chunk)
                elif isinstance(event, Finished):
                    for chunk in self.renderer.finished(event):
                        yield sse.event(chunk)
                    ended = True
                else:
                    yield sse.event(failed_error(event).event_body())
                    ended = True
        if not ended:  # (as `collect`: `[DONE]` alone would pass a cut answer for a whole one)
            yield sse.event(unfinished_error().event_body())
        yield sse.DONE


def stream_body(body: SseBody) -> SseBody:
    """`body`, registered with the current request: `gateway.app.HttpConnection` calls its
    `abandon()` when the exchange ends, whether Quart ever read it or not."""
    current = request._get_current_object()  # type: ignore[attr-defined]
    bodies = getattr(current, "lmgate_bodies", None)
    if bodies is None:
        bodies = current.lmgate_bodies = []
    bodies.append(body)
    return body


# ---------------------------------------------------------------- routes


def openai_blueprint(state: GatewayState) -> Blueprint:
    bp = Blueprint("openai", __name__)

    async def handle(endpoint: Endpoint) -> Response | dict[str, Any]:
        tenant = await state.authenticate(request.headers.get("Authorization"))
        raw = await request.get_data(cache=False)
        req = decode_request(endpoint, raw)
        state.check_generation_model(req.model, tenant)
        request_id = new_request_id(endpoint)
        cache = CacheDirectives.of(request.headers)
        calls = to_generate_calls(req, tenant, request_id, app_tag=request.headers.get("X-Lmgate-App"), cache=cache)
        echo = echo_texts(state, req, calls)
        if not req.stream:
            return await collect(state, endpoint, req, calls, request_id, echo)
        handle = await submit_all(state, calls, request_id, req.n)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        renderer = ChunkRenderer(endpoint, request_id, req.model, include_usage, token_bytes=token_bytes_of(state),
                                 special_ids=special_ids_of(state, req),
                                 echo=echo, echo_logprobs=echo_logprobs_of(req), n=req.n, tools=tools_of(req),
                                 stream_calls=streams_calls(req))
        response = Response(stream_body(SseBody(handle, renderer, state.config.sse_ping_seconds)),
                            content_type="text/event-stream",
                            headers=sse.SSE_HEADERS)
        response.timeout = None  # Quart's RESPONSE_TIMEOUT would cut long streams
        return response

    @bp.post("/v1/completions")
    async def completions() -> Any:
        return await handle("completions")

    @bp.post("/v1/chat/completions")
    async def chat_completions() -> Any:
        return await handle("chat.completions")

    def model_card(name: str) -> dict[str, Any]:
        base = state.runtime.model_name
        if name == getattr(state.runtime, "embedding_model_name", None):  # /v1/embeddings' model
            return {"id": name, "object": "model", "created": state.started, "owned_by": "lmgate",
                    "max_model_len": state.runtime.embedding_max_tokens}
        return {
            "id": name,
            "object": "model",
            "created": state.started,
            "owned_by": "lmgate",
            "max_model_len": state.runtime.max_model_len,
            **({"parent": base} if name != base else {}),  # a LoRA adapter of the base model
        }

    @bp.get("/v1/models")
    async def models() -> Any:
        tenant = await state.authenticate(request.headers.get("Authorization"))
        return {"object": "list", "data": [model_card(name) for name in state.models_for(tenant)]}

    @bp.get("/v1/models/<path:model>")
    async def model(model: str) -> Any:
        """One served model (OpenAI's retrieve; the SDK's `models.retrieve`), or a 404."""
        tenant = await state.authenticate(request.headers.get("Authorization"))
        state.check_model(model, tenant)  # a 404 unless served (maybe under another name: the --model it started with)
        if model in state.runtime.served_models():
            return model_card(model)
        if model in getattr(state.runtime, "embedding_aliases", ()):
            return {**model_card(state.runtime.embedding_model_name), "id": model}
        return {**model_card(state.runtime.model_name), "id": model}

    return bp


__all__ = [
    "CacheDirectives",
    "ChatRequest",
    "ChunkRenderer",
    "Collector",
    "CompletionRequest",
    "decode_request",
    "BatchHandle",
    "RequestHandle",
    "SseBody",
    "completion_prompts",
    "submit_all",
    "to_generate_calls",
    "events_of",
    "openai_blueprint",
    "sampling_params",
]
