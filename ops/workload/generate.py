"""Regenerate the workload fixture: run every request through the real SmolLM2.

    python -m ops.workload.generate [--n 960] [--max-tokens 512] [--out ops/workload/requests.jsonl]
                                    [--dtype float32] [--batch-invariant]

Greedy decoding with the model's chat template; a request ends at EOS or at
`max_tokens`. The recorded `output_tokens` is the model's own length, so the
fixture is what the length predictor must learn. Why 512: greedy SmolLM2 either
stops on its own (185 of 189 such requests within 300 tokens, run at 1024) or
repeats itself until the cap. At 512, 58% end on EOS and only 3 of 320 would
stop between 512 and 1024; the earlier cap of 128 cut 11% of the requests that
stop on their own (53% ran into it, against 42% at 512). Why 960: the benchmark trains
the predictor on one half and runs the other; its long run needs 400 held-out requests
for a queue to build at the highest rate (docs/scheduling.md). The templates are
deterministic in `--seed`, so the first n requests of a longer run are the n of a
shorter one. `gpu.engine.generate` batches all requests continuously (10-20 minutes
for 960 on 2 cores).

The shipped fixture is float32's (the same on every machine). A deployment that serves in
another dtype generates different lengths (bf16 on an AMX Xeon: two thirds of a served
run's requests keep float32's length); `--dtype bfloat16 --batch-invariant` writes the
lengths such a server produces under `--batch-invariant`, whatever its load — a log to
train a predictor seed on (`lmgate predictor train --requests`). Without
`--batch-invariant`, bf16 lengths depend on the batch they ran in (docs/benchmarking.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ops.workload.templates import build_requests

DEFAULT_OUT = Path(__file__).with_name("requests.jsonl")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=960, help="requests (default 960)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="engine dtype (default float32: the shipped fixture's, the same on every machine)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="run the batch-invariant engine: each request's length is the one it gets alone")
    args = ap.parse_args(argv)

    from gpu.config import EngineConfig, SchedulerConfig
    from gpu.engine import Engine, generate
    from gpu.sampling import SamplingParams

    # float32 by default, not "auto" (bfloat16 on some CPUs): the shipped fixture's lengths
    # must not depend on which machine regenerated it
    engine = Engine(EngineConfig(num_threads=args.threads, dtype=args.dtype, batch_invariant=args.batch_invariant,
                                 scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024)))
    reqs = build_requests(args.n, args.seed)
    prompts = [engine.tokenizer.render_and_encode(list(r.messages)) for r in reqs]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    outs = generate(engine, prompts, params)
    dt = time.perf_counter() - t0
    with args.out.open("w") as f:
        for r, p, o in zip(reqs, prompts, outs, strict=True):
            c = o[0]
            f.write(json.dumps({
                "id": r.id, "app": r.app, "tenant": r.tenant, "user": r.user,
                "messages": list(r.messages), "prompt_tokens": len(p),
                "output_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                "max_tokens": args.max_tokens,
            }) + "\n")
    total = sum(len(o[0].token_ids) for o in outs)
    print(f"{len(reqs)} requests, {total} output tokens in {dt:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
