"""Convert any loadable checkpoint into a Hugging Face Llama folder.

The output is what `gpu.loader.load_hf_folder` (and transformers) read::

    dst/
      config.json              LlamaForCausalLM fields; eos_token_id = every stop id
      model.safetensors        HF names, dequantized, in the chosen dtype
      tokenizer.json           when the source has a tokenizer (GGUF: rebuilt by
      tokenizer_config.json      gpu.tokenizer; HF folder: copied)

Why: a GGUF is dequantized on every start (~4 s for SmolLM2 and an extra copy
of each tensor); the converted folder memory-maps straight into torch tensors.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gpu.config import ModelConfig
from gpu.fastload import DATA_FILE, DTYPE_NAMES, INDEX_FILE, is_lmg_folder, write_lmg
from gpu.loader import Checkpoint, CheckpointError, load_checkpoint, load_lmg_folder, resolve_source
from gpu.tokenizer import TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")  # (where transformers now saves the template)


def hf_config_dict(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """`config.json` content for a LlamaForCausalLM with `config`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "name": config.name,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


FORMATS = ("safetensors", "lmg")


def convert_checkpoint(src: str, dst: Path, dtype: str = "float32", progress: bool = True,
                       fmt: str = "safetensors", overwrite: bool = False) -> Path:
    """Write `src` ("smollm2", a .gguf or a HF folder) as a HF folder at `dst`; returns `dst`.

    `dst` is created if needed. A `dst` that already holds a checkpoint's weights is
    refused (ValueError) unless `overwrite`: then the new weights replace them, and the
    other layout's weight files are removed, since a loader would pick a stale lmg index
    or shard index over the new `model.safetensors`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    source = resolve_source(src)
    dst = Path(dst)
    if dst.resolve() == source.resolve():
        raise ValueError(f"destination {dst} is the source folder")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {dst} is a file, not a folder")
    held = weight_files(dst)
    if held and not overwrite:
        raise ValueError(f"{dst} already holds a checkpoint ({', '.join(p.name for p in held[:3])}"
                         f"{', ...' if len(held) > 3 else ''}); --overwrite replaces it")
    made = not dst.exists()
    try:  # the folder is made before the model is loaded: an unwritable place fails now, not after it
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {dst}: {e.strerror or e}") from None
    try:
        ckpt = load_checkpoint(src, DTYPES[dtype], progress=progress)
        try:
            load_tokenizer(ckpt)  # (a folder's tokenizer files are copied: one that cannot load is said now)
        except TokenizerError as e:
            raise ValueError(str(e)) from None
        write_folder(ckpt, source, dst, fmt)
    except BaseException:
        if made and dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()  # (a failed conversion left an empty folder behind)
        raise
    return dst


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint weight files (and their indexes) in `folder`: what a loader reads from a
    folder (a .gguf beside them is not one: folders load as lmg or safetensors)."""
    if not folder.is_dir():
        return []
    names = {DATA_FILE, INDEX_FILE, SAFETENSORS_INDEX}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.name in names or p.suffix == ".safetensors"))


def write_folder(ckpt: Checkpoint, source: Path, dst: Path, fmt: str) -> None:
    """Write a loaded checkpoint (of `source`) as a folder in `fmt`: weights, config.json, tokenizer.

    Weights are written beside their final name and moved into place, so a process that
    has the old file mapped keeps it intact; then weight files of any other layout are
    removed (indexes first), leaving one checkpoint a loader cannot mistake."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in ckpt.state_dict.items()}
    if fmt == "lmg":
        write_lmg(tensors, dst)
        keep = {DATA_FILE, INDEX_FILE}
    else:
        tmp = dst / f".{SAFETENSORS_FILE}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600: another user could not serve the folder
        os.replace(tmp, dst / SAFETENSORS_FILE)
        keep = {SAFETENSORS_FILE}
    stale = [p for p in weight_files(dst) if p.name not in keep]
    for path in sorted(stale, key=lambda p: not p.name.endswith(".json")):  # indexes before data
        path.unlink(missing_ok=True)
    dtype = DTYPE_NAMES[next(iter(tensors.values())).dtype]
    (dst / "config.json").write_text(json.dumps(hf_config_dict(ckpt.config, dtype), indent=2) + "\n")
    _write_tokenizer(ckpt, source, dst)


def _write_tokenizer(ckpt: Checkpoint, source: Path, dst: Path) -> None:
    """Copy a HF folder's tokenizer files, or rebuild them from GGUF metadata."""
    if ckpt.tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (ckpt.tokenizer_dir / name).is_file():
                shutil.copyfile(ckpt.tokenizer_dir / name, dst / name)
        return
    if ckpt.tokenizer_metadata is None:
        return  # a HF folder without tokenizer: nothing to carry over
    from gpu.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)
    (dst / "tokenizer.json").write_text(tokenizer.to_hf_tokenizer_json())
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer.to_hf_tokenizer_config(), indent=2) + "\n")


# ------------------------------------------------------------------ the model cache
def source_fingerprint(source: Path) -> str:
    """What identifies a checkpoint's version: its path, and each file's name, size and mtime."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    parts = [str(source.resolve())] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_cached(src: str, dtype: torch.dtype, cache_dir: Path) -> Checkpoint:
    """`load_checkpoint(src, dtype)` through a cache of lmg folders in `cache_dir`.

    The first load of a source (a GGUF or a safetensors folder) in a dtype also writes it
    there in the loading-optimized format (`gpu.fastload`), under a name that holds its
    fingerprint (`source_fingerprint`); later loads read that copy instead: the bundled
    GGUF, dequantized at every start otherwise (~2.6 s on an AMX Xeon), loads in ~0.1 s
    (docs/loading.md). A changed source gets a new entry and the old one is removed. An lmg
    source is loaded as it is. The cache never stops a load: an entry that cannot be
    written or read is reported in the log and the source is used.
    """
    source = resolve_source(src)
    if is_lmg_folder(source) or dtype not in DTYPE_NAMES:
        return load_checkpoint(src, dtype)
    # the source's name and where it is (two checkpoint-1000 folders, or two model.gguf, must
    # not take each other's entries), the dtype, then what it holds
    where = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:8]  # (a symlink flipped: the same)
    prefix = f"{source.stem}-{DTYPE_NAMES[dtype]}-{where}-"
    entry = cache_dir / (prefix + source_fingerprint(source))
    if is_lmg_folder(entry):
        try:
            ckpt = load_lmg_folder(entry, dtype)
            load_tokenizer(ckpt)  # (the engine's next step: a damaged one must not stop every start)
            log.info("model: %s from its loading-optimized copy %s", src, entry)
            return ckpt
        except (CheckpointError, TokenizerError, OSError) as e:
            log.warning("model cache: %s is unusable (%s); loading %s and writing it again", entry, e, src)
            shutil.rmtree(entry, ignore_errors=True)
    ckpt = load_checkpoint(src, dtype)
    try:
        _write_entry(ckpt, source, entry)
    except OSError as e:
        log.warning("model cache: cannot write %s (%s); later starts load %s again", entry, e, src)
        return ckpt
    for old in cache_dir.glob(glob.escape(prefix) + "*"):  # earlier versions of this source
        if old != entry and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    log.info("model: wrote a loading-optimized copy of %s to %s", src, entry)
    return ckpt


def _write_entry(ckpt: Checkpoint, source: Path, entry: Path) -> None:
    """Write `ckpt` as an lmg folder at `entry`, atomically (a temporary folder renamed)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_folder(ckpt, source, tmp, "lmg")
        try:
            tmp.rename(entry)
        except OSError:
            if not is_lmg_folder(entry):  # else another process wrote the same entry first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
