"""transformers' model of the bundled GGUF, the reference of benchmarks and tests,
converted once and kept.

Benchmarks and tests compare lmgate with Hugging Face transformers running the same
weights. transformers reads a GGUF with its own loader (gguf's reader, then a
tensor-name map built over every architecture it knows): about 13 s for SmolLM2 on
these machines, paid by every benchmark and test module that loads it. So the first load
saves what transformers built (safetensors, config, generation config, tokenizer:
what `save_pretrained` writes, which transformers refuses for a model read from a GGUF)
into a cache folder, and later loads read that folder (about 0.3 s). The tensors are the
ones transformers dequantized, stored as they are (tests/ops/test_hf_reference.py checks
them against `gpu.loader`'s, bit for bit).

The cache: `$LMGATE_HF_CACHE`, else `~/.cache/lmgate/hf-reference`; one folder per
GGUF (its path, size and modification time), transformers version and dtype. A copy
is written to a temporary folder and renamed, so no reader sees half of one; a copy
that does not load is deleted and written again; a cache that cannot be written is
skipped (the model is loaded from the GGUF, as before). Only loading is cached, never
a result.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_root", "load_model", "load_tokenizer", "reference_folder"]

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted copies are kept (`$LMGATE_HF_CACHE`, else ~/.cache/lmgate/hf-reference)."""
    return Path(os.environ.get("LMGATE_HF_CACHE") or Path.home() / ".cache" / "lmgate" / "hf-reference")


def _gguf() -> Path:
    from gpu.loader import bundled_gguf_path

    return bundled_gguf_path()


def _key(path: Path, dtype: torch.dtype) -> str:
    import transformers

    st = path.stat()
    fingerprint = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{dtype}"
    return f"{path.stem}-{str(dtype).removeprefix('torch.')}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"


def _from_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def _save(model: Any, folder: Path) -> None:
    """What `save_pretrained` would write, which transformers refuses for a model it read
    from a GGUF (it counts as quantized, though its tensors are plain floats)."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})  # tied weights stored once


def reference_folder(dtype: torch.dtype = torch.float32) -> Path | None:
    """The cached copy for `dtype`, written first if missing; None when the cache cannot
    be written (the caller loads from the GGUF)."""
    path = _gguf()
    folder = cache_root() / _key(path, dtype)
    if (folder / "config.json").is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as e:
        log.warning("transformers reference not cached (%s): loading it from the GGUF", e)
        return None
    try:
        model, tokenizer = _from_gguf(path, dtype)
        _save(model, tmp)
        tokenizer.save_pretrained(tmp)
        for stale in folder.parent.glob(f"{path.stem}-{str(dtype).removeprefix('torch.')}-*"):
            if stale != folder and not stale.name.startswith("."):
                shutil.rmtree(stale, ignore_errors=True)  # an older GGUF or transformers
        os.replace(tmp, folder)
    except OSError as e:
        if not (folder / "config.json").is_file():  # not another process winning the rename
            log.warning("transformers reference not cached (%s): loading it from the GGUF", e)
            return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model(dtype: torch.dtype = torch.float32) -> Any:
    """transformers' `LlamaForCausalLM` of the bundled GGUF in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = reference_folder(dtype)
    if folder is not None:
        try:
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
        except Exception as e:  # whatever a damaged copy raises (safetensors has its own errors)
            log.warning("cached transformers reference %s does not load (%s): writing it again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)  # the next load writes it again
    return _from_gguf(_gguf(), dtype)[0]


def load_tokenizer() -> Any:
    """transformers' tokenizer of the bundled GGUF (as `AutoTokenizer` builds it from the GGUF)."""
    from transformers import AutoTokenizer

    folder = reference_folder(torch.float32)
    if folder is not None:
        return AutoTokenizer.from_pretrained(str(folder))
    path = _gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
