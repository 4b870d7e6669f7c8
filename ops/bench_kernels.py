"""Benchmark the paged-KV kernels: CUDA bandwidth vs the device's peak, or (--cpu)
the CPU kernels against the torch backend in the same run.

    python -m ops.bench_kernels [--json PATH] [--iters N] [--peak-gbps X]
    python -m ops.bench_kernels --cpu [--json PATH] [--iters N]

On a CUDA device it times (CUDA events, after warm-up) write_kv, copy_blocks,
paged decode and paged prefill through `CudaAttentionBackend`, and reports for
each the bytes a kernel must move divided by its time, as GB/s and as a fraction
of peak DRAM bandwidth. For decode it also reports the attention part of a
decode step's MBU (model bandwidth utilisation) for SmolLM2-135M and a
Llama-7B-size model: all layers' K/V bytes read / (layers x kernel time) / peak.
Weights are not part of these kernels, so this is the KV-read share of the step.

Without a device it compiles every kernel instance (nvcc sm_80/sm_90 when nvcc
is installed, and NVRTC when libnvrtc is), says that no numbers were measured,
and exits 0. It never prints made-up numbers.

`--cpu` times `CpuNativeAttentionBackend` (gpu/kernels/cpu/paged_attention.cpp)
and `TorchAttentionBackend` on the same inputs (SmolLM2 and Llama-7B-size heads,
float32 and bfloat16; decode batches and prefill prompt chunks), alternating the
two, best of 3 rounds of `--iters` calls each, and prints per-call times, the
speedup (torch / native) and, for prefill, the attention GFLOP/s of each; then every
decode kernel built for this CPU (avx512, avx2, portable) on the same inputs, with its
speedup over the portable loop, and every prefill kernel (avx512, avx2), with its
speedup over the torch backend.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gpu.kernels import build
from ops.cli import bench_prog, output_file, positive_int


@dataclass(frozen=True)
class AttnShape:
    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


MODELS = (
    AttnShape("SmolLM2-135M", 30, 9, 3, 64),
    AttnShape("Llama-7B-size", 32, 32, 32, 128),
)
BLOCK_SIZE = 16


@dataclass
class Row:
    kernel: str
    model: str
    batch: int
    context: int
    dtype: str
    time_us: float
    gbytes_per_s: float
    frac_of_peak: float | None


def peak_bandwidth_gbps(device: int) -> float | None:
    """Theoretical DRAM bandwidth from the device attributes (None if not reported)."""
    import cupy

    try:
        clock_khz = cupy.cuda.runtime.deviceGetAttribute(36, device)  # MemoryClockRate
        bus_bits = cupy.cuda.runtime.deviceGetAttribute(37, device)  # GlobalMemoryBusWidth
    except cupy.cuda.runtime.CUDARuntimeError:
        return None
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate


def time_us(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def make_cache(shape: AttnShape, batch: int, context: int, dtype: torch.dtype):
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    kv = (num_blocks, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(kv, device="cuda", dtype=dtype)
    v_cache = torch.randn(kv, device="cuda", dtype=dtype)
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    tables = perm.view(batch, blocks_per_seq).contiguous()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, tables, lens


def bench_device(iters: int, peak: float | None) -> list[Row]:
    from gpu.attention.cuda_backend import CudaAttentionBackend

    backend = CudaAttentionBackend()
    rows: list[Row] = []

    def add(kernel, model, batch, context, dtype, us, nbytes):
        gbps = nbytes / (us * 1e-6) / 1e9
        frac = gbps / peak if peak else None
        rows.append(Row(kernel, model, batch, context, str(dtype).split(".")[-1], us, gbps, frac))

    for dtype in (torch.bfloat16, torch.float16):
        esize = torch.tensor([], dtype=dtype).element_size()
        for shape in MODELS:
            kv_row = shape.num_kv_heads * shape.head_dim
            for batch, context in ((1, 1024), (16, 1024), (64, 2048)):
                k, v, tables, lens = make_cache(shape, batch, context, dtype)
                q = torch.randn(batch, shape.num_heads, shape.head_dim, device="cuda", dtype=dtype)
                scale = shape.head_dim**-0.5
                us = time_us(lambda: backend.decode(q, k, v, tables, lens, context, scale), iters)  # noqa: B023
                nbytes = 2 * batch * context * kv_row * esize + 2 * q.numel() * esize
                add("paged_decode", shape.name, batch, context, dtype, us, nbytes)

            # prefill: 4 fresh prompts of 512 tokens
            batch, context = 4, 512
            k, v, tables, lens = make_cache(shape, batch, context, dtype)
            q = torch.randn(
                batch * context, shape.num_heads, shape.head_dim, device="cuda", dtype=dtype
            )
            starts = torch.arange(0, batch * context + 1, context, dtype=torch.int32, device="cuda")
            us = time_us(
                lambda: backend.prefill(q, k, v, starts, lens, tables, context, context, scale),  # noqa: B023
                iters,
            )
            nbytes = 2 * batch * context * kv_row * esize + 2 * q.numel() * esize  # compulsory
            add("paged_prefill", shape.name, batch, context, dtype, us, nbytes)

            # write_kv: one step of 512 new tokens
            tokens = 512
            key = torch.randn(
                tokens, shape.num_kv_heads, shape.head_dim, device="cuda", dtype=dtype
            )
            slots = torch.randperm(k.shape[0] * BLOCK_SIZE, device="cuda")[:tokens]
            us = time_us(lambda: backend.write_kv(key, key, k, v, slots), iters)  # noqa: B023
            add("write_kv", shape.name, tokens, 0, dtype, us, 4 * tokens * kv_row * esize)

            # copy_blocks: 32 blocks, every layer's K and V
            caches = [torch.randn_like(k) for _ in range(2 * shape.num_layers)]
            src = torch.arange(0, 32, device="cuda")
            dst = torch.arange(32, 64, device="cuda")
            us = time_us(lambda: backend.copy_blocks(caches, src, dst), iters)  # noqa: B023
            block_bytes = k[0].numel() * esize
            add("copy_blocks", shape.name, 32, 0, dtype, us, 2 * 32 * len(caches) * block_bytes)
    return rows


@dataclass
class CpuRow:
    kernel: str
    model: str
    case: str
    dtype: str
    torch_us: float
    native_us: float
    speedup: float  # torch_us / native_us
    torch_gflops: float | None  # prefill only: causal attention FLOPs / time
    native_gflops: float | None
    # the kernel "auto" ran: decode avx512, avx2 or portable; prefill avx512, avx2 or
    # none (the torch path)
    native_kernel: str | None = None
    kernels_us: dict[str, float] | None = None  # every kernel of this op built here, timed by name


def _best_us(fn, iters: int) -> float:
    import time

    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e6


def _cpu_paged(shape: AttnShape, context_lens: list[int], dtype: torch.dtype, gen: torch.Generator):
    """A shuffled paged cache holding `context_lens` tokens per sequence."""
    per_seq = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(per_seq)
    kv = (num_blocks, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(kv, generator=gen).to(dtype)
    v_cache = torch.randn(kv, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width, rows, i = max(per_seq), [], 0
    for n in per_seq:
        rows.append(perm[i : i + n] + [0] * (width - n))
        i += n
    tables = torch.tensor(rows, dtype=torch.int32)
    return k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32)


def bench_cpu(iters: int) -> list[CpuRow]:
    from gpu.attention.cpu_native import (
        CpuNativeAttentionBackend,
        auto_torch_prefill_min_flops,
        cpu_has_amx,
        cpu_native_available,
        decode_kernel_for,
        decode_kernels,
        prefill_kernel_for,
        prefill_kernels,
    )
    from gpu.attention.torch_backend import TorchAttentionBackend

    if not cpu_native_available():
        raise SystemExit("the CPU kernels did not build here: nothing to compare")
    native, ref = CpuNativeAttentionBackend(), TorchAttentionBackend()

    def auto_label(head_dim: int, dtype: torch.dtype) -> str:
        """What "auto" prefill runs: the kernel, or (bf16 on AMX) the kernel below a
        per-sequence FLOP count and the torch path above it."""
        kernel = prefill_kernel_for(head_dim)
        split = auto_torch_prefill_min_flops(dtype, cpu_has_amx())
        return kernel if split == float("inf") or kernel == "none" else f"{kernel}/torch >= {split / 1e6:g} MFLOP"

    gen = torch.Generator().manual_seed(0)
    rows: list[CpuRow] = []
    decode_cases = {"SmolLM2-135M": ((16, 512), (64, 512), (64, 1536)), "Llama-7B-size": ((16, 512),)}
    # prefill: (query lens, context lens) — fresh prompts, and a chunk after cached positions
    prefill_cases = {"4 fresh x 272": ([272] * 4, [272] * 4), "1 chunk 324 after 700": ([324], [1024])}
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).split(".")[-1]
        for shape in MODELS:
            scale = shape.head_dim**-0.5
            for batch, context in decode_cases[shape.name]:
                k, v, tables, lens = _cpu_paged(shape, [context] * batch, dtype, gen)
                q = torch.randn(batch, shape.num_heads, shape.head_dim, generator=gen).to(dtype)
                t_ref = _best_us(lambda: ref.decode(q, k, v, tables, lens, context, scale), iters)  # noqa: B023
                t_nat = _best_us(lambda: native.decode(q, k, v, tables, lens, context, scale), iters)  # noqa: B023
                by_kernel = {}
                for name in decode_kernels():
                    if name == "avx512" and shape.head_dim not in (64, 128):
                        continue
                    one = CpuNativeAttentionBackend(decode_kernel=name)
                    by_kernel[name] = _best_us(lambda: one.decode(q, k, v, tables, lens, context, scale), iters)  # noqa: B023
                rows.append(CpuRow("paged_decode", shape.name, f"batch {batch} ctx {context}", dname,
                                   t_ref, t_nat, t_ref / t_nat, None, None,
                                   decode_kernel_for(shape.head_dim), by_kernel))
            for name, (qlens, clens) in prefill_cases.items():
                k, v, tables, lens = _cpu_paged(shape, clens, dtype, gen)
                q = torch.randn(sum(qlens), shape.num_heads, shape.head_dim, generator=gen).to(dtype)
                starts = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
                args = (q, k, v, starts, lens, tables, max(qlens), max(clens), scale)
                t_ref = _best_us(lambda: ref.prefill(*args), iters)  # noqa: B023
                t_nat = _best_us(lambda: native.prefill(*args), iters)  # noqa: B023
                by_kernel = {}
                for kname in prefill_kernels():
                    if kname == "avx512" and shape.head_dim not in (64, 128):
                        continue
                    one = CpuNativeAttentionBackend(prefill_kernel=kname)
                    by_kernel[kname] = _best_us(lambda: one.prefill(*args), iters)  # noqa: B023
                # QK^T and PV over the causal part: 4 · heads · hd per (query, visible key)
                flops = sum(4 * shape.num_heads * shape.head_dim * (c - (n - 1) / 2) * n
                            for n, c in zip(qlens, clens, strict=True))
                rows.append(CpuRow("paged_prefill", shape.name, name, dname, t_ref, t_nat, t_ref / t_nat,
                                   flops / t_ref / 1e3, flops / t_nat / 1e3,
                                   auto_label(shape.head_dim, dtype), by_kernel))
    return rows


def print_cpu_table(rows: list[CpuRow]) -> None:
    print(f"CPU kernels vs the torch backend ({torch.get_num_threads()} threads)")
    print(f"{'kernel':<14}{'model':<15}{'case':<24}{'dtype':>9}{'torch us':>11}{'native us':>11}"
          f"{'speedup':>9}{'GF/s t':>8}{'GF/s n':>8}")
    for r in rows:
        gf = (f"{r.torch_gflops:>8.0f}{r.native_gflops:>8.0f}" if r.native_gflops is not None
              else f"{'-':>8}{'-':>8}")
        print(f"{r.kernel:<14}{r.model:<15}{r.case:<24}{r.dtype:>9}{r.torch_us:>11.0f}{r.native_us:>11.0f}"
              f"{r.speedup:>8.2f}x{gf}")
    for op, baseline in (("paged_decode", "the portable loop"), ("paged_prefill", "the torch backend")):
        timed = [r for r in rows if r.kernel == op and r.kernels_us]
        if not timed:
            continue
        names = list(dict.fromkeys(n for r in timed for n in r.kernels_us))
        print(f"\nCPU {op.removeprefix('paged_')} kernels, us per call (native above = {timed[0].native_kernel}; "
              f"x = {baseline}'s time / the kernel's)")
        print(f"{'model':<15}{'case':<24}{'dtype':>9}" + "".join(f"{n:>16}" for n in names))
        for r in timed:
            base = r.kernels_us.get("portable") if op == "paged_decode" else r.torch_us
            cells = "".join(f"{r.kernels_us[n]:>9.0f} {base / r.kernels_us[n]:>5.2f}x" if n in r.kernels_us and base
                            else f"{'-':>16}" for n in names)
            print(f"{r.model:<15}{r.case:<24}{r.dtype:>9}{cells}")


def compile_only() -> dict:
    """What can be checked without a device: every kernel instance compiles."""
    instances = build.all_attention_instances()
    report: dict = {"device": None, "instances": len(instances), "compiled": {}}
    if build.nvcc_path():
        with tempfile.TemporaryDirectory() as tmp:
            for arch in ("sm_80", "sm_90"):
                build.nvcc_compile(arch, instances, Path(tmp))
                report["compiled"][f"nvcc {arch}"] = "ok"
    else:
        report["compiled"]["nvcc"] = "not installed"
    try:
        build.nvrtc_compile(build.name_expressions(instances))
        report["compiled"]["nvrtc compute_80"] = "ok"
    except (ImportError, OSError) as exc:
        report["compiled"]["nvrtc"] = f"not available ({type(exc).__name__})"
    return report


def print_table(rows: list[Row], models: tuple[AttnShape, ...], peak: float | None) -> None:
    print(f"peak DRAM bandwidth: {f'{peak:.0f} GB/s' if peak else 'not reported'}")
    print(
        f"{'kernel':<14}{'model':<15}{'batch':>6}{'ctx':>6}{'dtype':>9}{'us':>10}{'GB/s':>9}{'peak':>7}"
    )
    for r in rows:
        frac = f"{r.frac_of_peak:.0%}" if r.frac_of_peak is not None else "-"
        print(
            f"{r.kernel:<14}{r.model:<15}{r.batch:>6}{r.context:>6}{r.dtype:>9}"
            f"{r.time_us:>10.1f}{r.gbytes_per_s:>9.0f}{frac:>7}"
        )
    print(
        "\ndecode-step MBU, attention part (KV bytes of all layers / (layers x decode time) / peak):"
    )
    for r in rows:
        if r.kernel == "paged_decode" and r.frac_of_peak is not None:
            layers = next(m.num_layers for m in models if m.name == r.model)
            print(
                f"  {r.model:<15} batch {r.batch:>3} ctx {r.context:>5} {r.dtype:>9}: "
                f"{r.frac_of_peak:.0%} ({layers} layers x {r.time_us:.1f} us = {layers * r.time_us / 1e3:.2f} ms)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=bench_prog("ops.bench_kernels"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=output_file, help="also write the results here")
    parser.add_argument("--iters", type=positive_int, default=50)
    parser.add_argument("--peak-gbps", type=float, help="override the device's peak bandwidth")
    parser.add_argument("--cpu", action="store_true",
                        help="compare the CPU kernels with the torch backend instead (no device needed)")
    args = parser.parse_args(argv)

    if args.cpu:
        cpu_rows = bench_cpu(args.iters)
        print_cpu_table(cpu_rows)
        if args.json:
            payload = {"threads": torch.get_num_threads(), "rows": [asdict(r) for r in cpu_rows]}
            args.json.write_text(json.dumps(payload, indent=2))
        return 0

    from gpu.attention.cuda_backend import cuda_backend_available

    if not cuda_backend_available():
        report = compile_only()
        print("No CUDA device (or CuPy missing): nothing measured, no numbers reported.")
        print(f"Compiled {report['instances']} attention template instances:")
        for what, status in report["compiled"].items():
            print(f"  {what}: {status}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0

    import cupy

    device = cupy.cuda.Device().id
    peak = args.peak_gbps or peak_bandwidth_gbps(device)
    rows = bench_device(args.iters, peak)
    print(f"device: {torch.cuda.get_device_name(device)}")
    print_table(rows, MODELS, peak)
    if args.json:
        payload = {
            "device": torch.cuda.get_device_name(device),
            "peak_gbps": peak,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
