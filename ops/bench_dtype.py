"""How far a dtype (or int8 quantization) moves the bundled model from float32: the
evidence behind `--dtype auto` and the price of `--quantization int8`.

    python -m ops.bench_dtype [--dtype bfloat16] [--quantization int8] [--prompts 48] [--new-tokens 128] [--json PATH]

On the workload fixture's held-out prompts (chat-rendered, as served):

1. Greedy generation through the real engine in float32 and in `--dtype`: how many
   continuations are token-identical, where they first diverge, and their lengths (EOS).
2. Teacher-forced on float32's continuations, through `ModelRunner` (the serving path:
   paged KV cache, the CPU kernels, packed GEMMs), every prompt in one batch, one decode
   step per position: KL(float32 ‖ dtype) of the next-token distributions and the share
   of positions whose top-1 token agrees.
3. The same two numbers for transformers' own model in `--dtype` against our float32
   (`--skip-hf` leaves it out): the distance a user of that dtype already accepts.

Greedy continuations diverge at the first near-tie, so (1) alone overstates the change;
(2) measures it per position. Runs in ~2 minutes on 2 cores with the defaults.

With `--quantization int8` the model compared is `--dtype` with int8 projections
(`gpu.quantization`); the report then also gives the time (1) took in both models, and
their ratio (`speedup`), both measured in this run on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

from actors.step_scheduler import ScheduledSeq, StepPlan
from gpu.config import EngineConfig, SchedulerConfig
from gpu.engine import Engine, generate, resolve_dtype
from gpu.loader import load_checkpoint
from gpu.quantization import calibration_prompts
from gpu.runner import ModelRunner
from gpu.sampling import SamplingParams
from gpu.tokenizer import load_tokenizer
from ops.cli import bench_prog, output_file, positive_int
from ops.workload.fixture import load_fixture

BLOCK_SIZE = 16


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: KL(softmax(ref) ‖ softmax(logits)) in nats, and whether the argmaxes agree."""
    a, b = torch.log_softmax(ref_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    return (a.exp() * (a - b)).sum(-1), a.argmax(-1) == b.argmax(-1)


def pooled(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`kl_and_top1` results of several sequences, concatenated."""
    return torch.cat([kl for kl, _ in parts]), torch.cat([agree for _, agree in parts])


@torch.inference_mode()
def teacher_forced_logits(runner: ModelRunner, seqs: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """For each (prompt, continuation): the logits predicting every continuation token,
    (len(continuation), vocab) — a prefill of every prompt, then one batched decode step
    per position feeding the continuation's own tokens."""
    tables, start = [], 0
    for p, c in seqs:
        n = (len(p) + len(c)) // BLOCK_SIZE + 1
        tables.append(tuple(range(start, start + n)))
        start += n
    out: list[list[torch.Tensor]] = [[] for _ in seqs]

    def run(chunks: list[tuple[int, ScheduledSeq]]) -> None:
        res = runner.execute(StepPlan(tuple(s for _, s in chunks), (), (), sum(len(s.token_ids) for _, s in chunks)))
        row = dict(zip(res.seq_ids, res.logits, strict=True))
        for i, s in chunks:
            out[i].append(row[s.request_id])

    run([(i, ScheduledSeq(str(i), tuple(p), 0, tables[i], True)) for i, (p, c) in enumerate(seqs) if c])
    for k in range(1, max(len(c) for _, c in seqs)):
        run([(i, ScheduledSeq(str(i), (c[k - 1],), len(p) + k - 1, tables[i], True))
             for i, (p, c) in enumerate(seqs) if k < len(c)])
    return [torch.stack(rows) if rows else torch.empty(0) for rows in out]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_dtype"), description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                    help="the dtype compared with float32 (default bfloat16)")
    ap.add_argument("--prompts", type=positive_int, default=48, help="held-out fixture prompts (default 48)")
    ap.add_argument("--new-tokens", type=positive_int, default=128, help="greedy tokens per prompt (default 128)")
    ap.add_argument("--quantization", default="none", choices=["none", "int8"],
                    help="compare --dtype with this quantization against float32 (default none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true", help="leave out transformers' model in --dtype")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the report as JSON")
    args = ap.parse_args(argv)
    dtype = resolve_dtype(args.dtype, "cpu")
    if args.prompts < 1 or args.new_tokens < 1:
        ap.error("--prompts and --new-tokens must be >= 1")
    fixture = load_fixture()
    rows = fixture[len(fixture) // 2:][: args.prompts]

    # (label, dtype, quantization): the reference first, the model compared last; with
    # --quantization also the unquantized --dtype between them, timed for the speedup
    ref_v = ("float32", torch.float32, "none")
    label = str(dtype).removeprefix("torch.") + ("" if args.quantization == "none" else f"+{args.quantization}")
    other_v = (label, dtype, args.quantization)
    variants = list(dict.fromkeys((ref_v, (str(dtype).removeprefix("torch."), dtype, "none"), other_v)))
    conts: dict[str, list[list[int]]] = {}
    prompts: list[list[int]] = []
    report: dict = {"dtype": label, "quantization": args.quantization, "prompts": len(rows),
                    "new_tokens": args.new_tokens}
    for name, dt, quant in variants:
        engine = Engine(EngineConfig(dtype=str(dt).removeprefix("torch."), num_threads=args.threads,
                                     quantization=quant, scheduler=SchedulerConfig(max_num_seqs=64)))
        prompts = [engine.tokenizer.render_and_encode(list(r.messages)) for r in rows]
        # untimed warm-up: the process's first GEMMs of each shape pay oneDNN's kernel generation
        generate(engine, prompts[:8], SamplingParams(temperature=0.0, max_tokens=8))
        t0 = time.perf_counter()
        outs = generate(engine, prompts, SamplingParams(temperature=0.0, max_tokens=args.new_tokens))
        report[f"generate_s_{name}"] = time.perf_counter() - t0
        conts[name] = [list(o[0].token_ids) for o in outs]
        del engine
    if args.quantization != "none":
        base = str(dtype).removeprefix("torch.")
        # same prompts, same token cap; lengths may differ (EOS), so per generated token
        per_tok = {n: report[f"generate_s_{n}"] / max(1, sum(map(len, conts[n]))) for n in (base, label)}
        report["speedup"] = per_tok[base] / per_tok[label]
    ref, other = conts["float32"], conts[label]
    div = [first_divergence(a, b) for a, b in zip(ref, other, strict=True)]
    report["greedy_identical"] = sum(d is None for d in div)
    report["greedy_first_divergence"] = sorted(d for d in div if d is not None)
    report["mean_output_tokens"] = {"float32": sum(map(len, ref)) / len(ref), label: sum(map(len, other)) / len(other)}
    report["equal_length"] = sum(len(a) == len(b) for a, b in zip(ref, other, strict=True))

    seqs = list(zip(prompts, ref, strict=True))
    blocks = sum((len(p) + len(c)) // BLOCK_SIZE + 1 for p, c in seqs)
    logits = {}
    for name, dt, quant in dict.fromkeys((ref_v, other_v)):
        ckpt = load_checkpoint("smollm2", dt)
        runner = ModelRunner(ckpt, num_blocks=blocks, block_size=BLOCK_SIZE, dtype=dt, quantization=quant,
                             calibration=calibration_prompts(load_tokenizer(ckpt)) if quant != "none" else ())
        logits[name] = teacher_forced_logits(runner, seqs)
        del runner
    kl, agree = pooled([kl_and_top1(a, b) for a, b in zip(logits["float32"], logits[label], strict=True) if len(a)])
    report["positions"] = int(kl.numel())
    report["kl_mean"], report["kl_p50"], report["kl_p99"] = (float(kl.mean()), float(kl.median()),
                                                            float(kl.quantile(0.99)))
    report["top1_agreement"] = float(agree.float().mean())

    if not args.skip_hf and dtype != torch.float32:  # transformers' float32 is ours (tests/gpu)
        from ops.hf_reference import load_model

        hf = load_model(dtype)
        parts = []
        with torch.inference_mode():
            for (p, c), ours in zip(seqs, logits["float32"], strict=True):
                if c:
                    theirs = hf(torch.tensor([p + c])).logits[0, len(p) - 1: len(p) + len(c) - 1]
                    parts.append(kl_and_top1(ours, theirs))
        hkl, hagree = pooled(parts)
        report["hf_kl_mean"], report["hf_kl_p99"] = float(hkl.mean()), float(hkl.quantile(0.99))
        report["hf_top1_agreement"] = float(hagree.float().mean())

    d = report["dtype"]
    print(f"{len(rows)} prompts, {args.new_tokens} greedy tokens: {report['greedy_identical']} token-identical in "
          f"float32 and {d}; first divergences at {report['greedy_first_divergence']}")
    print(f"mean output tokens: float32 {report['mean_output_tokens']['float32']:.1f}, {d} "
          f"{report['mean_output_tokens'][d]:.1f}; equal lengths {report['equal_length']}/{len(rows)}")
    print(f"teacher-forced ({report['positions']} positions): KL(float32 ‖ {d}) mean {report['kl_mean']:.4f} nats, "
          f"p50 {report['kl_p50']:.4f}, p99 {report['kl_p99']:.4f}; top-1 agreement {report['top1_agreement']:.4f}")
    if "hf_kl_mean" in report:
        print(f"transformers in {d.split('+')[0]} against our float32: KL mean {report['hf_kl_mean']:.4f}, p99 "
              f"{report['hf_kl_p99']:.4f}; top-1 agreement {report['hf_top1_agreement']:.4f}")
    if "speedup" in report:
        base = d.split("+")[0]
        print(f"greedy generation, seconds per generated token: {d} is {report['speedup']:.2f}x as fast as {base} "
              f"({report[f'generate_s_{base}']:.1f} s and {report[f'generate_s_{d}']:.1f} s in all)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
