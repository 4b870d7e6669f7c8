"""gateway/tools.py: tools + tool_choice → a constraint, the prompt the model reads, and
the finished text back into OpenAI tool calls (pure logic; served end to end in
test_structured_serving.py)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from gateway.errors import ApiError
from gateway.tools import render_message, tool_calling

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "ping"}}]  # no parameters: an empty object


def test_no_tools_or_none_is_plain_text() -> None:
    assert tool_calling(None, None, None) is None
    assert tool_calling([], "auto", None) is None
    assert tool_calling(TOOLS, "none", None) is None


@pytest.mark.parametrize(("tools", "choice", "param", "message"), [
    (TOOLS, None, "tool_choice", "needs a tool-call format"),  # OpenAI's default with tools: "auto"
    (TOOLS, "auto", "tool_choice", "needs a tool-call format"),
    (None, "required", "tool_choice", "has no tools"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice", "not among the tools"),
    (TOOLS, {"type": "function"}, "tool_choice", "must be"),
    (TOOLS, "sometimes", "tool_choice", "must be"),
    ([{"type": "code_interpreter"}], "required", "tools", "must be"),
    ([{"type": "function", "function": {"name": ""}}], "required", "tools", "1 to 64"),
    ([TOOLS[0], TOOLS[0]], "required", "tools", "two tools are named"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "required", "tools", "JSON schema"),
])
def test_bad_tools_are_400s_naming_the_field(tools, choice, param, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as info:
        tool_calling(tools, choice, None)
    assert info.value.status == 400 and info.value.param == param and message in info.value.message


def test_a_named_function_constrains_to_its_arguments() -> None:
    calling = tool_calling(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None)
    assert calling is not None and calling.finish_reason == "stop"
    assert json.loads(calling.guided().spec) == WEATHER
    assert "get_weather" in calling.system_prompt() and "ping" not in calling.system_prompt()
    [call] = calling.tool_calls_of('{"city": "Paris"}')
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) == 29
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert calling.tool_calls_of('{"city": "Par') is None  # cut short by max_tokens


def test_required_constrains_to_a_list_of_calls_of_any_tool() -> None:
    calling = tool_calling(TOOLS, "required", None)
    assert calling is not None and calling.finish_reason == "tool_calls"
    schema = json.loads(calling.guided().spec)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Rome"}}, {"name": "ping", "parameters": {}}],
                        schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = json.loads(tool_calling(TOOLS, "required", False).guided().spec)  # parallel_tool_calls false
    assert single["maxItems"] == 1
    calls = calling.tool_calls_of('[{"name": "ping", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert [c["function"]["name"] for c in calls] == ["ping", "get_weather"]
    assert len({c["id"] for c in calls}) == 2
    assert "get_weather" in calling.system_prompt() and "ping" in calling.system_prompt()


def test_an_earlier_turns_calls_read_as_the_json_the_model_wrote() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assert json.loads(render_message("assistant", "", calls)) == [{"name": "get_weather", "parameters": {"city": "Oslo"}}]
    assert render_message("assistant", "Checking.", calls).startswith("Checking.\n[")
    assert render_message("tool", "21 C", None) == "21 C"
