"""ops.bench_beam: a tiny run reports its ratios, and lmgate's beams equal transformers'."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]


def test_a_tiny_run_reports_ratios_and_identical_beams(tmp_path):
    from ops.bench_beam import main

    out = tmp_path / "beam.json"
    assert main(["--quick", "--requests", "3", "--max-tokens", "8", "--beams", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["beams"] == 2 and report["config"]["requests"] == 3
    assert report["identical_to_hf"] == 1.0 and report["batched_identical_to_hf"] == 1.0
    assert report["serial_vs_hf_time"] > 0 and report["batched_vs_hf_time"] > 0
    assert 0 < report["kv_blocks_vs_unshared"] <= 1.0
    assert report["output_tokens"] > 0
