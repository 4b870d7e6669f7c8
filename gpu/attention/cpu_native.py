"""CPU-native paged attention: C++ kernels that read keys/values straight from the
paged cache (`gpu/kernels/cpu/paged_attention.cpp`), for decode and for prefill.

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

Prefill: the torch backend gathers each sequence's context and calls SDPA per
sequence — ~40-50 GFLOP/s in bf16 without AMX, and on the masked path (a prompt chunk
after cached positions) slower still. The kernels tile queries × keys straight
from the cache with float32 accumulation (see the .cpp): AVX-512 for head_dim 64
and 128, AVX2 + FMA for 32, 64 and 128; anything else takes the inherited torch path,
and so do long sequences in bfloat16 on a CPU with AMX, where SDPA's bf16 GEMMs outrun
the kernels once a sequence's work outweighs SDPA's per-call overhead (one step's
batch is split: short chunks to the kernel, long ones to SDPA).

Decode has three kernels (see the .cpp): AVX-512, AVX2 + FMA and a portable loop;
"auto" runs the widest this CPU has for the head size. Cache writes and block
copies are inherited from the torch backend.
"""

from __future__ import annotations

import functools
import itertools
import logging

import torch

from gpu.attention.torch_backend import TorchAttentionBackend, _check_decode, _check_prefill
from gpu.kernels.build import load_cpu_extension

log = logging.getLogger(__name__)


@functools.cache
def _module():
    return load_cpu_extension("paged_attention.cpp")


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


def decode_kernels() -> list[str]:
    """The decode kernels built for this CPU, widest first (e.g. ["avx2", "portable"])."""
    return list(_module().decode_kernels())


def decode_kernel_for(head_dim: int) -> str:
    """The kernel `decode_kernel="auto"` runs for this head size here."""
    return str(_module().decode_kernel_for(head_dim))


def prefill_kernels() -> list[str]:
    """The prefill kernels built for this CPU, widest first (e.g. ["avx2"]; [] without AVX2)."""
    return list(_module().prefill_kernels())


@functools.cache
def cpu_has_amx() -> bool:
    """True when torch's oneDNN runs bfloat16 GEMMs on AMX tiles here (Sapphire Rapids and
    later Xeons); False when torch cannot tell."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


# Attention FLOPs of one sequence's prefill chunk (4 · heads · head_dim per visible
# (query, key) pair) from which, in bfloat16 on an AMX CPU, "auto" sends that sequence
# down the torch path. The kernels compute in float32 FMAs (~80-105 GFLOP/s on 2
# cores); SDPA's bf16 GEMMs run on AMX tiles at 170-310, but pay ~100 us per sequence
# (a gathered copy, one SDPA call per sequence). Measured on an AMX Xeon (2026-12-01), 2
# threads, torch path ÷ kernel time: SmolLM2 shapes (9/3/64) 32 x 32 fresh tokens 5.2,
# 32 x 96 1.35, 8 x 128 1.08, 16 x 256 0.70, 4 x 512 0.52, a 324-token chunk after 700
# 0.49; Llama-7B shapes (32/32/128) 16 x 32 2.1, 8 x 64 1.05, 8 x 96 0.92, 4 x 256 0.71.
# The crossover sits at 19-50 MFLOP per sequence; 32 is where either choice costs least.
AMX_TORCH_PREFILL_MIN_FLOPS = 32e6


def auto_torch_prefill_min_flops(dtype: torch.dtype, amx: bool) -> float:
    """Per-sequence attention FLOPs from which "auto" prefills a sequence on the torch
    path instead of the kernel: `AMX_TORCH_PREFILL_MIN_FLOPS` for bfloat16 on an AMX CPU,
    never otherwise (the kernels took 0.58-0.92x the torch path's time in float32 on the
    same Xeon, and 0.48-0.80x in bf16 on CPUs without AMX: docs/benchmarking.md)."""
    return AMX_TORCH_PREFILL_MIN_FLOPS if dtype == torch.bfloat16 and amx else float("inf")


def prefill_flops(n_q: int, n_ctx: int, num_heads: int, head_dim: int) -> float:
    """Attention FLOPs of a causal chunk of `n_q` queries ending a context of `n_ctx`:
    QK^T and PV, 4 · heads · head_dim per visible (query, key) pair."""
    return 4.0 * num_heads * head_dim * n_q * (n_ctx - (n_q - 1) / 2)


def prefill_kernel_for(head_dim: int) -> str:
    """The kernel `prefill_kernel="auto"` runs for this head size here; "none" means the
    torch path (and see `auto_torch_prefill_min_flops` for bf16 on AMX)."""
    return str(_module().prefill_kernel_for(head_dim))


class CpuNativeAttentionBackend(TorchAttentionBackend):
    """`TorchAttentionBackend` with decode and prefill served by the C++ kernels
    (float32 and bfloat16; prefill where an AVX-512 or AVX2 kernel handles the head size).

    `decode_kernel`: "auto" (the widest kernel that handles the head size: avx512, avx2,
    then the portable loop) or one of `decode_kernels()` by name; `prefill_kernel`:
    "auto" (avx512, avx2, else the torch path; in bfloat16 on an AMX CPU, the torch
    path for sequences with enough work, see `auto_torch_prefill_min_flops`), "torch"
    (always the inherited torch path) or one of `prefill_kernels()` by name — names are for tests and benchmarks; a
    kernel not built here or not handling the head size raises.

    `batch_invariant`: every query row, decode or prefill, goes through the prefill kernel
    (where one handles the head size), whose rows do not depend on the chunk around them
    or on the other sequences of the step. The split by work ("auto" on AMX) would send a
    chunk to SDPA or the kernel by its size, and the decode kernel rounds differently from
    the prefill kernel at some context lengths (bf16, AMX Xeon: 18 of the first 200), so a
    token fed as a 1-token prompt chunk, or recomputed after a preemption, would not get
    the bits it got as a decode. Decodes this way cost ~1.5x the decode kernel's time
    (30 sequences of 450 positions, bf16: 738 against 491 us a layer)."""

    name = "cpu-native"

    def __init__(self, decode_kernel: str = "auto", prefill_kernel: str = "auto", *,
                 batch_invariant: bool = False) -> None:
        super().__init__()
        self.decode_kernel = decode_kernel
        self.prefill_kernel = prefill_kernel
        self.batch_invariant = batch_invariant

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
        if self.batch_invariant and self._prefill_kernel_runs(query.shape[-1]):
            one_each = torch.arange(query.shape[0] + 1, dtype=torch.int32)
            return self._kernel_prefill(query, k_cache, v_cache, one_each, context_lens, block_tables,
                                        1, max_context_len, scale)
        return _module().paged_decode(
            query.contiguous(), k_cache, v_cache,
            block_tables.to(torch.int32), context_lens.to(torch.int32), float(scale), self.decode_kernel,
        )

    def prefill(
        self,
        query: torch.Tensor,  # (T, nh, hd)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        query_start_loc: torch.Tensor,  # (S + 1,) int32
        context_lens: torch.Tensor,  # (S,) int32
        block_tables: torch.Tensor,  # (S, max_blocks) int32
        max_query_len: int,
        max_context_len: int,
        scale: float,
    ) -> torch.Tensor:  # (T, nh, hd)
        args = (query, k_cache, v_cache, query_start_loc, context_lens, block_tables,
                max_query_len, max_context_len, scale)
        if (
            query.dtype not in (torch.float32, torch.bfloat16)
            or query.device.type != "cpu"
            or not self._prefill_kernel_runs(query.shape[-1])
        ):
            return super().prefill(*args)
        starts, lens = _check_prefill(query, k_cache, v_cache, query_start_loc, context_lens, block_tables)
        if query.shape[0] == 0:
            return query.new_empty(query.shape)
        min_flops = float("inf") if self.batch_invariant else auto_torch_prefill_min_flops(query.dtype, cpu_has_amx())
        if self.prefill_kernel != "auto" or min_flops == float("inf"):  # no per-sequence costing
            return self._kernel_prefill(*args)
        nh, hd = query.shape[1], query.shape[2]
        big = [prefill_flops(starts[s + 1] - starts[s], n, nh, hd) >= min_flops for s, n in enumerate(lens)]
        if not any(big):
            return self._kernel_prefill(*args)
        if all(big):
            return super().prefill(*args)
        out = torch.empty_like(query)
        for on_torch, run in ((False, self._kernel_prefill), (True, super().prefill)):
            seqs = [s for s, b in enumerate(big) if b == on_torch]
            n_q = [starts[s + 1] - starts[s] for s in seqs]
            rows = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in seqs])
            if rows.numel() == 0:  # only sequences without queries in this group
                continue
            idx = torch.tensor(seqs)
            sub_ctx = context_lens.index_select(0, idx)
            out.index_copy_(0, rows, run(
                query.index_select(0, rows), k_cache, v_cache,
                torch.tensor([0, *itertools.accumulate(n_q)], dtype=torch.int32), sub_ctx,
                block_tables.index_select(0, idx), max(n_q), int(sub_ctx.max()), scale,
            ))
        return out

    def is_batch_invariant(self, head_dim: int) -> bool:
        """True when every query row of this head size takes the one invariant path."""
        return self.batch_invariant and self._prefill_kernel_runs(head_dim)

    def _prefill_kernel_runs(self, head_dim: int) -> bool:
        """Whether prefill may run the C++ kernel here (else the inherited torch path)."""
        return self.prefill_kernel != "torch" and (self.prefill_kernel != "auto" or _module().prefill_supported(head_dim))

    def _kernel_prefill(self, query, k_cache, v_cache, query_start_loc, context_lens, block_tables,
                        max_query_len, max_context_len, scale) -> torch.Tensor:
        return _module().paged_prefill(
            query.contiguous(), k_cache, v_cache, query_start_loc.to(torch.int32),
            context_lens.to(torch.int32), block_tables.to(torch.int32), float(scale), self.prefill_kernel,
        )
