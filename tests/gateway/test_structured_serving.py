"""Structured outputs through the whole stack, as users send them: the `openai` SDK's
`response_format` (a JSON schema, and the SDK's own `parse` with a pydantic model), vLLM's
`guided_*` fields over SSE and the WebSocket, batched prompts, the response cache keyed by
the constraint, and a spec that does not compile refused as a 400 before it queues."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch
import trio

from clients import LmgateClient
from gateway.config import GatewayConfig
from gateway.sse import parse_events
from tests.conftest import serve_real

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]

BOOK = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "genres": {"type": "array", "items": {"type": "string", "enum": ["fiction", "history", "science"]},
                   "minItems": 1, "maxItems": 2},
    },
    "required": ["title", "year", "genres"],
    "additionalProperties": False,
}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    age: int


async def test_structured_outputs_served(nursery: trio.Nursery, tmp_path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    urls, key, stop = await serve_real(nursery, GatewayConfig(
        port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm", shutdown_grace_seconds=1,
        dtype="float32", kv_cache_mb=64))
    sdk = openai.OpenAI(base_url=urls[0] + "/v1", api_key=key, max_retries=0, timeout=300)
    model = (await trio.to_thread.run_sync(sdk.models.list)).data[0].id
    ask = [{"role": "user", "content": "Tell me about a book, as JSON."}]

    def schema_chat(**extra):  # type: ignore[no-untyped-def]
        return sdk.chat.completions.create(
            model=model, messages=ask, max_tokens=150, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "book", "schema": BOOK, "strict": True}},
            **extra)

    first = await trio.to_thread.run_sync(schema_chat)
    choice = first.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), BOOK)
    again = await trio.to_thread.run_sync(schema_chat)  # greedy: answered from the response cache
    assert again.choices[0].message.content == choice.message.content
    free = await trio.to_thread.run_sync(lambda: sdk.chat.completions.create(
        model=model, messages=ask, max_tokens=150, temperature=0))  # the same prompt, unconstrained
    assert free.choices[0].message.content != choice.message.content  # not the cached constrained answer

    def parse() -> Person:  # the SDK's own structured-output helper: strict schema from a pydantic model
        api = sdk.chat.completions if hasattr(sdk.chat.completions, "parse") else sdk.beta.chat.completions
        reply = api.parse(model=model, messages=[{"role": "user", "content": "Invent a person."}],
                          response_format=Person, max_tokens=80, temperature=0.9, seed=5)
        return reply.choices[0].message.parsed

    person = await trio.to_thread.run_sync(parse)
    assert isinstance(person, Person) and len(person.name) <= 30

    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
        # SSE, n = 3 sampled choices under a regex; each choice's text matches whole
        r = await http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "A phone number?"}], "stream": True,
            "n": 3, "temperature": 1.2, "seed": 11, "max_tokens": 20, "guided_regex": r"\+1 [0-9]{3}-[0-9]{4}"})
        assert r.status_code == 200, r.text
        texts = ["", "", ""]
        finish = [None, None, None]
        for event in parse_events(r.text)[:-1]:
            for c in json.loads(event)["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
                finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
        assert finish == ["stop"] * 3
        assert all(re.fullmatch(r"\+1 [0-9]{3}-[0-9]{4}", t) for t in texts), texts

        # a batch of completions prompts, each its own runtime request, all under one choice list
        r = await http.post("/v1/completions", json={
            "model": model, "prompt": ["The sky is", "Grass is", "Snow is"], "max_tokens": 5, "temperature": 0,
            "guided_choice": ["blue", "green", "white"]})
        assert r.status_code == 200, r.text
        assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
        assert all(c["text"] in ("blue", "green", "white") and c["finish_reason"] == "stop"
                   for c in r.json()["choices"]), r.json()

        # vLLM's newer field, a Lark grammar
        r = await http.post("/v1/completions", json={
            "model": model, "prompt": "2 + 2 =", "max_tokens": 10, "temperature": 0,
            "structured_outputs": {"grammar": 'start: " " DIGIT\nDIGIT: /[0-9]/'}})
        assert r.status_code == 200, r.text
        assert re.fullmatch(" [0-9]", r.json()["choices"][0]["text"])

        # a spec that does not compile: a 400 naming the field, before the request queues
        for body, param in [({"guided_regex": "(unclosed"}, "guided_regex"),
                            ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
                            ({"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
                             "response_format")]:
            r = await http.post("/v1/completions", json={"model": model, "prompt": "x", **body})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "invalid_value"
        metrics = (await http.get("/metrics")).text
        assert re.search(r'lmgate_rejections_total\{reason="invalid_value",status="400",tenant="dev"\} 3\.0', metrics)
        assert re.search(r'lmgate_structured_requests_total\{kind="json"\} [1-9]', metrics)  # the cached one too
        assert re.search(r'lmgate_structured_requests_total\{kind="choice"\} 3\.0', metrics)  # a batch: 3 requests
        assert re.search(r"lmgate_grammar_compile_seconds_count [1-9]", metrics)

        # refused after its constraint compiled (only-if-cached, and nothing stored): not counted
        def regex_count(text: str) -> float:
            found = re.search(r'lmgate_structured_requests_total\{kind="regex"\} ([0-9.]+)', text)
            return float(found.group(1)) if found else 0.0

        r = await http.post("/v1/completions", headers={"Cache-Control": "only-if-cached"}, json={
            "model": model, "prompt": "A prompt never sent before", "max_tokens": 4, "temperature": 0,
            "guided_regex": "[a-z]+"})
        assert r.status_code == 504, r.text
        assert regex_count((await http.get("/metrics")).text) == regex_count(metrics)

        # a regex that compiles but passes llguidance's lexer limit on its first token: the
        # request fails (a 400 naming the field, an error event when streamed), never a "stop"
        # with unconstrained text; the server goes on
        body = {"model": model, "prompt": "JSON:", "max_tokens": 5, "guided_regex": "(a{1000}){1000}"}
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text
        assert "output constraint failed" in r.json()["error"]["message"]
        r = await http.post("/v1/completions", json={**body, "stream": True})
        events = parse_events(r.text)
        assert events[-1] == "[DONE]" and "output constraint failed" in json.loads(events[-2])["error"]["message"]
        assert all("choices" not in json.loads(e) for e in events[:-1])
        r = await http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
        metrics = (await http.get("/metrics")).text
        assert re.search(r"lmgate_num_requests_running 0\.0", metrics) and re.search(r"lmgate_kv_cache_usage_ratio 0\.0",
                                                                                     metrics), metrics

    # tool calling: a named function, "required" (streamed too), a later turn, and "auto"
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}
    clock = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
             "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": weather}},
             {"type": "function", "function": {"name": "get_time", "description": "The local time in a city",
                                               "parameters": clock}}]
    question = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]

    def named():  # type: ignore[no-untyped-def]
        return sdk.chat.completions.create(model=model, messages=question, tools=tools, max_tokens=60, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})

    reply = (await trio.to_thread.run_sync(named)).choices[0]
    assert reply.finish_reason == "stop" and reply.message.content is None
    [call] = reply.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), weather)

    def required(stream: bool):  # type: ignore[no-untyped-def]
        return sdk.chat.completions.create(model=model, messages=question, tools=tools, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=80, temperature=0.8, seed=2, n=2,
                                           stream=stream)

    whole = (await trio.to_thread.run_sync(required, False)).choices
    for sampled in whole:
        assert sampled.finish_reason == "tool_calls"
        [c] = sampled.message.tool_calls  # parallel_tool_calls false: one call
        jsonschema.validate(json.loads(c.function.arguments), {"get_weather": weather, "get_time": clock}[c.function.name])
    def stream_helper():  # type: ignore[no-untyped-def]  # n=2: choices end in any order; the SDK copes
        with sdk.chat.completions.stream(model=model, messages=question, tools=tools, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=80, temperature=0.8, seed=2,
                                         n=2) as stream:
            return stream.get_final_completion()

    for c in (await trio.to_thread.run_sync(stream_helper)).choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
    chunks = await trio.to_thread.run_sync(lambda: list(required(True)))
    streamed = [(c.index, c.delta.tool_calls, c.finish_reason) for chunk in chunks for c in chunk.choices]
    assert [r for _, _, r in streamed if r] == ["tool_calls", "tool_calls"]
    # each choice's call in pieces as it is written: id and name first, then its arguments,
    # which joined are the whole answer's (same seed, same tokens)
    for i in (0, 1):
        pieces = [p for index, calls, _ in streamed if index == i for p in calls or []]
        assert len(pieces) > 3 and pieces[0].id.startswith("call_") and pieces[0].function.name
        assert all(p.id is None and p.function.name is None for p in pieces[1:])
        [c] = whole[i].message.tool_calls
        assert (pieces[0].function.name, "".join(p.function.arguments for p in pieces)) == (
            c.function.name, c.function.arguments)

    class Address(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=30)

    class Trip(pydantic.BaseModel):
        destination: Address
        days: int

    def pydantic_tools():  # type: ignore[no-untyped-def]  # strict tools whose schema keeps Address in $defs
        return sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Plan a trip to Rome for three days."}],
            tools=[openai.pydantic_function_tool(Trip), tools[1]], tool_choice="required", max_tokens=80,
            temperature=0)

    planned = (await trio.to_thread.run_sync(pydantic_tools)).choices[0]
    assert planned.finish_reason == "tool_calls"
    for c in planned.message.tool_calls:
        if c.function.name == "Trip":
            Trip.model_validate_json(c.function.arguments)
        else:
            jsonschema.validate(json.loads(c.function.arguments), clock)

    def later_turn():  # type: ignore[no-untyped-def]
        history = question + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
        return sdk.chat.completions.create(model=model, messages=history, tools=tools, tool_choice="none",
                                           max_tokens=20, temperature=0)

    answer = (await trio.to_thread.run_sync(later_turn)).choices[0]
    assert answer.message.content and not answer.message.tool_calls

    # "auto" (the default with tools): the model chooses between text and calls. SmolLM2-135M
    # was not trained on tool calls, so it answers in text; shown two earlier calls (read in
    # SmolLM2's format) and nudged toward "call" over "response" after "<tool_" (logit_bias),
    # it calls, and the call is held to the tools' schemas, whole and streamed
    def auto(messages, stream=False, **extra):  # type: ignore[no-untyped-def]
        return sdk.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=60, temperature=0,
                                           stream=stream, **extra)

    plain = (await trio.to_thread.run_sync(auto, [{"role": "user", "content": "What is 2+2?"}])).choices[0]
    assert plain.message.content and not plain.message.tool_calls and plain.finish_reason in ("stop", "length")
    shown: list[dict] = []  # type: ignore[type-arg]
    for k, (city, answer) in enumerate((("Oslo", "3 C, snow"), ("Lima", "22 C, sun"))):
        shown += [{"role": "user", "content": f"What is the weather in {city}, in celsius?"},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{k}", "type": "function", "function": {
                      "name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}]},
                  {"role": "tool", "tool_call_id": f"call_{k}", "content": answer},
                  {"role": "assistant", "content": f"It is {answer} in {city}."}]
    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {key}"}) as http:
        marker = (await http.post("/tokenize", json={"prompt": "<tool_call>", "add_special_tokens": False,
                                                     "return_token_strs": True})).json()
    nudge = {str(t): 3 for t, s in zip(marker["tokens"], marker["token_strs"], strict=True) if s == "call"}
    assert len(nudge) == 1
    called = (await trio.to_thread.run_sync(lambda: auto(shown + question, logit_bias=nudge))).choices[0]
    assert called.finish_reason == "tool_calls", called
    [call] = called.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), weather)
    chunks = await trio.to_thread.run_sync(lambda: list(auto(shown + question, stream=True, logit_bias=nudge)))
    streamed = [c for chunk in chunks for c in chunk.choices]
    assert not any(c.delta.content for c in streamed)  # nothing of the marker leaks as text
    pieces = [p for c in streamed for p in c.delta.tool_calls or []]  # the call as it was written
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments for p in pieces) == call.function.arguments
    assert streamed[-1].finish_reason == "tool_calls"

    # tools beside a response_format (as pydantic-ai's NativeOutput and instructor send them):
    # auto answers in the format's JSON or calls; a required call ignores the format. A
    # tool schema that does not close its objects (langchain's default) gets no invented keys
    fmt = {"type": "json_schema", "json_schema": {"name": "book", "schema": BOOK}}
    both = (await trio.to_thread.run_sync(lambda: auto([{"role": "user", "content": "A book, please."}],
                                                       response_format=fmt))).choices[0]
    if both.message.tool_calls:
        assert both.finish_reason == "tool_calls"
    else:
        jsonschema.validate(json.loads(both.message.content), BOOK)
    # an answer whose JSON holds the calls' marker as text is an answer, whole (it was cut at
    # the marker: '{"tag": "', not JSON), streamed or not; "<" biased away, so no call is made
    tag = {"type": "json_schema", "json_schema": {"name": "tag", "schema": {
        "type": "object", "properties": {"tag": {"const": "<tool_call>x"}}, "required": ["tag"]}}}
    marked = (await trio.to_thread.run_sync(lambda: auto([{"role": "user", "content": "Give me a tag."}],
                                                         response_format=tag, logit_bias={"44": -100}))).choices[0]
    assert json.loads(marked.message.content) == {"tag": "<tool_call>x"} and not marked.message.tool_calls

    def marked_stream() -> str:
        chunks = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "Give me a tag."}],
                                             tools=tools, max_tokens=60, temperature=0, response_format=tag,
                                             logit_bias={"44": -100}, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert await trio.to_thread.run_sync(marked_stream) == marked.message.content
    loose = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}
    forced = (await trio.to_thread.run_sync(lambda: sdk.chat.completions.create(
        model=model, messages=question, max_tokens=60, temperature=0, response_format=fmt,
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": loose}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))).choices[0]
    assert set(json.loads(forced.message.tool_calls[0].function.arguments)) == {"city"}

    # a stop string inside the call ends the choice there and drops the unfinished call
    # ("city" is a required key of every get_weather call)
    cut = (await trio.to_thread.run_sync(lambda: auto(shown + question, logit_bias=nudge, stop=['"city"']))).choices[0]
    assert cut.finish_reason == "stop" and not cut.message.tool_calls
    assert "<tool_call>" not in (cut.message.content or "")

    def sdk_stream_events():  # type: ignore[no-untyped-def]  # the SDK's stream helper sees each call done
        with sdk.chat.completions.stream(model=model, messages=shown + question, tools=tools, max_tokens=60,
                                         temperature=0, logit_bias=nudge) as stream:
            return [e for e in stream if e.type == "tool_calls.function.arguments.done"]

    [done] = await trio.to_thread.run_sync(sdk_stream_events)
    assert done.name == "get_weather" and done.arguments == call.function.arguments

    # lmgate's own client returns the calls too, whole and streamed
    async with LmgateClient(urls[0], key, model=model) as client:
        done = await client.chat(question, tools=tools, max_tokens=60, temperature=0,
                                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert done.choices[0].tool_calls[0]["function"]["name"] == "get_weather" and done.text == ""
        async with client.chat_stream(question, tools=tools, tool_choice="required", max_tokens=80,
                                      temperature=0) as stream:
            calls = [c for d in [d async for d in stream] for c in d.tool_calls or []]
        assert calls and all(c["function"]["name"] in ("get_weather", "get_time") for c in calls)

    # the WebSocket takes the same fields
    async with LmgateClient(urls[0], key, model=model) as client, client.ws() as session, \
            session.chat_stream(ask, max_tokens=150, temperature=0, guided_json=BOOK) as stream:
        text = "".join([d.text async for d in stream])
    # guided_json and response_format's schema are one constraint: the cached greedy answer
    assert text == choice.message.content
    stop.set()
