"""`AttentionBackend` that runs the real kernel source on the CPU through the emulator.

Same validation (`gpu.attention.cuda_backend.plan_*`), same template instance,
grid and block shape as the CUDA launchers; only the launch goes through
`liblmgate_cpu_emu.so` (built by `gpu.kernels.build.build_cpu_emulator`) instead
of CuPy. It is slow (every barrier and shuffle is a fiber switch): for tests.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from gpu.attention import cuda_backend as cb
from gpu.kernels import build

DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}  # harness.cpp with_dtype
_P = ctypes.c_void_p
_I = ctypes.c_int
_L = ctypes.c_longlong
_F = ctypes.c_float
_SIGNATURES = {
    "emu_selftest": [_I, _I, _I, _P],
    "emu_write_kv": [_I, _P, _P, _P, _P, _P, _I, _I, _L, _L],
    "emu_copy_blocks": [_P, _I, _P, _P, _I, _L],
    "emu_paged_decode": [_I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _I, _F, _L, _L, _I, _I],
    "emu_paged_prefill": [_I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _F, _L, _L],
}


@functools.cache
def load_library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build.build_cpu_emulator()))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    return lib


def _ptr(t: torch.Tensor) -> int:
    if t.device.type != "cpu":
        raise ValueError(f"the emulator runs on CPU tensors, got {t.device}")
    return t.data_ptr()


def _check_status(status: int, what: str) -> None:
    if status == 1:
        raise ValueError(f"{what}: template instance not built into the emulator")
    if status == 2:
        raise RuntimeError(f"{what}: emulator deadlock (a barrier not reached by every thread)")
    if status != 0:
        raise RuntimeError(f"{what}: emulator returned {status}")


SELFTESTS = {"shared_rotation": (0, 1), "shuffles": (1, 3), "divergent_barrier": (2, 1)}


def run_selftest(name: str, blocks: int, threads: int) -> tuple[int, list[int]]:
    """Run one of harness.cpp's emulator self-test kernels: (status, output ints)."""
    which, per_thread = SELFTESTS[name]
    out = (ctypes.c_int * (blocks * threads * per_thread))()
    status = load_library().emu_selftest(which, blocks, threads, out)
    return status, list(out)


class EmulatedCudaBackend:
    """The CUDA kernels, executed by the CPU emulator (tests only)."""

    name = "cuda-emu"

    def __init__(self, *, sm_count: int = 108) -> None:
        """`sm_count` feeds the same partitioned-decode decision as on a device
        (108 = A100); pass 0 to never split the context, 10**6 to split whenever the
        context spans more than one partition."""
        self._lib = load_library()
        self._sm_count = sm_count

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        row = cb.plan_write_kv(key, value, k_cache, v_cache, slot_mapping)
        status = self._lib.emu_write_kv(
            DTYPE_CODES[cb.DTYPE_NAMES[k_cache.dtype]],
            _ptr(key), _ptr(value), _ptr(k_cache), _ptr(v_cache), _ptr(slot_mapping),
            key.shape[0], row, key.stride(0), value.stride(0),
        )  # fmt: skip
        _check_status(status, "write_kv")

    def decode(self, query, k_cache, v_cache, block_tables, context_lens, max_context_len, scale):
        plan = cb.plan_attention(query, k_cache, v_cache, block_tables, max_context_len)
        cb.check_index("context_lens", context_lens, torch.int32, 1)
        out = torch.empty(query.shape, dtype=query.dtype)
        if query.shape[0] == 0:
            return out
        inst = plan.instance
        parts = cb.num_partitions(max_context_len)
        partitioned = cb.use_partitioned_decode(
            query.shape[0], plan.num_kv_heads, parts, self._sm_count
        )
        status = self._lib.emu_paged_decode(
            DTYPE_CODES[inst.dtype], inst.head_dim, inst.block_size, inst.group,
            _ptr(out), _ptr(query), _ptr(k_cache), _ptr(v_cache), _ptr(block_tables),
            _ptr(context_lens), query.shape[0], plan.max_blocks, plan.num_kv_heads,
            scale, query.stride(0), out.stride(0), int(partitioned), parts,
        )  # fmt: skip
        _check_status(status, "paged_decode")
        return out

    def prefill(
        self,
        query,
        k_cache,
        v_cache,
        query_start_loc,
        context_lens,
        block_tables,
        max_query_len,
        max_context_len,
        scale,
    ):
        plan = cb.plan_attention(query, k_cache, v_cache, block_tables, max_context_len)
        cb.check_index("query_start_loc", query_start_loc, torch.int32, 1)
        cb.check_index("context_lens", context_lens, torch.int32, 1)
        out = torch.empty(query.shape, dtype=query.dtype)
        if query.shape[0] == 0:
            return out
        inst = plan.instance
        status = self._lib.emu_paged_prefill(
            DTYPE_CODES[inst.dtype], inst.head_dim, inst.block_size, inst.group,
            _ptr(out), _ptr(query), _ptr(k_cache), _ptr(v_cache), _ptr(query_start_loc),
            _ptr(context_lens), _ptr(block_tables), context_lens.shape[0], query.shape[0],
            plan.max_blocks, plan.num_kv_heads, scale, query.stride(0), out.stride(0),
        )  # fmt: skip
        _check_status(status, "paged_prefill")
        return out

    def copy_blocks(self, caches, src, dst) -> None:
        words, overlap = cb.plan_copy_blocks(caches, src, dst)
        if src.numel() == 0:
            return
        if overlap:  # (as the CUDA launcher: the kernel copies every pair at once)
            cb.copy_gathered(caches, src, dst)
            return
        ptrs = torch.tensor([_ptr(c) for c in caches], dtype=torch.int64)
        status = self._lib.emu_copy_blocks(
            _ptr(ptrs), len(caches), _ptr(src), _ptr(dst), src.shape[0], words
        )
        _check_status(status, "copy_blocks")

    def swap_blocks(self, src_cache, dst_cache, src, dst) -> None:
        """Host-only here (the device version is memcpy per block, no kernel)."""
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            dst_cache[d].copy_(src_cache[s])
