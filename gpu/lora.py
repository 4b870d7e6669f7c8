"""LoRA adapters: PEFT folders loaded on demand, many of them in one batch.

An adapter adds a low-rank update to some projections: ``y = x Wᵀ + s · (x Aᵀ) Bᵀ`` with
A (r, in), B (out, r) and s = alpha / r (alpha / √r with rsLoRA). The base weights are
never touched, so one engine serves the base model and any number of adapters in the
same step, each token with its own request's adapter (S-LoRA / Punica's multi-LoRA
batching; LoRAX loads adapters the first time a request names one).

Files: a PEFT LoRA folder, as `peft.PeftModel.save_pretrained` writes it::

    adapter_config.json        r, lora_alpha, use_rslora, ... (checked: see `read_config`)
    adapter_model.safetensors  base_model.model.model.layers.{i}.{self_attn,mlp}.{q,k,v,o,gate,up,down}_proj.lora_{A,B}.weight

What runs (`LoraBatch.apply_`, called by every `gpu.model.Linear`): the runner orders a
step's sequences by adapter within its decode and prefill parts, so each adapter's
tokens are at most two row ranges. A range of more than `GEMM_MIN_ROWS` rows (a prefill
chunk) gets two thin GEMMs per projection (rows × r, then rows × out) added into the
projection's output. Smaller ranges — a decode step's rows, a few per adapter — all go
through one fused CPU kernel call per projection (`gpu.layer_ops.lora_rows_`): two bf16
GEMMs per adapter and projection cost ~60 us of fixed overhead each, which made a mixed
decode step of 4 adapters 1.8x as long as the base model's. The engine's projections are
fused (QKV, gate/up): an adapter's A matrices of a fused group are stacked row-wise and
its B matrices placed block-diagonally, scale folded in, so a group costs one update
whatever subset of its projections the adapter targets.

With `--quantization int8` the model's projections read SmoothQuant-scaled inputs
(x / σ) and the V and up rows are scaled for the projection after them
(`gpu.model.LlamaModel.smooth_`); an adapter's A columns and B rows are scaled the same
way when it loads, so it computes the update it was trained to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu import layer_ops
from gpu.config import LoraConfig, ModelConfig, valid_adapter_name

log = logging.getLogger(__name__)

# Row ranges of more rows than this take the GEMM path, smaller ones the per-row kernel
# (module docstring): a decode step's rows per adapter sit well below it, a prompt chunk
# usually above. Not tuned: the end-to-end numbers are `python -m ops.bench_lora`'s.
GEMM_MIN_ROWS = 32

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT module name → (the engine's fused projection, which part of it)
_GROUP = {
    "q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1), "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                  r"\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


class LoraError(ValueError):
    """An adapter that cannot be served: unreadable, unsupported, or not for this model.

    `str(e)` names the file; `e.reason` says what is wrong without the server's paths
    (what a client is told)."""

    def __init__(self, where: object, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def _why(e: BaseException) -> str:
    """What went wrong reading a file, without its path (a client reads `reason`): an
    OSError's text names the file ("[Errno 13] Permission denied: '/srv/...'")."""
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return str(e)


class AdapterNotFound(LoraError):
    """No adapter of that name is configured (`--lora-module`) or in `--lora-dir`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"LoRA adapter {name!r}", "no adapter of that name is served")


def _parts(config: ModelConfig) -> dict[str, list[tuple[int, int]]]:
    """Fused projection → (in_features, out_features) of each of its parts, in row order."""
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return {"self_attn.qkv_proj": [(h, q), (h, kv), (h, kv)], "self_attn.o_proj": [(q, h)],
            "mlp.gate_up_proj": [(h, i), (h, i)], "mlp.down_proj": [(i, h)]}


def read_config(folder: Path) -> dict:
    """`adapter_config.json`, checked for what this engine computes: a plain LoRA (no DoRA,
    no bias, no extra trained modules, one alpha for every module, weights not transposed).
    Raises `LoraError` naming the field otherwise."""
    path = folder / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoraError(folder, f"no {CONFIG_FILE} (not a PEFT LoRA folder)") from None
    except (OSError, ValueError) as e:
        raise LoraError(path, f"unreadable ({_why(e)})") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise LoraError(path, "unreadable (nested too deeply)") from None
    if not isinstance(cfg, dict):
        raise LoraError(path, "expected a JSON object")
    checks = [
        (cfg.get("peft_type", "LORA") == "LORA", f"peft_type is {cfg.get('peft_type')!r}, only LORA is served"),
        (not cfg.get("use_dora"), "DoRA adapters (use_dora) are not supported"),
        (cfg.get("bias", "none") == "none", f"bias {cfg.get('bias')!r} is not supported (only 'none')"),
        (not cfg.get("lora_bias"), "lora_bias is not supported"),
        (not cfg.get("modules_to_save"), "modules_to_save (fully trained extra modules) is not supported"),
        (not cfg.get("fan_in_fan_out"), "fan_in_fan_out weights are not supported"),
        (not cfg.get("alpha_pattern"), "alpha_pattern (per-module alpha) is not supported"),
        (not cfg.get("layer_replication"), "layer_replication is not supported"),
        (not cfg.get("target_parameters"), "target_parameters (LoRA on raw parameters) is not supported"),
        (not cfg.get("trainable_token_indices"), "trainable_token_indices (trained embedding rows) is not supported"),
        (not cfg.get("alora_invocation_tokens"), "activated LoRA (alora_invocation_tokens) is not supported"),
        (not cfg.get("use_qalora") and not cfg.get("use_bdlora"), "QALoRA and BD-LoRA variants are not supported"),
        (isinstance(cfg.get("r"), int) and cfg["r"] > 0, "r must be a positive integer"),
        (_finite_number(cfg.get("lora_alpha")), "lora_alpha must be a finite number"),
        (_rank_pattern_ok(cfg.get("rank_pattern")), "rank_pattern must map module names to positive integers"),
    ]
    for ok, message in checks:
        if not ok:
            raise LoraError(path, message)
    return cfg


# PEFT's default target_modules for Llama-family models (a config that names none)
_DEFAULT_TARGETS = ("q_proj", "v_proj")


def _untargeted(cfg: dict, layer: int, module: str) -> str | None:
    """Why PEFT would not apply the config's LoRA to `module` of decoder layer `layer`
    (None: it would). As PEFT matches them: `target_modules` a list of names, each the
    module's name or a dotted suffix of its path, or a regex its whole path must match, or
    "all-linear"; none: the model type's defaults; `exclude_modules` (names or a regex, as
    targets) taken out again; `layers_to_transform` an index or a list."""
    path = f"model.layers.{layer}.{'self_attn' if module in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{module}"
    targets = cfg.get("target_modules")
    if targets is None:
        targets = list(_DEFAULT_TARGETS)
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                matched = re.fullmatch(targets, path) is not None
            except re.error:
                return f"target_modules {targets[:100]!r} is not a regular expression"
            if not matched:
                return f"target_modules {targets[:100]!r} does not match {path}"
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        if not any(path == t or path.endswith("." + t) for t in targets):
            return f"target_modules {sorted(targets)[:10]} does not name it"
    else:
        return "target_modules must be a list of module names or a regular expression"
    excluded = cfg.get("exclude_modules")  # matched as PEFT matches it: a regex or names/suffixes
    if isinstance(excluded, str):
        try:
            if re.fullmatch(excluded, path) is not None:
                return f"exclude_modules {excluded[:100]!r} matches {path}"
        except re.error:
            return f"exclude_modules {excluded[:100]!r} is not a regular expression"
    elif isinstance(excluded, list) and all(isinstance(t, str) for t in excluded):
        if any(path == t or path.endswith("." + t) for t in excluded):
            return f"exclude_modules {sorted(excluded)[:10]} names it"
    elif excluded is not None:
        return "exclude_modules must be a list of module names or a regular expression"
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        wanted = [layers] if isinstance(layers, int) else layers
        if not isinstance(wanted, list) or layer not in wanted:
            return f"layers_to_transform {layers!r} leaves layer {layer} out"
    return None


def _finite_number(x: object) -> bool:
    """A JSON number a float holds (an integer of 400 digits is a number, but not one that
    scales weights: `float` of it overflows)."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _rank_pattern_ok(pattern: object) -> bool:
    return pattern is None or (isinstance(pattern, dict) and all(
        isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in pattern.values()))


@dataclass(frozen=True, eq=False)  # identity: a batch groups rows by adapter object
class LoraAdapter:
    """One loaded adapter: for each targeted fused projection (``layers.3.mlp.gate_up_proj``),
    A (R, in) and B (out, R) with the scale folded into B, in the model's dtype and device
    (`weights`, for GEMMs) and, on a CPU, as float32 A (R, in), Bᵀ (R, out) and the output
    columns each rank row writes (R, 2) (`rows`, for `gpu.layer_ops.lora_rows_`)."""

    name: str
    path: Path
    rank: int  # the largest rank of any targeted module
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    rows: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    version: str = ""  # `folder_version` of the files it was read from (tells when to read them again)
    digest: str = ""  # a hash of the files' contents

    @property
    def key(self) -> str:
        """``name@digest``: what the engine's prefix cache and the response cache key it by,
        so an adapter whose files were replaced under the same name shares nothing cached
        with the one before — by content, not file times: replicas that hold copies of the
        same files (their times differ) share cached answers, and two versions written with
        the same times and sizes (a reproducible build) do not."""
        return f"{self.name}@{self.digest or self.version}"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for table in (self.weights, self.rows)
                   for pair in table.values() for t in pair)

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted(self.weights))


def _weights_file(folder: Path) -> Path:
    """The folder's safetensors weights; `LoraError` when it has none."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        bin_hint = " (adapter_model.bin is not read: convert it to safetensors)" if (folder / "adapter_model.bin").exists() else ""
        raise LoraError(folder, f"no {WEIGHTS_FILE}{bin_hint}")
    return path


def adapter_key(name: str, folder: Path, max_rank: int) -> str:
    """`LoraAdapter.key` of the adapter in `folder`, from its files alone (its digest, read
    in pieces): what `load_adapter` would key it by. Raises `LoraError` for a configuration
    this engine does not serve, a rank over `max_rank`, or no weights file."""
    cfg = read_config(folder)
    rank = max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()])
    if rank > max_rank:
        raise LoraError(folder, f"it has rank {rank}; this server allows up to {max_rank} (--max-lora-rank)")
    path = _weights_file(folder)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise LoraError(path, f"unreadable ({_why(e)})") from None
    with contextlib.suppress(OSError):
        digest.update((folder / CONFIG_FILE).read_bytes())
    return f"{name}@{digest.hexdigest()[:16]}"  # (as `load_adapter` keys it)


def folder_version(folder: Path) -> str:
    """The sizes and modification times of an adapter folder's two files, as one string:
    changes when either file is replaced. "" when either is missing."""
    try:
        stats = [(folder / f).stat() for f in (CONFIG_FILE, WEIGHTS_FILE)]
    except OSError:
        return ""
    return "-".join(f"{st.st_mtime_ns:x}.{st.st_size:x}" for st in stats)


def load_adapter(
    name: str, folder: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
    *, max_rank: int = 64, scales: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
) -> LoraAdapter:
    """Read a PEFT LoRA folder into fused per-projection weights (see the module docstring).

    `scales`: per fused projection, what SmoothQuant divided its input and its output rows
    by (`gpu.model.LlamaModel.smoothing_scales`); A's columns are multiplied by the first,
    B's rows divided by the second. Raises `LoraError`
    for anything this engine would not compute exactly as PEFT does."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    version = folder_version(folder)  # before reading: a file replaced meanwhile reloads next time
    cfg = read_config(folder)
    path = _weights_file(folder)
    try:
        data = path.read_bytes()
        tensors = load_bytes(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(path, f"unreadable ({_why(e)})") from None
    digest = hashlib.sha256(data)
    with contextlib.suppress(OSError):
        digest.update((folder / CONFIG_FILE).read_bytes())
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise LoraError(path, f"tensor {key!r} is not a LoRA A/B weight of a decoder projection "
                            "(adapters on embeddings, the LM head or norms are not supported)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= config.num_layers:
            raise LoraError(path, f"{key!r} is for layer {layer}; the model has {config.num_layers}")
        found.setdefault((layer, module), {})[ab] = t
    if not found:
        raise LoraError(path, "holds no LoRA weights")
    for layer, module in sorted(found):
        problem = _untargeted(cfg, layer, module)
        if problem is not None:
            raise LoraError(path, f"it holds weights for layer {layer} {module}, but {problem}: PEFT would not "
                            "apply them (fix the config or the weights)")
    alpha = float(cfg["lora_alpha"])
    ranks = {cfg["r"], *(cfg.get("rank_pattern") or {}).values()}
    parts = _parts(config)
    groups: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    rank = 0
    for (layer, module), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise LoraError(path, f"layer {layer} {module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        group, part = _GROUP[module]
        fan_in, fan_out = parts[group][part]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.shape != (r, fan_in) or b.shape != (fan_out, r) or r < 1:
            raise LoraError(path, f"layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                            f"do not fit a {fan_in} -> {fan_out} projection of this model")
        if r not in ranks:  # PEFT scales by the configured rank: weights of another one are not this config's
            raise LoraError(path, f"layer {layer} {module}: its weights have rank {r}, and the config says r = "
                            f"{cfg['r']}" + (" (rank_pattern: " + ", ".join(map(str, sorted(ranks - {cfg['r']})))
                                            + ")" if len(ranks) > 1 else ""))
        if not (a.is_floating_point() and b.is_floating_point()):
            raise LoraError(path, f"layer {layer} {module}: weights of dtype {a.dtype} and {b.dtype}; LoRA weights "
                            "are floating point")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoraError(path, f"layer {layer} {module}: weights that are not finite (NaN or infinity)")
        if r > max_rank:
            raise LoraError(path, f"layer {layer} {module} has rank {r}; this server allows up to "
                            f"{max_rank} (--max-lora-rank)")
        rank = max(rank, r)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        groups.setdefault(f"layers.{layer}.{group}", []).append((part, a.float(), b.float() * scale))
    weights, rows = {}, {}
    for name_, items in groups.items():
        group = name_.split(".", 2)[2]
        outs = [fan_out for _, fan_out in parts[group]]
        starts = [sum(outs[:k]) for k in range(len(outs))]
        a_all = torch.cat([a for _, a, _ in items])  # (R, in)
        b_all = torch.zeros(sum(outs), a_all.shape[0])
        span = torch.zeros(a_all.shape[0], 2, dtype=torch.int64)  # each rank row's output columns
        col = 0
        for part, a, b in items:
            b_all[starts[part]:starts[part] + outs[part], col:col + a.shape[0]] = b
            span[col:col + a.shape[0]] = torch.tensor([starts[part], starts[part] + outs[part]])
            col += a.shape[0]
        in_scale, out_scale = (scales or {}).get(name_, (None, None))
        if in_scale is not None:
            a_all = a_all * in_scale.float().cpu()
        if out_scale is not None:
            b_all = b_all / out_scale.float().cpu()[:, None]
        weights[name_] = (a_all.to(device, dtype).contiguous(), b_all.to(device, dtype).contiguous())
        if torch.device(device).type == "cpu":
            rows[name_] = (a_all.contiguous(), b_all.t().contiguous(), span)
    return LoraAdapter(name, folder, rank, weights, rows, version, digest.hexdigest()[:16])


_NONE = (torch.empty(0, 0), torch.empty(0, 0), torch.empty(0, 2, dtype=torch.int64))


class LoraBatch:
    """Which row ranges of one step use which adapter; `apply_` adds their updates.

    `segments`: (adapter, first row, end row), disjoint. Rows outside every segment
    (the base model's requests) get nothing added. Segments of more than
    `GEMM_MIN_ROWS` rows, or every segment off the CPU, run as GEMMs; the others through
    `gpu.layer_ops.lora_rows_`, one call per projection for all of them."""

    def __init__(self, segments: Iterable[tuple[LoraAdapter, int, int]], num_rows: int | None = None) -> None:
        self.segments = tuple(segments)
        small = [s for s in self.segments if s[2] - s[1] <= GEMM_MIN_ROWS and s[0].rows]
        self.gemm_segments = tuple(s for s in self.segments if not any(s is t for t in small))
        self.row_adapters: tuple[LoraAdapter, ...] = ()
        self.row_segment: torch.Tensor | None = None
        if small:
            rows = num_rows if num_rows is not None else max(end for _, _, end in self.segments)
            adapters = list(dict.fromkeys(adapter for adapter, _, _ in small))
            segment = torch.full((rows,), -1, dtype=torch.int32)
            for adapter, start, end in small:
                segment[start:end] = adapters.index(adapter)
            self.row_adapters, self.row_segment = tuple(adapters), segment

    def apply_(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out[rows] += x[rows] Aᵀ Bᵀ for each segment's adapter on projection `name`."""
        for adapter, start, end in self.gemm_segments:
            w = adapter.weights.get(name)
            if w is not None:
                out[start:end].add_(F.linear(F.linear(x[start:end], w[0]), w[1]))
        if self.row_segment is not None:
            parts = [adapter.rows.get(name, _NONE) for adapter in self.row_adapters]
            if any(p[0].numel() for p in parts):
                layer_ops.lora_rows_(out, x, self.row_segment, *(list(t) for t in zip(*parts, strict=True)))
        return out

    @classmethod
    def for_rows(cls, adapters: Iterable[LoraAdapter | None], counts: Iterable[int]) -> LoraBatch | None:
        """From each sequence's adapter (None: the base model) and its row count, in row
        order; adjacent sequences of one adapter merge into one segment. None when no
        sequence uses an adapter (the step then runs exactly as without LoRA)."""
        segments: list[list] = []
        row = 0
        for adapter, n in zip(adapters, counts, strict=True):
            if adapter is not None:
                if segments and segments[-1][0] is adapter and segments[-1][2] == row:
                    segments[-1][2] = row + n
                else:
                    segments.append([adapter, row, row + n])
            row += n
        return cls((tuple(s) for s in segments), row) if segments else None


def _config_ok(folder: Path, max_rank: int) -> bool:
    """Whether the folder's configuration is one this server serves, its ranks included."""
    try:
        cfg = read_config(folder)
    except LoraError:
        return False
    return max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()]) <= max_rank


class LoraManager:
    """The adapters a server may serve, loaded on first use and kept in an LRU of
    `config.max_loras`; one whose files changed since it loaded (`folder_version`) is
    loaded again on its next use.

    Names come from `config.modules` (name → folder) and, for any other valid name, from
    a folder of that name under `config.directory` (LoRAX-style: drop a folder in, name it
    in a request). An adapter evicted from the LRU stays alive for the requests that hold
    it (the engine keeps each live request's adapter object), so the cap bounds what is
    kept for future requests, not what running requests use. Thread-safe: the gateway
    loads adapters off the event loop while the engine steps."""

    def __init__(self, config: LoraConfig, model_config: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu", *,
                 scales: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None) -> None:
        self.config = config
        self.model_config = model_config
        self.dtype = dtype
        self.device = device
        self.scales = scales
        self._modules = {name: Path(p) for name, p in config.modules}
        self._directory = Path(config.directory) if config.directory else None
        if self._directory is not None and not self._directory.is_dir():
            raise LoraError(f"--lora-dir {self._directory}", "not a folder")
        self._loaded: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}  # per name, held while it loads
        # loads: read from disk (first use, or again after an eviction); reloads: read again
        # because its files changed; evictions: dropped from the LRU
        self.counters = {"loads": 0, "reloads": 0, "evictions": 0, "hits": 0, "load_seconds": 0.0}
        self._reserved: frozenset[str] = frozenset()
        self._keys: dict[str, tuple[str, str]] = {}  # name -> (folder_version, key): `key_of`
        for name in self._modules:  # loaded now: a broken adapter fails the start, not its first request
            self.get(name)

    @property
    def enabled(self) -> bool:
        return bool(self._modules) or self._directory is not None

    def reserve(self, names: Iterable[str]) -> None:
        """Names no adapter may have (the served model's own, set by the runtime): a
        configured adapter of such a name is refused, a folder under `--lora-dir` ignored."""
        self._reserved = frozenset(names)
        clash = sorted(self._reserved & set(self._modules))
        if clash:
            raise LoraError(f"LoRA adapter names {clash}", "they are the served model's own names: rename them")

    def folder(self, name: str) -> Path | None:
        """Where adapter `name` lives, None if there is no such adapter."""
        if name in self._reserved:
            return None
        if name in self._modules:
            return self._modules[name]
        if self._directory is None or not valid_adapter_name(name):
            return None
        folder = self._directory / name
        return folder if (folder / CONFIG_FILE).is_file() else None

    def names(self) -> list[str]:
        """Every adapter a request may name now: configured ones, then those under the folder
        whose configuration reads as a servable LoRA of a rank this server allows (its
        weights are checked when it loads)."""
        found = [n for n in self._modules if n not in self._reserved]
        if self._directory is not None:
            try:
                entries = sorted(p.name for p in self._directory.iterdir())
            except OSError:
                entries = []
            for n in entries:
                folder = None if n in self._modules else self.folder(n)
                if folder is not None and _config_ok(folder, self.config.max_rank):
                    found.append(n)
        return found

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def key_of(self, name: str) -> str:
        """The key (`LoraAdapter.key`) adapter `name` would load with, without loading it: from
        the LRU, else from its files (`adapter_key`; remembered per `folder_version`). What
        admission needs of a request naming an adapter: it loaded each in full (233 MB for a
        rank-64 adapter on every projection), all at once and before `max_loras` applies, and
        each such load pushed an adapter the engine was running out of the LRU. Raises
        `AdapterNotFound`, or `LoraError` for a folder whose configuration or files cannot be
        served (its weights' values are checked when it loads: a request that then fails
        gets the same 400)."""
        folder = self.folder(name)
        if folder is None:
            raise AdapterNotFound(name)
        version = folder_version(folder)
        with self._lock:
            hit = self._loaded.get(name)
            if hit is not None and hit.version == version:
                return hit.key
            known = self._keys.get(name)
        if known is not None and known[0] == version and version:
            return known[1]
        key = adapter_key(name, folder, self.config.max_rank)
        with self._lock:
            self._keys[name] = (version, key)
        return key

    def is_current(self, name: str) -> bool:
        """Whether `get(name)` would find the adapter in the LRU, its files unchanged (no
        load): a caller on an event loop loads it in a worker thread first when not."""
        folder = self.folder(name)
        if folder is None:
            return False
        with self._lock:
            hit = self._loaded.get(name)
        return hit is not None and hit.version == folder_version(folder)

    def get(self, name: str) -> LoraAdapter:
        """The adapter, loaded now if it is not in the LRU. Raises `AdapterNotFound` or
        `LoraError`."""
        folder = self.folder(name)
        if folder is None:
            raise AdapterNotFound(name)
        found, hit = self._cached(name, folder)
        if found is not None:
            return found
        with self._lock:
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # one load of a name at a time: requests for it that arrive meanwhile wait for it
            found, again = self._cached(name, folder)
            if found is not None:
                return found
            return self._load(name, folder, hit if again is None else again)

    def _cached(self, name: str, folder: Path) -> tuple[LoraAdapter | None, LoraAdapter | None]:
        """(the adapter from the LRU if its files are unchanged, else None; what the LRU held)."""
        with self._lock:
            hit = self._loaded.get(name)
            if hit is not None and hit.version == folder_version(folder):
                self._loaded.move_to_end(name)
                self.counters["hits"] += 1
                return hit, hit
            if hit is not None:  # its files were replaced: read them again
                del self._loaded[name]
            return None, hit

    def _load(self, name: str, folder: Path, hit: LoraAdapter | None) -> LoraAdapter:
        t0 = time.perf_counter()
        adapter = load_adapter(name, folder, self.model_config, self.dtype, self.device,
                               max_rank=self.config.max_rank, scales=self.scales)
        seconds = time.perf_counter() - t0
        with self._lock:
            # what `key_of` answers once it is evicted: these contents' key, not the one read
            # before (files rewritten with the same sizes and times keep their version)
            self._keys[name] = (adapter.version, adapter.key)
            if name in self._loaded and self._loaded[name].version == adapter.version:
                self._loaded.move_to_end(name)  # another thread loaded it meanwhile: keep one copy
                return self._loaded[name]
            self._loaded[name] = adapter
            self.counters["reloads" if hit is not None else "loads"] += 1
            self.counters["load_seconds"] += seconds
            while len(self._loaded) > self.config.max_loras:
                evicted, _ = self._loaded.popitem(last=False)
                self.counters["evictions"] += 1
                log.info("LoRA adapter %r evicted (LRU of %d)", evicted, self.config.max_loras)
        log.info("LoRA adapter %r loaded from %s in %.0f ms: rank %d, %d projections, %.1f MB", name, folder,
                 seconds * 1e3, adapter.rank, len(adapter.weights), adapter.nbytes / 1e6)
        return adapter
