"""The KV cache on 2 MiB pages against 4 KiB pages: the evidence behind `CacheConfig.huge_pages`.

    python -m ops.bench_kv_pages [--requests 200] [--passes 3] [--dtype auto] [--json PATH]

Each engine (the serving defaults: 128 sequences on 1.5 GiB) generates the workload
fixture's held-out requests, all at once, greedy, to their own EOS or the fixture's
cap, `--passes` times in one process with the prefix cache dropped in between. Pass 0
runs on a fresh block pool (free blocks handed out in address order); later passes run
on the order the earlier ones freed them in, which is what a long-running server has:
block tables spread over the whole cache. Engines alternate huge pages on/off in ABBA
order (a fresh engine for each), and the report gives output tokens per second per
setting and pass, and the ratios on ÷ off — the machine is shared, so only ratios within
a run mean anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

from gpu.config import CacheConfig, EngineConfig
from gpu.engine import Engine, generate
from gpu.model import huge_page_bytes
from gpu.sampling import SamplingParams
from ops.bench_sched import fixture_max_tokens
from ops.cli import bench_prog, output_file, positive_int
from ops.workload.fixture import load_fixture

ORDER = (True, False, False, True)  # huge pages on / off, ABBA


def run_engine(huge_pages: bool, rows, *, dtype: str, threads: int, passes: int, max_tokens: int) -> dict:
    """One fresh engine: `passes` timed generations of every row; tok/s and req/s per pass."""
    engine = Engine(EngineConfig(dtype=dtype, num_threads=threads, cache=CacheConfig(huge_pages=huge_pages)))
    k0 = engine.runner.kv_caches[0][0]  # a view of the one allocation that holds every layer's K and V
    huge = huge_page_bytes(torch.empty(0, dtype=k0.dtype).set_(k0.untyped_storage()))
    prompts = [engine.tokenizer.render_and_encode(list(r.messages)) for r in rows]
    generate(engine, prompts[:4], SamplingParams(temperature=0.0, max_tokens=8))  # warm the kernels
    out = {"huge_pages": huge_pages, "kv_huge_page_bytes": huge, "passes": []}
    for k in range(passes):
        engine.block_manager.reset_prefix_cache()  # no prefill for free from the earlier pass
        t0 = time.perf_counter()
        outs = generate(engine, prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        dt = time.perf_counter() - t0
        toks = sum(len(o[0].token_ids) for o in outs)
        out["passes"].append({"seconds": dt, "output_tokens": toks, "tok_s": toks / dt, "req_s": len(outs) / dt})
        print(f"huge pages {'on ' if huge_pages else 'off'} pass {k}: {toks / dt:7.1f} tok/s "
              f"({dt:.1f} s, {toks} tokens)", flush=True)
    del engine
    return out


def summarize(runs: Sequence[dict], passes: int) -> dict:
    """Mean tok/s per (setting, pass) over the engines, and on ÷ off per pass."""
    mean = {}
    for flag in (True, False):
        mine = [r for r in runs if r["huge_pages"] is flag]
        mean["on" if flag else "off"] = [sum(r["passes"][k]["tok_s"] for r in mine) / len(mine)
                                         for k in range(passes)]
    return {"mean_tok_s": mean, "ratio_on_off": [a / b for a, b in zip(mean["on"], mean["off"], strict=True)]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_kv_pages"), description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=positive_int, default=200,
                    help="held-out fixture requests per pass (default 200: more than the engine's 128 sequences, "
                         "so blocks churn within a pass too)")
    ap.add_argument("--passes", type=positive_int, default=3,
                    help="generations per engine (default 3: a fresh block pool, then reused ones)")
    ap.add_argument("--max-tokens", type=int, help="output cap (default: the fixture's own, 512)")
    ap.add_argument("--dtype", default="auto", help="engine dtype (default auto, as served)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the report as JSON")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.passes < 1:
        ap.error("--requests and --passes must be >= 1")
    fixture = load_fixture()
    rows = fixture[len(fixture) // 2:][: args.requests]
    max_tokens = args.max_tokens or fixture_max_tokens(fixture)
    runs = [run_engine(flag, rows, dtype=args.dtype, threads=args.threads, passes=args.passes,
                       max_tokens=max_tokens) for flag in ORDER]
    report = {"requests": len(rows), "max_tokens": max_tokens, "dtype": args.dtype, "order": list(ORDER),
              "runs": runs, **summarize(runs, args.passes)}
    for k, r in enumerate(report["ratio_on_off"]):
        print(f"pass {k}: huge pages on {report['mean_tok_s']['on'][k]:.1f} tok/s, off "
              f"{report['mean_tok_s']['off'][k]:.1f} -> on / off {r:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
