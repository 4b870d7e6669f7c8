"""Shared fixtures: the bundled SmolLM2 GGUF and a transformers reference model.

Both are session-scoped: the reference takes ~15 s to load, so every test
module that compares against it shares one instance (treat it as read-only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)  # the test machines have 2 cores, shared


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct Q4_1 GGUF (no download)."""
    from gpu.loader import bundled_gguf_path

    return bundled_gguf_path()


@pytest.fixture(scope="session")
def hf_reference(smollm2_path: Path):
    """transformers `LlamaForCausalLM` loaded from the same GGUF, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, torch_dtype=torch.float32
    )
    return model.eval()
