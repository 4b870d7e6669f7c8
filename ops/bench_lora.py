"""Multi-LoRA benchmark: many adapters in one continuous batch, against the base model and
against serving one adapter at a time.

    python -m ops.bench_lora [--quick] [--adapters 8] [--rank 8] [--json PATH]

Workload (S-LoRA's shape, scaled to this model): N requests arriving at once, each for one
of K adapters drawn with power-law popularity (adapter i with probability ∝ 1 / i^alpha),
prompt lengths uniform in [32, 256] random tokens, output lengths exponential with mean
64 capped at 128, EOS ignored. The adapters are random rank-r LoRAs on every projection,
written as PEFT folders (what `--lora-modules` serves); their values do not change the
work.

Three ways to serve the same requests, on one engine, in the same run:
- `base`: every request on the base model, all at once — the ceiling (no LoRA work).
- `multi-lora`: every request with its adapter, all at once: lmgate's mixed batches
  (`gpu.lora`).
- `per-adapter`: one adapter at a time, its requests batched together, the most popular
  adapter first — a server that merges one adapter into the weights and serves only its
  requests until it swaps. Run here on the base weights (a merged adapter costs nothing
  per token) and without counting merge or swap time, so it is a lower bound on that
  design's time: the ratios against it are conservative.

Reported per mode: output tokens/s, mean and p99 request latency (all requests arrive at
t=0), and the ratios `multi_vs_base_throughput` (what LoRA costs), `multi_vs_per_adapter
_throughput` and `multi_vs_per_adapter_latency` (mean latency, lower is better). Each
repeat runs the three modes in a rotated order; ratios are medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ops.cli import bench_prog, output_file, positive_int

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class Workload:
    num_requests: int = 96
    num_adapters: int = 8
    alpha: float = 1.0  # popularity power law
    prompt_min: int = 32
    prompt_max: int = 256
    output_mean: float = 64.0
    output_cap: int = 128
    seed: int = 0

    def sample(self, vocab: int) -> list[tuple[list[int], int, int]]:
        """(prompt ids, output tokens, adapter index) per request."""
        rng = np.random.default_rng(self.seed)
        weights = 1.0 / np.arange(1, self.num_adapters + 1) ** self.alpha
        adapters = rng.choice(self.num_adapters, self.num_requests, p=weights / weights.sum())
        plens = rng.integers(self.prompt_min, self.prompt_max + 1, self.num_requests)
        olens = np.clip(rng.exponential(self.output_mean, self.num_requests).round(), 1, self.output_cap)
        # ids >= 100: SmolLM2's control tokens are below
        return [(rng.integers(100, vocab, int(p)).tolist(), int(o), int(a))
                for p, o, a in zip(plens, olens, adapters, strict=True)]


QUICK = Workload(num_requests=48, num_adapters=4, prompt_max=128, output_mean=32.0, output_cap=64)


def write_random_adapter(folder: Path, config, rank: int, seed: int) -> Path:
    """A PEFT LoRA folder with random A and B (B small) on every projection of `config`."""
    g = torch.Generator().manual_seed(seed)
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    tensors = {}
    for layer in range(config.num_layers):
        for module, (fan_in, fan_out) in dims.items():
            key = f"base_model.model.model.layers.{layer}.{MODULES[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(dims), "bias": "none"}))
    return folder


def run_mode(engine, jobs: list[tuple[list[int], int, int]], mode: str) -> dict:
    """Serve `jobs` one way (module docstring); wall time, tokens/s, latencies."""
    from gpu.sampling import SamplingParams

    if mode == "per-adapter":
        popularity = Counter(a for _, _, a in jobs)
        groups = [[j for j in range(len(jobs)) if jobs[j][2] == a] for a, _ in popularity.most_common()]
    else:
        groups = [list(range(len(jobs)))]
    finish: dict[str, float] = {}
    tokens = 0
    t0 = time.perf_counter()
    for group in groups:
        for j in group:
            prompt, out_len, adapter = jobs[j]
            engine.add_request(f"{mode}-{j}", prompt,
                               SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True),
                               adapter=f"adapter-{adapter}" if mode == "multi-lora" else None)
        while engine.has_unfinished():
            for d in engine.step():
                tokens += len(d.token_ids)
                if d.request_finished:
                    finish[d.request_id] = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    lat = sorted(finish.values())
    return {"mode": mode, "wall_s": wall, "output_tokens": tokens, "tok_s": tokens / wall,
            "mean_latency_s": statistics.fmean(lat), "p99_latency_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_lora"), description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="48 requests, 4 adapters, shorter prompts and outputs")
    ap.add_argument("--requests", type=positive_int, help="requests per mode (default 96; --quick 48)")
    ap.add_argument("--adapters", type=positive_int, help="adapters (default 8; --quick 4)")
    ap.add_argument("--rank", type=positive_int, default=8, help="LoRA rank of every adapter (default %(default)s)")
    ap.add_argument("--repeats", type=positive_int, default=3, help="rounds of the three modes, order rotated (default %(default)s)")
    ap.add_argument("--dtype", default="auto", help="engine dtype (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the report as JSON")
    args = ap.parse_args(argv)

    from dataclasses import replace

    from gpu.config import EngineConfig, LoraConfig, SchedulerConfig
    from gpu.engine import Engine
    from gpu.loader import load_checkpoint

    work = QUICK if args.quick else Workload()
    work = replace(work, **{k: v for k, v in (("num_requests", args.requests), ("num_adapters", args.adapters))
                            if v is not None})
    if work.num_requests < 1 or work.num_adapters < 1 or args.rank < 1 or args.repeats < 1:
        ap.error("--requests, --adapters, --rank and --repeats must be positive")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lmgate-lora-") as tmp:
        config = load_checkpoint("smollm2", torch.float32).config
        modules = tuple((f"adapter-{k}", str(write_random_adapter(Path(tmp) / f"adapter-{k}", config, args.rank, k)))
                        for k in range(work.num_adapters))
        engine = Engine(EngineConfig(
            dtype=args.dtype, num_threads=args.threads,
            scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=512),
            lora=LoraConfig(modules=modules, max_loras=work.num_adapters, max_rank=args.rank)))
        jobs = work.sample(engine.model_config.vocab_size)
        # warm-up: every adapter loaded, and a third of the workload through each mode, so the
        # first measured mode does not pay for first calls, first-touched KV pages and GEMM
        # primitives of new shapes (unwarmed, the first mode measured ran at half its speed)
        for a in range(work.num_adapters):
            engine.lora.get(f"adapter-{a}")
        for mode in ("base", "multi-lora"):
            run_mode(engine, jobs[: max(1, len(jobs) // 3)], mode)
        modes = ["base", "multi-lora", "per-adapter"]
        runs: list[dict] = []
        for r in range(args.repeats):
            order = modes[r % 3:] + modes[: r % 3]
            for mode in order:
                res = run_mode(engine, jobs, mode)
                res["repeat"] = r
                runs.append(res)
                print(f"repeat {r} {mode:>11}: {res['tok_s']:7.1f} tok/s, mean latency {res['mean_latency_s']:6.2f} s, "
                      f"p99 {res['p99_latency_s']:6.2f} s", file=sys.stderr)
        # (while the adapters' files exist: a loaded adapter is checked against its files)
        adapter_mb = engine.lora.get("adapter-0").nbytes / 1e6

    def by(mode: str, r: int) -> dict:
        return next(x for x in runs if x["mode"] == mode and x["repeat"] == r)

    def ratio(key: str, num: str, den: str) -> float:
        return statistics.median(by(num, r)[key] / by(den, r)[key] for r in range(args.repeats))

    loads = engine.lora.counters
    report = {
        "workload": asdict(work), "rank": args.rank, "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": args.threads, "adapter_popularity": dict(sorted(Counter(a for _, _, a in jobs).items())),
        "adapter_load_ms": 1e3 * loads["load_seconds"] / max(1, loads["loads"]),
        "adapter_mb": adapter_mb,
        "runs": runs,
        "multi_vs_base_throughput": ratio("tok_s", "multi-lora", "base"),
        "multi_vs_per_adapter_throughput": ratio("tok_s", "multi-lora", "per-adapter"),
        "multi_vs_per_adapter_latency": ratio("mean_latency_s", "multi-lora", "per-adapter"),
    }
    print(f"\n{work.num_requests} requests over {work.num_adapters} adapters (rank {args.rank}, popularity "
          f"{report['adapter_popularity']}), {report['dtype']}, {args.threads} threads, {args.repeats} repeats")
    print(f"{'mode':>12} {'tok/s':>8} {'mean lat s':>11} {'p99 lat s':>10}")
    for mode in modes:
        rs = [x for x in runs if x["mode"] == mode]
        print(f"{mode:>12} {statistics.median(x['tok_s'] for x in rs):8.1f} "
              f"{statistics.median(x['mean_latency_s'] for x in rs):11.2f} "
              f"{statistics.median(x['p99_latency_s'] for x in rs):10.2f}")
    print(f"multi-lora / base throughput:        {report['multi_vs_base_throughput']:.3f}")
    print(f"multi-lora / per-adapter throughput: {report['multi_vs_per_adapter_throughput']:.3f}")
    print(f"multi-lora / per-adapter mean latency: {report['multi_vs_per_adapter_latency']:.3f}")
    print(f"adapter load: {report['adapter_load_ms']:.0f} ms each, {report['adapter_mb']:.1f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
