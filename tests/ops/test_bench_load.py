"""ops.bench_load: one round of every mode reports its times and ratios."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]


def test_one_round_reports_every_mode_cold_and_warm(tmp_path):
    from ops.bench_load import main

    out = tmp_path / "load.json"
    assert main(["--repeats", "1", "--no-engine", "--dir", str(tmp_path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    modes = {"gguf", "safetensors", "lmg", "lmg-read"}
    assert set(report["median_s"]["cold"]) == set(report["median_s"]["warm"]) == modes
    assert all(t > 0 for state in report["median_s"].values() for t in state.values())
    assert report["bytes"]["lmg"] >= report["bytes"]["safetensors"] > report["bytes"]["gguf"]
    assert set(report["lmg_vs_safetensors"]) == {"cold", "warm"} and report["engine_start_s"] == {}
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # the converted folders are cleaned up
