"""Batch invariance: does a request's output depend on the load, and what does `--batch-invariant` cost?

    python -m ops.bench_invariance [--dtype auto] [--quantization none] [--prompts 64] [--solo 16]
                                   [--new-tokens 128] [--json PATH]

On the workload fixture's held-out prompts (chat-rendered, as served), greedy, EOS on (so
lengths are the model's own, what a length predictor must call), for the default engine
and the batch-invariant one (`EngineConfig.batch_invariant`), in the same process:

1. Reproducibility. The first `--solo` prompts, each run alone, are the reference. The same
   prompts then run among all `--prompts` of them: (a) at once (up to 64 sequences a step),
   (b) with a 64-token step budget (chunked prefill, 1-token chunks and prefix hits),
   (c) on a cache that holds about a quarter of them (preemption and recompute). Reported:
   how many of the watched outputs are token-identical to the reference, and how many
   have its length.
2. Speed. All prompts at once, `--repeats` pairs in ABBA order (default, invariant,
   invariant, default, ...): generated tokens per second and the ratio invariant ÷ default.

A near-tie between the top two tokens flips with the last bit of a logit, so an engine
whose kernels pick their blocking by the batch's row count (oneDNN's bf16 GEMMs on an AMX
CPU do, from 33 rows) gives the same request different tokens under different loads.
Runs in ~4 minutes on 2 cores with the defaults. `--quantization int8` runs both engines
with int8 projections (each engine loads and calibrates its own model: int8 rewrites it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from gpu.config import CacheConfig, EngineConfig, SchedulerConfig
from gpu.engine import Engine, generate, resolve_dtype
from gpu.loader import load_checkpoint
from gpu.sampling import SamplingParams
from gpu.tokenizer import load_tokenizer
from ops.cli import bench_prog, output_file, positive_int
from ops.workload.fixture import load_fixture

SCENARIOS = ("batched", "chunked", "preempted")


def agreement(reference: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> dict:
    """How many of `outputs` equal their reference token for token, and how many have its length."""
    pairs = list(zip(reference, outputs, strict=True))
    return {"identical": sum(list(a) == list(b) for a, b in pairs),
            "same_length": sum(len(a) == len(b) for a, b in pairs), "of": len(pairs)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_invariance"), description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto", help="engine dtype (default auto: bf16 where the CPU has it)")
    ap.add_argument("--prompts", type=positive_int, default=64, help="held-out fixture prompts run together (default 64)")
    ap.add_argument("--solo", type=positive_int, default=16, help="of them, how many are run alone and watched (default 16)")
    ap.add_argument("--new-tokens", type=positive_int, default=128, help="max tokens per prompt, EOS on (default 128)")
    ap.add_argument("--repeats", type=positive_int, default=2, help="ABBA pairs of timed runs (default 2)")
    ap.add_argument("--max-num-seqs", type=positive_int, default=64,
                    help="running-sequences cap (default 64; the GEMM tiles cost more past 32 rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantization", choices=("none", "int8"), default="none",
                    help="both engines' projections (default none; int8: gpu/quantization.py)")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the report as JSON")
    args = ap.parse_args(argv)
    if not 1 <= args.solo <= args.prompts or min(args.new_tokens, args.repeats, args.max_num_seqs) < 1:
        ap.error("need 1 <= --solo <= --prompts, and --new-tokens, --repeats, --max-num-seqs >= 1")
    dtype = resolve_dtype(args.dtype, "cpu")
    fixture = load_fixture()
    rows = fixture[len(fixture) // 2:][: args.prompts]
    ckpt = load_checkpoint("smollm2", dtype)
    tokenizer = load_tokenizer(ckpt)
    prompts = [tokenizer.render_and_encode(list(r.messages)) for r in rows]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    per_block = CacheConfig().bytes_per_block(ckpt.config, dtype_bytes)
    quarter = sum((len(p) + args.new_tokens) // CacheConfig().block_size + 1 for p in prompts) // 4

    def engine(invariant: bool, **kw) -> Engine:
        cache = kw.pop("cache", CacheConfig(cache_bytes=256 * 1024**2))
        cfg = EngineConfig(dtype=args.dtype, num_threads=args.threads, batch_invariant=invariant, cache=cache,
                           quantization=args.quantization,
                           scheduler=replace(SchedulerConfig(), max_num_seqs=args.max_num_seqs, **kw))
        if args.quantization != "none":  # (quantizing folds factors into the weights it is given)
            return Engine(cfg, tokenizer=tokenizer)
        return Engine(cfg, checkpoint=ckpt, tokenizer=tokenizer)

    def run(eng: Engine, batch: Sequence[Sequence[int]]) -> list[list[int]]:
        return [list(o[0].token_ids) for o in generate(eng, batch, params)]

    modes = {"default": False, "batch_invariant": True}
    report: dict = {"dtype": str(dtype).removeprefix("torch."), "quantization": args.quantization,
                    "prompts": len(prompts), "solo": args.solo,
                    "new_tokens": args.new_tokens, "threads": args.threads, "max_num_seqs": args.max_num_seqs,
                    "modes": {}}
    timed: dict[str, Engine] = {}
    for name, invariant in modes.items():
        solo_engine = engine(invariant)
        reference = [run(solo_engine, [p])[0] for p in prompts[: args.solo]]
        del solo_engine
        res: dict = {}
        for scenario in SCENARIOS:
            if scenario == "batched":
                eng = timed[name] = engine(invariant)
            elif scenario == "chunked":
                eng = engine(invariant, max_num_batched_tokens=64)
            else:
                eng = engine(invariant, cache=CacheConfig(cache_bytes=per_block * quarter, enable_prefix_caching=False))
            outs = run(eng, prompts)
            res[scenario] = agreement(reference, outs[: args.solo])
            if scenario == "preempted":
                res[scenario]["preemptions"] = eng.counters["preemptions"]
        report["modes"][name] = res
        print(f"{name}: " + ", ".join(f"{s} {r['identical']}/{r['of']} identical ({r['same_length']} same length)"
                                      for s, r in res.items()), file=sys.stderr)

    seconds: dict[str, list[float]] = {name: [] for name in modes}
    tokens: dict[str, list[int]] = {name: [] for name in modes}
    pairs = [("default", "batch_invariant"), ("batch_invariant", "default")]
    for name in [n for k in range(args.repeats) for n in pairs[k % 2]]:
        t0 = time.perf_counter()
        outs = run(timed[name], prompts)
        seconds[name].append(time.perf_counter() - t0)
        tokens[name].append(sum(map(len, outs)))
    for name in modes:
        report["modes"][name]["tokens_per_s"] = [t / s for t, s in zip(tokens[name], seconds[name], strict=True)]
        report["modes"][name]["seconds"] = seconds[name]
    tps = {name: sum(report["modes"][name]["tokens_per_s"]) / len(seconds[name]) for name in modes}
    report["invariant_vs_default_tokens_per_s"] = tps["batch_invariant"] / tps["default"]

    quantized = "" if args.quantization == "none" else f" + {args.quantization}"
    print(f"\nbatch invariance, {len(prompts)} held-out prompts ({args.solo} watched), {report['dtype']}{quantized}, "
          f"{args.new_tokens} max tokens, EOS on, up to {args.max_num_seqs} sequences a step")
    print(f"| engine | {' | '.join(SCENARIOS)} | tokens/s |")
    print("| --- |" + " --- |" * (len(SCENARIOS) + 1))
    for name in modes:
        r = report["modes"][name]
        cells = [f"{r[s]['identical']}/{r[s]['of']} identical, {r[s]['same_length']} same length" for s in SCENARIOS]
        print(f"| {name} | {' | '.join(cells)} | {', '.join(f'{x:.1f}' for x in r['tokens_per_s'])} |")
    print(f"batch-invariant ÷ default tokens/s: {report['invariant_vs_default_tokens_per_s']:.3f} "
          f"(ABBA, {args.repeats} pair(s); preemptions: "
          f"{report['modes']['default']['preempted']['preemptions']} / "
          f"{report['modes']['batch_invariant']['preempted']['preemptions']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
