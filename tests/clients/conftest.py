"""A real gateway (fake runtime, real Redis, Hypercorn) served from a background thread
running its own trio loop, so client tests can drive it from trio *or* asyncio
(`anyio.run(..., backend=...)`) in the main thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from cache.quotas import QuotaManager
from cache.store import RedisStore
from cache.tenants import TenantRegistry
from gateway.app import GatewayStores
from gateway.config import GatewayConfig
from tests.cache.conftest import SECRET, redis_server, redis_url  # noqa: F401 (fixtures)
from tests.gateway.conftest import ADMIN_KEY, MODEL, FakeRuntime, start_gateway

__all__ = ["ADMIN_KEY", "MODEL", "Served"]


@dataclass
class Served:
    base_url: str
    api_key: str
    runtime: FakeRuntime
    admin_key: str = ADMIN_KEY

    def cancelled_ids(self) -> set[str]:
        return set(self.runtime.cancelled)


def _serve_in_thread(url: str, ready: queue.Queue[Any], stop_box: dict[str, Any]) -> None:
    async def main() -> None:
        config = GatewayConfig(port=0, admin_key=ADMIN_KEY, max_streams_per_socket=8, shutdown_grace_seconds=0.2)
        async with RedisStore(url) as store, trio.open_nursery() as nursery:
            stores = GatewayStores(store, TenantRegistry(store, SECRET), QuotaManager(store))
            await stores.tenants.create_tenant("t1", "tenant one")
            _, key = await stores.tenants.create_key("t1", "test")
            base_url, runtime, stop = await start_gateway(nursery, stores, config)
            stop_box["stop"] = stop
            stop_box["token"] = trio.lowlevel.current_trio_token()
            ready.put(Served(base_url, key, runtime))
            await stop.wait()
            nursery.cancel_scope.deadline = trio.current_time() + 2

    try:
        trio.run(main)
    except BaseException as exc:  # report start-up failures to the test thread
        ready.put(exc)
        raise


@pytest.fixture
def served(redis_url: str) -> Iterator[Served]:  # noqa: F811 (fixture from tests.cache)
    ready: queue.Queue[Any] = queue.Queue()
    stop_box: dict[str, Any] = {}
    thread = threading.Thread(target=_serve_in_thread, args=(redis_url, ready, stop_box), daemon=True)
    thread.start()
    item = ready.get(timeout=20)
    if isinstance(item, BaseException):
        raise item
    yield item
    trio.from_thread.run_sync(stop_box["stop"].set, trio_token=stop_box["token"])
    thread.join(timeout=10)
