"""Shared fixtures: the bundled SmolLM2 GGUF, a transformers reference model, and a
real private redis-server (never the machine's shared Redis on 6379: `PrivateRedis`
picks a free port).

Both are session-scoped: the reference takes ~15 s to load, so every test
module that compares against it shares one instance (treat it as read-only).
"""

from __future__ import annotations

import gc
import io
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
import trio

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


@pytest.fixture(scope="module")
def ckpt():
    """The bundled model dequantized in float32 (per module: freed when the module is done)."""
    from gpu.loader import load_checkpoint

    return load_checkpoint("smollm2", torch.float32)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    """The tokenizer of `ckpt`."""
    from gpu.tokenizer import load_tokenizer

    return load_tokenizer(ckpt)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct Q4_1 GGUF (no download)."""
    from gpu.loader import bundled_gguf_path

    return bundled_gguf_path()


@pytest.fixture(scope="session")
def hf_reference(smollm2_path: Path):
    """transformers `LlamaForCausalLM` of the same GGUF, fp32, eval mode (read once from
    the GGUF by transformers, then from `ops.hf_reference`'s cached copy)."""
    from ops.hf_reference import load_model

    return load_model(torch.float32)


class LoraReference:
    """Two PEFT LoRA adapters saved as folders, and transformers + peft generating with them.

    "one": every projection, rank 8, alpha 16. "two": q, v and down only, rank 4 (down: 2, by
    `rank_pattern`), alpha 8, rsLoRA. Both initialised at random (`init_lora_weights=False`),
    so each moves the model's greedy answers away from the base model's."""

    def __init__(self, model, paths: dict[str, Path]) -> None:
        self.model = model
        self.paths = paths

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], adapter: str | None, max_new_tokens: int) -> list[int]:
        """transformers' greedy continuation (stops at EOS) with `adapter` (None: the base model)."""
        ids = torch.tensor([prompt_ids])
        if adapter is None:
            with self.model.disable_adapter():
                out = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            self.model.set_adapter(adapter)
            out = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def lora_reference(hf_reference, tmp_path_factory: pytest.TempPathFactory) -> LoraReference:
    import copy

    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(hf_reference), LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        adapter_name="one")
    model.add_adapter("two", LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2}))
    for name in ("one", "two"):  # root/one, root/two: PEFT writes an adapter not named "default" in a folder of its name
        model.save_pretrained(root, selected_adapters=[name])
    return LoraReference(model.eval(), {name: root / name for name in ("one", "two")})


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


async def serve_real(nursery: trio.Nursery, config) -> tuple[list[str], str, trio.Event]:  # type: ignore[no-untyped-def]
    """The whole server (`gateway.server.serve` with `config`, a `GatewayConfig`: real model
    and runtime) started in `nursery`: its URLs, the API key it printed on first start, and
    the event that shuts it down."""
    from gateway.server import serve

    out, stop = io.StringIO(), trio.Event()
    urls = await nursery.start(lambda task_status: serve(config, shutdown_trigger=stop.wait, out=out,
                                                         task_status=task_status))
    key = re.search(r"shown once\): (\S+)", out.getvalue()).group(1)  # type: ignore[union-attr]
    return urls, key, stop
