"""The scheduling benchmark's pieces: metrics, ratios, and the real-engine driver loop."""

from __future__ import annotations

import pytest

from actors.policies import PolicyConfig, make_policy
from ops.bench_sched import (
    calibration_arrivals,
    calibration_size,
    poisson_arrivals,
    ratios,
    ratios_by_rate,
    step_profile,
    summarize,
    targets_met,
)
from ops.sim.simulator import RequestRecord, SimRequest, StepFeatures, StepTimeModel

pytestmark = pytest.mark.usefixtures("free_engines")  # engines: see tests/conftest.py


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


def test_step_profile_says_how_a_run_used_its_steps():
    steps = [(StepFeatures(70, 1, 70, 70), 0.05), (StepFeatures(2, 2, 150), 0.03), (StepFeatures(3, 3, 240), 0.04)]
    p = step_profile(steps)
    assert p["steps"] == 3 and p["busy_s"] == pytest.approx(0.12)
    assert p["mean_step_seqs"] == pytest.approx(2.0)
    assert p["mean_step_tokens"] == pytest.approx(25.0)
    assert p["mean_step_prefill_tokens"] == pytest.approx(70 / 3)
    assert p["mean_step_context_tokens"] == pytest.approx(460 / 3)
    assert step_profile([]) == {}


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
    del table["fcfs-static"]  # magnus against fcfs-continuous alone (e.g. --repeats runs of the two)
    assert ratios(table, "1") == {"magnus_vs_fcfs_continuous_latency": 0.5, "magnus_vs_fcfs_continuous_throughput": 1.0}


def test_ratios_by_rate_mark_the_targets_each_rate_meets():
    def row(req_s, mean):
        return {"req_s": req_s, "mean_latency_s": mean}

    table = {  # "1": magnus keeps up, fcfs-static does not; "3": every policy saturated
        "magnus": {"1": row(1.0, 5.0), "3": row(3.4, 30.0), "9": row(3.5, 60.0)},
        "fcfs-static": {"1": row(0.9, 100.0), "3": row(1.0, 200.0)},
        "fcfs-continuous": {"1": row(1.0, 5.0), "3": row(3.3, 50.0)},
    }
    by_rate = ratios_by_rate(table)
    assert list(by_rate) == ["1", "3"]  # only where all three ran, in rate order
    assert by_rate["1"]["targets_met"] == ["magnus_vs_fcfs_static_latency", "magnus_vs_fcfs_continuous_throughput"]
    assert by_rate["3"]["targets_met"] == ["magnus_vs_fcfs_static_throughput", "magnus_vs_fcfs_continuous_latency",
                                           "magnus_vs_fcfs_continuous_throughput"]
    assert by_rate["3"]["magnus_vs_fcfs_static_latency"] == 0.15
    # the bounds are inclusive, and "no loss of throughput" allows 1%
    assert targets_met({"magnus_vs_fcfs_static_throughput": 3.34, "magnus_vs_fcfs_static_latency": 0.103,
                        "magnus_vs_fcfs_continuous_latency": 0.70, "magnus_vs_fcfs_continuous_throughput": 0.99}) == [
        "magnus_vs_fcfs_static_throughput", "magnus_vs_fcfs_static_latency", "magnus_vs_fcfs_continuous_latency",
        "magnus_vs_fcfs_continuous_throughput"]
    assert targets_met({"magnus_vs_fcfs_static_throughput": 3.33, "magnus_vs_fcfs_continuous_throughput": 0.98}) == []


def test_poisson_arrivals_have_the_requested_rate():
    a = poisson_arrivals(4000, 2.0, seed=1)
    assert a == sorted(a)
    assert len(a) / a[-1] == pytest.approx(2.0, rel=0.1)


def test_the_warm_up_fills_the_running_cap_then_staggers():
    """The step model is fitted where the saturated runs step: a burst as large as the
    engine's running cap, then a tail of small batches; --quick keeps its small warm-up."""
    assert calibration_size(64, quick=False) == (64, 16)
    assert calibration_size(128, quick=False) == (128, 16)
    assert calibration_size(4, quick=False) == (16, 16)
    assert calibration_size(128, quick=True) == (6, 6)
    assert calibration_arrivals(3, 2) == [0.0, 0.0, 0.0, 0.5, 1.0]
    assert calibration_arrivals(2, 0, gap_s=0.25) == [0.0, 0.0]
    for bad in ((0, 1), (1, -1)):
        with pytest.raises(ValueError):
            calibration_arrivals(*bad)


@pytest.mark.slow
def test_real_driver_runs_every_request_through_the_engine_under_a_policy():
    from gpu.config import EngineConfig, SchedulerConfig
    from gpu.engine import Engine
    from ops.bench_sched import _PlanRecorder, run_real

    engine = Engine(EngineConfig(num_threads=2, dtype="float32", scheduler=SchedulerConfig(max_num_seqs=4)))
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


def test_leave_one_run_out_models_never_see_the_run_they_predict():
    from ops.bench_sched import leave_one_run_out_models
    from ops.sim.simulator import StepFeatures

    def steps(c0: float, n: int = 12) -> list:
        return [(StepFeatures(t, 1 + t % 4, 10 * t), c0 + 0.001 * t) for t in range(1, n + 1)]

    warmup = steps(0.01)
    runs = {("fcfs-continuous", 1.0): steps(0.01), ("magnus", 1.0): steps(0.05)}
    models = leave_one_run_out_models(warmup, runs)
    assert set(models) == set(runs)
    # the slow run is predicted from the warm-up and the fast run only: its own 0.05 s intercept is unseen
    assert models[("magnus", 1.0)].coef[0] == pytest.approx(0.01, abs=1e-6)
    # the fast run's model has seen the slow run, so it lies between the two
    assert 0.015 < models[("fcfs-continuous", 1.0)].coef[0] < 0.045


def test_run_order_alternates_direction_so_a_drift_cancels():
    from ops.bench_sched import run_order

    pols = ("fcfs-static", "fcfs-continuous", "magnus")
    assert run_order(pols, 1, 0) == [(p, 0) for p in pols]
    assert run_order(pols, 1, 1) == [(p, 0) for p in reversed(pols)]
    two = run_order(pols, 2, 0)
    assert two == [(p, 0) for p in pols] + [(p, 1) for p in reversed(pols)]
    # with a linear drift, every policy's mean position is the same
    mean_pos = {p: sum(i for i, (q, _) in enumerate(two) if q == p) / 2 for p in pols}
    assert len(set(mean_pos.values())) == 1


def test_mean_summary_averages_repeats_and_keeps_them():
    from ops.bench_sched import mean_summary

    a = summarize([rec("a", "x", 0.0, 1.0, 3.0, 5)], ttft_slo=1.5, tpot_slo=1.0)
    b = summarize([rec("a", "x", 0.0, 1.0, 5.0, 5)], ttft_slo=1.5, tpot_slo=1.0)
    assert mean_summary([a]) is a
    m = mean_summary([a, b])
    assert m["mean_latency_s"] == pytest.approx(4.0)
    assert m["tenant_mean_latency_s"] == {"x": pytest.approx(4.0)}
    assert m["runs"] == [a, b]


def test_repeat_mean_agreement_compares_the_means_of_repeats():
    from ops.bench_sched import repeat_mean_agreement

    ag = [
        {"policy": "magnus", "rate": 2.0, "real_mean_latency_s": 8.0, "sim_loro_mean_latency_s": 10.0},
        {"policy": "magnus", "rate": 2.0, "real_mean_latency_s": 12.0, "sim_loro_mean_latency_s": 10.0},
        {"policy": "fcfs-static", "rate": 2.0, "real_mean_latency_s": 10.0, "sim_loro_mean_latency_s": 13.0},
    ]
    r = repeat_mean_agreement(ag)
    rows = {row["policy"]: row for row in r["rows"]}
    assert rows["magnus"]["rel_err"] == 0.0  # each run is 20% off, their mean is exact
    assert rows["fcfs-static"]["rel_err"] == pytest.approx(0.3)
    assert r["within_15pct"] == 0.5
    assert r["max_rel_err"] == pytest.approx(0.3)


def test_requests_within_budget_shrinks_to_fit_and_stops_at_the_floor():
    from ops.bench_sched import requests_within_budget

    calls = []

    def seconds(n):  # 10 s per request
        calls.append(n)
        return 10.0 * n

    assert requests_within_budget(48, 24, seconds, 1000) == 48  # fits: untouched
    assert requests_within_budget(48, 24, seconds, 400) == 40  # 48, 44 too long; 40 fits
    assert requests_within_budget(48, 24, seconds, 399) == 36
    assert requests_within_budget(48, 24, seconds, 240) == 24
    calls.clear()  # a bisection: the default 400 down to 24 in steps of 4 is 95 sizes
    assert requests_within_budget(400, 24, seconds, 1001) == 100
    assert len(calls) <= 9 and len(set(calls)) == len(calls)
    assert requests_within_budget(48, 24, seconds, 10) == 24  # nothing fits: the floor
    assert requests_within_budget(48, 48, seconds, 10) == 48
    assert requests_within_budget(26, 24, seconds, 245) == 24  # steps never go below the floor
    with pytest.raises(ValueError):
        requests_within_budget(16, 24, seconds, 1000)


def test_real_runs_within_budget_drops_the_lower_rates_before_going_below_the_minimum():
    from ops.bench_sched import real_runs_within_budget

    def seconds(rates, n):  # 10 s per request at the top rate, 5 s at each lower one
        top = max(rates)
        return sum((10.0 if r == top else 5.0) * n for r in rates)

    rates = [0.1, 0.2, 0.4]
    assert real_runs_within_budget(rates, 48, 24, seconds, 1000) == (rates, 48)  # 960 s: fits
    assert real_runs_within_budget(rates, 48, 24, seconds, 500) == (rates, 24)  # 480 s at 24
    # 24 at three rates (480 s) is over: the top rate alone, as many as fit (40 x 10 s)
    assert real_runs_within_budget(rates, 48, 24, seconds, 400) == ([0.4], 40)
    # not even 24 at the top rate: fewer, down to the floor
    assert real_runs_within_budget(rates, 48, 24, seconds, 160) == ([0.4], 16)
    assert real_runs_within_budget(rates, 48, 24, seconds, 10, n_floor=8) == ([0.4], 8)
    assert real_runs_within_budget([0.4], 48, 24, seconds, 400) == ([0.4], 40)
    # a minimum already at or below the floor is never undercut
    assert real_runs_within_budget(rates, 48, 8, seconds, 10, n_floor=8) == ([0.4], 8)
    # n_all_rates: the lower rates only while the highest gets at least that many
    assert real_runs_within_budget(rates, 48, 24, seconds, 1000, n_all_rates=40) == (rates, 48)
    assert real_runs_within_budget(rates, 48, 24, seconds, 800, n_all_rates=40) == (rates, 40)
    assert real_runs_within_budget(rates, 48, 24, seconds, 700, n_all_rates=40) == ([0.4], 48)  # not (rates, 32)
    assert real_runs_within_budget(rates, 48, 24, seconds, 700, n_all_rates=128) == ([0.4], 48)  # capped at n_max
    assert real_runs_within_budget(rates, 48, 24, seconds, 10, n_all_rates=40, n_floor=8) == ([0.4], 8)


def test_requests_per_rate_keep_the_arrival_window_and_the_floor():
    from ops.bench_sched import requests_per_rate

    # the highest rate runs n_top, the others the same arrival window (n / rate alike), >= the floor
    assert requests_per_rate([0.5, 1.0, 4.0], 400, 24) == {0.5: 50, 1.0: 100, 4.0: 400}
    assert requests_per_rate([0.1, 4.0], 400, 24) == {0.1: 24, 4.0: 400}
    assert requests_per_rate([0.1, 4.0], 16, 24) == {0.1: 16, 4.0: 16}  # the floor never exceeds n_top
    assert requests_per_rate([1.0, 2.0], 40, 8, same=True) == {1.0: 40, 2.0: 40}


def test_run_timeout_follows_the_simulated_run_with_a_floor():
    from ops.bench_sched import STUCK_RUN_FACTOR, run_timeout_s

    assert run_timeout_s(10.0) == 900.0  # short runs: the floor
    assert run_timeout_s(1050.0) == STUCK_RUN_FACTOR * 1050.0  # a long run is not cut at 15 minutes


@pytest.mark.slow
def test_runtime_driver_runs_every_request_through_the_servers_actors():
    """`--driver runtime`: chat requests through admission, the online predictor, the queue
    actor and the stepper, in a worker thread and on the trio thread; every request ends,
    the steps are measured, and the engine is left idle with its blocks back."""
    from actors.predictor import LengthPredictor
    from gpu.config import EngineConfig, SchedulerConfig
    from gpu.engine import Engine
    from ops.bench_sched import _PlanRecorder, run_runtime

    engine = Engine(EngineConfig(num_threads=2, dtype="float32", scheduler=SchedulerConfig(max_num_seqs=4)))
    recorder = _PlanRecorder(engine.scheduler)
    messages = {f"r{k}": [{"role": "user", "content": f"Count to {k}."}] for k in range(6)}
    prompts = {rid: engine.tokenizer.render_and_encode(m) for rid, m in messages.items()}
    reqs = [SimRequest(rid, "t", tuple(p), 6, 6, 0.05 * k, 6.0, 1.0, app="count", user=f"u{k % 2}")
            for k, (rid, p) in enumerate(prompts.items())]
    predictor = LengthPredictor()
    # magnus gets the Magnus predictor service (embeddings, online learning); fcfs-continuous
    # the running estimate, as `lmgate serve` gives them
    for step_in_thread, name in ((True, "magnus"), (False, "magnus"), (True, "fcfs-continuous")):
        run = run_runtime(engine, recorder, reqs, make_policy(PolicyConfig(name=name)), 6, messages,
                          predictor, step_in_thread=step_in_thread)
        assert len(run.records) == 6
        for r in run.records:
            assert r.arrival <= r.first_token <= r.finished
            assert 1 <= r.output_tokens <= 6 and run.lengths[r.rid] == r.output_tokens
        assert len(run.steps) >= 6 and all(t > 0 for _, t in run.steps)
        assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == engine.num_blocks
        assert "step" not in vars(engine)  # the driver's timing wrapper is gone
    assert predictor.num_samples == 0  # the runtime learned on a copy


def test_bench_config_keeps_the_kv_blocks_across_dtypes_and_rejects_bad_flags():
    from ops.bench_sched import bench_config, build_parser

    def cfg(*argv):
        return bench_config(build_parser().parse_args(list(argv)))

    # the KV-bound regime (64 sequences on 728 blocks), float32 on every machine (the
    # fixture's lengths are float32's) — not the server's defaults (128 on 1.5 GiB)
    assert (cfg().dtype, cfg().cache_mb, cfg().max_num_seqs) == ("float32", 512, 64)
    assert cfg().max_tokens is None  # the fixture's own cap
    assert cfg("--max-tokens", "64").max_tokens == 64
    bf16 = cfg("--dtype", "bfloat16")
    assert (bf16.dtype, bf16.cache_mb) == ("bfloat16", 256)  # half the bytes per block: the same blocks
    assert cfg("--dtype", "bfloat16", "--cache-mb", "512").cache_mb == 512  # an explicit size wins
    assert cfg("--max-num-seqs", "32").max_num_seqs == 32
    assert (cfg().batch_invariant, cfg("--dtype", "bfloat16", "--batch-invariant").batch_invariant) == (False, True)
    assert cfg("--optimistic-below-steps", "0").kv_optimistic_below_steps == 0.0
    assert cfg().kv_optimistic_below_steps == PolicyConfig.kv_optimistic_below_steps
    assert (cfg().kv_reservation, cfg("--kv-reservation", "off").kv_reservation) == ("auto", "off")
    assert (cfg().kv_growth, cfg("--kv-growth", "0").kv_growth, cfg("--kv-growth", "3").kv_growth) == (2.0, 0.0, 3.0)
    assert (cfg().real_requests, cfg().same_requests_every_rate) == (400, False)
    assert cfg("--same-requests-every-rate").same_requests_every_rate
    quick = cfg("--quick", "--real-requests", "16")
    assert (quick.real_requests, quick.min_real_requests, quick.time_budget_s is not None) == (16, 16, True)
    assert (cfg().driver, cfg().step_thread, cfg().runtime_predictor) == ("loop", "worker", "trained")
    rt = cfg("--driver", "runtime", "--step-thread", "loop", "--runtime-predictor", "cold")
    assert (rt.driver, rt.step_thread, rt.runtime_predictor) == ("runtime", "loop", "cold")
    for bad in (["--step-thread", "loop"], ["--runtime-predictor", "cold"],  # need --driver runtime
                ["--cache-mb", "0"], ["--max-num-seqs", "0"], ["--optimistic-below-steps", "-1"], ["--kv-growth", "1"], ["--kv-reservation", "never"], ["--repeats", "0"], ["--time-budget", "-1"],
                ["--real-requests", "0"], ["--policies", "fcfs-static,nope"]):
        with pytest.raises((ValueError, SystemExit)):  # (counts below 1: argparse's own usage error)
            cfg(*bad)


def test_sweep_rates_reach_beyond_fcfs_continuous_capacity():
    from ops.bench_sched import BenchConfig, sweep_rates

    cfg = BenchConfig(quick=False)
    # continuous barely above static: 3 x static is already beyond both
    assert sweep_rates(1.0, 1.2, cfg) == [0.7, 1.5, 3.0]
    # continuous 2.5 x static: the highest rate goes to 2 x continuous's capacity
    assert sweep_rates(0.4, 1.0, cfg) == [0.28, 0.6, 2.0]


def test_fixture_max_tokens_is_the_generation_cap():
    from dataclasses import replace

    from ops.bench_sched import fixture_max_tokens
    from ops.workload.fixture import load_fixture

    fx = load_fixture()
    assert fixture_max_tokens(fx) == 512
    with pytest.raises(ValueError, match="mixes"):
        fixture_max_tokens([fx[0], replace(fx[1], max_tokens=128)])


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_and_writes_the_issue_keys(tmp_path, capsys):
    """`python -m ops.bench_sched` as a user runs it, scaled down: a small fixture, short
    outputs, two rates; the JSON holds the keys the issue names and every run's request count."""
    import json

    from ops import bench_sched
    from ops.workload.fixture import FIXTURE

    fx = tmp_path / "small.jsonl"
    fx.write_text("".join(FIXTURE.read_text().splitlines(keepends=True)[:80]))
    out = tmp_path / "out.json"
    assert bench_sched.main(["--fixture", str(fx), "--policies", "fcfs-static,fcfs-continuous,magnus",
                             "--rates", "4,16", "--real-requests", "32", "--sim-requests", "24",
                             "--max-tokens", "16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["real_requests_per_rate"] == {"4": 24, "16": 32}  # the floor, then the top count
    for name in ("fcfs-static", "fcfs-continuous", "magnus"):
        for rate in ("4", "16"):
            s = report["policies"][name][rate]
            assert s["completed"] == report["real_requests_per_rate"][rate]
            assert s["req_s"] > 0 and 0 < s["mean_latency_s"] <= s["p99_latency_s"]
    assert report["ratios_rate"] == 16
    for k in ("magnus_vs_fcfs_static_throughput", "magnus_vs_fcfs_static_latency",
              "magnus_vs_fcfs_continuous_latency"):
        assert report[k] > 0
    assert 0 <= report["predictor_within_25pct"] <= 1
    assert report["predictor"]["n_test"] == 40
    assert report["step_model"]["warmup_burst"] == report["step_model"]["warmup_requests"] == 40  # 64 capped
    top = report["policies"]["magnus"]["16"]
    assert top["steps"] > 0 and 0 < top["busy_s"] <= top["duration_s"] and top["mean_step_seqs"] >= 1
    assert len(report["agreement"]) == 6
    assert {"4", "16"} <= set(report["sim_ratios_by_rate"])  # and the sweep's own rates
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "magnus_vs_fcfs_continuous_latency" in printed and "magnus across the simulated sweep" in printed


@pytest.mark.slow
def test_a_budget_too_small_for_every_rate_runs_the_highest_alone(tmp_path):
    """`--time-budget` that cannot fit the minimum at every rate: the real runs fall back to the
    highest rate (down to the floor of requests) and the simulated sweep keeps every rate."""
    import json

    from ops import bench_sched
    from ops.workload.fixture import FIXTURE

    fx = tmp_path / "small.jsonl"
    fx.write_text("".join(FIXTURE.read_text().splitlines(keepends=True)[:80]))
    out = tmp_path / "out.json"
    assert bench_sched.main(["--fixture", str(fx), "--policies", "fcfs-static,fcfs-continuous,magnus",
                             "--rates", "4,16", "--real-requests", "32", "--sim-requests", "24",
                             "--max-tokens", "16", "--time-budget", "0.01", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    floor = bench_sched.SMOKE_FLOOR_REQUESTS
    assert report["real_rates"] == [16] and report["time_budget"]["real_rates"] == [16]
    assert report["real_requests_per_rate"] == {"16": floor}
    for name in ("fcfs-static", "fcfs-continuous", "magnus"):
        assert list(report["policies"][name]) == ["16"]
        assert report["policies"][name]["16"]["completed"] == floor
        assert {"4", "16"} <= set(report["sim_policies"][name])
    assert report["ratios_rate"] == 16


def test_the_runs_predict_with_the_trained_predictor_not_one_that_saw_the_held_out_lengths():
    """The evaluation observes every held-out request after predicting it (user histories grow,
    as in serving); the predictor the runs then use must not carry those true lengths."""
    import numpy as np

    from actors.predictor import LengthPredictor
    from ops.bench_sched import features_of, train_and_evaluate
    from ops.workload.fixture import FixtureRequest

    rng = np.random.default_rng(0)

    def req(i: int, user: str, out: int) -> FixtureRequest:
        return FixtureRequest(f"r{i}", "qa", "t", user, ({"role": "user", "content": f"q{i}"},), 20 + i % 7, out,
                              "stop", 256)

    train = [req(i, f"u{i % 4}", int(rng.integers(10, 200))) for i in range(64)]
    test = [req(100 + i, f"u{i % 4}", 250) for i in range(16)]  # held-out users all answer long
    emb = {r.id: (v := rng.normal(size=384)) / np.linalg.norm(v) for r in train + test}
    trained, ev = train_and_evaluate(train, test, emb, 256)
    fresh = LengthPredictor()
    for r in train:
        fresh.observe(features_of(r, 256, emb[r.id]), r.output_tokens, r.finish_reason)
        if fresh.needs_refit():
            fresh.fit()
    fresh.fit()
    for r in test:
        f = features_of(r, 256, emb[r.id])
        assert trained.predict(f) == fresh.predict(f)
    assert ev.n_test == 16


def test_length_agreement_is_the_share_of_requests_every_run_at_a_rate_agrees_on():
    from ops.bench_sched import length_agreement

    runs = {("fcfs-continuous", 2.0, 0): {"a": 5, "b": 7, "c": 9},
            ("magnus", 2.0, 0): {"a": 5, "b": 8, "c": 9},
            ("magnus", 2.0, 1): {"a": 5, "b": 7, "c": 9, "d": 1},  # d: not in every run, not counted
            ("magnus", 4.0, 0): {"a": 1}}
    assert length_agreement(runs) == {"2": 2 / 3, "4": 1.0}
    assert length_agreement({}) == {}
