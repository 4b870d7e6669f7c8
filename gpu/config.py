"""Frozen configuration for the model, the KV cache and the engine.

Values that are only known at run time (the number of KV blocks, found by
dividing the cache budget by the bytes one block takes) are computed into new
objects, never patched into these ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (what the checkpoint says)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 → hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing.

    `cache_bytes` is the budget for keys and values of all layers; the number of
    blocks is derived by `num_blocks_for(model, dtype_bytes)`.

    The default, 1.5 GiB (4368 bf16 / 2184 fp32 blocks of the bundled model), is sized
    for throughput on a CPU host: with 512 MiB the cache, not compute, bounded the
    engine (200 fixture requests at once on a 2-core Zen 4 in bf16: 3.13 req/s with 153
    preemptions at 64 sequences on 728 blocks, 4.13 req/s and none at 128 on 1.5 GiB;
    docs/scheduling.md, "The serving defaults").
    """

    block_size: int = 16
    cache_bytes: int = 1536 * 1024**2
    enable_prefix_caching: bool = True
    huge_pages: bool = True  # CPU: back the cache with 2 MiB pages (gpu.model.advise_huge_pages)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.cache_bytes <= 0:
            raise ValueError(f"cache_bytes must be positive, got {self.cache_bytes}")

    def bytes_per_block(self, model: ModelConfig, dtype_bytes: int) -> int:
        # keys + values, every layer, every KV head
        return 2 * model.num_layers * self.block_size * model.kv_size * dtype_bytes

    def num_blocks_for(self, model: ModelConfig, dtype_bytes: int) -> int:
        n = self.cache_bytes // self.bytes_per_block(model, dtype_bytes)
        if n < 1:
            raise ValueError(
                f"cache_bytes={self.cache_bytes} holds no block of "
                f"{self.bytes_per_block(model, dtype_bytes)} bytes"
            )
        return n


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step (see `actors.step_scheduler`)."""

    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 128  # running-requests cap (see CacheConfig for the measurement behind it)
    max_model_len: int = 8192  # prompt + output tokens of one request
    long_prefill_token_threshold: int = 0  # 0 → a prompt may take the whole budget

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0 (0: the whole step budget)")


# a name a client may send as `model` for a LoRA adapter (also a folder name under --lora-dir)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def valid_adapter_name(name: str) -> bool:
    return bool(ADAPTER_NAME.fullmatch(name)) and ".." not in name


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters the engine may serve (`gpu.lora`); none by default.

    `modules`: (name, PEFT folder) pairs, checked at start and loaded on first use.
    `directory`: a folder whose sub-folders are adapters named by folder name, found when
    a request names one (added while the server runs, too). `max_loras`: adapters kept
    loaded between requests (LRU), and the distinct adapters the engine's requests may use
    at once (`actors.stepper.Stepper.parked`); a running request keeps its own loaded. `max_rank`:
    the largest rank an adapter may have (bounds one adapter's memory and compute)."""

    modules: tuple[tuple[str, str], ...] = ()
    directory: str = ""
    max_loras: int = 8
    max_rank: int = 64

    def __post_init__(self) -> None:
        names = [n for n, _ in self.modules]
        for n in names:
            if not valid_adapter_name(n):
                raise ValueError(f"LoRA adapter name {n!r}: use letters, digits, '.', '_' and '-' "
                                 "(at most 128, starting with a letter or digit)")
        if len(set(names)) != len(names):
            raise ValueError(f"LoRA adapter names must be unique, got {names}")
        if self.max_loras < 1 or self.max_rank < 1:
            raise ValueError(f"max_loras and max_rank must be at least 1, got {self.max_loras}, {self.max_rank}")

    @property
    def enabled(self) -> bool:
        return bool(self.modules or self.directory)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; built by the CLI / gateway from flags and files."""

    model: str = "smollm2"  # "smollm2" (bundled GGUF), a .gguf path, a HF folder or an lmg folder
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16"
    device: str = "cpu"
    num_threads: int = 0  # 0 → torch default
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    # a request's tokens do not depend on what else its steps hold: GEMMs in row tiles
    # whose results a row gets alone (`gpu.model.PackedWeight`; int8 GEMMs are so as they
    # are, checked per weight shape at load), every attention row through
    # the prefill kernel (`gpu.attention.cpu_native`). Costs throughput (AMX Xeon, bf16: 0.90x the tokens/s at 32 running
    # sequences, 0.73x at 64: `python -m ops.bench_invariance`). docs/benchmarking.md
    batch_invariant: bool = False
    # "int8": projections and the LM head as dynamic int8 GEMMs (`gpu.quantization`): CPU
    # only, moves the model off the reference (measured by
    # `python -m ops.bench_dtype --quantization int8`)
    quantization: str = "none"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # keep a loading-optimized copy of a GGUF / safetensors model here and load it from
    # there on later starts (`gpu.convert.load_cached`; "" = off)
    model_cache_dir: str = ""

    def __post_init__(self) -> None:
        if self.lora.enabled and self.batch_invariant:
            raise ValueError("LoRA adapters are not batch-invariant (their GEMMs run per adapter group): "
                             "choose one of the two")
        if self.quantization not in ("none", "int8"):
            raise ValueError(f"quantization must be none or int8, got {self.quantization!r}")
        if self.quantization != "none" and not self.device.startswith("cpu"):
            raise ValueError(f"{self.quantization} quantization runs on the CPU only, not on {self.device!r}")
