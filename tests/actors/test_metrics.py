"""The metrics /metrics exports, against their documentation."""

from __future__ import annotations

from pathlib import Path

from actors.metrics import Metrics
from gateway.app import HttpMetrics, method_label

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_every_exported_metric_is_documented_with_its_labels() -> None:
    """docs/api.md's table names each metric (a counter by its `_total` name) and its labels."""
    metrics = Metrics()
    HttpMetrics.register(metrics.registry)
    docs = DOCS.read_text()
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[3] for line in docs.splitlines()
            if line.startswith("| `lmgate_")}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in rows, f"{name} is not in docs/api.md's metrics table"
        collector = metrics.registry._names_to_collectors[family.name if family.type != "counter" else name]
        labels = set(getattr(collector, "_labelnames", ()))
        documented = {label.strip() for label in rows[name].split(",") if label.strip()}
        assert documented == labels, (name, documented, labels)
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in metrics.registry.collect()}
    assert set(rows) <= exported, set(rows) - exported  # no row of a metric that is gone


def test_the_method_label_takes_no_value_from_the_client() -> None:
    """Any token is a method to the HTTP parser: a label of it would let anyone, without a
    key, add a series per request."""
    assert [method_label(m) for m in ("GET", "POST", "DELETE", "XYZ0001", "get")] == [
        "GET", "POST", "DELETE", "other", "other"]



def test_each_tenant_s_queue_and_fair_share_are_read_at_scrape_time() -> None:
    import prometheus_client

    from actors.policies import EngineView, Job, PriorityAging

    metrics = Metrics()
    assert "lmgate_tenant_requests_queued{" not in prometheus_client.generate_latest(metrics.registry).decode()
    policy = PriorityAging()
    metrics.tenant_queue.policy = lambda: policy
    for k in range(3):
        policy.on_arrival(Job(f"h{k}", "heavy", 10, 20, float(k), 20.0), float(k))
    policy.on_arrival(Job("l0", "light", 10, 20, 5.0, 20.0), 5.0)
    policy.release(6.0, EngineView(0, 1, 100, 100, 16))  # heavy's first runs: 10 + 2 x 20 of service
    text = prometheus_client.generate_latest(metrics.registry).decode()
    assert 'lmgate_tenant_requests_queued{tenant="heavy"} 2.0' in text
    assert 'lmgate_tenant_requests_queued{tenant="light"} 1.0' in text
    assert 'lmgate_tenant_virtual_service{tenant="heavy"} 50.0' in text


def test_a_frozen_scrape_gives_the_queue_as_it_was_read_on_the_loop() -> None:
    """`tenant_queue.frozen()` reads the policy when entered; a scrape formatted in a
    worker thread meanwhile gives that reading, not the policy the loop goes on changing."""
    import gzip

    from actors.policies import Job, PriorityAging

    metrics = Metrics()
    policy = PriorityAging()
    metrics.tenant_queue.policy = lambda: policy
    policy.on_arrival(Job("a0", "a", 10, 20, 0.0, 20.0), 0.0)
    with metrics.tenant_queue.frozen():
        policy.on_arrival(Job("a1", "a", 10, 20, 1.0, 20.0), 1.0)
        with metrics.tenant_queue.frozen():  # (an overlapping scrape reads anew)
            policy.on_arrival(Job("a2", "a", 10, 20, 2.0, 20.0), 2.0)
        assert 'lmgate_tenant_requests_queued{tenant="a"} 2.0' in metrics.render().decode()
        assert 'lmgate_tenant_requests_queued{tenant="a"} 2.0' in gzip.decompress(metrics.render(True)).decode()
    assert 'lmgate_tenant_requests_queued{tenant="a"} 3.0' in metrics.render().decode()  # live again


def test_forgetting_a_tenant_drops_its_series_of_every_metric_and_no_other() -> None:
    metrics = Metrics()
    for tenant in ("gone", "kept"):
        metrics.requests.labels(tenant, "ok").inc()
        metrics.requests.labels(tenant, "error").inc()
        metrics.rejections.labels(tenant, "429", "rate_limit_exceeded").inc()
        metrics.ttft.labels(tenant).observe(0.1)
    metrics.step_time.observe(0.2)  # (no tenant label: untouched)
    assert metrics.forget_tenants(["gone"]) == 4  # (2 outcomes, a rejection, a histogram)
    text = metrics.render().decode()
    assert 'tenant="gone"' not in text and text.count('tenant="kept"') > 20 and "lmgate_step_seconds_count 1.0" in text
    assert metrics.forget_tenants(["never seen"]) == 0


def test_past_a_number_of_tenants_the_latency_histograms_are_shared():
    """~23 series a histogram a tenant: 1,000 tenants were 7 MB and ~1 s of CPU a scrape
    (holding the GIL from the engine's thread). Past `tenant_histograms` tenants the rest
    share the tenant label "*"; a tenant forgotten frees its place."""
    metrics = Metrics(tenant_histograms=2)
    for tenant in ("a", "b", "c", "d"):
        metrics.ttft.labels(metrics.latency_tenant(tenant)).observe(0.1)
        metrics.requests.labels(tenant, "ok").inc()  # (counters keep every tenant)
    text = metrics.render().decode()
    assert 'lmgate_time_to_first_token_seconds_count{tenant="*"} 2.0' in text
    assert 'lmgate_time_to_first_token_seconds_count{tenant="a"} 1.0' in text
    assert 'lmgate_time_to_first_token_seconds_count{tenant="c"}' not in text
    assert 'lmgate_requests_total{outcome="ok",tenant="d"} 1.0' in text
    metrics.forget_tenants(["a"])
    assert metrics.latency_tenant("c") == "c" and metrics.latency_tenant("d") == "*"


def test_a_scrape_has_no_created_series() -> None:
    """Prometheus does not read `_created` from the text format; they were ~40% of a
    scrape's lines at 2,000 tenants."""
    m = Metrics()
    m.requests.labels("acme", "ok").inc()
    m.ttft.labels(m.latency_tenant("acme")).observe(0.1)
    body = m.render().decode()
    assert 'lmgate_requests_total{outcome="ok",tenant="acme"} 1.0' in body
    assert "_created" not in body
