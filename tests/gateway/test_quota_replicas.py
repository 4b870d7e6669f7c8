"""Two gateway replicas (each with its own engine, runtime and Redis client) share one
Redis: a burst of concurrent requests split across both admits exactly what the
tenant's quota allows, every refusal is a 429 with Retry-After, and each admitted
request's `x-ratelimit-remaining-requests` is its own (the counts are taken atomically)."""

from __future__ import annotations

import httpx
import pytest
import torch
import trio

from actors.runtime import Runtime, RuntimeConfig
from cache.quotas import Quota, QuotaManager
from cache.store import RedisStore
from cache.tenants import TenantRegistry
from gateway.app import GatewayStores, create_app
from gateway.config import GatewayConfig
from gateway.server import serve_app
from gpu.config import CacheConfig, EngineConfig, SchedulerConfig
from gpu.engine import Engine
from gpu.loader import load_checkpoint
from gpu.tokenizer import load_tokenizer
from tests.conftest import SECRET

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]

LIMIT = 7
BURST = 30


async def start_replica(nursery: trio.Nursery, store: RedisStore, ckpt, tokenizer) -> str:
    stores = GatewayStores(redis=store, tenants=TenantRegistry(store, SECRET), quotas=QuotaManager(store))
    engine = Engine(EngineConfig(dtype="float32", cache=CacheConfig(cache_bytes=16 * 1024**2),
                                 scheduler=SchedulerConfig(max_model_len=1024)),
                    checkpoint=ckpt, tokenizer=tokenizer)
    runtime = Runtime(RuntimeConfig(), engine, quotas=stores.quotas, store=store)
    await nursery.start(runtime.run)
    config = GatewayConfig(port=0, shutdown_grace_seconds=0.5)
    app = create_app(runtime, stores, config)
    urls = await nursery.start(lambda task_status: serve_app(app, config, shutdown_trigger=trio.sleep_forever,
                                                             task_status=task_status))
    return urls[0]


async def test_two_replicas_admit_exactly_the_quota(redis_url: str, store) -> None:
    ckpt = load_checkpoint("smollm2", torch.float32)
    tokenizer = load_tokenizer(ckpt)
    tenants = TenantRegistry(store, SECRET)
    await tenants.create_tenant("burst", "burst tenant", quota=Quota(requests_per_minute=LIMIT))
    _, key = await tenants.create_key("burst", "k")
    async with RedisStore(redis_url) as one_store, RedisStore(redis_url) as other_store, \
            trio.open_nursery() as replicas:
        urls = [await start_replica(replicas, s, ckpt, tokenizer) for s in (one_store, other_store)]
        await burst(urls, key)
        replicas.cancel_scope.cancel()


async def burst(urls: list[str], key: str) -> None:
    statuses: list[int] = []
    retry_after: list[str | None] = []
    remaining: list[int] = []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        r = await client.post(f"{urls[i % 2]}/v1/completions", json={
            "model": "SmolLM2-135M-Instruct", "prompt": f"Number {i}:", "max_tokens": 1, "temperature": 0,
        }, headers={"Authorization": f"Bearer {key}"})
        statuses.append(r.status_code)
        if r.status_code == 200:
            assert r.headers["x-ratelimit-limit-requests"] == str(LIMIT)
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
            remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
            assert "x-ratelimit-limit-tokens" not in r.headers  # no tokens_per_minute set
        if r.status_code == 429:
            retry_after.append(r.headers.get("retry-after"))
            assert r.json()["error"]["type"]

    async with httpx.AsyncClient(timeout=120) as client, trio.open_nursery() as n:
        for i in range(BURST):
            n.start_soon(one, i, client)
    assert statuses.count(200) == LIMIT, statuses
    assert statuses.count(429) == BURST - LIMIT, statuses
    assert all(ra is not None and float(ra) > 0 for ra in retry_after)
    assert sorted(remaining) == list(range(LIMIT))
