"""Client tests run against the threaded gateway of tests/gateway/conftest.py, so each
scenario can be driven from trio *or* asyncio (`anyio.run(..., backend=...)`)."""

from __future__ import annotations

from tests.gateway.conftest import ADMIN_KEY, MODEL, Served, served  # noqa: F401 (fixture)

__all__ = ["ADMIN_KEY", "MODEL", "Served"]
