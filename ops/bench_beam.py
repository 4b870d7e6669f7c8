"""Beam search benchmark: lmgate's paged, copy-on-write beams against Hugging Face
transformers' `generate(num_beams=k)`, on the same requests, in the same run.

    python -m ops.bench_beam [--quick] [--beams 4] [--requests 12] [--max-tokens 48] [--json PATH]

Workload: the shipped workload's translation, grammar-correction and summarization
requests (beam search's classic uses), chat-templated, EOS honoured, `max_tokens` capped.

Modes (each repeat runs them in a rotated order):
- `hf`: transformers' `generate(num_beams=k, num_return_sequences=k)`, one request at a
  time (its beams reorder a dense KV cache every step). The reference.
- `lmgate-serial`: lmgate's engine, one request at a time: the same work as `hf`.
- `lmgate-batched`: every request added at once: the beams of all requests in one
  continuous batch.

Reported: wall time per mode; `serial_vs_hf_time` and `batched_vs_hf_time` (lmgate ÷ hf,
lower is better; medians over repeats); `identical_to_hf` (the share of requests whose k
beams are token-identical to transformers' — the engine runs float32 for that, where
greedy is token-identical too); and `kv_blocks_vs_unshared`: the most KV blocks a request's
beams held at once (serial mode) over what k unshared copies of its longest beam would
hold — what copy-on-write sharing of the common prefix saves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ops.cli import bench_prog, output_file, positive_int

APPS = ("translation", "grammar", "summarization")


def workload(num_requests: int) -> list:
    from ops.workload.fixture import load_fixture

    by_app = {a: [r for r in load_fixture() if r.app == a] for a in APPS}  # round-robin over the apps
    most = len(APPS) * min(len(v) for v in by_app.values())
    if num_requests > most:
        raise SystemExit(f"the fixture has {most} requests of {', '.join(APPS)} in turn; asked for {num_requests}")
    return [by_app[APPS[i % len(APPS)]][i // len(APPS)] for i in range(num_requests)]


def run_hf(model, prompts: list[list[int]], params, eos: tuple[int, ...]) -> tuple[float, list[list[list[int]]]]:
    k = params.beam_width
    outs = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), num_beams=k, num_return_sequences=k, do_sample=False,
                                 max_new_tokens=params.max_tokens, eos_token_id=list(eos), pad_token_id=eos[0])
            beams = []
            for row in gen[:, len(ids):].tolist():  # finished rows are padded after their EOS
                end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                beams.append(row[:end])
            outs.append(beams)
    return time.perf_counter() - t0, outs


def run_lmgate(engine, prompts: list[list[int]], params, *, batched: bool) -> tuple[float, list, list[int]]:
    """Wall time, each request's beams, and (serial) each request's peak KV blocks."""
    bm = engine.block_manager
    outs: dict[str, dict[int, list[int]]] = {}
    peaks: list[int] = []
    t0 = time.perf_counter()
    groups = [list(enumerate(prompts))] if batched else [[(i, p)] for i, p in enumerate(prompts)]
    for group in groups:
        for i, ids in group:
            engine.add_request(f"b{i}", ids, params)
            outs[f"b{i}"] = {}
        peak = 0
        while engine.has_unfinished():
            for d in engine.step():
                outs[d.request_id].setdefault(d.index, []).extend(d.token_ids)
            peak = max(peak, bm.num_blocks - bm.num_free_blocks)
        peaks.append(peak)
    wall = time.perf_counter() - t0
    return wall, [[outs[f"b{i}"][j] for j in sorted(outs[f"b{i}"])] for i in range(len(prompts))], peaks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_beam"), description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 requests, 24 tokens, 1 repeat")
    ap.add_argument("--beams", type=positive_int, default=4, help="beams per request (default %(default)s)")
    ap.add_argument("--requests", type=positive_int, help="requests (default 12; --quick 6)")
    ap.add_argument("--max-tokens", type=int, help="max_tokens of every request (default 48; --quick 24)")
    ap.add_argument("--repeats", type=positive_int, help="rounds of the three modes, order rotated (default 3; --quick 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the report as JSON")
    args = ap.parse_args(argv)
    num = args.requests or (6 if args.quick else 12)
    max_tokens = args.max_tokens or (24 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    from gpu.config import CacheConfig, EngineConfig
    from gpu.engine import Engine
    from gpu.sampling import SamplingParams
    from ops.hf_reference import load_model

    engine = Engine(EngineConfig(dtype="float32", cache=CacheConfig(cache_bytes=256 * 1024**2, enable_prefix_caching=False),
                                 num_threads=args.threads))
    tok = engine.tokenizer
    eos = tuple(tok.eos_token_ids)
    hf = load_model(torch.float32)
    prompts = [tok.encode(tok.apply_chat_template(list(r.messages), add_generation_prompt=True))
               for r in workload(num)]
    params = SamplingParams(use_beam_search=True, n=args.beams, max_tokens=max_tokens)

    # warm-up: one request through each, outside the timings
    run_hf(hf, prompts[:1], params, eos)
    run_lmgate(engine, prompts[:1], params, batched=False)

    modes = ["hf", "lmgate-serial", "lmgate-batched"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    results: dict[str, list] = {}
    peaks: list[int] = []
    for r in range(repeats):
        for mode in modes[r % 3:] + modes[: r % 3]:
            if mode == "hf":
                wall, outs = run_hf(hf, prompts, params, eos)
            else:
                wall, outs, mode_peaks = run_lmgate(engine, prompts, params, batched=mode == "lmgate-batched")
                if mode == "lmgate-serial":
                    peaks = mode_peaks
            times[mode].append(wall)
            results[mode] = outs
            print(f"repeat {r + 1}/{repeats} {mode:15s} {wall:7.2f} s", file=sys.stderr)

    identical = sum(a == b for a, b in zip(results["lmgate-serial"], results["hf"], strict=True)) / num
    batched_same = sum(a == b for a, b in zip(results["lmgate-batched"], results["hf"], strict=True)) / num
    unshared = [args.beams * engine.block_manager.blocks_for(len(p) + max(len(b) for b in beams))
                for p, beams in zip(prompts, results["lmgate-serial"], strict=True)]

    def ratio(num_mode: str) -> float:
        return statistics.median(a / b for a, b in zip(times[num_mode], times["hf"], strict=True))

    report = {
        "config": {"beams": args.beams, "requests": num, "max_tokens": max_tokens, "repeats": repeats,
                   "threads": args.threads, "dtype": "float32", "apps": list(APPS)},
        "time_s": times,
        "output_tokens": sum(len(b) for beams in results["lmgate-serial"] for b in beams),
        "serial_vs_hf_time": ratio("lmgate-serial"),
        "batched_vs_hf_time": ratio("lmgate-batched"),
        "identical_to_hf": identical,
        "batched_identical_to_hf": batched_same,
        "kv_blocks_vs_unshared": sum(peaks) / sum(unshared),
    }
    print(f"beam search, {args.beams} beams, {num} requests, max_tokens {max_tokens}, float32, "
          f"{args.threads} threads")
    print(f"{'mode':16s} {'median s':>9s}")
    for m in modes:
        print(f"{m:16s} {statistics.median(times[m]):9.2f}")
    print(f"lmgate-serial ÷ hf time   {report['serial_vs_hf_time']:.3f}")
    print(f"lmgate-batched ÷ hf time  {report['batched_vs_hf_time']:.3f}")
    print(f"token-identical to hf     {identical:.0%} serial, {batched_same:.0%} batched")
    print(f"KV blocks ÷ unshared      {report['kv_blocks_vs_unshared']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
