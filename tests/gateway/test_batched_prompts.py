"""Completions with several prompts (a batch) and `echo`, over real sockets against the
fake runtime: one runtime request per prompt, choice `i * n + j`, usage summed, one end;
a refusal or failure of any prompt is the whole request's and aborts the others."""

from __future__ import annotations

import json

import httpx
import trio
from httpx_ws import aconnect_ws

from actors.messages import Rejected
from gateway.sse import parse_events
from tests.gateway.conftest import ADMIN_KEY, MODEL, Gateway, word


def words(index: int, count: int) -> str:
    return "".join(word(index, j) for j in range(count))


async def post(gateway: Gateway, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        return await client.post("/v1/completions", json={"model": MODEL, **body})


async def test_a_batch_of_strings_is_one_request_per_prompt_with_choices_in_prompt_order(gateway: Gateway) -> None:
    r = await post(gateway, {"prompt": ["one two", "three four five"], "max_tokens": 2, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-")
    # choice j of prompt i is choice i * n + j
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, words(0, 2), "length"), (1, words(1, 2), "length"), (2, words(0, 2), "length"), (3, words(1, 2), "length")]
    assert body["usage"] == {"prompt_tokens": 2 + 3, "completion_tokens": 8, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 0}}
    calls = gateway.runtime.calls
    assert [c.prompt for c in calls] == ["one two", "three four five"]
    assert [c.request_id for c in calls] == [body["id"] + "-0", body["id"] + "-1"]
    # (one group to the daily budget: one prompt's reservation is not given back to another)
    assert [c.batch_id for c in calls] == [body["id"]] * 2
    assert [(c.batch_index, c.batch_size) for c in calls] == [(0, 2), (1, 2)]
    assert gateway.runtime.cancelled == set()


async def test_a_batch_of_token_lists_and_a_single_token_list(gateway: Gateway) -> None:
    r = await post(gateway, {"prompt": [[1, 2, 3], [4]], "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert [c.prompt_token_ids for c in gateway.runtime.calls] == [[1, 2, 3], [4]]
    r = await post(gateway, {"prompt": [5, 6], "max_tokens": 1})
    assert len(r.json()["choices"]) == 1
    assert gateway.runtime.calls[-1].prompt_token_ids == [5, 6]
    assert gateway.runtime.calls[-1].request_id == r.json()["id"]  # one prompt: the request's own id
    assert gateway.runtime.calls[-1].batch_id is None


async def test_a_streamed_batch_remaps_choices_and_ends_once(gateway: Gateway) -> None:
    r = await post(gateway, {"prompt": ["a", "b", "c"], "max_tokens": 2, "stream": True,
                             "stream_options": {"include_usage": True}})
    payloads = parse_events(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    texts: dict[int, str] = {}
    ended: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            assert choice["index"] not in ended  # nothing after a choice's finish_reason
            if choice["finish_reason"] is None:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            else:
                ended[choice["index"]] = choice["finish_reason"]
    assert texts == {0: words(0, 2), 1: words(0, 2), 2: words(0, 2)}
    assert ended == {0: "length", 1: "length", 2: "length"}  # each once, as its prompt ended
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0}}
    assert len({c["id"] for c in chunks}) == 1


async def test_a_prompt_that_ends_first_has_its_finish_reason_streamed_at_once(gateway: Gateway) -> None:
    async with (
        httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client,
        client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": ["short", "HANG"], "n": 2,
                                                       "max_tokens": 1, "stream": True}) as r,
    ):
        finished: list[tuple[int, str]] = []
        with trio.fail_after(5):
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    chunk = json.loads(line[5:])
                    finished += [(c["index"], c["finish_reason"]) for c in chunk["choices"] if c["finish_reason"]]
                    if finished:
                        break  # the other prompt still runs (it never ends)
    assert finished == [(0, "length"), (1, "length")]


async def test_a_refused_prompt_refuses_the_batch_and_aborts_the_accepted_ones(gateway: Gateway) -> None:
    gateway.runtime.reject = Rejected("", 429, "rate_limit_exceeded", "quota max_concurrent", retry_after=1.0)
    gateway.runtime.reject_after = 1  # the first prompt is accepted, the second refused
    r = await post(gateway, {"prompt": ["HANG", "x", "y"], "max_tokens": 2})
    assert r.status_code == 429, r.text
    assert r.headers["Retry-After"] == "1"
    first, second = gateway.runtime.calls  # the third was never submitted
    with trio.fail_after(5):
        await gateway.runtime.cancel_events[first.request_id].wait()
    assert second.request_id not in gateway.runtime.cancel_events
    assert gateway.runtime.refunded == {first.request_id}  # the client got none of it: not charged


async def test_a_failed_prompt_fails_the_batch_and_aborts_the_others(gateway: Gateway) -> None:
    r = await post(gateway, {"prompt": ["HANG", "FAIL"], "max_tokens": 4})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error"
    hang = gateway.runtime.calls[0].request_id
    with trio.fail_after(5):
        await gateway.runtime.cancel_events[hang].wait()


async def test_dropping_a_streamed_batch_cancels_every_prompt(gateway: Gateway) -> None:
    async with (
        httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client,
        client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": ["HANG", "HANG two"],
                                                       "stream": True}) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                break
    with trio.fail_after(5):
        for call in gateway.runtime.calls:
            await gateway.runtime.cancel_events[call.request_id].wait()


async def test_echo_writes_each_prompt_before_its_choices(gateway: Gateway) -> None:
    r = await post(gateway, {"prompt": ["one two", "three"], "max_tokens": 1, "echo": True, "n": 2})
    assert [c["text"] for c in r.json()["choices"]] == [
        "one two" + word(0, 0), "one two" + word(1, 0), "three" + word(0, 0), "three" + word(1, 0)]
    r = await post(gateway, {"prompt": "one", "max_tokens": 2, "echo": True, "stream": True})
    chunks = [json.loads(p) for p in parse_events(r.text)[:-1]]
    assert chunks[0]["choices"][0]["text"] == "one" + word(0, 0)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "one" + words(0, 2)


async def test_echo_asks_for_the_prompts_logprobs_with_logprobs_only(gateway: Gateway) -> None:
    await post(gateway, {"prompt": "x", "echo": True, "logprobs": 2})
    assert gateway.runtime.calls[-1].params.prompt_logprobs == 2
    await post(gateway, {"prompt": "x", "echo": True})
    assert gateway.runtime.calls[-1].params.prompt_logprobs is None
    await post(gateway, {"prompt": "x", "logprobs": 2})
    assert gateway.runtime.calls[-1].params.prompt_logprobs is None


async def test_max_tokens_zero_is_for_completions_only(gateway: Gateway) -> None:
    r = await post(gateway, {"prompt": "x", "max_tokens": 0, "echo": True})
    assert r.status_code == 200, r.text
    assert gateway.runtime.calls[-1].params.max_tokens == 0
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 0,
                                                            "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens"


async def test_a_batch_over_the_websocket(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        assert await ws.receive_json() == {"type": "ready"}
        await ws.send_json({"type": "request", "id": "b", "endpoint": "completions",
                            "body": {"model": MODEL, "prompt": ["p", "q"], "max_tokens": 2, "echo": True}})
        frames = []
        with trio.fail_after(5):
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(await ws.receive_json())
    texts: dict[int, str] = {}
    for f in frames[:-1]:
        texts[f["index"]] = texts.get(f["index"], "") + f["text"]
    assert texts == {0: "p" + words(0, 2), 1: "q" + words(0, 2)}
    assert frames[-1]["finish_reasons"] == ["length", "length"]
    assert frames[-1]["usage"]["completion_tokens"] == 4


async def test_echo_with_logprobs_puts_the_prompts_tokens_first(gateway: Gateway) -> None:
    r = await post(gateway, {"prompt": "one two", "max_tokens": 1, "echo": True, "logprobs": 1})
    [choice] = r.json()["choices"]
    assert choice["text"] == "one two" + word(0, 0)
    assert choice["logprobs"] == {
        "tokens": ["one", " two", word(0, 0)],
        "token_logprobs": [None, -2.0, -0.5],
        "top_logprobs": [None, {"alt0": -0.1}, {"zeta": -0.5}],
        "text_offset": [0, 3, 7],
    }
    # (admission bounds the copies of the prompt's logprobs the answer holds: one per choice here)
    assert (gateway.runtime.calls[-1].prompt_logprob_copies, gateway.runtime.calls[-1].prompt_logprobs_param) == (
        1, "logprobs")
    await post(gateway, {"prompt": "one two", "max_tokens": 1, "echo": True, "logprobs": 1, "prompt_logprobs": 2,
                         "n": 3})
    assert (gateway.runtime.calls[-1].prompt_logprob_copies, gateway.runtime.calls[-1].prompt_logprobs_param) == (6, "n")
    r = await post(gateway, {"prompt": "one two", "max_tokens": 1, "echo": True, "logprobs": 1, "stream": True})
    [first] = json.loads(parse_events(r.text)[0])["choices"]
    assert first["text"] == choice["text"] and first["logprobs"] == choice["logprobs"]


async def test_an_answer_with_logprobs_is_built_off_the_event_loop(gateway: Gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An answer with logprobs can be tens of megabytes (64 choices × 20 alternatives): it is
    built and encoded in a worker thread, not on the loop every stream shares (an audit: one
    stopped the others for 0.5-15 s); one without is built where it is."""
    import threading

    from gateway import routes_openai
    from gateway.routes_openai import Collector

    built_in: list[bool] = []
    response = Collector.response

    def spy(self, end):  # type: ignore[no-untyped-def]
        built_in.append(threading.current_thread() is threading.main_thread())
        return response(self, end)

    monkeypatch.setattr(Collector, "response", spy)
    monkeypatch.setattr(routes_openai, "ANSWER_OFF_LOOP_TOKENS", 2)  # (the fake model's answers are short)
    monkeypatch.setattr(routes_openai, "ENCODE_SLICE", 1)  # long lists encoded a slice at a time
    r = await post(gateway, {"prompt": "one two", "max_tokens": 1, "logprobs": 1, "n": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["choices"][1]["logprobs"]["top_logprobs"] == [{"zeta": -0.5}]
    r = await post(gateway, {"prompt": "one two", "max_tokens": 1, "echo": True, "logprobs": 1})
    assert r.json()["choices"][0]["logprobs"]["tokens"] == ["one", " two", word(0, 0)]  # (3 items: sliced)
    r = await post(gateway, {"prompt": "one two", "max_tokens": 1, "logprobs": 1})  # 1 token: on the loop
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["tokens"] == [word(0, 0)]
    r = await post(gateway, {"prompt": "one two", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
    assert built_in == [False, False, True, True]


def test_echoed_offsets_count_a_character_split_over_tokens_once() -> None:
    from actors.messages import PromptLogprob
    from gateway.routes_openai import _prompt_logprobs_json

    # "Ünï☃": Ü and ☃ each split over two and three tokens (as the stepper spells such tokens)
    tokens = ["bytes:\\xc3", "bytes:\\x9c", "n", "ï", "bytes:\\xe2\\x98", "bytes:\\x83", "!"]
    got = _prompt_logprobs_json([PromptLogprob(0, t, None, []) for t in tokens], "Ünï☃!")
    assert got["text_offset"] == [0, 0, 1, 2, 3, 3, 4]


async def test_a_batch_that_can_never_be_admitted_whole_is_a_400(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers={"Authorization": "Bearer " + ADMIN_KEY}) as admin:
        r = await admin.put(f"/admin/tenants/{gateway.tenant_id}/quota",
                            json={"max_concurrent": 2, "requests_per_minute": 100})
        assert r.status_code == 200, r.text
    r = await post(gateway, {"prompt": ["a", "b", "c"], "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and "at most 2" in r.json()["error"]["message"]
    assert gateway.runtime.calls == []
    assert (await post(gateway, {"prompt": ["a", "b"], "max_tokens": 1})).status_code == 200
    # nor more tokens than its token limits hold: 2 × (40 + a token of prompt) > 80 a day
    async with httpx.AsyncClient(base_url=gateway.base_url, headers={"Authorization": "Bearer " + ADMIN_KEY}) as admin:
        assert (await admin.put(f"/admin/tenants/{gateway.tenant_id}/quota",
                                json={"daily_token_budget": 80, "tokens_per_minute": 1000})).status_code == 200
    calls = len(gateway.runtime.calls)
    for body, per in (({"prompt": ["a", "b"], "max_tokens": 40}, "a day"),
                      ({"prompt": [[1, 2, 3], [4]], "max_tokens": 20, "n": 2}, "a day")):  # 4 + 80 ids and tokens
        r = await post(gateway, body)
        assert (r.status_code, r.json()["error"]["param"]) == (400, "prompt"), r.text
        assert per in r.json()["error"]["message"]
    assert len(gateway.runtime.calls) == calls
    assert (await post(gateway, {"prompt": ["a", "b"], "max_tokens": 39})).status_code == 200
    # the endpoint's default max_tokens (16) is lowered by the daily budget to what is left
    # of the day, a token at least: 5 × (1 + 16) > 80, yet 5 × (1 + 1) fits
    r = await post(gateway, {"prompt": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 200, r.text


async def test_a_tenants_batches_are_admitted_one_at_a_time(gateway: Gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two batches sent at once must not interleave their prompts' admission: under
    max_concurrent each would take a slot, be refused its next, and both fail."""
    submit = gateway.runtime.submit

    async def slow_submit(call, sink=None):  # type: ignore[no-untyped-def]
        await trio.sleep(0.02)  # admission takes a while (tokenizing, the quota script)
        return await submit(call, sink=sink)

    monkeypatch.setattr(gateway.runtime, "submit", slow_submit)
    async with trio.open_nursery() as nursery:
        for batch in ("a", "b"):
            nursery.start_soon(post, gateway, {"prompt": [f"{batch}0", f"{batch}1", f"{batch}2"], "max_tokens": 1})
    order = [c.prompt[0] for c in gateway.runtime.calls]
    assert order in (list("aaabbb"), list("bbbaaa")), order


async def test_the_websocket_carries_the_prompts_logprobs(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        assert await ws.receive_json() == {"type": "ready"}
        await ws.send_json({"type": "request", "id": "s", "endpoint": "completions",
                            "body": {"model": MODEL, "prompt": [[7, 8, 9]], "max_tokens": 1, "echo": True,
                                     "logprobs": 0}})
        first = await ws.receive_json()
    assert first["prompt_token_ids"] == [0, 1, 2] and first["prompt_logprobs"] == [None, -2.0, -3.0]
