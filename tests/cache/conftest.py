"""Fixtures of the cache tests (the Redis server fixtures live in tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cache.tenants import TenantRegistry
from tests.conftest import SECRET


@pytest.fixture
async def registry(store: Any) -> TenantRegistry:
    return TenantRegistry(store, SECRET)
