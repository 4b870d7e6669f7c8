"""Fixtures: one real private redis-server per test session, flushed before each test.

Never the machine's shared Redis on 6379: ``PrivateRedis`` picks a free port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from cache.redis_server import PrivateRedis
from cache.store import RedisStore
from cache.tenants import TenantRegistry

SECRET = b"test-server-secret-0123456789"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    with PrivateRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: PrivateRedis) -> str:
    """URL of the session's private Redis, emptied for this test (restarted first if a
    previous test stopped it and did not bring it back)."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    async with RedisStore(redis_url) as s:
        yield s


@pytest.fixture
async def registry(store: RedisStore) -> TenantRegistry:
    return TenantRegistry(store, SECRET)
