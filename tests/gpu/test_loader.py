"""Checkpoint loading: GGUF → HF layout, HF folders (sharded or not), conversion round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gpu.config import ModelConfig
from gpu.convert import convert_checkpoint, hf_config_dict
from gpu.loader import (
    CheckpointError,
    expected_shapes,
    load_checkpoint,
    resolve_eos_token_ids,
    unpermute_qk,
    weights_fingerprint,
)


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_path):
    return load_checkpoint(str(smollm2_path), torch.float32)


# ------------------------------------------------------------------ pure pieces


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `permute` (HF → GGUF), written independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(n_head):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_like_llama_cpp(w, n_head), n_head), w)
    assert not np.array_equal(permute_like_llama_cpp(w, n_head), w)


def test_unpermute_rejects_rows_not_divisible_into_heads():
    with pytest.raises(CheckpointError):
        unpermute_qk(np.zeros((10, 4), np.float32), 3)


def test_eos_ids_include_end_of_turn_used_by_template_and_end_of_document():
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "a"]
    template = "{{ '<|im_start|>' + m + '<|im_end|>' }}"
    assert resolve_eos_token_ids([2], tokens, template) == (2, 0)
    # declared first, <|eot_id|> ignored because the template does not use it
    assert resolve_eos_token_ids([0], tokens, template) == (0, 2)
    assert resolve_eos_token_ids([4], tokens, None) == (4, 0)


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(str(tmp_path / "nope"), torch.float32)
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(str(tmp_path), torch.float32)


def test_sharded_hf_folder_loads(tmp_path):
    cfg = ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
        tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
    )
    g = torch.Generator().manual_seed(0)
    sd = {name: torch.randn(shape, generator=g) for name, shape in expected_shapes(cfg).items()}
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg, "float32")))

    ckpt = load_checkpoint(str(tmp_path), torch.bfloat16)
    assert ckpt.config.num_kv_heads == 2 and ckpt.config.eos_token_ids == (2,)
    assert not ckpt.config.tie_word_embeddings
    assert ckpt.tokenizer_dir is None and ckpt.tokenizer_metadata is None
    assert set(ckpt.state_dict) == set(sd)
    for k, v in sd.items():
        assert ckpt.state_dict[k].dtype == torch.bfloat16
        assert torch.equal(ckpt.state_dict[k], v.to(torch.bfloat16))


def test_missing_tensor_is_reported(tmp_path):
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1)
    sd = {name: torch.zeros(shape) for name, shape in expected_shapes(cfg).items()}
    del sd["model.layers.0.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg, "float32")))
    with pytest.raises(CheckpointError, match="up_proj"):
        load_checkpoint(str(tmp_path), torch.float32)


def test_broken_safetensors_folders_are_checkpoint_errors_naming_the_file(tmp_path):
    """Each was a traceback from `lmgate serve`, `generate` and `convert` (an audit)."""
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1)
    sd = {name: torch.zeros(shape) for name, shape in expected_shapes(cfg).items()}
    config = json.dumps(hf_config_dict(cfg, "float32"))
    cases = {"truncated": None, "no-shard": {"weight_map": {"x": "model-00001-of-00002.safetensors"}},
             "bad-index": {"weights": {}}, "bad-tokenizer": None}
    for name, index in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(config)
        save_file(sd, str(folder / "model.safetensors"))
        if index is not None:
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    data = (tmp_path / "truncated" / "model.safetensors").read_bytes()
    (tmp_path / "truncated" / "model.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "bad-tokenizer" / "tokenizer.json").write_text('{"added_tokens": [{"id": "x"}]')
    for name, message in [("truncated", r"truncated/model.safetensors: unreadable"),
                          ("no-shard", "names shards that are not there: model-00001-of-00002"),
                          ("bad-index", "not a usable shard index"),
                          ("bad-tokenizer", r"bad-tokenizer/tokenizer.json: not a usable tokenizer file")]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(str(tmp_path / name), torch.float32)


def test_a_gguf_without_a_size_it_needs_is_a_checkpoint_error():
    from gpu.loader import _gguf_config

    fields = {"general.architecture": "llama", "llama.attention.head_count": 2, "llama.embedding_length": 8,
              "llama.block_count": 1, "llama.vocab_size": 8}  # no feed_forward_length (a TypeError before)
    with pytest.raises(CheckpointError, match="GGUF metadata lacks llama.feed_forward_length"):
        _gguf_config(fields, False, None)


def test_a_generation_config_that_does_not_read_is_named_not_config_json(tmp_path):
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg, "float32")))
    for content in ("[]", '{"eos_token_id": '):  # (a list was an AttributeError's traceback)
        (tmp_path / "generation_config.json").write_text(content)
        with pytest.raises(CheckpointError, match="generation_config.json: not a usable generation config"):
            load_checkpoint(str(tmp_path), torch.float32)


def test_gguf_sizes_that_make_no_model_are_checkpoint_errors(tmp_path):
    from gpu.loader import _gguf_config

    fields = {"general.architecture": "llama", "llama.attention.head_count": 0, "llama.embedding_length": 8,
              "llama.block_count": 1, "llama.vocab_size": 8, "llama.feed_forward_length": 8}
    with pytest.raises(CheckpointError, match="llama.attention.head_count is 0: a size must be positive"):
        _gguf_config(fields, False, None)  # (a ZeroDivisionError's traceback before)


def test_a_chat_template_kept_beside_the_tokenizer_is_read_and_carried(tmp_path, smollm2_path):
    """transformers now saves the template as chat_template.jinja: a converted copy (and the
    model cache's) lost it, and every chat after the first start failed."""
    from gpu.tokenizer import TokenizerError, load_tokenizer

    src = convert_checkpoint(str(smollm2_path), tmp_path / "hf", dtype="float32", progress=False)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "chat_template.jinja").write_text(config.pop("chat_template"))
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    assert "<|im_start|>" in (load_tokenizer(src).chat_template or "")
    copy = convert_checkpoint(str(src), tmp_path / "copy", dtype="float32", progress=False, fmt="lmg")
    assert load_tokenizer(copy).chat_template == load_tokenizer(src).chat_template
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")  # does not compile
    with pytest.raises(TokenizerError, match="does not compile"):
        load_tokenizer(src)
    (src / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(TokenizerError, match="chat_template.jinja: unreadable"):
        load_tokenizer(src)


def test_a_tokenizer_json_the_library_cannot_read_is_a_tokenizer_error(tmp_path):
    from gpu.tokenizer import TokenizerError, load_tokenizer

    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a usable tokenizer"):
        load_tokenizer(tmp_path)


def test_the_served_name_of_a_folder_given_as_a_relative_path(tmp_path, monkeypatch):
    from actors.runtime import served_model_name

    monkeypatch.chdir(tmp_path)
    assert served_model_name(".") == tmp_path.name  # (it was "")
    (tmp_path / "current").symlink_to(tmp_path)
    assert served_model_name("current") == "current"  # a symlink keeps its own name
    assert served_model_name("/") == "model"
    assert served_model_name("SmolLM2") == "SmolLM2-135M-Instruct"  # the alias, as the loader matches it
    assert served_model_name(str(tmp_path / "m.gguf")) == "m"


# ------------------------------------------------------------------ real SmolLM2


@pytest.mark.slow
def test_smollm2_config(smollm2_fp32):
    c = smollm2_fp32.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (49152, 576, 1536, 30)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (9, 3, 64)
    assert c.rope_theta == 100000.0
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.max_position_embeddings == 8192
    assert c.tie_word_embeddings
    assert c.bos_token_id == 1
    # <|im_end|> (the GGUF's eos, closes every chat turn) then <|endoftext|>
    assert c.eos_token_ids == (2, 0)
    meta = smollm2_fp32.tokenizer_metadata
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(meta["tokenizer.ggml.merges"]) == 48900
    assert "<|im_end|>" in meta["tokenizer.chat_template"]


@pytest.mark.slow
def test_smollm2_tensors_have_hf_names_and_shapes(smollm2_fp32):
    sd = smollm2_fp32.state_dict
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(smollm2_fp32.config)
    assert "lm_head.weight" not in sd
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers_dequantization(smollm2_fp32, hf_reference):
    """Same names, same values (Q/K un-permuted the same way) as transformers' GGUF loader."""
    ref = hf_reference.state_dict()
    for name, tensor in smollm2_fp32.state_dict.items():
        assert torch.equal(tensor, ref[name]), name


@pytest.mark.slow
def test_convert_round_trip(smollm2_path, tmp_path):
    dst = convert_checkpoint(str(smollm2_path), tmp_path / "smollm2-bf16", dtype="bfloat16", progress=False)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in Path(dst).iterdir()
    }
    modes = {p.name: p.stat().st_mode & 0o777 for p in Path(dst).iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]  # (safetensors wrote 0600: others could not serve it)
    original = load_checkpoint(str(smollm2_path), torch.bfloat16)
    converted = load_checkpoint(str(dst), torch.bfloat16)
    assert converted.config == original.config
    assert converted.tokenizer_dir == dst
    assert "<|im_end|>" in json.loads((dst / "tokenizer_config.json").read_text())["chat_template"]
    assert set(converted.state_dict) == set(original.state_dict)
    for name, tensor in original.state_dict.items():
        assert torch.equal(converted.state_dict[name], tensor), name


def test_the_weights_fingerprint_tells_other_weights_apart_whatever_their_order():
    """The response cache keys a served name by it: a checkpoint swapped behind a fixed
    --served-model-name must not be answered from the old weights' entries."""
    torch.manual_seed(0)
    weights = {"a.weight": torch.randn(300, 7), "b.weight": torch.randn(5), "c.bias": torch.randn(200)}
    same = dict(reversed(list((k, v.clone()) for k, v in weights.items())))
    assert weights_fingerprint(weights) == weights_fingerprint(same)
    tuned = {**weights, "a.weight": weights["a.weight"] + 1e-3}
    assert weights_fingerprint(tuned) != weights_fingerprint(weights)
    reshaped = {**weights, "a.weight": weights["a.weight"].reshape(7, 300)}
    assert weights_fingerprint(reshaped) != weights_fingerprint(weights)
    renamed = {("z.weight" if k == "a.weight" else k): v for k, v in weights.items()}
    assert weights_fingerprint(renamed) != weights_fingerprint(weights)
    assert len(weights_fingerprint(weights)) == 16
