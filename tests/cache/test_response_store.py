"""The Responses API's store against a real Redis: shared stream events, conversations."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from cache.redis_server import PrivateRedis
from cache.response_store import ResponseStore, StoredResponse
from cache.store import CacheUnavailable, RedisStore


def events(first: int, last: int) -> list[dict]:
    return [{"type": "response.output_text.delta", "sequence_number": k, "delta": f"w{k}"}
            for k in range(first, last + 1)]


async def test_shared_events_are_appended_once_event_k_at_index_k(store: RedisStore) -> None:
    """A push retried (its reply lost, or its expiry failing after the append) appended its
    events again, and a stream resumed on another server repeated them."""
    rs = ResponseStore(store)
    assert (await rs.push_events("o", "r", events(0, 2), 60, first=0))[1] == 0
    added, before = await rs.push_events("o", "r", events(0, 2), 60, first=0)  # the same push, retried
    assert (added, before) == (0, 3)
    added, before = await rs.push_events("o", "r", events(1, 4), 60, first=1)  # overlaps: only 3 and 4 go in
    assert added > 0 and before == 3
    got = await rs.read_events("o", "r", 0)
    assert [e["sequence_number"] for e in got] == [0, 1, 2, 3, 4]
    assert [e["sequence_number"] for e in await rs.read_events("o", "r", 3)] == [3, 4]


async def test_a_push_past_an_expired_list_appends_nothing_and_says_where_it_stands(store: RedisStore) -> None:
    rs = ResponseStore(store)
    added, before = await rs.push_events("o", "gone", events(5, 6), 60, first=5)
    assert (added, before) == (0, 0)  # the caller pushes again from 0
    assert await rs.read_events("o", "gone", 0) == []
    await rs.push_events("o", "gone", events(0, 6), 60, first=0)
    assert [e["sequence_number"] for e in await rs.read_events("o", "gone", 0)] == list(range(7))


def test_a_continued_conversation_leaves_the_output_logprobs_behind() -> None:
    """The model never reads them, and copied into every later turn they could grow a
    chain past what a stored response may take."""
    part = {"type": "output_text", "text": "Hi", "annotations": [], "logprobs": [{"token": "Hi", "logprob": -0.1}]}
    output = {"id": "msg_1", "type": "message", "role": "assistant", "content": [part]}
    stored = StoredResponse(response={"id": "resp_1", "output": [output]}, context=[],
                            input=[{"id": "msg_0", "type": "message", "role": "user", "content": []}])
    _, answer = stored.conversation()
    assert answer["content"] == [{"type": "output_text", "text": "Hi", "annotations": []}]
    assert "logprobs" in stored.response["output"][0]["content"][0]  # the response itself keeps them


async def test_a_stalled_redis_costs_the_store_one_wait_not_one_per_request(tmp_path) -> None:
    """Every stored response, GET and DELETE waited out the timeouts of a stalled Redis
    (about 2 s each, as the docs promise only the first request does): after one failure
    the store answers CacheUnavailable at once until Redis is found back."""
    with PrivateRedis(tmp_path) as server:
        async with RedisStore(server.url, stream_timeout_s=0.3, retries=1) as store:
            errors: list[int] = []  # (`lmgate_redis_errors_total{op="response_store"}` in the gateway)
            rs = ResponseStore(store, on_error=lambda: errors.append(1))
            stored = StoredResponse(response={"id": "resp_1", "status": "completed"}, context=[], input=[])
            assert await rs.put("o", stored)
            os.kill(server.pid, signal.SIGSTOP)
            try:
                started = trio.current_time()
                with pytest.raises(CacheUnavailable, match="timed out"):
                    await rs.get("o", "resp_1")
                first = trio.current_time() - started
                started = trio.current_time()
                for call in (rs.get("o", "resp_1"), rs.put("o", stored), rs.delete("o", "resp_1")):
                    with pytest.raises(CacheUnavailable, match="a moment ago"):
                        await call
                assert trio.current_time() - started < first / 3, first
            finally:
                os.kill(server.pid, signal.SIGCONT)
            store.unreachable_at -= 1.1  # (a second on: one call tries it again, and finds it)
            assert (await rs.get("o", "resp_1")).response["status"] == "completed"
            assert len(errors) == 4  # the one that waited and the three skipped


async def test_a_cancel_renews_its_flag_but_never_turns_a_delete_into_a_cancel(store: RedisStore) -> None:
    """The server running a response may be cut off longer than a flag lives: a second
    cancel renews it. A delete's flag says more (keep nothing of it): a cancel after it
    must not make it a plain cancel."""
    rs = ResponseStore(store)
    key = store.key("resp2cancel", "o", "r")
    await rs.request_cancel("o", "r", ttl_s=10)
    await store.client.pexpire(key, 500)
    await rs.request_cancel("o", "r", ttl_s=10)
    assert await store.client.pttl(key) > 5000 and await rs.cancel_requested("o", "r") == "cancel"
    await rs.request_cancel("o", "r", ttl_s=600, delete=True)
    await rs.request_cancel("o", "r", ttl_s=10)
    assert await rs.cancel_requested("o", "r") == "delete" and await store.client.pttl(key) > 500_000
    assert await rs.cancel_requested("o", "other") is None
