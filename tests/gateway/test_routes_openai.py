"""OpenAI routes over real sockets: JSON, SSE chunk format, include_usage, mapping to
GenerateCall, error mapping for bad input, and disconnect → cancel."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import zlib

import httpx
import pytest
import trio
from httpx_ws import aconnect_ws

from actors.messages import Finished, Rejected, TenantContext, TokenDelta, Usage
from gateway.app import _FEED_BYTES, decoded_body
from gateway.errors import ApiError
from gateway.routes_openai import (
    CacheDirectives,
    ChatMessageIn,
    ChatRequest,
    ChunkRenderer,
    Collector,
    CompletionRequest,
    decode_request,
    sampling_params,
    to_generate_calls,
)
from gateway.sse import parse_events
from gateway.tools import tool_calling
from tests.gateway.conftest import MODEL, Gateway, start_gateway, word

# ---------------------------------------------------------------- pure mapping


def test_a_stream_ends_each_choice_as_it_ends() -> None:
    """n > 1: the finish chunk of a choice follows its last delta; the request's end then
    closes only the choices still open, and usage comes last."""
    renderer = ChunkRenderer("completions", "r", MODEL, include_usage=True, n=2)
    assert renderer.choice_end(TokenDelta("r", 1, "a", [1])) == []  # not its last
    assert renderer.delta(TokenDelta("r", 1, "b", [2], finish_reason="stop"))["choices"][0]["text"] == "b"
    [end] = renderer.choice_end(TokenDelta("r", 1, "b", [2], finish_reason="stop"))
    assert end["choices"] == [{"index": 1, "text": "", "logprobs": None, "finish_reason": "stop"}]
    renderer.delta(TokenDelta("r", 0, "c", [3]))
    last, usage = renderer.finished(Finished("r", ["length", "stop"], Usage(2, 3)))
    assert [c["index"] for c in last["choices"]] == [0] and last["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    # chat, n > 1: every choice starts in one chunk, in index order, before any ends
    chat = ChunkRenderer("chat.completions", "c", MODEL, include_usage=False, n=2, echo=["Pre"])
    opening = chat.opening()
    assert [c["delta"] for c in opening["choices"]] == [{"role": "assistant", "content": "Pre"}] * 2
    assert chat.opening() is None
    assert chat.delta(TokenDelta("c", 1, "x", [1], finish_reason="stop"))["choices"][0]["delta"] == {"content": "x"}
    assert ChunkRenderer("chat.completions", "d", MODEL, include_usage=False).opening() is None  # n == 1: not needed
    # with tools, content opens null (a choice that calls has none; the SDK kept a "" as its content)
    from gateway.tools import tool_calling

    tools = tool_calling([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                         "required", None)
    calling = ChunkRenderer("chat.completions", "t", MODEL, include_usage=False, n=2, tools=tools)
    assert [c["delta"] for c in calling.opening()["choices"]] == [{"role": "assistant", "content": None}] * 2
    # every choice ended at its delta: the end is usage alone
    renderer = ChunkRenderer("completions", "s", MODEL, include_usage=True)
    renderer.delta(TokenDelta("s", 0, "x", [1], finish_reason="stop"))
    assert len(renderer.choice_end(TokenDelta("s", 0, "x", [1], finish_reason="stop"))) == 1
    [usage] = renderer.finished(Finished("s", ["stop"], Usage(1, 1)))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 2


def test_a_delta_adding_no_text_sends_no_chunk_unless_it_starts_its_choice() -> None:
    """The end-of-sequence token (and a piece of a character) adds no text: its delta went
    out as an empty content chunk before the finish chunk, which OpenAI never sends. A
    choice's first delta still starts it (the role), and one with logprobs still carries them."""
    for endpoint in ("chat.completions", "completions"):
        r = ChunkRenderer(endpoint, "r", MODEL, include_usage=False)
        assert r.delta(TokenDelta("r", 0, "", [1])) is not None  # starts the choice
        assert r.delta(TokenDelta("r", 0, "Hi", [2])) is not None
        assert r.delta(TokenDelta("r", 0, "", [0], finish_reason="stop")) is None
        [end] = r.choice_end(TokenDelta("r", 0, "", [0], finish_reason="stop"))
        assert end["choices"][0]["finish_reason"] == "stop"
    chat = ChunkRenderer("chat.completions", "c", MODEL, include_usage=False)
    chat.delta(TokenDelta("c", 0, "Hi", [2], [-0.1], tokens=["Hi"]))
    chunk = chat.delta(TokenDelta("c", 0, "", [0], [-0.2], tokens=["<|im_end|>"]))
    assert chunk["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.2


def test_text_offset_counts_each_token_where_it_starts_in_the_text() -> None:
    """Legacy logprobs' `text_offset` is where each token starts in the choice's text, from
    the tokens themselves: not from how the text went out (a stop string's possible start
    held back and sent with a later token; beam search's one delta), with a character of
    several tokens starting where it does, a special token (which the text skips) of no
    length, and the echoed prompt before it all. Streamed and not alike."""
    lp = [-0.1]
    deltas = [  # " Paris" "." "\n" "\n" with stop ". " held: "." goes out with "\n"
        TokenDelta("r", 0, " Paris", [1], lp, tokens=[" Paris"]),
        TokenDelta("r", 0, "", [2], lp, tokens=["."]),
        TokenDelta("r", 0, ".\n", [3], lp, tokens=["\n"]),
        TokenDelta("r", 0, "", [9], lp, tokens=["<|im_end|>"]),  # special: skipped in the text
        # one character of three tokens, then a word, in one delta (as beam search sends it)
        TokenDelta("r", 0, "🎉 ok", [4, 5, 6, 7], lp * 4,
                   tokens=["bytes:\\xf0\\x9f", "bytes:\\x8e", "bytes:\\x89", " ok"]),
    ]
    want = [0, 6, 7, 8, 8, 8, 8, 9]
    collector = Collector("completions", "r", MODEL, n=1, special_ids=frozenset({9}))
    renderer = ChunkRenderer("completions", "r", MODEL, include_usage=False, special_ids=frozenset({9}))
    streamed = []
    for d in deltas:
        collector.add(d)
        streamed += renderer.delta(d)["choices"][0]["logprobs"]["text_offset"]
    body = collector.response(Finished("r", ["length"], Usage(3, 8)))
    assert body["choices"][0]["text"] == " Paris.\n🎉 ok"
    assert body["choices"][0]["logprobs"]["text_offset"] == want == streamed
    # an echoed prompt comes first
    echoed = Collector("completions", "e", MODEL, n=1, echo=["Say:"])
    echoed.add(deltas[0])
    echoed.add(deltas[1])
    assert echoed.response(Finished("e", ["length"], Usage(2, 2)))["choices"][0]["logprobs"]["text_offset"] == [4, 10]


def test_a_stop_inside_an_auto_call_drops_the_call() -> None:
    """tool_choice "auto" takes stop strings (its text may end anywhere); a stop that ends
    the choice inside a call drops the unfinished call, whole and streamed alike."""
    calling = tool_calling([{"type": "function", "function": {"name": "ping"}}], "auto", None)
    assert calling is not None and calling.guided().stoppable
    sampling_params(ChatRequest(model=MODEL, messages=[], stop=["x"], tools=[
        {"type": "function", "function": {"name": "ping"}}]))  # no 400
    deltas = [TokenDelta("r", 0, "Sure. ", [1]), TokenDelta("r", 0, '<tool_call>[{"name": "pi', [2])]
    finished = Finished("r", ["stop"], Usage(3, 2))
    collector = Collector("chat.completions", "r", MODEL, n=1, tools=calling)
    for d in deltas:
        collector.add(d)
    [whole] = collector.response(finished)["choices"]
    assert whole["message"] == {"role": "assistant", "content": "Sure. "} and whole["finish_reason"] == "stop"
    renderer = ChunkRenderer("chat.completions", "r", MODEL, include_usage=False, tools=calling)
    chunks = [c for d in deltas if (c := renderer.delta(d)) is not None] + renderer.finished(finished)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Sure. " and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    # cut by max_tokens instead, before the call's name: the text before the markup
    assert calling.content_of('a <tool_call>[{"na', "length") == 'a '


def test_auto_tool_calls_stream_text_at_once_and_calls_whole() -> None:
    """tool_choice "auto": text goes out as it comes except what may be the start of the
    marker; a call not streamed in pieces (`call_chunks`, next test) goes out whole as the
    choice ends; streamed and whole answers agree."""
    calling = tool_calling([{"type": "function", "function": {"name": "ping"}}], "auto", None)
    pieces = ["Let me", " check. <", "tool_", 'call>[{"name": "ping", ', '"arguments": {}}]</tool_call>']
    deltas = [TokenDelta("r", 0, text, [k]) for k, text in enumerate(pieces)]
    finished = Finished("r", ["stop"], Usage(3, 5))
    renderer = ChunkRenderer("chat.completions", "r", MODEL, include_usage=False, tools=calling)
    chunks = [renderer.delta(d) for d in deltas]
    assert [c["choices"][0]["delta"] if c else None for c in chunks] == [
        {"role": "assistant", "content": "Let me"}, {"content": " check. "}, None, None, None]
    calls, last = renderer.finished(finished)  # the calls, then the finish in a chunk of its own (as OpenAI)
    [choice] = calls["choices"]
    assert choice["finish_reason"] is None and choice["delta"]["content"] is None
    [call] = choice["delta"]["tool_calls"]
    assert call["index"] == 0 and call["function"] == {"name": "ping", "arguments": "{}"}
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]
    collector = Collector("chat.completions", "r", MODEL, n=1, tools=calling)
    for d in deltas:
        collector.add(d)
    [whole] = collector.response(finished)["choices"]
    assert whole["message"]["content"] == "Let me check. " and whole["finish_reason"] == "tool_calls"
    # blank text before a call is held (content None, as the whole answer says)
    renderer = ChunkRenderer("chat.completions", "w", MODEL, include_usage=False, tools=calling)
    assert renderer.delta(TokenDelta("w", 0, "\n", [1])) is None
    assert renderer.delta(TokenDelta("w", 0, '<tool_call>[{"name": "ping", "arguments": {}}]</tool_call>', [2])) is None
    calls, _ = renderer.finished(finished)
    assert calls["choices"][0]["delta"]["content"] is None and calls["choices"][0]["delta"]["role"] == "assistant"
    renderer = ChunkRenderer("chat.completions", "w", MODEL, include_usage=False, tools=calling)
    assert renderer.delta(TokenDelta("w", 0, "\n", [1])) is None
    assert renderer.delta(TokenDelta("w", 0, "Hi", [2]))["choices"][0]["delta"]["content"] == "\nHi"
    # a "<" that starts no marker is let go with the next text; text cut short ends as text
    renderer = ChunkRenderer("chat.completions", "s", MODEL, include_usage=False, tools=calling)
    assert renderer.delta(TokenDelta("s", 0, "x <", [1]))["choices"][0]["delta"]["content"] == "x "
    assert renderer.delta(TokenDelta("s", 0, " y", [2]))["choices"][0]["delta"]["content"] == "< y"
    assert renderer.delta(TokenDelta("s", 0, " <tool_call>[", [3])) is not None  # " " before the marker
    [end] = renderer.finished(Finished("s", ["length"], Usage(3, 3)))  # the call's markup is no answer
    assert end["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def stream_chunks(renderer: ChunkRenderer, deltas: list[TokenDelta], finished: Finished) -> list[dict]:
    """The chunks of a stream, in the order `SseBody` sends them."""
    chunks: list[dict] = []
    for d in deltas:
        chunk = renderer.delta(d)
        chunks += ([chunk] if chunk is not None else []) + renderer.call_chunks(d.index) + renderer.choice_end(d)
    return chunks + renderer.finished(finished)


def accumulate(chunks: list[dict]) -> tuple[str, list[dict], str | None]:
    """Content, tool calls and finish reason of choice 0, joined as the openai SDK joins them."""
    content, calls, finish = "", {}, None
    for c in chunks:
        for choice in c["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(piece["index"], {"id": None, "name": None, "arguments": ""})
                if "id" in piece:
                    assert call["id"] is None, "a call's id and name come once, in its first piece"
                    call["id"], call["name"] = piece["id"], piece["function"]["name"]
                else:
                    assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                call["arguments"] += piece["function"]["arguments"]
            finish = choice["finish_reason"] or finish
    return content, [calls[k] for k in sorted(calls)], finish


ARGS_TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
              for n in ("search", "note")]


def test_tool_calls_stream_in_pieces_as_written() -> None:
    """A call goes out as it is written: its id and name once the name is whole, then its
    arguments in pieces (OpenAI's stream); joined, the pieces are the whole answer's
    arguments, wherever the tokens split the text (strings holding quotes and braces)."""
    calling = tool_calling(ARGS_TOOLS, "required", None)
    text = ('[{"name": "search", "parameters": {"q": "a \\"quoted\\" } {brace", "n": [1, {"x": []}]}}, '
            '{"name": "note", "parameters": {}}]')
    finished = Finished("r", ["stop"], Usage(3, 9))
    collector = Collector("chat.completions", "r", MODEL, n=1, tools=calling)
    collector.add(TokenDelta("r", 0, text, [1]))
    whole = collector.response(finished)["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["arguments"] for c in whole] == [
        '{"q": "a \\"quoted\\" } {brace", "n": [1, {"x": []}]}', "{}"]
    for size in (1, 2, 3, 5, 8, 13, len(text)):
        deltas = [TokenDelta("r", 0, text[k:k + size], [k]) for k in range(0, len(text), size)]
        renderer = ChunkRenderer("chat.completions", "r", MODEL, include_usage=False, tools=calling)
        chunks = stream_chunks(renderer, deltas, finished)
        content, calls, finish = accumulate(chunks)
        assert content == "" and finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (w["function"]["name"], w["function"]["arguments"]) for w in whole]
        assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
        assert chunks[-1]["choices"][0]["delta"] == {}  # the finish in a chunk of its own
        if size == 1:  # each character of the arguments went out as it came
            assert sum(1 for c in chunks for ch in c["choices"] for _ in ch["delta"].get("tool_calls") or []) > 40
    # the first piece: role, null content, id, type and name, before any argument
    renderer = ChunkRenderer("chat.completions", "r", MODEL, include_usage=False, tools=calling)
    assert renderer.delta(TokenDelta("r", 0, '[{"name": "sea', [1])) is None
    assert renderer.call_chunks(0) == []  # the name is not whole yet
    renderer.delta(TokenDelta("r", 0, 'rch", "parameters": {"q', [2]))
    [chunk] = renderer.call_chunks(0)
    delta = chunk["choices"][0]["delta"]
    assert delta["role"] == "assistant" and delta["content"] is None
    [piece] = delta["tool_calls"]
    assert piece["type"] == "function" and piece["function"] == {"name": "search", "arguments": '{"q'}


def test_streamed_calls_of_a_named_function_and_of_auto_mode() -> None:
    named = tool_calling(ARGS_TOOLS, {"type": "function", "function": {"name": "note"}}, None)
    deltas = [TokenDelta("r", 0, t, [k], logprobs=[-0.5], tokens=[t]) for k, t in enumerate(['{"a"', ": ", '1}'])]
    renderer = ChunkRenderer("chat.completions", "r", MODEL, include_usage=False, tools=named)
    chunks = stream_chunks(renderer, deltas, Finished("r", ["stop"], Usage(3, 3)))
    assert accumulate(chunks)[1:] == ([{"id": accumulate(chunks)[1][0]["id"], "name": "note",
                                        "arguments": '{"a": 1}'}], "stop")
    # each piece carries the logprobs of its tokens
    assert [len((c["choices"][0]["logprobs"] or {}).get("content") or []) for c in chunks[:3]] == [1, 1, 1]
    # auto: text as content, then the call's pieces
    auto = tool_calling(ARGS_TOOLS, "auto", None)
    pieces = ["Let me look. ", '<tool_call>[{"name": "search", "argu', 'ments": {"q": "x"}}]</tool_call>']
    renderer = ChunkRenderer("chat.completions", "r", MODEL, include_usage=False, tools=auto)
    chunks = stream_chunks(renderer, [TokenDelta("r", 0, t, [k]) for k, t in enumerate(pieces)],
                           Finished("r", ["stop"], Usage(3, 3)))
    content, calls, finish = accumulate(chunks)
    assert (content, [(c["name"], c["arguments"]) for c in calls], finish) == (
        "Let me look. ", [("search", '{"q": "x"}')], "tool_calls")


def test_a_streamed_call_cut_by_max_tokens_ends_with_length() -> None:
    """What was written of a call has gone out; the choice ends "length" (as OpenAI's), and
    its text is not sent again as content. A whole answer keeps the text as content."""
    named = tool_calling(ARGS_TOOLS, {"type": "function", "function": {"name": "note"}}, None)
    renderer = ChunkRenderer("chat.completions", "r", MODEL, include_usage=False, tools=named)
    chunks = stream_chunks(renderer, [TokenDelta("r", 0, '{"a": "lo', [1]), TokenDelta("r", 0, "ng", [2],
                                                                                         finish_reason="length")],
                           Finished("r", ["length"], Usage(3, 2)))
    content, calls, finish = accumulate(chunks)
    assert (content, [c["arguments"] for c in calls], finish) == ("", ['{"a": "long'], "length")


@pytest.mark.parametrize(("choice", "stop"), [("required", None), ("auto", None), ("auto", ["zz"])])
def test_calls_cut_by_max_tokens_come_back_as_written_whole_and_streamed(choice: str, stop: list | None) -> None:
    """max_tokens inside the second of two calls: the answer has both, the second with its
    arguments as far as written, and ends "length", as OpenAI's (the whole answer gave the
    calls' raw JSON as `content`, with no tool_calls, and dropped the first, complete call;
    a stream sent them as calls). Auto mode with a stop string holds calls whole while
    streaming: they go out at the end the same way."""
    calling = tool_calling(ARGS_TOOLS, choice, None)
    key = calling.args_key
    head = "Let me look. <tool_call>" if choice == "auto" else ""
    pieces = [head + f'[{{"name": "search", "{key}": {{"q": "a"}}}}, ', f'{{"name": "note", "{key}": {{"t": "lo']
    deltas = [TokenDelta("r", 0, t, [k], finish_reason="length" if k == len(pieces) - 1 else None)
              for k, t in enumerate(pieces)]
    finished = Finished("r", ["length"], Usage(3, 2))
    collector = Collector("chat.completions", "r", MODEL, n=1, tools=calling)
    for d in deltas:
        collector.add(d)
    [whole] = collector.response(finished)["choices"]
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]]
    assert got == [("search", '{"q": "a"}'), ("note", '{"t": "lo')] and whole["finish_reason"] == "length"
    assert whole["message"]["content"] == ("Let me look. " if choice == "auto" else None)
    renderer = ChunkRenderer("chat.completions", "r", MODEL, include_usage=False, tools=calling,
                             stream_calls=stop is None)
    content, calls, finish = accumulate(stream_chunks(renderer, deltas, finished))
    assert [(c["name"], c["arguments"]) for c in calls] == got and finish == "length"
    assert content.strip() == ("Let me look." if choice == "auto" else "")


@pytest.mark.parametrize(("fields", "app_tag", "param"), [
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, None, "metadata"),  # OpenAI's 16 pairs
    ({"metadata": {"k": "v" * 513}}, None, "metadata"),
    ({"metadata": {"app": "a" * 129}}, None, "metadata"),
    ({}, "a" * 129, "metadata"),  # X-Lmgate-App
    ({"user": "u" * 257}, None, "user"),
])
def test_labels_of_a_request_are_bounded(fields, app_tag, param) -> None:
    req = ChatRequest(model=MODEL, messages=[ChatMessageIn("user", "hi")], **fields)
    with pytest.raises(ApiError) as e:
        to_generate_calls(req, TenantContext("t"), "r", app_tag=app_tag)
    assert (e.value.status, e.value.param) == (400, param)
    ok = ChatRequest(model=MODEL, messages=[ChatMessageIn("user", "hi")], user="u" * 256,
                     metadata={"app": "a" * 128})
    [call] = to_generate_calls(ok, TenantContext("t"), "r")
    assert call.app == "a" * 128 and call.user == "u" * 256


def test_decode_wrong_type_names_the_field() -> None:
    with pytest.raises(ApiError) as info:
        decode_request("completions", b'{"model": "m", "prompt": "x", "max_tokens": "ten"}')
    assert info.value.status == 400
    assert info.value.param == "max_tokens"


def test_sampling_params_chat_logprobs_and_max_completion_tokens() -> None:
    req = decode_request(
        "chat.completions",
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":3,'
        b'"max_tokens":5,"max_completion_tokens":7,"stop":"\\n","top_k":4,"min_p":0.1}',
    )
    assert isinstance(req, ChatRequest)
    params = sampling_params(req)
    assert (params.logprobs, params.max_tokens, params.stop, params.top_k, params.min_p) == (3, 7, ("\n",), 4, 0.1)


def test_sampling_params_out_of_range_is_400_naming_the_field() -> None:
    req = decode_request("completions", b'{"model":"m","prompt":"x","temperature":-1}')
    assert isinstance(req, CompletionRequest)
    with pytest.raises(ApiError) as info:
        sampling_params(req)
    assert (info.value.status, info.value.param) == (400, "temperature")


def test_chat_content_parts_are_joined() -> None:
    req = decode_request(
        "chat.completions",
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}',
    )
    assert isinstance(req, ChatRequest)
    assert req.messages[0].text() == "a\nb"  # as vLLM joins them


@pytest.mark.parametrize(("header", "lookup", "store"), [
    (None, True, True),
    ("", True, True),
    ("no-cache", False, True),
    ("No-Store", True, False),
    ("no-cache, no-store", False, False),
    ("max-age=0", False, True),
    ('max-age="0" , private', False, True),
    ("max-age=00", False, True),  # RFC 9111: a delta-seconds of 0, written as it may be
    ("max-age=-0, max-age=0x0, max-age=\u0660", True, True),  # not delta-seconds (nor an Arabic-Indic zero)
    ("no-transform, max-stale=5, private", True, True),  # what the cache does not implement is ignored
    ("no-cache-please, ,=,no-storage", True, True),  # only whole directive names count
])
def test_cache_control_directives(header: str | None, lookup: bool, store: bool) -> None:
    assert CacheDirectives.parse(header) == CacheDirectives(lookup, store)


@pytest.mark.parametrize(("header", "max_age", "min_fresh", "only"), [
    ("max-age=60", 60, None, False),
    ("max-age=60, max-age=30", 30, None, False),  # the stricter of two
    ('min-fresh="120", min-fresh=5', None, 120, False),
    ("ONLY-IF-CACHED, max-age=10, min-fresh=1", 10, 1, True),
    ("max-age=ten, min-fresh=-1", None, None, False),
])
def test_cache_control_freshness_directives(header: str, max_age: int | None, min_fresh: int | None,
                                            only: bool) -> None:
    d = CacheDirectives.parse(header)
    assert (d.lookup, d.store, d.max_age_s, d.min_fresh_s, d.only_if_cached) == (True, True, max_age, min_fresh, only)


# ---------------------------------------------------------------- HTTP

# ---------------------------------------------------------------- HTTP


def chat_body(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], **extra}


async def test_completion_json(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "one two three", "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"] == [
        {"index": 0, "text": word(0, 0) + word(0, 1) + word(0, 2), "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 0}}
    call = gateway.runtime.calls[-1]
    assert call.prompt == "one two three"
    assert call.tenant.tenant_id == "t1"
    assert call.params.max_tokens == 3
    assert not call.max_tokens_default


async def test_completions_without_max_tokens_take_openai_s_default_as_a_default(gateway: Gateway) -> None:
    """16, marked as the endpoint's (a key's max_tokens_cap lowers it rather than refusing a
    number the client never sent); an explicit null is the context's room, as in chat."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "one"})
        assert r.status_code == 200, r.text
        call = gateway.runtime.calls[-1]
        assert (call.params.max_tokens, call.max_tokens_default) == (16, True)
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "one", "max_tokens": None})
        assert r.status_code == 200, r.text
        call = gateway.runtime.calls[-1]
        assert (call.params.max_tokens, call.max_tokens_default) == (None, False)


async def test_completion_token_prompt_and_extensions(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, "seed": 7, "top_k": 5,
                  "repetition_penalty": 1.1, "min_tokens": 1, "ignore_eos": True, "priority": 2,
                  "user": "u1", "logprobs": 2, "stop_token_ids": [13, 30], "logit_bias": {"30": -100, "7": 2.5},
                  "include_stop_str_in_output": True, "skip_special_tokens": False},
            headers={"X-Lmgate-App": "translate"},
        )
    assert r.status_code == 200, r.text
    call = gateway.runtime.calls[-1]
    assert call.prompt_token_ids == [1, 2, 3] and call.prompt is None
    p = call.params
    assert (p.seed, p.top_k, p.repetition_penalty, p.min_tokens, p.ignore_eos, p.logprobs) == (7, 5, 1.1, 1, True, 2)
    assert p.stop_token_ids == (13, 30) and p.logit_bias == ((7, 2.5), (30, -100.0))
    assert (p.include_stop_str_in_output, p.skip_special_tokens) == (True, False)  # vLLM's, once dropped
    assert (call.priority, call.user, call.app) == (2, "u1", "translate")
    assert (call.cache_lookup, call.cache_store) == (True, True)
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-0.5, -0.5]
    # best first as sent (the JSON provider used to sort the keys), and where each token starts
    assert [list(row) for row in lp["top_logprobs"]] == [["zeta", "alpha"]] * 2
    assert lp["text_offset"] == [0, len(word(0, 0))]


async def test_cache_control_header_reaches_the_call(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1),
                              headers=[("Cache-Control", "no-cache"), ("Cache-Control", "no-store")])
        assert r.status_code == 200, r.text
        assert (gateway.runtime.calls[-1].cache_lookup, gateway.runtime.calls[-1].cache_store) == (False, False)
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1, "stream": True},
                              headers={"Cache-Control": "no-store"})
        assert r.status_code == 200, r.text
        assert (gateway.runtime.calls[-1].cache_lookup, gateway.runtime.calls[-1].cache_store) == (True, False)
        r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1),
                              headers={"Cache-Control": "max-age=30, min-fresh=5, only-if-cached"})
        assert r.status_code == 200, r.text
        last = gateway.runtime.calls[-1]
        assert (last.cache_max_age_s, last.cache_min_fresh_s, last.cache_only) == (30, 5, True)
        assert last.max_tokens_param == "max_tokens"
        r = await client.post("/v1/chat/completions", json=chat_body(max_completion_tokens=1))
        assert gateway.runtime.calls[-1].max_tokens_param == "max_completion_tokens"
        assert "Age" not in r.headers  # the fake runtime's answers are not from the cache
        # HTTP/1.0's Pragma: no-cache, unless Cache-Control says otherwise (RFC 9111 §5.4)
        r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1), headers={"Pragma": "no-cache"})
        assert (gateway.runtime.calls[-1].cache_lookup, gateway.runtime.calls[-1].cache_store) == (False, True)
        r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1),
                              headers={"Pragma": "no-cache", "Cache-Control": "no-store"})
        assert (gateway.runtime.calls[-1].cache_lookup, gateway.runtime.calls[-1].cache_store) == (True, False)


async def test_chat_json_n2(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/chat/completions", json=chat_body(n=2, max_tokens=2))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert [c["message"] for c in body["choices"]] == [
        {"role": "assistant", "content": word(0, 0) + word(0, 1)},
        {"role": "assistant", "content": word(1, 0) + word(1, 1)},
    ]
    assert gateway.runtime.calls[-1].messages[0].content == "hello there"
    call = gateway.runtime.calls[-1]
    assert (call.add_generation_prompt, call.continue_final_message) == (True, False)


async def test_text_parts_are_joined_by_newlines_and_a_refusal_reads_as_text(gateway: Gateway) -> None:
    """As vLLM reads them: "Hello" and "world" were "Helloworld"; an assistant's refusal part
    (OpenAI's schema allows it) was a 400, so a replayed conversation with one failed."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot help with that."}]},
                {"role": "user", "content": "Why not?"}]
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/chat/completions", json=chat_body(messages=messages, max_tokens=1))
    assert r.status_code == 200, r.text
    assert [m.content for m in gateway.runtime.calls[-1].messages] == ["Hello\nworld", "I cannot help with that.",
                                                                       "Why not?"]


async def test_tool_call_arguments_nested_too_deeply_to_read_are_kept_as_written(gateway: Gateway) -> None:
    """A 500 before: json.loads raises RecursionError, not ValueError, on deep nesting."""
    deep = "[" * 3000 + "]" * 3000
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/chat/completions", json=chat_body(messages=messages, max_tokens=1))
    assert r.status_code == 200, r.text
    assert deep in gateway.runtime.calls[-1].messages[1].content


def _calls(*ids: str) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ids]}


def _answer(call_id: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": "ok"}


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(("messages", "said"), [
    ([USER, _calls("c1")], "did not have response messages: c1"),  # the last turn's calls unanswered
    ([USER, _calls("c1"), USER], "did not have response messages: c1"),
    ([USER, _calls("c1", "c2"), _answer("c1"), USER], "did not have response messages: c2"),  # partly
    ([USER, _calls("c1"), USER, _answer("c1")], "did not have response messages: c1"),  # answered too late
    ([USER, _calls("c1"), _answer("c1"), USER, _answer("c1")], "tool_call_id 'c1' is not a call of the"),
    ([USER, _answer("c9")], "tool_call_id 'c9' is not a call"),
    ([USER, _calls("c1"), _answer("c1"), _answer("c1")], "is answered already"),
    ([USER, _calls("c1", "c1"), _answer("c1")], "the id 'c1' is given twice"),
    ([USER, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "needs its \"id\""),
    ([USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "code", "function": {"name": "f"}}]}],
     "\"type\": \"function\""),
])
async def test_tool_turns_must_be_answered_as_openai_requires(gateway: Gateway, messages: list, said: str) -> None:
    """OpenAI's 400s for a conversation whose calls were not all answered, right after the
    turn that made them: the model read calls that never returned (200 before)."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/chat/completions", json=chat_body(messages=messages, max_tokens=1))
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert said in r.json()["error"]["message"]
        ok = [USER, _calls("c1", "c2"), _answer("c2"), _answer("c1"), {"role": "assistant", "content": "Done."},
              USER, _calls("c3"), _answer("c3")]  # any order within the block, several rounds
        assert (await client.post("/v1/chat/completions", json=chat_body(messages=ok, max_tokens=1))).status_code == 200


async def test_chat_can_continue_its_last_message(gateway: Gateway) -> None:
    """vLLM's continue_final_message: the call carries how the chat ends (admission renders it)."""
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! I"}]
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/chat/completions", json=chat_body(
            messages=prefill, max_tokens=1, add_generation_prompt=False, continue_final_message=True))
        assert r.status_code == 200, r.text
        call = gateway.runtime.calls[-1]
        assert (call.add_generation_prompt, call.continue_final_message) == (False, True)
        assert call.messages[-1].content == "Hello! I"
        assert r.json()["choices"][0]["message"]["content"] == word(0, 0)  # the continuation alone
        # vLLM's echo: each choice starts with the prefill, whole and streamed
        body = chat_body(messages=prefill, max_tokens=2, n=2, add_generation_prompt=False, continue_final_message=True,
                         echo=True)
        r = await client.post("/v1/chat/completions", json=body)
        assert [c["message"]["content"] for c in r.json()["choices"]] == [
            "Hello! I" + word(0, 0) + word(0, 1), "Hello! I" + word(1, 0) + word(1, 1)]
        r = await client.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = [json.loads(e) for e in parse_events(r.text)[:-1]]
        texts = ["".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"]
                         if c["index"] == i) for i in (0, 1)]
        assert texts == [c["message"]["content"] for c in
                         (await client.post("/v1/chat/completions", json=body)).json()["choices"]]
        r = await client.post("/v1/chat/completions", json=chat_body(echo=True, max_tokens=1))  # last turn: a user's
        assert r.json()["choices"][0]["message"]["content"] == word(0, 0)


async def test_chat_sse_chunks_and_include_usage(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post(
            "/v1/chat/completions",
            json=chat_body(max_tokens=3, stream=True, stream_options={"include_usage": True}),
        )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    payloads = parse_events(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks[:3]]
    assert deltas[0] == {"role": "assistant", "content": word(0, 0)}
    assert deltas[1:] == [{"content": word(0, 1)}, {"content": word(0, 2)}]
    assert chunks[3]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert all(c["usage"] is None for c in chunks[:4])
    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}


async def test_completion_sse_without_usage(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True})
    chunks = [json.loads(p) for p in parse_events(r.text)[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == [word(0, 0), word(0, 1), ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


async def test_failed_after_accept_in_json_and_stream(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "FAIL", "max_tokens": 2})
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "engine_error"
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "FAIL", "stream": True})
    payloads = parse_events(r.text)
    assert json.loads(payloads[-2])["error"]["code"] == "engine_error"
    assert payloads[-1] == "[DONE]"


async def test_a_stream_the_runtime_closes_without_its_end_says_so_before_done(gateway: Gateway) -> None:
    """`[DONE]` alone after a stream closed without its Finished passed a cut answer for a
    whole one (the JSON answer was a 500): an internal_error event comes first."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "CUT", "stream": True})
        whole = await client.post("/v1/completions", json={"model": MODEL, "prompt": "CUT"})
    payloads = parse_events(r.text)
    assert json.loads(payloads[0])["choices"][0]["text"] == word(0, 0)
    assert json.loads(payloads[-2])["error"]["code"] == "internal_error" and payloads[-1] == "[DONE]"
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "internal_error"


async def test_models(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.get("/v1/models")
        one = await client.get(f"/v1/models/{MODEL}")  # the openai SDK's models.retrieve
        missing = await client.get("/v1/models/nope")
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    assert one.status_code == 200 and one.json() == r.json()["data"][0]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_a_missing_field_is_named() -> None:
    with pytest.raises(ApiError) as info:
        decode_request("completions", b'{"model": "m"}')
    assert info.value.param == "prompt"
    with pytest.raises(ApiError) as info:
        decode_request("chat.completions", b'{"model": "m", "messages": [{"content": "x"}]}')
    assert info.value.param == "messages"


# ---------------------------------------------------------------- errors

BAD_INPUTS = [
    ("tools on completions", b'{"model": "fake-model", "prompt": "x", "tools": [{"type": "function", '
     b'"function": {"name": "f"}}], "tool_choice": "required"}', 400, "unsupported_value"),
    ("malformed json", b'{"model": "fake-model", "prompt": ', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_value"),
    ("missing prompt", b'{"model": "fake-model"}', 400, "missing_required_parameter"),  # (OpenAI's code)
    ("wrong type", b'{"model": "fake-model", "prompt": "x", "n": "two"}', 400, "invalid_value"),
    ("float n", b'{"model": "fake-model", "prompt": "x", "n": 1.5}', 400, "invalid_value"),
    ("negative max_tokens", b'{"model": "fake-model", "prompt": "x", "max_tokens": -1}', 400, "invalid_value"),
    ("top_p zero", b'{"model": "fake-model", "prompt": "x", "top_p": 0}', 400, "invalid_value"),
    ("n too large", b'{"model": "fake-model", "prompt": "x", "n": 100000}', 400, "invalid_value"),
    ("huge int", b'{"model": "fake-model", "prompt": "x", "seed": 1' + b"0" * 40 + b"}", 400, None),
    ("empty stop", b'{"model": "fake-model", "prompt": "x", "stop": [""]}', 400, "invalid_value"),
    ("logprobs too many", b'{"model": "fake-model", "prompt": "x", "logprobs": 99}', 400, "invalid_value"),
    ("negative token id", b'{"model": "fake-model", "prompt": [-1]}', 400, "invalid_value"),
    ("empty token list", b'{"model": "fake-model", "prompt": []}', 400, "invalid_value"),
    ("nan temperature", b'{"model": "fake-model", "prompt": "x", "temperature": NaN}', 400, "invalid_json"),
    ("invalid utf-8", b'{"model": "fake-model", "prompt": "\xff\xfe"}', 400, "invalid_encoding"),
    ("empty body", b"", 400, "invalid_json"),
    ("lone surrogate", b'{"model": "fake-model", "prompt": "x\\ud83d"}', 400, "invalid_json"),
    ("unknown model", b'{"model": "gpt-9", "prompt": "x"}', 404, "model_not_found"),
    ("mixed batch", b'{"model": "fake-model", "prompt": ["x", [1, 2]]}', 400, "invalid_value"),
    ("ids and strings", b'{"model": "fake-model", "prompt": [1, "x"]}', 400, "invalid_value"),
    ("empty prompt in a batch", b'{"model": "fake-model", "prompt": [[1], []]}', 400, "invalid_value"),
    ("negative id in a batch", b'{"model": "fake-model", "prompt": [[1], [-2]]}', 400, "invalid_value"),
    ("nested too deep", b'{"model": "fake-model", "prompt": [[[1]]]}', 400, "invalid_value"),
    ("too many prompts", b'{"model": "fake-model", "prompt": [' + b",".join([b'"x"'] * 2049) + b"]}", 400,
     "invalid_value"),
    ("prompt logprobs too many", b'{"model": "fake-model", "prompt": "x", "echo": true, "logprobs": 21}', 400,
     "invalid_value"),
    ("suffix", b'{"model": "fake-model", "prompt": "x", "suffix": "end"}', 400, "unsupported_value"),
    ("negative priority", b'{"model": "fake-model", "prompt": "x", "priority": -1}', 400, "invalid_value"),
]


@pytest.mark.parametrize(("name", "body", "status", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_is_an_openai_error(gateway: Gateway, name: str, body: bytes, status: int, code: str | None) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    assert gateway.runtime.calls == []


CHAT_BAD = [
    ("user message without content", {**chat_body(), "messages": [{"role": "user"}]}, "messages"),
    ("user content null", {**chat_body(), "messages": [{"role": "user", "content": None}]}, "messages"),
    ("user content no parts", {**chat_body(), "messages": [{"role": "user", "content": []}]}, "messages"),
    ("system content null", {**chat_body(), "messages": [{"role": "system", "content": None},
                                                          {"role": "user", "content": "x"}]}, "messages"),
    ("refusal part without refusal", {**chat_body(), "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "refusal"}]},
        {"role": "user", "content": "y"}]}, "messages"),
    ("text part without text", {**chat_body(), "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages"),
    ("too many stop token ids", {**chat_body(), "stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ("bad role", {"model": "fake-model", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("no messages", {"model": "fake-model", "messages": []}, "messages"),
    ("top_logprobs without logprobs", {**chat_body(), "top_logprobs": 2}, "top_logprobs"),
    ("too many top_logprobs", {**chat_body(), "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("max_completion_tokens 0", {**chat_body(), "max_completion_tokens": 0}, "max_completion_tokens"),
    ("stream_options wrong", {**chat_body(), "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ("logit_bias key not an id", {**chat_body(), "logit_bias": {"hello": 1}}, "logit_bias"),
    ("logit_bias out of range", {**chat_body(), "logit_bias": {"5": 250}}, "logit_bias"),
    ("response_format type unknown", {**chat_body(), "response_format": {"type": "xml"}}, "response_format"),
    ("response_format not an object", {**chat_body(), "response_format": "json"}, "response_format"),
    ("json_schema without its object", {**chat_body(), "response_format": {"type": "json_schema"}}, "response_format"),
    ("json_schema not JSON", {**chat_body(), "response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "x", "schema": "{"}}},
     "response_format"),
    ("schema a number", {**chat_body(), "guided_json": 5}, "guided_json"),
    ("two constraints", {**chat_body(), "response_format": {"type": "json_object"}, "guided_regex": "a+"},
     "guided_regex"),
    ("empty choice", {**chat_body(), "guided_choice": []}, "guided_choice"),
    ("empty regex", {**chat_body(), "guided_regex": ""}, "guided_regex"),
    ("structured_outputs choice not a list", {**chat_body(), "structured_outputs": {"choice": "a"}},
     "structured_outputs"),
    ("structured_outputs unknown key", {**chat_body(), "structured_outputs": {"jsn": {}}}, "structured_outputs"),
    ("structural_tag", {**chat_body(), "structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ("json_object not a bool", {**chat_body(), "structured_outputs": {"json_object": "no"}}, "structured_outputs"),
    ("response_format without type", {**chat_body(), "response_format": {}}, "response_format"),
    ("schema string nested too deeply", {**chat_body(), "guided_json": "[" * 20000 + "]" * 20000}, "guided_json"),
    ("whitespace rule on a regex", {**chat_body(), "guided_regex": "a+", "guided_whitespace_pattern": " *"},
     "guided_whitespace_pattern"),
    ("whitespace rule alone", {**chat_body(), "guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
    ("stop with a constraint", {**chat_body(), "guided_regex": "[0-9]+", "stop": ["5"]}, "stop"),
    ("stop ids with tools", {**chat_body(), "tools": [{"type": "function", "function": {"name": "f"}}],
                             "tool_choice": "required", "stop_token_ids": [5]}, "stop_token_ids"),
    ("tool message answering no call", {**chat_body(), "messages": [{"role": "user", "content": "hi"},
                                                                   {"role": "tool", "content": "42"}]}, "messages"),
    ("an image part", {**chat_body(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "messages"),
    ("assistant tool_calls malformed", {**chat_body(), "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "x", "function": "zzz"}]}]},
     "messages"),
    ("legacy function_call", {**chat_body(), "function_call": "auto"}, "function_call"),
    ("two whitespace rules", {**chat_body(), "structured_outputs": {"json_object": True, "disable_any_whitespace": True,
                                                                    "whitespace_pattern": " "}}, "structured_outputs"),
    ("grammar with beam search", {**chat_body(), "guided_grammar": "start: \"a\"", "use_beam_search": True,
                                  "n": 2, "temperature": 0}, "guided_grammar"),
    ("stop with tools (required)", {**chat_body(), "tools": [{"type": "function", "function": {"name": "f"}}],
                                    "tool_choice": "required", "stop": "\n"}, "stop"),
    ("tool not a function", {**chat_body(), "tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools"),
    ("tool_choice names no tool", {**chat_body(), "tools": [{"type": "function", "function": {"name": "f"}}],
                                   "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("tools and a vLLM constraint", {**chat_body(), "tools": [{"type": "function", "function": {"name": "f"}}],
                                     "tool_choice": "required", "guided_regex": "a+"}, "tools"),
    ("functions", {**chat_body(), "functions": [{"name": "f"}]}, "functions"),
    ("tool_choice required", {**chat_body(), "tool_choice": "required"}, "tool_choice"),
    ("continue with a generation prompt", {**chat_body(), "continue_final_message": True}, "continue_final_message"),
    ("continue under a constraint", {**chat_body(), "continue_final_message": True, "add_generation_prompt": False,
                                     "guided_regex": "[a-z]+"}, "continue_final_message"),
    ("continue a blank message", {**chat_body(), "continue_final_message": True, "add_generation_prompt": False,
                                  "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "continue_final_message"),
    ("echo with tools", {**chat_body(), "echo": True, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "echo"),
    ("continue without a last message's text", {**chat_body(), "continue_final_message": True,
                                                 "add_generation_prompt": False, "messages": [
                                                     {"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": None}]}, "continue_final_message"),
    ("continue with tools", {**chat_body(), "continue_final_message": True, "add_generation_prompt": False,
                             "tools": [{"type": "function", "function": {"name": "f"}}]}, "continue_final_message"),
]


async def test_chat_fields_that_ask_for_nothing_unsupported_are_accepted(gateway: Gateway) -> None:
    body = {**chat_body(), "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "suffix": None}
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("name", "body", "param"), CHAT_BAD, ids=[b[0] for b in CHAT_BAD])
async def test_bad_chat_input_names_the_param(gateway: Gateway, name: str, body: dict[str, object], param: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_too_large_body_is_413(gateway: Gateway) -> None:
    prompt = "x" * (gateway.config.max_body_bytes + 10)
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert f"({gateway.config.max_body_bytes} bytes; its operator sets --max-body-bytes)" in r.json()["error"][
        "message"]


async def test_rate_limit_headers_on_every_kind_of_answer(gateway: Gateway) -> None:
    from cache.quotas import RateLimits

    gateway.runtime.rate_limits = RateLimits(10, 9, 59.5, None, None, None)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        for r in (await client.post("/v1/chat/completions", json=chat),
                  await client.post("/v1/chat/completions", json={**chat, "stream": True}),
                  await client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 1}),
                  await client.post("/v1/responses", json={"model": MODEL, "input": "x", "stream": True})):
            assert r.status_code == 200
            assert (r.headers["x-ratelimit-remaining-requests"], r.headers["x-ratelimit-reset-requests"]) == (
                "9", "59.5s")
        gateway.runtime.rate_limits = None  # a tenant without per-minute limits: none
        assert "x-ratelimit-limit-requests" not in (await client.post("/v1/chat/completions", json=chat)).headers


async def test_compressed_bodies_are_decoded_within_the_cap(gateway: Gateway) -> None:
    """Content-Encoding gzip / deflate is decoded (a small body that inflates past the cap
    is a 413, not gigabytes in memory); an unknown coding is a 415; a broken body a 400."""
    body = json.dumps({"model": MODEL, "prompt": "a b", "max_tokens": 2}).encode()
    bomb = json.dumps({"model": MODEL, "prompt": "x" * (gateway.config.max_body_bytes * 4)}).encode()
    cases = [
        ("gzip", gzip.compress(body), 200),
        ("deflate", zlib.compress(body), 200),
        ("identity, gzip", gzip.compress(body), 200),
        ("gzip", gzip.compress(bomb), 413),
        ("br", body, 415),
        ("gzip", body, 400),
        ("gzip", gzip.compress(body)[:-12], 400),
        ("gzip", gzip.compress(body[:20]) + gzip.compress(body[20:]), 200),  # two members (RFC 1952)
        ("gzip", gzip.compress(body) + b"GARBAGE", 400),
        ("deflate", zlib.compress(body) + b"x", 400),
    ]
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        for coding, content, status in cases:
            r = await client.post("/v1/completions", content=content,
                                  headers={"Content-Encoding": coding, "Content-Type": "application/json"})
            assert r.status_code == status, (coding, r.text)
            if status == 200:
                assert r.json()["choices"][0]["text"] == word(0, 0) + word(0, 1)
            else:
                assert r.json()["error"]["code"] in ("request_too_large", "unsupported_encoding", "invalid_encoding")
    assert len(gzip.compress(bomb)) < gateway.config.max_body_bytes  # the bomb itself was under the cap


class _FedCount:
    """zlib's decompressobj, counting the bytes it is given."""

    fed = 0

    def __init__(self, wbits: int) -> None:
        self._inner = _DECOMPRESSOBJ(wbits)

    def decompress(self, data, max_length: int = 0) -> bytes:
        _FedCount.fed += len(data)
        return self._inner.decompress(data, max_length)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


_DECOMPRESSOBJ = zlib.decompressobj


def test_a_body_of_many_gzip_members_decodes_in_time_linear_in_its_size(monkeypatch) -> None:
    """Each gzip member was fed the whole rest of the body (and its output so far copied):
    49,000 empty members in 1 MB held the event loop 1.6 s, 4 MB a minute. Now each is fed
    a few KB; members and large ones across the feed's bounds decode as before."""
    monkeypatch.setattr(zlib, "decompressobj", _FedCount)
    payload = json.dumps({"prompt": "y" * 50_000, "n": list(range(3000))}).encode()
    member, members = gzip.compress(b" ", mtime=0), 20_000
    body = gzip.compress(payload) + member * members
    assert decoded_body(body, "gzip", 1 << 20) == payload + b" " * members
    assert _FedCount.fed <= len(body) + members * _FEED_BYTES  # (fed whole: ~4 GB)
    noise = os.urandom(100_000)  # (incompressible: its member spans many feeds)
    assert decoded_body(gzip.compress(noise) + gzip.compress(noise[:7]), "gzip", 1 << 20) == noise + noise[:7]
    assert decoded_body(zlib.compress(noise), "deflate", 1 << 20) == noise
    with pytest.raises(ApiError) as refused:
        decoded_body(gzip.compress(noise), "gzip", len(noise) - 1)
    assert refused.value.status == 413
    with pytest.raises(ApiError) as refused:
        decoded_body(gzip.compress(noise)[:-5], "gzip", 1 << 20)
    assert refused.value.status == 400 and "ends early" in refused.value.message


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer lmg-not-a-real-key"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}],
    ids=["missing", "unknown", "wrong scheme", "empty"],
)
async def test_bad_or_missing_key_is_401(gateway: Gateway, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=headers) as client:
        r = await client.post("/v1/chat/completions", json=chat_body())
        models = await client.get("/v1/models")
    assert r.status_code == 401 and models.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


async def test_two_authorization_headers_are_a_400_on_every_route(gateway: Gateway) -> None:
    """RFC 9110 allows one: with two, the first decided (a valid key, then anything: 200),
    while a proxy in front may check the last. Refused, whichever key comes first."""
    key = gateway.headers["Authorization"]
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        for second in ("Bearer lmg-wrong", key):
            headers = [("Authorization", key), ("Authorization", second)]
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/admin/tenants")):
                r = await client.request(method, path, headers=headers, json=chat_body())
                assert r.status_code == 400 and "one Authorization header" in r.json()["error"]["message"], r.text
        ws = await client.get(gateway.ws_url.replace("ws://", "http://"), headers=[
            ("Authorization", key), ("Authorization", "Bearer lmg-wrong"), ("Connection", "Upgrade"),
            ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")])
        assert ws.status_code == 400 and "one Authorization header" in ws.json()["error"]["message"]


async def test_revoked_key_stops_working(gateway: Gateway) -> None:
    key_id, key = await gateway.stores.tenants.create_key("t1", "temp")
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=headers) as client:
        assert (await client.get("/v1/models")).status_code == 200
        await gateway.stores.tenants.revoke_key(key_id)
        assert (await client.get("/v1/models")).status_code == 401


@pytest.mark.parametrize(
    ("status", "code", "retry_after", "header"),
    [(429, "rate_limit_exceeded", 2.2, "3"), (503, "overloaded", 0.1, "1"), (400, "context_length_exceeded", None, None)],
)
async def test_rejections_map_to_status_and_retry_after(
    gateway: Gateway, status: int, code: str, retry_after: float | None, header: str | None
) -> None:
    gateway.runtime.reject = Rejected("", status, code, "no", param=None, retry_after=retry_after)
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        for stream in (False, True):
            r = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
            assert r.status_code == status
            assert r.json()["error"]["code"] == code
            assert r.headers.get("retry-after") == header
    assert gateway.runtime.rejections == []  # admission counted these (the runtime's own)


async def test_refusals_before_admission_are_counted_as_rejections(gateway: Gateway) -> None:
    """A bad body, an unknown model, an out-of-range parameter: refused by the gateway, so
    admission never counted them, and `lmgate_rejections_total` missed them (its docs said
    400 and 404 are in it). Requests without a valid key and other routes are not counted."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        assert (await client.post("/v1/chat/completions", json=chat_body(model="nope"))).status_code == 404
        assert (await client.post("/v1/completions", content=b"{not json")).status_code == 400
        assert (await client.post("/v1/chat/completions", json=chat_body(n=0))).status_code == 400
        assert (await client.post("/v1/embeddings", json={"model": MODEL})).status_code == 400
        assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                                  headers={"Authorization": "Bearer lmg-wrong"})).status_code == 401
        assert (await client.post("/tokenize", json={"model": "nope", "prompt": "x"})).status_code == 404
        assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})).status_code == 200
        # failed after admission (a shutdown's end, non-streamed): an error, not a refusal
        assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": "GONE"})).status_code == 503
        too_large = await client.post("/v1/completions", content=b"x" * (gateway.config.max_body_bytes + 1))
        assert too_large.status_code == 413
        async with aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
            assert (await ws.receive_json())["type"] == "ready"
            await ws.send_json({"type": "request", "id": "a", "endpoint": "completions",
                                "body": {"model": "nope", "prompt": "x"}})
            assert (await ws.receive_json())["status"] == 404
            await ws.send_json({"type": "request", "id": "b", "endpoint": "nope", "body": {}})  # refused by the reader
            assert (await ws.receive_json())["error"]["code"] == "invalid_frame"
    assert gateway.runtime.rejections == [("t1", 404, "model_not_found"), ("t1", 400, "invalid_json"),
                                          ("t1", 400, "invalid_value"), ("t1", 400, "missing_required_parameter"),
                                          ("t1", 413, "request_too_large"), ("t1", 404, "model_not_found"),
                                          ("t1", 400, "invalid_frame")]


async def test_unknown_route_and_method_are_json(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r404 = await client.get("/v1/nothing")
        r405 = await client.get("/v1/completions")
        # no redirect to the path with its slashes merged (Werkzeug's was a 308 in HTML)
        doubled = [await client.get(path) for path in ("/v1//models", "//v1/models", "/admin//tenants")]
    assert r404.status_code == 404 and r404.json()["error"]["code"] == "not_found"
    assert r405.status_code == 405 and "error" in r405.json()
    assert [(r.status_code, r.json()["error"]["code"]) for r in doubled] == [(404, "not_found")] * 3
    assert "doubled slash" in doubled[0].json()["error"]["message"]


# ---------------------------------------------------------------- disconnect = abort


async def test_sse_disconnect_cancels_the_request(gateway: Gateway) -> None:
    async with (
        httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client,
        client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True, messages=[{"role": "user", "content": "HANG"}])) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                break  # first token arrived; now drop the connection
    request_id = gateway.runtime.calls[-1].request_id
    with trio.fail_after(5):
        await gateway.runtime.cancel_events[request_id].wait()
    assert request_id in gateway.runtime.cancelled


async def test_sse_disconnect_before_the_first_token_cancels_the_request(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        with trio.move_on_after(0.5):
            async with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "SILENT", "stream": True}) as r:
                async for _ in r.aiter_bytes():
                    pass
    request_id = gateway.runtime.calls[-1].request_id
    with trio.fail_after(5):
        await gateway.runtime.cancel_events[request_id].wait()


async def test_json_disconnect_cancels_the_request(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        with trio.move_on_after(0.5):
            await client.post("/v1/completions", json={"model": MODEL, "prompt": "HANG"})
    request_id = gateway.runtime.calls[-1].request_id
    with trio.fail_after(5):
        await gateway.runtime.cancel_events[request_id].wait()


async def test_finished_stream_is_not_cancelled(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
    assert gateway.runtime.cancelled == set()


async def test_an_error_sent_before_a_large_body_is_read_closes_the_connection(gateway: Gateway) -> None:
    """403/413 go out before a large body has arrived; the connection then cannot carry
    another request, and the answer says so, so a keep-alive client reconnects instead of
    hanging or reading "Server disconnected" (it did, 4 runs in 6, before)."""
    big = b"x" * 300_000
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers, timeout=10) as client:
        for _ in range(3):
            r = await client.post("/admin/tenants", content=big)  # a tenant key: 403 from the admin check
            assert r.status_code == 403 and r.headers["connection"] == "close"
            r = await client.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.headers["connection"] == "close"
            r = await client.get("/v1/models")  # the client is fine afterwards
            assert r.status_code == 200 and r.headers.get("connection") != "close"


def test_chat_logprobs_bytes_come_from_the_tokenizer() -> None:
    from actors.messages import TokenDelta, TopLogprob
    from gateway.routes_openai import _chat_logprobs

    delta = TokenDelta("r", 0, "", [7], logprobs=[-0.1], top_logprobs=[[TopLogprob(7, -0.1, "\ufffd"),
                                                                        TopLogprob(9, -3.0, "a")]],
                       tokens=["\ufffd"])
    [item] = _chat_logprobs(delta, {7: b"\xf0\x9f", 9: b"a"}.__getitem__)["content"]
    assert item["bytes"] == [0xF0, 0x9F]
    assert [t["bytes"] for t in item["top_logprobs"]] == [[0xF0, 0x9F], [ord("a")]]
    [plain] = _chat_logprobs(delta)["content"]  # no tokenizer: the text's bytes
    assert plain["bytes"] == list("\ufffd".encode())


@pytest.mark.parametrize(("fields", "kind", "spec", "whitespace", "param"), [
    ({"response_format": {"type": "json_object"}}, "json_object", "", None, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}},
     "json", '{"type": "integer"}', None, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}, "json_object", "", None,
     "response_format"),
    # a schema given as its JSON text is closed as an object is: the keys it names, and no others
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": json.dumps(
        {"type": "object", "properties": {"a": {"type": "integer"}}})}}}, "json",
     '{"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": false}', None,
     "response_format"),
    ({"guided_json": '{"type": "integer"}', "guided_whitespace_pattern": " ?"}, "json", '{"type": "integer"}', " ?",
     "guided_json"),
    ({"guided_choice": ["a", "b"]}, "choice", '["a", "b"]', None, "guided_choice"),
    ({"structured_outputs": {"regex": "a+", "disable_fallback": True}}, "regex", "a+", None, "structured_outputs"),
    ({"structured_outputs": {"json_object": True, "disable_any_whitespace": True}}, "json_object", "", "",
     "structured_outputs"),
    ({"response_format": {"type": "text"}, "structured_outputs": {"json_object": False}}, None, None, None, None),
])
def test_structured_output_fields_map_to_one_constraint(fields, kind, spec, whitespace, param) -> None:  # type: ignore[no-untyped-def]
    from gateway.routes_openai import decode_request, guided_decoding

    guided, field = guided_decoding(decode_request("chat.completions", {**chat_body(), **fields}))
    assert field == param
    if kind is None:
        assert guided is None
    else:
        assert (guided.kind, guided.spec, guided.whitespace) == (kind, spec, whitespace)


# ---------------------------------------------------------------- pings on a silent stream


async def read_lines(r: httpx.Response, seconds: float) -> list[str]:
    """The stream's lines for `seconds` (or to its end), blank lines left out."""
    lines: list[str] = []
    with trio.move_on_after(seconds):
        async for line in r.aiter_lines():
            if line:
                lines.append(line)
    return lines


@pytest.mark.parametrize("prompt", ["SILENT", ["SILENT", "SILENT"]])  # one request, and a batch of two
async def test_a_silent_stream_sends_pings_and_its_end_still_cancels(gateway: Gateway, nursery: trio.Nursery,
                                                                     prompt: str | list[str]) -> None:
    """A stream with nothing to send for `sse_ping_seconds` (queued, a beam search) sends an
    SSE comment line, not an event; the client leaving still cancels the request."""
    config = dataclasses.replace(gateway.config, sse_ping_seconds=0.2)
    url, runtime, stop = await start_gateway(nursery, gateway.stores, config)
    async with httpx.AsyncClient(base_url=url, headers=gateway.headers) as client:
        body = {"model": MODEL, "prompt": prompt, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = await read_lines(r, 0.9)
    assert 3 <= len(lines) <= 5 and set(lines) == {": ping"}
    with trio.fail_after(5):
        for call in runtime.calls:
            await runtime.cancel_events[call.request_id].wait()
    stop.set()


async def test_pings_only_fill_the_silences(gateway: Gateway, nursery: trio.Nursery) -> None:
    """Tokens 0.35 s apart with a 0.2 s ping: one ping in each gap, the events unchanged
    (what an OpenAI client parses is the same as without pings)."""
    config = dataclasses.replace(gateway.config, sse_ping_seconds=0.2)
    url, runtime, stop = await start_gateway(nursery, gateway.stores, config)
    runtime.delay = 0.35
    async with httpx.AsyncClient(base_url=url, headers=gateway.headers) as client:
        body = {"model": MODEL, "prompt": "a b", "max_tokens": 3, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            lines = await read_lines(r, 10)
    assert lines[-1] == "data: [DONE]"
    kinds = ["ping" if line == ": ping" else "data" for line in lines]
    assert kinds == ["data", "ping", "data", "ping", "data", "ping", "data", "data"]  # 3 tokens, finish, [DONE]
    events = parse_events("\n\n".join(lines) + "\n\n")
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"]) == (
        word(0, 0) + word(0, 1) + word(0, 2))
    assert runtime.cancelled == set()
    stop.set()


async def test_no_pings_when_turned_off(gateway: Gateway, nursery: trio.Nursery) -> None:
    config = dataclasses.replace(gateway.config, sse_ping_seconds=0)
    url, runtime, stop = await start_gateway(nursery, gateway.stores, config)
    async with (httpx.AsyncClient(base_url=url, headers=gateway.headers) as client,
                client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "SILENT", "stream": True}) as r):
        assert await read_lines(r, 0.5) == []
    stop.set()


def test_an_answer_encoded_a_slice_at_a_time_is_the_same_json() -> None:
    """`encode_answer` encodes long lists a slice at a time (one encode of a 56 MB answer held
    the interpreter lock 190-250 ms): the bytes are those of one encode."""
    import msgspec

    from gateway.routes_openai import ENCODE_SLICE, _in_slices

    answer = {"id": "x", "choices": [{"index": i, "logprobs": {"content": [{"t": f"é{j}", "lp": -j / 7, "top": None}
                                                                         for j in range(2 * ENCODE_SLICE + 5)]}}
                                     for i in range(3)],
              "prompt_logprobs": [None, *({str(j): {"rank": j}} for j in range(ENCODE_SLICE + 1))], "empty": []}
    assert msgspec.json.encode(_in_slices(answer)) == msgspec.json.encode(answer)
    # more choices than a slice (a list of 2,048 prompts): sliced inside as well
    many = {"choices": [{"index": i, "logprobs": {"tokens": [f"t{j}" for j in range(ENCODE_SLICE + 2)]}}
                        for i in range(ENCODE_SLICE + 3)]}
    assert msgspec.json.encode(_in_slices(many)) == msgspec.json.encode(many)


def test_an_answers_weight_counts_its_tokens_not_its_deltas() -> None:
    """A beam search's answer (or a cache replay) comes as one delta of all its tokens: its
    weight, which sends a large answer to a worker thread, is its tokens (counted as one
    delta, 8 beams of 4,000 tokens with logprobs were built on the event loop: a review)."""
    from gateway.routes_openai import Collector

    c = Collector("completions", "cmpl-x", MODEL, 1)
    c.add(TokenDelta("cmpl-x", 0, "x" * 3000, list(range(3000)), logprobs=[-0.5] * 3000,
                     tokens=["x"] * 3000))
    assert c.weight == 3000


async def test_a_failure_s_log_line_names_the_answer_id_the_servers_own_lines_use(gateway: Gateway, caplog) -> None:  # noqa: ANN001
    """The server's own lines about a request (an engine fault, say) name its answer id
    (`cmpl-…`), the caller its `X-Request-Id`: the failure's line names both (an audit:
    nothing joined the two)."""
    import logging

    import gateway.errors as errors

    errors._failure_lines.__init__()  # (earlier tests' lines: another budget)
    caplog.set_level(logging.INFO, logger="lmgate.gateway")
    async with httpx.AsyncClient(base_url=gateway.base_url, headers={**gateway.headers, "X-Request-Id": "trace-9"}) as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "temperature": -1})
    assert r.status_code == 400
    assert re.search(r"request trace-9 \(cmpl-[0-9a-f]{32}\) POST /v1/completions: 400 invalid_value param "
                     r"temperature \(tenant t1\)", caplog.text), caplog.text
