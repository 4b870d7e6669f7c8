"""The scheduling benchmark's pieces: metrics, ratios, and the real-engine driver loop."""

from __future__ import annotations

import pytest

from actors.policies import PolicyConfig, make_policy
from ops.bench_sched import poisson_arrivals, ratios, summarize
from ops.sim.simulator import RequestRecord, SimRequest, StepTimeModel


def rec(rid: str, tenant: str, arrival: float, first: float, done: float, out: int) -> RequestRecord:
    r = RequestRecord(rid, tenant, arrival, 10, out)
    r.released, r.first_token, r.finished = arrival, first, done
    return r


def test_summarize_reports_vllm_style_metrics():
    s = summarize([rec("a", "x", 0.0, 1.0, 3.0, 5), rec("b", "y", 1.0, 2.0, 5.0, 9)], ttft_slo=1.5, tpot_slo=1.0)
    assert s["completed"] == 2
    assert s["duration_s"] == pytest.approx(5.0)
    assert s["req_s"] == pytest.approx(0.4)
    assert s["output_tok_s"] == pytest.approx(14 / 5)
    assert s["mean_latency_s"] == pytest.approx(3.5)
    assert s["mean_ttft_s"] == pytest.approx(1.0)
    assert s["goodput_req_s"] == pytest.approx(2 / 5)
    assert s["tenant_mean_latency_s"] == {"x": 3.0, "y": 4.0}
    assert 0 < s["tenant_latency_jain"] <= 1


def test_ratios_use_the_issue_keys():
    table = {
        "magnus": {"1": {"req_s": 3.0, "mean_latency_s": 1.0}},
        "fcfs-static": {"1": {"req_s": 1.0, "mean_latency_s": 10.0}},
        "fcfs-continuous": {"1": {"req_s": 3.0, "mean_latency_s": 2.0}},
    }
    r = ratios(table, "1")
    assert r["magnus_vs_fcfs_static_throughput"] == 3.0
    assert r["magnus_vs_fcfs_static_latency"] == 0.1
    assert r["magnus_vs_fcfs_continuous_latency"] == 0.5


def test_poisson_arrivals_have_the_requested_rate():
    a = poisson_arrivals(4000, 2.0, seed=1)
    assert a == sorted(a)
    assert len(a) / a[-1] == pytest.approx(2.0, rel=0.1)


@pytest.mark.slow
def test_real_driver_runs_every_request_through_the_engine_under_a_policy():
    from gpu.config import EngineConfig, SchedulerConfig
    from gpu.engine import Engine
    from ops.bench_sched import _PlanRecorder, run_real

    engine = Engine(EngineConfig(num_threads=2, scheduler=SchedulerConfig(max_num_seqs=4)))
    recorder = _PlanRecorder(engine.scheduler)
    prompts = [engine.tokenizer.encode(f"Count to {k}:") for k in range(6)]
    reqs = [SimRequest(f"r{k}", "t", tuple(p), 6, 6, 0.05 * k, 6.0, 1.0) for k, p in enumerate(prompts)]
    for name in ("fcfs-static", "magnus"):
        run = run_real(engine, recorder, reqs, make_policy(PolicyConfig(name=name, static_batch_size=2)), 6)
        assert len(run.records) == 6
        for r in run.records:
            assert r.arrival <= r.released <= r.first_token <= r.finished
            assert 1 <= r.output_tokens <= 6
        assert not engine.has_unfinished()
    assert len(run.steps) >= 8
    assert all(t > 0 for _, t in run.steps)
    StepTimeModel.fit(run.steps)  # the measured steps calibrate the simulator
