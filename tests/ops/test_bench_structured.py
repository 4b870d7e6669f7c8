"""ops.bench_structured: a tiny run reports its ratios (a schema, and auto tool calling's
grammar on text), and every constrained output is valid."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]


def test_a_tiny_run_reports_the_cost_and_valid_outputs(tmp_path):
    from ops.bench_structured import SCHEMA, is_valid, main

    assert is_valid('{"title": "Dune", "year": 1965, "tags": ["famous"], "summary": "Sand."}')
    assert not is_valid('{"title": "Dune", "year": 1965, "tags": ["sandy"], "summary": "Sand."}')  # not in the enum
    assert not is_valid('{"title": "Dune"}') and not is_valid("Dune")
    out = tmp_path / "structured.json"
    assert main(["--quick", "--requests", "3", "--max-tokens", "120", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["requests"] == 3 and SCHEMA["required"]
    assert report["valid_constrained"] == 1.0
    assert 0 <= report["valid_unconstrained"] <= 1.0
    assert report["constrained_vs_free_time"] > 0 and 0 < report["grammar_share_of_constrained"] < 1
    assert report["auto_text_vs_free_time"] > 0 and report["auto_text_calls"] == 0
    assert len(report["time_s"]["auto_text"]) == 1
    assert report["output_tokens"] > 0
