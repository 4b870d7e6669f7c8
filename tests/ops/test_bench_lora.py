"""ops.bench_lora: a tiny run gets to its report (it measured everything, then crashed
reading an adapter whose folder it had already removed)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]


def test_a_tiny_run_writes_its_report(tmp_path):
    from ops.bench_lora import main

    out = tmp_path / "lora.json"
    assert main(["--quick", "--requests", "3", "--adapters", "2", "--rank", "4", "--repeats", "1",
                 "--dtype", "float32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["adapter_mb"] > 0 and len(report["runs"]) == 3
    for key in ("multi_vs_base_throughput", "multi_vs_per_adapter_throughput", "multi_vs_per_adapter_latency"):
        assert report[key] > 0
