"""The Responses API through the whole stack with the real model, as the official SDK
sends it: text, streams and the SDK's stream helper, a structured answer (`responses.parse`
with a pydantic model), function calls (named, and `auto` continued with the tool's
output through `previous_response_id`), and a schema that does not compile as a 400."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch
import trio

from gateway.config import GatewayConfig
from tests.conftest import serve_real

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The current weather in a city.",
          "parameters": WEATHER, "strict": True}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)


async def test_responses_served(nursery: trio.Nursery, tmp_path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    urls, key, stop = await serve_real(nursery, GatewayConfig(
        port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm", shutdown_grace_seconds=1,
        dtype="float32", kv_cache_mb=48))  # 68 blocks: 1088 tokens, fewer than the 8192-token window
    sdk = openai.OpenAI(base_url=urls[0] + "/v1", api_key=key, max_retries=0, timeout=300)
    model = (await trio.to_thread.run_sync(sdk.models.list)).data[0].id

    # text, whole and streamed: the same greedy answer, and a stream that ends completed
    def text_both():  # type: ignore[no-untyped-def]
        whole = sdk.responses.create(model=model, input="Say hello in one short sentence.", temperature=0,
                                     max_output_tokens=60, instructions="You are a friendly assistant.",
                                     extra_headers={"Cache-Control": "no-store"})
        with sdk.responses.stream(model=model, input="Say hello in one short sentence.", temperature=0,
                                  max_output_tokens=60, instructions="You are a friendly assistant.") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
        return whole, deltas, final

    whole, deltas, final = await trio.to_thread.run_sync(text_both)
    counted = await trio.to_thread.run_sync(lambda: sdk.responses.input_tokens.count(
        model=model, input="Say hello in one short sentence.", instructions="You are a friendly assistant."))
    assert counted.input_tokens == whole.usage.input_tokens
    assert whole.status == "completed" and whole.output_text.strip()
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens > 0

    # logprobs list the tokens of the text: not the end-of-turn token that ended it
    lp_resp = await trio.to_thread.run_sync(lambda: sdk.responses.create(
        model=model, input="What is the capital of France?", temperature=0, max_output_tokens=40,
        include=["message.output_text.logprobs"], extra_headers={"Cache-Control": "no-store"}))
    part = lp_resp.output[0].content[0]
    assert lp_resp.status == "completed" and part.text
    assert b"".join(bytes(t.bytes) for t in part.logprobs).decode() == part.text
    assert final.usage.input_tokens == whole.usage.input_tokens > 10  # the chat template and instructions

    # a structured answer: the SDK's parse with a pydantic model (text.format json_schema)
    parsed = await trio.to_thread.run_sync(lambda: sdk.responses.parse(
        model=model, input="Name a big city and its country, as JSON.", text_format=City, temperature=0,
        max_output_tokens=60))
    assert isinstance(parsed.output_parsed, City)

    # a named function: one function_call item whose arguments meet the schema
    named = await trio.to_thread.run_sync(lambda: sdk.responses.create(
        model=model, input="What is the weather in Paris?", tools=TOOLS, temperature=0, max_output_tokens=60,
        tool_choice={"type": "function", "name": "get_weather"}))
    [call] = [item for item in named.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)

    # "auto": shown two earlier calls as items and nudged toward "call" (as the chat test),
    # the model calls; the stream helper sees the call done; the tool's output then goes
    # back through previous_response_id and the model answers in text
    shown: list[dict] = []  # type: ignore[type-arg]
    for k, (city, answer) in enumerate((("Oslo", "3 C, snow"), ("Lima", "22 C, sun"))):
        shown += [{"role": "user", "content": f"What is the weather in {city}, in celsius?"},
                  {"type": "function_call", "call_id": f"call_{k}", "name": "get_weather",
                   "arguments": json.dumps({"city": city, "unit": "celsius"})},
                  {"type": "function_call_output", "call_id": f"call_{k}", "output": answer},
                  {"role": "assistant", "content": f"It is {answer} in {city}."}]
    question = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {key}"}) as http:
        marker = (await http.post("/tokenize", json={"prompt": "<tool_call>", "add_special_tokens": False,
                                                     "return_token_strs": True})).json()
        nudge = {str(t): 3 for t, s in zip(marker["tokens"], marker["token_strs"], strict=True) if s == "call"}
        bad = await http.post("/v1/responses", json={"model": model, "input": "x", "text": {"format": {
            "type": "json_schema", "name": "n", "schema": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "text", bad.text
        assert bad.json()["error"]["message"].startswith("text.format: "), bad.text  # the field the client sent

    def auto_call():  # type: ignore[no-untyped-def]
        with sdk.responses.stream(model=model, input=shown + question, tools=TOOLS, temperature=0,
                                  max_output_tokens=60, extra_body={"logit_bias": nudge}) as stream:
            done = [e for e in stream if e.type == "response.function_call_arguments.done"]
            return done, stream.get_final_response()

    done, called = await trio.to_thread.run_sync(auto_call)
    [fc] = [item for item in called.output if item.type == "function_call"]
    assert [d.arguments for d in done] == [fc.arguments] and fc.name == "get_weather"
    jsonschema.validate(json.loads(fc.arguments), WEATHER)
    assert called.status == "completed"

    output = [{"type": "function_call_output", "call_id": fc.call_id, "output": "18 C, clear"}]

    def answer(**turn):  # type: ignore[no-untyped-def]
        return sdk.responses.create(model=model, tools=TOOLS, tool_choice="none", temperature=0,
                                    max_output_tokens=30, **turn)

    answered = await trio.to_thread.run_sync(lambda: answer(previous_response_id=called.id, input=output))
    assert answered.output_text.strip() and not [i for i in answered.output if i.type == "function_call"]
    # the same as sending the whole conversation again
    whole_again = [*shown, *question, *(i.model_dump(exclude_none=True) for i in called.output), *output]
    again = await trio.to_thread.run_sync(lambda: answer(input=whole_again))
    assert again.output_text == answered.output_text and again.usage.input_tokens == answered.usage.input_tokens
    counted = await trio.to_thread.run_sync(lambda: sdk.responses.input_tokens.count(
        model=model, previous_response_id=called.id, input=output, tools=TOOLS, tool_choice="none"))
    assert counted.input_tokens == answered.usage.input_tokens
    counted = await trio.to_thread.run_sync(lambda: sdk.responses.input_tokens.count(
        model=model, input=shown + question, tools=TOOLS))  # auto: the tools are listed in the prompt
    assert counted.input_tokens == called.usage.input_tokens

    # truncation "auto": a conversation longer than the context loses its first items
    long = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"Note {k}: " + "lorem ipsum " * 100}
            for k in range(6)] + [{"role": "user", "content": "Summarize the notes."}]
    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
        # the KV cache, not the context window, bounds a request here: what is reported and
        # what truncation keeps to (it used to budget for the 8192-token window, and refuse)
        window = (await http.get("/v1/models")).json()["data"][0]["max_model_len"]
        assert window == 1088
        refused = await http.post("/v1/responses", json={"model": model, "input": long, "max_output_tokens": 16})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input", refused.text
        ask_long = {"model": model, "input": long, "max_output_tokens": 16, "truncation": "auto", "temperature": 0}
        counted = (await http.post("/v1/responses/input_tokens", json=ask_long)).json()["input_tokens"]
        cut = await http.post("/v1/responses", json=ask_long)
        assert cut.status_code == 200, cut.text
        assert cut.json()["usage"]["input_tokens"] == counted <= window - 16
        items = (await http.get(f"/v1/responses/{cut.json()['id']}/input_items", params={"order": "asc"})).json()
        texts = [i["content"][0]["text"] for i in items["data"]]
        assert texts[-1] == "Summarize the notes." and len(texts) < len(long)  # stored as read
        assert not texts[0].startswith("Note 0:")
        # without max_output_tokens, the cut leaves a quarter of the window to the answer (it
        # left one token, and long chains ended `incomplete` after a word)
        free = {k: v for k, v in ask_long.items() if k != "max_output_tokens"}
        counted_free = (await http.post("/v1/responses/input_tokens", json=free)).json()["input_tokens"]
        assert 0 < counted_free <= window - window // 4
        # the count takes no model (the SDK's is optional): the served one's
        nameless = {k: v for k, v in ask_long.items() if k != "model"}
        assert (await http.post("/v1/responses/input_tokens", json=nameless)).json()["input_tokens"] == counted
        nulled = {**ask_long, "model": None}  # the SDK's count(model=None)
        assert (await http.post("/v1/responses/input_tokens", json=nulled)).json()["input_tokens"] == counted
    stop.set()
