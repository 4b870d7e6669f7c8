"""Instruction embeddings (all-MiniLM-L6-v2, bundled): what the Magnus predictor reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.embeddings import InstructionEmbedder
from gpu.engine import resolve_dtype

pytestmark = pytest.mark.slow

TEXTS = [
    "You are a translator.\nTranslate into French: the cat sat on the mat.",
    "You are a translator.\nTranslate into Spanish: my neighbour sold a bicycle.",
    "You are a creative writer.\nWrite a story about a dragon in 8 sentences.",
    "You fix grammar.\nCorrect this: she go to school every days and dont like it.",
    "You write code.\nTranslate this Python to JavaScript: def add(a, b): return a + b",
]


@pytest.fixture(scope="module")
def float32() -> InstructionEmbedder:
    return InstructionEmbedder(dtype="float32")


def test_minilm_embeddings_group_instructions_by_application(float32):
    v = float32.embed(TEXTS[:3])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_bfloat16_encoder_gives_float32_vectors_of_the_same_direction(float32):
    bf16 = InstructionEmbedder(dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    a, b = float32.embed(TEXTS), bf16.embed(TEXTS)
    assert b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = (a * b).sum(1)
    assert cos.min() > 0.999, cos  # measured ≥ 0.9999 over the workload's 716 instructions


def test_auto_follows_the_engines_cpu_rule():
    emb = InstructionEmbedder()  # dtype="auto", what the server loads
    assert emb.dtype == resolve_dtype("auto", "cpu")
    assert next(emb.model.parameters()).dtype == emb.dtype


def test_an_unknown_dtype_is_refused_before_loading():
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        InstructionEmbedder(dtype="float16")
