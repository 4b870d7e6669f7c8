"""Tool (function) calling on chat completions, built on structured outputs.

OpenAI's `tools` + `tool_choice` map onto a constraint (`gpu.structured`):

- `tool_choice: {"type": "function", "function": {"name": N}}` — the text is the arguments
  of N, JSON valid against its `parameters` schema; the answer is one tool call of N.
- `tool_choice: "required"` — the text is a JSON array of one or more calls
  `{"name": ..., "parameters": {...}}`, each naming one of the tools with arguments valid
  for it (vLLM's shape); one call only when `parallel_tool_calls` is false.
- `"auto"` (OpenAI's default when tools are given) — the model chooses: plain text, or
  (after optional text) SmolLM2's tool-call format: `<tool_call>`, a JSON array of calls
  `{"name": ..., "arguments": {...}}` and `</tool_call>` (the format of SmolLM2-1.7B's
  tool-calling data; the markers are plain text, not special tokens). The constraint is
  a grammar (`AUTO_GRAMMAR`): any text that does not hold the marker, or text up to the
  first marker and then a valid array, closed. So the text is free until the model
  writes the marker, and from there it can only complete valid calls. The bundled 135M
  model was not trained on tool calls and nearly always answers in text.
- `"none"` (or no tools): plain text, as without tools.

The model sees the tools: a system message lists each one's name, description and
parameter schema (`system_prompt`; appended to the request's own system message, if any),
since the bundled model's chat template takes no `tools`. Earlier turns keep working:
an assistant message's `tool_calls` are rendered as the text the model wrote for them
(with the markers in auto mode), and `tool` messages as their content.

The gateway turns a finished choice's text back into `tool_calls` (`tool_calls_of`): an
id (`call_` + 24 hex digits, fresh per response), the function's name and the arguments
as a JSON string, with `finish_reason` "tool_calls" ("stop" for a named function, as
OpenAI); in auto mode the text before the marker is the message's `content`. A choice cut
short by `max_tokens` is returned as its text with "length". While streaming, auto mode's
text goes out as content as it comes, except what may be the start of the marker
(`streamable`); each call goes out as it is written (`calls_so_far` reads the text so
far: a call's name once whole, and the span of its arguments). Pure logic: no I/O.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import ApiError
from gpu.structured import JSON_DEFAULTS, GuidedDecoding, closed_objects

MAX_TOOLS = 128
# a tool without parameters (or `{}`) takes none: its arguments are `{}`
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
_DEFS = ("$defs", "definitions")


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]


MARKER, END_MARKER = "<tool_call>", "</tool_call>"
LABEL = "schema of the tools"  # what a constraint built from the tools is called in a 400
# auto mode: any text without the marker, or text up to the first marker, the calls and the
# closing marker (llguidance's Lark: `&`/`~` intersect and negate terminals, `lazy` ends the
# head at the first marker). `{calls}` is the calls' JSON schema.
AUTO_GRAMMAR = """%llguidance {{}}
start: TEXT | call
TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/
call: head calls "</tool_call>"
head[lazy]: /(?s:.*)<tool_call>/
calls: %json {calls}
"""
# auto mode with a format for the answer (`response_format`): the answer is JSON of that
# schema, or the calls as above with nothing before them (a free text head would keep the
# lexer from ever ending the JSON: llguidance lexes greedily, and the head's lazy regex
# could always go on, so EOS would never be allowed after a complete answer)
AUTO_FORMAT_GRAMMAR = """%llguidance {{}}
start: answer | call
answer: %json {answer}
call: "<tool_call>" calls "</tool_call>"
calls: %json {calls}
"""


@dataclass(frozen=True)
class ToolCalling:
    """What a request's `tools` and `tool_choice` ask for: calls of `named` (one function),
    or any of `functions` (`required`), or text or calls as the model chooses (`auto`)."""

    functions: tuple[Function, ...]
    named: Function | None = None
    parallel: bool = True
    auto: bool = False
    # auto mode with a format for the answer (`AUTO_FORMAT_GRAMMAR`): calls come first or not
    # at all, and an answer is JSON that may hold the marker as text (a string's content)
    leading: bool = False

    def guided(self, answer: GuidedDecoding | None = None) -> GuidedDecoding:
        """The constraint the text must meet. `answer`: the request's format for a text
        answer (`response_format`, a JSON kind), as OpenAI applies it beside tools: in auto
        mode the answer, when the model answers instead of calling, is JSON of it; when a
        call is required it has nothing to apply to."""
        if self.named is not None:
            return GuidedDecoding("json", json.dumps(closed_objects(self.named.parameters)), label=LABEL)
        if self.auto:
            schema = json.dumps({**self._calls_schema(), "x-guidance": JSON_DEFAULTS})
            if answer is None:
                return GuidedDecoding("grammar", AUTO_GRAMMAR.format(calls=schema), label=LABEL, stoppable=True)
            shape = json.loads(answer.spec) if answer.kind == "json" else {"type": "object"}
            if isinstance(shape, dict):
                shape = {"x-guidance": JSON_DEFAULTS, **shape}
            return GuidedDecoding("grammar", AUTO_FORMAT_GRAMMAR.format(answer=json.dumps(shape), calls=schema),
                                  label=f"{LABEL} and response_format")
        return GuidedDecoding("json", json.dumps(self._calls_schema()), label=LABEL)

    @property
    def args_key(self) -> str:
        """The key of a call's arguments: SmolLM2's "arguments" in auto mode, vLLM's
        "parameters" for `required`."""
        return "arguments" if self.auto else "parameters"

    def _calls_schema(self) -> dict[str, Any]:
        """A JSON array of one or more calls (one when not `parallel`) of any of the tools."""
        defs: dict[str, Any] = {}
        key = self.args_key
        call = [{"type": "object", "properties": {"name": {"const": f.name}, key: _lift_defs(f, defs)},
                 "required": ["name", key], "additionalProperties": False} for f in self.functions]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": call[0] if len(call) == 1 else {"anyOf": call}}
        if not self.parallel:
            array["maxItems"] = 1
        if defs:
            array["$defs"] = defs
        return array

    def system_prompt(self) -> str:
        """The tools, as the model reads them (in auto mode, as SmolLM2's tool-calling data
        lists them: a JSON list inside `<tools>`, and the call format)."""
        if self.auto:
            tools = [{"name": f.name, "description": f.description, "parameters": f.parameters}
                     for f in self.functions]
            return (f"You can call functions. You have access to the following tools:\n<tools>{json.dumps(tools)}</tools>\n"
                    f"To call one or more of them, answer with the calls and nothing else, in this format:\n"
                    f'{MARKER}[\n{{"name": "func_name1", "arguments": {{"argument1": "value1"}}}}\n]{END_MARKER}\n'
                    "If none of them is needed, answer in plain text.")
        lines = ["You can call these functions. Answer with a call: JSON arguments that match the function's "
                 "parameters."]
        for f in self.functions if self.named is None else (self.named,):
            lines.append(f"- {f.name}: {f.description or '(no description)'} Parameters (JSON schema): "
                         f"{json.dumps(f.parameters)}")
        if self.named is not None:
            lines.append(f"Call {self.named.name}.")
        else:
            lines.append('Answer with a JSON list of calls: [{"name": <function>, "parameters": {...}}].')
        return "\n".join(lines)

    @property
    def finish_reason(self) -> str:
        return "stop" if self.named is not None else "tool_calls"

    def content_of(self, text: str, reason: str) -> str:
        """The content of a finished choice that spells no call (`tool_calls_of` and
        `cut_calls` None): all its text, except in auto mode when a stop string, stop token
        or max_tokens ended it inside a call (before its name was whole), whose unfinished
        call is dropped (the text before the marker remains: the markup is not an answer)."""
        at = self._marker(text) if self.auto and reason in ("stop", "length") else -1
        return text if at < 0 else text[:at]

    def _marker(self, text: str) -> int:
        """Where the calls' marker starts in auto mode's text, or -1: anywhere, or with an
        answer format (`leading`) only at the start."""
        if self.leading:
            return 0 if text.startswith(MARKER) else -1
        return text.find(MARKER)

    def streamable(self, text: str) -> int:
        """Auto mode, streaming: how much of a choice's text so far is surely content (see
        the module's `streamable`); with an answer format, all of it once it cannot be
        the start of a call, none of it before."""
        if not self.leading:
            return streamable(text)
        return 0 if MARKER.startswith(text) or text.startswith(MARKER) else len(text)

    def calls_so_far(self, text: str) -> list[CallSoFar]:
        """The calls a choice's text so far spells, in order, for streaming them as they
        are written: each with its name once the name is whole, and its arguments' span
        (the text `tool_calls_of` will give as `arguments` once the choice ends)."""
        if self.named is not None:
            start = _skip_ws(text, 0)
            if start >= len(text):
                return [CallSoFar(self.named.name)]
            return [CallSoFar(self.named.name, start, _prefix_value_end(text, start))]
        offset = 0
        if self.auto:
            at = self._marker(text)
            if at < 0:
                return []
            offset = at + len(MARKER)
        try:
            return _calls_so_far(text, offset, self.args_key)
        except (ValueError, IndexError):  # not reached for a prefix of valid calls; stream them whole then
            return []

    def cut_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]] | None:
        """The message `content` and OpenAI `tool_calls` of a choice max_tokens cut inside its
        calls: each call whose name is whole, the last with its arguments as far as they
        were written (as OpenAI answers, and as a stream sends them: `calls_so_far`); None if
        no call's name was written yet (the choice is then its text, `content_of`)."""
        calls = [c for c in self.calls_so_far(text) if c.name is not None]
        if not calls:
            return None
        content = None
        if self.auto:
            at = self._marker(text)
            content = text[:at] if text[:at].strip() else None
        return content, [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": c.name, "arguments": "" if c.start is None
                                       else text[c.start:c.end if c.end is not None else len(text)]}}
                         for c in calls]

    def tool_calls_of(self, text: str) -> tuple[str | None, list[dict[str, Any]]] | None:
        """The message `content` and OpenAI `tool_calls` a finished choice's text spells;
        None if it spells no call (auto mode's plain text, or a choice cut short by
        max_tokens). Only auto mode has content beside the calls: the text before the
        marker, as streamed (None when blank)."""
        content = None
        if self.auto:
            at = self._marker(text)
            if at < 0 or not text.endswith(END_MARKER):
                return None
            content = text[:at] if text[:at].strip() else None
            text = text[at + len(MARKER):-len(END_MARKER)]
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.named is not None:
            calls = [(self.named.name, text.strip())]
        elif isinstance(value, list) and all(isinstance(c, dict) and "name" in c for c in value):
            try:
                spans = _argument_texts(text, self.args_key)
            except (IndexError, RecursionError):  # not reached for JSON that parsed; a safe fallback
                spans = [None] * len(value)
            calls = [(c["name"], raw if raw is not None else json.dumps(c.get(self.args_key, {}), ensure_ascii=False))
                     for c, raw in zip(value, spans, strict=True)]
        else:
            return None
        return content, [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": name, "arguments": args}} for name, args in calls]


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\n\r":
        i += 1
    return i


def _value_end(s: str, i: int) -> int:
    """The index just past the JSON value that starts at `s[i]` (`s` is valid JSON)."""
    c = s[i]
    if c == '"':
        i += 1
        while s[i] != '"':
            i += 2 if s[i] == "\\" else 1
        return i + 1
    if c in "[{":
        close = "]" if c == "[" else "}"
        i = _skip_ws(s, i + 1)
        while s[i] != close:
            if c == "{":  # a key, then ':'
                i = _skip_ws(s, _skip_ws(s, _value_end(s, i)) + 1)
            i = _skip_ws(s, _value_end(s, i))
            if s[i] == ",":
                i = _skip_ws(s, i + 1)
        return i + 1
    while i < len(s) and s[i] not in ",]} \t\n\r":  # a number, true, false or null
        i += 1
    return i


def _argument_texts(text: str, key: str) -> list[str | None]:
    """For a JSON list of call objects, each call's `key` value exactly as written (the
    model's own text: re-encoding a parsed value would turn 9e999 into Infinity and
    reformat numbers); None for a call without it. `text` must be valid JSON."""
    out: list[str | None] = []
    i = _skip_ws(text, 0) + 1  # past '['
    i = _skip_ws(text, i)
    while text[i] != "]":
        found = None
        i = _skip_ws(text, i + 1)  # past '{'
        while text[i] != "}":
            end = _value_end(text, i)
            name = json.loads(text[i:end])
            i = _skip_ws(text, _skip_ws(text, end) + 1)  # past ':'
            end = _value_end(text, i)
            if name == key:
                found = text[i:end]
            i = _skip_ws(text, end)
            if text[i] == ",":
                i = _skip_ws(text, i + 1)
        out.append(found)
        i = _skip_ws(text, i + 1)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    return out


def _prefix_value_end(s: str, i: int) -> int | None:
    """The index just past the JSON value that starts at `s[i]`, or None when `s` ends
    before the value does (`s` is a prefix of valid JSON: the text so far of a choice
    whose constraint only lets valid JSON through; a number at the very end may go on)."""
    n = len(s)
    if i >= n:
        return None
    c = s[i]
    if c == '"':
        i += 1
        while i < n and s[i] != '"':
            i += 2 if s[i] == "\\" else 1
        return i + 1 if i < n else None
    if c in "[{":
        depth, in_string = 0, False
        while i < n:
            ch = s[i]
            if in_string:
                if ch == "\\":
                    i += 2
                    continue
                in_string = ch != '"'
            elif ch == '"':
                in_string = True
            elif ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    while i < n and s[i] not in ",]} \t\n\r":  # a number, true, false or null
        i += 1
    return i if i < n else None


@dataclass
class CallSoFar:
    """A call as far as a choice has written it: its name once whole, and where its
    arguments' text starts and ends in the choice's text (`end` None: still being written)."""

    name: str | None = None
    start: int | None = None
    end: int | None = None


def _calls_so_far(text: str, offset: int, key: str) -> list[CallSoFar]:
    """The calls of the JSON list of call objects that starts at `text[offset]`, as far as
    `text` goes (positions in `text`)."""
    out: list[CallSoFar] = []
    n = len(text)
    i = _skip_ws(text, offset)
    if i >= n or text[i] != "[":
        return out
    i = _skip_ws(text, i + 1)
    while i < n and text[i] == "{":
        call = CallSoFar()
        out.append(call)
        i = _skip_ws(text, i + 1)
        while i < n and text[i] != "}":
            end = _prefix_value_end(text, i)  # a key
            if end is None:
                return out
            field = json.loads(text[i:end])
            i = _skip_ws(text, end)
            if i >= n or text[i] != ":":
                return out
            i = _skip_ws(text, i + 1)
            if i >= n:
                return out
            end = _prefix_value_end(text, i)
            if field == key:
                call.start, call.end = i, end
            elif field == "name" and end is not None:
                call.name = json.loads(text[i:end])
            if end is None:
                return out
            i = _skip_ws(text, end)
            if i < n and text[i] == ",":
                i = _skip_ws(text, i + 1)
        if i >= n:
            return out
        i = _skip_ws(text, i + 1)  # past '}'
        if i < n and text[i] == ",":
            i = _skip_ws(text, i + 1)
    return out


def streamable(text: str) -> int:
    """Auto mode, streaming: how much of a choice's text so far is surely content — all of
    it but a tail that may be the start of the marker, and nothing from the marker on."""
    at = text.find(MARKER)
    if at >= 0:
        return at
    for k in range(min(len(MARKER) - 1, len(text)), 0, -1):
        if text.endswith(MARKER[:k]):
            return len(text) - k
    return len(text)


def tool_calling(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolCalling | None:
    """The request's tool calling (None: plain text), or a 400 naming the field at fault."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    functions = _functions(tools) if tools else ()  # checked even when tool_choice is "none"
    if tool_choice == "none" or (not tools and tool_choice == "auto"):
        return None
    if not tools:
        raise ApiError(400, f"tool_choice {json.dumps(tool_choice)[:100]} needs tools, and the request has none",
                       code="invalid_value", param="tool_choice")
    if tool_choice == "auto":
        return ToolCalling(functions, parallel=parallel_tool_calls is not False, auto=True)
    if tool_choice == "required":
        return ToolCalling(functions, parallel=parallel_tool_calls is not False)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ApiError(400, "tool_choice must be \"none\", \"auto\", \"required\" or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}", code="invalid_value",
                       param="tool_choice")
    named = next((f for f in functions if f.name == name), None)
    if named is None:
        raise ApiError(400, f"tool_choice names {name[:100]!r}, which is not among the tools", code="invalid_value",
                       param="tool_choice")
    return ToolCalling(functions, named=named, parallel=False)


def _functions(tools: list[Any]) -> tuple[Function, ...]:
    if len(tools) > MAX_TOOLS:
        raise ApiError(400, f"at most {MAX_TOOLS} tools, got {len(tools)}", code="invalid_value", param="tools")
    out: list[Function] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}",
                           code="invalid_value", param="tools")
        name, desc, params = fn.get("name"), fn.get("description") or "", fn.get("parameters")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ApiError(400, f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-'",
                           code="invalid_value", param="tools")
        if any(f.name == name for f in out):
            raise ApiError(400, f"two tools are named {name!r}", code="invalid_value", param="tools")
        if params is None or params == {}:
            params = _NO_PARAMETERS
        if not isinstance(params, dict) or params.get("type", "object") != "object" or not isinstance(desc, str):
            raise ApiError(400, f"tools[{i}].function: parameters must be a JSON schema of an object and "
                           "description a string", code="invalid_value", param="tools")
        out.append(Function(name, desc, {"type": "object", **params}))
    return tuple(out)


def _pointer(name: str) -> str:
    """`name` as one JSON-pointer segment (RFC 6901: "~" is "~0", "/" is "~1")."""
    return name.replace("~", "~0").replace("/", "~1")


def _lift_defs(f: Function, defs: dict[str, Any]) -> dict[str, Any]:
    """`f.parameters` for nesting inside the list-of-calls schema ("required" and auto): its
    `$defs` (or `definitions`) move to the root as `<name>.<def>` and its `$ref`s follow
    them, since a root-relative pointer would not resolve where the schema now sits. Other
    pointers into the schema (`#`, `#/properties/...`: recursive schemas, as zod writes
    them) point at a copy of the whole schema kept as the def `<name>`. Its objects are
    closed (`gpu.structured.closed_objects`), as a named function's are."""
    params = closed_objects(copy.deepcopy(f.parameters))
    local: dict[str, str] = {}
    for key in _DEFS:
        for name, schema in (params.pop(key, None) or {}).items():
            local[f"#/{key}/{_pointer(name)}"] = f"#/$defs/{_pointer(f'{f.name}.{name}')}"
            defs[f"{f.name}.{name}"] = schema
    root = f"#/$defs/{_pointer(f.name)}"
    uses_root = False

    def rewrite(node: Any) -> Any:
        nonlocal uses_root
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                head = next((r for r in local if ref == r or ref.startswith(r + "/")), None)
                if head is not None:
                    node = {**node, "$ref": local[head] + ref[len(head):]}
                else:
                    uses_root = True
                    node = {**node, "$ref": root + ref[1:]}
            return {k: rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    lifted = rewrite(params)
    for name in [n for n in defs if n.startswith(f"{f.name}.")]:
        defs[name] = rewrite(defs[name])
    if uses_root:
        defs[f.name] = lifted
    return lifted


def render_message(role: str, content: str, tool_calls: list[Any] | None, *, markers: bool = False) -> str:
    """An earlier turn's text as the model reads it: an assistant's tool calls as the JSON
    it wrote for them (after its text, if any). With `markers` (auto mode) in SmolLM2's
    format: the calls between the markers, and a tool's answer inside `<tool_response>`
    (`chat_role` makes that turn a user's). A call that is not
    `{"function": {"name": ..., "arguments": ...}}` is a 400 (`messages`)."""
    if markers and role == "tool":
        return f"<tool_response>\n{content}\n</tool_response>"
    if not tool_calls:
        return content
    if role != "assistant":
        raise ApiError(400, f"a {role} message has tool_calls; only assistant messages do", code="invalid_value",
                       param="messages")
    calls = []
    for c in tool_calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, "an assistant message's tool_calls must be {\"id\": ..., \"type\": \"function\", "
                           "\"function\": {\"name\": ..., \"arguments\": \"...\"}}", code="invalid_value",
                           param="messages")
        args = fn.get("arguments", "{}")
        try:  # (msgspec, as the body was read: json.loads took an escaped lone surrogate, which no
            # text can be encoded with: the prompt's hashing failed, a 500)
            args = msgspec.json.decode(args) if isinstance(args, str) else args
        except (msgspec.DecodeError, RecursionError):  # not JSON, or nested too deeply to read: kept as written
            pass
        calls.append({"name": fn.get("name"), "arguments" if markers else "parameters": args})
    text = json.dumps(calls, ensure_ascii=False)
    if markers:
        return f"{content}{MARKER}{text}{END_MARKER}"
    return f"{content}\n{text}" if content else text


def chat_role(role: str, *, markers: bool = False) -> str:
    """The role a turn is read under: OpenAI's "developer" (its newer name for system
    instructions) is a system turn, as the chat template knows no other; in auto mode a
    tool's answer is a user turn, as in SmolLM2's tool-calling data; otherwise the turn's own."""
    if role == "developer":
        return "system"
    return "user" if markers and role == "tool" else role
