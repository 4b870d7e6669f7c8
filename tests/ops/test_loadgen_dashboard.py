"""The Grafana dashboard only queries metrics that lmgate really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import prometheus_client

from actors.metrics import Metrics
from gateway.app import HttpMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "lmgate.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def exported_samples() -> set[str]:
    """Every sample name (with _bucket/_sum/_count/_total) lmgate's registries expose."""
    registry = prometheus_client.CollectorRegistry()
    Metrics(registry)
    HttpMetrics.register(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(f"{family.name}{s}" for s in SUFFIXES)
    return names


def test_every_queried_metric_exists_and_panels_are_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    assert [e for e in exprs if e.count("(") != e.count(")")] == []  # (what Grafana would show as an error)
    queried = {m for e in exprs for m in re.findall(r"\blmgate_[a-z0-9_]+", e)}
    assert queried - exported_samples() == set()
    # the list is covered
    for name in ("time_to_first_token", "time_per_output_token", "e2e_request_latency", "request_queue_time",
                 "step_batch_size", "kv_cache_usage_ratio", "response_cache_lookups", "rejections", "requests_total",
                 "num_preemptions", "kv_reserved_blocks", "kv_reservations_grown", "step_tokens",
                 "predictor_error_ratio", "response_cache_stores"):
        assert any(name in m for m in queried), name
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dash["panels"])
