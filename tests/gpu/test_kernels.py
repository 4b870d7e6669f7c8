"""The CUDA kernels in gpu/kernels/, verified without a GPU.

1. They compile: nvcc for sm_80 and sm_90 with warnings as errors (every template
   instance the backend can request), and NVRTC (the run-time path through CuPy).
2. They compute the right thing: the SAME source, compiled with g++ against
   gpu/kernels/cpu_emu/cuda_emu.h (fibers with real barriers and warp shuffles),
   runs through `EmulatedCudaBackend` and is compared with gpu/attention/reference.py.
3. On a CUDA device (skipped otherwise) the CuPy backend joins tests/gpu/test_attention.py.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from gpu.attention import reference
from gpu.kernels import build
from tests.gpu.test_attention import check_close, make_paged

# ------------------------------------------------------------------ compiling


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_every_instance_without_warnings(arch, tmp_path):
    if build.nvcc_path() is None:
        pytest.skip("nvcc not installed")
    try:
        obj = build.nvcc_compile(arch, build.all_attention_instances(), tmp_path)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"nvcc failed for {arch}:\n{exc.stdout}\n{exc.stderr}")
    assert obj.stat().st_size > 0


def test_nvrtc_compiles_every_name_expression():
    """The names the CuPy backend asks for exist and compile under NVRTC (no <math.h>)."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except (ImportError, OSError, RuntimeError) as exc:
        pytest.skip(f"NVRTC not available: {exc}")
    names = build.name_expressions(build.all_attention_instances())
    lowered = build.nvrtc_compile(names)
    assert set(lowered) == set(names)
    assert all(mangled.startswith("_Z") for mangled in lowered.values())


# ------------------------------------------------------------------ the emulator itself


@pytest.fixture(scope="module")
def emu():
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    from gpu.kernels.cpu_emu.backend import EmulatedCudaBackend

    return EmulatedCudaBackend(sm_count=0)  # never split the context


@pytest.fixture(scope="module")
def emu_split(emu):
    from gpu.kernels.cpu_emu.backend import EmulatedCudaBackend

    return EmulatedCudaBackend(sm_count=10**6)  # split whenever the context spans > 1 partition


def test_emulated_barriers_really_interleave_threads(emu):
    from gpu.kernels.cpu_emu.backend import run_selftest

    status, out = run_selftest("shared_rotation", blocks=2, threads=96)
    assert status == 0
    assert out == [(i % 96) * 10 + 1 for i in range(2 * 96)]


def test_emulated_warp_shuffles(emu):
    from gpu.kernels.cpu_emu.backend import run_selftest

    status, out = run_selftest("shuffles", blocks=1, threads=64)
    assert status == 0
    for t in range(64):
        lane = t % 32
        assert out[3 * t : 3 * t + 3] == [496, min(lane + 1, 31), (lane ^ 16) * 7]


def test_emulator_reports_a_divergent_barrier(emu):
    from gpu.kernels.cpu_emu.backend import run_selftest

    status, _ = run_selftest("divergent_barrier", blocks=1, threads=64)
    assert status == 2


# ------------------------------------------------------------------ kernels vs reference

DECODE_CASES = [
    # (nh, nkv, hd, context_lens, dtype)
    (9, 3, 64, [1], torch.float32),  # context length 1
    (9, 3, 64, [17, 16, 33, 1], torch.float32),  # partial last block, exact block
    (4, 4, 128, [31, 5], torch.float32),  # GQA 1, head dim 128
    (16, 2, 128, [40, 3], torch.float32),  # GQA 8
    (8, 1, 64, [1024, 2], torch.float32),  # the longest context in the suite
    (9, 3, 64, [256, 257, 513, 1], torch.float32),  # partition boundaries (256 positions)
    (9, 3, 64, [17, 1, 50], torch.bfloat16),
    (16, 2, 128, [20, 7], torch.float16),
]


@pytest.mark.parametrize(
    "nh,nkv,hd,context_lens,dtype",
    DECODE_CASES,
    ids=["ctx1", "partial", "gqa1-hd128", "gqa8-hd128", "longest", "partitions", "bf16", "fp16"],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-context"])
def test_emulated_decode_matches_reference(emu, emu_split, split, nh, nkv, hd, context_lens, dtype):
    """Both decode paths: one block per (seq, kv head), and partitions + reduce."""
    paged = make_paged(context_lens, nkv=nkv, hd=hd, dtype=dtype, seed=7)
    query = torch.randn(len(context_lens), nh, hd).to(dtype)
    args = (paged.block_tables, paged.context_lens, max(context_lens), hd**-0.5)
    expected = reference.decode(query, paged.k_cache, paged.v_cache, *args)
    out = (emu_split if split else emu).decode(query, paged.k_cache, paged.v_cache, *args)
    check_close(out, expected, dtype)


PREFILL_CASES = [
    # (nh, nkv, hd, [(query_len, context_len)], dtype)
    (9, 3, 64, [(7, 7), (5, 37), (1, 2)], torch.float32),  # fresh, prefix hit, 1-token chunk
    (16, 2, 128, [(20, 20), (3, 40)], torch.float32),
    (4, 4, 128, [(16, 16)], torch.float32),
    (9, 3, 64, [(5, 21), (9, 9)], torch.bfloat16),
]


@pytest.mark.parametrize(
    "nh,nkv,hd,chunks,dtype", PREFILL_CASES, ids=["gqa3", "gqa8-hd128", "gqa1-hd128", "bf16"]
)
def test_emulated_prefill_matches_reference(emu, nh, nkv, hd, chunks, dtype):
    query_lens = [q for q, _ in chunks]
    context_lens = [c for _, c in chunks]
    paged = make_paged(context_lens, nkv=nkv, hd=hd, dtype=dtype, seed=8)
    query = torch.randn(sum(query_lens), nh, hd).to(dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (starts, paged.context_lens, paged.block_tables, max(query_lens), max(context_lens))
    expected = reference.prefill(query, paged.k_cache, paged.v_cache, *args, hd**-0.5)
    out = emu.prefill(query, paged.k_cache, paged.v_cache, *args, hd**-0.5)
    check_close(out, expected, dtype)


def test_emulated_decode_reads_query_rows_with_a_stride(emu):
    """q as a view into a fused qkv projection: rows are not adjacent."""
    nh, nkv, hd = 9, 3, 64
    paged = make_paged([20, 3], nkv=nkv, hd=hd, seed=9)
    qkv = torch.randn(2, nh + 2 * nkv, hd)
    query = qkv[:, :nh]  # (2, nh, hd), row stride (nh + 2 nkv) * hd
    assert not query.is_contiguous()
    args = (paged.block_tables, paged.context_lens, 20, 0.125)
    expected = reference.decode(query, paged.k_cache, paged.v_cache, *args)
    check_close(emu.decode(query, paged.k_cache, paged.v_cache, *args), expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_write_kv_scatters_skips_negative_and_reads_strided_rows(emu, dtype):
    nkv, hd = 3, 64
    k_cache = torch.zeros(5, 16, nkv, hd, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    kv = torch.randn(4, 2 * nkv, hd).to(dtype)
    key, value = kv[:, :nkv], kv[:, nkv:]  # strided views, as from a fused projection
    slots = torch.tensor([3, -1, 79, 16], dtype=torch.int64)
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(key, value, exp_k, exp_v, slots)
    emu.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)
    assert int(k_cache.flatten(0, 1).any(-1).any(-1).sum()) == 3


def test_emulated_copy_blocks_every_layer(emu):
    caches = [torch.randn(6, 16, 3, 64).to(torch.bfloat16) for _ in range(4)]
    src = torch.tensor([0, 4], dtype=torch.int64)
    dst = torch.tensor([5, 1], dtype=torch.int64)
    expected = [c.clone() for c in caches]
    reference.copy_blocks(expected, src, dst)
    emu.copy_blocks(caches, src, dst)
    for got, want in zip(caches, expected, strict=True):
        assert torch.equal(got, want)


def test_emulated_copy_blocks_reads_a_block_before_a_later_pair_overwrites_it(emu):
    """A copy's source, freed by a preemption in the same step, handed out as a later
    copy's destination: the plan ((2, 3), (1, 2)) the scheduler makes under pressure with
    forked sequences. It was refused ("both source and destination"), which failed every
    request in the engine on CUDA; it is copied as the torch backend does (a snapshot)."""
    caches = [torch.randn(5, 16, 2, 64) for _ in range(3)]
    src, dst = torch.tensor([2, 1], dtype=torch.int64), torch.tensor([3, 2], dtype=torch.int64)
    expected = [c.clone() for c in caches]
    reference.copy_blocks(expected, src, dst)
    emu.copy_blocks(caches, src, dst)
    for got, want in zip(caches, expected, strict=True):
        assert torch.equal(got, want)
        assert torch.equal(got[3], want[3]) and not torch.equal(got[3], got[2])  # block 2 read before written


def test_a_copy_of_a_block_out_of_range_is_refused_before_any_launch(emu):
    """The kernel reads and writes by raw pointer: an id past the cache would copy from, or
    over, whatever memory follows it (torch's index_copy_ raises)."""
    caches = [torch.randn(4, 16, 2, 64)]
    kept = caches[0].clone()
    for src, dst in (([0], [4]), ([-1], [1]), ([7], [0])):
        with pytest.raises(ValueError, match="out of range"):
            emu.copy_blocks(caches, torch.tensor(src), torch.tensor(dst))
    assert torch.equal(caches[0], kept)


def test_launchers_reject_what_no_kernel_was_built_for(emu):
    paged = make_paged([4], nkv=2, hd=96)
    with pytest.raises(ValueError, match="head_dim"):
        emu.decode(torch.randn(1, 4, 96), paged.k_cache, paged.v_cache,
                   paged.block_tables, paged.context_lens, 4, 0.1)  # fmt: skip
    paged = make_paged([4], nkv=3, hd=64)
    with pytest.raises(ValueError, match="int32"):
        emu.decode(torch.randn(1, 9, 64), paged.k_cache, paged.v_cache,
                   paged.block_tables.long(), paged.context_lens, 4, 0.1)  # fmt: skip


def test_cuda_backend_rejects_host_tensors_before_launching():
    """The launcher validates before any CuPy call, so this runs without a device."""
    from gpu.attention.cuda_backend import CudaAttentionBackend

    paged = make_paged([4], nkv=3, hd=64)
    with pytest.raises(ValueError, match="CUDA tensors"):
        CudaAttentionBackend().decode(
            torch.randn(1, 9, 64), paged.k_cache, paged.v_cache,
            paged.block_tables, paged.context_lens, 4, 0.125,
        )  # fmt: skip


def test_launchers_reject_a_context_longer_than_the_block_tables(emu):
    """The kernels index block tables without bounds checks: the launcher must."""
    paged = make_paged([20], nkv=3, hd=64, extra_cols=0)  # 2 columns = 32 positions
    with pytest.raises(ValueError, match="exceeds"):
        emu.decode(torch.randn(1, 9, 64), paged.k_cache, paged.v_cache,
                   paged.block_tables, paged.context_lens, 33, 0.125)  # fmt: skip


def test_cpu_extension_cache_key_covers_source_flags_and_cpu(tmp_path):
    """A build cached on one CPU must not be loaded on another (-march=native)."""
    src = tmp_path / "k.cpp"
    src.write_text("int f() { return 1; }\n")
    base = build.cpu_extension_name(src, ["-O3", "-march=native"], "GenuineIntel | 6 | 85 | avx512f")
    assert base.startswith("lmgate_k_")
    assert base == build.cpu_extension_name(src, ["-O3", "-march=native"], "GenuineIntel | 6 | 85 | avx512f")
    assert base != build.cpu_extension_name(src, ["-O3", "-march=native"], "AuthenticAMD | 23 | 1 | avx2")
    assert base != build.cpu_extension_name(src, ["-O2", "-march=native"], "GenuineIntel | 6 | 85 | avx512f")
    src.write_text("int f() { return 2; }\n")
    assert base != build.cpu_extension_name(src, ["-O3", "-march=native"], "GenuineIntel | 6 | 85 | avx512f")


def test_cpu_fingerprint_names_this_cpus_isa():
    fp = build.cpu_fingerprint()
    assert fp and fp == build.cpu_fingerprint()
    if torch.backends.cpu.get_cpu_capability().startswith("AVX"):  # x86: the flags are in it
        assert "sse2" in fp


def test_a_build_lock_left_by_a_dead_process_does_not_hang_the_next_load():
    # torch guards a build directory with a lock *file*; a process killed while holding it
    # (e.g. a server stopped while loading) made every later load wait forever
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory

    from gpu.kernels.build import (
        CPU_EXTENSION_CFLAGS,
        KERNEL_DIR,
        cpu_extension_name,
        extension_fingerprint,
    )

    cflags = [*CPU_EXTENSION_CFLAGS, "-ffp-contract=off"]  # as gpu.layer_ops loads it
    name = cpu_extension_name(KERNEL_DIR / "cpu" / "layer_ops.cpp", cflags, extension_fingerprint())
    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    lock.touch()  # what the dead process left
    load = "from gpu.layer_ops import fused_available; assert fused_available()"
    subprocess.run([sys.executable, "-c", load], check=True, timeout=600, cwd=Path(__file__).parents[2])
    assert not lock.exists()


def test_ninja_is_found_in_the_interpreters_bin_without_it_on_path(tmp_path, monkeypatch):
    """`.venv/bin/lmgate` run by systemd has the system's PATH only: the venv's ninja is
    put on it, or torch cannot build the CPU kernels and the server falls back silently."""
    bin_dir = tmp_path / "venv-bin"
    bin_dir.mkdir()
    ninja = bin_dir / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(build.sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(empty))
    assert build.ninja_on_path()
    assert shutil.which("ninja") == str(ninja)
    ninja.unlink()
    monkeypatch.setenv("PATH", str(empty))
    assert not build.ninja_on_path()


def test_a_model_shape_no_kernel_was_built_for_is_served_by_the_torch_backend(monkeypatch, caplog):
    """`--block-size 32`, head size 96 or 16 query heads per KV head started a CUDA server
    whose every request failed (the launchers refuse the shape at the first forward): the
    runner's backend is chosen for the shape, falling back to torch's, which serves any."""
    from gpu.attention import AttentionShape, get_backend
    from gpu.attention import cuda_backend as cb
    from gpu.attention.torch_backend import TorchAttentionBackend

    monkeypatch.setattr(cb, "cuda_backend_available", lambda: True)  # (as on a machine with a GPU)
    assert isinstance(get_backend("cuda", shape=AttentionShape(64, 3, 16)), cb.CudaAttentionBackend)
    for shape, why in ((AttentionShape(96, 1, 16), "head_dim 96"), (AttentionShape(128, 16, 16), "GQA group 16"),
                       (AttentionShape(64, 3, 32), "block_size 32")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="gpu.attention"):
            assert isinstance(get_backend("cuda", shape=shape), TorchAttentionBackend)
        assert why in caplog.text and "torch attention backend" in caplog.text
