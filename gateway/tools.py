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

import json
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.errors import ApiError
from gpu.structured import GuidedDecoding

MAX_TOOLS = 128
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


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
        call = [{"type": "object", "properties": {"name": {"const": f.name}, "parameters": f.parameters},
                 "required": ["name", "parameters"], "additionalProperties": False} for f in self.functions]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": call[0] if len(call) == 1 else {"anyOf": call}}
        if not self.parallel:
            array["maxItems"] = 1
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
    if tool_choice == "none" or (not tools and tool_choice in ("auto", "none")):
        return None
    if not tools:
        raise ApiError(400, "tool_choice names a tool but the request has no tools", code="invalid_value",
                       param="tool_choice")
    functions = _functions(tools)
    if tool_choice == "auto":
        raise ApiError(400, "tool_choice \"auto\" needs a tool-call format this model does not have; send "
                       "\"required\", name a function ({\"type\": \"function\", \"function\": {\"name\": ...}}), "
                       "or \"none\"", code="unsupported_value", param="tool_choice")
    if tool_choice == "required":
        return ToolCalling(functions, parallel=parallel_tool_calls is not False)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
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
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ApiError(400, f"tools[{i}].function.name must be a string of 1 to 64 characters",
                           code="invalid_value", param="tools")
        if any(f.name == name for f in out):
            raise ApiError(400, f"two tools are named {name!r}", code="invalid_value", param="tools")
        if params is None:
            params = _EMPTY_PARAMETERS
        if not isinstance(params, dict) or not isinstance(desc, str):
            raise ApiError(400, f"tools[{i}].function: parameters must be a JSON schema object and description "
                           "a string", code="invalid_value", param="tools")
        out.append(Function(name, desc, params))
    return tuple(out)


def render_message(role: str, content: str, tool_calls: list[Any] | None) -> str:
    """An earlier turn's text as the model reads it: an assistant's tool calls as the JSON
    it wrote for them (after its text, if any)."""
    if not tool_calls:
        return content
    calls = []
    for c in tool_calls:
        fn = c.get("function", {}) if isinstance(c, dict) else {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass
        calls.append({"name": fn.get("name"), "parameters": args})
    text = json.dumps(calls, ensure_ascii=False)
    return f"{content}\n{text}" if content else text
