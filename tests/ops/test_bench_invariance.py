"""ops.bench_invariance: the agreement counts, and a small run whose batch-invariant engine
reproduces every watched output alone, batched, chunked and preempted."""

from __future__ import annotations

import json

import pytest

from ops.bench_invariance import SCENARIOS, agreement, main

pytestmark = pytest.mark.usefixtures("free_engines")  # engines: see tests/conftest.py


def test_agreement_counts_identical_outputs_and_equal_lengths():
    assert agreement([[1, 2, 3], [4, 5], [6]], [[1, 2, 3], [4, 9], [6, 7]]) == {
        "identical": 1, "same_length": 2, "of": 3}
    with pytest.raises(ValueError):
        agreement([[1]], [[1], [2]])


@pytest.mark.slow
def test_small_run_reports_both_engines_and_the_invariant_one_reproduces(tmp_path, capsys):
    out = tmp_path / "inv.json"
    assert main(["--prompts", "8", "--solo", "3", "--new-tokens", "16", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"default", "batch_invariant"}
    for scenario in SCENARIOS:
        assert report["modes"]["batch_invariant"][scenario] == {
            **report["modes"]["batch_invariant"][scenario], "identical": 3, "same_length": 3, "of": 3}
    assert report["modes"]["batch_invariant"]["preempted"]["preemptions"] > 0
    assert report["invariant_vs_default_tokens_per_s"] > 0
    assert "batch-invariant ÷ default tokens/s" in capsys.readouterr().out
