"""ops.bench_scoring: a tiny run reports its ratios, and lmgate's scores agree with transformers'."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]


def test_a_tiny_run_reports_ratios_and_the_same_choices(tmp_path):
    from ops.bench_scoring import main

    out = tmp_path / "scoring.json"
    assert main(["--quick", "--questions", "2", "--shots", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["questions"] == 2 and report["config"]["prompts"] == 8
    assert report["max_abs_logprob_diff"] < 1e-3
    assert report["same_choices_as_hf"] == 1.0
    assert report["score_vs_hf_time"] > 0 and report["score_vs_prefill_time"] > 0
    # the 4 answers of a question share its context: all but the first take it from the caches
    assert 0 < report["serial_cached_prefill_tokens_vs_prompt_tokens"] < 0.8
    assert report["score_cached_vs_score_time"] > 0
