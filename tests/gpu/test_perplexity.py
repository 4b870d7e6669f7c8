"""Perplexity from prompt logprobs: the sliding windows, and the number against
transformers' computed the same way (Hugging Face's perplexity guide), through the
function and `lmgate perplexity`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gpu.perplexity import Window, perplexity, windows

TEXT = ("The history of the city begins with a small settlement on the river bank. Over the centuries, "
        "merchants arrived from distant lands, bringing spices, cloth and new ideas. The town grew into a "
        "busy port, and its markets became famous across the region. Today, visitors walk the old streets "
        "and admire the stone houses that still line the harbour, remembering the sailors who once lived there.")


def test_windows_score_every_token_but_the_first_exactly_once():
    assert windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    assert windows(5, 8, 4) == [Window(0, 5, 1)]
    for n, w, s in [(100, 32, 16), (101, 32, 7), (33, 32, 1), (64, 32, 31)]:
        wins = windows(n, w, s)
        scored = [t for x in wins for t in range(x.first_scored, x.end)]
        assert scored == list(range(1, n))
        assert all(x.end - x.start <= w and x.start < x.first_scored for x in wins)
    # windows that do not overlap: each one's first token has no context, and is not scored
    assert windows(70, 32, 32) == [Window(0, 32, 1), Window(32, 64, 33), Window(64, 70, 65)]
    assert windows(65, 32, 32) == [Window(0, 32, 1), Window(32, 64, 33)]  # token 64 alone: nothing to score
    with pytest.raises(ValueError):
        windows(10, 4, 5)
    with pytest.raises(ValueError):
        windows(1, 4, 2)


@pytest.fixture(scope="module")
def reference(hf_reference, tokenizer):
    """transformers' perplexity of TEXT with windows of 32 tokens, stride 16."""
    ids = tokenizer.encode(TEXT)
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in windows(len(ids), 32, 16):
            chunk = ids[w.start : w.end]
            lp = hf_reference(torch.tensor([chunk])).logits[0, :-1].float().log_softmax(-1)
            got = lp.gather(1, torch.tensor(chunk[1:])[:, None]).flatten()
            part = got[w.first_scored - w.start - 1 :]
            total += float(part.sum())
            count += len(part)
    return ids, math.exp(-total / count), count


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
def test_perplexity_matches_transformers(ckpt, tokenizer, reference, tmp_path):
    from gateway.cli import main
    from gpu.config import CacheConfig, EngineConfig
    from gpu.engine import Engine

    ids, want, count = reference
    engine = Engine(EngineConfig(dtype="float32", cache=CacheConfig(cache_bytes=32 * 1024**2)), checkpoint=ckpt,
                    tokenizer=tokenizer)
    res = perplexity(engine, ids, window=32, stride=16)
    assert res.tokens_scored == count == len(ids) - 1
    assert res.perplexity == pytest.approx(want, rel=1e-4)
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    del engine

    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["perplexity", str(path), "--window", "32", "--stride", "16", "--json", "--dtype", "float32",
                     "--kv-cache-mb", "32"]) == 0
    report = json.loads(out.getvalue())
    assert report["perplexity"] == pytest.approx(want, rel=1e-4)
    assert (report["tokens"], report["windows"]) == (len(ids), len(windows(len(ids), 32, 16)))
    assert (report["dtype"], report["quantization"]) == ("float32", "none")  # (tells saved runs apart)


def test_perplexity_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    from gateway.cli import main

    assert main(["perplexity", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not text")
    assert main(["perplexity", str(bad)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    for args, what in [(["--stride", "0"], "--stride must be >= 1"), (["--window", "1"], "--window must be >= 2"),
                       (["--max-tokens", "0"], "--max-tokens must be >= 1")]:
        assert main(["perplexity", str(text), *args]) == 2
        assert what in capsys.readouterr().err
