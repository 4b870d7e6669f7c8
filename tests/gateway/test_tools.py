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
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "required", "tools",
     "of an object"),
    ([{"type": "function", "function": {"name": "get weather"}}], "required", "tools", "letters, digits"),
    ([{"bad": 1}], "none", "tools", "must be"),  # checked even when no tool is to be called
    (TOOLS, {"type": "function", "function": "get_weather"}, "tool_choice", "must be"),
    (TOOLS, {"type": "function", "function": None}, "tool_choice", "must be"),
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


def test_a_tool_without_parameters_takes_an_empty_object() -> None:
    for params in (None, {}):
        tool = {"type": "function", "function": {"name": "ping", **({} if params is None else {"parameters": params})}}
        calling = tool_calling([tool], {"type": "function", "function": {"name": "ping"}}, None)
        schema = json.loads(calling.guided().spec)
        jsonschema.validate({}, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"invented": 1}, schema)


def test_required_lifts_each_tools_defs_to_the_root() -> None:
    """pydantic's schemas (openai.pydantic_function_tool) keep sub-models in `$defs` with
    root-relative `$ref`s; nested in the list-of-calls schema they must still resolve."""
    address = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    person = {"type": "object", "properties": {"home": {"$ref": "#/$defs/Address"}}, "required": ["home"],
              "$defs": {"Address": address}}
    legacy = {"type": "object", "properties": {"at": {"$ref": "#/definitions/Address"}}, "required": ["at"],
              "definitions": {"Address": address}}
    tools = [{"type": "function", "function": {"name": "add_person", "parameters": person}},
             {"type": "function", "function": {"name": "visit", "parameters": legacy}}]
    schema = json.loads(tool_calling(tools, "required", None).guided().spec)
    assert set(schema["$defs"]) == {"add_person.Address", "visit.Address"}
    jsonschema.validate([{"name": "add_person", "parameters": {"home": {"city": "Oslo"}}},
                         {"name": "visit", "parameters": {"at": {"city": "Rome"}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add_person", "parameters": {"home": {"town": "Oslo"}}}], schema)
    root_ref = {"type": "object", "properties": {"next": {"$ref": "#"}}}
    with pytest.raises(ApiError, match="only references into its \\$defs"):
        tool_calling([{"type": "function", "function": {"name": "chain", "parameters": root_ref}}], "required",
                     None).guided()


def test_an_earlier_turns_calls_read_as_the_json_the_model_wrote() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assert json.loads(render_message("assistant", "", calls)) == [{"name": "get_weather", "parameters": {"city": "Oslo"}}]
    assert render_message("assistant", "Checking.", calls).startswith("Checking.\n[")
    assert render_message("tool", "21 C", None) == "21 C"
    for bad in ([{"id": "x", "type": "function", "function": "zzz"}], ["call"], [{"function": {"arguments": "{}"}}]):
        with pytest.raises(ApiError) as info:
            render_message("assistant", "", bad)
        assert info.value.param == "messages"
    with pytest.raises(ApiError):
        render_message("user", "hi", calls)
