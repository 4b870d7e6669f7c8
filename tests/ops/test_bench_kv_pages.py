"""`python -m ops.bench_kv_pages`: huge pages on against off, ABBA, through the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_benchmark_alternates_fresh_engines_and_reports_the_ratios(tmp_path):
    from ops import bench_kv_pages

    out = tmp_path / "kv.json"
    assert bench_kv_pages.main(["--requests", "2", "--passes", "2", "--max-tokens", "4", "--dtype", "float32",
                                "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["huge_pages"] for r in report["runs"]] == [True, False, False, True]
    for run in report["runs"]:
        assert len(run["passes"]) == 2
        assert all(0 < p["output_tokens"] <= 2 * 4 and p["tok_s"] > 0 for p in run["passes"])
    on, off = report["mean_tok_s"]["on"], report["mean_tok_s"]["off"]
    assert report["ratio_on_off"] == pytest.approx([a / b for a, b in zip(on, off, strict=True)])
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[madvise]" in thp.read_text():  # only advised memory gets huge pages
        assert all((r["kv_huge_page_bytes"] > 0) == r["huge_pages"] for r in report["runs"])
