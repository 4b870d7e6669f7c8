"""The actors end to end: the real engine (SmolLM2 on the CPU) and a real redis-server.

Drives `Runtime.submit` as the gateway does and checks what a user and an
operator would see: streamed deltas, usage settled exactly once in Redis
(finished, cancelled mid-stream, failed), KV blocks freed, quota and overload
refusals with Retry-After, response-cache hits that skip the engine, and an
engine failure that fails its requests but not the process.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import signal
from dataclasses import replace

import msgspec
import prometheus_client
import pytest
import trio

from actors.messages import (
    Accepted,
    ChatMessage,
    Failed,
    Finished,
    GenerateCall,
    Rejected,
    TenantContext,
    TokenDelta,
    Usage,
)
from actors.policies import PolicyConfig
from actors.queue_policy import QueueConfig
from actors.runtime import Runtime, RuntimeConfig, open_runtime
from cache.prompt_cache import PromptCache
from cache.quotas import Admitted, Quota, QuotaManager
from cache.response_cache import ResponseCache, scope_for
from cache.store import CacheUnavailable
from cache.tenants import Tenant
from gpu.config import CacheConfig, EngineConfig, SchedulerConfig
from gpu.engine import Engine
from gpu.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]

MODEL = "SmolLM2-135M-Instruct"
_ids = itertools.count()


def make_engine(ckpt, tokenizer, cache_mb: float = 48, **sched) -> Engine:
    cfg = EngineConfig(dtype="float32", cache=CacheConfig(cache_bytes=int(cache_mb * 1024**2)),
                       scheduler=replace(SchedulerConfig(max_model_len=2048), **sched))
    return Engine(cfg, checkpoint=ckpt, tokenizer=tokenizer)


def tenant(quota: Quota | None = None, **kw) -> TenantContext:
    t = Tenant(id=kw.pop("id", "acme"), name="Acme", quota=quota or Quota(), **kw)
    return TenantContext.from_tenant(t)


def call(t: TenantContext, *, prompt: str | None = None, messages=None, model: str = MODEL, **params) -> GenerateCall:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 8)
    return GenerateCall(
        request_id=f"req-{next(_ids)}", tenant=t, model=model, params=SamplingParams(**params),
        prompt=prompt, messages=messages,
    )


async def collect(acc: Accepted) -> tuple[str, list, object]:
    text, deltas, last = "", [], None
    async for ev in acc.events:
        if isinstance(ev, TokenDelta):
            text += ev.text
            deltas.append(ev)
        else:
            last = ev
    return text, deltas, last


async def read_tokens(acc: Accepted, at_least: int) -> int:
    """Read `acc`'s deltas until `at_least` tokens came; returns how many did."""
    got = 0
    async for ev in acc.events:
        got += len(ev.token_ids)
        if got >= at_least:
            break
    return got


async def test_each_choice_s_last_delta_carries_its_finish_reason(runtime):
    """n > 1: a choice's end is known at its last delta (a stream can end it there),
    and it agrees with the request's Finished."""
    acc = await runtime.submit(call(tenant(), prompt="My favourite animal is", n=3, temperature=1.0, seed=4,
                                    max_tokens=12))
    _, deltas, last = await collect(acc)
    assert isinstance(last, Finished)
    for i, reason in enumerate(last.finish_reasons):
        mine = [d.finish_reason for d in deltas if d.index == i]
        assert mine[-1] == reason and not any(mine[:-1]), (i, mine)


async def wait_until(pred, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


@pytest.fixture
async def services(store):
    return {"quotas": QuotaManager(store), "response_cache": ResponseCache(store), "prompt_cache": PromptCache(store),
            "store": store}


@pytest.fixture
async def runtime(nursery, ckpt, tokenizer, services):
    rt = Runtime(RuntimeConfig(), make_engine(ckpt, tokenizer), **services)
    await nursery.start(rt.run)
    return rt


async def usage_rows(quotas: QuotaManager, tenant_id: str):
    today = dt.datetime.now(dt.UTC).date()
    return await quotas.get_usage(tenant_id, today - dt.timedelta(days=1), today + dt.timedelta(days=1))


async def test_chat_streams_and_settles_usage(runtime, services):
    t = tenant(Quota(requests_per_minute=100))
    acc = await runtime.submit(call(t, messages=[ChatMessage("user", "What is the capital of France?")],
                                    max_tokens=16))
    assert isinstance(acc, Accepted) and acc.prompt_tokens > 10
    text, deltas, last = await collect(acc)
    assert "Paris" in text
    assert isinstance(last, Finished) and last.finish_reasons == ["stop"]
    assert last.usage.completion_tokens == sum(len(d.token_ids) for d in deltas)
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["stop"]  # the last delta says so
    # the stepper fits step time on tokens fed (the prefill, then one-token decodes) for the policies
    assert runtime.stepper.step_cost.steps >= 2
    # policies see the steps' recent mean (as in the simulator), not the raw last step
    st = runtime.stepper
    assert runtime.queue._view().step_time_s == st.mean_step_s > 0 and st.mean_step_s != st.last_step_s
    await wait_until(lambda: runtime.accounting.settled >= 1)
    [row] = await usage_rows(services["quotas"], "acme")
    assert (row.model, row.requests, row.prompt_tokens, row.completion_tokens) == (
        MODEL, 1, acc.prompt_tokens, last.usage.completion_tokens)
    assert await services["quotas"].running("acme") == 0


async def test_cancel_mid_stream_frees_blocks_and_settles_once(runtime, services):
    t = tenant(Quota(requests_per_minute=100))
    c = call(t, prompt="Once upon a time", max_tokens=600, ignore_eos=True)
    acc = await runtime.submit(c)
    assert isinstance(acc, Accepted)
    got = 0
    async for ev in acc.events:
        got += len(ev.token_ids)
        if got >= 3:
            break
    acc.cancel()
    engine = runtime.engine
    await wait_until(lambda: not engine.has_unfinished() and runtime.accounting.settled >= 1)
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    # /metrics follows the abort, though no step ran after it
    scraped = prometheus_client.generate_latest(runtime.registry).decode().splitlines()
    assert "lmgate_num_requests_running 0.0" in scraped and "lmgate_kv_cache_usage_ratio 0.0" in scraped
    [row] = await usage_rows(services["quotas"], "acme")
    assert row.requests == 1
    assert 3 <= row.completion_tokens < 600
    # exactly once: a second settle of the same request is refused
    assert not await services["quotas"].settle(t.as_tenant(), c.request_id, 1, 1, MODEL)


async def test_a_request_outliving_the_reservation_ttl_keeps_its_concurrency_slot(nursery, ckpt, tokenizer,
                                                                                   services):
    quotas = QuotaManager(services["store"], reservation_ttl_s=0.6)  # extended every 0.2 s
    rt = Runtime(RuntimeConfig(), make_engine(ckpt, tokenizer), **{**services, "quotas": quotas})
    await nursery.start(rt.run)
    t = tenant(Quota(max_concurrent=1))
    long = call(t, prompt="Once upon a time", max_tokens=600, ignore_eos=True)
    acc = await rt.submit(long)
    assert isinstance(acc, Accepted)
    await trio.sleep(1.5)  # two and a half TTLs; 600 tokens take far longer on a CPU
    assert rt.engine.has_unfinished() and await quotas.running("acme") == 1
    # each extension says what it has used so far: what a lapse would charge, were this process killed
    store = services["store"]
    noted = await store.client.hgetall(store.key("q", "{acme}", "res:" + long.request_id))
    assert noted[b"model"].decode() == MODEL and int(noted[b"prompt"]) > 0 and int(noted[b"completion"]) > 0
    second = await rt.submit(call(t, prompt="Hi"))
    assert isinstance(second, Rejected) and second.status == 429 and "max_concurrent" in second.message
    acc.cancel()
    await wait_until(lambda: not rt.engine.has_unfinished() and rt.accounting.settled >= 1)
    assert await quotas.running("acme") == 0


async def test_a_caller_cancelled_as_admission_answers_aborts_its_request(runtime, services, monkeypatch):
    # a WebSocket closed right after its request frame: the handler's wait for admission
    # is cancelled, and admission's Accepted lands in the reply buffer after that
    real = runtime.admission.admit
    scope = trio.CancelScope()

    async def admit_then_cancel(c, sink=None):
        result = await real(c, sink)
        scope.cancel()  # delivered to the waiting caller before the answer is sent
        return result

    monkeypatch.setattr(runtime.admission, "admit", admit_then_cancel)
    with scope:
        await runtime.submit(call(tenant(Quota(requests_per_minute=100), id="gone"), prompt="Once upon a time",
                                  max_tokens=600, ignore_eos=True))
    assert scope.cancelled_caught
    await wait_until(lambda: not runtime.engine.has_unfinished() and runtime.accounting.settled >= 1)
    rows = await usage_rows(services["quotas"], "gone")
    assert sum(r.completion_tokens for r in rows) < 600  # aborted, not run to the end and billed in full
    assert runtime.engine.block_manager.num_free_blocks == runtime.engine.num_blocks


async def test_a_caller_cancelled_just_after_admission_answered_aborts_its_request(runtime, services):
    """The answer is in, and the cancel lands before the caller runs again: `submit` must
    hand it over, not lose it at a later checkpoint (the reply channel's `aclose` was one:
    a client gone ~2 ms after sending had its request generated to the end)."""
    scope = trio.CancelScope()
    real_send = runtime._admit_send

    class CancelAfterAnswer:
        """The reply channel of each message: the answer is sent, then the caller cancelled."""

        def __init__(self, inner) -> None:
            self.inner = inner

        def send_nowait(self, value) -> None:
            self.inner.send_nowait(value)
            scope.cancel()

    class Wrap:
        def send_nowait(self, msg) -> None:
            real_send.send_nowait(replace(msg, reply=CancelAfterAnswer(msg.reply)))

    runtime._admit_send = Wrap()
    got = []
    try:
        with scope:
            got.append(await runtime.submit(call(tenant(Quota(requests_per_minute=100), id="gone"),
                                                 prompt="Once upon a time", max_tokens=600, ignore_eos=True)))
    finally:
        runtime._admit_send = real_send
    if got:  # handed over: the caller owns it and aborts it, as a route's `events_of` does
        got[0].cancel()
    await wait_until(lambda: not runtime.engine.has_unfinished() and runtime.accounting.settled >= 1)
    rows = await usage_rows(services["quotas"], "gone")
    assert sum(r.completion_tokens for r in rows) < 600  # aborted, not run to the end and billed in full
    assert runtime.engine.block_manager.num_free_blocks == runtime.engine.num_blocks


def flaky(fn, failures: int):
    """`fn` behind a Redis that is down for its first `failures` calls."""
    calls = {"n": 0}

    async def call_(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise CacheUnavailable("redis is down")
        return await fn(*args, **kwargs)

    return call_, calls


async def test_a_settle_during_a_redis_outage_lands_once_redis_is_back(runtime, services, monkeypatch):
    quotas = services["quotas"]
    settle, calls = flaky(quotas.settle, failures=5)  # 3 quick tries, then 1 s and 2 s apart
    monkeypatch.setattr(quotas, "settle", settle)
    t = tenant(Quota(max_concurrent=1), id="outage")
    acc = await runtime.submit(call(t, prompt="Hi", max_tokens=3, ignore_eos=True))
    _, _, fin = await collect(acc)
    # the caller is not held waiting for an outage: `settled` is set at the first failure
    await wait_until(lambda: acc.settled.is_set() and calls["n"] >= 1, timeout=2)  # (else after 3+ s of retries)
    assert runtime.accounting.settled == 0
    await wait_until(lambda: runtime.metrics.settle_backlog._value.get() == 1)  # waiting for Redis, not dropped
    # served meanwhile, and counted as served: the metrics do not wait for the settle
    assert runtime.metrics.requests.labels("outage", "ok")._value.get() == 1
    assert runtime.metrics.generation_tokens.labels("outage")._value.get() == fin.usage.completion_tokens
    await wait_until(lambda: runtime.accounting.settled == 1, timeout=20)
    assert calls["n"] == 6 and runtime.metrics.settle_backlog._value.get() == 0
    [row] = await usage_rows(quotas, "outage")
    assert (row.requests, row.completion_tokens) == (1, fin.usage.completion_tokens)
    assert await quotas.running("outage") == 0  # the max_concurrent slot is free again


async def test_an_error_in_the_cache_path_after_the_reservation_gives_the_hold_back(runtime, services, monkeypatch):
    """A cache lookup that fails on something no cache path expects answers a 500, and the
    quota reserved for the request goes back (its max_concurrent slot was held for the
    reservation's 10 minutes, its tokens charged to the day's budget for good)."""
    quotas = services["quotas"]

    async def broken(*args, **kwargs):
        raise RuntimeError("a cache bug")

    monkeypatch.setattr(services["response_cache"], "get", broken)
    t = tenant(Quota(max_concurrent=1, daily_token_budget=10_000), id="cachebug")
    failed = await runtime.submit(call(t, prompt="Hi", max_tokens=500))
    assert isinstance(failed, Rejected) and failed.status == 500
    await wait_until(lambda: runtime.accounting.settled == 1)  # released
    assert await quotas.running("cachebug") == 0
    monkeypatch.undo()
    ok = await runtime.submit(call(t, prompt="Hi", max_tokens=2))
    assert isinstance(ok, Accepted), ok
    await collect(ok)


async def test_usage_served_fail_open_is_recorded_once_redis_answers(runtime, services, monkeypatch):
    quotas = services["quotas"]
    reserve, _ = flaky(quotas.reserve, failures=1)  # Redis down at admission: served without quota
    monkeypatch.setattr(quotas, "reserve", reserve)
    acc = await runtime.submit(call(tenant(Quota(requests_per_minute=10), id="open"), prompt="Hi", max_tokens=3,
                                    ignore_eos=True))
    assert isinstance(acc, Accepted)
    _, _, fin = await collect(acc)
    await wait_until(lambda: runtime.accounting.settled == 1)  # settled with no reservation to settle
    [row] = await usage_rows(quotas, "open")
    assert (row.requests, row.completion_tokens) == (1, 3)


async def test_leaving_the_runtime_aborts_and_accounts_what_is_in_flight(ckpt, tokenizer, services):
    quotas = services["quotas"]
    t = tenant(Quota(max_concurrent=4), id="shutdown")
    async with open_runtime(RuntimeConfig(), engine=make_engine(ckpt, tokenizer), **services) as rt:
        streams = [await rt.submit(call(t, prompt=f"Story {i}", max_tokens=500, ignore_eos=True)) for i in range(2)]
        assert all(isinstance(a, Accepted) for a in streams)
        await wait_until(lambda: rt.engine.counters["generated_tokens"] >= 4)
        for a in streams:  # what Hypercorn's cancelled handlers do at the end of the grace period
            a.cancel()
    # the actors are gone: every request was aborted and settled before they were cancelled
    assert await quotas.running("shutdown") == 0
    [row] = await usage_rows(quotas, "shutdown")
    assert row.requests == 2 and 2 <= row.completion_tokens < 1000


async def test_quota_exceeded_is_429_with_retry_after(runtime):
    t = tenant(Quota(requests_per_minute=2), id="small")
    for _ in range(2):
        acc = await runtime.submit(call(t, prompt="Hi", max_tokens=2))
        assert isinstance(acc, Accepted)
        await collect(acc)
    rej = await runtime.submit(call(t, prompt="Hi", max_tokens=2))
    assert isinstance(rej, Rejected) and rej.status == 429 and rej.retry_after and rej.retry_after > 0


async def test_bad_requests_are_4xx(runtime):
    t = tenant(Quota(max_tokens_cap=64))
    rej = await runtime.submit(call(t, prompt="Hi", model="gpt-4"))
    assert isinstance(rej, Rejected) and (rej.status, rej.param) == (404, "model")
    rej = await runtime.submit(call(t, prompt="word " * 3000))
    assert isinstance(rej, Rejected) and rej.status == 400 and rej.code == "context_length_exceeded"
    # in OpenAI's and vLLM's words, which clients match (litellm's ContextWindowExceededError);
    # over both the window and the (smaller) KV cache, the limit named is the one that applies
    # (the window's, named before, sent a client retrying under it to a second 400)
    window = runtime.engine.max_model_len  # (the model's; this KV cache holds fewer)
    held = runtime.engine.num_blocks * runtime.engine.config.cache.block_size
    assert held < window
    assert rej.message.startswith(f"This model's maximum context length is {held} tokens. However, your prompt "
                                  "resulted in"), rej.message
    assert "KV cache holds" in rej.message
    rej = await runtime.submit(call(tenant(Quota()), prompt="Hi", max_tokens=window))
    assert isinstance(rej, Rejected) and (rej.code, rej.param) == ("context_length_exceeded", "max_tokens")
    assert f"However, you requested {window + 1} tokens (1 in the prompt, {window} in the completion" in rej.message
    assert rej.message.startswith(f"This model's maximum context length is {held} tokens"), rej.message
    assert "KV cache holds" in rej.message
    # far too long: told from a prefix, off the event loop (a megabyte of digits took two seconds of it)
    for far in (call(t, prompt="1" * 900_000), call(t, messages=[ChatMessage("user", "1" * 900_000)])):
        rej = await runtime.submit(far)
        assert isinstance(rej, Rejected) and (rej.status, rej.code) == (400, "context_length_exceeded")
        assert rej.param == ("prompt" if far.prompt else "messages")
    rej = await runtime.submit(call(t, prompt="Hi", max_tokens=100))
    assert isinstance(rej, Rejected) and (rej.status, rej.param) == (400, "max_tokens")
    rej = await runtime.submit(msgspec.structs.replace(call(t, prompt="Hi", max_tokens=100),
                                                       max_tokens_param="max_completion_tokens"))
    assert isinstance(rej, Rejected) and rej.param == "max_completion_tokens"  # the field the client sent
    assert rej.message.startswith("max_completion_tokens 100 exceeds")
    # the same number as the endpoint's default (completions' 16), not the client's: capped
    acc = await runtime.submit(msgspec.structs.replace(call(t, prompt="Hi", max_tokens=100, ignore_eos=True),
                                                       max_tokens_default=True))
    assert isinstance(acc, Accepted), acc
    _, deltas, fin = await collect(acc)
    assert isinstance(fin, Finished) and fin.usage.completion_tokens == 64
    # the cap is per choice: 2 choices or 2 beams of 40 tokens each pass a cap of 64
    for params in ({"n": 2, "temperature": 0.8, "seed": 1}, {"use_beam_search": True, "best_of": 2},
                   {"use_beam_search": True, "best_of": 2, "max_tokens": None}):
        acc = await runtime.submit(call(t, prompt="Hi", **{"max_tokens": 40, **params}))
        assert isinstance(acc, Accepted), (params, acc)
        _, _, fin = await collect(acc)
        assert isinstance(fin, Finished)
    rej = await runtime.submit(call(t, prompt="Hi", logit_bias={49152: 1.0}))  # the vocabulary is 49152 ids
    assert isinstance(rej, Rejected) and (rej.status, rej.param) == (400, "logit_bias")
    assert "49152 is not in the vocabulary" in rej.message
    big = tenant()
    rej = await runtime.submit(call(big, prompt="Hi", max_tokens=2000))  # > what the 48 MiB cache holds
    assert isinstance(rej, Rejected) and rej.status == 400 and "KV cache" in rej.message
    assert rej.param == "max_tokens"
    # what one request may hold is reported as the cache's, not the larger window's; a
    # prompt that alone fills it is the prompt's fault, not max_tokens'
    kv_tokens = runtime.engine.num_blocks * runtime.engine.config.cache.block_size
    assert runtime.max_model_len == kv_tokens < runtime.engine.max_model_len
    whole = msgspec.structs.replace(call(big, max_tokens=2), prompt=None, prompt_token_ids=[1] * kv_tokens)
    rej = await runtime.submit(whole)
    assert isinstance(rej, Rejected) and rej.param == "prompt" and "KV cache holds" in rej.message
    assert rej.message.startswith("This model's maximum context length is ")  # (the words clients match)
    # the operator's --model name is an alias of the served id
    acc = await runtime.submit(call(t, prompt="Hi", model="smollm2", max_tokens=2))
    assert isinstance(acc, Accepted)
    await collect(acc)


async def test_a_prompt_of_the_whole_window_is_scored_not_generated_from(nursery, ckpt, tokenizer, services):
    rt = Runtime(RuntimeConfig(), make_engine(ckpt, tokenizer, cache_mb=128), **services)  # 2048 tokens fit
    await nursery.start(rt.run)
    window = [tokenizer.encode("word")[0]] * 2048  # the context window

    def ask(**params) -> GenerateCall:
        return msgspec.structs.replace(call(tenant(), **params), prompt=None, prompt_token_ids=window)

    rej = await rt.submit(ask())  # max_tokens 8: no room
    assert isinstance(rej, Rejected) and rej.code == "context_length_exceeded"
    rej = await rt.submit(ask(max_tokens=None))  # the room left is none
    assert isinstance(rej, Rejected) and rej.code == "context_length_exceeded"
    scored = await rt.submit(ask(max_tokens=0, prompt_logprobs=0))  # what lm-evaluation-harness sends
    assert isinstance(scored, Accepted), scored
    _, deltas, fin = await collect(scored)
    assert isinstance(fin, Finished) and fin.usage.prompt_tokens == 2048 and fin.usage.completion_tokens == 0
    assert len(deltas[0].prompt_logprobs) == 2048
    await wait_until(lambda: rt.engine.block_manager.num_free_blocks == rt.engine.num_blocks)


async def test_a_max_tokens_filled_in_that_clashes_with_the_request_is_400(runtime):
    # max_tokens left out: admission fills in the room left (or the key's cap), which
    # must still agree with min_tokens — a clash is the caller's, not a server error
    rej = await runtime.submit(call(tenant(), prompt="Hi", max_tokens=None, min_tokens=9000))
    assert isinstance(rej, Rejected) and (rej.status, rej.param) == (400, "min_tokens")
    assert "max_tokens was not given" in rej.message
    rej = await runtime.submit(call(tenant(Quota(max_tokens_cap=4)), prompt="Hi", max_tokens=None, min_tokens=10))
    assert isinstance(rej, Rejected) and (rej.status, rej.param) == (400, "min_tokens")
    rej = await runtime.submit(call(tenant(Quota(max_tokens_cap=0)), prompt="Hi", max_tokens=None))
    assert isinstance(rej, Rejected) and (rej.status, rej.param) == (400, "max_tokens")
    # this engine's 48 MiB cache holds fewer tokens than its 2048-token window: the room
    # filled in is what the cache holds, not a refusal of every request without max_tokens
    acc = await runtime.submit(call(tenant(), prompt="Hi", max_tokens=None))
    assert isinstance(acc, Accepted)
    acc.cancel()
    await wait_until(lambda: not runtime.engine.has_unfinished())
    acc = await runtime.submit(call(tenant(Quota(max_tokens_cap=3)), prompt="Hi", max_tokens=None, min_tokens=2))
    assert isinstance(acc, Accepted)
    _, _, fin = await collect(acc)
    assert 2 <= fin.usage.completion_tokens <= 3


async def test_without_max_tokens_a_request_defaults_to_what_its_token_limits_allow(runtime):
    """A key whose tokens_per_minute (or daily budget) is below the context window can be
    used by clients that never send max_tokens: the default is cut to the limit."""
    t = tenant(Quota(tokens_per_minute=60, daily_token_budget=500))
    acc = await runtime.submit(call(t, prompt="Count from one to fifty:", max_tokens=None, ignore_eos=True))
    assert isinstance(acc, Accepted), acc
    _, _, fin = await collect(acc)
    assert fin.usage.prompt_tokens + fin.usage.completion_tokens == 60  # all the limit allowed, no more
    # n = 2 reserves two sequences; a prompt the limit cannot hold is still the quota's 429
    acc = await runtime.submit(call(tenant(Quota(daily_token_budget=50), id="b"), prompt="Hi", max_tokens=None,
                                    n=2, seed=1, temperature=0.5, ignore_eos=True))
    assert isinstance(acc, Accepted), acc
    _, _, fin = await collect(acc)
    assert fin.usage.completion_tokens == 2 * ((50 - fin.usage.prompt_tokens) // 2)
    refused = await runtime.submit(call(tenant(Quota(tokens_per_minute=3), id="c"), prompt="Count from one to ten",
                                        max_tokens=None))
    assert isinstance(refused, Rejected) and refused.status == 429 and "tokens_per_minute" in refused.message
    assert refused.code == "rate_limit_exceeded"
    n = len(runtime.admission.tokenizer.encode("Count from one to ten"))
    assert f"needs {n + 1} tokens" in refused.message  # the least it needs (it said the window's 8192)
    # a min_tokens the limit cannot hold is the quota's refusal too, not a 400 on min_tokens
    # that blamed the context window
    short = await runtime.submit(call(tenant(Quota(tokens_per_minute=n + 20), id="d"), prompt="Count from one to ten",
                                      max_tokens=None, min_tokens=30))
    assert isinstance(short, Rejected) and (short.status, short.code) == (429, "rate_limit_exceeded"), short
    assert f"needs {n + 30} tokens" in short.message and short.retry_after is None
    # a spent daily budget is OpenAI's insufficient_quota (retried soon, it cannot pass), a
    # request larger than it too
    spent = await runtime.submit(call(tenant(Quota(daily_token_budget=50), id="b"), prompt="Hi", max_tokens=1))
    assert isinstance(spent, Rejected) and (spent.status, spent.code) == (429, "insufficient_quota"), spent
    assert spent.retry_after is not None and spent.retry_after > 0  # UTC midnight
    never = await runtime.submit(call(tenant(Quota(daily_token_budget=3), id="d"), prompt="Count from one to ten",
                                      max_tokens=None))
    assert isinstance(never, Rejected) and (never.status, never.code, never.retry_after) == (
        429, "insufficient_quota", None), never
    # a budget held by a running request (a reservation of all of it): a wait, not midnight
    running = await runtime.submit(call(tenant(Quota(daily_token_budget=60), id="e"), prompt="Hi", max_tokens=None))
    assert isinstance(running, Accepted), running
    held = await runtime.submit(call(tenant(Quota(daily_token_budget=60), id="e"), prompt="Hi", max_tokens=1))
    assert isinstance(held, Rejected) and (held.status, held.code, held.retry_after) == (
        429, "rate_limit_exceeded", 1.0), held
    await collect(running)


async def test_a_refunded_request_gives_its_quota_back_though_it_ran(runtime, services):
    """`Accepted.refund` then cancel (the gateway's batch refused after this prompt was
    admitted): nothing is charged or counted, though the engine had started it."""
    t = tenant(Quota(requests_per_minute=1, daily_token_budget=1000), id="refunds")
    acc = await runtime.submit(call(t, prompt="Count from one to a hundred:", max_tokens=200, ignore_eos=True))
    assert isinstance(acc, Accepted)
    async for _ in acc.events:  # running: the engine computed its prompt and a token
        break
    acc.refund()
    acc.cancel()
    with trio.fail_after(10):
        await acc.settled.wait()
    assert await usage_rows(services["quotas"], "refunds") == []
    again = await runtime.submit(call(t, prompt="Hi", max_tokens=2))  # the minute's one request is free again
    assert isinstance(again, Accepted), again
    await collect(again)


async def test_a_request_without_max_tokens_is_given_what_is_left_of_the_daily_budget(runtime, services,
                                                                                      monkeypatch):
    """max_tokens left out (the SDKs' default) defaults to the room in the context window,
    which a budget below it cannot hold once any of the day is used: the request reserves
    and generates what is left of the day instead (it ends at `length`), and a later one
    finds the day spent (it was refused until midnight whatever was left)."""
    t = tenant(Quota(daily_token_budget=300), id="daily-default")
    prompt = "Count from one to a hundred:"
    first = await runtime.submit(call(t, prompt=prompt, max_tokens=40, ignore_eos=True))
    assert isinstance(first, Accepted)
    await collect(first)
    await wait_until(lambda: runtime.accounting.settled == 1)
    n = first.prompt_tokens
    learned, lessons = trio.open_memory_channel(10)
    monkeypatch.setattr(runtime.accounting, "feedback", learned)
    acc = await runtime.submit(call(t, prompt=prompt, max_tokens=None, ignore_eos=True))
    assert isinstance(acc, Accepted), acc
    _, _, fin = await collect(acc)
    assert fin.finish_reasons == ["length"] and fin.usage.completion_tokens == 300 - (n + 40) - n
    await wait_until(lambda: runtime.accounting.settled == 2)
    # cut where the budget ran out: the predictor is not taught that it would have run on
    assert lessons.receive_nowait().finish_reason == "capped"
    [row] = await usage_rows(services["quotas"], "daily-default")
    assert row.prompt_tokens + row.completion_tokens == 300
    rej = await runtime.submit(call(t, prompt=prompt, max_tokens=None))
    assert isinstance(rej, Rejected) and (rej.status, rej.code) == (429, "insufficient_quota"), rej
    assert rej.retry_after is not None and rej.retry_after > 60
    # one that chose its max_tokens is refused as before, however little it would have used
    explicit = tenant(Quota(daily_token_budget=300), id="daily-explicit")
    await collect(await runtime.submit(call(explicit, prompt=prompt, max_tokens=40)))
    rej = await runtime.submit(call(explicit, prompt=prompt, max_tokens=300 - n - 1))
    assert isinstance(rej, Rejected) and rej.status == 429, rej


async def test_a_batchs_prompts_do_not_give_the_daily_budget_back_to_one_another(runtime, services):
    """A legacy completions request's prompts are admitted one after another: what its
    first holds ends only with the request, so a later prompt the rest of the day cannot
    hold is refused until midnight (it was told to retry in a second, on every retry),
    and one without max_tokens is lowered to what is left (it was refused)."""
    import msgspec

    t = tenant(Quota(daily_token_budget=200), id="daily-batch")
    prompt = "Count from one to a hundred:"

    def part(i: int, **params) -> GenerateCall:  # noqa: ANN003
        return msgspec.structs.replace(call(t, prompt=prompt, ignore_eos=True, **params),
                                       request_id=f"batch-{i}", batch_id="batch")

    first = await runtime.submit(part(0, max_tokens=60))
    assert isinstance(first, Accepted)
    n = first.prompt_tokens
    left = 200 - (n + 60) - n  # what the next prompt may generate
    never = await runtime.submit(part(1, max_tokens=left + 1))
    assert isinstance(never, Rejected) and (never.status, never.code) == (429, "insufficient_quota"), never
    assert never.retry_after is not None and never.retry_after > 60
    lowered = await runtime.submit(part(2, max_tokens=None))
    assert isinstance(lowered, Accepted), lowered
    _, _, fin = await collect(lowered)
    assert fin.finish_reasons == ["length"] and fin.usage.completion_tokens == left
    await collect(first)
    # prompts sent without max_tokens share the limits (each defaulting to all of them, the
    # first took the day and the second was refused until midnight: a review)
    fresh = tenant(Quota(daily_token_budget=200), id="daily-batch-null")
    parts = [msgspec.structs.replace(call(fresh, prompt=prompt, ignore_eos=True, max_tokens=None),
                                     request_id=f"null-{i}", batch_id="null", batch_index=i, batch_size=2)
             for i in range(2)]
    accepted = [await runtime.submit(c) for c in parts]
    assert all(isinstance(a, Accepted) for a in accepted), accepted
    done = [(await collect(a))[2] for a in accepted]
    assert [f.usage.completion_tokens for f in done] == [100 - n, 100 - n]


async def test_an_answers_prompt_logprobs_are_bounded(runtime):
    """Completions repeat the prompt's logprobs in each choice: 64 choices of a 2,000-token
    prompt with 20 alternatives were a 257 MB answer from a 12 KB request (an audit). Past
    `MAX_PROMPT_LOGPROB_ENTRIES` in all (a request's prompts share it) it is a 400 naming
    what to ask for less of; chat's answer has them once, whatever `n`."""
    from actors.admission import MAX_PROMPT_LOGPROB_ENTRIES

    t = tenant(id="lp-bound")
    prompt = "hello world " * 400  # ~800 tokens: 64 × 800 × 21 is past the bound, 1 × 800 × 21 not

    def asking(copies: int, param: str = "n", **params) -> GenerateCall:  # noqa: ANN003
        return msgspec.structs.replace(call(t, prompt=prompt, max_tokens=1, prompt_logprobs=20, **params),
                                       prompt_logprob_copies=copies, prompt_logprobs_param=param)

    rej = await runtime.submit(asking(64, n=64, temperature=1.0, seed=1))
    assert isinstance(rej, Rejected) and (rej.status, rej.code, rej.param) == (400, "invalid_value", "n"), rej
    assert f"at most {MAX_PROMPT_LOGPROB_ENTRIES}" in rej.message
    once = await runtime.submit(asking(1, n=4, temperature=1.0, seed=1))  # (as chat's)
    assert isinstance(once, Accepted), once
    _, deltas, _ = await collect(once)
    # built once for the request, shared by its choices (built per choice: 2 s of the loop)
    shared = [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None]
    assert len(shared) == 4 and all(p is shared[0] for p in shared)
    batch = msgspec.structs.replace(asking(1, "prompt_logprobs"), batch_id="b", batch_index=0, batch_size=64)
    rej = await runtime.submit(batch)
    assert isinstance(rej, Rejected) and rej.param == "prompt_logprobs" and "64 prompts" in rej.message, rej
    acc = await runtime.submit(asking(1, "prompt_logprobs"))
    assert isinstance(acc, Accepted), acc
    _, deltas, fin = await collect(acc)
    assert isinstance(fin, Finished) and len(deltas[0].prompt_logprobs) == acc.prompt_tokens


async def test_an_answers_output_logprobs_are_bounded(runtime):
    """64 choices of 4,000 tokens with 20 alternatives were 5.4M logprob entries the server
    held until the answer went out. Past `MAX_LOGPROB_ENTRIES` (choices × tokens ×
    (alternatives + 1), a request's prompts sharing it) an explicit max_tokens is a 400
    naming what to ask for less of; a defaulted one is lowered to fit."""
    from actors.admission import MAX_LOGPROB_ENTRIES, logprob_room

    t = tenant(id="out-lp-bound")
    assert logprob_room(None, 64) is None and logprob_room(20, 64) == MAX_LOGPROB_ENTRIES // (64 * 21)
    assert logprob_room(0, 1, share=4) == MAX_LOGPROB_ENTRIES // 4
    many = dict(n=64, temperature=1.0, seed=1, logprobs=20)
    rej = await runtime.submit(call(t, prompt="Hi", max_tokens=1000, **many))  # 1.34M entries
    assert isinstance(rej, Rejected) and (rej.status, rej.code, rej.param) == (400, "invalid_value", "n"), rej
    assert f"at most {MAX_LOGPROB_ENTRIES}" in rej.message and "64 choices of 1000 tokens" in rej.message
    one = msgspec.structs.replace(call(t, prompt="Hi", max_tokens=1000, logprobs=20),
                                  batch_id="b", batch_index=0, batch_size=64)  # 21,000 of 1M / 64
    rej = await runtime.submit(one)
    assert isinstance(rej, Rejected) and rej.param == "max_tokens" and "64 prompts" in rej.message, rej
    ok = await runtime.submit(call(t, prompt="Hi", max_tokens=2, **many))
    assert isinstance(ok, Accepted), ok
    _, deltas, fin = await collect(ok)
    assert isinstance(fin, Finished) and fin.usage.completion_tokens == 128
    assert sum(len(row) for d in deltas for row in d.top_logprobs or ()) == 64 * 2 * 20
    # a stream sends them as they come: nothing is held, nothing bounded (a review)
    streamed = await runtime.submit(msgspec.structs.replace(call(t, prompt="Hi", max_tokens=1000, **many),
                                                            stream=True))
    assert isinstance(streamed, Accepted), streamed
    streamed.cancel()
    # a beam search's answer holds its n choices, not its beams; best_of is not named for them
    beams = msgspec.structs.replace(call(t, prompt="Hi", max_tokens=200, use_beam_search=True, best_of=4,
                                         logprobs=0), batch_id="bm", batch_index=0, batch_size=2500)
    beams = await runtime.submit(beams)  # 1 × 200 of 400 (its 4 beams' would be 800)
    assert isinstance(beams, Accepted), beams
    beams.cancel()
    # a default past the bound even when lowered (min_tokens): min_tokens is what to ask less of
    rej = await runtime.submit(call(t, prompt="Hi", max_tokens=None, min_tokens=1000, logprobs=20,
                                    **{"n": 64, "temperature": 1.0, "seed": 1}))
    assert isinstance(rej, Rejected) and rej.param == "n" and "a smaller min_tokens" in rej.message, rej
    # an endpoint's own default (completions' 16) is lowered too, not refused
    sixteen = msgspec.structs.replace(call(t, prompt="Hi", max_tokens=16, logprobs=20, ignore_eos=True),
                                      batch_id="d", batch_index=0, batch_size=4000, max_tokens_default=True)
    acc = await runtime.submit(sixteen)  # (1M / 4000 / 21: 11 tokens)
    assert isinstance(acc, Accepted), acc
    _, _, fin = await collect(acc)
    assert isinstance(fin, Finished) and fin.usage.completion_tokens == MAX_LOGPROB_ENTRIES // 4000 // 21
    await wait_until(lambda: not runtime.engine.has_unfinished())
    # defaulted: lowered to what fits (the window's room would be 1.5M entries)
    acc = await runtime.submit(call(t, prompt="Hi", max_tokens=None, **many))
    assert isinstance(acc, Accepted), acc
    await acc.events.receive()  # (running: the stepper holds its resolved parameters)
    assert runtime.stepper.active[acc.request_id].params.max_tokens == MAX_LOGPROB_ENTRIES // (64 * 21)
    acc.cancel()
    await wait_until(lambda: not runtime.engine.has_unfinished())


async def test_how_far_a_prediction_was_from_a_stopped_requests_length_is_measured(runtime):
    """`lmgate_predictor_error_ratio`: predicted over true length, for requests that stopped
    on their own (an operator saw no sign of the predictor drifting: an audit)."""
    def count() -> float:
        return sum(s.value for m in runtime.registry.collect() if m.name == "lmgate_predictor_error_ratio"
                   for s in m.samples if s.name.endswith("_count"))

    before = count()
    acc = await runtime.submit(call(tenant(id="err"), prompt="Name three colours:", max_tokens=64, stop=["e"]))
    _, _, fin = await collect(acc)
    assert fin.finish_reasons == ["stop"]
    await wait_until(lambda: count() == before + 1)
    cut = await runtime.submit(call(tenant(id="err"), prompt="Name three colours:", max_tokens=1, ignore_eos=True))
    await collect(cut)
    await trio.sleep(0.2)
    assert count() == before + 1  # (cut at max_tokens: its true length is not known)


async def test_a_chat_of_many_short_messages_renders_off_the_event_loop(runtime, monkeypatch):
    """What a chat costs to render is its messages' template as well as their text: 30,000
    one-character messages (~870,000 characters rendered) were counted as 30,000 and
    rendered on the event loop, stalling every stream 73-143 ms each (an audit). Counted
    with the template's share per message, they go to a worker thread as a long prompt does."""
    threaded: list[str] = []
    turns = runtime.admission._tokenize_turns
    run = turns.run

    async def spy(tenant_id, fn, limiter):  # type: ignore[no-untyped-def]
        threaded.append(tenant_id)
        return await run(tenant_id, fn, limiter)

    monkeypatch.setattr(turns, "run", spy)
    t = tenant(id="chatty")
    few = await runtime.submit(call(t, messages=[ChatMessage("user", "a")] * 100, max_tokens=1))
    assert isinstance(few, Accepted), few
    await collect(few)
    assert threaded == []  # (a short chat: on the loop, the thread's hand-off costs more)
    many = await runtime.submit(call(t, messages=[ChatMessage("user", "a")] * 2_000, max_tokens=1))
    assert isinstance(many, Rejected) and many.code == "context_length_exceeded", many
    assert threaded == ["chatty"]


async def test_the_per_process_rpm_blocks_drop_the_ended_then_the_soonest_at_their_cap(runtime, monkeypatch):
    """At the cap the table was cleared whole: every tenant over its minute was let through
    to tokenizing at once. Now the blocks that ended go, then the one that ends soonest."""
    admission = runtime.admission
    monkeypatch.setattr(admission, "RPM_BLOCKS_KEPT", 3)
    ts = [tenant(Quota(requests_per_minute=1), id=f"rpm{i}") for i in range(5)]
    admission._block_rpm(ts[0], 0.0)  # (already over)
    admission._block_rpm(ts[1], 50.0)
    admission._block_rpm(ts[2], 30.0)
    admission._block_rpm(ts[3], 40.0)  # the ended one goes
    admission._block_rpm(ts[4], 60.0)  # all live: the soonest to end (rpm2) goes
    admission._block_rpm(ts[3], 45.0)  # (one already held is renewed: nothing else goes)
    from actors.admission import _Refuse  # (what admission answers a 429 with)

    refused = []
    for t in ts:
        try:
            admission.check_rpm_block(t)
        except _Refuse as r:
            assert r.rejected[0] == 429
            refused.append(t.tenant_id)
    assert refused == ["rpm1", "rpm3", "rpm4"]


async def test_logprobs_are_replayed_from_the_cache(runtime):
    ask = dict(prompt="The capital of Germany is", max_tokens=5, logprobs=2)
    first = await runtime.submit(call(tenant(), **ask))
    text1, deltas1, _ = await collect(first)
    await trio.sleep(0.2)  # the store happens in accounting, after Finished
    second = await runtime.submit(call(tenant(), **ask))
    assert isinstance(second, Accepted) and second.cached
    text2, deltas2, _ = await collect(second)

    def flat(deltas):
        return ([t for d in deltas for t in d.token_ids], [lp for d in deltas for lp in d.logprobs],
                [t for d in deltas for t in d.tokens], [row for d in deltas for row in d.top_logprobs])

    assert text2 == text1 and flat(deltas2) == flat(deltas1)
    assert len(flat(deltas2)[1]) == 5


async def test_response_cache_hit_skips_the_engine(runtime):
    t = tenant()
    first = await runtime.submit(call(t, prompt="The capital of France is", max_tokens=6))
    text1, deltas1, fin1 = await collect(first)
    await wait_until(lambda: runtime.accounting.settled >= 0 and runtime.metrics.cache_lookups.labels("miss")._value.get() >= 1)
    await trio.sleep(0.2)  # the store happens in accounting, after Finished
    steps = runtime.engine.counters["steps"]
    second = await runtime.submit(call(t, prompt="The capital of France is", max_tokens=6))
    assert isinstance(second, Accepted) and second.cached
    text2, deltas2, fin2 = await collect(second)
    assert text2 == text1 and [d.token_ids for d in deltas2] == [d.token_ids for d in deltas1]
    assert isinstance(fin2, Finished) and fin2.cached  # nothing computed: every prompt token counts as cached
    assert fin2.usage == Usage(fin1.usage.prompt_tokens, fin1.usage.completion_tokens, fin1.usage.prompt_tokens)
    assert runtime.engine.counters["steps"] == steps
    # sampling without a seed is not deterministic: never served from the cache
    third = await runtime.submit(call(t, prompt="The capital of France is", max_tokens=6, temperature=0.8))
    assert not third.cached
    await collect(third)


async def test_an_answer_past_the_entry_size_is_not_stored_and_is_counted(runtime, monkeypatch):
    """An answer past the response cache's entry size is not stored (256 KiB: ~300 tokens
    with 20 top logprobs): counted as `too_large`, and an only-if-cached request's 504
    says so (an audit: nothing told a client why it never got a long answer back)."""
    monkeypatch.setattr(runtime.accounting.response_cache, "max_entry_bytes", 2048)
    stores = runtime.metrics.cache_stores
    t = tenant(id="too-large")
    before = {r: stores.labels(r)._value.get() for r in ("stored", "too_large")}
    for ask in (dict(max_tokens=3), dict(max_tokens=6, logprobs=20)):
        acc = await runtime.submit(call(t, prompt="The capital of Norway is", **ask))
        await collect(acc)
    await wait_until(lambda: sum(stores.labels(r)._value.get() for r in before) == sum(before.values()) + 2)
    assert [stores.labels(r)._value.get() - before[r] for r in before] == [1, 1]
    rej = await runtime.submit(msgspec.structs.replace(
        call(t, prompt="The capital of Norway is", max_tokens=6, logprobs=20), cache_only=True))
    assert isinstance(rej, Rejected) and rej.status == 504 and "at most 2 KiB" in rej.message, rej


async def test_cache_control_generates_afresh_and_skips_the_store(runtime):
    t = tenant()
    lookups = runtime.metrics.cache_lookups

    async def ask(prompt: str, **cache) -> tuple[Accepted, Finished]:
        acc = await runtime.submit(msgspec.structs.replace(call(t, prompt=prompt, max_tokens=4), **cache))
        assert isinstance(acc, Accepted)
        *_, fin = await collect(acc)
        await trio.sleep(0.2)  # the store happens in accounting, after Finished
        return acc, fin

    first, _ = await ask("The capital of Italy is")
    assert not first.cached
    # no-cache: the stored answer is there, but the engine answers (and stores again)
    steps, bypass = runtime.engine.counters["steps"], lookups.labels("bypass")._value.get()
    fresh, fin = await ask("The capital of Italy is", cache_lookup=False)
    assert not fresh.cached and not fin.cached and runtime.engine.counters["steps"] > steps
    assert lookups.labels("bypass")._value.get() == bypass + 1
    again, _ = await ask("The capital of Italy is")
    assert again.cached
    # no-store: answered by the engine and not kept, so the next request misses too
    kept, _ = await ask("The capital of Spain is", cache_store=False)
    assert not kept.cached
    missed = lookups.labels("miss")._value.get()
    after, _ = await ask("The capital of Spain is")
    assert not after.cached and lookups.labels("miss")._value.get() == missed + 1
    # a stored answer still answers a no-store request
    hit, _ = await ask("The capital of Spain is", cache_store=False)
    assert hit.cached


async def test_cache_control_max_age_min_fresh_and_only_if_cached(runtime, services):
    """A hit carries its age; an entry older than `max-age`, or kept for less than
    `min-fresh`, is a miss whose fresh answer replaces it; `only-if-cached` with no
    acceptable entry is a 504 that frees its quota hold and never reaches the engine."""
    t = tenant(Quota(max_concurrent=1))
    prompt = "The capital of Portugal is"

    async def ask(p: str = prompt, **cache) -> Accepted | Rejected:
        reply = await runtime.submit(msgspec.structs.replace(call(t, prompt=p, max_tokens=4), **cache))
        if isinstance(reply, Accepted):
            await collect(reply)
            await trio.sleep(0.2)  # the store happens in accounting, after Finished
        return reply

    steps = runtime.engine.counters["steps"]
    refused = await ask(cache_only=True)
    assert isinstance(refused, Rejected) and (refused.status, refused.code) == (504, "not_cached")
    assert runtime.engine.counters["steps"] == steps
    first = await ask()  # max_concurrent=1: the 504 gave its slot back
    assert isinstance(first, Accepted) and not first.cached and first.cache_age_s is None
    hit = await ask(cache_only=True, cache_max_age_s=60, cache_min_fresh_s=60)
    assert isinstance(hit, Accepted) and hit.cached and 0 <= hit.cache_age_s < 5
    assert isinstance(await ask(cache_min_fresh_s=int(services["response_cache"].ttl_s)), Accepted)
    # (ages count in whole seconds, as `Age` shows them: a second-old answer is kept its TTL less one)
    stale = await ask(cache_only=True, cache_min_fresh_s=int(services["response_cache"].ttl_s) + 1)
    assert isinstance(stale, Rejected) and stale.status == 504
    await trio.sleep(2.1)
    old = await ask(cache_max_age_s=1)  # two seconds old (`Age: 2`): answered afresh and stored again
    assert isinstance(old, Accepted) and not old.cached and runtime.engine.counters["steps"] > steps
    renewed = await ask(cache_only=True, cache_max_age_s=1)
    assert isinstance(renewed, Accepted) and renewed.cached and renewed.cache_age_s < 1
    # sampling without a seed is never stored, so never answered from the cache
    sampled = await runtime.submit(msgspec.structs.replace(call(t, prompt=prompt, max_tokens=4, temperature=0.7),
                                                           cache_only=True))
    assert isinstance(sampled, Rejected) and sampled.status == 504


async def test_overload_is_503_with_retry_after(nursery, ckpt, tokenizer, services):
    rt = Runtime(RuntimeConfig(queue=QueueConfig(max_waiting=2)), make_engine(ckpt, tokenizer, max_num_seqs=1),
                 **services)
    await nursery.start(rt.run)
    t = tenant()
    results = []

    async def one(i: int) -> None:
        r = await rt.submit(call(t, prompt=f"Count to {i}", max_tokens=40, ignore_eos=True, seed=i,
                                 temperature=1.0))
        results.append(r)
        if isinstance(r, Accepted):
            await collect(r)

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(one, i)
            await trio.sleep(0.05)
    refused = [r for r in results if isinstance(r, Rejected)]
    assert refused and all(r.status == 503 and r.retry_after and r.retry_after >= 1 for r in refused)
    assert any(isinstance(r, Accepted) for r in results)


async def test_a_burst_admitted_at_once_respects_max_waiting(nursery, ckpt, tokenizer, services):
    # admission awaits Redis (quota, response cache) after its load check: every request
    # of a burst used to pass the check against the same count
    rt = Runtime(RuntimeConfig(queue=QueueConfig(max_waiting=2)), make_engine(ckpt, tokenizer, max_num_seqs=1),
                 **services)
    await nursery.start(rt.run)
    t = tenant(Quota(requests_per_minute=1000))
    results = []

    async def one(i: int) -> None:
        r = await rt.submit(call(t, prompt=f"Count to {i}", max_tokens=4, ignore_eos=True))
        results.append(r)
        if isinstance(r, Accepted):
            await collect(r)

    async with trio.open_nursery() as n:
        for i in range(10):
            n.start_soon(one, i)
    accepted = [r for r in results if isinstance(r, Accepted)]
    assert 1 <= len(accepted) <= 2 + 1  # max_waiting + max_num_seqs
    assert all(r.status == 503 for r in results if isinstance(r, Rejected))
    assert rt.admission.pending == 0


async def test_a_shutdown_refuses_at_once_a_queue_that_would_not_start_within_its_grace(
        nursery, ckpt, tokenizer, services):
    """Queued requests that could not start before the server stops get their 503 at the
    shutdown's start (their clients retry elsewhere now, not at the grace period's end);
    the running one goes on, and a queue that clears in time is left alone."""
    rt = Runtime(RuntimeConfig(), make_engine(ckpt, tokenizer, max_num_seqs=1), **services)
    await nursery.start(rt.run)
    t = tenant(Quota(requests_per_minute=1000))
    running = await rt.submit(call(t, prompt="Once upon a time", max_tokens=300, ignore_eos=True))
    assert isinstance(running, Accepted)
    queued = [await rt.submit(call(t, prompt=f"Count to {i}", max_tokens=30, ignore_eos=True)) for i in range(4)]
    await wait_until(lambda: len(rt.queue) >= 2)
    assert rt.shed_for_shutdown(grace_s=1e6) == 0  # clears in time: left to run
    shed = rt.shed_for_shutdown(grace_s=0.1)
    assert shed >= 2
    rt.end_streams()  # (the grace period's end, for the rest; one already handed to the stepper may run)
    ends = [(await collect(q))[2] for q in queued]
    refused = [e for e in ends if isinstance(e, Failed) and "would not start" in e.message]
    assert len(refused) == shed and all((e.status, e.code) == (503, "shutting_down") for e in refused)
    last = (await collect(running))[2]
    assert isinstance(last, Failed) and "would not start" not in last.message  # it ran to the end of the grace


async def test_preemptions_are_counted_on_metrics_and_every_request_finishes(nursery, ckpt, tokenizer, services):
    # 8 MiB of float32 KV: 11 blocks of 16 tokens, so three 80-token requests cannot all stay
    rt = Runtime(RuntimeConfig(queue=QueueConfig(policy=PolicyConfig(name="fcfs-continuous"))),
                 make_engine(ckpt, tokenizer, cache_mb=8), **services)
    await nursery.start(rt.run)
    assert rt.engine.num_blocks == 11
    t = tenant()
    outs: list = []

    async def one(i: int) -> None:
        acc = await rt.submit(call(t, prompt=f"Count to {i}", max_tokens=72, ignore_eos=True))
        assert isinstance(acc, Accepted)
        outs.append(await collect(acc))

    async with trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(one, i)
    assert [last.usage.completion_tokens for _, _, last in outs] == [72] * 3
    preempted = rt.engine.counters["preemptions"]
    assert preempted >= 1
    reg = rt.metrics.registry
    assert reg.get_sample_value("lmgate_num_preemptions_total") == preempted
    # every token a step fed is counted once; the recompute shows as prefill beyond the prompts
    prefill = reg.get_sample_value("lmgate_step_tokens_total", {"kind": "prefill"})
    decode = reg.get_sample_value("lmgate_step_tokens_total", {"kind": "decode"})
    c = rt.engine.counters
    assert (prefill, decode) == (c["prefill_tokens_fed"], c["decode_tokens_fed"])
    prompts = c["prompt_tokens"] - c["prefix_hit_tokens"]
    assert prefill > prompts  # the preempted requests' contexts were fed again
    assert prefill + decode >= prompts + 3 * 72 - 3  # each request's prompt and its 71 decodes at least
    await wait_until(lambda: rt.engine.block_manager.num_free_blocks == rt.engine.num_blocks)  # none leaked


async def test_engine_error_fails_the_step_not_the_process(runtime, services, monkeypatch):
    t = tenant(Quota(requests_per_minute=100))
    engine = runtime.engine
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device fault")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    acc = await runtime.submit(call(t, prompt="Once upon a time", max_tokens=50, ignore_eos=True))
    _, _, last = await collect(acc)
    assert isinstance(last, Failed) and last.status == 500 and "simulated device fault" not in last.message
    assert runtime.stepper.step_error == "RuntimeError: simulated device fault"  # (the log's, not the tenants')
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    after = await runtime.submit(call(t, prompt="The capital of France is", max_tokens=4))
    _, _, fin = await collect(after)
    assert isinstance(fin, Finished)
    await wait_until(lambda: runtime.accounting.settled >= 2)
    [row] = await usage_rows(services["quotas"], "acme")
    assert row.requests == 2  # the failed request was settled too, once


async def test_higher_tier_tenant_runs_first(nursery, ckpt, tokenizer, services):
    """With one seat in the engine, a queued gold request overtakes earlier bronze ones."""
    rt = Runtime(RuntimeConfig(), make_engine(ckpt, tokenizer, max_num_seqs=1), **services)
    await nursery.start(rt.run)
    bronze, gold = tenant(id="bronze", priority=0), tenant(id="gold", priority=5)
    order: list[str] = []

    async def run(t: TenantContext, label: str, max_tokens: int = 12) -> None:
        # (prompts of their own: identical ones would wait for the first's answer, actors.flights)
        acc = await rt.submit(call(t, prompt=f"Say something, {label}", max_tokens=max_tokens, ignore_eos=True))
        await collect(acc)
        order.append(label)

    # Driven by the runtime's state, not by sleeps: b0 is long enough (200 tokens) that
    # b1-b3 and gold all queue behind it on any CPU, and gold is submitted only once
    # the three bronze requests are waiting.
    async with trio.open_nursery() as n:
        n.start_soon(run, bronze, "b0", 200)
        await wait_until(lambda: rt.engine.scheduler.num_running == 1)
        # the engine runs it at the queue policy's priority (the tier aged: `engine_priority`)
        [(rid, st)] = rt.stepper.active.items()
        assert rt.engine.scheduler.get(rid).priority == st.engine_priority != 0
        for i in range(1, 4):
            n.start_soon(run, bronze, f"b{i}")
        await wait_until(lambda: rt.waiting() == 3)
        assert rt.engine.scheduler.num_running == 1 and not order  # b0 still holds the seat
        scraped = prometheus_client.generate_latest(rt.registry).decode()
        gauges = [line for line in scraped.splitlines() if line.startswith("lmgate_num_requests_")]
        assert gauges == ["lmgate_num_requests_waiting 3.0", "lmgate_num_requests_running 1.0"], gauges
        n.start_soon(run, gold, "gold")
    assert order[0] == "b0" and order[1] == "gold", order


async def test_logprobs_carry_token_texts(runtime):
    acc = await runtime.submit(call(tenant(), prompt="The capital of France is", max_tokens=5, logprobs=2))
    text, deltas, _ = await collect(acc)
    assert all(d.tokens is not None and len(d.tokens) == len(d.token_ids) for d in deltas)
    assert "".join(t for d in deltas for t in d.tokens) == text
    tops = [row for d in deltas for row in d.top_logprobs]
    assert all(len(row) == 2 and row[0].token and row[0].logprob >= row[1].logprob for row in tops)


async def test_logprob_token_texts_of_partial_characters_are_their_bytes(runtime):
    # decoded alone, each piece of an emoji reads U+FFFD: completions' top_logprobs (keyed
    # by token text) lost the entries that collided, the chosen token's among them
    ids = runtime.tokenizer.encode("🙂")
    texts = [runtime.stepper._token_text(i) for i in ids]
    assert len(ids) > 1 and len(set(texts)) == len(ids)
    assert all(t.startswith("bytes:\\x") for t in texts)
    raw = b"".join(bytes(int(h, 16) for h in t[len("bytes:"):].split("\\x")[1:]) for t in texts)
    assert raw.decode() == "🙂"
    assert runtime.stepper._token_text(runtime.tokenizer.encode(" Paris")[0]) == " Paris"


async def test_crashed_actor_fails_what_it_owns_and_is_restarted(runtime, monkeypatch):
    """A bug in the stepper's routing kills the actor mid-request: that request gets a
    Failed event, its KV blocks are freed, and the restarted stepper serves the next one."""
    stepper = runtime.stepper
    real_route = stepper._route
    crashed = {"n": 0}

    def route_once_broken(delta):
        if not crashed["n"]:
            crashed["n"] += 1
            raise RuntimeError("simulated actor bug")
        return real_route(delta)

    monkeypatch.setattr(stepper, "_route", route_once_broken)
    acc = await runtime.submit(call(tenant(), prompt="Once upon a time", max_tokens=30, ignore_eos=True))
    _, _, last = await collect(acc)
    assert isinstance(last, Failed) and "stepper crashed" in last.message
    assert runtime.metrics.actor_restarts.labels("stepper")._value.get() == 1
    engine = runtime.engine
    assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == engine.num_blocks
    after = await runtime.submit(call(tenant(), prompt="The capital of France is", max_tokens=4))
    _, _, fin = await collect(after)
    assert isinstance(fin, Finished)


def poison_logits(engine: Engine, monkeypatch, prefix: str, gate=None):  # noqa: ANN001, ANN201
    """The engine's logits of requests whose ids start with `prefix` become NaN (once
    `gate`, a `threading.Event`, is set, in the step that first has them); returns the
    engine's own `execute`."""
    import dataclasses

    execute = engine.runner.execute

    def poisoned(plan, adapters):  # noqa: ANN001
        out = execute(plan, adapters)
        rows = [i for i, sid in enumerate(out.seq_ids) if engine.owner_of(sid).startswith(prefix)]
        if not rows:
            return out
        if gate is not None:
            gate.wait(60)
        logits = out.logits.clone()
        logits[rows] = float("nan")
        return dataclasses.replace(out, logits=logits)

    monkeypatch.setattr(engine.runner, "execute", poisoned)
    return execute


async def test_a_request_whose_logits_are_not_finite_fails_with_a_500_and_is_not_cached(runtime, monkeypatch):
    """NaN logits (a broken adapter, an overflow) fail their request alone, as the
    server's fault, and nothing of it is stored for the next identical request."""
    engine = runtime.engine
    execute = poison_logits(engine, monkeypatch, "nan-")
    t = tenant(id="nan")
    bad = await runtime.submit(msgspec.structs.replace(call(t, prompt="The capital of Peru is", max_tokens=4),
                                                       request_id="nan-1"))
    good = await runtime.submit(call(t, prompt="The capital of Chile is", max_tokens=4))
    _, _, last = await collect(bad)
    assert isinstance(last, Failed) and (last.status, last.code) == (500, "engine_error"), last
    assert "not a number" in last.message
    _, _, fin = await collect(good)
    assert isinstance(fin, Finished)
    monkeypatch.setattr(engine.runner, "execute", execute)
    await trio.sleep(0.2)  # (a store would happen in accounting, after the end)
    again = await runtime.submit(call(t, prompt="The capital of Peru is", max_tokens=4))
    assert isinstance(again, Accepted) and not again.cached
    _, _, fin = await collect(again)
    assert isinstance(fin, Finished)


async def test_a_step_that_raises_fails_its_requests_without_internals_and_readyz_says_so(runtime, monkeypatch,
                                                                                         caplog):
    """A step that raises fails its requests with a 500 naming no internals (an audit: the
    exception's text went to every tenant of the batch); the server's status says the
    engine is failing until a step succeeds; the traceback is logged once a minute, not
    once a step."""
    engine = runtime.engine
    execute = engine.runner.execute
    boom = {"on": True}

    def failing(plan, adapters):  # noqa: ANN001
        if boom["on"]:
            raise RuntimeError("secret internals of req-other")
        return execute(plan, adapters)

    monkeypatch.setattr(engine.runner, "execute", failing)
    monkeypatch.setattr(runtime.stepper, "_traceback_logged_at", -float("inf"))  # (the fixture is shared)
    caplog.set_level(logging.ERROR, logger="actors.stepper")
    for _ in range(2):
        acc = await runtime.submit(call(tenant(id="boom"), prompt="Once upon a time", max_tokens=4))
        _, _, last = await collect(acc)
        assert isinstance(last, Failed) and (last.status, last.code) == (500, "engine_error"), last
        assert "secret" not in last.message and "server's log" in last.message
    assert any("engine: its latest step failed (RuntimeError: secret" in d for d in runtime.status()["degraded"])
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and sum("failed again" in r.getMessage() for r in caplog.records) >= 1
    boom["on"] = False
    acc = await runtime.submit(call(tenant(id="boom"), prompt="Once upon a time", max_tokens=4))
    _, _, fin = await collect(acc)
    assert isinstance(fin, Finished)
    assert not any(d.startswith("engine") for d in runtime.status()["degraded"])
    assert runtime.status()["waiting"] == 0


async def test_a_crashed_predictor_fails_the_requests_it_held_and_is_restarted(runtime, monkeypatch, caplog):
    """The predictor actor crashing while it held a request (an audit: a refit that raised
    cancelled it mid-batch) ends that request with a 503 and settles it; the restarted
    actor predicts the next one."""
    quotas = runtime.accounting.quotas
    real_predict = runtime.predictor.predict
    crashed = {"n": 0}

    def predict_once_broken(*args):  # noqa: ANN002
        if not crashed["n"]:
            crashed["n"] += 1
            raise RuntimeError("simulated predictor bug")
        return real_predict(*args)

    monkeypatch.setattr(runtime.predictor, "predict", predict_once_broken)
    t = tenant(Quota(max_concurrent=1), id="pred-crash")
    acc = await runtime.submit(call(t, prompt="Once upon a time", max_tokens=8))
    with trio.fail_after(30):
        _, _, last = await collect(acc)
    assert isinstance(last, Failed) and (last.status, last.code) == (503, "predictor_error"), last
    assert runtime.metrics.actor_restarts.labels("predictor")._value.get() == 1
    await wait_until(lambda: runtime.accounting.settled >= 1)
    assert await quotas.running("pred-crash") == 0 and runtime._predicting == 0
    caplog.set_level(logging.DEBUG, logger="actors.runtime")
    after = await runtime.submit(call(t, prompt="The capital of France is", max_tokens=4))
    _, _, fin = await collect(after)
    assert isinstance(fin, Finished)
    assert any(r.getMessage().startswith(f"request {after.request_id}: predicted ") for r in caplog.records)


async def test_magnus_length_predictor_learns_refits_and_survives_a_restart(nursery, ckpt, tokenizer, services):
    """`length_predictor="magnus"`: requests are predicted from their embedded instruction,
    finished ones (EOS/stop) train it, a refit runs in the background once enough are
    seen, the model is saved in Redis, and a new runtime on the same Redis starts warm."""
    from actors.predictor import LengthModelConfig, LengthPredictor, PredictorService

    cfg = RuntimeConfig(length_predictor="magnus")
    rt = Runtime(cfg, make_engine(ckpt, tokenizer), **services)
    # small refit thresholds keep the test short; the defaults are exercised in test_predictor
    rt.length_service.predictor = LengthPredictor(LengthModelConfig(min_fit_samples=6, refit_every=6,
                                                                    runaway_min_tokens=32))
    sources: list[str] = []
    predict_many = rt.length_service.predict_many

    async def recording_predict_many(sts):
        out = await predict_many(sts)
        for pred, f in out:
            assert f.embedding is not None and f.embedding.shape == (384,)  # the instruction was embedded
            sources.append(pred.source)
        return out

    rt.length_service.predict_many = recording_predict_many
    await nursery.start(rt.run)
    t = tenant(Quota(requests_per_minute=1000))
    words = ["apple", "river", "mountain", "violin", "castle", "garden", "rocket", "winter"]

    async def one(i: int) -> str:
        # a stop string ends each request after a handful of tokens: finish reason "stop"
        acc = await rt.submit(call(t, messages=[ChatMessage("user", f"Write a sentence about a {words[i % 8]}.")],
                                   max_tokens=24, stop=(" a", ".")))
        assert isinstance(acc, Accepted), acc
        _, _, last = await collect(acc)
        assert isinstance(last, Finished)
        return last.finish_reasons[0]

    reasons = [await one(i) for i in range(8)]
    assert reasons.count("stop") >= 6, reasons
    service = rt.length_service
    await wait_until(lambda: service.refits >= 1 and not service.refitting)
    assert service.predictor.model is not None
    n_seen = service.predictor.num_samples
    assert n_seen >= 6
    # the time the predictor held the compute thread is exported, by phase
    reg = rt.registry
    for phase in ("embed", "refit"):
        exported = reg.get_sample_value("lmgate_predictor_compute_seconds_total", {"phase": phase})
        assert exported is not None and exported > 0, phase
        assert exported == pytest.approx(service.compute_seconds[phase])

    # the next request is predicted by the fitted model, from its embedding
    acc = await rt.submit(call(t, messages=[ChatMessage("user", "Write a sentence about a river.")], max_tokens=24))
    await collect(acc)
    assert sources[0] == "prior" and sources[-1] == "model", sources
    # a restarted process on the same Redis restores the predictor
    fresh = PredictorService(store=services["store"])
    assert await fresh.load()
    assert fresh.predictor.num_samples >= n_seen - 1 and fresh.predictor.model is not None

    # a request cut at a max_tokens >= runaway_min_tokens comes back as a runaway
    # (the ones above, cut at 24 if at all, were censored)
    assert service.predictor.num_runaways == 0
    acc = await rt.submit(call(t, prompt="Once upon a time", max_tokens=32, ignore_eos=True))
    _, _, last = await collect(acc)
    assert last.finish_reasons == ["length"]
    await wait_until(lambda: service.predictor.num_runaways == 1)


async def test_magnus_embeddings_never_run_during_an_engine_step_and_a_burst_is_embedded_together(
        nursery, ckpt, tokenizer, services):
    """On a CPU engine the embedder and the engine take turns on the cores (Runtime.compute_lock):
    side by side, two OpenMP teams on the same cores made every step 1.5-2x slower. And they
    run on one thread, the runtime's compute thread (actors.compute): never the trio thread,
    never a second thread with an OpenMP pool of its own."""
    import threading

    torch_threads: set[int] = set()

    rt = Runtime(RuntimeConfig(length_predictor="magnus"), make_engine(ckpt, tokenizer), **services)
    assert rt.compute_lock is not None
    in_step = threading.Event()
    overlaps: list[int] = []
    batches: list[int] = []
    step = rt.engine.step

    def marked_step():
        in_step.set()
        torch_threads.add(threading.get_ident())
        try:
            return step()
        finally:
            in_step.clear()

    rt.engine.step = marked_step
    await nursery.start(rt.run)  # loads the embedder
    embed = rt.length_service.embedder.embed

    def checked_embed(texts, *a, **kw):
        torch_threads.add(threading.get_ident())
        overlaps.append(in_step.is_set())
        batches.append(len(texts))
        out = embed(texts, *a, **kw)
        overlaps.append(in_step.is_set())
        return out

    rt.length_service.embedder.embed = checked_embed
    t = tenant(Quota(requests_per_minute=1000))
    long = await rt.submit(call(t, prompt="Count slowly:", max_tokens=60, ignore_eos=True))
    assert isinstance(long, Accepted)
    await wait_until(lambda: rt.engine.num_steps >= 3)  # the engine is stepping

    async def one(i: int) -> None:
        acc = await rt.submit(call(t, messages=[ChatMessage("user", f"Name a colour, number {i}.")], max_tokens=4))
        assert isinstance(acc, Accepted), acc
        await collect(acc)

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(one, i)
        await collect(long)
    assert sum(batches) == 9 and len(batches) < 9, batches  # the burst shared encoder calls
    # every encoder call is timed, under the compute lock, into the metric
    embed_s = rt.registry.get_sample_value("lmgate_predictor_compute_seconds_total", {"phase": "embed"})
    assert embed_s == pytest.approx(rt.length_service.compute_seconds["embed"]) and embed_s > 0
    assert len(torch_threads) == 1 and threading.get_ident() not in torch_threads, torch_threads
    assert not any(overlaps), overlaps


async def test_steps_on_the_trio_thread_take_a_burst_in_one_step_and_let_the_loop_run(nursery, ckpt, tokenizer):
    """`step_in_thread=False`: a step runs on the trio thread; before it, the loop runs until
    idle, so a burst the queue releases together enters the engine together and other tasks
    still run between steps."""
    import threading

    # a time window that releases the six together, once all six wait: one burst from the queue
    window = PolicyConfig(name="time-window", window_s=60.0, min_batch=6, max_batch=32)
    rt = Runtime(RuntimeConfig(queue=QueueConfig(policy=window), step_in_thread=False), make_engine(ckpt, tokenizer))
    rt.stepper.settle_s = 5.0  # a slow CI host must not cut the settle short
    seen: list[tuple[bool, int]] = []
    step = rt.engine.step

    def recorded_step():
        sched = rt.engine.scheduler
        seen.append((threading.current_thread() is threading.main_thread(), sched.num_running + sched.num_waiting))
        return step()

    rt.engine.step = recorded_step
    await nursery.start(rt.run)
    t = tenant()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await trio.sleep(0.001)
            ticks += 1

    async def one(i: int) -> None:
        acc = await rt.submit(call(t, messages=[ChatMessage("user", f"Say a word, number {i}.")], max_tokens=4))
        assert isinstance(acc, Accepted), acc
        _, _, last = await collect(acc)
        assert isinstance(last, Finished), last

    async with trio.open_nursery() as outer:
        outer.start_soon(ticker)
        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(one, i)
        outer.cancel_scope.cancel()
    assert all(on_main for on_main, _ in seen), "a step ran off the trio thread"
    assert seen[0][1] == 6, seen[:8]  # all six before the first step
    assert ticks >= len(seen) // 2, (ticks, len(seen))  # the loop ran between steps


@pytest.mark.parametrize("step_in_thread", [True, False], ids=["worker", "loop"])
async def test_a_released_burst_enters_the_engine_at_the_next_step_boundary(nursery, ckpt, tokenizer,
                                                                           step_in_thread):
    """Requests the queue releases together while a step runs all enter before the next
    step (the intake is buffered): unbuffered, a worker thread's stepper took one per step —
    a group Magnus released together ran its first steps nearly empty."""
    window = PolicyConfig(name="time-window", window_s=60.0, min_batch=6, max_batch=32)
    rt = Runtime(RuntimeConfig(queue=QueueConfig(policy=window), step_in_thread=step_in_thread),
                 make_engine(ckpt, tokenizer))
    in_engine: list[int] = []
    step = rt.engine.step

    def recorded_step():
        sched = rt.engine.scheduler
        in_engine.append(sched.num_running + sched.num_waiting)
        return step()

    rt.engine.step = recorded_step
    await nursery.start(rt.run)
    t = tenant()

    async def one(i: int) -> None:
        acc = await rt.submit(call(t, prompt=f"Count to ten, {i}:", max_tokens=8, ignore_eos=True))
        assert isinstance(acc, Accepted), acc
        _, _, last = await collect(acc)
        assert isinstance(last, Finished) and last.usage.completion_tokens == 8, last

    async with trio.open_nursery() as n:
        for i in range(6):
            n.start_soon(one, i)
    # the first step may start on the first request the stepper wakes for; by the second all are in
    assert max(in_engine[:2]) == 6, in_engine[:8]
    assert len(rt.stepper.active) == 0 and rt.engine.block_manager.num_free_blocks == rt.engine.num_blocks


async def test_by_default_steps_run_off_the_trio_thread(nursery, ckpt, tokenizer):
    """The default (`step_in_thread=True`): steps run in a worker thread while the loop streams."""
    import threading

    rt = Runtime(RuntimeConfig(), make_engine(ckpt, tokenizer))
    threads: list[bool] = []
    step = rt.engine.step

    def recorded_step():
        threads.append(threading.current_thread() is threading.main_thread())
        return step()

    rt.engine.step = recorded_step
    await nursery.start(rt.run)
    acc = await rt.submit(call(tenant(), prompt="Count:", max_tokens=6, ignore_eos=True))
    assert isinstance(acc, Accepted), acc
    _, deltas, last = await collect(acc)
    assert isinstance(last, Finished) and last.usage.completion_tokens == 6
    assert threads and not any(threads)


async def test_magnus_starts_from_a_seed_when_redis_holds_none(nursery, ckpt, tokenizer, services, tmp_path):
    """`predictor_seed`: a fresh deployment (nothing in Redis) starts from a trained
    predictor — its first request is predicted by the model, not the prior — and the seed
    is saved to Redis, so a restart restores it (and what was learned on top) instead."""
    import numpy as np

    from actors.predictor import LengthPredictor, PredictorService, RequestFeatures

    rng = np.random.default_rng(0)
    seed = LengthPredictor()
    for k in range(40):
        e = rng.normal(size=384)
        seed.observe(RequestFeatures("acme", None, None, 10 + k, 64, (e / np.linalg.norm(e)).astype(np.float32)),
                     8 + k % 16)
    seed.fit()
    path = tmp_path / "seed.npz"
    path.write_bytes(seed.to_bytes())
    rt = Runtime(RuntimeConfig(length_predictor="magnus", predictor_seed=str(path)), make_engine(ckpt, tokenizer),
                 **services)
    sources: list[str] = []
    predict_many = rt.length_service.predict_many

    async def recording_predict_many(sts):
        out = await predict_many(sts)
        sources.extend(pred.source for pred, _ in out)
        return out

    rt.length_service.predict_many = recording_predict_many
    await nursery.start(rt.run)
    assert rt.length_service.predictor.num_samples == 40 and rt.length_service.predictor.model is not None
    acc = await rt.submit(call(tenant(), messages=[ChatMessage("user", "Say hi.")], max_tokens=8))
    assert isinstance(acc, Accepted), acc
    await collect(acc)
    assert sources == ["model"]
    stored = PredictorService(store=services["store"])
    assert await stored.load() and stored.predictor.num_samples == 40


async def test_beam_search_gets_an_equal_share_of_the_kv_cache_per_beam(runtime, services):
    """max_tokens left out defaults to what each beam can hold (whole pages of a quarter of
    the cache for 4 beams), not to what one sequence could: the engine would refuse that.
    A max_tokens beyond a beam's share is a 400 that says so. Usage counts what every beam
    decoded, not only the answers."""
    engine = runtime.stepper.engine
    block = engine.config.cache.block_size
    share = engine.num_blocks // 4 * block  # tokens each of 4 beams may fill
    prompt = "word " * (share - 12)
    n_prompt = len(engine.tokenizer.encode(prompt))
    assert 0 < share - n_prompt < 40
    t = tenant(id="beams")
    decoded = engine.counters["generated_tokens"]
    acc = await runtime.submit(call(t, prompt=prompt, max_tokens=None, use_beam_search=True, n=2, best_of=4))
    assert isinstance(acc, Accepted), acc
    _, deltas, fin = await collect(acc)
    assert isinstance(fin, Finished) and len(fin.finish_reasons) == 2
    decoded = engine.counters["generated_tokens"] - decoded
    assert fin.usage.completion_tokens == decoded > sum(len(d.token_ids) for d in deltas)
    assert all(len(d.token_ids) <= share - n_prompt for d in deltas)
    # its answers come at the end: no TTFT or TPOT sample (they would read ~all and ~0), but a latency
    sample = runtime.metrics.registry.get_sample_value
    await wait_until(lambda: sample("lmgate_e2e_request_latency_seconds_count", {"tenant": "beams"}) == 1)
    assert sample("lmgate_time_to_first_token_seconds_count", {"tenant": "beams"}) in (None, 0)
    assert sample("lmgate_time_per_output_token_seconds_count", {"tenant": "beams"}) in (None, 0)
    rej = await runtime.submit(call(t, prompt=prompt, max_tokens=share - n_prompt + 1, use_beam_search=True,
                                    best_of=4))
    assert isinstance(rej, Rejected) and rej.status == 400 and "each of 4 beams" in rej.message
    await wait_until(lambda: engine.block_manager.num_free_blocks == engine.num_blocks)


async def test_a_beam_search_holds_its_beams_tokens_and_is_charged_what_they_ran_when_cancelled(runtime, services):
    """A beam search returns nothing before its end, yet every beam step costs: the quota
    holds max_tokens x best_of, and a search cancelled mid-way is charged its beams' tokens."""
    engine = runtime.stepper.engine
    prompt = "Name three rivers of Europe."
    n_prompt = len(engine.tokenizer.encode(prompt))
    room = Quota(tokens_per_minute=n_prompt + 4 * 40)
    wide = await runtime.submit(call(tenant(room, id="wide"), prompt=prompt, max_tokens=41, use_beam_search=True,
                                     best_of=4))
    assert isinstance(wide, Rejected) and wide.status == 429 and "tokens_per_minute" in wide.message
    c = call(tenant(room, id="cut"), prompt=prompt, max_tokens=40, use_beam_search=True, best_of=4,
             ignore_eos=True)
    acc = await runtime.submit(c)
    assert isinstance(acc, Accepted), acc
    await wait_until(lambda: engine.decoded_tokens(c.request_id) >= 9)
    acc.cancel()
    await wait_until(lambda: not engine.has_unfinished() and runtime.accounting.settled >= 1)
    [row] = await usage_rows(services["quotas"], "cut")
    assert row.prompt_tokens == n_prompt and 9 <= row.completion_tokens < 4 * 40
    assert engine.block_manager.num_free_blocks == engine.num_blocks


async def test_a_refused_chat_request_stores_nothing_in_the_prompt_cache(runtime, services):
    """The rendering of a chat prompt is stored only once its request is admitted: a tenant
    over its quota (or a prompt too long to run) could otherwise fill Redis for free."""
    cache = services["prompt_cache"]
    msgs = [ChatMessage("user", "A question nobody asked before: " + "why? " * 20)]
    as_dicts = [{"role": m.role, "content": m.content} for m in msgs]
    acme = tenant(Quota(tokens_per_minute=10))
    over = await runtime.submit(call(acme, messages=msgs, max_tokens=4))
    assert isinstance(over, Rejected) and over.status == 429
    too_long = await runtime.submit(call(tenant(), messages=[ChatMessage("user", "word " * 3000)], max_tokens=4))
    assert isinstance(too_long, Rejected) and too_long.status == 400
    scope = scope_for(acme.as_tenant())
    assert await cache.get(scope, runtime.admission.rendered_by, as_dicts) is None
    assert await cache.get(scope, runtime.admission.rendered_by, [{"role": "user", "content": "word " * 3000}]) is None
    other = tenant(id="other")
    ok = await runtime.submit(call(other, messages=msgs, max_tokens=4))
    assert isinstance(ok, Accepted)
    await collect(ok)
    hit = await cache.get(scope_for(other.as_tenant()), runtime.admission.rendered_by, as_dicts)
    assert hit is not None and list(hit.token_ids) and hit.text.endswith("assistant\n")
    # stored for its tenant only: whether an entry exists shows in time, and tells whether
    # someone sent that exact conversation
    assert await cache.get(scope, runtime.admission.rendered_by, as_dicts) is None


async def test_a_template_that_writes_the_time_is_never_kept_in_the_prompt_cache(nursery, ckpt, tokenizer, services):
    """Llama 3's template writes "Today Date": a rendering kept an hour served the first
    request's date (or time) to every later one of the same messages."""
    from gpu.tokenizer import Tokenizer, TokenizerSpec

    clock = ("{{ 'It is ' + strftime_now('%H:%M:%S') + '.' }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
             "{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    ticking = Tokenizer(tokenizer.backend, TokenizerSpec(tokenizer.bos_token_id, tokenizer.eos_token_ids[0], clock))
    assert ticking.template_reads_clock and not tokenizer.template_reads_clock
    rt = Runtime(RuntimeConfig(), make_engine(ckpt, ticking), **services)
    await nursery.start(rt.run)
    msgs = [ChatMessage("user", "What time is it?")]
    for _ in range(2):
        acc = await rt.submit(call(tenant(), messages=msgs, max_tokens=1))
        assert isinstance(acc, Accepted)
        await collect(acc)
    assert await services["prompt_cache"].get(scope_for(tenant().as_tenant()), rt.admission.rendered_by,
                                              [{"role": "user", "content": "What time is it?"}]) is None
    assert "lmgate_prompt_cache_lookups_total{" not in prometheus_client.generate_latest(rt.registry).decode()


async def test_a_no_store_chat_request_leaves_its_conversation_out_of_the_prompt_cache(runtime, services):
    cache = services["prompt_cache"]
    t = tenant(id="private")
    msgs = [ChatMessage("user", "My account number is 12345678; what is my balance?")]
    ok = await runtime.submit(msgspec.structs.replace(call(t, messages=msgs, max_tokens=2), cache_store=False))
    assert isinstance(ok, Accepted)
    await collect(ok)
    assert await cache.get(scope_for(t.as_tenant()), runtime.admission.rendered_by, [{"role": "user", "content": msgs[0].content}]) is None


async def test_token_metrics_count_what_was_billed_and_what_the_engine_generated(runtime, services):
    t = tenant(id="metered")
    totals = []
    for _ in range(2):  # generated, then answered from the response cache
        acc = await runtime.submit(call(t, prompt="Count to three.", max_tokens=4, ignore_eos=True))
        _, _, last = await collect(acc)
        totals.append((last.usage.prompt_tokens, last.usage.completion_tokens, last.cached))
        await wait_until(lambda: services["response_cache"].stats.stores == 1)
    assert [cached for *_, cached in totals] == [False, True]
    await wait_until(lambda: runtime.metrics.requests.labels("metered", "cached")._value.get() == 1)
    prompt, completion = totals[0][:2]
    assert runtime.metrics.prompt_tokens.labels("metered")._value.get() == 2 * prompt  # both billed
    assert runtime.metrics.generation_tokens.labels("metered")._value.get() == completion  # one generated


async def test_an_engine_of_another_dtype_or_quantization_does_not_answer_from_the_cache(runtime, services):
    """Replicas that share a Redis may run the model in another dtype or quantization
    (`--dtype auto` picks per CPU), or other weights under the same served name: their
    greedy answers differ, so the response cache keys them apart."""
    t = tenant(id="variants")
    assert runtime.admission.config.engine_variant == (
        f"{str(runtime.engine.dtype).removeprefix('torch.')}/none/{runtime.engine.weights_fingerprint}")

    async def cached() -> bool:
        acc = await runtime.submit(call(t, prompt="Name a colour.", max_tokens=3))
        _, _, last = await collect(acc)
        return last.cached

    assert not await cached()
    await wait_until(lambda: services["response_cache"].stats.stores == 1)
    assert await cached()
    mine = runtime.admission.config
    for other in ("float32/int8/" + runtime.engine.weights_fingerprint, mine.engine_variant[:-1] + "x"):
        runtime.admission.config = replace(mine, engine_variant=other)
        assert not await cached()
    runtime.admission.config = mine
    assert await cached()


async def test_cached_prefixes_are_shared_within_a_tenant_only(runtime):
    """The engine's prefix cache is salted by tenant (vLLM's cache_salt): tenant B sending
    A's prompt computes it all (`cached_prompt_tokens` 0), A again finds its blocks; the
    tenants of the shared cache pool share theirs. The salt is the tenant record's, its
    creation time in it: the id deleted and created again does not see the old blocks."""
    prompt = "A secret that only one tenant knows: " + "the launch code is 4 8 15 16 23 42. " * 6

    async def cached(t: TenantContext) -> int:
        acc = await runtime.submit(call(t, prompt=prompt, max_tokens=1))
        assert isinstance(acc, Accepted)
        _, _, last = await collect(acc)
        return last.usage.cached_prompt_tokens

    assert await cached(tenant(id="a")) == 0
    assert await cached(tenant(id="b")) == 0  # not A's blocks
    assert await cached(tenant(id="a")) >= 48
    assert await cached(tenant(id="a", created_at=1e9)) == 0  # "a" deleted, and created again
    assert await cached(tenant(id="p1", shared_cache_pool=True)) == 0
    assert await cached(tenant(id="p2", shared_cache_pool=True)) >= 48


async def test_a_tenant_out_of_requests_per_minute_is_refused_before_tokenizing(runtime):
    """Once Redis says a tenant's requests per minute are used up, its next requests get
    the 429 at once, before their prompt is tokenized (a bad prompt is not even read), until
    the window frees one; other tenants, and the tenant re-created, are not held."""
    t = tenant(Quota(requests_per_minute=1))
    first = await runtime.submit(call(t, prompt="hi", max_tokens=1))
    assert isinstance(first, Accepted)
    await collect(first)
    second = await runtime.submit(call(t, prompt="hi", max_tokens=1))
    assert isinstance(second, Rejected) and second.status == 429 and second.retry_after > 50
    assert (second.rate_limits.limit_requests, second.rate_limits.remaining_requests) == (1, 0)
    unreadable = await runtime.submit(call(t, messages=[], max_tokens=1))  # a 400 were it tokenized
    assert isinstance(unreadable, Rejected) and unreadable.status == 429 and 0 < unreadable.retry_after <= 60
    assert (unreadable.rate_limits.limit_requests, unreadable.rate_limits.remaining_requests) == (1, 0)
    assert "requests_per_minute" in unreadable.message
    other = await runtime.submit(call(tenant(Quota(requests_per_minute=1), id="other"), messages=[], max_tokens=1))
    assert isinstance(other, Rejected) and other.status == 400
    raised = await runtime.submit(call(tenant(Quota(requests_per_minute=5)), messages=[], max_tokens=1))
    assert isinstance(raised, Rejected) and raised.status == 400  # its limit changed: read afresh


async def test_requests_refused_after_tokenizing_count_against_requests_per_minute(runtime):
    """A prompt too long to run is a 400, but it was tokenized: it counts one request, as
    OpenAI counts unsuccessful requests, so a tenant limited to a few a minute cannot keep
    the tokenizer busy with refused prompts. Once they fill its minute, its next request
    is a 429 before its prompt is read. Refusals before any tokenizing (an unknown model)
    cost nothing."""
    t = tenant(Quota(requests_per_minute=2), id="refused")
    for _ in range(3):
        rej = await runtime.submit(call(t, prompt="Hi", model="gpt-4"))
        assert isinstance(rej, Rejected) and rej.status == 404
    for _ in range(2):
        rej = await runtime.submit(call(t, prompt="word " * 3000))
        assert isinstance(rej, Rejected) and (rej.status, rej.code) == (400, "context_length_exceeded")
    rej = await runtime.submit(call(t, messages=[], max_tokens=1))  # not read: a 400 were it tokenized
    assert isinstance(rej, Rejected) and rej.status == 429 and 50 < rej.retry_after <= 60
    assert "requests_per_minute" in rej.message


async def test_a_hung_redis_costs_one_request_its_timeouts_and_is_found_back_without_requests(
        runtime, services, redis_server):
    """A Redis that stops answering (a stalled host): the first request waits out the
    reservation's timeouts; the next ones skip the reservation and their settles (served
    fail-open, their usage owed), and the runtime's watcher finds Redis back once it answers,
    with no request paying for the probe; what was owed is then recorded."""
    store = services["store"]
    t = tenant(Quota(requests_per_minute=100), id="hung")

    async def one() -> float:
        started = trio.current_time()
        acc = await runtime.submit(call(t, prompt="Hi", max_tokens=2, temperature=1.0))
        assert isinstance(acc, Accepted), acc
        await collect(acc)
        with trio.move_on_after(2.0):  # as the gateway's last frame waits (`RequestHandle.wait_settled`)
            await acc.settled.wait()
        return trio.current_time() - started

    await one()  # (warm)
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        first = await one()
        rest = []
        for _ in range(3):  # more than a second apart: past the window a request would probe in
            await trio.sleep(1.2)
            rest.append(await one())
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    assert first >= 0.9, first  # (the store's timeout: 1 s)
    assert max(rest) < first / 2, (first, rest)
    await wait_until(lambda: store.healthy and store.reachable(), timeout=15)  # the watcher's ping
    await wait_until(lambda: runtime.accounting.settled == 5, timeout=30)
    [row] = await usage_rows(services["quotas"], "hung")
    assert row.requests == 5


async def test_a_redis_that_just_failed_to_answer_is_not_asked_for_the_reservation(runtime, services, monkeypatch):
    """Within a second of a Redis call timing out, admission goes straight to the quota
    policy (fail-open here) instead of waiting out the timeouts again on every request."""
    import time

    quotas = services["quotas"]
    asked = []

    async def reserve(*args, **kwargs):
        asked.append(args)
        raise AssertionError("asked a Redis that just failed to answer")

    monkeypatch.setattr(quotas, "reserve", reserve)
    monkeypatch.setattr(quotas.store, "healthy", False)
    monkeypatch.setattr(quotas.store, "unreachable_at", time.time())  # as a timeout leaves it
    acc = await runtime.submit(call(tenant(Quota(requests_per_minute=10), id="skip"), prompt="Hi", max_tokens=2))
    assert isinstance(acc, Accepted) and not asked
    await collect(acc)


async def test_a_reserve_whose_reply_is_lost_is_released_when_quotas_fail_closed(nursery, ckpt, tokenizer, services,
                                                                                  monkeypatch):
    """A reserve that timed out may still have run (a Redis that stalls runs it on waking):
    refused with a 503 (quotas failing closed), its reservation held the tenant's only
    `max_concurrent` slot for a minute though nothing ran. It is released in the background."""
    quotas = services["quotas"]
    rt = Runtime(RuntimeConfig(quota_fail_open=False), make_engine(ckpt, tokenizer), **services)
    await nursery.start(rt.run)
    real = quotas.reserve
    lost = []

    async def reserved_but_reply_lost(*args, **kwargs):
        result = await real(*args, **kwargs)
        if not lost:
            lost.append(result)
            with quotas.store.guard():  # (as a reply that timed out: Redis marked unreachable)
                raise TimeoutError("the reply timed out")
        return result

    monkeypatch.setattr(quotas, "reserve", reserved_but_reply_lost)
    t = tenant(Quota(max_concurrent=1), id="lost")
    refused = await rt.submit(call(t, prompt="Hi", max_tokens=2))
    assert isinstance(refused, Rejected) and (refused.status, refused.code) == (503, "quota_unavailable")
    assert isinstance(lost[0], Admitted) and await quotas.running("lost") == 1  # (made, though refused)
    with trio.fail_after(5):
        while await quotas.running("lost"):
            await trio.sleep(0.1)
    acc = await rt.submit(call(t, prompt="Hi", max_tokens=2))
    assert isinstance(acc, Accepted), acc
    await collect(acc)
    # a refusal (out of memory) is a definite answer: the reserve never ran, nothing to release
    # (a release per refused request wrote a key into the full Redis)
    store = services["store"]
    [policy] = (await store.client.config_get(["maxmemory-policy"])).values()
    await store.client.config_set({"maxmemory": "1", "maxmemory-policy": "noeviction"})
    try:
        oom = call(t, prompt="Hi", max_tokens=2)
        refused = await rt.submit(oom)
        assert isinstance(refused, Rejected) and refused.status == 503
        await trio.sleep(1.0)
        assert not await store.client.exists([store.key("q", "{lost}", "done:" + oom.request_id)])
    finally:
        await store.client.config_set({"maxmemory": "0", "maxmemory-policy": policy})


def test_a_deleted_tenant_keeps_its_fairness_counter_while_its_requests_wait():
    """Forgotten while its backlog waited, a deleted tenant's counter read as no service at
    all, and its whole backlog went ahead of every other tenant of its tier (a review: 40
    of the next 40 released). Kept until nothing of it waits or runs; its series go at once."""
    from types import SimpleNamespace

    from actors.metrics import Metrics
    from actors.policies import EngineView, Job, PriorityAging

    policy = PriorityAging()
    for t in ("gone", "busy"):
        policy.vtc.charge(t, 100, 100)
        policy.on_arrival(Job(f"{t}-0", t, 10, 20, 0.0, 20.0), 0.0)
    metrics = Metrics()
    metrics.requests.labels("gone", "ok").inc()
    stand_in = SimpleNamespace(metrics=metrics, queue=SimpleNamespace(policy=policy),
                               stepper=SimpleNamespace(active={}))
    Runtime.forget_tenants(stand_in, ["gone"])  # type: ignore[arg-type]
    assert policy.vtc.counters["gone"] == 300.0 and metrics.tenants() == set()
    policy.release(1.0, EngineView(0, 8, 100, 100, 16))  # both run
    stand_in.stepper.active = {"gone-0": SimpleNamespace(tenant_id="gone")}
    Runtime.forget_tenants(stand_in, ["gone"])  # type: ignore[arg-type]
    assert "gone" in policy.vtc.counters  # (running)
    stand_in.stepper.active = {}
    Runtime.forget_tenants(stand_in, ["gone"])  # type: ignore[arg-type]
    assert "gone" not in policy.vtc.counters and "busy" in policy.vtc.counters


# ---------------------------------------------------------------- collapsed forwarding (actors.flights)
def collapsed(rt: Runtime, result: str) -> float:
    return rt.metrics.collapsed.labels(result)._value.get()


async def test_identical_requests_in_flight_generate_once_and_are_billed_as_cache_hits(runtime, services):
    """A burst of identical deterministic requests: the first generates, the others wait
    for its answer (no sequence, no queue place) and are given it as a cache hit, billed
    as one; the engine generates the answer once."""
    t = tenant(id="burst")
    ask = dict(prompt="Write a long poem about the sea", max_tokens=40, ignore_eos=True)
    leader = await runtime.submit(call(t, **ask))
    assert isinstance(leader, Accepted) and not leader.cached
    generated = runtime.engine.counters["generated_tokens"]
    followers = [await runtime.submit(call(t, **ask)) for _ in range(3)]
    assert all(isinstance(f, Accepted) for f in followers)
    assert runtime.admission.following == 3 and runtime.waiting() == 0  # they hold no place in the queue
    assert "lmgate_collapsed_requests_waiting 3.0" in prometheus_client.generate_latest(runtime.registry).decode()
    text, _, fin = await collect(leader)
    assert isinstance(fin, Finished) and not fin.cached and fin.usage.completion_tokens == 40
    for f in followers:
        ftext, deltas, ffin = await collect(f)
        assert ftext == text and [t for d in deltas for t in d.token_ids] and ffin.cached
        assert ffin.usage == Usage(fin.usage.prompt_tokens, 40, fin.usage.prompt_tokens)
    assert runtime.engine.counters["generated_tokens"] - generated <= 40  # once, not four times
    assert collapsed(runtime, "answered") == 3 and runtime.admission.following == 0
    await wait_until(lambda: runtime.accounting.pending == 0)
    assert len(runtime.admission.flights) == 0  # (grounded once its answer was stored)
    [row] = await usage_rows(services["quotas"], "burst")
    assert (row.requests, row.completion_tokens) == (4, 160)  # each billed as the cache hit it is


async def test_a_no_cache_request_does_not_wait_for_an_identical_one(runtime):
    """`no-cache` asks for an answer of its own: it generates alongside the one in flight."""
    t = tenant(id="streams")
    ask = dict(prompt="Describe a busy harbour at dawn", max_tokens=30, ignore_eos=True)
    leader = await runtime.submit(call(t, **ask))
    other = await runtime.submit(msgspec.structs.replace(call(t, **ask), cache_lookup=False))
    assert runtime.admission.following == 0
    texts = [(await collect(a))[0] for a in (leader, other)]
    assert texts[0] == texts[1]
    assert collapsed(runtime, "answered") == 0


def delta_view(deltas: list) -> list:
    return [(d.text, list(d.token_ids), d.finish_reason) for d in deltas]


async def test_streamed_identical_requests_are_sent_the_leaders_answer_as_it_is_generated(runtime, services):
    """A streamed request identical to one in flight is sent that one's deltas as they come
    (its first token does not wait for the leader's last), the ones before it joined at
    once; the engine generates the answer once; each is billed as a cache hit."""
    t = tenant(id="tails")
    ask = dict(prompt="Write a long story about a lighthouse keeper", max_tokens=300, ignore_eos=True)
    leader = await runtime.submit(msgspec.structs.replace(call(t, **ask), stream=True))
    generated = runtime.engine.counters["generated_tokens"]
    early = await runtime.submit(msgspec.structs.replace(call(t, **ask), stream=True))
    assert runtime.admission.following == 1 and runtime.waiting() == 0
    first = await early.events.receive()
    assert isinstance(first, TokenDelta) and runtime.engine.has_unfinished()  # (the leader is still generating)
    await wait_until(lambda: runtime.engine.counters["generated_tokens"] >= generated + 20)
    late = await runtime.submit(msgspec.structs.replace(call(t, **ask), stream=True))
    plain = await runtime.submit(call(t, **ask))  # (not streamed: the answer whole, at the end)
    assert runtime.admission.following == 3
    text, deltas, fin = await collect(leader)
    assert isinstance(fin, Finished) and not fin.cached and fin.usage.completion_tokens == 300
    etext, edeltas, efin = await collect(early)
    assert delta_view([first, *edeltas]) == delta_view(deltas) and first.text + etext == text
    ltext, ldeltas, lfin = await collect(late)
    assert delta_view(ldeltas) == delta_view(deltas)
    ptext, pdeltas, pfin = await collect(plain)
    assert ptext == text and len(pdeltas) == 1
    for f in (efin, lfin, pfin):
        assert isinstance(f, Finished) and f.cached
        assert f.usage == Usage(fin.usage.prompt_tokens, 300, fin.usage.prompt_tokens)
    assert runtime.engine.counters["generated_tokens"] - generated <= 300  # once
    assert collapsed(runtime, "answered") == 3 and runtime.admission.following == 0
    await wait_until(lambda: runtime.accounting.pending == 0 and len(runtime.admission.flights) == 0)
    [row] = await usage_rows(services["quotas"], "tails")
    assert (row.requests, row.completion_tokens) == (4, 1200)


async def test_a_streamed_follower_gets_the_whole_answer_when_the_leaders_client_goes_away(runtime, services):
    t = tenant(id="tail-detach")
    ask = dict(prompt="Describe the rivers of Africa", max_tokens=60, ignore_eos=True, logprobs=2)
    leader = await runtime.submit(call(t, **ask))
    follower = await runtime.submit(msgspec.structs.replace(call(t, **ask), stream=True))
    first = await follower.events.receive()
    leader.cancel()  # detached: generates on for the stream
    text, deltas, fin = await collect(follower)
    deltas = [first, *deltas]
    assert isinstance(fin, Finished) and fin.cached and fin.usage.completion_tokens == 60
    assert sum(len(d.token_ids) for d in deltas) == 60 and deltas[-1].finish_reason == "length"
    assert all(len(d.logprobs) == len(d.token_ids) == len(d.top_logprobs) for d in deltas)
    again = await collect(await runtime.submit(call(t, **ask)))  # (the stored answer: the same tokens)
    assert [t for d in again[1] for t in d.token_ids] == [t for d in deltas for t in d.token_ids]
    await wait_until(lambda: runtime.accounting.pending == 0 and not runtime.engine.has_unfinished())
    engine = runtime.engine
    assert engine.block_manager.num_free_blocks == engine.num_blocks and len(runtime.admission.flights) == 0


async def test_a_streamed_follower_whose_leader_fails_midway_ends_with_an_error(runtime, monkeypatch, services):
    """A stream already sent part of a leader's answer cannot start over (the client has
    those tokens): it ends with a 503 `unavailable` and is billed nothing; one that had
    been sent nothing goes on alone."""
    import dataclasses
    import threading

    engine = runtime.engine
    execute = engine.runner.execute
    started = threading.Event()  # (the leader fails once the first stream has tokens)

    def failing(plan, adapters):  # noqa: ANN001
        out = execute(plan, adapters)
        rows = [i for i, sid in enumerate(out.seq_ids) if engine.owner_of(sid).startswith("midway-")]
        if not rows or not started.is_set():
            return out
        logits = out.logits.clone()
        logits[rows] = float("nan")
        return dataclasses.replace(out, logits=logits)

    monkeypatch.setattr(engine.runner, "execute", failing)
    t = tenant(id="tail-fail")
    ask = dict(prompt="Name every ocean and sea", max_tokens=200, ignore_eos=True)
    leader = await runtime.submit(msgspec.structs.replace(call(t, **ask), request_id="midway-lead"))
    follower = await runtime.submit(msgspec.structs.replace(call(t, **ask), stream=True))
    assert isinstance(await follower.events.receive(), TokenDelta)
    started.set()
    assert isinstance((await collect(leader))[2], Failed)
    _, _, end = await collect(follower)
    assert isinstance(end, Failed) and (end.status, end.code) == (503, "unavailable")
    await wait_until(lambda: runtime.accounting.pending == 0 and len(runtime.admission.flights) == 0)
    assert runtime.admission.following == 0 and engine.block_manager.num_free_blocks == engine.num_blocks


async def test_a_stream_retried_as_its_client_leaves_is_not_sent_the_old_stream_s_tokens(runtime):
    """A client leaves a stream and retries it at once: the first, cancelled, lands without
    an answer a moment later; the retry must not follow it (a review: it was sent the old
    stream's tokens, then a 503), but generate its own answer whole."""
    t = tenant(id="retry")
    ask = dict(prompt="Describe a thunderstorm over the sea", max_tokens=60, ignore_eos=True)
    first = await runtime.submit(msgspec.structs.replace(call(t, **ask), stream=True))
    await read_tokens(first, 5)
    first.cancel()
    retry = await runtime.submit(msgspec.structs.replace(call(t, **ask), stream=True))
    assert runtime.admission.following == 0
    _, deltas, fin = await collect(retry)
    assert isinstance(fin, Finished) and sum(len(d.token_ids) for d in deltas) == 60
    await wait_until(lambda: runtime.accounting.pending == 0 and len(runtime.admission.flights) == 0)


async def test_a_streamed_follower_that_leaves_part_way_is_billed_what_it_was_sent(runtime, services):
    """As any stream cancelled part-way: its prompt and the tokens it was sent (a review: a
    follower was billed nothing, however much it had been sent)."""
    t = tenant(id="tail-leave")
    ask = dict(prompt="List the rivers of South America", max_tokens=200, ignore_eos=True)
    leader = await runtime.submit(call(t, **ask))
    follower = await runtime.submit(msgspec.structs.replace(call(t, **ask), stream=True))
    got = await read_tokens(follower, 5)
    follower.cancel()
    await follower.settled.wait()
    _, _, fin = await collect(leader)
    await wait_until(lambda: runtime.accounting.pending == 0 and len(runtime.admission.flights) == 0)
    [row] = await usage_rows(services["quotas"], "tail-leave")
    sent_at_least = got
    assert row.requests == 2 and row.prompt_tokens == 2 * fin.usage.prompt_tokens
    assert 200 + sent_at_least <= row.completion_tokens < 400  # (the follower: what it was sent, 5 or a few more)


async def test_a_streamed_request_does_not_follow_a_beam_search(runtime):
    """A beam search's tokens come at its end: a stream following it would wait for all of
    them (its first token after the leader's last)."""
    t = tenant(id="tail-beam")
    ask = dict(prompt="Name a famous painter", max_tokens=8, use_beam_search=True, n=1, best_of=2)
    leader = await runtime.submit(call(t, **ask))
    stream = await runtime.submit(msgspec.structs.replace(call(t, **ask), stream=True))
    plain = await runtime.submit(call(t, **ask))
    assert runtime.admission.following == 1  # (the non-streamed one)
    for acc in (leader, stream, plain):
        assert isinstance((await collect(acc))[2], Finished)


async def test_a_leader_whose_client_goes_away_generates_on_for_its_followers(runtime, services):
    """The leader's client goes away: it generates on, for those waiting (they started over
    before: ~2.5x as long), its client charged what it had generated, its slot freed at
    once (an identical retry waits for the same answer); the rest is charged to no one."""
    t = tenant(Quota(max_concurrent=4), id="detach")
    ask = dict(prompt="List the planets of the solar system", max_tokens=60, ignore_eos=True)
    leader = await runtime.submit(call(t, **ask))
    followers = [await runtime.submit(call(t, **ask)) for _ in range(3)]
    assert runtime.admission.following == 3
    await read_tokens(leader, 3)
    generated = runtime.engine.counters["generated_tokens"]
    leader.cancel()
    await leader.settled.wait()
    assert await services["quotas"].running("detach") == 3  # the leader's slot is free; its followers hold theirs
    ends = [await collect(f) for f in followers]
    assert all(isinstance(fin, Finished) and fin.cached and fin.usage.completion_tokens == 60 for _, _, fin in ends)
    assert len({text for text, _, _ in ends}) == 1
    assert (collapsed(runtime, "answered"), collapsed(runtime, "generated")) == (3, 0)
    assert runtime.engine.counters["generated_tokens"] - generated <= 60  # no follower started over
    await wait_until(lambda: runtime.accounting.pending == 0 and not runtime.engine.has_unfinished())
    [row] = await usage_rows(services["quotas"], "detach")
    assert row.requests == 4 and 3 * 60 + 3 <= row.completion_tokens < 4 * 60  # the leader: what it had
    engine = runtime.engine
    assert engine.block_manager.num_free_blocks == engine.num_blocks and len(runtime.admission.flights) == 0


async def abandon_after(rt: Runtime, follower: Accepted, tokens: int) -> None:
    """Once the engine has generated `tokens` more, the last follower of a detached leader
    goes; returns when the leader has stopped and been accounted."""
    generated = rt.engine.counters["generated_tokens"]
    await wait_until(lambda: rt.engine.counters["generated_tokens"] >= generated + tokens)
    follower.cancel()
    await wait_until(lambda: not rt.engine.has_unfinished() and len(rt.admission.flights) == 0)
    await wait_until(lambda: rt.accounting.pending == 0)


async def test_a_detached_leader_stops_when_its_last_follower_goes(runtime, services):
    t = tenant(id="nobody")
    ask = dict(prompt="Describe every country in Europe", max_tokens=600, ignore_eos=True)
    leader = await runtime.submit(call(t, **ask))
    follower = await runtime.submit(call(t, **ask))
    await wait_until(lambda: runtime.engine.counters["generated_tokens"] > 0)
    leader.cancel()
    assert runtime.admission.following == 1 and runtime.engine.has_unfinished()  # generating on, for it
    at_detach = runtime.engine.counters["generated_tokens"]
    await abandon_after(runtime, follower, 10)
    # one request (the follower's: nothing), charged all it generated: what it generated for
    # no one after its client left too (the review: free of every limit, else)
    [row] = await usage_rows(services["quotas"], "nobody")
    assert row.requests == 1
    assert abs(row.completion_tokens - runtime.engine.counters["generated_tokens"]) <= 2
    assert at_detach + 10 <= row.completion_tokens < 600


@pytest.mark.parametrize("how", ["inbox full", "refunded"])
async def test_followers_of_a_cancelled_leader_that_cannot_generate_on_start_over_once(runtime, monkeypatch, how):
    """A cancelled leader that does not generate on (accounting's inbox full; a batch
    refused after it, whose answer is not kept) lands without an answer: the first
    follower leads again, the others wait for it."""
    if how == "inbox full":
        monkeypatch.setattr(runtime.admission, "_detach", lambda st: False)
    t = tenant(id="relead")
    ask = dict(prompt=f"List the moons of Jupiter ({how})", max_tokens=30, ignore_eos=True)
    leader = await runtime.submit(call(t, **ask))
    followers = [await runtime.submit(call(t, **ask)) for _ in range(3)]
    assert runtime.admission.following == 3
    if how == "refunded":
        leader.refund()
    leader.cancel()
    ends = [await collect(f) for f in followers]
    assert all(isinstance(fin, Finished) and fin.usage.completion_tokens == 30 for _, _, fin in ends)
    assert len({text for text, _, _ in ends}) == 1
    assert (collapsed(runtime, "generated"), collapsed(runtime, "answered")) == (1, 2)
    assert sum(not fin.cached for _, _, fin in ends) == 1  # one generated it
    await wait_until(lambda: runtime.accounting.pending == 0 and not runtime.engine.has_unfinished())
    engine = runtime.engine
    assert engine.block_manager.num_free_blocks == engine.num_blocks and len(runtime.admission.flights) == 0


async def test_a_follower_whose_client_goes_away_is_released_and_billed_nothing(runtime, services):
    t = tenant(Quota(max_concurrent=2), id="gone")
    ask = dict(prompt="Explain how tides work", max_tokens=30, ignore_eos=True)
    leader = await runtime.submit(call(t, **ask))
    follower = await runtime.submit(call(t, **ask))
    assert runtime.admission.following == 1
    assert isinstance(await runtime.submit(call(t, **ask)), Rejected)  # its slot is held while it waits
    follower.cancel()
    await wait_until(lambda: runtime.admission.following == 0)
    await follower.settled.wait()
    assert await services["quotas"].running("gone") == 1  # the leader's
    _, _, fin = await collect(leader)
    assert isinstance(fin, Finished) and fin.usage.completion_tokens == 30
    await wait_until(lambda: runtime.accounting.pending == 0)
    [row] = await usage_rows(services["quotas"], "gone")
    assert (row.requests, row.completion_tokens) == (1, 30)


async def test_a_higher_priority_request_does_not_wait_behind_a_lower_one(runtime):
    t = tenant(id="tiers", priority=5)
    ask = dict(prompt="Name three rivers", max_tokens=60, ignore_eos=True)  # (still running when `same` comes)
    low = await runtime.submit(msgspec.structs.replace(call(t, **ask), priority=1))
    high = await runtime.submit(call(t, **ask))  # the tenant's tier, 5
    assert runtime.admission.following == 0
    same = await runtime.submit(msgspec.structs.replace(call(t, **ask), priority=1))
    assert runtime.admission.following == 1  # its equal follows
    assert len({(await collect(a))[0] for a in (low, high, same)}) == 1


async def test_collapsing_can_be_turned_off_and_the_shutdown_ends_followers(nursery, ckpt, tokenizer, services):
    rt = Runtime(RuntimeConfig(collapse_identical=False), make_engine(ckpt, tokenizer), **services)
    await nursery.start(rt.run)
    t = tenant(id="off")
    ask = dict(prompt="Count the stars", max_tokens=20, ignore_eos=True)
    both = [await rt.submit(call(t, **ask)) for _ in range(2)]
    assert rt.admission.following == 0
    assert [fin.cached for _, _, fin in [await collect(a) for a in both]] == [False, False]

    on = Runtime(RuntimeConfig(), make_engine(ckpt, tokenizer, max_num_seqs=1), **services)
    await nursery.start(on.run)
    leader = await on.submit(call(t, prompt="Tell a story", max_tokens=300, ignore_eos=True))
    follower = await on.submit(call(t, prompt="Tell a story", max_tokens=300, ignore_eos=True))
    assert on.admission.following == 1
    assert on.end_streams() == 2
    for acc in (leader, follower):
        last = (await collect(acc))[2]
        assert isinstance(last, Failed) and (last.status, last.code) == (503, "shutting_down"), last
    await wait_until(lambda: on.accounting.pending == 0 and on.admission.following == 0)
    assert collapsed(on, "generated") == 0  # it never went on to generate on its own


async def test_a_follower_outliving_the_reservation_ttl_keeps_its_concurrency_slot(nursery, ckpt, tokenizer,
                                                                                   services):
    quotas = QuotaManager(services["store"], reservation_ttl_s=0.6)  # extended every 0.2 s
    rt = Runtime(RuntimeConfig(), make_engine(ckpt, tokenizer), **{**services, "quotas": quotas})
    await nursery.start(rt.run)
    t = tenant(Quota(max_concurrent=2), id="patient")
    ask = dict(prompt="Once upon a time", max_tokens=600, ignore_eos=True)
    leader, follower = [await rt.submit(call(t, **ask)) for _ in range(2)]
    assert rt.admission.following == 1
    await trio.sleep(1.5)  # two and a half TTLs
    assert await quotas.running("patient") == 2
    third = await rt.submit(call(t, prompt="Hi"))
    assert isinstance(third, Rejected) and third.status == 429 and "max_concurrent" in third.message
    for acc in (follower, leader):
        acc.cancel()
    await wait_until(lambda: not rt.engine.has_unfinished() and rt.admission.following == 0
                     and rt.accounting.pending == 0)
    assert await quotas.running("patient") == 0


async def test_a_burst_of_followers_larger_than_accountings_inbox_is_answered_and_billed(nursery, ckpt, tokenizer,
                                                                                         services, monkeypatch):
    """Every follower of a flight is answered in the same moment: their ends are sent to
    accounting awaiting room (the review: past its inbox's size, sent without waiting,
    they crashed the admission actor, and went unbilled with their slots held)."""
    monkeypatch.setattr(Runtime, "FOLLOWER_ROOM", 4)  # (1,024 beyond the places of live requests, else)
    rt = Runtime(RuntimeConfig(queue=QueueConfig(max_waiting=1), channel_size=2),
                 make_engine(ckpt, tokenizer, max_num_seqs=1), **services)
    await nursery.start(rt.run)
    t = tenant(Quota(max_concurrent=100), id="crowd")
    ask = dict(prompt="Write a long poem about the wind", max_tokens=30, ignore_eos=True)
    accepted = [await rt.submit(call(t, **ask))]
    await wait_until(lambda: rt.engine.scheduler.num_running == 1)  # (out of the queue of 1)
    accepted += [await rt.submit(call(t, **ask)) for _ in range(24)]
    assert all(isinstance(a, Accepted) for a in accepted) and rt.admission.following == 24
    ends = [(await collect(a))[2] for a in accepted]
    assert all(isinstance(e, Finished) and e.usage.completion_tokens == 30 for e in ends)
    await wait_until(lambda: rt.accounting.pending == 0 and rt.accounting.settled == 25)
    assert rt.metrics.actor_restarts.labels("admission")._value.get() == 0
    assert await services["quotas"].running("crowd") == 0
    [row] = await usage_rows(services["quotas"], "crowd")
    assert (row.requests, row.completion_tokens) == (25, 750)


async def test_a_shared_pool_request_does_not_wait_in_another_tenants_turn(nursery, ckpt, tokenizer, services):
    """Tenants of a shared cache pool: one's request identical to another's still queued is
    generated on its own (it would wait in the other tenant's turn of the queue); once the
    other's runs, it waits for that one's answer. The same tenant's identical request waits."""
    a, b = tenant(id="pool-a", shared_cache_pool=True), tenant(id="pool-b", shared_cache_pool=True)
    rt, busy = await one_seat_taken(nursery, ckpt, tokenizer, services, a)
    ask = dict(prompt="Name the largest ocean", max_tokens=10, ignore_eos=True)
    queued = await rt.submit(call(a, **ask))
    await wait_until(lambda: rt.waiting() == 1)
    other = await rt.submit(call(b, **ask))
    assert rt.admission.following == 0  # the other tenant's: not behind a queued leader
    same = await rt.submit(call(a, **ask))
    assert rt.admission.following == 1  # its own tenant's: it was behind it anyway
    busy.cancel()
    texts = [(await collect(x))[0] for x in (queued, other, same)]
    assert len(set(texts)) == 1


async def test_followers_of_a_request_that_failed_each_go_on_at_once(runtime, monkeypatch):
    """A leader that failed (what may fail each copy: an output constraint, a broken
    adapter, an engine fault) lets its followers go on alone, together, not one after
    another (the review: each waited for the one before it to fail)."""
    import threading

    followed = threading.Event()  # (the leader fails once its followers are there, on any machine)
    poison_logits(runtime.engine, monkeypatch, "fail-", gate=followed)
    t = tenant(id="fails")
    ask = dict(prompt="Name a famous bridge", max_tokens=10, ignore_eos=True)
    leader = await runtime.submit(msgspec.structs.replace(call(t, **ask), request_id="fail-lead"))
    followers = [await runtime.submit(call(t, **ask)) for _ in range(3)]
    assert runtime.admission.following == 3
    followed.set()
    assert isinstance((await collect(leader))[2], Failed)
    ends = [await collect(f) for f in followers]
    assert all(isinstance(fin, Finished) and not fin.cached for _, _, fin in ends)
    assert (collapsed(runtime, "generated"), collapsed(runtime, "answered")) == (3, 0)


async def test_a_min_fresh_no_answer_can_meet_does_not_wait(runtime):
    t = tenant(id="fresh")
    ask = dict(prompt="Name a mountain range", max_tokens=20, ignore_eos=True)
    leader = await runtime.submit(call(t, **ask))
    picky = await runtime.submit(msgspec.structs.replace(call(t, **ask), cache_min_fresh_s=10**8))
    assert runtime.admission.following == 0
    for acc in (leader, picky):
        assert isinstance((await collect(acc))[2], Finished)


async def test_an_answer_not_yet_stored_answers_a_request_at_once(runtime, services, monkeypatch):
    """Between a leader's end and its answer's store (Redis round trips: seconds in an
    outage), an identical request is given the answer, not generated again."""
    cache = services["response_cache"]
    put = cache.put

    async def slow_put(*args, **kwargs):  # noqa: ANN002, ANN003
        await trio.sleep(1.0)
        return await put(*args, **kwargs)

    monkeypatch.setattr(cache, "put", slow_put)
    t = tenant(id="landed")
    ask = dict(prompt="Name a desert", max_tokens=8, ignore_eos=True)
    text, _, _ = await collect(await runtime.submit(call(t, **ask)))
    assert len(runtime.admission.flights) == 1  # landed, its answer being stored
    steps = runtime.engine.counters["generated_tokens"]
    again = await runtime.submit(call(t, **ask))
    again_text, _, fin = await collect(again)
    assert again_text == text and fin.cached and runtime.engine.counters["generated_tokens"] == steps
    await wait_until(lambda: len(runtime.admission.flights) == 0)


async def one_seat_taken(nursery, ckpt, tokenizer, services, t: TenantContext) -> tuple[Runtime, Accepted]:  # noqa: ANN001
    """A runtime whose engine runs one sequence, taken by a long request of `t` (returned
    with it): what comes next waits in the queue."""
    rt = Runtime(RuntimeConfig(), make_engine(ckpt, tokenizer, max_num_seqs=1), **services)
    await nursery.start(rt.run)
    busy = await rt.submit(call(t, prompt="Once upon a time", max_tokens=300, ignore_eos=True))
    await wait_until(lambda: rt.engine.scheduler.num_running == 1)
    return rt, busy


async def test_a_detached_leader_the_engine_refuses_lets_its_followers_go_on(nursery, ckpt, tokenizer, services,
                                                                            monkeypatch):
    """A detached leader still queued, which the engine then refuses (its adapter removed
    meanwhile, say): its followers go on, nothing crashes (the review: the stepper sent
    the refusal into its closed stream and crashed; the followers hung for good)."""
    t = tenant(id="refused")
    rt, busy = await one_seat_taken(nursery, ckpt, tokenizer, services, t)
    ask = dict(prompt="Name a volcano", max_tokens=10, ignore_eos=True)
    leader = await rt.submit(msgspec.structs.replace(call(t, **ask), request_id="refuse-me"))
    follower = await rt.submit(call(t, **ask))
    assert rt.admission.following == 1
    add = rt.engine.add_request

    def refusing(rid, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if rid == "refuse-me":
            raise ValueError("refused by the engine")
        return add(rid, *args, **kwargs)

    monkeypatch.setattr(rt.engine, "add_request", refusing)
    leader.cancel()  # detached: it generates on for the follower, once it runs
    busy.cancel()
    _, _, fin = await collect(follower)
    assert isinstance(fin, Finished) and not fin.cached
    assert rt.metrics.actor_restarts.labels("stepper")._value.get() == 0
    await wait_until(lambda: len(rt.admission.flights) == 0 and rt.accounting.pending == 0)


async def test_a_leader_detached_before_it_ran_is_charged_its_prompt_when_no_one_gets_its_answer(
        nursery, ckpt, tokenizer, services):
    """Detached while queued, a leader is released (nothing ran); if it then runs and its
    followers leave, its prompt is charged with what it generated (the review: the prefill
    was free)."""
    rt, busy = await one_seat_taken(nursery, ckpt, tokenizer, services, tenant(id="busy"))
    t = tenant(id="prefill")
    ask = dict(prompt="Summarize the history of Rome in detail " * 8, max_tokens=400, ignore_eos=True)
    leader = await rt.submit(call(t, **ask))
    follower = await rt.submit(call(t, **ask))
    leader.cancel()
    await leader.settled.wait()
    busy.cancel()
    await abandon_after(rt, follower, 5)
    [row] = await usage_rows(services["quotas"], "prefill")
    assert row.prompt_tokens == leader.prompt_tokens and row.completion_tokens >= 5 and row.requests == 1
    # /metrics counts what the usage rows do (an audit: the prompt was left out)
    assert rt.metrics.prompt_tokens.labels("prefill")._value.get() == row.prompt_tokens
    assert rt.metrics.generation_tokens.labels("prefill")._value.get() == row.completion_tokens


async def test_a_landed_answer_is_not_held_while_its_store_waits(runtime, services, monkeypatch):
    """A store that waits (the settle before it waits out a Redis outage, up to an hour)
    does not keep the landed answer in memory past `LANDED_KEPT_S`."""
    monkeypatch.setattr(runtime.accounting, "LANDED_KEPT_S", 0.5)

    async def stuck(*args, **kwargs):  # noqa: ANN002, ANN003
        await trio.sleep(30)

    monkeypatch.setattr(services["response_cache"], "put", stuck)
    t = tenant(id="held")
    await collect(await runtime.submit(call(t, prompt="Name a glacier", max_tokens=4)))
    assert len(runtime.admission.flights) == 1
    await wait_until(lambda: len(runtime.admission.flights) == 0, timeout=5)


async def test_followers_of_a_request_shed_at_shutdown_end_too(nursery, ckpt, tokenizer, services):
    """A shutdown sheds the queue: a follower of a shed request ends with the same 503 at
    once, not to start in its place (the review)."""
    t = tenant(id="shed")
    rt, busy = await one_seat_taken(nursery, ckpt, tokenizer, services, t)
    ask = dict(prompt="Name a waterfall", max_tokens=10, ignore_eos=True)
    leader = await rt.submit(call(t, **ask))
    follower = await rt.submit(call(t, **ask))
    assert rt.shed_for_shutdown(grace_s=0.01) == 1
    for acc in (leader, follower):
        last = (await collect(acc))[2]
        assert isinstance(last, Failed) and (last.status, last.code) == (503, "shutting_down"), last
    assert len(rt.queue) == 0 and rt.admission.following == 0
    busy.cancel()
