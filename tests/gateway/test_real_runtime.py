"""The whole stack: `serve()` with the real runtime (SmolLM2 on the CPU), real Redis,
Hypercorn, and the official openai package / the lmgate client as callers."""

from __future__ import annotations

import datetime as dt
import io
import json
import re

import httpx
import openai
import pytest
import torch
import trio

from cache.quotas import QuotaManager
from cache.store import RedisStore
from clients import LmgateClient
from gateway.config import GatewayConfig
from gateway.server import serve
from gateway.sse import parse_events
from gpu.quantization import int8_unavailable_reason
from tests.conftest import serve_real

TEST_KV_MB = 256  # 5.8k fp32 tokens: room for these tests; the 1.5 GiB default was zeroed per server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]


async def wait_idle(base_url: str) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=base_url) as client:
        with trio.fail_after(30):
            while True:
                status = (await client.get("/readyz")).json()
                if status.get("in_flight", 0) == 0 and status.get("running", 0) == 0:
                    return status
                await trio.sleep(0.1)


async def serve_with_tenant(nursery: trio.Nursery, tmp_path, redis_url: str, tenant_id: str,  # type: ignore[no-untyped-def]
                            quota: dict[str, int]) -> tuple[str, str, trio.Event]:
    """`serve()` on the real runtime (float32, admin key "adm"), a tenant of that quota and
    a key of it: (base URL, key, the event that stops the server)."""
    torch.set_num_threads(2)
    stop = trio.Event()
    config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm",
                           shutdown_grace_seconds=1, dtype="float32", kv_cache_mb=TEST_KV_MB)
    urls = await nursery.start(lambda task_status: serve(config, shutdown_trigger=stop.wait, out=io.StringIO(),
                                                         task_status=task_status))
    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": "Bearer adm"}) as admin:
        r = await admin.post("/admin/tenants", json={"id": tenant_id, "name": tenant_id, "quota": quota})
        assert r.status_code == 201, r.text
        key = (await admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "k"})).json()["key"]
    return urls[0], key, stop


async def test_real_runtime_end_to_end(nursery: trio.Nursery, tmp_path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    # float32: "Paris" below is float32's greedy answer; the first token is a near-tie ("The"
    # 0.152 against "L" 0.140) that bf16 rounding (the "auto" dtype on AVX512-BF16 CPUs) can flip
    config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm",
                           shutdown_grace_seconds=1, dtype="float32", kv_cache_mb=TEST_KV_MB)
    urls, key, stop = await serve_real(nursery, config)
    base_url = urls[0]

    sdk = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)
    model = (await trio.to_thread.run_sync(sdk.models.list)).data[0].id

    def ask() -> str:
        reply = sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0,
        )
        return reply.choices[0].message.content or ""

    assert "Paris" in await trio.to_thread.run_sync(ask)
    with pytest.raises(openai.BadRequestError) as outside:  # a stop token id outside the vocabulary
        await trio.to_thread.run_sync(lambda: sdk.completions.create(
            model=model, prompt="Hi", max_tokens=2, extra_body={"stop_token_ids": [10**6]}))
    assert outside.value.body["param"] == "stop_token_ids"
    with pytest.raises(openai.NotFoundError):  # refused by the gateway, before admission
        await trio.to_thread.run_sync(lambda: sdk.completions.create(model="nope", prompt="Hi", max_tokens=2))
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": "Bearer adm"}) as http:
        scrape = (await http.get("/metrics")).text
    assert 'lmgate_rejections_total{reason="model_not_found",status="404",tenant="dev"} 1.0' in scrape
    assert re.search(r'lmgate_rejections_total\{reason="invalid_value",status="400",tenant="dev"\} 1\.0', scrape)

    # a prefilled answer (vLLM's continue_final_message): the model continues the last
    # message, the reply is the continuation alone, and the prompt is what /tokenize counts
    prefill = [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "The capital of France is"}]
    ending = {"add_generation_prompt": False, "continue_final_message": True}

    def continued() -> tuple[str, int]:
        reply = sdk.chat.completions.create(model=model, messages=prefill, max_tokens=6, temperature=0,
                                            extra_body=ending)
        return reply.choices[0].message.content or "", reply.usage.prompt_tokens

    text, prompt_tokens = await trio.to_thread.run_sync(continued)
    assert "Paris" in text and "capital" not in text
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as http:
        counted = (await http.post("/tokenize", json={"messages": prefill, **ending})).json()["count"]
        closed = (await http.post("/tokenize", json={"messages": prefill})).json()["count"]
    assert prompt_tokens == counted < closed  # no end of turn, no new assistant header
    assert await trio.to_thread.run_sync(continued) == (text, prompt_tokens)  # again, through the prompt cache

    # usage says which prompt tokens were not computed: a shared prefix's blocks found in the
    # prefix cache (whole blocks, never all), and all of them for an answer from the response cache
    system = {"role": "system", "content": "You are a careful geography teacher. " * 8}

    def shared(question: str, **extra):  # type: ignore[no-untyped-def]
        return sdk.chat.completions.create(model=model, messages=[system, {"role": "user", "content": question}],
                                           max_tokens=2, temperature=0, **extra).usage

    first = await trio.to_thread.run_sync(lambda: shared("Name a river.", extra_headers={"Cache-Control": "no-store"}))
    second = await trio.to_thread.run_sync(lambda: shared("Name a mountain."))
    assert first.prompt_tokens_details.cached_tokens < 16 <= second.prompt_tokens_details.cached_tokens
    assert second.prompt_tokens_details.cached_tokens % 16 == 0 and second.prompt_tokens_details.cached_tokens < \
        second.prompt_tokens
    replayed = await trio.to_thread.run_sync(lambda: shared("Name a mountain."))  # the response cache answers
    assert replayed.prompt_tokens_details.cached_tokens == replayed.prompt_tokens
    # a cached answer says its age; only-if-cached answers from the cache or with a 504
    raw = await trio.to_thread.run_sync(lambda: sdk.chat.completions.with_raw_response.create(
        model=model, messages=[system, {"role": "user", "content": "Name a mountain."}], max_tokens=2,
        temperature=0, extra_headers={"Cache-Control": "only-if-cached, max-age=600"}))
    assert 0 <= int(raw.headers["age"]) < 600 and raw.parse().usage == replayed
    with pytest.raises(openai.APIStatusError) as uncached:
        await trio.to_thread.run_sync(lambda: shared("Name a lake.", extra_headers={"Cache-Control": "only-if-cached"}))
    assert uncached.value.status_code == 504 and uncached.value.body["code"] == "not_cached"
    echoed = await trio.to_thread.run_sync(lambda: sdk.chat.completions.create(
        model=model, messages=prefill, max_tokens=6, temperature=0, extra_body={**ending, "echo": True}))
    assert echoed.choices[0].message.content == "The capital of France is" + text  # vLLM's echo: prefill first

    async with LmgateClient(base_url, key, model=model) as client:
        async with client.completions_stream("The capital of France is", max_tokens=4, temperature=0) as stream:
            text = "".join([d.text async for d in stream])
        assert "Paris" in text
        assert stream.usage is not None and stream.usage.completion_tokens <= 4
        async with client.ws() as session, session.completions_stream("The capital of France is", max_tokens=4, temperature=0) as ws_stream:
            ws_deltas = [d async for d in ws_stream]
            assert "".join(d.text for d in ws_deltas) == text  # greedy: same answer on both transports
            [end] = [d for d in ws_deltas if d.finish_reason]  # one finish, on the choice's last token frame
            assert end is ws_deltas[-1] and end.token_ids and end.finish_reason == ws_stream.finish_reasons[0]

        # disconnect = abort: a long generation is dropped after its first token
        async with client.completions_stream("Once upon a time", max_tokens=2000, ignore_eos=True) as long:
            async for _ in long:
                break
    await wait_idle(base_url)
    stop.set()


@pytest.mark.skipif(int8_unavailable_reason() is not None, reason="no fast oneDNN int8 linear on this CPU "
                    "(the server refuses --quantization int8 there, as tests/gpu/test_quantization.py checks)")
async def test_an_int8_server_streams_over_sse_and_websocket(nursery: trio.Nursery, tmp_path,  # type: ignore[no-untyped-def]
                                                            redis_url: str) -> None:
    """`--quantization int8` through the whole stack: the engine calibrates and quantizes at
    start, and a greedy completion streams the same text over SSE and the WebSocket."""
    torch.set_num_threads(2)
    config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=redis_url, shutdown_grace_seconds=1,
                           dtype="float32", quantization="int8", kv_cache_mb=64)
    urls, key, stop = await serve_real(nursery, config)
    async with LmgateClient(urls[0], key) as client:
        async with client.completions_stream("The capital of France is", max_tokens=4, temperature=0) as stream:
            text = "".join([d.text async for d in stream])
        assert "Paris" in text
        async with client.ws() as session, session.completions_stream("The capital of France is", max_tokens=4,
                                                                      temperature=0) as ws_stream:
            assert "".join([d.text async for d in ws_stream]) == text
    status = await wait_idle(urls[0])
    assert status["kv_usage"] == 0.0
    stop.set()


async def test_the_last_frame_of_a_request_frees_its_concurrency_slot(nursery: trio.Nursery, tmp_path,  # type: ignore[no-untyped-def]
                                                                      redis_url: str) -> None:
    """With `max_concurrent: 1`, a request sent the moment the previous one's `done` or
    `cancelled` frame (or its HTTP response) arrived is admitted, not refused with 429
    for the one that just ended: the last frame waits for the quota to settle."""
    from httpx_ws import aconnect_ws

    base_url, key, stop = await serve_with_tenant(nursery, tmp_path, redis_url, "one", {"max_concurrent": 1})

    def frame(rid: str, max_tokens: int) -> dict[str, object]:
        return {"type": "request", "id": rid, "endpoint": "completions",
                "body": {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": max_tokens,
                         "ignore_eos": True, "temperature": 1.0}}

    async def until(ws, kinds: set[str]) -> dict[str, object]:  # type: ignore[no-untyped-def]
        while True:
            f = await ws.receive_json()
            if f["type"] in kinds or f["type"] == "error":
                return f

    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers) as client, \
            aconnect_ws(base_url.replace("http", "ws") + "/v1/ws", client) as ws:
        assert (await ws.receive_json())["type"] == "ready"
        for i in range(4):
            await ws.send_json(frame(f"long{i}", 200))
            f = await until(ws, {"token"})
            assert f["type"] == "token", f
            await ws.send_json({"type": "cancel", "id": f"long{i}"})
            assert (await until(ws, {"cancelled"}))["type"] == "cancelled"
            await ws.send_json(frame(f"next{i}", 2))
            f = await until(ws, {"done"})
            assert f["type"] == "done", f  # not a 429 error frame
        for _ in range(4):  # HTTP: one response, then the next request at once
            r = await client.post(base_url + "/v1/completions",
                                  json={"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 2, "temperature": 1.0})
            assert r.status_code == 200, r.text
    await wait_idle(base_url)
    stop.set()


@pytest.mark.parametrize("grace, second", [(1.5, False), (0.0, False), (600.0, True)],
                         ids=["grace", "no-grace", "second-signal"])
async def test_a_stream_still_running_when_the_grace_period_ends_gets_an_error_event(  # type: ignore[no-untyped-def]
        nursery: trio.Nursery, tmp_path, redis_url: str, grace: float, second: bool) -> None:
    """Also with no grace at all (the stream was cut before its error event went out), and
    on a second stop signal, which cuts a long grace short."""
    torch.set_num_threads(2)
    stop, cut = trio.Event(), trio.Event()
    config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm",
                           shutdown_grace_seconds=grace, dtype="float32", kv_cache_mb=TEST_KV_MB)
    done = trio.Event()

    async def run_server(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(config, shutdown_trigger=stop.wait, cut_trigger=cut.wait, out=io.StringIO(),
                    task_status=task_status)
        done.set()

    async def second_signal() -> None:
        await stop.wait()
        await trio.sleep(0.5)
        cut.set()

    base_url = (await nursery.start(run_server))[0]
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": "Bearer adm"}) as admin:
        await admin.post("/admin/tenants", json={"id": "late", "name": "Late", "quota": {"max_concurrent": 1}})
        key = (await admin.post("/admin/tenants/late/keys", json={"name": "k"})).json()["key"]
    text = ""
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client, \
            client.stream("POST", "/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Once",
                                                              "max_tokens": 4000, "ignore_eos": True,
                                                              "stream": True}) as r:
        if second:
            nursery.start_soon(second_signal)
        async for chunk in r.aiter_text():
            text += chunk
            if not stop.is_set():
                stop.set()  # shut down with the stream running: it outlives the grace
                stopped_at = trio.current_time()
    events = parse_events(text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down", events[-2]
    with trio.fail_after(30):
        await done.wait()
    assert trio.current_time() - stopped_at < 30  # (a second signal: not the 600 s grace)
    # accounted before the runtime stopped: the usage is recorded and the slot is free
    async with RedisStore(redis_url) as store:
        quotas = QuotaManager(store)
        assert await quotas.running("late") == 0
        today = dt.datetime.now(dt.UTC).date()
        [row] = await quotas.get_usage("late", today, today)
        assert row.requests == 1 and 0 < row.completion_tokens < 4000


async def test_a_key_that_spent_its_minute_on_refused_prompts_is_refused_everywhere(  # type: ignore[no-untyped-def]
        nursery: trio.Nursery, tmp_path, redis_url: str) -> None:
    """A prompt too long for the window is a 400 that still counts one request a minute
    (as OpenAI counts unsuccessful requests); a key limited to one is then refused at once
    on the generation routes and on /tokenize (which counts none), with when to retry."""
    base_url, key, stop = await serve_with_tenant(nursery, tmp_path, redis_url, "once", {"requests_per_minute": 1})
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as http:
        body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 2}
        r = await http.post("/tokenize", json={"prompt": "Hi"})  # counts nothing
        assert r.status_code == 200, r.text
        r = await http.post("/v1/completions", json={**body, "prompt": "word " * 9000})  # over the 8192 window
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        for path, extra in (("/v1/completions", {**body, "prompt": "Hi"}), ("/tokenize", {"prompt": "Hi"})):
            r = await http.post(path, json=extra)
            assert r.status_code == 429, (path, r.text)
            assert r.json()["error"]["code"] == "rate_limit_exceeded" and 50 < float(r.headers["retry-after"]) <= 60
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
    stop.set()


async def test_identical_requests_sent_at_once_are_generated_once(nursery: trio.Nursery, tmp_path,  # type: ignore[no-untyped-def]
                                                                  redis_url: str) -> None:
    """Three identical greedy requests at once over HTTP: one generates, the other two
    wait for its answer (actors.flights) and get it, billed as cache hits; so do three
    streamed ones, over SSE, each sent the tokens as the first generates them."""
    base_url, key, stop = await serve_with_tenant(nursery, tmp_path, redis_url, "same", {})
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Write a haiku about rain", "max_tokens": 60,
            "ignore_eos": True, "temperature": 0}
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        async def ask() -> None:
            answers.append(await c.post("/v1/completions", json=body))

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(ask)
        assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
        texts = {r.json()["choices"][0]["text"] for r in answers}
        assert len(texts) == 1
        assert [r.json()["usage"]["completion_tokens"] for r in answers] == [60] * 3
        cached = sorted(r.json()["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
                        == r.json()["usage"]["prompt_tokens"] for r in answers)
        assert cached == [False, True, True]  # two were given the first's answer
        streams: list[tuple[str, dict]] = []

        async def stream() -> None:
            text, usage = "", {}
            async with c.stream("POST", "/v1/completions", json={
                    **body, "prompt": "Write a haiku about snow", "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        text += "".join(ch["text"] for ch in chunk["choices"])
                        usage = chunk.get("usage") or usage
            streams.append((text, usage))

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(stream)
        assert len({text for text, _ in streams}) == 1 and all(u["completion_tokens"] == 60 for _, u in streams)
        metrics = (await c.get("/metrics")).text
        assert 'lmgate_collapsed_requests_total{result="answered"} 4.0' in metrics
        assert "lmgate_collapsed_requests_waiting 0.0" in metrics
    await wait_idle(base_url)
    stop.set()
