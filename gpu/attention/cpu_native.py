"""CPU-native paged decode: a C++ kernel that reads keys/values straight from the
paged cache (`gpu/kernels/cpu/paged_decode.cpp`).

Why: the torch backend's decode gathers every sequence's blocks into a padded
(B, max_ctx, nkv, hd) copy per layer before SDPA — on a CPU that is three passes
over the KV bytes (read blocks, write the copy, read it again) plus the padding
to the longest context. At large batches KV traffic dominates a small model's
decode step, so reading each row once is worth a compiled kernel (vLLM's CPU
backend does the same).

The extension is built on first use with `torch.utils.cpp_extension` (g++ and
ninja; cached under ~/.cache/torch_extensions keyed by the source hash) and is
optional: `cpu_native_available()` is False when it cannot be built, and
`gpu.attention.get_backend("cpu")` then returns the torch backend.
Prefill, cache writes and block copies are inherited from the torch backend.
"""

from __future__ import annotations

import functools
import logging

import torch

from gpu.attention.torch_backend import TorchAttentionBackend, _check_decode
from gpu.kernels.build import load_cpu_extension

log = logging.getLogger(__name__)


@functools.cache
def _module():
    return load_cpu_extension("paged_decode.cpp")


@functools.cache
def cpu_native_available() -> bool:
    """True when the C++ kernel builds and loads here (tried once per process)."""
    try:
        _module()
    except Exception as e:  # noqa: BLE001 — no compiler / headers: fall back, but say why
        log.warning("CPU paged-decode kernel unavailable (%s: %s); using the torch backend",
                    type(e).__name__, e)
        return False
    return True


class CpuNativeAttentionBackend(TorchAttentionBackend):
    """`TorchAttentionBackend` with decode served by the C++ kernel (float32 and bfloat16)."""

    name = "cpu-native"

    def decode(
        self,
        query: torch.Tensor,  # (B, nh, hd)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # (B, max_blocks) int32
        context_lens: torch.Tensor,  # (B,) int32
        max_context_len: int,
        scale: float,
    ) -> torch.Tensor:  # (B, nh, hd)
        if query.dtype not in (torch.float32, torch.bfloat16) or query.device.type != "cpu":
            return super().decode(query, k_cache, v_cache, block_tables, context_lens, max_context_len, scale)
        _check_decode(query, k_cache, v_cache, block_tables, max_context_len)
        if query.shape[0] == 0:
            return query.new_empty(query.shape)
        return _module().paged_decode(
            query.contiguous(), k_cache, v_cache,
            block_tables.to(torch.int32), context_lens.to(torch.int32), float(scale),
        )
