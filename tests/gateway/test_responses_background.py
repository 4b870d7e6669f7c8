"""Background mode of the Responses API (`background: true`, `gateway.responses_live`) over
real sockets and a real Redis: a response that runs on after its request was answered,
read back while it runs, streamed again after the last event read, cancelled here or by
another server of the same Redis, deleted, and the one a stopped server left behind."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import trio

from actors.messages import Rejected
from cache.redis_server import PrivateRedis
from cache.response_store import ResponseStore, StoredResponse, owner_of
from cache.store import CacheUnavailable
from clients import LmgateClient, NotFound
from gateway.sse import parse_events
from tests.gateway.conftest import MODEL, Gateway, start_gateway, word


async def wait_for(client: httpx.AsyncClient, response_id: str, *statuses: str, timeout: float = 10) -> dict:
    with trio.fail_after(timeout):
        while True:
            r = await client.get(f"/v1/responses/{response_id}")
            assert r.status_code == 200, r.text
            if r.json()["status"] in statuses:
                return r.json()
            await trio.sleep(0.05)


async def events_until(lines: AsyncIterator[str], last_sequence: int) -> list[dict[str, Any]]:
    """Read SSE lines up to the event of `last_sequence` (data lines only)."""
    events: list[dict[str, Any]] = []
    async for line in lines:
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
            if events[-1]["sequence_number"] >= last_sequence:
                break
    return events


async def sse_events(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(data) for data in parse_events((await r.aread()).decode())]


def text_of(response: dict) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"])


async def test_a_background_response_is_answered_queued_and_runs_on(gateway: Gateway) -> None:
    gateway.runtime.delay = 0.05
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "write", "background": True,
                                                     "max_output_tokens": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "queued" and body["background"] is True and body["output"] == []
        # answered before the run: the engine has not finished it
        assert body["id"] not in gateway.runtime.finished
        done = await wait_for(client, body["id"], "incomplete", "completed")
        assert text_of(done) == "".join(word(0, j) for j in range(4))
        assert done["usage"]["output_tokens"] == 4 and done["background"] is True
        assert body["id"] in gateway.runtime.finished and body["id"] not in gateway.runtime.cancelled
        # and it continues as any stored response
        nxt = await client.post("/v1/responses", json={"model": MODEL, "input": "more", "max_output_tokens": 1,
                                                       "previous_response_id": body["id"]})
        assert nxt.status_code == 200, nxt.text


async def test_a_running_response_reads_as_it_stands_and_cancels(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        # "HANG": one token, then nothing: in progress until cancelled
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "HANG", "background": True})
        rid = r.json()["id"]
        running = await wait_for(client, rid, "in_progress")
        assert "lmgate_background_responses 1.0" in (await client.get("/metrics")).text
        with trio.fail_after(5):
            while text_of(running) != word(0, 0):  # the output so far, its message still open
                running = (await client.get(f"/v1/responses/{rid}")).json()
        assert running["output"][0]["status"] == "in_progress"
        # a running response is not a conversation to continue yet
        cont = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": rid})
        assert cont.status_code == 400 and cont.json()["error"]["param"] == "previous_response_id"

        cancelled = await client.post(f"/v1/responses/{rid}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        body = cancelled.json()
        assert body["status"] == "cancelled" and text_of(body) == word(0, 0)
        assert body["output"][0]["status"] == "incomplete"
        assert rid in gateway.runtime.cancelled  # the engine stopped it
        metrics = (await client.get("/metrics")).text
        assert "lmgate_background_responses 0.0" in metrics
        assert (await client.get(f"/v1/responses/{rid}")).json()["status"] == "cancelled"
        again = await client.post(f"/v1/responses/{rid}/cancel")  # idempotent
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        # a cancelled response is stored: it continues (in the background: "HANG" hangs again)
        cont = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "background": True,
                                                        "previous_response_id": rid})
        assert cont.status_code == 200, cont.text
        assert (await client.post(f"/v1/responses/{cont.json()['id']}/cancel")).json()["status"] == "cancelled"


async def test_only_background_responses_cancel_and_an_ended_one_stays_as_it_ended(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        plain = (await client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 1})).json()
        r = await client.post(f"/v1/responses/{plain['id']}/cancel")
        assert r.status_code == 400 and "background" in r.json()["error"]["message"]
        r = await client.post("/v1/responses/resp_nope/cancel")
        assert r.status_code == 404
        bg = (await client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 2,
                                                       "background": True})).json()
        done = await wait_for(client, bg["id"], "incomplete")
        r = await client.post(f"/v1/responses/{bg['id']}/cancel")
        assert r.status_code == 200 and r.json() == done
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "background": True, "store": False})
        assert r.status_code == 400 and r.json()["error"]["param"] == "background"
        for bad in ("stream=maybe", "stream=true&starting_after=-1", "stream=true&starting_after=x"):
            r = await client.get(f"/v1/responses/{bg['id']}?{bad}")
            assert r.status_code == 400, bad
        r = await client.get(f"/v1/responses/{plain['id']}?stream=true")
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


async def test_the_stream_drops_the_response_runs_on_and_the_stream_resumes(gateway: Gateway) -> None:
    gateway.runtime.delay = 0.1
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        async with client.stream("POST", "/v1/responses", json={
                "model": MODEL, "input": "x", "background": True, "stream": True, "max_output_tokens": 8}) as r:
            assert r.status_code == 200
            first = await events_until(r.aiter_lines(), 5)
        # created (queued), queued, in_progress, the message's two "added", a delta ...
        assert [e["type"] for e in first[:3]] == ["response.created", "response.queued", "response.in_progress"]
        assert first[0]["response"]["status"] == "queued"
        rid = first[0]["response"]["id"]
        await trio.sleep(0.2)
        assert rid not in gateway.runtime.cancelled  # the dropped stream did not end it
        async with client.stream("GET", f"/v1/responses/{rid}?stream=true&starting_after=5") as r:
            assert r.status_code == 200
            rest = await sse_events(r)
        seq = [e["sequence_number"] for e in first + rest]
        assert seq == list(range(len(seq)))  # nothing lost, nothing twice
        assert rest[-1]["type"] == "response.incomplete"
        deltas = "".join(e["delta"] for e in first + rest if e["type"] == "response.output_text.delta")
        assert deltas == text_of(rest[-1]["response"]) == "".join(word(0, j) for j in range(8))
        # after the end, the whole stream again from the start
        async with client.stream("GET", f"/v1/responses/{rid}?stream=true") as r:
            again = await sse_events(r)
        assert again == first + rest


async def test_deleting_a_running_response_cancels_it_and_it_stays_deleted(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        rid = (await client.post("/v1/responses", json={"model": MODEL, "input": "HANG", "background": True})).json()["id"]
        await wait_for(client, rid, "in_progress")
        r = await client.delete(f"/v1/responses/{rid}")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert rid in gateway.runtime.cancelled
        await trio.sleep(1.5)  # past a tick of the run's writes
        assert (await client.get(f"/v1/responses/{rid}")).status_code == 404


async def test_another_server_of_the_redis_reads_and_cancels_a_response(nursery: trio.Nursery, gateway: Gateway) -> None:
    other_url, _, stop = await start_gateway(nursery, gateway.stores, gateway.config)
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as here, \
                httpx.AsyncClient(base_url=other_url, headers=gateway.headers) as there:
            rid = (await here.post("/v1/responses", json={"model": MODEL, "input": "HANG",
                                                          "background": True})).json()["id"]
            # the other server reads it from the store, as the running one writes it each second
            seen = await wait_for(there, rid, "in_progress", timeout=5)
            assert seen["background"] is True
            with trio.fail_after(5):
                while text_of(seen) != word(0, 0):
                    await trio.sleep(0.2)
                    seen = (await there.get(f"/v1/responses/{rid}")).json()
            # the other server streams its events as the running one shares them in Redis
            async with there.stream("GET", f"/v1/responses/{rid}?stream=true") as stream:
                r = await there.post(f"/v1/responses/{rid}/cancel")
                assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
                tail = await sse_events(stream)
            assert [e["type"] for e in tail][:3] == ["response.created", "response.queued", "response.in_progress"]
            assert tail[-1]["type"] == "response.cancelled"
            assert [e["sequence_number"] for e in tail] == list(range(len(tail)))
            assert rid in gateway.runtime.cancelled
            assert (await here.get(f"/v1/responses/{rid}")).json()["status"] == "cancelled"
            # and resumes there after any of them, as on the server that ran it
            async with there.stream("GET", f"/v1/responses/{rid}?stream=true&starting_after=2") as stream:
                assert await sse_events(stream) == tail[3:]
            async with here.stream("GET", f"/v1/responses/{rid}?stream=true&starting_after=2") as stream:
                assert await sse_events(stream) == tail[3:]
            # deleted while the other server follows it: its stream ends with an error event
            rid = (await here.post("/v1/responses", json={"model": MODEL, "input": "HANG",
                                                          "background": True})).json()["id"]
            await wait_for(there, rid, "in_progress", timeout=5)
            async with there.stream("GET", f"/v1/responses/{rid}?stream=true") as stream:
                assert (await here.delete(f"/v1/responses/{rid}")).status_code == 200
                tail = await sse_events(stream)
            assert (tail[-1]["type"], tail[-1]["code"]) == ("error", "not_found")  # after what was shared
            assert "response.cancelled" not in [e["type"] for e in tail]  # (a deleted run shares nothing more)
            # the project's client raises it: NotFound
            rid = (await here.post("/v1/responses", json={"model": MODEL, "input": "HANG",
                                                          "background": True})).json()["id"]
            await wait_for(there, rid, "in_progress", timeout=5)
            client = LmgateClient(other_url, gateway.api_key)
            async with client, client.resume_stream(rid) as followed:
                assert (await here.delete(f"/v1/responses/{rid}")).status_code == 200
                with pytest.raises(NotFound):
                    [e async for e in followed]
    finally:
        stop.set()


async def run_in(scope: trio.CancelScope, task) -> None:  # noqa: ANN001
    with scope:
        await task()


async def test_a_stream_followed_on_another_server_rides_out_a_redis_stall(
        nursery: trio.Nursery, gateway: Gateway, redis_server: PrivateRedis) -> None:
    """A follower's poll that found Redis stalled (or skipped: another call failed a moment
    before) raised out of the stream: the client saw the connection cut, no `error` event.
    It polls on through a short outage, and the stream ends as the response does."""
    gateway.runtime.delay = 0.1
    other_url, _, stop = await start_gateway(nursery, gateway.stores, gateway.config)
    watching = trio.CancelScope()
    nursery.start_soon(lambda: run_in(watching, gateway.stores.redis.watch))  # (as `lmgate serve` runs it)
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers, timeout=30) as here, \
                httpx.AsyncClient(base_url=other_url, headers=gateway.headers, timeout=30) as there:
            rid = (await here.post("/v1/responses", json={"model": MODEL, "input": "write", "background": True,
                                                          "max_output_tokens": 40})).json()["id"]
            await wait_for(there, rid, "in_progress", timeout=5)
            async with there.stream("GET", f"/v1/responses/{rid}?stream=true") as stream:
                lines = stream.aiter_lines()
                head = await events_until(lines, 4)
                os.kill(redis_server.pid, signal.SIGSTOP)  # (longer than a call's timeouts)
                try:
                    await trio.sleep(4)
                finally:
                    os.kill(redis_server.pid, signal.SIGCONT)
                events = head + [json.loads(line[6:]) async for line in lines if line.startswith("data: ")]
    finally:
        stop.set()
        watching.cancel()
    assert events[-1]["type"] == "response.incomplete", events[-1]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


async def test_a_response_left_running_by_a_stopped_server_reads_failed(gateway: Gateway) -> None:
    tenant = await gateway.stores.tenants.get_tenant("t1")
    owner = owner_of(tenant.id, tenant.created_at)
    store = ResponseStore(gateway.stores.redis)
    left = {"id": "resp_left", "object": "response", "status": "in_progress", "background": True,
            "output": [{"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant",
                        "content": [{"type": "output_text", "text": "half", "annotations": [], "logprobs": []}]}]}
    await store.put(owner, StoredResponse(response=left, context=[], input=[], running_until=time.time() - 1,
                                          last_sequence=2))
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        got = (await client.get("/v1/responses/resp_left")).json()
        assert got["status"] == "failed" and got["error"]["code"] == "server_error"
        assert got["output"][0]["status"] == "incomplete" and text_of(got) == "half"
        async with client.stream("GET", "/v1/responses/resp_left?stream=true&starting_after=2") as r:
            events = await sse_events(r)
        assert [(e["type"], e["sequence_number"]) for e in events] == [("response.failed", 3)]
        # its client read more than the server wrote before it died: it learns the end all the same
        async with client.stream("GET", "/v1/responses/resp_left?stream=true&starting_after=7") as r:
            assert [(e["type"], e["sequence_number"]) for e in await sse_events(r)] == [("response.failed", 8)]
        # it has ended (failed): a cancel returns it so, and keeps it so, event number and all
        r = await client.post("/v1/responses/resp_left/cancel")
        assert r.status_code == 200 and r.json() == got
        assert (await client.get("/v1/responses/resp_left")).json() == got
        async with client.stream("GET", "/v1/responses/resp_left?stream=true") as r:
            assert [(e["type"], e["sequence_number"]) for e in await sse_events(r)] == [("response.failed", 3)]


async def test_a_plain_response_reads_in_progress_while_it_streams(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        async with client.stream("POST", "/v1/responses", json={"model": MODEL, "input": "HANG", "stream": True}) as r:
            lines = r.aiter_lines()  # (kept: a dropped iterator closes the stream)
            first = await events_until(lines, 4)  # ... the first delta
            rid = first[0]["response"]["id"]
            got = (await client.get(f"/v1/responses/{rid}")).json()
            assert got["status"] == "in_progress" and text_of(got) == word(0, 0)
            items = await client.get(f"/v1/responses/{rid}/input_items")
            assert [i["content"][0]["text"] for i in items.json()["data"]] == ["HANG"], items.text
            r = await client.post(f"/v1/responses/{rid}/cancel")
            assert r.status_code == 400, r.text
            r = await client.get(f"/v1/responses/{rid}?stream=true")  # not background: not streamed again
            assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text
        with trio.fail_after(5):  # the client left: it was not finished, so it is not stored
            while (await client.get(f"/v1/responses/{rid}")).status_code != 404:
                await trio.sleep(0.05)


async def test_a_server_stopping_stores_its_running_responses_failed(nursery: trio.Nursery, gateway: Gateway) -> None:
    url, _, stop = await start_gateway(nursery, gateway.stores, gateway.config)
    async with httpx.AsyncClient(base_url=url, headers=gateway.headers) as client:
        rid = (await client.post("/v1/responses", json={"model": MODEL, "input": "HANG",
                                                        "background": True})).json()["id"]
        await wait_for(client, rid, "in_progress")
    stop.set()
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        with trio.fail_after(gateway.config.shutdown_grace_seconds + 10):
            while (got := (await client.get(f"/v1/responses/{rid}")).json())["status"] == "in_progress":
                await trio.sleep(0.1)
    assert got["status"] == "failed" and "stopped" in got["error"]["message"]


async def test_the_sdk_runs_polls_and_cancels_background_responses(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0)

    def run() -> tuple[Any, Any, Any]:
        done = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, background=True)
        while done.status in ("queued", "in_progress"):
            time.sleep(0.05)
            done = client.responses.retrieve(done.id)
        hung = client.responses.create(model=MODEL, input="HANG", background=True)
        cancelled = client.responses.cancel(hung.id)
        with client.responses.retrieve(hung.id, stream=True, starting_after=0) as stream:
            tail = [e.type for e in stream]
        return done, cancelled, tail

    done, cancelled, tail = await trio.to_thread.run_sync(run)
    assert done.status == "incomplete" and done.output_text == word(0, 0) + word(0, 1)
    assert cancelled.status == "cancelled"
    assert tail[0] == "response.queued" and tail[-1] == "response.cancelled"


async def test_a_response_that_does_not_change_is_not_written_every_second(gateway: Gateway, monkeypatch) -> None:
    """Its running_until is renewed every 10 s (a third of the 30 s): between, a response
    waiting on the engine costs Redis nothing."""
    writes: list[int | None] = []
    put = ResponseStore.put

    async def counted(self, owner, stored, *, existing=False):  # type: ignore[no-untyped-def]
        if existing:
            writes.append(stored.last_sequence)
        return await put(self, owner, stored, existing=existing)

    monkeypatch.setattr(ResponseStore, "put", counted)
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        rid = (await client.post("/v1/responses", json={"model": MODEL, "input": "HANG", "background": True})).json()["id"]
        await wait_for(client, rid, "in_progress")
        await trio.sleep(2.5)  # two more ticks: nothing new to write
        assert len(writes) == 1, writes  # the first token's
        await client.post(f"/v1/responses/{rid}/cancel")
    assert len(writes) == 2  # and how it ended


async def test_a_response_running_here_is_not_continued_before_its_end(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        rid = (await client.post("/v1/responses", json={"model": MODEL, "input": "HANG", "background": True})).json()["id"]
        await wait_for(client, rid, "in_progress")
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": rid})
        assert r.status_code == 400 and "still in_progress" in r.json()["error"]["message"]
        await client.post(f"/v1/responses/{rid}/cancel")


async def test_a_run_cancelled_from_outside_leaves_as_one_cancelled_not_a_group() -> None:
    """A server cut short cancels a background run's tasks: their group of Cancelled was
    logged by Quart as an error with its traceback; it leaves as the one Cancelled it is."""
    from gateway.responses_live import only_cancelled

    caught: list[BaseException] = []
    with trio.CancelScope() as outer:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                nursery.start_soon(trio.sleep_forever)
                await trio.sleep(0)
                outer.cancel()
                await trio.sleep_forever()
        except BaseExceptionGroup as group:
            caught.append(group)
    assert len(caught) == 1 and isinstance(only_cancelled(caught[0]), trio.Cancelled)
    assert only_cancelled(BaseExceptionGroup("g", [ValueError("a bug"), BaseExceptionGroup("h", [KeyError()])])) is None
    assert only_cancelled(ExceptionGroup("g", [ValueError("x")])) is None


async def pings_then_events(stream: httpx.Response, seconds: float) -> tuple[int, list[str]]:
    """The pings and the data lines a stream sends within `seconds`."""
    pings, data = 0, []
    with trio.move_on_after(seconds):
        async for line in stream.aiter_lines():
            if line == ": ping":
                pings += 1
            elif line.startswith("data: "):
                data.append(line)
    return pings, data


async def test_a_silent_background_stream_pings_here_and_on_another_server(nursery: trio.Nursery,
                                                                           gateway: Gateway) -> None:
    """A background response's stream (the POST's, and GET's on the server that runs it and
    on another one) that has nothing to send sends `: ping` every `sse_ping_seconds`."""
    config = dataclasses.replace(gateway.config, sse_ping_seconds=0.3)
    here_url, _, stop_here = await start_gateway(nursery, gateway.stores, config)
    there_url, _, stop_there = await start_gateway(nursery, gateway.stores, config)
    async with httpx.AsyncClient(base_url=here_url, headers=gateway.headers) as here, \
            httpx.AsyncClient(base_url=there_url, headers=gateway.headers) as there:
        body = {"model": MODEL, "input": "HANG", "background": True, "stream": True}
        async with here.stream("POST", "/v1/responses", json=body) as posted:
            pings, data = await pings_then_events(posted, 1.6)
        rid = json.loads(data[0][6:])["response"]["id"]
        assert pings >= 3 and len(data) == 6  # created, queued, in_progress, item and part added, one token
        for client in (here, there):
            async with client.stream("GET", f"/v1/responses/{rid}?stream=true") as followed:
                pings, data = await pings_then_events(followed, 1.6)
            assert pings >= 3 and len(data) >= 4, (client.base_url, pings, data)
        assert (await here.post(f"/v1/responses/{rid}/cancel")).status_code == 200
    stop_here.set()
    stop_there.set()


async def stored_status(store: ResponseStore, owner: str, response_id: str) -> str | None:
    try:
        found = await store.get(owner, response_id)
    except CacheUnavailable:
        return None
    return None if found is None else found.response["status"]


async def test_a_response_that_ends_while_redis_is_stalled_is_stored_as_it_ended(
        gateway: Gateway, redis_server: PrivateRedis) -> None:
    """A run whose end Redis could not take (here: cancelled during a stall) was stored as
    it stood before: in progress, then failed ("the server stopped") though it had ended
    and been billed, and GET was a 503. This server answers from the run meanwhile, and
    writes its end as soon as Redis answers again."""
    tenant = await gateway.stores.tenants.get_tenant("t1")
    owner, store = owner_of(tenant.id, tenant.created_at), ResponseStore(gateway.stores.redis)
    async with (httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers, timeout=30) as client,
                trio.open_nursery() as nursery):
        await nursery.start(gateway.stores.redis.watch)  # (as `lmgate serve` runs it)
        rid = (await client.post("/v1/responses", json={"model": MODEL, "input": "HANG",
                                                        "background": True})).json()["id"]
        await wait_for(client, rid, "in_progress")
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            r = await client.post(f"/v1/responses/{rid}/cancel")
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
            r = await client.get(f"/v1/responses/{rid}")
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        with trio.fail_after(10):
            while await stored_status(store, owner, rid) != "cancelled":
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_a_background_response_redis_cannot_keep_is_refused_before_it_runs(
        gateway: Gateway, redis_server: PrivateRedis) -> None:
    """Stored as queued before it is submitted: a stalled Redis is a 503 with nothing run
    or billed (submitted first, the tokens generated while the write waited out the stall
    were charged for a refused request)."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers, timeout=30) as client:
        assert (await client.get("/v1/models")).status_code == 200  # (the key is seen: served in the stall)
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            r = await client.post("/v1/responses", json={"model": MODEL, "input": "write", "background": True,
                                                         "max_output_tokens": 4})
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
    assert gateway.runtime.calls == []


async def test_a_background_response_refused_at_admission_is_not_left_stored(gateway: Gateway) -> None:
    gateway.runtime.reject = Rejected("", 429, "rate_limit_exceeded", "quota max_concurrent", retry_after=1.0)
    tenant = await gateway.stores.tenants.get_tenant("t1")
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "write", "background": True})
        assert r.status_code == 429, r.text
        [call] = gateway.runtime.calls
        rid = call.request_id
        assert rid.startswith("resp_")
        assert (await client.get(f"/v1/responses/{rid}")).status_code == 404
    assert await ResponseStore(gateway.stores.redis).get(owner_of(tenant.id, tenant.created_at), rid) is None


async def test_a_stored_response_answered_during_a_redis_stall_is_stored_when_it_answers(
        nursery: trio.Nursery, gateway: Gateway, redis_server: PrivateRedis) -> None:
    """A response (not background) answered while Redis could not take it was lost: GET and
    `previous_response_id` were 404s for good. This server answers them from the run, and
    stores it once Redis answers; one deleted meanwhile stays deleted."""
    tenant = await gateway.stores.tenants.get_tenant("t1")
    owner, store = owner_of(tenant.id, tenant.created_at), ResponseStore(gateway.stores.redis)
    watching = trio.CancelScope()
    nursery.start_soon(lambda: run_in(watching, gateway.stores.redis.watch))  # (as `lmgate serve` runs it)
    body = {"model": MODEL, "input": "write", "max_output_tokens": 3}
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers, timeout=30) as client:
            assert (await client.get("/v1/models")).status_code == 200  # (the key is seen: served in the stall)
            os.kill(redis_server.pid, signal.SIGSTOP)
            try:
                first = await client.post("/v1/responses", json=body)
                kept, dropped = first.json()["id"], (await client.post("/v1/responses", json=body)).json()["id"]
                assert (await client.get(f"/v1/responses/{kept}")).json()["status"] == "incomplete"
                items = await client.get(f"/v1/responses/{kept}/input_items")  # (answered from the run, as GET)
                assert [i["content"][0]["text"] for i in items.json()["data"]] == ["write"], items.text
                r = await client.post("/v1/responses", json={**body, "previous_response_id": kept})
                assert r.status_code == 200, r.text
                # (a write that timed out in the stall may still land: "may or may not be deleted; retry")
                assert (await client.delete(f"/v1/responses/{dropped}")).status_code == 503
            finally:
                os.kill(redis_server.pid, signal.SIGCONT)
            with trio.fail_after(10):
                while await stored_status(store, owner, kept) != "incomplete":
                    await trio.sleep(0.1)
            assert (await client.delete(f"/v1/responses/{dropped}")).status_code in (200, 404)  # the retry
            await trio.sleep(1)  # (a retry of its write, were it still going, went as Redis answered)
            assert (await client.get(f"/v1/responses/{dropped}")).status_code == 404
            assert await store.get(owner, dropped) is None
    finally:
        watching.cancel()


@asynccontextmanager
async def two_servers(nursery: trio.Nursery, gateway: Gateway) -> AsyncIterator[tuple[httpx.AsyncClient,
                                                                                   httpx.AsyncClient]]:
    """Clients of the gateway and of another server of the same Redis (stopped after)."""
    other_url, _, stop = await start_gateway(nursery, gateway.stores, gateway.config)
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as here, \
                httpx.AsyncClient(base_url=other_url, headers=gateway.headers) as there:
            yield here, there
    finally:
        stop.set()


async def start_hanging(client: httpx.AsyncClient) -> str:
    """A background response that streams one token and then waits until cancelled."""
    return (await client.post("/v1/responses", json={"model": MODEL, "input": "HANG", "background": True})).json()["id"]


async def test_a_response_deleted_on_another_server_is_gone_from_the_one_running_it(
        nursery: trio.Nursery, gateway: Gateway) -> None:
    """Deleted by another server, the run was only cancelled where it ran: that server
    streamed its events from memory for 10 minutes, and shared them in Redis again."""
    tenant = await gateway.stores.tenants.get_tenant("t1")
    owner = owner_of(tenant.id, tenant.created_at)
    async with two_servers(nursery, gateway) as (here, there):
        rid = await start_hanging(here)
        await wait_for(there, rid, "in_progress", timeout=5)
        assert (await there.delete(f"/v1/responses/{rid}")).status_code == 200
        with trio.fail_after(5):  # the running server reads the flag within a second
            while rid not in gateway.runtime.cancelled:
                await trio.sleep(0.1)
        await trio.sleep(0.5)
        for client in (here, there):
            assert (await client.get(f"/v1/responses/{rid}")).status_code == 404
            assert (await client.get(f"/v1/responses/{rid}?stream=true")).status_code == 404
            assert (await client.post(f"/v1/responses/{rid}/cancel")).status_code == 404
        # one that has ended there (no flag reaches it then): not streamed from its memory either
        ended = (await here.post("/v1/responses", json={"model": MODEL, "input": "write", "background": True,
                                                        "max_output_tokens": 2})).json()["id"]
        await wait_for(here, ended, "incomplete")
        assert (await there.delete(f"/v1/responses/{ended}")).status_code == 200
        assert (await here.get(f"/v1/responses/{ended}?stream=true")).status_code == 404
        assert (await here.post(f"/v1/responses/{ended}/cancel")).status_code == 404
    store = gateway.stores.redis
    assert await store.client.exists([store.key("resp2events", owner, rid)]) == 0
