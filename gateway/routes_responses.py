"""OpenAI's Responses API: POST /v1/responses, and GET/DELETE of stored responses.

The Responses API is the chat API with another wire format: `input` items instead of
`messages`, output items (messages and function calls) instead of choices, typed stream
events instead of chunks, and responses stored server-side so that the next request
continues one by its id (`previous_response_id`) instead of sending the conversation
again. A request is mapped onto a chat request (`chat_request`) and runs the chat
path's parts: tool calling, output constraints, sampling checks, admission, quotas and
the response cache are the same. The chat stream chunks of `routes_openai.ChunkRenderer`
(which holds back tool-call text) are turned into Responses events (`ResponseRenderer`),
so a JSON response and a stream are built the same way.

Background mode (`background: true`): the response runs on after its request has been
answered, is read back with GET (or a stream resumed after an event), and can be
cancelled; see `gateway.responses_live`.

Not supported (400): conversations, prompt templates, reasoning effort (this model does not reason), hosted tools (web search, file
search, ...), and non-text input (images, files, audio): this model reads text only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import msgspec
import trio
from quart import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import MethodNotAllowed

from actors.messages import Failed, Finished, TenantContext, TokenDelta
from cache.response_store import ResponseStore, StoredResponse, owner_of
from cache.store import CacheUnavailable
from gateway import sse
from gateway.errors import ApiError, code_of, decode_json, invalid_request, param_of
from gateway.responses_live import (
    EVENTS_KEEP_S,
    FINAL_WRITE_S,
    ORPHAN_AFTER_S,
    TERMINAL_EVENTS,
    LiveResponse,
    keep_foreground_when_answered,
    run_background,
)
from gateway.routes_openai import (
    CacheDirectives,
    ChatRequest,
    ChunkRenderer,
    Handle,
    PromptFinished,
    SseBody,
    check_metadata,
    events_of,
    failed_error,
    special_ids_of,
    stream_body,
    streams_calls,
    submit_all,
    to_generate_calls,
    token_bytes_of,
    tools_of,
    unfinished_error,
)
from gateway.routes_tokenizer import TokenizeRequest, tokenize
from gateway.sse import IDLE, Idle

if TYPE_CHECKING:
    from gateway.app import GatewayState

log = logging.getLogger("lmgate.gateway")

CANCEL_WAIT_S = 5.0  # a cancel of a response another server runs waits this long for its end
FOLLOW_POLL_S = 0.5  # a stream of a response another server runs reads its shared events this often
FINAL_EVENTS_WAIT_S = 2.0  # and waits this long, once it has ended, for its last events
FOLLOW_OUTAGE_S = 30.0  # and through a Redis outage this long (pinging), before its `error` event
FOLLOW_RECOVERY_S = 5.0  # after which a response not written meanwhile is not taken as orphaned so soon

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# `include` values a request may send: logprobs, and what only applies to items this
# server never produces (reasoning), so they ask for nothing here
_INCLUDES = (LOGPROBS_INCLUDE, "reasoning.encrypted_content")
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
_ROLES = ("user", "system", "developer", "assistant")


class ResponsesRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Body of POST /v1/responses (OpenAI's names, then the chat extensions it takes)."""

    model: str | None = None  # required but by input_tokens (OpenAI's count takes none: the served model); see `prepare`
    input: str | list[Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    store: bool | None = True  # null: the default, stored
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    top_logprobs: int | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None  # OpenAI's successor of `user`
    truncation: Literal["disabled", "auto"] | None = None
    reasoning: dict[str, Any] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    # accepted and without effect here: routing and caching hints for OpenAI's own service
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    stream_options: dict[str, Any] | None = None
    # extensions (the chat endpoint's, vLLM names)
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    priority: int | None = None

    @property
    def stored(self) -> bool:
        return self.store is not False


def decode_request(raw: bytes) -> ResponsesRequest:
    """A body → `ResponsesRequest`, or a 400 naming the field."""
    return decode_json(raw, ResponsesRequest)


def _unsupported(req: ResponsesRequest) -> None:
    """400 for what this server cannot honour, naming the field."""
    refused = [
        ("background", bool(req.background) and not req.stored, "background mode needs store: true (a background "
                                                                "response is read back from the store)"),
        ("conversation", req.conversation is not None, "conversations are not supported; continue a stored "
                                                       "response with previous_response_id"),
        ("prompt", req.prompt is not None, "prompt templates are not supported; send instructions and input"),
    ]
    for name, bad, message in refused:
        if bad:
            raise ApiError(400, message, code="unsupported_value", param=name)
    effort = (req.reasoning or {}).get("effort")
    if effort not in (None, "none"):
        raise ApiError(400, "reasoning is not supported: this model does not reason", code="unsupported_value",
                       param="reasoning")
    for value in req.include or []:
        if value not in _INCLUDES:
            raise ApiError(400, f"include {value[:100]!r} is not supported; this server can include "
                           f"{LOGPROBS_INCLUDE!r}", code="unsupported_value", param="include")
    check_metadata(req.metadata)
    if req.max_tool_calls is not None and req.max_tool_calls != 1:
        raise ApiError(400, "max_tool_calls may only be 1 (one call, as parallel_tool_calls false) here",
                       code="unsupported_value", param="max_tool_calls")


# ---------------------------------------------------------------- input items


def _text_of(content: Any, where: str) -> tuple[str, list[dict[str, Any]]]:
    """A message's content (a string, or a list of text parts) → its text and its parts."""
    if isinstance(content, str):
        return content, [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of content parts", code="invalid_value",
                       param="input")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            if isinstance(kind, str) and kind.startswith("input_"):
                raise ApiError(400, f"content parts of type {kind[:50]!r} are not supported (this model reads text "
                               "only)", code="unsupported_value", param="input")
            raise ApiError(400, f"{where}: a content part needs a \"type\" (input_text, output_text)",
                           code="invalid_value", param="input")
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise ApiError(400, f"{where}: a {kind} part needs its text", code="invalid_value", param="input")
        parts.append({"type": "output_text" if kind in ("output_text", "refusal") else "input_text", "text": text})
    return "\n".join(p["text"] for p in parts), parts  # as chat joins them (vLLM)


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or (name == "call_id" and not value):
        raise ApiError(400, f"{where} needs \"{name}\" (a{' non-empty' if name == 'call_id' else ''} string)",
                       code="invalid_value", param="input")
    return value


def check_calls(items: list[dict[str, Any]]) -> None:
    """A conversation's function calls as OpenAI takes them: each `call_id` made once, and
    answered once (a `function_call_output` after it) — a call left unanswered is a 400, as
    the model would read a call that never returned; so is an output of no call before it."""
    made: set[str] = set()
    answered: set[str] = set()
    for item in items:
        if item["type"] == "function_call":
            if item["call_id"] in made:
                raise ApiError(400, f"function call {item['call_id'][:100]!r} is made twice in the input",
                               code="invalid_value", param="input")
            made.add(item["call_id"])
        elif item["type"] == "function_call_output":
            if item["call_id"] not in made or item["call_id"] in answered:
                raise ApiError(400, f"No tool call found for function call output with call_id "
                               f"{item['call_id'][:100]}" + (" (answered already)." if item["call_id"] in answered
                                                              else "."), code="invalid_value", param="input")
            answered.add(item["call_id"])
    missing = next((c for c in made if c not in answered), None)
    if missing is not None:
        raise ApiError(400, f"No tool output found for function call {missing[:100]}.", code="invalid_value",
                       param="input")


def check_unique_ids(context: list[dict[str, Any]], items: list[dict[str, Any]]) -> None:
    """400 for an input item whose id another item of the request, or of the conversation
    it continues, already has (as OpenAI answers): a client that replays the previous
    response's output beside `previous_response_id` would have the model read it twice, and
    `input_items` pages (`after`) would loop on the repeated id."""
    seen = {item.get("id") for item in context}
    for item in items:
        if item["id"] in seen:
            raise ApiError(400, f"Duplicate item found with id {item['id'][:100]}.", code="invalid_value",
                           param="input")
        seen.add(item["id"])


def cut_calls_dropped(context: list[dict[str, Any]], items: list[dict[str, Any]]
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The conversation without the function calls that `max_output_tokens` cut off
    (status `incomplete`: their arguments end mid-way, so no client can run them) and that
    no output answers: the model does not read a call it never finished, and the next
    request is not refused for leaving it unanswered. A cut call that the client did answer
    stays (pure)."""
    answered = {i["call_id"] for i in [*context, *items] if i.get("type") == "function_call_output"}

    def kept(part: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [i for i in part if not (i.get("type") == "function_call" and i.get("status") == "incomplete"
                                         and i.get("call_id") not in answered)]

    return kept(context), kept(items)


def input_items(value: str | list[Any] | None) -> list[dict[str, Any]]:
    """A request's `input` as the items it is stored as: messages (text parts only),
    function calls and their outputs, each with an id. Reasoning items are dropped (this
    model writes none and reads none); other kinds are a 400."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    items = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object", code="invalid_value", param="input")
        kind = item.get("type", "message")
        given_id = item.get("id") if isinstance(item.get("id"), str) else None
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise ApiError(400, f"{where}.role must be one of {', '.join(_ROLES)}", code="invalid_value",
                               param="input")
            _, parts = _text_of(item.get("content"), where)
            if role == "assistant":
                parts = [{**p, "type": "output_text", "annotations": []} for p in parts]
            items.append({"id": given_id or _new_id("msg"), "type": "message", "role": role, "content": parts})
        elif kind == "function_call":
            items.append({"id": given_id or _new_id("fc"), "type": "function_call",
                          "call_id": _string(item, "call_id", where), "name": _string(item, "name", where),
                          "arguments": _string(item, "arguments", where),
                          # a call `max_output_tokens` cut, sent back as it came: dropped, as when continued
                          # by `previous_response_id` (`cut_calls_dropped`)
                          "status": "incomplete" if item.get("status") == "incomplete" else "completed"})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str | list):
                raise ApiError(400, f"{where}.output must be a string or a list of content parts",
                               code="invalid_value", param="input")
            text = output if isinstance(output, str) else _text_of(output, where)[0]
            items.append({"id": given_id or _new_id("fco"), "type": "function_call_output",
                          "call_id": _string(item, "call_id", where), "output": text})
        elif kind == "reasoning":
            continue
        else:
            raise ApiError(400, f"{where}: input items of type {str(kind)[:50]!r} are not supported (messages, "
                           "function_call and function_call_output are)", code="unsupported_value", param="input")
    return items


def chat_messages_of(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Items → chat messages: the instructions first as a system message, a function call
    joins the assistant turn before it (its text and calls are one turn), a call's output
    is a tool message, right after the turn that made the call (the chat path's order,
    `check_tool_turns`: an output the input gives later, after a user message, is read
    there; `check_calls` has made sure each call has one)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        if item["type"] == "message":
            messages.append({"role": item["role"], "content": "\n".join(p["text"] for p in item["content"])})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    tools = [m for m in messages if m["role"] == "tool"]
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] != "tool":
            ids = {c["id"] for c in message.get("tool_calls", [])}
            out += [message, *(t for t in tools if t["tool_call_id"] in ids)]
    return out


# ---------------------------------------------------------------- mapping to chat


def chat_tools(tools: list[Any] | None) -> list[Any] | None:
    """Responses function tools (`{"type": "function", "name", "parameters", ...}`) → chat's."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise ApiError(400, f"tools[{i}]: tools of type {str(kind)[:50]!r} are not supported (function tools "
                           "are)", code="unsupported_value", param="tools")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                     if tool.get(k) is not None}})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ApiError(400, "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                   "\"name\": ...}", code="invalid_value", param="tool_choice")


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` → chat's `response_format`."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "text.format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                       "{\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}}", code="invalid_value",
                       param="text")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    name, schema = fmt.get("name"), fmt.get("schema")
    if not isinstance(name, str) or not _FORMAT_NAME.fullmatch(name):
        raise ApiError(400, "text.format.name must be 1 to 64 letters, digits, '_' or '-'", code="invalid_value",
                       param="text")
    if not isinstance(schema, dict):
        raise ApiError(400, "text.format json_schema needs its \"schema\" (a JSON schema object)",
                       code="invalid_value", param="text")
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


_FORMAT_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


# chat names in errors → the Responses request's own
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format": "text", "logprobs": "top_logprobs"}


@contextmanager
def own_params() -> Iterator[None]:
    """A 400 of the chat path names the Responses request's field (`_PARAMS`), and its
    message speaks of the Responses shapes: a function tool's fields are the tool's own
    (`tools[0].name`, `{"type": "function", "name": ...}`), not under `function`."""
    try:
        yield
    except ApiError as exc:
        chat_field = exc.param or ""
        exc.param = _PARAMS.get(chat_field, exc.param)
        if chat_field in _PARAMS and exc.message.startswith((chat_field + ":", chat_field + " ")):  # "response_format: ..."
            own = "text.format" if chat_field == "response_format" else exc.param
            exc.message = f"{own}{exc.message[len(chat_field):]}"
        elif chat_field in _PARAMS:  # "invalid sampling parameter 'max_tokens'" (of max_completion_tokens)
            for chat_name in (k for k, v in _PARAMS.items() if v == exc.param):
                exc.message = exc.message.replace(f"'{chat_name}'", f"'{exc.param}'")
        if exc.param == "input" or exc.code == "context_length_exceeded":  # the chat's words for the input
            exc.message = exc.message.replace("the messages", "the input").replace("your messages", "your input")
        if exc.param in ("tools", "tool_choice"):
            exc.message = re.sub(r"(tools\[\d+\])\.function\.", r"\1.", exc.message)
            exc.message = re.sub(r'"function": \{"name": ("(?:[^"\\]|\\.)*")\}', r'"name": \1', exc.message)
        raise


def chat_request(req: ResponsesRequest, items: list[dict[str, Any]]) -> ChatRequest:
    """The chat request that runs `req` on the conversation `items`."""
    logprobs = LOGPROBS_INCLUDE in (req.include or []) or req.top_logprobs is not None
    body = {
        "model": req.model,
        "messages": chat_messages_of(items, req.instructions),
        "max_completion_tokens": req.max_output_tokens,
        "stream": req.stream,
        "tools": chat_tools(req.tools),
        "tool_choice": chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": False if req.max_tool_calls == 1 else req.parallel_tool_calls,
        "response_format": response_format(req.text),
        "user": req.safety_identifier or req.user,
        "metadata": req.metadata,
        "logprobs": logprobs,
        "top_logprobs": req.top_logprobs if logprobs else None,
        **{k: getattr(req, k) for k in ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty",
                                        "logit_bias", "priority")},
    }
    try:
        return msgspec.convert({k: v for k, v in body.items() if v is not None}, type=ChatRequest)
    except msgspec.ValidationError as exc:
        with own_params():
            raise ApiError(400, invalid_request(exc), code=code_of(exc), param=param_of(exc)) from exc


def count_request(req: ResponsesRequest, items: list[dict[str, Any]]) -> TokenizeRequest:
    """The /tokenize request of the prompt `req` reads on `items` (the tools it lists included)."""
    chat = chat_request(req, items)
    return TokenizeRequest(model=chat.model, messages=chat.messages, tools=chat.tools, tool_choice=chat.tool_choice,
                           parallel_tool_calls=chat.parallel_tool_calls)


def _new_id(kind: str) -> str:
    """A new item's or response's id: 128 random bits, as a uuid4's hex but a quarter of
    its cost (1.3 µs: an input of 14,000 items took 70 ms of the event loop to name)."""
    return f"{kind}_{os.urandom(16).hex()}"


TRUNCATION_OUTPUT_SHARE = 4  # without max_output_tokens, truncation leaves a quarter of the window to the answer


def output_room(req: ResponsesRequest, tenant: TenantContext, window: int) -> int:
    """The tokens truncation "auto" leaves for the answer: `max_output_tokens` when given,
    else a quarter of the window (at most the tenant's `max_tokens_cap`). Cutting only to
    fit the prompt would leave the answer the few tokens the last dropped item freed, and
    every turn of a long chain would end `incomplete` after a word or two."""
    if req.max_output_tokens is not None:
        return req.max_output_tokens
    room = max(1, window // TRUNCATION_OUTPUT_SHARE)
    return max(1, min(room, tenant.max_tokens_cap)) if tenant.max_tokens_cap is not None else room


def clean_cuts(items: list[dict[str, Any]]) -> list[int]:
    """Where a truncated conversation may start, in order: each index i >= 1 from which no
    item answers a call made before i (a call and its output stay together: the output
    without its call would be dropped, and the last item, a tool's output, with it)."""
    call_at: dict[str, int] = {}
    for k, item in enumerate(items):
        if item["type"] == "function_call":
            call_at.setdefault(item["call_id"], k)
    cuts = []
    earliest = len(items)  # the earliest call answered from i on
    for i in range(len(items) - 1, 0, -1):
        item = items[i]
        if item["type"] == "function_call_output" and item["call_id"] in call_at:
            earliest = min(earliest, call_at[item["call_id"]])
        if earliest >= i:
            cuts.append(i)
    return cuts[::-1]


def truncated(items: list[dict[str, Any]], tokens: Callable[[list[dict[str, Any]]], int], limit: int,
              window_limit: int | None = None) -> int:
    """Truncation "auto": how many items to drop from the start of the conversation so
    that what is left reads at most `limit` tokens — the fewest that do, at a clean cut
    (`clean_cuts`), found by bisection (`tokens` renders the whole prompt: the instructions
    and tools stay, only items go). 0 when it fits. When even the last call and its output
    (or the last item) alone do not fit `limit`: with `window_limit` (the most a prompt may
    read: the answer's room was a default, not asked for), a conversation over it is cut
    there, at the last clean cut, which leaves the answer less room (a long history made
    a request that runs alone a 400, before); else none are dropped: the request is then
    refused as too long, as without truncation, never run on an empty conversation."""
    whole = tokens(items)
    if whole <= limit:
        return 0
    cuts = clean_cuts(items)
    if not cuts:
        return 0
    last = tokens(items[cuts[-1]:])
    if last > limit:
        fits_only_cut = window_limit is not None and whole > window_limit and last <= window_limit
        return cuts[-1] if fits_only_cut else 0
    lo, hi = 0, len(cuts) - 1  # cuts[hi] fits, cuts[lo - 1] does not
    while lo < hi:
        mid = (lo + hi) // 2
        if tokens(items[cuts[mid]:]) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return cuts[lo]


# ---------------------------------------------------------------- rendering


@dataclass
class ResponseRenderer:
    """Turns a request's events into the Response object and its stream events.

    Output items come from the chat chunks of a `ChunkRenderer` (which tells a call's text
    from content): content opens a message item and streams into its one output_text part;
    a tool call's first piece closes the message and adds a function_call item, its
    later pieces are `function_call_arguments.delta` events, and the next call or the
    choice's end closes it. The finish reason "length" leaves the response `incomplete`
    (`max_output_tokens`), and a call it cut short `incomplete` too. Every event carries
    the next `sequence_number`."""

    response_id: str
    req: ResponsesRequest
    chunks: ChunkRenderer  # holds the tool calling: it decides what text is a call
    logprobs: bool = False
    created_at: int = field(default_factory=lambda: int(time.time()))
    output: list[dict[str, Any]] = field(default_factory=list)
    status: str = "in_progress"  # "queued" for a background response until the engine starts it
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    failure: Failed | None = None  # what ended a failed run
    _seq: int = 0
    _message: dict[str, Any] | None = None  # the open message item
    _text: list[str] = field(default_factory=list)
    _text_lp: list[dict[str, Any]] = field(default_factory=list)
    _call: dict[str, Any] | None = None  # the open function_call item
    _call_args: list[str] = field(default_factory=list)
    # the engine stopped it at max_output_tokens (a delta's finish_reason): `incomplete` once
    # it has finished, with its usage; until then it is still running (a GET in the gap read
    # it ended without usage, and a cancel in the gap stored it so for good)
    _cut: bool = False

    def __post_init__(self) -> None:
        if self.req.background:
            self.status = "queued"

    def _event(self, kind: str, **body: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **body}
        self._seq += 1
        return event

    @property
    def last_sequence(self) -> int:
        """The sequence_number of the last event made (-1 before any)."""
        return self._seq - 1

    @property
    def running(self) -> bool:
        return self.status in ("queued", "in_progress")

    def current(self) -> dict[str, Any]:
        """The Response object as it stands, with the text and arguments of the items still
        open (`response()` has an open item's as its `done` event will give them)."""
        response = self.response()
        for item in response["output"]:
            if self._message is not None and item["id"] == self._message["id"]:
                item["content"] = [{"type": "output_text", "text": "".join(self._text), "annotations": [],
                                    "logprobs": list(self._text_lp)}]
            elif self._call is not None and item["id"] == self._call["id"]:
                item["arguments"] = "".join(self._call_args)
        return response

    def response(self) -> dict[str, Any]:
        """The Response object as it stands."""
        req = self.req
        fmt = (req.text or {}).get("format") or {"type": "text"}
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": bool(req.background),
            "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": req.model,
            "output": [dict(item) for item in self.output],
            "parallel_tool_calls": req.parallel_tool_calls is not False and req.max_tool_calls != 1,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.stored,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt, **({"verbosity": req.text["verbosity"]} if "verbosity" in (req.text or {}) else {})},
            "tool_choice": req.tool_choice or "auto",
            "max_tool_calls": req.max_tool_calls,
            "safety_identifier": req.safety_identifier,
            "tools": list(req.tools or []),
            "top_logprobs": req.top_logprobs or 0,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": req.truncation or "disabled",
            "usage": self.usage,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def start(self) -> list[dict[str, Any]]:
        """The first events: created, then in_progress (queued for a background response,
        whose in_progress comes when the engine starts it: `begin`)."""
        return [self._event("response.created", response=self.response()),
                self._event(f"response.{self.status}", response=self.response())]

    def begin(self) -> list[dict[str, Any]]:
        """The engine has started a queued response: its `response.in_progress`."""
        if self.status != "queued":
            return []
        self.status = "in_progress"
        return [self._event("response.in_progress", response=self.response())]

    def cancelled(self) -> list[dict[str, Any]]:
        """A background response cancelled while it ran: the items it cut off are
        incomplete; usage is unknown here (the tokens generated are billed by accounting)."""
        self.status = "cancelled"
        events = self._close_call() + self._close_message()
        return [*events, self._event("response.cancelled", response=self.response())]

    def delta(self, d: TokenDelta) -> list[dict[str, Any]]:
        chunk = self.chunks.delta(d)
        return self._from_chunks(([chunk] if chunk is not None else []) + self.chunks.call_chunks(d.index)
                                 + self.chunks.choice_end(d))

    def finished(self, f: Finished) -> list[dict[str, Any]]:
        events = self._from_chunks(self.chunks.finished(f))
        if not self.output and self._message is None:  # nothing written: an empty message, as OpenAI's
            events += self._open_message()
        events += self._close_call() + self._close_message()
        u = f.usage
        self.usage = {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
                      "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": u.total_tokens}
        kind = "response.incomplete" if self._cut else "response.completed"
        self.status = "incomplete" if self._cut else "completed"
        return [*events, self._event(kind, response=self.response())]

    def failed(self, fail: Failed) -> list[dict[str, Any]]:
        self.status, self.failure = "failed", fail  # first: the items it closes were cut off (incomplete)
        events = self._close_call() + self._close_message()
        self.error = {"code": fail.code, "message": fail.message}
        return [*events, self._event("response.failed", response=self.response())]

    def _from_chunks(self, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for chunk in chunks:
            for choice in chunk["choices"]:
                delta = choice.get("delta") or {}
                lp = (choice.get("logprobs") or {}).get("content") or []
                calls = delta.get("tool_calls") or []
                # a token may add no text (part of a character): its logprob still goes out
                # (a call's own tokens have none to give: an item has no logprobs)
                if delta.get("content") or (lp and self.logprobs and not calls):
                    events += self._content(delta.get("content") or "", lp)
                for call in calls:
                    events += self._call_piece(call)
                if choice.get("finish_reason") == "length":
                    self._cut = True
                if choice.get("finish_reason") is not None:
                    events += self._close_call()
        return events

    def _open_message(self) -> list[dict[str, Any]]:
        self._message = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                         "content": []}
        self.output.append(self._message)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        index = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=index, item={**self._message, "content": []}),
                self._event("response.content_part.added", item_id=self._message["id"], output_index=index,
                            content_index=0, part=part)]

    def _content(self, text: str, logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events = self._open_message() if self._message is None else []
        self._text.append(text)
        lp = logprobs if self.logprobs else []
        self._text_lp += lp
        return [*events, self._event("response.output_text.delta", item_id=self._message["id"],  # type: ignore[index]
                                     output_index=len(self.output) - 1, content_index=0, delta=text, logprobs=lp)]

    def _close_message(self) -> list[dict[str, Any]]:
        if self._message is None:
            return []
        message, self._message = self._message, None
        text, lp = "".join(self._text), list(self._text_lp)
        self._text, self._text_lp = [], []
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": lp}
        message["content"] = [part]
        message["status"] = "incomplete" if self._cut or self.status in ("failed", "cancelled") else "completed"
        index = self.output.index(message)
        ids = {"item_id": message["id"], "output_index": index, "content_index": 0}
        return [self._event("response.output_text.done", **ids, text=text, logprobs=lp),
                self._event("response.content_part.done", **ids, part=part),
                self._event("response.output_item.done", output_index=index, item=dict(message))]

    def _call_piece(self, piece: dict[str, Any]) -> list[dict[str, Any]]:
        """A tool call's piece: a new call (it has an `id`) closes what is open and adds a
        function_call item; every piece's arguments are a delta of the open call's."""
        events: list[dict[str, Any]] = []
        fn = piece.get("function") or {}
        if "id" in piece:
            events += self._close_call() + self._close_message()
            self._call = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress",
                          "call_id": piece["id"], "name": fn["name"], "arguments": ""}
            self.output.append(self._call)
            events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                      item=dict(self._call)))
        if self._call is not None and fn.get("arguments"):
            self._call_args.append(fn["arguments"])
            events.append(self._event("response.function_call_arguments.delta", item_id=self._call["id"],
                                      output_index=self.output.index(self._call), delta=fn["arguments"]))
        return events

    def _close_call(self) -> list[dict[str, Any]]:
        if self._call is None:
            return []
        item, self._call = self._call, None
        arguments, self._call_args = "".join(self._call_args), []
        item.update(arguments=arguments,
                    status="incomplete" if self._cut or self.status in ("failed", "cancelled") else "completed")
        index = self.output.index(item)
        return [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=item["name"], arguments=arguments),
                self._event("response.output_item.done", output_index=index, item=dict(item))]


# ---------------------------------------------------------------- serving


@dataclass
class Turn:
    """One request's run: what it reads, how its output is rendered, where it is kept."""

    store: ResponseStore
    owner: str  # `cache.response_store.owner_of` the tenant
    req: ResponsesRequest
    context: list[dict[str, Any]]  # the earlier turns' items (`previous_response_id`)
    input: list[dict[str, Any]]
    renderer: ResponseRenderer
    done: bool = False  # its events are over (ended, or left early)
    kept: bool = False  # its end was written (or was not to be)
    unwritten: bool = False  # that write found Redis down: the stored copy is behind (`keep`)
    on_unwritten: Callable[[], None] | None = None  # called (once) when a foreground end is unwritten
    deleted: bool = False  # deleted while it ran (not in background): its end is not stored

    def stored(self, *, running_until: float | None = None) -> StoredResponse:
        """What the store keeps of it now."""
        return StoredResponse(response=self.renderer.current(), context=self.context, input=self.input,
                              running_until=running_until, last_sequence=self.renderer.last_sequence)

    async def events(self, handle: Handle, idle_after: float | None = None) -> AsyncIterator[dict[str, Any] | Idle]:
        """Every stream event of the run, from `response.created` to its last; the response
        is stored (when asked) before the last event goes out, so a client may continue it
        as soon as it has read it. A background response is stored failed too, and its
        `response.in_progress` waits for the engine's first event. With `idle_after`, an
        `IDLE` after each `idle_after` seconds without an event (a stream's ping)."""
        try:
            for event in self.renderer.start():
                yield event
            async with aclosing(events_of(handle, idle_after)) as events:
                async for event in events:
                    if event is IDLE:
                        yield event
                        continue
                    for e in self.renderer.begin():
                        yield e
                    if isinstance(event, TokenDelta):
                        for e in self.renderer.delta(event):
                            yield e
                    elif isinstance(event, PromptFinished):
                        continue
                    elif isinstance(event, Failed):
                        out = self.renderer.failed(event)
                        if self.req.background:
                            await self.keep_end()
                        for e in out:
                            yield e
                        return
                    else:
                        out = self.renderer.finished(event)
                        await self.keep_end()
                        for e in out:
                            yield e
                        return
            raise unfinished_error()
        finally:
            self.done = True

    async def keep_end(self) -> None:
        """`keep` the end the renderer has just made, before its events go out. A background
        run's is shielded (for FINAL_WRITE_S): a cancel arriving during the write cut the
        events of its end out of the run's log, so streams following it got no last event
        (unwritten, or cut, its run writes it again)."""
        if not self.req.background:
            await self.keep()
            return
        with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_S):
            await self.keep()

    async def keep(self) -> None:
        """Store the response as it ended (`store`); a Redis that cannot be reached loses
        only this: the answer still goes out, and a later `previous_response_id` gets a 404
        (the store logs the outage once, not a line per response). That sets `unwritten`:
        a background run writes it again once Redis answers (`run_background`). A
        background response is only rewritten: one deleted meanwhile stays deleted.
        `kept` once the write is done (cancelled midway, the background run's shielded end
        writes it again)."""
        if not self.req.stored or self.deleted:
            self.kept = True
            return
        try:
            stored = self.stored()
            if not await self.store.put(self.owner, stored, existing=bool(self.req.background)):
                if self.req.background and self.store.fits(stored):  # (only rewritten: deleted meanwhile)
                    self.deleted = True
                else:
                    log.warning("response %s not stored: larger than %d bytes", self.renderer.response_id,
                                self.store.max_entry_bytes)
            self.unwritten = False
        except CacheUnavailable as exc:
            log.debug("response %s not stored: %s", self.renderer.response_id, exc)
            self.unwritten = True
            if self.on_unwritten is not None:  # (a background run writes it again itself)
                retry, self.on_unwritten = self.on_unwritten, None
                retry()
        self.kept = True


def error_event(exc: ApiError, sequence: int) -> bytes:
    """The `error` event that ends a stream an error cut after it started (OpenAI's
    `ResponseErrorEvent`), numbered `sequence`."""
    return sse.named_event("error", {"type": "error", "code": exc.code, "message": exc.message, "param": exc.param,
                                     "sequence_number": sequence})


class ResponsesSseBody(SseBody):
    """The stream of one Responses request: named SSE events (`event: <type>`), no
    `[DONE]`; aborts as `SseBody` does."""

    def __init__(self, handle: Handle, turn: Turn, ping_seconds: float = 0.0) -> None:
        self.turn = turn
        super().__init__(handle, turn.renderer.chunks, ping_seconds)

    async def _generate(self) -> AsyncIterator[bytes]:
        try:
            async with aclosing(self.turn.events(self.handle, self.idle_after)) as events:
                async for event in events:
                    if isinstance(event, Idle):
                        yield sse.PING
                        continue
                    yield sse.named_event(event["type"], event)
        except ApiError as exc:  # after the stream started: ends it with an `error` event, not a cut connection
            yield error_event(exc, self.turn.renderer.last_sequence + 1)


def ended_as(response: dict[str, Any], status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """`response` ended with `status` where it stood: the items it was still writing are
    incomplete, as a run that ends there leaves them."""
    output = [{**item, "status": "incomplete"} if item.get("status") == "in_progress" else item
              for item in response.get("output", [])]
    return {**response, "status": status, "error": error, "output": output}


def presented(found: StoredResponse, now: float) -> dict[str, Any]:
    """A stored response as GET returns it: one whose server stopped while it ran
    (`StoredResponse.orphaned`) is failed, not in progress for good."""
    if not found.orphaned(now):
        return found.response
    return ended_as(found.response, "failed", {"code": "server_error",
                                               "message": "the server running this response stopped before it ended"})


def terminal_sequence(found: StoredResponse, now: float) -> int:
    """The sequence_number of a stored response's last event: an orphan's failure is one
    more than its server wrote."""
    sequence = found.last_sequence if found.last_sequence is not None else 0
    return sequence + 1 if found.orphaned(now) else sequence


def nonnegative_int_arg(name: str) -> int | None:
    """A query argument that must be an integer >= 0, or None when absent; a 400 naming it."""
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ApiError(400, f"{name} must be an integer >= 0", code="invalid_value", param=name)
    return value


def bool_arg(name: str) -> bool:
    raw = request.args.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(400, f"{name} must be true or false", code="invalid_value", param=name)
    return raw in ("true", "1")


def event_stream(events: AsyncIterator[dict[str, Any] | Idle]) -> Response:
    """Named SSE events that follow a response (no request of their own to abort), and a
    `sse.PING` for each `IDLE` of `events`. An error after the stream started (the response
    deleted meanwhile, the store gone) ends it with an `error` event, as OpenAI's streams end."""
    async def body() -> AsyncIterator[bytes]:
        sequence = -1
        try:
            async with aclosing(events) as each:
                async for event in each:
                    if isinstance(event, Idle):
                        yield sse.PING
                        continue
                    sequence = event.get("sequence_number", sequence)
                    yield sse.named_event(event["type"], event)
        except ApiError as exc:
            yield error_event(exc, sequence + 1)

    response = Response(body(), content_type="text/event-stream", headers=sse.SSE_HEADERS)
    response.timeout = None
    return response


def responses_blueprint(state: GatewayState) -> Blueprint:
    bp = Blueprint("responses", __name__)
    metrics = getattr(state.runtime, "metrics", None)
    store = ResponseStore(state.stores.redis, ttl_s=state.config.response_store_ttl_seconds,
                          on_error=None if metrics is None else metrics.redis_errors.labels("response_store").inc)
    live_responses = state.live_responses
    truncation_limiter = trio.CapacityLimiter(1)

    def owner(tenant: TenantContext) -> str:
        return owner_of(tenant.tenant_id, tenant.created_at)

    async def still_here(tenant: TenantContext, live: LiveResponse | None) -> LiveResponse | None:
        """`live`, unless it is a background run that has ended, was stored, and is no longer
        in the store: deleted by another server after it ended (no flag reaches this one
        then), so not answered from memory either. Redis unreachable: `live`, as it stands."""
        if live is None or not live.background or not live.over or live.turn.unwritten:
            return live
        try:
            if await store.get(live.owner, live.response_id) is not None:
                return live
        except CacheUnavailable:
            return live
        live.deleted = True  # (`LiveResponses.get` drops it)
        found_gone(live.response_id)

    def found_gone(response_id: str) -> NoReturn:
        raise ApiError(404, f"Response with id {response_id[:100]!r} not found.", code="not_found")

    async def stored(tenant: TenantContext, response_id: str, param: str | None = None, *,
                     head: bool = False) -> Any:
        """The stored response (`head`: its `StoredHead`), or the 404 (503: Redis down)."""
        try:
            found = await (store.head if head else store.get)(owner(tenant), response_id)
        except CacheUnavailable as exc:
            raise ApiError(503, "the response store is unavailable", code="store_unavailable",
                           retry_after=1) from exc
        if found is None:
            raise ApiError(404, f"Response with id {response_id[:100]!r} not found.", code="not_found", param=param)
        return found

    async def prepare(tenant: TenantContext, *, default_model: str | None = None
                      ) -> tuple[ResponsesRequest, list[dict[str, Any]], list[dict[str, Any]], ChatRequest]:
        """The request, the earlier turns' items, its own input items, and the chat request
        that runs them; a 400 of the chat path names the Responses field (`own_params`).
        `default_model`: the model when the body names none (else that is a 400)."""
        with own_params():
            return await _prepare(tenant, default_model)

    async def _prepare(tenant: TenantContext, default_model: str | None
                       ) -> tuple[ResponsesRequest, list[dict[str, Any]], list[dict[str, Any]], ChatRequest]:
        req = decode_request(await request.get_data(cache=False))
        if not req.model:
            if default_model is None:
                raise ApiError(400, "model is required", code="missing_required_parameter", param="model")
            req = msgspec.structs.replace(req, model=default_model)
        state.check_generation_model(req.model, tenant)
        _unsupported(req)
        items = input_items(req.input)
        context = []
        if req.previous_response_id is not None:
            live = live_responses.get(owner(tenant), req.previous_response_id)
            if (live is not None and not live.background and not live.over
                    and live.turn.renderer.running):  # (stored once it ends: not found before)
                raise ApiError(400, f"previous response {req.previous_response_id[:100]!r} is still "
                               f"{live.turn.renderer.status}: continue it once it has ended", code="invalid_value",
                               param="previous_response_id")
            if live is not None and live.over and live.turn.unwritten:  # ended here, not yet taken by Redis
                previous = live.turn.stored()
            else:
                previous = await stored(tenant, req.previous_response_id, "previous_response_id")
            # running by what this server runs, or else by what the store holds (the stored
            # copy of a run here lags: it is rewritten each second, and last at its end)
            status = (live.turn.renderer.status if live is not None and not live.over
                      and live.turn.renderer.running else previous.status)
            if status in ("queued", "in_progress") and not previous.orphaned(time.time()):
                raise ApiError(400, f"previous response {req.previous_response_id[:100]!r} is still "
                               f"{status}: continue it once it has ended", code="invalid_value",
                               param="previous_response_id")
            context = previous.conversation()
        elif not items:
            raise ApiError(400, "input must not be empty", code="invalid_value", param="input")
        check_unique_ids(context, items)
        context, items = cut_calls_dropped(context, items)
        check_calls([*context, *items])
        tokenizer = getattr(state.runtime, "tokenizer", None)
        if req.truncation == "auto" and tokenizer is not None:
            conversation = [*context, *items]
            window = state.runtime.max_model_len
            limit = window - output_room(req, tenant, window)
            # (a default room for the answer gives way to the newest items: at least 1 token)
            window_limit = window - 1 if req.max_output_tokens is None else None
            # rendering and tokenizing the conversation a few times takes up to a second for a
            # long one: on a worker thread (one at a time), not on the event loop
            drop = await trio.to_thread.run_sync(
                truncated, conversation, lambda kept: len(tokenize(tokenizer, count_request(req, kept))), limit,
                window_limit, limiter=truncation_limiter)
            if drop:
                kept = conversation[drop:]
                # (DEBUG: a line per request that succeeds, as the per-request lines are)
                log.debug("request %s: truncation auto dropped the first %d of %d items", g.get("request_id", "-"),
                          len(conversation) - len(kept), len(conversation))
                earlier = {id(i) for i in context}
                context, items = [i for i in kept if id(i) in earlier], [i for i in kept if id(i) not in earlier]
        return req, context, items, chat_request(req, [*context, *items])

    async def store_queued(turn: Turn) -> None:
        """Store an accepted background response as queued, before it is submitted: a Redis
        that cannot take it is a 503 before anything runs or is charged (submitted first,
        the tokens generated while the write waited out a stalled Redis were billed for a
        refused request)."""
        try:
            fits = await store.put(turn.owner, turn.stored(running_until=time.time() + ORPHAN_AFTER_S))
        except CacheUnavailable as exc:
            raise ApiError(503, "the response store is unavailable: a background response could not be kept",
                           code="store_unavailable", retry_after=1) from exc
        if not fits:
            raise ApiError(400, f"this conversation is larger than the {store.max_entry_bytes} bytes a stored "
                           "response may take: run it without background", code="invalid_value", param="input")

    async def forget_queued(turn: Turn) -> None:
        """The queued background response was refused at admission: not stored after all
        (best effort; one left behind reads as failed once its `running_until` passes)."""
        with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_S):
            try:
                await store.delete(turn.owner, turn.renderer.response_id)
            except CacheUnavailable:
                pass

    def start_background(turn: Turn, handle: Handle) -> Any:
        """Run the stored (queued) response in the app's nursery, and answer: the queued
        response, or a stream of its events that does not end it when it drops."""
        live = LiveResponse(turn.owner, turn, handle, background=True)
        live_responses.add(live)
        current_app.add_background_task(run_background, live, store, draining=state.draining)
        if turn.req.stream:
            return event_stream(live.follow(-1, state.config.sse_ping_seconds or None))
        return turn.renderer.response()

    @bp.post("/v1/responses")
    async def create() -> Any:
        tenant = await state.authenticate(request.headers.get("Authorization"))
        req, context, items, chat = await prepare(tenant)
        response_id = g.answer_id = _new_id("resp")  # (named in the request's log line: `log_failure`)
        cache = CacheDirectives.of(request.headers)
        if req.store is False:  # "do not retain": nor the answer nor the conversation in the caches
            cache = dataclasses.replace(cache, store=False)
        with own_params():
            calls = to_generate_calls(chat, tenant, response_id, app_tag=request.headers.get("X-Lmgate-App"),
                                      cache=cache)
        tools = tools_of(chat)
        chunks = ChunkRenderer("chat.completions", response_id, req.model, False,
                               token_bytes=token_bytes_of(state), tools=tools, stream_calls=streams_calls(chat),
                               lp_leave_out=special_ids_of(state, chat))
        renderer = ResponseRenderer(response_id, req, chunks, logprobs=chat.logprobs)
        turn = Turn(store, owner(tenant), req, context, items, renderer)
        try:
            if req.background:
                await store_queued(turn)
            with own_params():
                handle = await submit_all(state, calls, response_id, 1)  # admission compiles a constraint: its 400
        except BaseException:
            if req.background:
                await forget_queued(turn)
            raise
        if req.background:
            return start_background(turn, handle)
        if req.stored:  # GET reads it here while it runs (and until it is stored)
            live = LiveResponse(turn.owner, turn, handle, background=False)
            live_responses.add(live)
            app = current_app._get_current_object()  # type: ignore[attr-defined]
            turn.on_unwritten = lambda: app.add_background_task(keep_foreground_when_answered, live, store,
                                                                draining=state.draining)
        if req.stream:
            response = Response(stream_body(ResponsesSseBody(handle, turn, state.config.sse_ping_seconds)),
                                content_type="text/event-stream",
                                headers=sse.SSE_HEADERS)
            response.timeout = None
            return response
        async with aclosing(turn.events(handle)) as events:
            async for _ in events:
                pass
        if renderer.failure is not None:
            with own_params():
                raise failed_error(renderer.failure)
        return renderer.response()

    @bp.route("/v1/responses/input_tokens", methods=["OPTIONS"])
    async def input_tokens_options() -> Any:
        """POST only: the automatic answer listed the methods of `/v1/responses/<id>` too,
        which this path answers with a 405 (`not_an_id`)."""
        return "", 200, {"Allow": "OPTIONS, POST"}

    @bp.post("/v1/responses/input_tokens")
    async def input_tokens() -> Any:
        """How many tokens the model would read for this request (OpenAI's
        `responses.input_tokens.count`): its conversation in the chat template, with the
        tools it lists; nothing runs and nothing is charged."""
        tenant = await state.authenticate(request.headers.get("Authorization"))
        tokenizer = getattr(state.runtime, "tokenizer", None)
        if tokenizer is None:
            raise ApiError(501, "this server has no tokenizer to count with", code="not_implemented")
        req, context, items, _ = await prepare(tenant, default_model=state.runtime.model_name)
        with own_params():
            return {"object": "response.input_tokens",
                    "input_tokens": len(tokenize(tokenizer, count_request(req, [*context, *items])))}

    def not_an_id(response_id: str) -> None:
        """`input_tokens` is a route of its own (POST), not a response id: a 405 for the
        other methods, as OpenAI answers, rather than a 404 for a response of that id."""
        if response_id == "input_tokens":
            raise MethodNotAllowed(valid_methods=["POST"], description="/v1/responses/input_tokens takes POST only")

    async def followed_elsewhere(tenant: TenantContext, found: StoredResponse, after: int | None,
                                 idle_after: float | None = None) -> AsyncIterator[dict[str, Any] | Idle]:
        """The stream of a background response this server does not run: its events as the
        running server shares them in Redis (`responses_live.share_events`, read every
        FOLLOW_POLL_S), from after `after`; once it has ended, the events shared last, or
        else (not shared: too large, expired, its server gone) its terminal event alone.
        With `idle_after`, an `IDLE` once `idle_after` seconds pass without an event. A Redis
        that cannot be read is polled on for `FOLLOW_OUTAGE_S` (a stall, a restart, a moment
        the store skips it after another call failed), then the stream ends with an error."""
        response_id, last = found.response["id"], -1 if after is None else after
        grace = FINAL_EVENTS_WAIT_S  # its end is stored just before its last events are shared
        sent_at = trio.current_time()
        outage_since: float | None = None
        trust_orphan_at = -math.inf  # (after an outage: not before its server could write again)
        first = True
        while True:
            try:
                if not first:
                    found = await store.get(owner(tenant), response_id) or found_gone(response_id)
                shared = await store.read_events(owner(tenant), response_id, last + 1)
            except CacheUnavailable as exc:
                outage_since = trio.current_time() if outage_since is None else outage_since
                if trio.current_time() - outage_since >= FOLLOW_OUTAGE_S:
                    raise ApiError(503, "the response store is unavailable", code="store_unavailable",
                                   retry_after=1) from exc
                shared = None
            first = False
            if shared is None:  # (no news: pings go on)
                if idle_after is not None and trio.current_time() - sent_at >= idle_after:
                    yield IDLE
                    sent_at = trio.current_time()
                await trio.sleep(FOLLOW_POLL_S)
                continue
            # Redis is back after an outage of a second or more: its server's next write may not
            # have come yet (a shorter one, a skip after another call failed, moves nothing: flaps
            # must not put off the end of a response whose server died for good)
            if outage_since is not None and trio.current_time() - outage_since >= 1.0:
                trust_orphan_at = trio.current_time() + FOLLOW_RECOVERY_S
            outage_since = None
            for event in shared:
                if event["sequence_number"] <= last:  # (an event shared twice: never sent twice)
                    continue
                yield event
                sent_at = trio.current_time()
                last = event["sequence_number"]
                if event["type"] in TERMINAL_EVENTS.values():
                    return
            now = time.time()
            orphaned = found.orphaned(now) and trio.current_time() >= trust_orphan_at
            if found.status not in ("queued", "in_progress") or orphaned:
                if grace <= 0 or orphaned:
                    response, sequence = presented(found, now), terminal_sequence(found, now)
                    if orphaned:
                        # its server died: its client may have read events it never wrote here
                        # (it resumes after those); it learns the end all the same, numbered on
                        sequence = max(sequence, last + 1)
                    if sequence > last:
                        yield {"type": TERMINAL_EVENTS[response["status"]], "sequence_number": sequence,
                               "response": response}
                    return
                grace -= FOLLOW_POLL_S
            if idle_after is not None and trio.current_time() - sent_at >= idle_after:
                yield IDLE
                sent_at = trio.current_time()
            await trio.sleep(FOLLOW_POLL_S)

    @bp.get("/v1/responses/<response_id>")
    async def retrieve(response_id: str) -> Any:
        """The response as it stands; with `stream=true` (a background response), its events
        after `starting_after` (all of them without), then each as it comes."""
        not_an_id(response_id)
        tenant = await state.authenticate(request.headers.get("Authorization"))
        stream, after = bool_arg("stream"), nonnegative_int_arg("starting_after")
        live = live_responses.get(owner(tenant), response_id)
        if not stream:
            # (an ended background run whose end Redis could not take yet: the run is the truth)
            if live is not None and (not live.over or live.turn.unwritten):
                return live.snapshot()
            found_head = await stored(tenant, response_id, head=True)
            if found_head.current(time.time()):  # (as stored: not decoded and encoded again)
                return Response(bytes(found_head.response), content_type="application/json")
            return presented(await stored(tenant, response_id), time.time())
        ping = state.config.sse_ping_seconds or None
        live = await still_here(tenant, live)
        if live is not None and live.background:
            return event_stream(live.follow(-1 if after is None else after, ping))
        found = await stored(tenant, response_id) if live is None or live.over else None
        if found is None or not found.response.get("background"):
            raise ApiError(400, "only a background response can be streamed again: GET it without stream",
                           code="invalid_value", param="stream")
        return event_stream(followed_elsewhere(tenant, found, after, ping))

    @bp.post("/v1/responses/<response_id>/cancel")
    async def cancel(response_id: str) -> Any:
        """Cancel a background response that is queued or in progress; one that has ended
        is returned as it is. Here it ends at once; run by another server, that server
        reads the request within a second, and the answer waits up to `CANCEL_WAIT_S`
        for it (then it is the response as it stands, still cancelling)."""
        tenant = await state.authenticate(request.headers.get("Authorization"))
        live = await still_here(tenant, live_responses.get(owner(tenant), response_id))
        if live is not None and live.background:
            live.cancel()
            with trio.move_on_after(CANCEL_WAIT_S):
                await live.ended.wait()
            return live.snapshot()
        found = await stored(tenant, response_id) if live is None else None
        if found is None or not found.response.get("background"):
            raise ApiError(400, "only a background response (background: true) can be cancelled",
                           code="invalid_value")
        now = time.time()
        if found.status not in ("queued", "in_progress"):
            return found.response
        try:
            if found.orphaned(now):  # it has ended, failed: kept so (a cancel does not undo an end)
                # its server may only have lost Redis for a while: if it still runs it, it stops
                await store.request_cancel(owner(tenant), response_id)
                response = presented(found, now)
                await store.put(owner(tenant), msgspec.structs.replace(
                    found, response=response, running_until=None, last_sequence=terminal_sequence(found, now)),
                    existing=True)
                return response
            await store.request_cancel(owner(tenant), response_id)
        except CacheUnavailable as exc:
            raise ApiError(503, "the response store is unavailable", code="store_unavailable",
                           retry_after=1) from exc
        with trio.move_on_after(CANCEL_WAIT_S):
            while found.status in ("queued", "in_progress") and not found.orphaned(time.time()):
                await trio.sleep(0.2)
                found = await stored(tenant, response_id)
        return presented(found, time.time())

    @bp.delete("/v1/responses/<response_id>")
    async def delete(response_id: str) -> Any:
        """Delete a stored response; a background one still running is cancelled first (on
        another server: by the flag it reads); one running here in the foreground is
        answered as deleted and not stored when it ends."""
        not_an_id(response_id)
        tenant = await state.authenticate(request.headers.get("Authorization"))
        live = live_responses.get(owner(tenant), response_id)
        if live is not None and live.background:
            live.deleted = True
            live.cancel()
        running_here = live is not None and not live.background and not live.over and not live.turn.deleted
        # (or answered while Redis could not take it: stored when Redis answers, unless deleted now)
        unwritten_here = live is not None and not live.background and live.over and live.turn.unwritten
        if running_here or unwritten_here:  # its client still reads it; its end is not stored, nor found meanwhile
            live.turn.deleted = True
            live_responses.pop(owner(tenant), response_id)
        try:
            if live is None:  # perhaps running on another server: it reads the request within a second
                # (kept as long as a server may still hold its end to write: `keep_when_answered`)
                await store.request_cancel(owner(tenant), response_id, EVENTS_KEEP_S, delete=True)
            found = await store.delete(owner(tenant), response_id)
        except CacheUnavailable as exc:  # (a Redis that stalled may still carry the delete out)
            raise ApiError(503, "the response store did not answer: the response may or may not be deleted; "
                           "retry", code="store_unavailable", retry_after=1) from exc
        if live is not None and live.background:
            live_responses.pop(owner(tenant), response_id)
            found = True
        found = found or running_here or unwritten_here
        if not found:
            raise ApiError(404, f"Response with id {response_id[:100]!r} not found.", code="not_found")
        return {"id": response_id, "object": "response", "deleted": True}

    @bp.get("/v1/responses/<response_id>/input_items")
    async def list_input_items(response_id: str) -> Any:
        """This response's input items (OpenAI's: newest first unless `order=asc`), `limit`
        (1-100, default 20) at a time after the item `after`, or the page before the item
        `before` (`include` is taken and changes nothing: the items are text)."""
        tenant = await state.authenticate(request.headers.get("Authorization"))
        live = live_responses.get(owner(tenant), response_id)
        # (as `retrieve`: a run not over, or over but not yet taken by Redis, is the truth)
        if live is not None and (not live.over or live.turn.unwritten):
            items = list(live.turn.input)
        else:
            items = list((await stored(tenant, response_id)).input)
        order = request.args.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be asc or desc", code="invalid_value", param="order")
        try:
            limit = int(request.args.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit must be an integer from 1 to 100", code="invalid_value", param="limit")
        if order == "desc":
            items.reverse()

        def position(param: str) -> int | None:
            cursor = request.args.get(param)
            if cursor is None:
                return None
            at = next((i for i, item in enumerate(items) if item.get("id") == cursor), None)
            if at is None:
                raise ApiError(400, f"{param}: no input item {cursor[:100]!r} in this response",
                               code="invalid_value", param=param)
            return at

        after, before = position("after"), position("before")
        items = items[:before] if before is not None else items
        items = items[after + 1:] if after is not None else items
        # before a cursor (and not after one): the page next to it, the way back
        page = items[-limit:] if before is not None and after is None else items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    return bp


__all__ = ["ResponseRenderer", "ResponsesRequest", "chat_request", "input_items", "responses_blueprint"]
