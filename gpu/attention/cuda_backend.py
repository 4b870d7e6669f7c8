"""Paged attention on CUDA: CuPy raw kernels from `gpu/kernels/*.cu`.

The kernels are compiled at first use by NVRTC through `cupy.RawModule`, one
cached module per template parameter set (`functools.cache`), and launched on
torch's current stream (and device) with torch tensors passed as raw device
pointers: no copies, no dtype translation (bf16 has no `__cuda_array_interface__`
type) and no per-argument stream synchronisation that CuPy performs when it
imports a foreign array.

Launchers are thin: `plan_*` functions (pure, also used by the CPU emulator in
`gpu/kernels/cpu_emu/backend.py`) check shapes, dtypes, devices and strides and
pick the template instance; the launch itself is one kernel call. Importing this
module never needs CuPy; `cuda_backend_available()` says whether it can run.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from gpu.attention import AttentionShape
from gpu.kernels import build

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
ATTN_THREADS = 128  # kAttnThreads in paged_attention.cu
CACHE_OP_THREADS = 128


def cuda_backend_available() -> bool:
    """CuPy importable AND at least one CUDA device visible."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False


# ---------------------------------------------------------------- validation


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _require(
        k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
        f"k_cache/v_cache must both be (num_blocks, block_size, nkv, hd), got "
        f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}",
    )
    _require(k_cache.dtype == v_cache.dtype, "k_cache and v_cache dtypes differ")
    _require(k_cache.dtype in DTYPE_NAMES, f"unsupported cache dtype {k_cache.dtype}")
    _require(k_cache.is_contiguous() and v_cache.is_contiguous(), "KV caches must be contiguous")


def check_rows(name: str, t: torch.Tensor, heads: int, head_dim: int, dtype: torch.dtype) -> None:
    """(N, heads, head_dim) with contiguous rows; the row stride may be larger (a view
    into a fused qkv projection)."""
    _require(
        t.dim() == 3 and t.shape[1:] == (heads, head_dim),
        f"{name} must be (N, {heads}, {head_dim}), got {tuple(t.shape)}",
    )
    _require(t.dtype == dtype, f"{name} dtype {t.dtype} != cache dtype {dtype}")
    _require(
        t.stride(2) == 1 and t.stride(1) == head_dim,
        f"{name} rows must be contiguous (strides {t.stride()})",
    )


def check_index(name: str, t: torch.Tensor, dtype: torch.dtype, dim: int) -> None:
    _require(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
    _require(t.dim() == dim and t.is_contiguous(), f"{name} must be a contiguous {dim}-d tensor")


def same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    _require(len(devices) == 1, f"tensors on different devices: {sorted(map(str, devices))}")


@dataclass(frozen=True)
class AttentionPlan:
    """Everything a decode/prefill launch needs besides the tensors."""

    instance: build.AttentionInstance
    num_heads: int
    num_kv_heads: int
    max_blocks: int


def plan_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    max_context_len: int,
) -> AttentionPlan:
    """Validates one decode/prefill launch and picks its template instance.

    `max_context_len` must cover every context: the kernels index the block
    tables up to it and never bounds-check on the device."""
    check_cache(k_cache, v_cache)
    _, block_size, nkv, head_dim = k_cache.shape
    _require(query.dim() == 3, f"query must be (N, num_heads, head_dim), got {tuple(query.shape)}")
    num_heads = query.shape[1]
    _require(
        num_heads % nkv == 0,
        f"num_heads {num_heads} is not a multiple of num_kv_heads {nkv}",
    )
    check_rows("query", query, num_heads, head_dim, k_cache.dtype)
    check_index("block_tables", block_tables, torch.int32, 2)
    inst = build.AttentionInstance(
        DTYPE_NAMES[k_cache.dtype], head_dim, block_size, num_heads // nkv
    )
    why = unbuilt(AttentionShape(inst.head_dim, inst.group, inst.block_size))
    _require(why is None, why or "")
    _require(
        max_context_len <= block_tables.shape[1] * block_size,
        f"max_context_len {max_context_len} exceeds the block tables' "
        f"{block_tables.shape[1]} blocks of {block_size}",
    )
    return AttentionPlan(inst, num_heads, nkv, block_tables.shape[1])


def unbuilt(shape: AttentionShape) -> str | None:
    """Why no kernel was built for `shape` (`gpu.kernels.build`), or None: decided when the
    runner is made, so such a model is served by the torch backend, not refused per request."""
    if shape.head_dim not in build.HEAD_DIMS:
        return f"head_dim {shape.head_dim} not in {build.HEAD_DIMS}"
    if shape.block_size not in build.BLOCK_SIZES:
        return f"block_size {shape.block_size} not in {build.BLOCK_SIZES}"
    if shape.group not in build.GROUPS:
        return f"GQA group {shape.group} not in {build.GROUPS}"
    return None


def num_partitions(max_context_len: int) -> int:
    """Context partitions of the split-context decode (kPartitionSize positions each)."""
    return max(1, -(-max_context_len // build.PARTITION_SIZE))


def use_partitioned_decode(
    num_seqs: int, num_kv_heads: int, partitions: int, sm_count: int
) -> bool:
    """Split the context when one block per (sequence, kv head) would leave SMs idle:
    fewer than two such blocks per SM, and more than one partition to split into."""
    return partitions > 1 and num_seqs * num_kv_heads < 2 * sm_count


def plan_write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> int:
    """Validates; returns the row length (nkv * hd) in elements."""
    check_cache(k_cache, v_cache)
    _, _, nkv, hd = k_cache.shape
    check_rows("key", key, nkv, hd, k_cache.dtype)
    check_rows("value", value, nkv, hd, k_cache.dtype)
    check_index("slot_mapping", slot_mapping, torch.int64, 1)
    _require(
        key.shape[0] == value.shape[0] == slot_mapping.shape[0],
        f"key/value/slot_mapping lengths differ: {key.shape[0]}, {value.shape[0]}, "
        f"{slot_mapping.shape[0]}",
    )
    return nkv * hd


def plan_copy_blocks(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> tuple[int, bool]:
    """Validates; returns 32-bit words per block (the same for every cache), and whether a
    block is both a source and a destination (the kernel, copying every pair at once, may
    then read a block another pair is writing)."""
    _require(len(caches) > 0, "no caches given")
    first = caches[0]
    for c in caches:
        _require(
            c.shape[1:] == first.shape[1:] and c.dtype == first.dtype and c.is_contiguous(),
            "caches must be contiguous with one block shape and dtype",
        )
    check_index("src", src, torch.int64, 1)
    check_index("dst", dst, torch.int64, 1)
    _require(src.shape == dst.shape, f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ")
    sources, destinations = src.tolist(), dst.tolist()  # (read to the host once, for both checks)
    _require(all(0 <= b < first.shape[0] for b in sources + destinations),
             f"a block id is out of range of {first.shape[0]} blocks")
    overlap = not set(sources).isdisjoint(destinations)
    block_bytes = first[0].numel() * first.element_size()
    _require(block_bytes % 4 == 0, f"block of {block_bytes} bytes is not a multiple of 4")
    return block_bytes // 4, overlap


def copy_gathered(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """`copy_blocks` through a gathered copy of the sources (torch ops, on any device): for
    a plan in which a block is both read and written (`plan_copy_blocks`)."""
    for cache in caches:
        cache.index_copy_(0, dst, cache.index_select(0, src))


# ---------------------------------------------------------------- device side


def _cupy():
    import cupy

    return cupy


def _compile(names: tuple[str, ...]):
    cp = _cupy()
    return cp.RawModule(
        code=build.module_source(),
        options=build.nvrtc_options(),
        name_expressions=list(names),
    )


@functools.cache
def _attention_module(instance: build.AttentionInstance):
    return _compile(instance.kernels)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _cache_ops_module(dtype: str):
    return _compile((build.COPY_BLOCKS_NAME, build.write_kv_name(dtype)))


def _arr(t: torch.Tensor):
    """The tensor's device address as a kernel argument (a pointer is 8 bytes)."""
    import numpy as np

    return np.uint64(t.data_ptr())


def on_cuda(*tensors: torch.Tensor) -> torch.device:
    """All tensors on one CUDA device; returns it."""
    same_device(*tensors)
    device = tensors[0].device
    _require(device.type == "cuda", f"CudaAttentionBackend needs CUDA tensors, got {device}")
    return device


@contextlib.contextmanager
def _launch_context(device: torch.device):
    """CuPy launches on torch's current stream of `device`."""
    cp = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with (
        cp.cuda.Device(index),
        cp.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream),
    ):
        yield


class CudaAttentionBackend:
    """`AttentionBackend` over CuPy raw kernels (CUDA tensors only)."""

    name = "cuda"

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        row = plan_write_kv(key, value, k_cache, v_cache, slot_mapping)
        device = on_cuda(key, value, k_cache, v_cache, slot_mapping)
        if key.shape[0] == 0:
            return
        import numpy as np

        kernel = _cache_ops_module(DTYPE_NAMES[k_cache.dtype]).get_function(
            build.write_kv_name(DTYPE_NAMES[k_cache.dtype])
        )
        with _launch_context(device):
            kernel(
                (key.shape[0],),
                (CACHE_OP_THREADS,),
                (
                    _arr(key), _arr(value), _arr(k_cache), _arr(v_cache), _arr(slot_mapping),
                    np.int32(row), np.int64(key.stride(0)), np.int64(value.stride(0)),
                ),
            )  # fmt: skip

    def decode(self, query, k_cache, v_cache, block_tables, context_lens, max_context_len, scale):
        plan = plan_attention(query, k_cache, v_cache, block_tables, max_context_len)
        check_index("context_lens", context_lens, torch.int32, 1)
        device = on_cuda(query, k_cache, v_cache, block_tables, context_lens)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if query.shape[0] == 0:
            return out
        import numpy as np

        inst = plan.instance
        module = _attention_module(inst)
        batch = query.shape[0]
        parts = num_partitions(max_context_len)
        index = device.index if device.index is not None else torch.cuda.current_device()
        if not use_partitioned_decode(batch, plan.num_kv_heads, parts, _sm_count(index)):
            with _launch_context(device):
                module.get_function(inst.kernel("paged_decode"))(
                    (batch, plan.num_kv_heads),
                    (ATTN_THREADS,),
                    (
                        _arr(out), _arr(query), _arr(k_cache), _arr(v_cache), _arr(block_tables),
                        _arr(context_lens), np.int32(plan.max_blocks), np.int32(plan.num_kv_heads),
                        np.float32(scale), np.int64(query.stride(0)), np.int64(out.stride(0)),
                    ),
                )  # fmt: skip
            return out
        # split-context path: fp32 workspace (m, l, unnormalised acc per partition)
        ws = dict(dtype=torch.float32, device=device)
        part_acc = torch.empty(batch, plan.num_heads, parts, inst.head_dim, **ws)
        part_m = torch.empty(batch, plan.num_heads, parts, **ws)
        part_l = torch.empty(batch, plan.num_heads, parts, **ws)
        with _launch_context(device):
            module.get_function(inst.kernel("paged_decode_partitioned"))(
                (batch, plan.num_kv_heads, parts),
                (ATTN_THREADS,),
                (
                    _arr(part_acc), _arr(part_m), _arr(part_l), _arr(query), _arr(k_cache),
                    _arr(v_cache), _arr(block_tables), _arr(context_lens),
                    np.int32(plan.max_blocks), np.int32(plan.num_kv_heads), np.float32(scale),
                    np.int64(query.stride(0)), np.int32(parts),
                ),
            )  # fmt: skip
            module.get_function(inst.reduce_kernel)(
                (batch, plan.num_heads),
                (inst.head_dim,),
                (
                    _arr(out), _arr(part_acc), _arr(part_m), _arr(part_l), _arr(context_lens),
                    np.int32(parts), np.int64(out.stride(0)),
                ),
            )  # fmt: skip
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
        plan = plan_attention(query, k_cache, v_cache, block_tables, max_context_len)
        check_index("query_start_loc", query_start_loc, torch.int32, 1)
        check_index("context_lens", context_lens, torch.int32, 1)
        device = on_cuda(query, k_cache, v_cache, block_tables, context_lens, query_start_loc)
        num_seqs = context_lens.shape[0]
        _require(
            query_start_loc.shape[0] == num_seqs + 1,
            f"query_start_loc has {query_start_loc.shape[0]} entries for {num_seqs} sequences",
        )
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if query.shape[0] == 0:
            return out
        import numpy as np

        kernel = _attention_module(plan.instance).get_function(
            plan.instance.kernel("paged_prefill")
        )
        with _launch_context(device):
            kernel(
                (query.shape[0], plan.num_kv_heads),
                (ATTN_THREADS,),
                (
                    _arr(out), _arr(query), _arr(k_cache), _arr(v_cache), _arr(query_start_loc),
                    _arr(context_lens), _arr(block_tables), np.int32(num_seqs),
                    np.int32(plan.max_blocks), np.int32(plan.num_kv_heads), np.float32(scale),
                    np.int64(query.stride(0)), np.int64(out.stride(0)),
                ),
            )  # fmt: skip
        return out

    def copy_blocks(self, caches, src, dst) -> None:
        """Every source is read before any destination is written (the contract's snapshot).
        A block both read and written (a copy's source freed by a preemption in the same
        step and handed out as a later copy's destination) goes through a gathered copy of
        the sources; the kernel copies every pair at once and could read it half written."""
        words, overlap = plan_copy_blocks(caches, src, dst)
        device = on_cuda(*caches, src, dst)
        if src.numel() == 0:
            return
        if overlap:
            copy_gathered(caches, src, dst)
            return
        import numpy as np

        ptrs = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64, device=src.device)
        kernel = _cache_ops_module(DTYPE_NAMES.get(caches[0].dtype, "float32")).get_function(
            build.COPY_BLOCKS_NAME
        )
        with _launch_context(device):
            kernel(
                (src.shape[0], len(caches)),
                (256,),
                (_arr(ptrs), _arr(src), _arr(dst), np.int64(words)),
            )

    def swap_blocks(self, src_cache, dst_cache, src, dst) -> None:
        """One `cudaMemcpyAsync` per block on torch's stream (host side ideally pinned:
        `torch.empty(..., pin_memory=True)`); waits for the stream when the
        destination is the host, so the caller can read it right away."""
        _require(
            src_cache.shape[1:] == dst_cache.shape[1:] and src_cache.dtype == dst_cache.dtype,
            "caches differ in block shape or dtype",
        )
        _require(
            src_cache.is_contiguous() and dst_cache.is_contiguous(), "caches must be contiguous"
        )
        _require(
            src.shape == dst.shape, f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ"
        )
        cp = _cupy()
        block_bytes = src_cache[0].numel() * src_cache.element_size()
        memcpy_default = 4  # cudaMemcpyDefault: direction inferred (unified addressing)
        cuda_side = src_cache if src_cache.is_cuda else dst_cache
        _require(cuda_side.is_cuda, "swap_blocks needs one cache on a CUDA device")
        stream = torch.cuda.current_stream(cuda_side.device)
        pairs = list(zip(src.tolist(), dst.tolist(), strict=True))
        # (raw pointers: a block id out of range would write past the cache, host memory too)
        bad = [(s, d) for s, d in pairs if not (0 <= s < src_cache.shape[0] and 0 <= d < dst_cache.shape[0])]
        _require(not bad, f"block pair {bad[:1]} out of range of caches of {src_cache.shape[0]} and "
                 f"{dst_cache.shape[0]} blocks")
        for s, d in pairs:
            cp.cuda.runtime.memcpyAsync(
                dst_cache.data_ptr() + d * block_bytes,
                src_cache.data_ptr() + s * block_bytes,
                block_bytes,
                memcpy_default,
                stream.cuda_stream,
            )
        if dst_cache.device.type == "cpu":
            stream.synchronize()
