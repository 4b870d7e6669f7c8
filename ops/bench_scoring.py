"""Scoring benchmark: multiple-choice loglikelihood, as lm-evaluation-harness runs it,
through lmgate's engine against Hugging Face transformers, on the same prompts, in the
same run.

    python -m ops.bench_scoring [--quick] [--shots 5] [--repeats 3] [--json PATH]

Workload: 16 general-knowledge questions with 4 answers each, k-shot (the other
questions, answered, before each one, as the harness's `num_fewshot`): one prompt per
(question, answer), the answer's tokens scored given the context.

Modes (each repeat runs them in a rotated order):
- `hf`: transformers' forward pass over each prompt alone, `log_softmax`, the answer
  tokens' logprobs gathered. The reference.
- `lmgate-score`: lmgate's engine, every prompt added at once with `prompt_logprobs=1`
  and `max_tokens=0` (what `echo` + `logprobs` + `max_tokens: 0` asks of a server).
- `lmgate-prefill`: the same prompts with `max_tokens=0` and no prompt logprobs: the
  prefill alone, the cost floor (the prefix cache is off in the modes above, so the
  difference is the logits of every position).
- `lmgate-score-cached`: as `lmgate-score`, with the prefix cache on: the answers of a
  question after the first wait for the first to have its context's logprobs, then take
  the context's KV blocks as hits and their logprobs from
  `gpu.prompt_logprobs.PromptLogprobCache` (caches emptied before each run).
- `lmgate-serial` and `lmgate-serial-cached`: one prompt at a time, as the harness sends
  them by default (`batch_size=1`), without and with the prefix cache.

Reported: wall time per mode; `score_vs_hf_time` and `score_vs_prefill_time` (medians
over repeats, lower is better), `score_cached_vs_score_time` and
`serial_cached_vs_serial_time` (what the prompt-logprob cache saves); `max_abs_logprob_diff` against hf over every scored token (float32 both,
batched and serial-cached modes); `same_choices_as_hf`: the share of questions where both
pick the same answer (highest summed logprob); and the accuracy of those picks.
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

QUESTIONS = [
    ("What is the capital of France?", [" Paris", " London", " Rome", " Madrid"], 0),
    ("Which planet is known as the Red Planet?", [" Venus", " Mars", " Jupiter", " Saturn"], 1),
    ("What is the largest ocean on Earth?", [" Atlantic", " Indian", " Arctic", " Pacific"], 3),
    ("How many legs does a spider have?", [" six", " eight", " ten", " four"], 1),
    ("What gas do plants absorb from the air?", [" oxygen", " nitrogen", " carbon dioxide", " helium"], 2),
    ("Who wrote Romeo and Juliet?", [" William Shakespeare", " Charles Dickens", " Jane Austen", " Mark Twain"], 0),
    ("What is the boiling point of water at sea level in Celsius?", [" 50", " 90", " 100", " 120"], 2),
    ("Which animal is known as the king of the jungle?", [" elephant", " tiger", " lion", " giraffe"], 2),
    ("What is the chemical symbol for gold?", [" Ag", " Au", " Gd", " Go"], 1),
    ("How many days are in a leap year?", [" 364", " 365", " 366", " 367"], 2),
    ("What is the smallest prime number?", [" 0", " 1", " 2", " 3"], 2),
    ("Which continent is Egypt in?", [" Asia", " Africa", " Europe", " South America"], 1),
    ("What color is the sky on a clear day?", [" green", " red", " blue", " yellow"], 2),
    ("What is the freezing point of water in Celsius?", [" 0", " 10", " -10", " 32"], 0),
    ("Which organ pumps blood through the body?", [" liver", " lungs", " brain", " heart"], 3),
    ("What is the capital of Japan?", [" Beijing", " Seoul", " Tokyo", " Bangkok"], 2),
]


def build(tokenizer, shots: int, num_questions: int) -> tuple[list[list[int]], list[int], list[tuple[int, int]]]:
    """Prompts (token ids), the context length of each, and (question, answer) per prompt."""
    prompts, ctxlens, owners = [], [], []
    for q, (question, answers, _) in enumerate(QUESTIONS[:num_questions]):
        others = [x for i, x in enumerate(QUESTIONS) if i != q][:shots]
        shot_text = "".join(f"Question: {s}\nAnswer:{a[g]}\n\n" for s, a, g in others)
        context = f"{shot_text}Question: {question}\nAnswer:"
        ctx = tokenizer.encode(context)
        for a, answer in enumerate(answers):
            whole = tokenizer.encode(context + answer)
            if whole[: len(ctx)] != ctx:  # the answer must start a token of its own
                raise SystemExit(f"answer {answer!r} merges with its context's last token")
            prompts.append(whole)
            ctxlens.append(len(ctx))
            owners.append((q, a))
    return prompts, ctxlens, owners


def run_hf(model, prompts: list[list[int]], ctxlens: list[int]) -> tuple[float, list[list[float]]]:
    scores = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids, c in zip(prompts, ctxlens, strict=True):
            lp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
            scores.append(lp.gather(1, torch.tensor(ids[1:])[:, None]).flatten()[c - 1:].tolist())
    return time.perf_counter() - t0, scores


def run_lmgate(engine, prompts: list[list[int]], ctxlens: list[int], *, score: bool,
               serial: bool = False) -> tuple[float, list]:
    from gpu.engine import generate
    from gpu.sampling import SamplingParams

    params = SamplingParams(max_tokens=0, prompt_logprobs=1 if score else None)
    engine.block_manager.reset_prefix_cache()  # every run starts cold: it replays the same prompts
    engine.prompt_lp_cache.clear()
    t0 = time.perf_counter()
    if serial:
        outs = [generate(engine, [p], params)[0] for p in prompts]
    else:
        outs = generate(engine, prompts, params)
    wall = time.perf_counter() - t0
    if not score:
        return wall, []
    return wall, [[lp for lp, *_ in o.prompt_logprobs[c:]] for [o], c in zip(outs, ctxlens, strict=True)]


def picks(scores: list[list[float]], owners: list[tuple[int, int]]) -> dict[int, int]:
    best: dict[int, tuple[float, int]] = {}
    for s, (q, a) in zip(scores, owners, strict=True):
        total = sum(s)
        if q not in best or total > best[q][0]:
            best[q] = (total, a)
    return {q: a for q, (_, a) in best.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_scoring"), description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 questions, 1 repeat")
    ap.add_argument("--questions", type=positive_int, help=f"questions (at most {len(QUESTIONS)}; default all, --quick 6)")
    ap.add_argument("--shots", type=int, default=5, help="answered questions before each one (default %(default)s)")
    ap.add_argument("--repeats", type=positive_int, help="rounds of the modes, order rotated (default 3; --quick 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the report as JSON")
    args = ap.parse_args(argv)
    num = min(args.questions or (6 if args.quick else len(QUESTIONS)), len(QUESTIONS))
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    from gpu.config import CacheConfig, EngineConfig
    from gpu.engine import Engine
    from ops.hf_reference import load_model

    engine = Engine(EngineConfig(dtype="float32", num_threads=args.threads,
                                 cache=CacheConfig(cache_bytes=256 * 1024**2, enable_prefix_caching=False)))
    cached = Engine(EngineConfig(dtype="float32", num_threads=args.threads,
                                 cache=CacheConfig(cache_bytes=256 * 1024**2)))
    hf = load_model(torch.float32)
    prompts, ctxlens, owners = build(engine.tokenizer, args.shots, num)

    run_hf(hf, prompts[:2], ctxlens[:2])  # warm-up, outside the timings
    run_lmgate(engine, prompts[:2], ctxlens[:2], score=True)
    run_lmgate(cached, prompts[:2], ctxlens[:2], score=True, serial=True)
    cached_fed = 0

    modes = ["hf", "lmgate-score", "lmgate-score-cached", "lmgate-prefill", "lmgate-serial", "lmgate-serial-cached"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    results: dict[str, list] = {}
    for r in range(repeats):
        for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
            if mode == "hf":
                wall, scores = run_hf(hf, prompts, ctxlens)
            elif mode == "lmgate-score-cached":
                wall, scores = run_lmgate(cached, prompts, ctxlens, score=True)
            elif mode == "lmgate-serial-cached":
                before = cached.counters["prefill_tokens_fed"]
                wall, scores = run_lmgate(cached, prompts, ctxlens, score=True, serial=True)
                cached_fed = cached.counters["prefill_tokens_fed"] - before
            else:
                wall, scores = run_lmgate(engine, prompts, ctxlens, score=mode != "lmgate-prefill",
                                          serial=mode == "lmgate-serial")
            times[mode].append(wall)
            results[mode] = scores
            print(f"repeat {r + 1}/{repeats} {mode:15s} {wall:7.2f} s", file=sys.stderr)

    diff = max(abs(a - b) for mode in ("lmgate-score", "lmgate-score-cached", "lmgate-serial-cached")
               for x, y in zip(results[mode], results["hf"], strict=True) for a, b in zip(x, y, strict=True))
    ours, theirs = picks(results["lmgate-score"], owners), picks(results["hf"], owners)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    report = {
        "config": {"questions": num, "answers": 4, "shots": args.shots, "prompts": len(prompts),
                   "prompt_tokens": sum(map(len, prompts)), "repeats": repeats, "threads": args.threads,
                   "dtype": "float32"},
        "time_s": times,
        "score_vs_hf_time": ratio("lmgate-score", "hf"),
        "score_vs_prefill_time": ratio("lmgate-score", "lmgate-prefill"),
        "score_cached_vs_score_time": ratio("lmgate-score-cached", "lmgate-score"),
        "serial_cached_vs_serial_time": ratio("lmgate-serial-cached", "lmgate-serial"),
        "serial_cached_prefill_tokens_vs_prompt_tokens": cached_fed / sum(map(len, prompts)),
        "max_abs_logprob_diff": diff,
        "same_choices_as_hf": sum(ours[q] == theirs[q] for q in ours) / num,
        "accuracy": sum(ours[q] == QUESTIONS[q][2] for q in ours) / num,
    }
    print(f"scoring, {num} questions x 4 answers, {args.shots}-shot, {len(prompts)} prompts, "
          f"{report['config']['prompt_tokens']} tokens, float32, {args.threads} threads")
    print(f"{'mode':21s} {'median s':>9s}")
    for m in modes:
        print(f"{m:21s} {statistics.median(times[m]):9.2f}")
    print(f"lmgate-score ÷ hf time       {report['score_vs_hf_time']:.3f}")
    print(f"lmgate-score ÷ prefill time  {report['score_vs_prefill_time']:.3f}")
    print(f"batched: cached ÷ uncached   {report['score_cached_vs_score_time']:.3f}")
    print(f"serial: cached ÷ uncached    {report['serial_cached_vs_serial_time']:.3f} "
          f"(prefilled {report['serial_cached_prefill_tokens_vs_prompt_tokens']:.2f} of the prompt tokens)")
    print(f"max |logprob - hf|           {diff:.2e}")
    print(f"same choices as hf           {report['same_choices_as_hf']:.0%} (accuracy {report['accuracy']:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
