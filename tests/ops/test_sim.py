"""The discrete-event simulator: real step scheduler, modeled step times."""

from __future__ import annotations

import random

import pytest

from actors.policies import POLICY_NAMES, PolicyConfig, make_policy
from actors.step_scheduler import ScheduledSeq, StepPlan
from gpu.config import SchedulerConfig
from ops.sim.simulator import SimConfig, SimRequest, StepFeatures, StepTimeModel, simulate

MODEL = StepTimeModel((0.03, 0.0003, 0.001, 0.000001))


def workload(n: int, rate: float, seed: int = 0, *, exact: bool = True) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        length = rng.choice([10, 20, 40, 128, 128])
        pred = length if exact else length * rng.uniform(0.5, 1.5)
        prompt = tuple(rng.randrange(100, 40000) for _ in range(rng.randint(20, 120)))
        out.append(SimRequest(f"r{i}", rng.choice("abc"), prompt, length, 128, t, pred, 0.2 * pred))
    return out


def run(reqs, name: str, blocks: int = 400, seqs: int = 32):
    cfg = SimConfig(SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=seqs), num_blocks=blocks)
    res = simulate(reqs, make_policy(PolicyConfig(name=name, static_batch_size=8)), cfg, MODEL)
    lat = [r.latency for r in res.records]
    return res, sum(lat) / len(lat)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_finishes_every_request_with_its_true_length(name):
    reqs = workload(80, 6.0)
    res, _ = run(reqs, name)
    assert len(res.records) == 80
    want = {r.rid: r.output_tokens for r in reqs}
    for rec in res.records:
        assert rec.output_tokens == want[rec.rid]
        assert rec.arrival <= rec.released <= rec.first_token <= rec.finished


def test_static_batching_is_slower_than_continuous_under_load():
    reqs = workload(120, 8.0)
    static, static_mean = run(reqs, "fcfs-static")
    cont, cont_mean = run(reqs, "fcfs-continuous")
    assert static.duration > 1.5 * cont.duration
    assert static_mean > 2 * cont_mean


def test_magnus_beats_fcfs_continuous_on_mean_latency_when_saturated():
    reqs = workload(200, 12.0, exact=False)
    _, cont_mean = run(reqs, "fcfs-continuous")
    _, magnus_mean = run(reqs, "magnus")
    assert magnus_mean < 0.9 * cont_mean


def test_tiny_kv_cache_preempts_but_never_fails():
    reqs = workload(60, 20.0)
    res, _ = run(reqs, "fcfs-continuous", blocks=40, seqs=32)
    assert res.preemptions > 0
    assert len(res.records) == 60


def test_predicted_kv_reservation_avoids_preemption_storms():
    reqs = workload(100, 20.0)
    cont, _ = run(reqs, "fcfs-continuous", blocks=120)
    magnus, _ = run(reqs, "magnus", blocks=120)
    assert magnus.preemptions < cont.preemptions


def test_growing_outgrown_reservations_cuts_preemptions_when_predictions_are_short():
    # a cold predictor that has seen only short requests: every prediction 20 tokens, while a
    # quarter of the requests run to 400; the ledger at the cache's size (kv_fraction 1) binds
    rng = random.Random(0)
    t, reqs = 0.0, []
    for i in range(150):
        t += rng.expovariate(4.0)
        length = 400 if rng.random() < 0.25 else rng.choice([10, 20, 40])
        prompt = tuple(rng.randrange(100, 40000) for _ in range(rng.randint(20, 120)))
        reqs.append(SimRequest(f"r{i}", "a", prompt, length, 512, t, 20.0, 10.0))
    cfg = SimConfig(SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=64), num_blocks=150)
    res = {}
    for growth in (0.0, 2.0):
        pol = make_policy(PolicyConfig(name="magnus", kv_growth=growth, kv_fraction=1.0))
        res[growth] = simulate(reqs, pol, cfg, MODEL)
        assert sorted(r.output_tokens for r in res[growth].records) == sorted(r.output_tokens for r in reqs)
        assert (pol.kv.grown > 0) == (growth > 0)
    assert res[2.0].preemptions < 0.7 * res[0.0].preemptions  # 53 against 101


def test_step_time_model_fit_recovers_coefficients():
    rng = random.Random(1)
    true = StepTimeModel((0.02, 0.0005, 0.002, 0.00001))
    samples = []
    for _ in range(200):
        f = StepFeatures(rng.randint(1, 512), rng.randint(1, 64), rng.randint(10, 8000))
        samples.append((f, true.predict(f)))
    fit = StepTimeModel.fit(samples)
    for got, want in zip(fit.coef, true.coef, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert fit.r2(samples) == pytest.approx(1.0)


def test_step_features_count_prefill_tokens_apart_from_decodes():
    plan = StepPlan(seqs=(ScheduledSeq("a", (5,), 40, (0, 1, 2), True),
                          ScheduledSeq("b", (7,), 9, (3,), True),
                          ScheduledSeq("c", tuple(range(30)), 16, (4, 5, 6), True)),
                    preempted=(), copies=(), num_tokens=32)
    f = StepFeatures.of(plan)
    assert (f.num_tokens, f.num_seqs, f.prefill_tokens) == (32, 3, 30)
    assert f.context_tokens == 41 + 10 + 46


def test_step_time_model_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 8"):
        StepTimeModel.fit([(StepFeatures(1, 1, 1), 0.1)])
