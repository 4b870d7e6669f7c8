"""`lmgate bench ...`: a thin dispatcher to the benchmark modules in `ops/`.

Each benchmark is also runnable as `python -m ops.bench_<name>`; the flags after
the benchmark name are passed through unchanged.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "engine": ("ops.bench_engine", "engine vs Hugging Face transformers static batching; MBU"),
    "gateway": ("ops.bench_gateway", "cached-response RPS vs a bare route; latency added per token"),
    "kernels": ("ops.bench_kernels", "CUDA kernel bandwidth and decode MBU (needs a GPU to time)"),
    "serve": ("ops.bench_serve", "serving benchmark with vLLM bench serve metrics; OpenAI SSE or lmgate WS; "
                                 "--compare a second target"),
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHES),
                        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(BENCHES.items())))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="flags for that benchmark (see its --help)")
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.name][0])
    return int(module.main(args.rest) or 0)
