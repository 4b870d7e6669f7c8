"""gateway/tools.py: tools + tool_choice → a constraint, the prompt the model reads, and
the finished text back into OpenAI tool calls (pure logic; served end to end in
test_structured_serving.py)."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import pytest

from gateway.errors import ApiError
from gateway.routes_openai import ChatRequest, guided_decoding
from gateway.tools import chat_role, render_message, streamable, tool_calling
from gpu.structured import GrammarCompiler

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "ping"}}]  # no parameters: an empty object


def test_no_tools_or_none_is_plain_text() -> None:
    assert tool_calling(None, None, None) is None
    assert tool_calling([], "auto", None) is None
    assert tool_calling(TOOLS, "none", None) is None


@pytest.mark.parametrize(("tools", "choice", "param", "message"), [
    (None, "required", "tool_choice", "needs tools"),
    ([], "required", "tool_choice", "needs tools"),
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
    assert json.loads(calling.guided().spec) == {**WEATHER, "additionalProperties": False}  # (closed)
    assert "get_weather" in calling.system_prompt() and "ping" not in calling.system_prompt()
    content, [call] = calling.tool_calls_of('{"city": "Paris"}')
    assert content is None
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
    _, calls = calling.tool_calls_of('[{"name": "ping", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert [c["function"]["name"] for c in calls] == ["ping", "get_weather"]
    assert len({c["id"] for c in calls}) == 2
    assert "get_weather" in calling.system_prompt() and "ping" in calling.system_prompt()


def test_arguments_are_the_models_own_text() -> None:
    """Re-encoding parsed arguments would turn 9e999 into Infinity (not JSON) and reformat
    numbers: each call's arguments are passed on exactly as written."""
    big = [{"type": "function", "function": {"name": "big", "parameters": {
        "type": "object", "properties": {"x": {"type": "number"}}}}}]
    named = tool_calling(big, {"type": "function", "function": {"name": "big"}}, None)
    assert named.tool_calls_of(' {"x": 9e999}\n')[1][0]["function"]["arguments"] == '{"x": 9e999}'
    auto = tool_calling(big, "auto", None)
    text = '<tool_call>[{"name": "big", "arguments": {"x":0.10000000000000000001, "s": "}]\\""}}, {"name": "big"}]</tool_call>'
    _, calls = auto.tool_calls_of(text)
    assert [c["function"]["arguments"] for c in calls] == ['{"x":0.10000000000000000001, "s": "}]\\""}', "{}"]


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
    # pointers into the schema itself (recursion, as zod writes it) and escaped def names
    chain = {"type": "object", "properties": {"next": {"$ref": "#"}, "id": {"type": "integer"},
                                              "alias": {"$ref": "#/properties/id"}, "tag": {"$ref": "#/$defs/a~1b"}},
             "$defs": {"a/b": {"type": "string"}}, "additionalProperties": False}
    for choice in ("required", "auto"):
        calling = tool_calling([{"type": "function", "function": {"name": "chain", "parameters": chain}}], choice, None)
        spec = calling.guided().spec
        schema = json.loads(spec if choice == "required" else spec.split("%json ", 1)[1])
        key = calling.args_key
        jsonschema.validate([{"name": "chain", key: {"id": 1, "next": {"id": 2, "alias": 3, "tag": "x"}}}], schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([{"name": "chain", key: {"next": {"alias": "three"}}}], schema)


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
    # an escaped lone surrogate in the arguments (no text can hold it: json.loads made one,
    # and the prompt's hashing failed with a 500) is kept as written, as arguments that are
    # not JSON are
    for markers in (False, True):
        odd = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "\\ud800"}'}}]
        text = render_message("assistant", "", odd, markers=markers)
        assert '{\\"a\\": \\"\\\\ud800\\"}' in text and text.encode()


CALL = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'


def test_auto_is_the_default_with_tools_and_lets_the_model_choose() -> None:
    for choice in (None, "auto"):
        calling = tool_calling(TOOLS, choice, None)
        assert calling is not None and calling.auto and calling.guided().kind == "grammar"
        assert calling.finish_reason == "tool_calls"
    calling = tool_calling(TOOLS, None, None)
    prompt = calling.system_prompt()  # every tool, in SmolLM2's <tools> list, and the call format
    assert "<tools>" in prompt and "get_weather" in prompt and "ping" in prompt and "<tool_call>[" in prompt
    assert calling.tool_calls_of("It is sunny in Oslo.") is None  # plain text: no call
    assert calling.tool_calls_of(CALL[:-5]) is None  # cut short by max_tokens
    content, [call] = calling.tool_calls_of(CALL)
    assert content is None and call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    content, calls = calling.tool_calls_of("Let me look.\n" + CALL.replace("}]<", '}, {"name": "ping", "arguments": {}}]<'))
    assert content == "Let me look.\n" and [c["function"]["name"] for c in calls] == ["get_weather", "ping"]


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:  # type: ignore[no-untyped-def]
    return GrammarCompiler(tokenizer, tokenizer.vocab_size)


def _accepts(compiler: GrammarCompiler, tokenizer, calling, text: str) -> tuple[bool, bool]:  # type: ignore[no-untyped-def]
    """(the text is allowed so far, the grammar is complete after it)"""
    return _matches(compiler, tokenizer, calling.guided(), text)


def test_the_auto_grammar_frees_text_and_holds_calls_to_the_tools(compiler, tokenizer) -> None:  # type: ignore[no-untyped-def]
    calling = tool_calling(TOOLS, "auto", None)
    accepts = lambda text: _accepts(compiler, tokenizer, calling, text)  # noqa: E731
    assert accepts("Any answer, even <tool_ or <tool_response>.") == (True, False)  # text: open-ended, ends at EOS
    assert accepts(CALL) == (True, True)  # a call ends the choice
    assert accepts("Checking. " + CALL) == (True, True)
    assert accepts('<tool_call>[\n  {"name": "ping", "arguments": {}}\n]</tool_call>') == (True, True)
    for bad in ('<tool_call>[{"name": "nope", "arguments": {}}]</tool_call>',  # not a tool
                '<tool_call>[{"name": "get_weather", "arguments": {}}]</tool_call>',  # city is required
                '<tool_call>[{"name": "ping", "parameters": {}}]</tool_call>',  # SmolLM2's key is "arguments"
                '<tool_call>[]</tool_call>',  # at least one call
                CALL + " and more",  # nothing after the call
                '<tool_call>[' + " " * 30 + '{"name": "ping", "arguments": {}}]</tool_call>'):  # bounded whitespace
        assert accepts(bad)[0] is False, bad
    chain = {"type": "object", "properties": {"id": {"type": "integer"}, "next": {"$ref": "#"}}, "required": ["id"],
             "additionalProperties": False}  # a recursive tool compiles, its pointer moved with it
    recursive = tool_calling([{"type": "function", "function": {"name": "chain", "parameters": chain}}], "auto", None)
    nested = '<tool_call>[{"name": "chain", "arguments": {"id": 1, "next": {"id": 2}}}]</tool_call>'
    assert _accepts(compiler, tokenizer, recursive, nested) == (True, True)
    assert _accepts(compiler, tokenizer, recursive, nested.replace('"id": 2', '"id": "2"'))[0] is False
    single = tool_calling(TOOLS, "auto", False)  # parallel_tool_calls false: one call
    two = '<tool_call>[{"name": "ping", "arguments": {}}, {"name": "ping", "arguments": {}}]</tool_call>'
    assert accepts(two) == (True, True) and _accepts(compiler, tokenizer, single, two)[0] is False


@pytest.mark.parametrize(("text", "ready"), [
    ("Hello", 5), ("Hello <", 6), ("Hello <tool_ca", 6), ("<tool_call>[", 0), ("a<tool_call>[{", 1),
    ("x < y", 5), ("<tool_cal", 0), ("<tool_response>", 15), ("", 0),
])
def test_streamable_holds_back_only_what_may_be_a_call(text: str, ready: int) -> None:
    assert streamable(text) == ready


def test_auto_mode_reads_earlier_calls_and_answers_in_smollm2s_format() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assert render_message("assistant", "", calls, markers=True) == CALL
    assert render_message("tool", "3 C", None, markers=True) == "<tool_response>\n3 C\n</tool_response>"
    assert chat_role("tool", markers=True) == "user" and chat_role("tool") == "tool"
    assert chat_role("assistant", markers=True) == "assistant"
    assert chat_role("developer") == "system"  # OpenAI's newer name for system instructions


def test_a_tool_takes_only_the_arguments_it_names(compiler, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Parameters that do not say `additionalProperties` (what most libraries send) are
    closed: the model cannot invent keys until max_tokens."""
    loose = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "where", "parameters": loose}}]
    named = tool_calling(tools, {"type": "function", "function": {"name": "where"}}, None)
    auto = tool_calling(tools, "auto", None)
    assert _accepts(compiler, tokenizer, named, '{"city": "Oslo"}') == (True, True)
    assert _accepts(compiler, tokenizer, named, '{"city": "Oslo", "country": "NO"}')[0] is False
    call = '<tool_call>[{"name": "where", "arguments": {"city": "Oslo", "country": "NO"}}]</tool_call>'
    assert _accepts(compiler, tokenizer, auto, call)[0] is False
    assert "additionalProperties" not in auto.system_prompt()  # the model reads the schema as sent


def test_auto_with_a_response_format_answers_in_its_json_or_calls(compiler, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """tools + response_format (as OpenAI takes them): in auto mode a text answer is JSON of
    the format, and a call is still open; a required call ignores the format."""
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}, "required": ["name"]}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": person}}}
    guided, field = guided_decoding(msgspec.convert(body, ChatRequest))
    assert field == "tools" and guided is not None and guided.kind == "grammar" and not guided.stoppable
    matcher = lambda text: _matches(compiler, tokenizer, guided, text)  # noqa: E731
    answer = compiler.matcher(guided)  # a JSON answer may end there (EOS is allowed after it)
    assert all(answer.consume_token(t) for t in tokenizer.encode('{"name": "Ada"}')) and answer.is_accepting()
    assert matcher(CALL) == (True, True)
    assert matcher("Plain text")[0] is False and matcher('{"name": "Ada", "age": 3}')[0] is False
    required, _ = guided_decoding(msgspec.convert({**body, "tool_choice": "required"}, ChatRequest))
    assert required == tool_calling(TOOLS, "required", None).guided()  # the format has nothing to apply to
    with pytest.raises(ApiError) as info:  # any other constraint beside tools is still one too many
        guided_decoding(msgspec.convert({**body, "response_format": None, "guided_regex": "a"}, ChatRequest))
    assert info.value.param == "tools"


def test_with_a_response_format_a_json_answer_holding_the_marker_is_an_answer() -> None:
    """The answer is JSON that may hold `<tool_call>` in a string: it was cut at the marker
    (content '{"tag": "', not JSON) and held back from the stream for good. Calls come
    first or not at all, and only a text that starts with the marker is one."""
    from gateway.routes_openai import tools_of

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
            "response_format": {"type": "json_object"}}
    calling = tools_of(msgspec.convert(body, ChatRequest))
    assert calling is not None and calling.leading
    assert not tools_of(msgspec.convert({**body, "response_format": {"type": "text"}}, ChatRequest)).leading
    answer = '{"tag": "<tool_call>x"}'
    assert calling.content_of(answer, "stop") == answer and calling.tool_calls_of(answer) is None
    assert calling.calls_so_far(answer) == [] and calling.streamable(answer) == len(answer)
    assert [calling.streamable(t) for t in ("<", "<tool_", CALL[:20])] == [0, 0, 0]  # may yet be a call
    content, calls = calling.tool_calls_of(CALL)
    assert content is None and [c["function"]["name"] for c in calls] == [json.loads(
        CALL.removeprefix("<tool_call>").removesuffix("</tool_call>"))[0]["name"]]
    assert calling.content_of(CALL[:25], "stop") == ""  # a call a stop ended: dropped


def _matches(compiler: GrammarCompiler, tokenizer, guided, text: str) -> tuple[bool, bool]:  # type: ignore[no-untyped-def]
    matcher = compiler.matcher(guided)
    ok = all(matcher.consume_token(t) for t in tokenizer.encode(text)) and not matcher.is_error()
    return ok, ok and matcher.is_stopped()
