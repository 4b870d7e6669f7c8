"""The `lmgate` command line.

    lmgate serve      run the gateway (HTTP, SSE, WebSocket) on the bundled model
    lmgate generate   offline generation on the engine, no server
    lmgate convert    write a checkpoint as a Hugging Face folder (safetensors)
    lmgate chat       interactive chat against a running gateway
    lmgate predictor  train / show / export / import the Magnus length predictor
    lmgate bench ...  benchmarks (see `lmgate bench --help`)

Subcommands import their heavy dependencies lazily so `lmgate --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2",
                   help='"smollm2" (the bundled SmolLM2-135M-Instruct GGUF), a .gguf file, or a '
                        "Hugging Face Llama folder (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache dtype; auto = bfloat16 on CUDA and on CPUs with AVX512-BF16 or "
                        "AMX, float32 on other CPUs (float32 is token-identical to the transformers reference)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    g.add_argument("--kv-cache-mb", type=int, default=1536, help="KV cache budget in MiB (default: %(default)s)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=128, help="running-requests cap (default: %(default)s)")
    g.add_argument("--max-batched-tokens", type=int, default=512,
                   help="token budget of one engine step (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=8192,
                   help="prompt + output tokens per request (default: %(default)s)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable KV prefix reuse")
    g.add_argument("--no-kv-huge-pages", action="store_true",
                   help="keep the KV cache on 4 KiB pages (default: 2 MiB transparent huge pages on a Linux CPU)")
    g.add_argument("--batch-invariant", action="store_true",
                   help="a prompt's tokens do not depend on the other prompts of the batch (costs throughput)")


def engine_config_from_args(args: argparse.Namespace):
    from gpu.config import CacheConfig, EngineConfig, SchedulerConfig

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        num_threads=args.threads,
        batch_invariant=args.batch_invariant,
        cache=CacheConfig(block_size=args.block_size, cache_bytes=args.kv_cache_mb * 1024**2,
                          enable_prefix_caching=not args.no_prefix_caching, huge_pages=not args.no_kv_huge_pages),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len),
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from gpu.engine import Engine, generate
    from gpu.sampling import SamplingParams, SamplingParamsError

    prompts = list(args.prompt)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("lmgate generate: give at least one prompt (or --file)", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop or ()),
        )
    except SamplingParamsError as e:
        print(f"lmgate generate: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    engine = Engine(engine_config_from_args(args))
    load_s = time.perf_counter() - t0
    tok = engine.tokenizer
    inputs = [
        p if args.raw else tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts
    ]
    t0 = time.perf_counter()
    try:
        results = generate(engine, inputs, params)
    except ValueError as e:
        print(f"lmgate generate: {e}", file=sys.stderr)
        return 2
    gen_s = time.perf_counter() - t0
    n_out = sum(len(c.token_ids) for r in results for c in r)
    for prompt, choices in zip(prompts, results, strict=True):
        for c in choices:
            if args.json:
                print(json.dumps({"prompt": prompt, "index": c.index, "text": c.text,
                                  "finish_reason": c.finish_reason, "completion_tokens": len(c.token_ids)}))
            else:
                head = f"[{c.index}] " if params.n > 1 else ""
                print(f">>> {prompt}\n{head}{c.text}\n")
    print(f"# model loaded in {load_s:.1f}s; {n_out} tokens in {gen_s:.2f}s "
          f"({n_out / max(gen_s, 1e-9):.1f} tok/s, {len(prompts)} prompts batched)", file=sys.stderr)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from gpu.convert import convert_checkpoint

    try:
        out = convert_checkpoint(args.src, args.dst, dtype=args.dtype, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"lmgate convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmgate",
        description="LLM serving gateway: continuous batching on a paged KV cache, per-tenant quotas, "
                    "response cache, SSE and WebSocket token streaming.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from gateway.server import add_serve_arguments

    p = sub.add_parser("serve", help="run the gateway (OpenAI-compatible HTTP, SSE, WebSocket, admin API)")
    add_serve_arguments(p)

    p = sub.add_parser("generate", help="generate offline with the engine (no server)")
    p.add_argument("prompt", nargs="*", help="prompts (each sent as a user chat message unless --raw)")
    p.add_argument("--file", help="read more prompts from a file, one per line")
    p.add_argument("--raw", action="store_true", help="feed prompts as raw text, without the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("-n", type=int, default=1, help="choices per prompt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per choice")
    _add_engine_arguments(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("convert", help="write a checkpoint as a Hugging Face folder (safetensors)")
    p.add_argument("src", nargs="?", default="smollm2", help='"smollm2", a .gguf file or a HF folder')
    p.add_argument("dst", help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    from clients.cli import add_chat_arguments

    p = sub.add_parser("chat", help="interactive chat with a running gateway")
    add_chat_arguments(p)

    from ops.predictor_cli import add_predictor_arguments

    p = sub.add_parser("predictor", help="train, show, export and import the Magnus length predictor",
                       description="Train, show, export and import the Magnus generation-length predictor "
                                   "(`lmgate serve --predictor-seed FILE` starts from a trained one).")
    add_predictor_arguments(p)

    from ops.cli import add_bench_arguments

    p = sub.add_parser("bench", help="benchmarks: engine, gateway, serving load generator")
    add_bench_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        if args.command == "serve":
            from gateway.server import run_serve

            return run_serve(args)
        if args.command == "chat":
            from clients.cli import run_chat

            return run_chat(args)
        parser.print_help()
        return 2
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
