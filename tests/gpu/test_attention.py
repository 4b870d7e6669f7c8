"""Every attention backend against the naive reference (gpu/attention/reference.py).

Parametrized over backends: "torch" always runs; "cuda" joins when CuPy and a
device are present. Inputs are built on the CPU and moved to the backend's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gpu.attention import reference
from gpu.attention.torch_backend import TorchAttentionBackend

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _cuda_backend():
    try:
        from gpu.attention.cuda_backend import CudaAttentionBackend, cuda_backend_available
    except ImportError:
        return None
    return CudaAttentionBackend() if cuda_backend_available() else None


@dataclass(frozen=True)
class Case:
    backend: object
    device: str


@pytest.fixture(params=["torch", "cpu-native", pytest.param("cuda", marks=pytest.mark.gpu)])
def case(request) -> Case:
    if request.param == "torch":
        return Case(TorchAttentionBackend(), "cpu")
    if request.param == "cpu-native":
        from gpu.attention.cpu_native import CpuNativeAttentionBackend, cpu_native_available

        if not cpu_native_available():
            pytest.fail("the C++ CPU kernel did not build (g++ and ninja are installed by ops/setup.sh)")
        return Case(CpuNativeAttentionBackend(), "cpu")
    backend = _cuda_backend()
    if backend is None:
        pytest.skip("no CUDA device / CuPy")
    return Case(backend, "cuda")


@dataclass
class Paged:
    """A random paged cache and the block tables of a batch of sequences."""

    k_cache: torch.Tensor  # (num_blocks, bs, nkv, hd)
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0
    context_lens: torch.Tensor  # (B,) int32


def make_paged(
    context_lens: list[int],
    *,
    nkv: int,
    hd: int,
    block_size: int = 16,
    dtype=torch.float32,
    extra_cols: int = 2,
    seed: int = 0,
) -> Paged:
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(per_seq) + 3  # spare blocks that no sequence uses
    max_blocks = max(per_seq) + extra_cols
    k_cache = torch.randn(num_blocks, block_size, nkv, hd, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, nkv, hd, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)  # scattered, not in order
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[used : used + n].to(torch.int32)
        used += n
    return Paged(k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32))


def to(case: Case, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(case.device) for t in tensors]


def check_close(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    torch.testing.assert_close(
        actual.cpu().to(torch.float64), expected, atol=TOL[dtype], rtol=TOL[dtype]
    )


DECODE_SHAPES = [
    # (nh, nkv, hd): GQA ratios 3 (SmolLM2), 1, 8 and both head sizes; the CPU kernel
    # has a register-resident path per (head size, ratio) for ratios 1-4 at 64 and
    # 1-2 at 128, and a generic one for the rest (8 here)
    (9, 3, 64),
    (4, 4, 64),
    (8, 4, 64),
    (8, 2, 64),
    (16, 2, 128),
    (8, 1, 128),
    (4, 2, 128),
    (2, 2, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv,hd", DECODE_SHAPES)
@pytest.mark.parametrize(
    "context_lens",
    [[1], [16], [17, 1, 33], [5, 200, 64, 31, 1000]],
    ids=["ctx1", "one-block", "partial", "mixed-long"],
)
def test_decode_matches_reference(case, dtype, nh, nkv, hd, context_lens):
    paged = make_paged(context_lens, nkv=nkv, hd=hd, dtype=dtype)
    query = torch.randn(len(context_lens), nh, hd).to(dtype)
    scale = hd**-0.5
    expected = reference.decode(
        query,
        paged.k_cache,
        paged.v_cache,
        paged.block_tables,
        paged.context_lens,
        max(context_lens),
        scale,
    )
    q, k, v, bt, cl = to(
        case, query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens
    )
    out = case.backend.decode(q, k, v, bt, cl, max(context_lens), scale)
    assert out.shape == query.shape and out.dtype == dtype
    check_close(out, expected, dtype)


def test_decode_ignores_garbage_past_context(case):
    """Padding columns and the tail of the last block must not leak into the result.

    The poison is large but finite: caches are allocated zeroed and only ever hold
    finite K/V, and the torch backend multiplies masked positions by weight 0."""
    paged = make_paged([3, 20], nkv=3, hd=64)
    query = torch.randn(2, 9, 64)
    q, k, v, bt, cl = to(
        case, query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens
    )
    before = case.backend.decode(q, k, v, bt, cl, 20, 0.125)
    # poison every slot that is not inside a context
    poisoned_k, poisoned_v = paged.k_cache.clone(), paged.v_cache.clone()
    keep = torch.zeros(paged.k_cache.shape[:2], dtype=torch.bool)
    for b, n in enumerate([3, 20]):
        for p in range(n):
            keep[paged.block_tables[b, p // 16], p % 16] = True
    poisoned_k[~keep] = 1e4
    poisoned_v[~keep] = 1e6
    k2, v2 = to(case, poisoned_k, poisoned_v)
    after = case.backend.decode(q, k2, v2, bt, cl, 20, 0.125)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv,hd", DECODE_SHAPES)
@pytest.mark.parametrize(
    "chunks",
    [
        [(7, 7)],  # fresh prompt, partial block
        [(16, 16), (40, 40)],  # fresh prompts, exact block and partial
        [(5, 37), (1, 2), (20, 20)],  # cached prefixes (chunked prefill / prefix hit)
        [(64, 100), (3, 3), (17, 33)],
    ],
    ids=["fresh", "fresh-2", "prefix-hit", "mixed"],
)
def test_prefill_matches_reference(case, dtype, nh, nkv, hd, chunks):
    query_lens = [q for q, _ in chunks]
    context_lens = [c for _, c in chunks]
    paged = make_paged(context_lens, nkv=nkv, hd=hd, dtype=dtype, seed=1)
    query = torch.randn(sum(query_lens), nh, hd).to(dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    scale = hd**-0.5
    args = (max(query_lens), max(context_lens), scale)
    expected = reference.prefill(
        query, paged.k_cache, paged.v_cache, starts, paged.context_lens, paged.block_tables, *args
    )
    q, k, v, qs, cl, bt = to(
        case, query, paged.k_cache, paged.v_cache, starts, paged.context_lens, paged.block_tables
    )
    out = case.backend.prefill(q, k, v, qs, cl, bt, *args)
    assert out.shape == query.shape and out.dtype == dtype
    check_close(out, expected, dtype)


def test_prefill_token_sees_itself_and_earlier_positions_only(case):
    """A one-token chunk at the end of a context equals a decode of that token."""
    paged = make_paged([29], nkv=3, hd=64, seed=2)
    query = torch.randn(1, 9, 64)
    q, k, v, bt, cl = to(
        case, query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens
    )
    starts = torch.tensor([0, 1], dtype=torch.int32, device=case.device)
    pre = case.backend.prefill(q, k, v, starts, cl, bt, 1, 29, 0.125)
    dec = case.backend.decode(q, k, v, bt, cl, 29, 0.125)
    torch.testing.assert_close(pre, dec, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_scatters_and_skips_negative_slots(case, dtype):
    nkv, hd, bs, nblocks = 3, 64, 16, 6
    k_cache = torch.zeros(nblocks, bs, nkv, hd, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(5, nkv, hd).to(dtype)
    value = torch.randn(5, nkv, hd).to(dtype)
    slots = torch.tensor([17, -1, 0, 95, 40], dtype=torch.int64)
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(key, value, exp_k, exp_v, slots)

    kc, vc, kk, vv, sl = to(case, k_cache, v_cache, key, value, slots)
    case.backend.write_kv(kk, vv, kc, vc, sl)
    torch.testing.assert_close(kc.cpu(), exp_k, atol=0, rtol=0)
    torch.testing.assert_close(vc.cpu(), exp_v, atol=0, rtol=0)
    assert int((kc.cpu() != 0).any(-1).any(-1).sum()) == 4  # token 1 was skipped


def test_write_kv_then_decode_roundtrip(case):
    """The engine's order: write the new token's K/V, then attend over the cache."""
    paged = make_paged([10, 16], nkv=3, hd=64, seed=3)
    key, value = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    lens = [11, 17]
    slots = torch.tensor(
        [int(paged.block_tables[b, (n - 1) // 16]) * 16 + (n - 1) % 16 for b, n in enumerate(lens)]
    )
    # the second sequence's new token opens a second block: a spare one no table uses
    used = set(paged.block_tables.flatten().tolist())
    spare = next(i for i in range(paged.k_cache.shape[0]) if i not in used)
    paged.block_tables[1, 1] = spare
    slots[1] = spare * 16
    ctx = torch.tensor(lens, dtype=torch.int32)
    query = torch.randn(2, 9, 64)

    exp_k, exp_v = paged.k_cache.clone(), paged.v_cache.clone()
    reference.write_kv(key, value, exp_k, exp_v, slots)
    expected = reference.decode(query, exp_k, exp_v, paged.block_tables, ctx, 17, 0.125)

    kc, vc, kk, vv, sl, q, bt, cl = to(
        case, paged.k_cache, paged.v_cache, key, value, slots, query, paged.block_tables, ctx
    )
    case.backend.write_kv(kk, vv, kc, vc, sl)
    out = case.backend.decode(q, kc, vc, bt, cl, 17, 0.125)
    check_close(out, expected, torch.float32)


def test_copy_blocks_copies_every_cache(case):
    caches = [torch.randn(8, 16, 3, 64) for _ in range(4)]
    src = torch.tensor([1, 5, 2], dtype=torch.int64)
    dst = torch.tensor([6, 0, 7], dtype=torch.int64)
    expected = [c.clone() for c in caches]
    reference.copy_blocks(expected, src, dst)
    moved = to(case, *caches)
    s, d = to(case, src, dst)
    case.backend.copy_blocks(moved, s, d)
    for got, want in zip(moved, expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_blocks_moves_blocks_between_caches(case, dtype):
    """Device → host and back (cpu → cpu for the torch backend)."""
    device_cache = torch.randn(6, 16, 3, 64).to(dtype).to(case.device)
    host_cache = torch.zeros(4, 16, 3, 64, dtype=dtype)
    src = torch.tensor([4, 1], dtype=torch.int64)
    dst = torch.tensor([0, 3], dtype=torch.int64)
    case.backend.swap_blocks(device_cache, host_cache, src, dst)
    torch.testing.assert_close(host_cache[0], device_cache[4].cpu(), atol=0, rtol=0)
    torch.testing.assert_close(host_cache[3], device_cache[1].cpu(), atol=0, rtol=0)
    assert not host_cache[1:3].any()

    back = torch.zeros_like(device_cache)
    case.backend.swap_blocks(host_cache, back, dst, src)
    torch.testing.assert_close(back[4].cpu(), device_cache[4].cpu(), atol=0, rtol=0)
    torch.testing.assert_close(back[1].cpu(), device_cache[1].cpu(), atol=0, rtol=0)


def test_decode_rejects_mismatched_heads(case):
    paged = make_paged([4], nkv=3, hd=64)
    q, k, v, bt, cl = to(
        case,
        torch.randn(1, 8, 64),
        paged.k_cache,
        paged.v_cache,
        paged.block_tables,
        paged.context_lens,
    )
    with pytest.raises(ValueError, match="multiple"):
        case.backend.decode(q, k, v, bt, cl, 4, 0.125)


def test_query_and_new_kv_may_be_views_into_a_fused_projection(case):
    """The model splits one qkv tensor: rows of q, k, v are not adjacent in memory."""
    nh, nkv, hd = 9, 3, 64
    paged = make_paged([5, 30], nkv=nkv, hd=hd, seed=4)
    qkv = torch.randn(2, nh + 2 * nkv, hd)
    query, key, value = qkv[:, :nh], qkv[:, nh : nh + nkv], qkv[:, nh + nkv :]
    lens = [5, 30]
    slots = torch.tensor(
        [int(paged.block_tables[b, (n - 1) // 16]) * 16 + (n - 1) % 16 for b, n in enumerate(lens)]
    )
    exp_k, exp_v = paged.k_cache.clone(), paged.v_cache.clone()
    reference.write_kv(key, value, exp_k, exp_v, slots)
    expected = reference.decode(
        query, exp_k, exp_v, paged.block_tables, paged.context_lens, 30, 0.125
    )

    qkv_d, kc, vc, sl, bt, cl = to(
        case, qkv, paged.k_cache, paged.v_cache, slots, paged.block_tables, paged.context_lens
    )
    q, k, v = qkv_d[:, :nh], qkv_d[:, nh : nh + nkv], qkv_d[:, nh + nkv :]
    case.backend.write_kv(k, v, kc, vc, sl)
    check_close(case.backend.decode(q, kc, vc, bt, cl, 30, 0.125), expected, torch.float32)


@pytest.mark.parametrize("block_size", [8, 32, 64])
@pytest.mark.parametrize("hd", [32, 64, 128])
def test_decode_block_sizes_and_head_dims(case, block_size, hd):
    """Tiles of 16 positions inside blocks of other sizes, and head sizes the vectorized
    CPU path does not specialize (32 → the portable loop) give the reference result."""
    context_lens = [1, block_size - 1, block_size + 1, 3 * block_size + 5, 300]
    paged = make_paged(context_lens, nkv=2, hd=hd, block_size=block_size, seed=7)
    query = torch.randn(len(context_lens), 6, hd)
    scale = hd**-0.5
    expected = reference.decode(
        query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, max(context_lens), scale
    )
    q, k, v, bt, cl = to(case, query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens)
    out = case.backend.decode(q, k, v, bt, cl, max(context_lens), scale)
    check_close(out, expected, torch.float32)


# ---------------------------------------------------------------- every CPU decode kernel
# The "cpu-native" case above runs whichever kernel "auto" picks on this CPU; these run
# each kernel built here by name, so a machine with AVX-512 also checks its AVX2 and
# portable kernels (an AVX2-only machine skips "avx512").
CPU_DECODE_KERNELS = ("avx512", "avx2", "portable")


def _cpu_kernel_backend(op: str, kernel: str):
    """A CpuNativeAttentionBackend running `kernel` for `op` ("decode" or "prefill"); skips
    when this CPU does not build that kernel."""
    from gpu.attention import cpu_native

    if not cpu_native.cpu_native_available():
        pytest.fail("the C++ CPU kernel did not build (g++ and ninja are installed by ops/setup.sh)")
    built = cpu_native.decode_kernels() if op == "decode" else cpu_native.prefill_kernels()
    if kernel not in built:
        pytest.skip(f"the {kernel} {op} kernel is not built for this CPU")
    return cpu_native.CpuNativeAttentionBackend(**{f"{op}_kernel": kernel})


def _poison_outside_contexts(paged: Paged, context_lens: list[int], block_size: int) -> None:
    """Every cache slot no sequence's context covers gets values no softmax can hide."""
    keep = torch.zeros(paged.k_cache.shape[:2], dtype=torch.bool)
    for b, n in enumerate(context_lens):
        for p in range(n):
            keep[paged.block_tables[b, p // block_size], p % block_size] = True
    paged.k_cache[~keep] = 1e4
    paged.v_cache[~keep] = 1e6


@pytest.mark.parametrize("kernel", CPU_DECODE_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv,hd", [*DECODE_SHAPES, (6, 2, 32)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_cpu_decode_kernel_matches_reference(kernel, dtype, nh, nkv, hd, block_size):
    """Contexts ending anywhere in a tile and a block, with every slot outside a context
    poisoned: a kernel that reads past a context or mis-masks a tile's tail fails."""
    backend = _cpu_kernel_backend("decode", kernel)
    if kernel == "avx512" and hd == 32:
        pytest.skip("the AVX-512 kernel does not specialize head_dim 32 (auto takes AVX2 there)")
    context_lens = [1, 7, 8, 9, 15, 16, 17, 200, 1000]
    paged = make_paged(context_lens, nkv=nkv, hd=hd, block_size=block_size, dtype=dtype, seed=3)
    _poison_outside_contexts(paged, context_lens, block_size)
    query = torch.randn(len(context_lens), nh, hd).to(dtype)
    scale = hd**-0.5
    expected = reference.decode(
        query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, max(context_lens), scale
    )
    out = backend.decode(query, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens,
                         max(context_lens), scale)
    assert out.shape == query.shape and out.dtype == dtype
    check_close(out, expected, dtype)


def test_cpu_decode_kernel_by_name_is_checked():
    """A kernel this CPU lacks or that does not handle the head size is an error, not a
    silent fallback; "auto" always answers."""
    from gpu.attention.cpu_native import decode_kernel_for, decode_kernels

    backend = _cpu_kernel_backend("decode", "portable")
    assert decode_kernels()[-1] == "portable"
    assert decode_kernel_for(48) == "portable"  # no vectorized kernel specializes 48
    assert decode_kernel_for(64) == decode_kernels()[0]
    paged = make_paged([5, 9], nkv=2, hd=48)
    query = torch.randn(2, 4, 48)
    args = (paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, 9, 0.1)
    backend.decode_kernel = "bogus"
    with pytest.raises(RuntimeError, match="unknown decode kernel 'bogus'"):
        backend.decode(query, *args)
    for vectorized in decode_kernels()[:-1]:
        backend.decode_kernel = vectorized
        with pytest.raises(RuntimeError, match="does not handle head_dim 48"):
            backend.decode(query, *args)
    for absent in sorted(set(CPU_DECODE_KERNELS) - set(decode_kernels())):
        backend.decode_kernel = absent
        with pytest.raises(RuntimeError, match="not built for this CPU"):
            backend.decode(query, *args)


# ---------------------------------------------------------------- every CPU prefill kernel
# As for decode: each prefill kernel built here by name (an AVX2-only machine skips
# "avx512"; a CPU without AVX2 builds none and the cpu-native backend prefills on the
# torch path, which the "cpu-native" case above covers).
CPU_PREFILL_KERNELS = ("avx512", "avx2")

# (query len, context len) per sequence: fresh prompts ending anywhere in a tile and a
# block, prompts longer than one work item (64+ rows), chunks after cached positions
# whose first query sits mid-tile, and single tokens at the end of a context
PREFILL_CHUNKS = [(1, 1), (7, 7), (8, 8), (9, 9), (17, 17), (130, 130), (5, 37), (1, 2), (3, 200), (70, 77),
                  (1, 1000)]


@pytest.mark.parametrize("kernel", CPU_PREFILL_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv,hd", [*DECODE_SHAPES, (6, 2, 32)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_cpu_prefill_kernel_matches_reference(kernel, dtype, nh, nkv, hd, block_size):
    """Every slot outside a context poisoned: a kernel that reads past a context,
    mis-masks the causal edge inside a tile or misplaces a chunk's first query fails."""
    backend = _cpu_kernel_backend("prefill", kernel)
    if kernel == "avx512" and hd == 32:
        pytest.skip("the AVX-512 prefill kernel does not specialize head_dim 32 (auto takes AVX2 there)")
    query_lens = [q for q, _ in PREFILL_CHUNKS]
    context_lens = [c for _, c in PREFILL_CHUNKS]
    paged = make_paged(context_lens, nkv=nkv, hd=hd, block_size=block_size, dtype=dtype, seed=4)
    _poison_outside_contexts(paged, context_lens, block_size)
    query = torch.randn(sum(query_lens), nh, hd).to(dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (max(query_lens), max(context_lens), hd**-0.5)
    expected = reference.prefill(
        query, paged.k_cache, paged.v_cache, starts, paged.context_lens, paged.block_tables, *args
    )
    out = backend.prefill(query, paged.k_cache, paged.v_cache, starts, paged.context_lens, paged.block_tables, *args)
    assert out.shape == query.shape and out.dtype == dtype
    check_close(out, expected, dtype)


def test_cpu_prefill_kernel_by_name_is_checked():
    """A named prefill kernel this CPU lacks or that does not handle the head size is an
    error; "auto" falls back to the torch path for a head size no kernel handles."""
    from gpu.attention.cpu_native import (
        CpuNativeAttentionBackend,
        prefill_kernel_for,
        prefill_kernels,
    )

    _cpu_kernel_backend("decode", "portable")  # the extension builds
    assert prefill_kernel_for(48) == "none"
    assert prefill_kernel_for(64) == (prefill_kernels() or ["none"])[0]
    paged = make_paged([5, 9], nkv=2, hd=48)
    query = torch.randn(6, 4, 48)
    starts = torch.tensor([0, 2, 6], dtype=torch.int32)
    args = (paged.k_cache, paged.v_cache, starts, paged.context_lens, paged.block_tables, 4, 9, 0.1)
    expected = reference.prefill(query, *args)
    check_close(CpuNativeAttentionBackend().prefill(query, *args), expected, torch.float32)  # torch path
    check_close(CpuNativeAttentionBackend(prefill_kernel="torch").prefill(query, *args), expected, torch.float32)
    backend = CpuNativeAttentionBackend(prefill_kernel="bogus")
    with pytest.raises(RuntimeError, match="unknown prefill kernel 'bogus'"):
        backend.prefill(query, *args)
    for vectorized in prefill_kernels():
        backend.prefill_kernel = vectorized
        with pytest.raises(RuntimeError, match="does not handle head_dim 48"):
            backend.prefill(query, *args)
    for absent in sorted(set(CPU_PREFILL_KERNELS) - set(prefill_kernels())):
        backend.prefill_kernel = absent
        with pytest.raises(RuntimeError, match="not built for this CPU"):
            backend.prefill(query, *args)


def test_auto_prefill_splits_by_work_only_for_bf16_on_amx():
    """The rule: in bfloat16 on an AMX CPU a sequence with at least
    AMX_TORCH_PREFILL_MIN_FLOPS of attention goes to the torch path; otherwise never."""
    from gpu.attention.cpu_native import (
        AMX_TORCH_PREFILL_MIN_FLOPS,
        auto_torch_prefill_min_flops,
        prefill_flops,
    )

    assert auto_torch_prefill_min_flops(torch.bfloat16, amx=True) == AMX_TORCH_PREFILL_MIN_FLOPS
    for dtype, amx in ((torch.float32, True), (torch.bfloat16, False), (torch.float32, False)):
        assert auto_torch_prefill_min_flops(dtype, amx=amx) == float("inf")
    # a fresh prompt of n tokens sees n (n + 1) / 2 (query, key) pairs; a chunk of 1 sees its context
    assert prefill_flops(3, 3, 2, 8) == 4 * 2 * 8 * 6
    assert prefill_flops(1, 700, 9, 64) == 4 * 9 * 64 * 700
    smollm = [n for n in range(1, 400) if prefill_flops(n, n, 9, 64) >= AMX_TORCH_PREFILL_MIN_FLOPS]
    assert 120 <= smollm[0] <= 200  # measured crossover of the 9/3/64 shapes: ~128-256 tokens


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_auto_prefill_mixed_batch_matches_reference(monkeypatch, amx, dtype):
    """A step mixing short chunks (kernel) and long ones (torch path, when the rule splits)
    with empty chunks between them: every row lands where it belongs, poisoned slots unread."""
    from gpu.attention import cpu_native
    from gpu.attention.torch_backend import TorchAttentionBackend

    backend = _cpu_kernel_backend("decode", "portable")  # the extension builds
    monkeypatch.setattr(cpu_native, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(cpu_native, "AMX_TORCH_PREFILL_MIN_FLOPS", 4 * 9 * 64 * 500)
    torch_seqs: list[int] = []
    real = TorchAttentionBackend.prefill

    def spy(self, query, k, v, starts, *rest):
        torch_seqs.append(len(starts) - 1)
        return real(self, query, k, v, starts, *rest)

    monkeypatch.setattr(TorchAttentionBackend, "prefill", spy)
    chunks = [(3, 3), (40, 40), (0, 5), (1, 600), (9, 70), (33, 33), (0, 9), (2, 2)]  # 40 → 820, 33 → 561 pairs
    query_lens, context_lens = [q for q, _ in chunks], [c for _, c in chunks]
    paged = make_paged(context_lens, nkv=3, hd=64, block_size=16, dtype=dtype, seed=6)
    _poison_outside_contexts(paged, context_lens, 16)
    query = torch.randn(sum(query_lens), 9, 64).to(dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (paged.k_cache, paged.v_cache, starts, paged.context_lens, paged.block_tables, 40, 600, 0.125)
    check_close(backend.prefill(query, *args), reference.prefill(query, *args), dtype)
    split = amx and dtype == torch.bfloat16 and cpu_native.prefill_kernels()
    assert torch_seqs == ([4] if split else [] if cpu_native.prefill_kernels() else [len(chunks)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant_cpu_backend_gives_a_query_the_same_bits_on_every_path(monkeypatch, dtype):
    """`CpuNativeAttentionBackend(batch_invariant=True)`: a query row gets the same bits as a
    decode, as the last row of a prefill chunk of any size, and next to other sequences —
    also in bf16 on an AMX CPU, where "auto" would send big chunks to SDPA (forced here)
    and the decode kernel rounds differently from the prefill kernel."""
    from gpu.attention import cpu_native
    from gpu.attention.cpu_native import CpuNativeAttentionBackend, cpu_native_available

    if not cpu_native_available():
        pytest.fail("the C++ CPU kernel did not build (g++ and ninja are installed by ops/setup.sh)")
    monkeypatch.setattr(cpu_native, "cpu_has_amx", lambda: True)
    be = CpuNativeAttentionBackend(batch_invariant=True)
    g = torch.Generator().manual_seed(3)
    nb, bs, nkv, hd, nh, n = 40, 16, 3, 64, 9, 150
    k_cache = torch.randn(nb, bs, nkv, hd, generator=g).to(dtype)
    v_cache = torch.randn(nb, bs, nkv, hd, generator=g).to(dtype)
    table = torch.randperm(nb - 1, generator=g)[:10].to(torch.int32)[None] + 1
    q = torch.randn(n, nh, hd, generator=g).to(dtype)
    scale = hd**-0.5

    def prefill(rows: torch.Tensor, ctx: int) -> torch.Tensor:
        return be.prefill(rows, k_cache, v_cache, torch.tensor([0, len(rows)], dtype=torch.int32),
                          torch.tensor([ctx], dtype=torch.int32), table, len(rows), ctx, scale)

    whole = prefill(q, n)  # 150 x 150 causal: past the 32 MFLOP from which "auto" takes SDPA on AMX
    for start in (1, 40, 99, 149):
        assert torch.equal(prefill(q[start:], n), whole[start:]), f"chunk from {start}"
    for ctx in range(1, n + 1):
        one = be.decode(q[ctx - 1:ctx], k_cache, v_cache, table, torch.tensor([ctx], dtype=torch.int32), ctx, scale)
        assert torch.equal(one[0], whole[ctx - 1]), f"decode at context {ctx}"
    others = torch.randn(3, nh, hd, generator=g).to(dtype)
    crowd = be.decode(torch.cat([q[99:100], others]), k_cache, v_cache, table.repeat(4, 1),
                      torch.tensor([100, 7, 150, 33], dtype=torch.int32), n, scale)
    assert torch.equal(crowd[0], whole[99])
