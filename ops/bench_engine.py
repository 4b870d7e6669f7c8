"""Engine benchmark: lmgate's continuous batching vs Hugging Face static batching, and MBU.

    python -m ops.bench_engine [--quick] [--json PATH]

Workload (the Anyscale continuous-batching setup, scaled to this model):
N requests arriving at once, prompt lengths uniform in [32, 512] tokens, output
lengths exponential with mean 128 capped at 512, EOS ignored. Prompts are random
token ids (the same for both systems).

Baseline, in the same run, same dtype and threads: transformers `generate` with
static first-come-first-served batches of 8 and of 32 — left-padded, each batch
runs until its longest request is done (how TF-Serving/Triton-style static
batching serves). Only the tokens each request asked for count as output.

MBU (model bandwidth utilization, Databricks' definition) at batch 1:
bytes read per decode step (every weight matrix once, incl. the tied LM head,
plus the KV cache of the context) / TPOT, divided by the DRAM bandwidth measured
in the same run with a STREAM-like copy on the same threads.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from ops.cli import bench_prog, output_file, positive_int


@dataclass(frozen=True)
class Workload:
    num_requests: int = 200
    prompt_min: int = 32
    prompt_max: int = 512
    output_mean: float = 128.0
    output_cap: int = 512
    seed: int = 0

    def sample(self, vocab: int) -> tuple[list[list[int]], list[int]]:
        rng = np.random.default_rng(self.seed)
        plens = rng.integers(self.prompt_min, self.prompt_max + 1, self.num_requests)
        olens = np.minimum(np.maximum(1, rng.exponential(self.output_mean, self.num_requests).round()),
                           self.output_cap).astype(int)
        # avoid special tokens (ids < 100 in SmolLM2's vocab hold the control tokens)
        prompts = [rng.integers(100, vocab, int(n)).tolist() for n in plens]
        return prompts, olens.tolist()


QUICK = Workload(num_requests=48, prompt_min=32, prompt_max=256, output_mean=64.0, output_cap=128)


def stream_copy_bandwidth(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (read + write bytes counted), best of `repeats`."""
    torch.set_num_threads(threads)
    n = mb * 1024**2 // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read by one decode step: every parameter except the embedding lookup table,
    which is read once more as the (tied) LM head — so count it once either way."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_engine(engine, prompts, olens) -> dict:
    from gpu.sampling import SamplingParams

    t0 = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, olens, strict=True)):
        engine.add_request(f"b{i}", p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    produced = 0
    while engine.has_unfinished():
        produced += len(engine.step())
    dt = time.perf_counter() - t0
    return {"tokens": produced, "seconds": dt, "tok_s": produced / dt}


def run_hf(model, prompts, olens, batch_size: int, pad_id: int) -> dict:
    """Static FCFS batches: pad left, run each batch to its longest request."""
    useful = 0
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        ps, ns = prompts[s : s + batch_size], olens[s : s + batch_size]
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ps), width), dtype=torch.long)
        for i, p in enumerate(ps):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        steps = max(ns)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=pad_id, eos_token_id=None)
        useful += sum(ns)
    dt = time.perf_counter() - t0
    return {"batch_size": batch_size, "tokens": useful, "seconds": dt, "tok_s": useful / dt}


def measure_tpot_b1(engine, prompt: list[int], n: int) -> float:
    """Mean seconds per output token after the first, one request alone."""
    from gpu.sampling import SamplingParams

    engine.add_request("tpot", prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        if engine.step():
            times.append(time.perf_counter())
    return (times[-1] - times[0]) / (len(times) - 1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_engine"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="scaled-down workload (48 requests, < 3 min)")
    ap.add_argument("--requests", type=positive_int, help="override the number of requests")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                    help="engine and baseline dtype (default: auto)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (both systems)")
    ap.add_argument("--hf-batch-sizes", default="8,32", help="static batch sizes of the baseline")
    ap.add_argument("--skip-hf", action="store_true", help="engine figures only")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args(argv)

    from gpu.config import CacheConfig, EngineConfig, SchedulerConfig
    from gpu.engine import Engine, resolve_dtype
    from gpu.loader import load_checkpoint

    torch.set_num_threads(args.threads)
    wl = QUICK if args.quick else Workload()
    if args.requests:
        wl = Workload(**{**wl.__dict__, "num_requests": args.requests})
    dtype = resolve_dtype(args.dtype, "cpu")
    ckpt = load_checkpoint("smollm2", dtype)
    prompts, olens = wl.sample(ckpt.config.vocab_size)
    print(f"workload: {wl.num_requests} requests, prompts {wl.prompt_min}-{wl.prompt_max}, outputs "
          f"exp(mean {wl.output_mean:g}) cap {wl.output_cap} (total {sum(olens)} output tokens); "
          f"dtype {dtype}, {args.threads} threads", flush=True)

    bw = stream_copy_bandwidth(args.threads)
    cfg = EngineConfig(dtype=args.dtype, num_threads=args.threads,
                       cache=CacheConfig(cache_bytes=1536 * 1024**2),
                       scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=1024))
    engine = Engine(cfg, checkpoint=ckpt)
    tpot = measure_tpot_b1(engine, prompts[0][:256], 64)
    ctx = 256 + 32  # mean context over the measured decode steps
    kv_bytes = 2 * ckpt.config.num_layers * ctx * ckpt.config.kv_size * torch.tensor([], dtype=dtype).element_size()
    bytes_per_step = weight_bytes(engine.runner.model) + kv_bytes
    mbu = bytes_per_step / tpot / 1e9 / bw
    print(f"memory bandwidth (copy): {bw:.1f} GB/s; batch-1 TPOT {tpot * 1e3:.2f} ms; "
          f"{bytes_per_step / 1e6:.0f} MB/step → MBU {mbu:.2f}", flush=True)

    eng = run_engine(engine, prompts, olens)
    rss = peak_rss_mb()
    print(f"lmgate engine: {eng['tokens']} tokens in {eng['seconds']:.1f}s = {eng['tok_s']:.1f} tok/s "
          f"(peak RSS {rss:.0f} MB)", flush=True)
    del engine

    hf_runs = []
    if not args.skip_hf:
        from ops.hf_reference import load_model

        hf = load_model(dtype)
        for bs in [int(x) for x in args.hf_batch_sizes.split(",")]:
            r = run_hf(hf, prompts, olens, bs, pad_id=0)
            hf_runs.append(r)
            print(f"transformers static batch {bs}: {r['tok_s']:.1f} tok/s ({r['seconds']:.1f}s)", flush=True)
    hf_best = max((r["tok_s"] for r in hf_runs), default=float("nan"))
    figures = {
        "engine_tok_s": eng["tok_s"],
        "hf_tok_s": hf_best,
        "speedup": eng["tok_s"] / hf_best if hf_runs else None,
        "tpot_b1_ms": tpot * 1e3,
        "mbu_b1": mbu,
        "mem_bw_gb_s": bw,
        "peak_rss_mb": rss,
        "hf_runs": hf_runs,
        "workload": wl.__dict__,
        "dtype": str(dtype),
        "threads": args.threads,
    }
    print()
    print(f"{'metric':<16}{'value':>12}   target")
    print(f"{'engine_tok_s':<16}{figures['engine_tok_s']:>12.1f}")
    print(f"{'hf_tok_s':<16}{figures['hf_tok_s']:>12.1f}   (best of batch {args.hf_batch_sizes})")
    if figures["speedup"] is not None:
        print(f"{'speedup':<16}{figures['speedup']:>12.2f}   >= 5")
    print(f"{'tpot_b1_ms':<16}{figures['tpot_b1_ms']:>12.2f}")
    print(f"{'mbu_b1':<16}{figures['mbu_b1']:>12.2f}   >= 0.6")
    print(f"{'mem_bw_gb_s':<16}{figures['mem_bw_gb_s']:>12.1f}")
    print(f"{'peak_rss_mb':<16}{figures['peak_rss_mb']:>12.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
