"""The `lmgate` command line.

    lmgate serve      run the gateway (HTTP, SSE, WebSocket) on the bundled model
    lmgate generate   offline generation on the engine, no server
    lmgate perplexity perplexity of a text file under the model (prompt logprobs), no server
    lmgate convert    write a checkpoint as a Hugging Face folder (safetensors)
    lmgate chat       interactive chat against a running gateway
    lmgate predictor  train / show / export / import the Magnus length predictor
    lmgate bench ...  benchmarks (see `lmgate bench --help`)

Subcommands import their heavy dependencies lazily so `lmgate --help` is instant.
A command that cannot start (bad setting, missing model, port taken, Redis down)
prints one line on stderr and exits non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

SERVE_EPILOG = """\
environment:
  Every setting above is also read from its LMGATE_* variable (redis_url also
  from REDIS_URL, --log-level from LMGATE_LOG_LEVEL), and --config from
  LMGATE_CONFIG. Another LMGATE_* variable is ignored, with a warning naming
  the closest one lmgate reads.
  LMGATE_SECRET  the server secret API keys are HMACed with, at least 16 bytes
                 (unset: one is generated on first start in
                 DATA_DIR/server_secret, mode 0600). Every gateway sharing a
                 Redis must use the same one: a server whose secret differs from
                 the one the Redis's keys were issued under refuses to start. To
                 change it on purpose (every issued key then stops working),
                 revoke the issued keys, delete the key lmgate:secret_check in
                 Redis, start with the new secret, then issue new keys.

--log-level takes DEBUG, INFO, WARNING, ERROR or CRITICAL (log_level in the
settings file).

exit status: 2 for a bad setting (a host this machine cannot bind, a data dir
that cannot be a folder, a short server secret, a KV cache larger than the RAM,
...) or model, a server secret other than the one the keys in Redis were issued
under, or a Magnus predictor in Redis that cannot be read; 1 when the port cannot
be bound, Redis cannot be reached or refuses the database or credentials of
--redis-url, the private redis-server cannot be started, or memory runs out.
"""


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2",
                   help='"smollm2" (the bundled SmolLM2-135M-Instruct GGUF), a .gguf file, a '
                        "Hugging Face Llama folder or an lmg folder (default: %(default)s)")
    g.add_argument("--model-cache-dir", default="", metavar="DIR",
                   help="keep a loading-optimized copy of the model in DIR and start from it next time "
                        "(docs/loading.md; default: off)")
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
    g.add_argument("--quantization", default="none", choices=["none", "int8"],
                   help="int8: projections and LM head as int8 GEMMs (CPU only; docs/benchmarking.md)")


def engine_config_from_args(args: argparse.Namespace):
    """The EngineConfig of the engine flags; ValueError naming the flag on a bad value."""
    from gateway.config import ConfigError, check_device, kv_cache_unavailable
    from gpu.config import CacheConfig, EngineConfig, SchedulerConfig

    for name in ("kv_cache_mb", "block_size", "max_num_seqs", "max_batched_tokens", "max_model_len"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    check_device(args.device)
    if (problem := kv_cache_unavailable(args.kv_cache_mb, args.device)) is not None:
        raise ConfigError(problem)
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        num_threads=args.threads,
        batch_invariant=args.batch_invariant,
        quantization=args.quantization,
        model_cache_dir=args.model_cache_dir,
        cache=CacheConfig(block_size=args.block_size, cache_bytes=args.kv_cache_mb * 1024**2,
                          enable_prefix_caching=not args.no_prefix_caching, huge_pages=not args.no_kv_huge_pages),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len),
    )


class _Exit(Exception):
    """A command stops with a one-line message on stderr and this exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _read_text(path: str, *, encoding: str = "utf-8") -> str:
    """A text file's content, or `_Exit(2)` saying why it cannot be read."""
    try:
        with open(path, encoding=encoding) as f:
            return f.read()
    except OSError as e:
        raise _Exit(2, f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise _Exit(2, f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _start_engine(engine_config):
    """The engine, or `_Exit` for a model that cannot be served (2) or an unavailable
    quantization (1)."""
    from gateway.config import device_unavailable
    from gpu.engine import Engine
    from gpu.loader import CheckpointError
    from gpu.lora import LoraError
    from gpu.quantization import QuantizationUnavailable
    from gpu.tokenizer import TokenizerError

    problem = device_unavailable(engine_config.device)
    if problem is not None:
        raise _Exit(2, problem)
    if engine_config.quantization == "int8":  # said before the model loads (as `serve` does), not after
        from gpu.quantization import int8_unavailable_reason

        if (why := int8_unavailable_reason(engine_config.num_threads)) is not None:
            raise _Exit(1, f"int8 quantization is not available: {why}")
    try:
        return Engine(engine_config)
    except (CheckpointError, LoraError, TokenizerError) as e:
        raise _Exit(2, str(e)) from None
    except QuantizationUnavailable as e:
        raise _Exit(1, str(e)) from None


def _command(name: str):
    """`lmgate <name>`: an `_Exit` from the body becomes its one line on stderr and its status."""

    def wrap(body):
        def run(args: argparse.Namespace) -> int:
            try:
                return body(args)
            except _Exit as e:
                print(f"lmgate {name}: {e}", file=sys.stderr)
                return e.status

        return run

    return wrap


@_command("generate")
def _cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from gpu.config import LoraConfig
    from gpu.engine import generate
    from gpu.sampling import SamplingParams, SamplingParamsError

    try:
        engine_config = engine_config_from_args(args)
        if args.lora:
            engine_config = replace(engine_config, lora=LoraConfig(modules=(("adapter", args.lora),)))
    except ValueError as e:
        print(f"lmgate generate: {e}", file=sys.stderr)
        return 2
    prompts = list(args.prompt)
    if args.file:
        prompts += [line for line in _read_text(args.file).split("\n") if line.strip()]
    if not prompts:
        print("lmgate generate: give at least one prompt (or --file)", file=sys.stderr)
        return 2
    try:
        beam = dict(use_beam_search=True, best_of=args.beam_width, length_penalty=args.length_penalty) \
            if args.beam_width else {}
        guided = _guided_from_args(args)
        params = SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop or ()), guided=guided, **beam,
        )
    except SamplingParamsError as e:
        print(f"lmgate generate: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    engine = _start_engine(engine_config)
    load_s = time.perf_counter() - t0
    tok = engine.tokenizer
    if not args.raw and tok.chat_template is None:
        print("lmgate generate: the model has no chat template: --raw sends the prompts as they are", file=sys.stderr)
        return 2
    inputs = [
        p if args.raw else tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts
    ]
    t0 = time.perf_counter()
    try:
        results = generate(engine, inputs, params, adapter="adapter" if args.lora else None)
    except ValueError as e:
        print(f"lmgate generate: {e}", file=sys.stderr)
        return 2
    gen_s = time.perf_counter() - t0
    for i, choices in enumerate(results, 1):  # an output constraint that broke while it ran
        failed = next((c for c in choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise _Exit(2, f"prompt {i}: {failed.error}")
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


def _guided_from_args(args: argparse.Namespace):
    """The one output constraint `lmgate generate` was given (None: none). A schema or a
    grammar may be given inline or as @FILE."""
    from gpu.structured import GuidedDecoding

    given = [(kind, value) for kind, value in (("json", args.json_schema), ("regex", args.regex),
                                               ("choice", args.choice), ("grammar", args.grammar))
             if value is not None]
    if args.json_object:
        given.append(("json_object", ""))
    if len(given) > 1:
        raise _Exit(2, "give at most one of --json-schema, --json-object, --regex, --choice, --grammar")
    if not given:
        return None
    kind, value = given[0]
    if kind in ("json", "grammar") and value.startswith("@"):
        value = _read_text(value[1:])
    if kind == "choice":
        value = json.dumps(value)
    return GuidedDecoding(kind, value)


@_command("perplexity")
def _cmd_perplexity(args: argparse.Namespace) -> int:
    from gpu.perplexity import perplexity

    try:
        engine_config = engine_config_from_args(args)
    except ValueError as e:
        print(f"lmgate perplexity: {e}", file=sys.stderr)
        return 2
    for flag in ("window", "stride", "max_tokens"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "window" else 1):
            print(f"lmgate perplexity: --{flag.replace('_', '-')} must be >= {2 if flag == 'window' else 1}, "
                  f"got {value}", file=sys.stderr)
            return 2
    text = _read_text(args.file, encoding="utf-8-sig")  # a byte-order mark is not text
    t0 = time.perf_counter()
    engine = _start_engine(engine_config)
    load_s = time.perf_counter() - t0
    ids = engine.tokenizer.encode(text)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    room = engine.max_model_len - 1  # a prefill-only request leaves room for one token
    window = room if args.window is None else args.window
    if window > room or window < 2:
        print(f"lmgate perplexity: a window of {window} tokens does not fit the context: this engine takes "
              f"prompts of at most {room} tokens (--max-model-len {engine.max_model_len})", file=sys.stderr)
        return 2
    stride = max(1, window // 2) if args.stride is None else args.stride
    t0 = time.perf_counter()
    try:
        res = perplexity(engine, ids, window=window, stride=stride)
    except ValueError as e:
        print(f"lmgate perplexity: {e}", file=sys.stderr)
        return 2
    run_s = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"file": args.file, "perplexity": res.perplexity, "mean_logprob": res.mean_logprob,
                          "tokens": len(ids), "tokens_scored": res.tokens_scored, "windows": res.windows,
                          "window": window, "stride": stride, "dtype": str(engine.dtype).removeprefix("torch."),
                          "quantization": engine.config.quantization}))
    else:
        print(f"perplexity {res.perplexity:.4f} over {res.tokens_scored} tokens "
              f"({res.windows} windows of {window}, stride {stride})")
    print(f"# model loaded in {load_s:.1f}s; {len(ids)} tokens scored in {run_s:.2f}s "
          f"({len(ids) / max(run_s, 1e-9):.0f} tok/s)", file=sys.stderr)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from gpu.convert import convert_checkpoint

    try:
        out = convert_checkpoint(args.src, args.dst, dtype=args.dtype, progress=not args.quiet, fmt=args.format,
                                 overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # a bad source, or a destination that cannot be written
        print(f"lmgate convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def check_bindable(host: str, port: int) -> None:
    """Raise OSError if `host:port` cannot be bound now (taken, not a local address, privileged),
    binding the way Hypercorn will (SO_REUSEADDR, IPv6 when the host has a colon): `lmgate serve`
    checks before it spends seconds loading the model. With port 0 (any free port) only the
    host is checked."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside `exc`, exception groups (trio nurseries) unwrapped recursively."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _tls_failure(exc: BaseException) -> str | None:
    """The reason of a TLS failure among `exc`'s causes (a certificate not trusted, a
    name that does not match), or None."""
    import ssl

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            return getattr(cause, "verify_message", None) or cause.reason or str(cause)
        cause = cause.__cause__ or cause.__context__
    return None


def unbindable_host(error: OSError) -> bool:
    """Whether a bind failed because of the host setting (a name that does not resolve, an
    address that is not this machine's): a bad setting, not a busy port or a refusal."""
    if isinstance(error, socket.gaierror):
        return error.errno != socket.EAI_AGAIN  # a DNS server that did not answer may answer later
    return error.errno == errno.EADDRNOTAVAIL


def _about_folder(filename: object, folder: str) -> bool:
    """Whether `filename` (an OSError's) is `folder`, inside it, or a missing folder above it
    (which making `folder` makes)."""
    if not isinstance(filename, str | bytes | os.PathLike):
        return False
    path, folder_path = Path(os.path.abspath(os.fsdecode(filename))), Path(os.path.abspath(folder))
    return path.is_relative_to(folder_path) or (folder_path.is_relative_to(path) and not path.exists())


def _out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, or torch's allocator refusing (a RuntimeError on the CPU,
    torch.OutOfMemoryError, also a RuntimeError, on a GPU)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def startup_failure(exc: BaseException, config: GatewayConfig) -> tuple[int, str] | None:
    """(exit status, one-line message) when `exc`, or every exception of the group it is, is a
    known reason `lmgate serve` (with `config`) could not start; None for anything else (shown
    as a traceback: a bug, not a setting). Status 2: a setting, the model or what Redis holds
    is wrong, and a restart would not help; 1: the environment refused (see SERVE_EPILOG)."""
    from actors.predictor import PredictorBlobError
    from cache.redis_server import RedisServerError
    from cache.store import CacheUnavailable
    from cache.tenants import SecretMismatch, SecretTooShort
    from gateway.config import redis_refusal
    from gpu.loader import CheckpointError
    from gpu.lora import LoraError
    from gpu.quantization import QuantizationUnavailable
    from gpu.tokenizer import TokenizerError

    where = f"{config.host}:{config.port}"
    found: list[tuple[int, str]] = []
    for leaf in _leaves(exc):
        if isinstance(leaf, CheckpointError | TokenizerError):
            found.append((2, f"cannot load the model: {leaf}"))
        elif isinstance(leaf, LoraError):
            found.append((2, f"cannot serve a LoRA adapter: {leaf}"))
        elif isinstance(leaf, QuantizationUnavailable):
            found.append((1, str(leaf)))
        elif isinstance(leaf, SecretMismatch | SecretTooShort):
            found.append((2, str(leaf)))
        elif isinstance(leaf, PredictorBlobError):
            found.append((2, f"cannot load the Magnus length predictor (the one Redis holds, else "
                             f"--predictor-seed): {leaf}; replace the one in Redis with lmgate predictor import "
                             "FILE --redis-url URL --force"))
        elif isinstance(leaf, CacheUnavailable):
            # (what Redis refused — credentials, a database — or a TLS handshake's reason,
            # named: "is Redis running?" hid them)
            if (refused := redis_refusal(leaf.__cause__)) is not None:
                found.append((1, refused))
            elif (tls := _tls_failure(leaf)) is not None:
                found.append((1, f"{leaf}: TLS: {tls} (see --redis-url's ssl_* options in docs/deploy.md)"))
            else:
                found.append((1, f"{leaf} (is Redis running? see --redis-url)"))
        elif (refused := redis_refusal(leaf)) is not None:
            found.append((1, refused))
        elif isinstance(leaf, RedisServerError):
            found.append((1, f"cannot start the private redis-server: {leaf}"))
        elif isinstance(leaf, OSError) and leaf.errno == errno.EADDRINUSE:
            found.append((1, f"cannot listen on {where}: address already in use"))
        elif isinstance(leaf, OSError) and unbindable_host(leaf):
            found.append((2, f"cannot listen on {where}: {leaf.strerror or leaf} (see --host)"))
        elif isinstance(leaf, OSError) and _about_folder(leaf.filename, config.data_dir):
            found.append((2, f"cannot use the data dir {config.data_dir}: {leaf.strerror or leaf}: "
                             f"{os.fsdecode(leaf.filename)}"))
        elif _out_of_memory(leaf):
            found.append((1, f"out of memory (see --kv-cache-mb): {str(leaf).splitlines()[0]}"))
        else:
            return None
    return found[0] if found else None


def _cmd_serve(args: argparse.Namespace) -> int:
    """`lmgate serve`: check what can be checked before anything starts (settings, the server
    secret, the KV cache against the RAM, the port), then `gateway.server.run_serve`; a
    start-up failure is one line on stderr (`startup_failure`)."""
    from gateway.config import (
        ConfigError,
        config_from_args,
        kv_cache_unavailable,
        unknown_variables,
    )

    for name, closest in unknown_variables(os.environ):
        print(f"lmgate serve: warning: {name} is not a variable lmgate reads (ignored); did you mean {closest}?",
              file=sys.stderr)
    try:
        config = config_from_args(args)
        if (problem := kv_cache_unavailable(config.kv_cache_mb, config.device)) is not None:
            raise ConfigError(problem)
    except ConfigError as e:
        print(f"lmgate serve: {e}", file=sys.stderr)
        return 2
    try:
        check_bindable(config.host, config.port)
    except OSError as e:
        bad_host = unbindable_host(e)
        print(f"lmgate serve: cannot listen on {config.host}:{config.port}: {e.strerror or e}"
              f"{' (see --host)' if bad_host else ''}", file=sys.stderr)
        return 2 if bad_host else 1
    from gateway.server import run_serve
    from gpu.loader import checkpoint_kind, resolve_source
    from gpu.quantization import int8_unavailable_reason

    if config.quantization == "int8" and (why := int8_unavailable_reason(config.threads)) is not None:
        print(f"lmgate serve: int8 quantization is not available: {why}", file=sys.stderr)
        return 1
    try:
        checkpoint_kind(resolve_source(config.model))  # a missing model is said at once, before Redis starts
        return run_serve(args)
    except (Exception, BaseExceptionGroup) as e:
        failure = startup_failure(e, config)
        if failure is None:
            raise
        status, message = failure
        print(f"lmgate serve: {message}", file=sys.stderr)
        return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmgate",
        description="LLM serving gateway: continuous batching on a paged KV cache, per-tenant quotas, "
                    "response cache, SSE and WebSocket token streaming.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # (gateway.config, not gateway.server: the server pulls in torch, and --help should not wait for it)
    from gateway.config import add_config_arguments as add_serve_arguments
    from ops.cli import positive_int

    p = sub.add_parser("serve", help="run the gateway (OpenAI-compatible HTTP, SSE, WebSocket, admin API)",
                       epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(p)

    p = sub.add_parser("generate", help="generate offline with the engine (no server)")
    p.add_argument("prompt", nargs="*", help="prompts (each sent as a user chat message unless --raw)")
    p.add_argument("--file", help="read more prompts from a file, one per line")
    p.add_argument("--raw", action="store_true", help="feed prompts as raw text, without the chat template")
    p.add_argument("--max-tokens", type=positive_int, default=128, help="tokens per choice at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="(default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="(default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="(default 0: every token)")
    p.add_argument("-n", type=int, default=1, help="choices per prompt")
    p.add_argument("--beam-width", type=int, default=0, metavar="K",
                   help="decode by beam search with K beams and print the n best (0: sample)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: divide a hypothesis's summed logprob by its length to this power")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: none)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per choice")
    p.add_argument("--lora", metavar="PATH", help="run every prompt with this LoRA adapter (a PEFT folder)")
    g = p.add_argument_group("structured outputs (at most one)")
    g.add_argument("--json-schema", metavar="SCHEMA", help="the text is JSON valid against this schema (JSON text, "
                                                            "or @FILE)")
    g.add_argument("--json-object", action="store_true", help="the text is a JSON object")
    g.add_argument("--regex", help="the text is a whole match of this regular expression")
    g.add_argument("--choice", action="append", metavar="TEXT", help="the text is one of these (repeatable)")
    g.add_argument("--grammar", help="the text is a sentence of this Lark or GBNF grammar (or @FILE)")
    _add_engine_arguments(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("perplexity", help="perplexity of a text file under the model (no server)",
                       description="Perplexity of a UTF-8 text file: exp(-mean logprob of its tokens), scored "
                                   "in overlapping windows, all batched (Hugging Face's sliding-window method).")
    p.add_argument("file", help="a UTF-8 text file")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window (default: the context length - 1)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts; each token is scored with at least window - stride "
                        "tokens of context once past the first window; stride = window: windows that do "
                        "not overlap, each one's first token unscored (default: window / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the file's first N tokens (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_engine_arguments(p)
    p.set_defaults(func=_cmd_perplexity)

    p = sub.add_parser("convert", help="write a checkpoint as a Hugging Face folder (safetensors, or the "
                                       "loading-optimized lmg format)")
    p.add_argument("src", nargs="?", default="smollm2", help='"smollm2", a .gguf file, a HF folder or an lmg folder')
    p.add_argument("dst", help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the dtype the weights are stored in: store the one you serve (default: %(default)s)")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "lmg"],
                   help="weights as model.safetensors, or as model.lmg + index: one aligned file whose "
                        "views are the tensors, loaded without parsing or copying (docs/loading.md)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already in the output folder (its weights, of either format, are "
                        "removed); without it such a folder is refused")
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

    p = sub.add_parser("bench", help="benchmarks: engine, serving, scheduling, scoring, loading, ... (lmgate bench --help)")
    add_bench_arguments(p)
    return parser


def interrupted(error: BaseException) -> bool:
    """True for a KeyboardInterrupt, or a group of nothing else (trio's nurseries wrap it)."""
    if isinstance(error, BaseExceptionGroup):
        return all(interrupted(e) for e in error.exceptions)
    return isinstance(error, KeyboardInterrupt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        if args.command == "serve":
            try:
                return _cmd_serve(args)
            except BaseException as e:  # Ctrl-C during start-up, or a third stop signal: as a shell's 130
                if not interrupted(e):
                    raise
                print("lmgate serve: interrupted", file=sys.stderr)
                sys.stdout.flush()
                sys.stderr.flush()
                # at once: the engine may still be loading on a thread of its own, and torch's
                # threads torn down under it at the interpreter's exit abort the process
                os._exit(130)
        if args.command == "chat":
            from clients.cli import run_chat

            return run_chat(args)
        parser.print_help()
        return 2
    return func(args)


def run() -> None:
    """The `lmgate` command: `main`, then out at once, its output flushed. The interpreter's
    own teardown (torch's and the tokenizers' objects, a last garbage collection) took 2-4 s
    after a server had stopped, and a signal in that time killed the process silently."""
    import logging

    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # its reader has gone (`lmgate predictor show | head`): not an error to show
        code = 141  # (as a shell reports a process SIGPIPE ended)
    with contextlib.suppress(BrokenPipeError):  # (`2>&1 | head`)
        sys.stderr.flush()
        logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
