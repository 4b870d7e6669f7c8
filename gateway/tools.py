"""Tool (function) calling on chat completions, built on structured outputs.

OpenAI's `tools` + `tool_choice` map onto a constraint (`gpu.structured`), as vLLM does
for the choices that need no model-specific parser:

- `tool_choice: {"type": "function", "function": {"name": N}}` — the text is the arguments
  of N, JSON valid against its `parameters` schema; the answer is one tool call of N.
- `tool_choice: "required"` — the text is a JSON array of one or more calls
  `{"name": ..., "parameters": {...}}`, each naming one of the tools with arguments valid
  for it (vLLM's shape); one call only when `parallel_tool_calls` is false.
- `"none"` (or no tools): plain text, as without tools.
- `"auto"` (OpenAI's default when tools are given) would need the model to choose between
  text and a call in a format a parser knows; SmolLM2 has no such format, so it is a 400
  naming `tool_choice` (vLLM answers the same without `--enable-auto-tool-choice`).

The model sees the tools: a system message lists each one's name, description and
parameter schema (`system_prompt`; appended to the request's own system message, if any),
since the bundled model's chat template takes no `tools`. Earlier turns keep working:
an assistant message's `tool_calls` are rendered as the JSON it produced, and `tool`
messages as their content.

The gateway turns a finished choice's text back into `tool_calls` (`tool_calls_of`): an
id (`call_` + 24 hex digits, fresh per response), the function's name and the arguments
as a JSON string, with `finish_reason` "tool_calls" ("stop" for a named function, as
OpenAI). A choice cut short by `max_tokens` is returned as its text with "length".
Pure logic: no I/O.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.errors import ApiError
from gpu.structured import GuidedDecoding

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


@dataclass(frozen=True)
class ToolCalling:
    """What a request's `tools` and `tool_choice` ask for: calls of `named` (one function)
    or any of `functions` (`required`)."""

    functions: tuple[Function, ...]
    named: Function | None = None
    parallel: bool = True

    def guided(self) -> GuidedDecoding:
        """The constraint the text must meet."""
        if self.named is not None:
            return GuidedDecoding("json", json.dumps(self.named.parameters))
        defs: dict[str, Any] = {}
        call = [{"type": "object", "properties": {"name": {"const": f.name}, "parameters": _lift_defs(f, defs)},
                 "required": ["name", "parameters"], "additionalProperties": False} for f in self.functions]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": call[0] if len(call) == 1 else {"anyOf": call}}
        if not self.parallel:
            array["maxItems"] = 1
        if defs:
            array["$defs"] = defs
        return GuidedDecoding("json", json.dumps(array))

    def system_prompt(self) -> str:
        """The tools, as the model reads them."""
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

    def tool_calls_of(self, text: str) -> list[dict[str, Any]] | None:
        """The OpenAI `tool_calls` a finished choice's text spells (None if it does not parse:
        a choice cut short by max_tokens)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.named is not None:
            calls = [(self.named.name, value)]
        elif isinstance(value, list) and all(isinstance(c, dict) and "name" in c for c in value):
            calls = [(c["name"], c.get("parameters", {})) for c in value]
        else:
            return None
        return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                for name, args in calls]


def tool_calling(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolCalling | None:
    """The request's tool calling (None: plain text), or a 400 naming the field at fault."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    functions = _functions(tools) if tools else ()  # checked even when tool_choice is "none"
    if tool_choice == "none" or (not tools and tool_choice == "auto"):
        return None
    if not tools:
        raise ApiError(400, "tool_choice names a tool but the request has no tools", code="invalid_value",
                       param="tool_choice")
    if tool_choice == "auto":
        raise ApiError(400, "tool_choice \"auto\" needs a tool-call format this model does not have; send "
                       "\"required\", name a function ({\"type\": \"function\", \"function\": {\"name\": ...}}), "
                       "or \"none\"", code="unsupported_value", param="tool_choice")
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


def _lift_defs(f: Function, defs: dict[str, Any]) -> dict[str, Any]:
    """`f.parameters` for nesting inside the "required" array's schema: its `$defs` (or
    `definitions`) move to the root as `<name>.<def>` and its `$ref`s follow them (a
    root-relative pointer would not resolve where the schema now sits). Other pointers
    into the schema's root are a 400: they cannot be moved."""
    params = copy.deepcopy(f.parameters)
    local: dict[str, str] = {}
    for key in _DEFS:
        for name, schema in (params.pop(key, None) or {}).items():
            local[f"#/{key}/{name}"] = f"#/$defs/{f.name}.{name}"
            defs[f"{f.name}.{name}"] = schema

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                head = next((r for r in local if ref == r or ref.startswith(r + "/")), None)
                if head is None:
                    raise ApiError(400, f"tools: {f.name}'s parameters refer to {ref[:100]!r}; with tool_choice "
                                   "\"required\" only references into its $defs are supported",
                                   code="invalid_value", param="tools")
                node = {**node, "$ref": local[head] + ref[len(head):]}
            return {k: rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    lifted = rewrite(params)
    for name in [n for n in defs if n.startswith(f"{f.name}.")]:
        defs[name] = rewrite(defs[name])
    return lifted


def render_message(role: str, content: str, tool_calls: list[Any] | None) -> str:
    """An earlier turn's text as the model reads it: an assistant's tool calls as the JSON
    it wrote for them (after its text, if any). A call that is not
    `{"function": {"name": ..., "arguments": ...}}` is a 400 (`messages`)."""
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
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass
        calls.append({"name": fn.get("name"), "parameters": args})
    text = json.dumps(calls, ensure_ascii=False)
    return f"{content}\n{text}" if content else text
