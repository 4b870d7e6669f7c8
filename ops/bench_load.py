"""Checkpoint loading benchmark: the loading-optimized format (`gpu.fastload`) against
safetensors and the bundled GGUF, from a cold and a warm page cache.

    python -m ops.bench_load [--dtype bfloat16] [--repeats 5] [--threads 4] [--dir DIR] [--json PATH]

The bundled model is converted once into a safetensors folder and an lmg folder (in
`--dir`, default a temporary folder on the same disk as the data directory would be).
Each repeat then loads, in a rotated order, through `gpu.loader.load_checkpoint`:

- `gguf`: the bundled Q4_1 GGUF, dequantized (what `lmgate serve` does by default);
- `safetensors`: the converted HF folder (safetensors' `load_file`: a header parsed, each
  tensor built from its memory map);
- `lmg`: the lmg folder, memory-mapped with read-ahead of the whole file (the default);
- `lmg-read`: the lmg folder read by `--threads` parallel readers into one buffer (the
  disk → memory stage a device pipeline builds on).

"cold" loads first drop the files from the page cache (`posix_fadvise(DONTNEED)`, which
needs no privileges), so they read from the disk; "warm" loads follow a load of the same
files. Every mode ends with every tensor resident in memory in `--dtype`.

Reported: median seconds per mode and cache state, the ratios `lmg_vs_safetensors`,
`lmg_vs_gguf` and `read_vs_mmap` (lower is better for the first), and the share of a
whole engine start (`Engine(...)`: load, weight packing, KV cache) that loading takes per
source. Every load ends with each tensor's pages touched, so lazily mapped ones count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ops.cli import bench_prog, output_file, positive_int

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def drop_from_page_cache(path: Path) -> None:
    """Evict `path` (a file, or every file of a folder) from the page cache."""
    files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_load(source: Path, dtype: torch.dtype, threads: int) -> float:
    from gpu.loader import is_lmg_folder, load_checkpoint, load_lmg_folder

    t0 = time.perf_counter()
    if is_lmg_folder(source):
        ckpt = load_lmg_folder(source, dtype, mode="read" if threads else "mmap", threads=max(1, threads))
    else:
        ckpt = load_checkpoint(str(source), dtype)
    for t in ckpt.state_dict.values():  # resident: touch one byte per page of every tensor
        if t.numel():
            t.view(-1)[:: max(1, 4096 // t.element_size())].sum()
    return time.perf_counter() - t0


def timed_engine_start(source: Path, dtype: str) -> float:
    from gpu.config import CacheConfig, EngineConfig
    from gpu.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(EngineConfig(model=str(source), dtype=dtype, cache=CacheConfig(cache_bytes=64 * 1024**2)))
    wall = time.perf_counter() - t0
    del engine
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_load"), description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="(default %(default)s)")
    ap.add_argument("--repeats", type=positive_int, default=5, help="rounds of every mode, order rotated (default %(default)s)")
    ap.add_argument("--threads", type=int, default=4, help="lmg readers (default %(default)s)")
    ap.add_argument("--dir", help="where to write the converted folders, in a temporary folder made and removed "
                                  "there (made if missing; default: the system's temporary folder)")
    ap.add_argument("--no-engine", action="store_true", help="skip the whole-engine start timings")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the report as JSON")
    args = ap.parse_args(argv)
    if args.dir is not None and Path(args.dir).exists() and not Path(args.dir).is_dir():
        ap.error(f"--dir {args.dir}: not a folder")
    torch.set_num_threads(2)

    from gpu.convert import convert_checkpoint
    from gpu.loader import bundled_gguf_path

    dtype = DTYPES[args.dtype]
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        sources = {
            "gguf": bundled_gguf_path(),
            "safetensors": convert_checkpoint("smollm2", root / "hf", dtype=args.dtype, progress=False),
            "lmg": convert_checkpoint("smollm2", root / "lmg", dtype=args.dtype, progress=False, fmt="lmg"),
        }
        sources["lmg-read"] = sources["lmg"]
        threads = {"lmg-read": args.threads}
        modes = list(sources)
        sizes = {m: sum(p.stat().st_size for p in ([s] if s.is_file() else s.iterdir()))
                 for m, s in sources.items()}
        times: dict[str, dict[str, list[float]]] = {"cold": {m: [] for m in modes}, "warm": {m: [] for m in modes}}
        timed_load(sources["lmg"], dtype, 0)  # warm-up: imports, allocator
        for r in range(args.repeats):
            for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
                drop_from_page_cache(sources[mode])
                times["cold"][mode].append(timed_load(sources[mode], dtype, threads.get(mode, 0)))
                times["warm"][mode].append(timed_load(sources[mode], dtype, threads.get(mode, 0)))
                print(f"repeat {r + 1}/{args.repeats} {mode:12s} cold {times['cold'][mode][-1]:6.3f} s  "
                      f"warm {times['warm'][mode][-1]:6.3f} s", file=sys.stderr)
        engine_s = {}
        if not args.no_engine:
            for mode in ("gguf", "safetensors", "lmg"):
                drop_from_page_cache(sources[mode])
                engine_s[mode] = timed_engine_start(sources[mode], args.dtype)

    med = {state: {m: statistics.median(v) for m, v in per.items()} for state, per in times.items()}
    report = {
        "config": {"dtype": args.dtype, "repeats": args.repeats, "threads": args.threads},
        "bytes": sizes,
        "median_s": med,
        "times_s": times,
        "lmg_vs_safetensors": {s: med[s]["lmg"] / med[s]["safetensors"] for s in med},
        "lmg_vs_gguf": {s: med[s]["lmg"] / med[s]["gguf"] for s in med},
        "read_vs_mmap": {s: med[s]["lmg-read"] / med[s]["lmg"] for s in med},
        "engine_start_s": engine_s,
        "load_share_of_engine_start": {m: med["cold"][m] / engine_s[m] for m in engine_s},
    }
    print(f"checkpoint loading, {args.dtype}, {args.repeats} repeats, lmg-read with {args.threads} readers")
    print(f"{'mode':12s} {'MB':>7s} {'cold s':>8s} {'warm s':>8s}")
    for m in modes:
        print(f"{m:12s} {sizes[m] / 1e6:7.1f} {med['cold'][m]:8.3f} {med['warm'][m]:8.3f}")
    for key in ("lmg_vs_safetensors", "lmg_vs_gguf", "read_vs_mmap"):
        print(f"{key:22s} cold {report[key]['cold']:.3f}  warm {report[key]['warm']:.3f}")
    for m, s in engine_s.items():
        print(f"engine start from {m:12s} {s:6.2f} s (loading: {report['load_share_of_engine_start'][m]:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
