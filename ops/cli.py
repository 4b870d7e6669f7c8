"""`lmgate bench ...`: a thin dispatcher to the benchmark modules in `ops/`.

Each benchmark is also runnable as `python -m ops.bench_<name>`; the flags after
the benchmark name are passed through unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

BENCHES = {
    "beam": ("ops.bench_beam", "beam search vs transformers' generate(num_beams=k); KV blocks vs unshared beams"),
    "dtype": ("ops.bench_dtype", "how far bf16 / int8 move the model from float32, and their speed"),
    "embeddings": ("ops.bench_embeddings", "/v1/embeddings throughput vs the model called directly; what an "
                                           "embedding load costs streamed generation"),
    "engine": ("ops.bench_engine", "engine vs Hugging Face transformers static batching; MBU"),
    "gateway": ("ops.bench_gateway", "cached-response RPS vs a bare route; latency added per token"),
    "invariance": ("ops.bench_invariance", "does output depend on the load; the cost of --batch-invariant"),
    "kernels": ("ops.bench_kernels", "CUDA kernel bandwidth and decode MBU (needs a GPU to time; --cpu for the "
                                     "CPU kernels)"),
    "kv-pages": ("ops.bench_kv_pages", "the KV cache on 2 MiB pages vs 4 KiB pages"),
    "load": ("ops.bench_load", "checkpoint loading: the lmg format vs safetensors and GGUF, cold and warm"),
    "lora": ("ops.bench_lora", "many LoRA adapters in one batch vs the base model and one adapter at a time"),
    "sched": ("ops.bench_sched", "every batching policy on the multi-application workload (Magnus vs FCFS)"),
    "scoring": ("ops.bench_scoring", "multiple-choice loglikelihood (prompt logprobs) vs transformers; the "
                                     "prompt-logprob cache"),
    "structured": ("ops.bench_structured", "JSON-schema-constrained generation vs the same tokens unconstrained; "
                                           "valid outputs with and without the schema"),
    "serve": ("ops.bench_serve", "serving benchmark with vLLM bench serve metrics; OpenAI SSE or lmgate WS; "
                                 "--compare a second target"),
}


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of requests, rounds, tokens...), so that a
    0 or a negative is refused with the usage line and status 2, not a traceback minutes in."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def output_file(text: str) -> Path:
    """An argparse type: a file a benchmark writes at its end (`--json`, `--plot`). Checked,
    and its folder made, when the flags are read: a bad path was found only after a run of
    minutes, whose results were then lost to a traceback."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot make the folder of {text!r}: {exc.strerror or exc}") from None
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into the folder of {text!r}")
    return path


def float_list(text: str) -> list[float]:
    """An argparse type: comma-separated numbers (`--rates 0.5,1,2`)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHES),
                        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(BENCHES.items())))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="flags for that benchmark (see its --help)")
    parser.set_defaults(func=run_bench)


def bench_prog(module: str) -> str:
    """A benchmark parser's `prog`: `lmgate bench NAME` when `run_bench` dispatched to it,
    else `python -m MODULE` (`python -m` leaves the file's path in sys.argv[0]), so that
    its usage line and errors name the command the user typed."""
    return sys.argv[0] if sys.argv[0].startswith("lmgate bench ") else f"python -m {module}"


def run_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.name][0])
    old_argv0 = sys.argv[0]
    sys.argv[0] = f"lmgate bench {args.name}"  # read by `bench_prog`
    try:
        return int(module.main(args.rest) or 0)
    finally:
        sys.argv[0] = old_argv0
