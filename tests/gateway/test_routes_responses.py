"""The Responses API (POST /v1/responses, stored responses) over real sockets and the
official SDK: output items, stream events, tool calls, continuing a stored response,
per-tenant storage, and its 400s/404s."""

from __future__ import annotations

import dataclasses
import json

import httpx
import openai
import pytest
import trio

from actors.messages import Failed, Finished, TenantContext, TokenDelta, Usage
from cache.redis_server import PrivateRedis
from cache.response_store import ResponseStore, StoredResponse, owner_of
from gateway.errors import ApiError
from gateway.routes_openai import ChunkRenderer
from gateway.routes_responses import (
    ResponseRenderer,
    ResponsesRequest,
    chat_request,
    clean_cuts,
    decode_request,
    input_items,
    output_room,
    truncated,
)
from gateway.sse import parse_events
from gateway.tools import tool_calling
from tests.gateway.conftest import MODEL, Gateway, start_gateway, word

# ---------------------------------------------------------------- pure mapping


def renderer(req: ResponsesRequest, tools: list | None = None, choice: str | None = None) -> ResponseRenderer:
    calling = tool_calling(tools, choice, None) if tools else None
    return ResponseRenderer("resp_1", req,
                            ChunkRenderer("chat.completions", "resp_1", MODEL, False, tools=calling))


def test_text_becomes_one_message_item_and_the_events_follow_openais_order() -> None:
    r = renderer(ResponsesRequest(model=MODEL, input="hi"))
    events = r.start() + r.delta(TokenDelta("resp_1", 0, "Hel", [1])) + r.delta(TokenDelta("resp_1", 0, "lo", [2]))
    events += r.finished(Finished("resp_1", ["stop"], Usage(3, 2)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    [message] = final["output"]
    assert message["type"] == "message" and message["status"] == "completed" and message["role"] == "assistant"
    assert message["content"] == [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}]
    assert events[2]["item"]["id"] == events[4]["item_id"] == message["id"]
    assert final["status"] == "completed" and final["incomplete_details"] is None
    assert final["usage"]["input_tokens"] == 3 and final["usage"]["output_tokens"] == 2
    assert final["usage"]["total_tokens"] == 5


def test_a_cut_answer_is_incomplete_and_an_empty_one_still_has_its_message() -> None:
    r = renderer(ResponsesRequest(model=MODEL, input="hi", max_output_tokens=1))
    events = r.delta(TokenDelta("resp_1", 0, "x", [1], finish_reason="length"))
    # not ended before it has finished (its usage comes then): a GET between the two read it
    # incomplete without usage, and a cancel between them stored it so
    assert r.running and r.current()["status"] == "in_progress" and r.current()["usage"] is None
    events += r.finished(Finished("resp_1", ["length"], Usage(1, 1)))
    final = events[-1]
    assert final["type"] == "response.incomplete" and final["response"]["usage"]["output_tokens"] == 1
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][0]["status"] == "incomplete"
    r = renderer(ResponsesRequest(model=MODEL, input="hi"))
    final = r.finished(Finished("resp_1", ["stop"], Usage(1, 0)))[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == ""


def test_tool_calls_become_function_call_items_after_the_text() -> None:
    tools = [{"type": "function", "function": {"name": "ping"}}]
    r = renderer(ResponsesRequest(model=MODEL, input="hi"), tools, "auto")
    events = r.delta(TokenDelta("resp_1", 0, "Let me check. ", [1]))
    assert [e["type"] for e in events] == ["response.output_item.added", "response.content_part.added",
                                           "response.output_text.delta"]
    events = r.delta(TokenDelta("resp_1", 0, '<tool_call>[{"name": "ping", "arguments": {"a"', [2]))
    # the call's name is whole: the message closes, the call opens, its arguments stream
    assert [e["type"] for e in events] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta"]
    assert events[3]["item"]["name"] == "ping" and events[3]["item"]["arguments"] == ""
    assert events[4]["delta"] == '{"a"'
    events = r.delta(TokenDelta("resp_1", 0, ': 1}}]</tool_call>', [3]))
    assert [(e["type"], e["delta"]) for e in events] == [("response.function_call_arguments.delta", ": 1}")]
    events = r.finished(Finished("resp_1", ["stop"], Usage(1, 3)))
    assert [e["type"] for e in events] == [
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert events[0]["arguments"] == '{"a": 1}'
    message, call = events[-1]["response"]["output"]
    assert message["content"][0]["text"] == "Let me check. "
    assert call["type"] == "function_call" and call["name"] == "ping" and call["arguments"] == '{"a": 1}'
    assert call["call_id"].startswith("call_") and call["status"] == "completed"
    assert events[-1]["response"]["status"] == "completed"


def test_calls_go_out_whole_when_a_stop_may_cut_them() -> None:
    tools = [{"type": "function", "function": {"name": "ping"}}]
    r = ResponseRenderer("resp_1", ResponsesRequest(model=MODEL, input="hi"), ChunkRenderer(
        "chat.completions", "resp_1", MODEL, False, tools=tool_calling(tools, "auto", None), stream_calls=False))
    assert r.delta(TokenDelta("resp_1", 0, '<tool_call>[{"name": "ping", "arguments": {"a": 1}', [1])) == []
    events = r.delta(TokenDelta("resp_1", 0, "}]</tool_call>", [2])) + r.finished(Finished("resp_1", ["stop"],
                                                                                           Usage(1, 2)))
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert events[1]["delta"] == '{"a": 1}'


def test_a_call_cut_by_max_output_tokens_is_incomplete() -> None:
    tools = [{"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}}}}]
    r = renderer(ResponsesRequest(model=MODEL, input="hi"), tools, "required")
    events = r.delta(TokenDelta("resp_1", 0, '[{"name": "ping", "parameters": {"text": "long', [1],
                                finish_reason="length"))
    events += r.finished(Finished("resp_1", ["length"], Usage(1, 1)))
    [call] = events[-1]["response"]["output"]
    assert events[-1]["type"] == "response.incomplete"
    assert call["status"] == "incomplete" and call["arguments"] == '{"text": "long'


def test_every_token_keeps_its_logprob_even_without_text() -> None:
    """A token that is part of a character adds no text; its logprob still goes out."""
    r = ResponseRenderer("resp_1", ResponsesRequest(model=MODEL, input="hi", top_logprobs=0),
                         ChunkRenderer("chat.completions", "resp_1", MODEL, False), logprobs=True)
    events = r.delta(TokenDelta("resp_1", 0, "", [1], logprobs=[-0.1], tokens=["bytes:\\xf0"]))
    events += r.delta(TokenDelta("resp_1", 0, "\U0001f30d", [2], logprobs=[-0.2], tokens=["bytes:\\x8d"]))
    events += r.finished(Finished("resp_1", ["stop"], Usage(1, 2)))
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [d["delta"] for d in deltas] == ["", "\U0001f30d"]
    part = events[-1]["response"]["output"][0]["content"][0]
    assert [lp["logprob"] for lp in part["logprobs"]] == [-0.1, -0.2]


def test_the_end_of_turn_token_has_no_logprob_in_the_text() -> None:
    """A token the text leaves out (the special end-of-turn token) is not listed among the
    output_text's logprobs (chat lists it, as vLLM does): nor a delta of no text for it."""
    r = ResponseRenderer("resp_1", ResponsesRequest(model=MODEL, input="hi", top_logprobs=0),
                         ChunkRenderer("chat.completions", "resp_1", MODEL, False, lp_leave_out=frozenset({2})),
                         logprobs=True)
    events = r.delta(TokenDelta("resp_1", 0, "Paris.", [1], logprobs=[-0.1], tokens=["Paris."]))
    events += r.delta(TokenDelta("resp_1", 0, "", [2], logprobs=[-0.2], tokens=["<|im_end|>"], finish_reason="stop"))
    events += r.finished(Finished("resp_1", ["stop"], Usage(1, 2)))
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [d["delta"] for d in deltas] == ["Paris."]
    part = events[-1]["response"]["output"][0]["content"][0]
    assert [lp["logprob"] for lp in part["logprobs"]] == [-0.1]


def test_a_failure_ends_the_response_failed() -> None:
    r = renderer(ResponsesRequest(model=MODEL, input="hi"))
    r.delta(TokenDelta("resp_1", 0, "x", [1]))
    events = r.failed(Failed("resp_1", 500, "engine_error", "the engine failed"))
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "engine_error", "message": "the engine failed"}
    assert r.failure is not None
    # the message it cut off is incomplete, in its done event and in the failed response (as OpenAI's)
    [done] = [e for e in events if e["type"] == "response.output_item.done"]
    assert done["item"]["status"] == events[-1]["response"]["output"][0]["status"] == "incomplete"
    assert events[-1]["response"]["status"] == "failed"


def test_input_items_map_onto_the_chat_conversation() -> None:
    items = input_items([
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                                        {"type": "input_text", "text": "in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    ])
    assert [i["type"] for i in items] == ["message", "message", "message", "function_call", "function_call_output"]
    assert all(isinstance(i["id"], str) for i in items)
    chat = chat_request(ResponsesRequest(model=MODEL, instructions="You are a bot.", max_output_tokens=5), items)
    assert [(m.role, m.content) for m in chat.messages][:3] == [
        ("system", "You are a bot."), ("developer", "Be brief."), ("user", "Weather \nin Paris?")]  # parts joined as chat (and vLLM) joins them
    assistant, tool = chat.messages[3:]
    assert assistant.content == "Checking." and assistant.tool_calls[0]["function"]["name"] == "weather"
    assert tool.role == "tool" and tool.tool_call_id == "call_1" and tool.content == "18C"
    assert chat.max_completion_tokens == 5
    assert input_items("hi")[0]["content"] == [{"type": "input_text", "text": "hi"}]


def test_truncation_drops_the_fewest_items_from_the_start_never_parting_a_call_from_its_output() -> None:
    items = input_items([
        {"role": "user", "content": "a" * 10},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "b" * 10},
        {"role": "user", "content": "c" * 10},
        {"role": "user", "content": "d" * 10},
    ])

    def tokens(kept: list[dict]) -> int:  # a fixed overhead (instructions, template) and 10 per item
        return 7 + 10 * len(kept)

    assert clean_cuts(items) == [1, 3, 4]  # not between the call (1) and its output (2)
    assert truncated(items, tokens, 57) == 0  # everything fits
    assert truncated(items, tokens, 56) == 1  # the first item goes
    assert truncated(items, tokens, 37) == 3  # dropping the call takes its output too
    assert truncated(items, tokens, 17) == 4  # the last item alone
    assert truncated(items, tokens, 16) == 0  # nothing fits: nothing dropped (then refused as too long)
    # the answer's room a default (no max_output_tokens): the newest item alone when that
    # fits the window (a long history made a request that runs alone a 400); a conversation
    # that fits the window whole keeps every item; one whose last item does not fit, none
    assert truncated(items, tokens, 10, window_limit=40) == 4
    assert truncated(items, tokens, 10, window_limit=57) == 0
    assert truncated(items, tokens, 10, window_limit=16) == 0


def test_truncation_keeps_a_last_tool_output_with_its_call_or_drops_nothing() -> None:
    """The agent loop's turn: the tool's output, sent last, pushed the conversation over. It
    was dropped with every other item (its call was cut), and the model answered an empty
    conversation (or a 400 named chat's `messages`)."""
    items = input_items([
        {"role": "user", "content": "a" * 10},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "b" * 10},
        {"type": "function_call_output", "call_id": "c2", "output": "b" * 10},
    ])

    def tokens(kept: list[dict]) -> int:
        return 7 + 10 * len(kept)

    assert clean_cuts(items) == [1]  # both calls, then both outputs: one unit
    assert truncated(items, tokens, 47) == 1
    assert truncated(items, tokens, 46) == 0  # the unit alone does not fit: refused, not emptied


def test_truncation_leaves_the_answer_room() -> None:
    req = decode_request(b'{"model": "m", "input": "hi", "truncation": "auto"}')
    assert output_room(req, TenantContext(tenant_id="t"), 8192) == 2048  # a quarter of the window
    assert output_room(req, TenantContext(tenant_id="t", max_tokens_cap=300), 8192) == 300
    with_max = decode_request(b'{"model": "m", "input": "hi", "max_output_tokens": 40}')
    assert output_room(with_max, TenantContext(tenant_id="t"), 8192) == 40


@pytest.mark.parametrize(("item", "message"), [
    ({"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}, "text only"),
    ({"type": "item_reference", "id": "x"}, "not supported"),
    ({"role": "robot", "content": "x"}, "role must be"),
    ({"type": "function_call", "name": "f", "arguments": "{}"}, "call_id"),
    ("just a string", "must be an object"),
])
def test_bad_input_items_are_400s_naming_input(item: object, message: str) -> None:
    with pytest.raises(ApiError) as err:
        input_items([item])
    assert err.value.status == 400 and err.value.param == "input" and message in str(err.value)


# ---------------------------------------------------------------- served


async def test_create_retrieve_continue_and_delete(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        first = await client.post("/v1/responses", json={"model": MODEL, "input": "hello there",
                                                         "instructions": "Be kind.", "max_output_tokens": 2})
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["object"] == "response" and body["id"].startswith("resp_")
        assert body["status"] == "incomplete"  # the fake runtime always runs to max_tokens
        assert body["output"][0]["content"][0]["text"] == word(0, 0) + word(0, 1)
        assert body["usage"]["output_tokens"] == 2 and body["store"] is True
        call = gateway.runtime.calls[-1]
        assert [(m.role, m.content) for m in call.messages] == [("system", "Be kind."), ("user", "hello there")]
        assert call.params.max_tokens == 2 and call.request_id == body["id"]

        got = await client.get(f"/v1/responses/{body['id']}")
        assert got.status_code == 200 and got.json() == body
        # returned as stored: its turns and answer are not decoded and encoded again (a 1.7 MB
        # answer with logprobs held the event loop ~175 ms a GET)
        from cache import response_store

        decoder = response_store._decoder
        response_store._decoder = None  # (a whole decode would fail)
        try:
            again = await client.get(f"/v1/responses/{body['id']}")
        finally:
            response_store._decoder = decoder
        assert again.status_code == 200 and again.json() == body
        assert again.headers["content-type"] == "application/json"

        second = await client.post("/v1/responses", json={"model": MODEL, "input": "and again",
                                                          "previous_response_id": body["id"], "max_output_tokens": 1})
        assert second.status_code == 200, second.text
        assert second.json()["previous_response_id"] == body["id"]
        # the earlier turn, its answer and the new input; the instructions are not carried over
        assert [(m.role, m.content) for m in gateway.runtime.calls[-1].messages] == [
            ("user", "hello there"), ("assistant", word(0, 0) + word(0, 1)), ("user", "and again")]
        # a third turn reads the whole chain
        third = await client.post("/v1/responses", json={"model": MODEL, "input": "third",
                                                         "previous_response_id": second.json()["id"]})
        assert [m.content for m in gateway.runtime.calls[-1].messages][-2:] == [word(0, 0), "third"]
        assert third.status_code == 200

        items = await client.get(f"/v1/responses/{second.json()['id']}/input_items")
        assert [i["content"][0]["text"] for i in items.json()["data"]] == ["and again"]

        # the previous answer replayed beside previous_response_id: read twice, so a 400 (as OpenAI)
        replayed = await client.post("/v1/responses", json={
            "model": MODEL, "previous_response_id": body["id"], "input": [body["output"][0], "x"][:1]})
        assert replayed.status_code == 400 and replayed.json()["error"]["param"] == "input"
        assert "Duplicate item" in replayed.json()["error"]["message"]
        twice = await client.post("/v1/responses", json={"model": MODEL, "input": [
            {"id": "msg_1", "role": "user", "content": "a"}, {"id": "msg_1", "role": "user", "content": "b"}]})
        assert twice.status_code == 400 and twice.json()["error"]["param"] == "input"

        # pages both ways: `after` the cursor, or the page just `before` it
        many = await client.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 1, "input": [
            {"id": f"msg_{k}", "role": "user", "content": str(k)} for k in range(5)]})
        path = f"/v1/responses/{many.json()['id']}/input_items"
        page = (await client.get(path, params={"order": "asc", "limit": 2, "after": "msg_0"})).json()
        assert [i["id"] for i in page["data"]] == ["msg_1", "msg_2"] and page["has_more"]
        page = (await client.get(path, params={"order": "asc", "limit": 2, "before": "msg_3"})).json()
        assert [i["id"] for i in page["data"]] == ["msg_1", "msg_2"] and page["has_more"]
        page = (await client.get(path, params={"limit": 2, "before": "msg_3"})).json()  # desc: 4 comes before 3
        assert [i["id"] for i in page["data"]] == ["msg_4"] and not page["has_more"]
        bad = await client.get(path, params={"before": "msg_9"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "before"

        # creating a response needs a model (counting takes none: test_responses_serving)
        nameless = await client.post("/v1/responses", json={"input": "hello there"})
        assert nameless.status_code == 400 and nameless.json()["error"]["param"] == "model"

        gone = await client.delete(f"/v1/responses/{body['id']}")
        assert gone.json() == {"id": body["id"], "object": "response", "deleted": True}
        missing = await client.get(f"/v1/responses/{body['id']}")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        assert (await client.delete(f"/v1/responses/{body['id']}")).status_code == 404
        cont = await client.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                        "previous_response_id": body["id"]})
        assert cont.status_code == 404 and cont.json()["error"]["param"] == "previous_response_id"


async def test_responses_are_private_to_their_tenant_and_store_false_keeps_nothing(gateway: Gateway) -> None:
    await gateway.stores.tenants.create_tenant("t2", "tenant two")
    _, other_key = await gateway.stores.tenants.create_key("t2", "other")
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        mine = (await client.post("/v1/responses", json={"model": MODEL, "input": "secret",
                                                         "max_output_tokens": 1})).json()
        other = {"Authorization": f"Bearer {other_key}"}
        assert (await client.get(f"/v1/responses/{mine['id']}", headers=other)).status_code == 404
        assert (await client.delete(f"/v1/responses/{mine['id']}", headers=other)).status_code == 404
        cont = await client.post("/v1/responses", headers=other, json={
            "model": MODEL, "input": "x", "previous_response_id": mine["id"]})
        assert cont.status_code == 404
        assert (await client.get(f"/v1/responses/{mine['id']}")).status_code == 200  # still there for its owner
        # a tenant deleted and created again under the same id does not find the deleted one's
        await gateway.stores.tenants.create_tenant("t3", "three")
        _, third_key = await gateway.stores.tenants.create_key("t3", "k")
        third = {"Authorization": f"Bearer {third_key}"}
        old = (await client.post("/v1/responses", headers=third, json={"model": MODEL, "input": "secret",
                                                                         "max_output_tokens": 1})).json()
        await gateway.stores.tenants.delete_tenant("t3")
        await gateway.stores.tenants.create_tenant("t3", "three again")
        _, again_key = await gateway.stores.tenants.create_key("t3", "k")
        again = {"Authorization": f"Bearer {again_key}"}
        for path in (f"/v1/responses/{old['id']}", f"/v1/responses/{old['id']}/input_items"):
            assert (await client.get(path, headers=again)).status_code == 404
        unstored = (await client.post("/v1/responses", json={"model": MODEL, "input": "x", "store": False,
                                                             "max_output_tokens": 1})).json()
        assert unstored["store"] is False
        assert (await client.get(f"/v1/responses/{unstored['id']}")).status_code == 404


async def test_a_call_cut_by_max_output_tokens_is_not_owed_an_output(gateway: Gateway) -> None:
    """A response whose function call `max_output_tokens` cut off (arguments mid-way): the
    next turn is not refused for leaving it unanswered, and the model does not read it; a
    call that was cut but answered all the same stays."""
    tenant = await gateway.stores.tenants.get_tenant("t1")
    owner = owner_of(tenant.id, tenant.created_at)
    cut = {"id": "fc_1", "type": "function_call", "status": "incomplete", "call_id": "call_1", "name": "f",
           "arguments": '{"city": "Par'}
    question = {"id": "msg_0", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "weather?"}]}
    await ResponseStore(gateway.stores.redis).put(owner, StoredResponse(
        response={"id": "resp_cut", "object": "response", "status": "incomplete", "output": [cut]},
        context=[], input=[question]))
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "try again", "max_output_tokens": 1,
                                                     "previous_response_id": "resp_cut"})
        assert r.status_code == 200, r.text
        assert [m.content for m in gateway.runtime.calls[-1].messages] == ["weather?", "try again"]
        answered = await client.post("/v1/responses", json={
            "model": MODEL, "max_output_tokens": 1, "previous_response_id": "resp_cut",
            "input": [{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]})
        assert answered.status_code == 200, answered.text
        read = [(m.role, m.content) for m in gateway.runtime.calls[-1].messages]
        assert any("Par" in content for _, content in read) and any("sunny" in content for _, content in read), read


async def test_a_full_input_list_takes_outputs_anywhere_after_their_calls_and_drops_a_cut_call(
        gateway: Gateway) -> None:
    """The stateless pattern (store false, every item sent back): an output given after a
    later message is read right after its call (the chat path wants it there), and a call
    `max_output_tokens` cut, sent back with its `incomplete` status and no output, is dropped
    as when continued by `previous_response_id` (it was a 400: "No tool output found")."""
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    cut = {"type": "function_call", "call_id": "c2", "name": "f", "arguments": '{"city": "Par',
           "status": "incomplete"}
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 1, "store": False, "input": [
            {"role": "user", "content": "weather?"}, call, {"role": "user", "content": "and?"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]})
        assert r.status_code == 200, r.text
        read = [(m.role, m.content) for m in gateway.runtime.calls[-1].messages]
        assert [role for role, _ in read] == ["user", "assistant", "tool", "user"], read
        assert "sunny" in read[2][1] and read[3][1] == "and?"
        r = await client.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 1, "store": False, "input": [
            {"role": "user", "content": "weather?"}, cut, {"role": "user", "content": "try again"}]})
        assert r.status_code == 200, r.text
        assert [m.content for m in gateway.runtime.calls[-1].messages] == ["weather?", "try again"]


async def test_input_items_pages(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        body = (await client.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 1, "input": [
            {"role": "user", "content": f"m{i}"} for i in range(5)]})).json()
        url = f"/v1/responses/{body['id']}/input_items"
        page = (await client.get(url, params={"limit": 2})).json()
        assert [i["content"][0]["text"] for i in page["data"]] == ["m4", "m3"] and page["has_more"] is True
        rest = (await client.get(url, params={"limit": 10, "after": page["last_id"]})).json()
        assert [i["content"][0]["text"] for i in rest["data"]] == ["m2", "m1", "m0"] and rest["has_more"] is False
        asc = (await client.get(url, params={"order": "asc", "limit": 1})).json()
        assert asc["data"][0]["content"][0]["text"] == "m0"
        assert (await client.get(url, params={"limit": 0})).status_code == 400


async def test_a_running_response_deleted_is_gone_at_once_and_not_stored_at_its_end(gateway: Gateway) -> None:
    """DELETE of a stored response still streaming here was a 404 (not stored yet) that its
    end then undid, storing it; continuing it was a 404 too, not "still in progress"."""
    gateway.runtime.delay = 0.2
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers, timeout=30) as client:
        body = {"model": MODEL, "input": "slow one", "max_output_tokens": 5, "stream": True}
        async with client.stream("POST", "/v1/responses", json=body) as r:
            lines = r.aiter_lines()
            async for line in lines:
                if line.startswith("data:"):
                    rid = json.loads(line[5:])["response"]["id"]
                    break
            cont = await client.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                            "previous_response_id": rid})
            assert cont.status_code == 400 and "still" in cont.json()["error"]["message"], cont.text
            gone = await client.delete(f"/v1/responses/{rid}")
            assert gone.status_code == 200 and gone.json()["deleted"] is True, gone.text
            assert (await client.get(f"/v1/responses/{rid}")).status_code == 404
            rest = [line async for line in lines]
        assert any("response.incomplete" in line for line in rest)  # its client still read it to the end
        assert (await client.get(f"/v1/responses/{rid}")).status_code == 404  # and it was not stored


async def test_a_stream_the_runtime_cuts_ends_with_an_error_event(gateway: Gateway) -> None:
    """An error after the stream started ends it with an `error` event numbered after the
    last one (OpenAI's), not a connection cut mid-body."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "CUT here", "stream": True})
    assert r.status_code == 200
    events = [json.loads(e) for e in parse_events(r.text)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "error" and events[-1]["code"] == "internal_error"
    assert any(e["type"] == "response.output_text.delta" for e in events)


async def test_input_tokens_is_no_response_id(gateway: Gateway) -> None:
    """GET or DELETE /v1/responses/input_tokens is a 405 naming POST (as OpenAI's), not a 404;
    OPTIONS says POST alone."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        for method in ("GET", "DELETE"):
            r = await client.request(method, "/v1/responses/input_tokens")
            assert r.status_code == 405 and r.headers["Allow"] == "POST"
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = await client.put("/v1/responses")  # any route's 405 says what it allows
        assert r.status_code == 405 and "POST" in r.headers["Allow"]
        r = await client.options("/v1/responses/input_tokens")  # (not the methods of a response id)
        assert r.status_code == 200 and r.headers["Allow"] == "OPTIONS, POST", r.headers
        r = await client.options("/v1/responses/input_tokens", headers={
            "Origin": "https://page.example", "Access-Control-Request-Method": "POST"})
        assert r.headers["Access-Control-Allow-Origin"] == "*" and "POST" in r.headers["Access-Control-Allow-Methods"]


async def test_stream_events_are_named_and_end_with_the_response(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 3,
                                                     "stream": True, "top_logprobs": 1})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    names = [line[len("event: "):] for line in r.text.split("\n") if line.startswith("event: ")]
    events = [json.loads(p) for p in parse_events(r.text)]
    assert names == [e["type"] for e in events] and "[DONE]" not in r.text
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(e["delta"] for e in deltas) == word(0, 0) + word(0, 1) + word(0, 2)
    assert deltas[0]["logprobs"][0]["logprob"] == -0.5 and deltas[0]["logprobs"][0]["top_logprobs"][0]["token"] == "zeta"
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete" and final["usage"]["output_tokens"] == 3
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        stored = (await client.get(f"/v1/responses/{final['id']}")).json()
    assert stored == final  # stored before the last event went out


async def test_a_failure_mid_stream_is_a_failed_response_and_a_500_without_stream(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "FAIL", "stream": True})
        events = [json.loads(p) for p in parse_events(r.text)]
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["error"]["code"] == "engine_error"
        whole = await client.post("/v1/responses", json={"model": MODEL, "input": "FAIL"})
        assert whole.status_code == 500 and whole.json()["error"]["code"] == "engine_error"
        assert (await client.get(f"/v1/responses/{events[-1]['response']['id']}")).status_code == 404


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "background": True, "store": False}, "background"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "file_search"}},
     "tool_choice"),
    ({"input": "x", "include": ["file_search_call.results"]}, "include"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": "x"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]}, "input"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "1"}]}, "input"),
    ({"input": [{"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}]}, "input"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": None}]}, "input"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "bad name!", "schema": {}}}}, "text"),
    ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": "always"}, "tool_choice"),
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "1"}]}, "input"),
])
async def test_bad_requests_are_400s_naming_the_field(gateway: Gateway, body: dict, param: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not gateway.runtime.calls  # nothing ran


async def test_messages_name_the_responses_fields(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/responses", json={"model": MODEL, "input": [
            {"type": "function_call", "call_id": "c9", "name": "f", "arguments": "{}"}]})
        assert r.json()["error"]["message"] == "No tool output found for function call c9."
        r = await client.post("/v1/responses", json={"model": MODEL, "input": [
            {"type": "function_call_output", "call_id": "c7", "output": "1"}]})
        assert r.json()["error"]["message"] == "No tool call found for function call output with call_id c7."
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "tool_choice": "always",
                                                     "tools": [{"type": "function", "name": "f"}]})
        assert '"name": ...}' in r.json()["error"]["message"] and '"function": {' not in r.json()["error"]["message"]
        r = await client.post("/v1/responses", json={"model": MODEL, "input": [
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": 3}]})
        assert "input[1].output must be" in r.json()["error"]["message"]
        for body, said in (({"tool_choice": {"type": "function", "name": "x"}},
                            'tool_choice {"type": "function", "name": "x"} needs tools'),
                           ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name must be"),
                           ({"max_output_tokens": 0}, "max_output_tokens must be >= 1"),
                           ({"max_output_tokens": -1}, "'max_output_tokens'")):
            r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", **body})
            assert r.status_code == 400 and said in r.json()["error"]["message"], (body, r.text)
            assert "function" not in r.json()["error"]["message"].replace('"type": "function"', "")
            assert "max_tokens" not in r.json()["error"]["message"]
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 1,
                                                     "safety_identifier": "u-1", "text": {"verbosity": "low"}})
        assert r.json()["safety_identifier"] == "u-1" and r.json()["text"]["verbosity"] == "low"
        assert gateway.runtime.calls[-1].user == "u-1"


async def test_unknown_model_and_key(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        r = await client.post("/v1/responses/input_tokens", headers=gateway.headers, json={"model": MODEL, "input": "x"})
        assert r.status_code == 501  # the fake runtime has no tokenizer (counted with the real one: slow tests)
        assert (await client.post("/v1/responses", json={"model": MODEL, "input": "x"})).status_code == 401
        assert (await client.get("/v1/responses/resp_x")).status_code == 401
        r = await client.post("/v1/responses", headers=gateway.headers, json={"model": "gpt-9", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"


async def test_the_sdk_creates_streams_and_continues(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0)

    def run() -> tuple[object, object, list[str], object, object]:
        first = client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
        with client.responses.stream(model=MODEL, input="more", previous_response_id=first.id,
                                     max_output_tokens=3) as stream:
            events = list(stream)
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert events[-1].type == "response.incomplete"  # (as OpenAI's: `get_final_response` wants a completed one)
        final = events[-1].response
        got = client.responses.retrieve(final.id)
        items = client.responses.input_items.list(final.id)
        return first, final, deltas, got, items

    first, final, deltas, got, items = await trio.to_thread.run_sync(run)
    assert first.output_text == word(0, 0) + word(0, 1)  # type: ignore[attr-defined]
    assert "".join(deltas) == final.output_text == word(0, 0) + word(0, 1) + word(0, 2)  # type: ignore[attr-defined]
    assert final.status == "incomplete" and got.id == final.id  # type: ignore[attr-defined]
    assert [i.content[0].text for i in items.data] == ["more"]  # type: ignore[attr-defined]


async def test_nulls_mean_the_defaults(gateway: Gateway) -> None:
    """What SDKs and agent frameworks send for fields they leave unset."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/responses", json={
            "model": MODEL, "input": "x", "max_output_tokens": 1, "store": None, "stream": None, "instructions": None,
            "tools": [], "include": [], "reasoning": None, "parallel_tool_calls": None, "tool_choice": None,
            "text": None, "truncation": None, "metadata": None, "previous_response_id": None})
        assert r.status_code == 200, r.text
        assert r.json()["store"] is True and r.json()["tool_choice"] == "auto"
        assert (await client.get(f"/v1/responses/{r.json()['id']}")).status_code == 200


async def test_with_redis_down_answers_go_out_and_reads_are_503s(gateway: Gateway, redis_server: PrivateRedis) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        kept = (await client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 1})).json()
        redis_server.stop()
        try:
            r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 1})
            assert r.status_code == 200  # (quotas fail open by default) not stored, still answered
            for read in (client.get(f"/v1/responses/{kept['id']}"),
                         client.post("/v1/responses", json={"model": MODEL, "input": "y",
                                                            "previous_response_id": kept["id"]})):
                r = await read
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "store_unavailable"
        finally:
            await trio.to_thread.run_sync(redis_server.start)


async def test_store_false_keeps_the_conversation_out_of_the_caches(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        for store in (False, True):
            r = await client.post("/v1/responses", json={"model": MODEL, "input": "private note", "store": store,
                                                         "max_output_tokens": 1})
            assert r.status_code == 200, r.text
    assert [c.cache_store for c in gateway.runtime.calls] == [False, True]


def test_errors_of_the_chat_path_name_the_responses_fields() -> None:
    from gateway.errors import ApiError
    from gateway.routes_responses import own_params

    for chat_error, param, message in [
        (ApiError(400, "max_completion_tokens 100 exceeds this key's limit of 4", param="max_completion_tokens"),
         "max_output_tokens", "max_output_tokens 100 exceeds this key's limit of 4"),
        (ApiError(400, "response_format: the JSON schema does not compile", param="response_format"),
         "text", "text.format: the JSON schema does not compile"),
        (ApiError(400, "temperature must be >= 0", param="temperature"), "temperature", "temperature must be >= 0"),
    ]:
        with pytest.raises(ApiError) as raised, own_params():
            raise chat_error
        assert (raised.value.param, raised.value.message) == (param, message)


async def test_pings_fill_a_responses_streams_silences_and_the_sdk_reads_past_them(
        gateway: Gateway, nursery: trio.Nursery) -> None:
    config = dataclasses.replace(gateway.config, sse_ping_seconds=0.1)
    url, runtime, stop = await start_gateway(nursery, gateway.stores, config)
    runtime.delay = 0.25
    async with httpx.AsyncClient(base_url=url, headers=gateway.headers, timeout=30) as client:
        body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, "stream": True}
        async with client.stream("POST", "/v1/responses", json=body) as r:
            lines = [line async for line in r.aiter_lines() if line]
    assert lines.count(": ping") >= 2 and "response.incomplete" in lines[-1]
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=gateway.api_key, max_retries=0)

    def run() -> list[object]:
        with sdk.responses.stream(model=MODEL, input="more", max_output_tokens=3) as stream:
            return list(stream)

    events = await trio.to_thread.run_sync(run)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (  # type: ignore[attr-defined]
        word(0, 0) + word(0, 1) + word(0, 2))
    stop.set()
