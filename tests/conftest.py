"""Shared fixtures: the bundled SmolLM2 GGUF, a transformers reference model, and a
real private redis-server (never the machine's shared Redis on 6379: `PrivateRedis`
picks a free port).

Both are session-scoped: the reference takes ~15 s to load, so every test
module that compares against it shares one instance (treat it as read-only).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from cache.redis_server import PrivateRedis
from cache.store import RedisStore

torch.set_num_threads(2)  # the test machines have 2 cores, shared


@pytest.fixture
def free_engines() -> Iterator[None]:
    """Collect reference cycles after a test that built engines or served.

    A runtime's actors, their cancelled tasks and the engine they drive form cycles that
    only the cycle collector frees, and it runs by object counts, not bytes: a test file
    of runtimes held ~2 GB per test (8.7 GB peak for tests/actors/test_runtime.py, 3.4 GB
    with this). Modules that build engines use it with `pytest.mark.usefixtures`."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct Q4_1 GGUF (no download)."""
    from gpu.loader import bundled_gguf_path

    return bundled_gguf_path()


@pytest.fixture(scope="session")
def hf_reference(smollm2_path: Path):
    """transformers `LlamaForCausalLM` loaded from the same GGUF, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, torch_dtype=torch.float32
    )
    return model.eval()


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
