"""Latency of the per-request Redis path, against a private redis-server.

    python -m cache.bench [--n 2000] [--concurrency 50]

Per request the gateway does authenticate (1 round trip), reserve (1), then
settle (1) at the end; a response-cache lookup adds 1. Prints microseconds per
operation, sequential and with ``--concurrency`` tasks sharing one RedisStore.
"""

from __future__ import annotations

import argparse
import tempfile

import trio

from cache.quotas import Quota, QuotaManager
from cache.redis_server import PrivateRedis
from cache.response_cache import ResponseCache
from cache.store import RedisStore
from cache.tenants import TenantRegistry


async def _run(url: str, n: int, concurrency: int) -> None:
    async with RedisStore(url) as store:
        registry = TenantRegistry(store, b"bench-secret-0123456789")
        quotas = QuotaManager(store)
        responses = ResponseCache(store)
        tenant = await registry.create_tenant(
            "bench", "bench", quota=Quota(requests_per_minute=10**9, tokens_per_minute=10**12,
                                          max_concurrent=10**6, daily_token_budget=10**15),
        )
        _, key = await registry.create_key("bench", "k")

        async def request(i: int, tag: str) -> None:
            await registry.authenticate(key)
            await responses.get(tenant, "m", [1, 2, 3, i], {"temperature": 0.0})
            await quotas.reserve(tenant, f"{tag}-{i}", 100, 100)
            await quotas.settle(tenant, f"{tag}-{i}", 100, 50, "m")

        start = trio.current_time()
        for i in range(n):
            await request(i, "seq")
        seq = (trio.current_time() - start) / n
        print(f"sequential: {seq * 1e6:.0f} us per request "
              f"({seq / 4 * 1e6:.0f} us per op: authenticate, cache get, reserve, settle)")

        start = trio.current_time()
        limiter = trio.CapacityLimiter(concurrency)

        async def limited(i: int) -> None:
            async with limiter:
                await request(i, "conc")

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(limited, i)
        conc = (trio.current_time() - start) / n
        print(f"{concurrency} concurrent: {conc * 1e6:.0f} us per request (throughput "
              f"{1 / conc:.0f} requests/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir, PrivateRedis(data_dir) as server:
        trio.run(_run, server.url, args.n, args.concurrency)


if __name__ == "__main__":
    main()
