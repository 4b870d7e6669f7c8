"""ops.hf_reference: transformers' model of the bundled GGUF, kept converted. Its tensors
are the GGUF's (as gpu.loader dequantizes them, bit for bit); a kept copy is read
without converting again, and a damaged or stale one is replaced."""

from __future__ import annotations

import logging

import pytest
import torch

import ops.hf_reference as kept
from gpu.loader import load_checkpoint

pytestmark = pytest.mark.slow


def test_the_reference_holds_the_gguf_s_tensors(hf_reference):  # the session's, read through the cache
    ours = load_checkpoint("smollm2", torch.float32).state_dict
    theirs = hf_reference.state_dict()
    assert set(theirs) == set(ours) | {"lm_head.weight"}  # tied to the embeddings
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name
    assert hf_reference.lm_head.weight.data_ptr() == hf_reference.model.embed_tokens.weight.data_ptr()


def test_a_copy_is_written_once_read_after_and_replaced_when_damaged(hf_reference, tmp_path, monkeypatch, caplog):
    tokenizer = kept.load_tokenizer()  # from the session's cache, before LMGATE_HF_CACHE moves
    monkeypatch.setenv("LMGATE_HF_CACHE", str(tmp_path))
    conversions = []

    def convert(path, dtype):  # what transformers' GGUF loader gives, without its 13 s
        conversions.append(dtype)
        return hf_reference, tokenizer

    monkeypatch.setattr(kept, "_from_gguf", convert)
    stale = tmp_path / "SmolLM2-135M-Instruct.Q4_1-float32-0123456789abcdef"  # an older transformers' copy
    stale.mkdir()
    first = kept.load_model(torch.float32)
    assert conversions == [torch.float32]
    [folder] = list(tmp_path.iterdir())  # the stale copy is gone, no temporary folder is left
    assert folder != stale and (folder / "model.safetensors").is_file()
    again = kept.load_model(torch.float32)
    assert conversions == [torch.float32]  # read, not converted
    ids = torch.tensor([[1, 200, 3000, 45]])
    with torch.no_grad():
        want = hf_reference(ids).logits
        assert torch.equal(first(ids).logits, want) and torch.equal(again(ids).logits, want)
    assert kept.load_tokenizer()("hello world").input_ids == tokenizer("hello world").input_ids

    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with caplog.at_level(logging.WARNING, logger="ops.hf_reference"):
        kept.load_model(torch.float32)  # the GGUF's model all the same
    assert "does not load" in caplog.text and not folder.exists()
    kept.load_model(torch.float32)
    assert conversions == [torch.float32] * 3 and (folder / "model.safetensors").is_file()
