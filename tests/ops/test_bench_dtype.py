"""ops.bench_dtype: the teacher-forced path reproduces greedy decoding; the report's numbers."""

from __future__ import annotations

import json

import pytest
import torch

from ops.bench_dtype import first_divergence, kl_and_top1

pytestmark = pytest.mark.usefixtures("free_engines")  # engines: see tests/conftest.py


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # a prefix diverges where it ends
    assert first_divergence([], []) is None


def test_kl_and_top1():
    a = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    kl, agree = kl_and_top1(a, a)
    assert torch.allclose(kl, torch.zeros(2), atol=1e-7) and agree.all()
    b = torch.tensor([[0.0, 2.0, -1.0], [0.0, 1.0, 0.0]])
    kl, agree = kl_and_top1(a, b)
    assert kl[0] > 0.5 and abs(float(kl[1])) < 1e-7
    assert agree.tolist() == [False, True]


@pytest.mark.slow
def test_teacher_forced_logits_reproduce_greedy_generation():
    """Feeding float32's own greedy continuation back, one batched decode step per position,
    must predict exactly that continuation: the path the KL is measured on is the serving path."""
    from gpu.config import CacheConfig, EngineConfig
    from gpu.engine import Engine, generate
    from gpu.loader import load_checkpoint
    from gpu.runner import ModelRunner
    from gpu.sampling import SamplingParams
    from ops.bench_dtype import BLOCK_SIZE, teacher_forced_logits

    engine = Engine(EngineConfig(dtype="float32", num_threads=2, cache=CacheConfig(cache_bytes=16 * 1024**2)))
    prompts = [engine.tokenizer.encode(t) for t in ("The capital of France is", "1, 2, 3,", "Hello")]
    conts = [list(o[0].token_ids) for o in generate(engine, prompts, SamplingParams(temperature=0, max_tokens=7))]
    runner = ModelRunner(load_checkpoint("smollm2", torch.float32), num_blocks=16, block_size=BLOCK_SIZE,
                         dtype=torch.float32)
    logits = teacher_forced_logits(runner, list(zip(prompts, conts, strict=True)))
    for c, lg in zip(conts, logits, strict=True):
        assert lg.shape == (len(c), runner.config.vocab_size)
        assert lg.argmax(-1).tolist() == c


@pytest.mark.slow
def test_bench_dtype_reports_bf16_against_float32(tmp_path, capsys):
    from ops import bench_dtype

    out = tmp_path / "q.json"
    assert bench_dtype.main(["--prompts", "3", "--new-tokens", "8", "--skip-hf", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["dtype"] == "bfloat16" and r["prompts"] == 3
    assert 0 <= r["greedy_identical"] <= 3 and r["positions"] >= 3
    assert 0 <= r["kl_p50"] <= r["kl_p99"] and r["kl_mean"] >= 0
    assert r["kl_mean"] < 0.05 and r["top1_agreement"] >= 0.8  # measured 0.0009 and 0.98 on 48 x 128
    assert "teacher-forced" in capsys.readouterr().out
