"""Batching policies: pure logic, driven through `on_arrival` / `release` / `on_finish`."""

from __future__ import annotations

import pytest

from actors.policies import (
    POLICY_NAMES,
    Adaptive,
    EngineView,
    FairVtc,
    FcfsContinuous,
    FcfsStatic,
    Hybrid,
    Job,
    KvReservation,
    LoadBased,
    Magnus,
    PolicyConfig,
    PriorityAging,
    ServingTimeEstimator,
    StepCostFit,
    TimeWindow,
    VirtualTokenCounter,
    make_policy,
)


def job(rid: str, arrival: float = 0.0, *, tenant: str = "t", pred: float = 50.0, std: float = 0.0,
        prompt: int = 32, max_tokens: int = 256, priority: int = 0) -> Job:
    return Job(rid, tenant, prompt, max_tokens, arrival, pred, std, priority)


def view(running: int = 0, *, cap: int = 8, free: int = 1000, total: int = 1000, bs: int = 16,
         step: float = 0.0, token_cost: float = 0.0, overhead: float = 0.0) -> EngineView:
    return EngineView(running, cap, free, total, bs, step, token_cost, overhead)


def ids(jobs: list[Job]) -> list[str]:
    return [j.rid for j in jobs]


def test_make_policy_knows_every_name_and_rejects_others():
    for name in POLICY_NAMES:
        assert make_policy(PolicyConfig(name=name)).name == name
    with pytest.raises(ValueError, match="unknown policy"):
        PolicyConfig(name="sjf-magic")


def test_fcfs_static_waits_for_the_whole_batch_to_finish():
    p = FcfsStatic(batch_size=2)
    for k in range(5):
        p.on_arrival(job(f"r{k}", k), k)
    first = p.release(5.0, view(0))
    assert ids(first) == ["r0", "r1"]
    assert p.release(5.0, view(1)) == []  # one of the batch still runs: no new batch
    p.on_finish(first[0], 6.0, 10)
    assert p.release(6.0, view(1)) == []
    p.on_finish(first[1], 7.0, 10)
    assert ids(p.release(7.0, view(0))) == ["r2", "r3"]
    assert len(p) == 1


def test_fcfs_continuous_fills_free_slots_in_arrival_order():
    p = FcfsContinuous()
    for k in (3, 1, 2):
        p.on_arrival(job(f"r{k}", float(k)), float(k))
    assert ids(p.release(4.0, view(6, cap=8))) == ["r1", "r2"]
    assert ids(p.release(4.0, view(7, cap=8))) == ["r3"]


def test_priority_tiers_with_aging_nothing_starves():
    p = PriorityAging(aging_s=10.0)
    p.on_arrival(job("low-old", 0.0, priority=2), 0.0)
    p.on_arrival(job("high-new", 15.0, priority=0), 15.0)
    assert ids(p.release(15.0, view(7)))[0] == "high-new"  # 2 - 1.5 > 0 - 0
    p2 = PriorityAging(aging_s=10.0)
    p2.on_arrival(job("low-old", 0.0, priority=2), 0.0)
    p2.on_arrival(job("high-new", 25.0, priority=0), 25.0)
    assert ids(p2.release(25.0, view(7)))[0] == "low-old"  # 2 - 2.5 < 0: aged past the new one


def test_the_engine_ages_the_priority_policys_tiers_and_keeps_its_order_within_one():
    """The engine preempts a running request for a waiting one of a lower value under KV
    pressure: the priority policy hands it its tier's turn as the queue took it, in whole
    tiers (the bare tier evicted a tier-0 request the queue had aged in for every tier-9
    one: 108 s for 64 tokens — an audit): the tier's oldest waiting request aged, so the
    values rise in release order within a tier, and those of one aging period are equal
    (a review: by their own arrivals, a heavy tenant's older backlog released after a
    light tenant's request evicted it, and requests of one tier preempted one another)."""
    p = PriorityAging(aging_s=10.0)
    for k in range(3):
        p.on_arrival(job(f"heavy{k}", float(k), tenant="heavy"), float(k))
    assert ids(p.release(3.0, view(6))) == ["heavy0", "heavy1"]
    first = [p.engine_priority(j) for j in (job("heavy0", 0.0), job("heavy1", 1.0))]
    assert first == [0, 0]  # one aging period: equal, FCFS in the engine
    p.on_arrival(job("light", 25.0, tenant="light"), 25.0)
    p.vtc.charge("heavy", 0, 1000)  # (heavy was served more than light: light goes first)
    light, heavy2 = p.release(25.0, view(6))
    assert (light.rid, heavy2.rid) == ("light", "heavy2")
    light_value = p.engine_priority(light)
    assert light_value == p.engine_priority(heavy2) == 0  # the tier's turn: heavy2's, at 2.0
    # a tier-9 request preempts them only while it would have gone first in the queue
    p.on_arrival(job("gold-soon", 50.0, priority=-9), 50.0)
    p.on_arrival(job("old-low", 30.0, tenant="light"), 30.0)
    gold, old_low = p.release(50.0, view(6))
    assert p.engine_priority(gold) < light_value  # 9 tiers > 50 s of aging at 10 s
    assert p.engine_priority(old_low) == 3  # the tier's turn came by its own arrival: 30 s
    p.on_arrival(job("gold-late", 100.0, priority=-9), 100.0)
    (late,) = p.release(100.0, view(6))
    assert p.engine_priority(late) > light_value  # 100 s waited: 10 tiers' worth


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n != "priority"])
def test_the_other_policies_hand_the_engine_one_priority(name: str):
    """Tiers across tenants are the priority policy's only (hybrid: among one tenant's own
    requests, in its queue): the engine keeps the order the others released in."""
    p = make_policy(PolicyConfig(name=name))
    assert {p.engine_priority(job("a", 0.0, priority=-9)), p.engine_priority(job("b", 9.0, priority=0))} == {0}


def test_priority_shares_a_tier_fairly_between_tenants_and_keeps_tiers_first():
    """The default policy: within a tier a light tenant's request waits for a slot, not for a
    heavy tenant's backlog (VTC); a higher tier still goes first, aging still lifts the
    lower one, and one tenant's requests stay first-come-first-served."""
    p = PriorityAging(aging_s=10.0)
    for k in range(10):
        p.on_arrival(job(f"heavy{k}", k * 0.1, tenant="heavy"), k * 0.1)
    assert ids(p.release(1.0, view(6))) == ["heavy0", "heavy1"]  # (2 slots)
    p.on_arrival(job("light0", 1.5, tenant="light"), 1.5)  # lifted to heavy's service: a tie
    assert ids(p.release(2.0, view(6))) == ["heavy2", "light0"]  # not after heavy3..9
    p.on_arrival(job("light1", 2.5, tenant="light"), 2.5)
    assert ids(p.release(2.5, view(7))) == ["heavy3"]  # light0 was charged: even again
    # tiers: the urgent tier first whatever its tenants' service, then aging lifts the other
    p.on_arrival(job("urgent", 3.0, tenant="heavy", priority=-1), 3.0)
    assert ids(p.release(3.0, view(6))) == ["urgent", "light1"]  # light1: less served than heavy
    p.on_arrival(job("urgent2", 40.0, tenant="light", priority=-1), 40.0)
    assert ids(p.release(40.0, view(7))) == ["heavy4"]  # waited 39.6 s: 0 - 3.96 < -1


def test_priority_lifts_a_returning_tenant_to_its_own_tier_s_service_only():
    """A tenant starved in a lower tier has little service; one coming back to a busy tier
    must be lifted to that tier's least served, not to the starved one's, or it takes the
    tier over until it has used up the difference."""
    p = PriorityAging(aging_s=1000.0, vtc=VirtualTokenCounter(w_in=0.0, w_out=1.0))
    for k in range(20):
        p.on_arrival(job(f"hi{k}", float(k), tenant="hi", priority=-5), float(k))
    p.on_arrival(job("lo0", 0.0, tenant="lo", priority=0), 0.0)
    assert ids(p.release(20.0, view(0, cap=8))) == [f"hi{k}" for k in range(8)]  # hi: 400 served; lo: 0
    p.on_arrival(job("new0", 21.0, tenant="new", priority=-5), 21.0)
    p.on_arrival(job("new1", 21.0, tenant="new", priority=-5), 21.0)
    assert p.vtc.counters["new"] == 400  # hi's, not lo's 0
    assert ids(p.release(22.0, view(4, cap=8))) == ["hi8", "new0", "hi9", "new1"]  # shared, not taken over


def test_time_window_holds_until_min_batch_or_window():
    p = TimeWindow(window_s=1.0, min_batch=3, max_batch=4)
    p.on_arrival(job("a", 0.0), 0.0)
    p.on_arrival(job("b", 0.2), 0.2)
    assert p.release(0.5, view(0)) == []
    assert p.next_wakeup(0.5) == pytest.approx(1.0)
    assert ids(p.release(1.0, view(0))) == ["a", "b"]  # window elapsed
    for k in range(6):
        p.on_arrival(job(f"c{k}", 2.0), 2.0)
    assert len(p.release(2.0, view(0))) == 4  # min batch reached; max_batch caps it


def test_time_window_releases_at_exactly_the_wakeup_it_asked_for():
    """A driver that sleeps until `next_wakeup` and calls `release` then must get the batch:
    with arrival 0.2 and a 0.5 s window the wakeup is 0.2 + 0.5 = 0.7, where 0.7 - 0.2 is
    0.49999999999999994 — comparing waits instead of deadlines released nothing, asked for no
    later wakeup, and stalled the simulator (seen in the benchmark's simulated sweep)."""
    p = TimeWindow(window_s=0.5, min_batch=4, max_batch=8)
    p.on_arrival(job("a", 0.2), 0.2)
    wake = p.next_wakeup(0.2)
    assert wake == 0.2 + 0.5 and wake - 0.2 < 0.5  # the rounding this guards against
    assert ids(p.release(wake, view(0))) == ["a"]
    assert p.next_wakeup(wake) is None


def test_load_based_batch_grows_with_load_and_stops_at_high_kv_usage():
    p = LoadBased(min_batch=2, low=2, high=10)
    for k in range(3):
        p.on_arrival(job(f"r{k}", k), k)
    light = p.release(3.0, view(0, cap=16))
    assert len(light) <= 3
    for k in range(30):
        p.on_arrival(job(f"h{k}", 10 + k), 10 + k)
    assert len(p.release(50.0, view(0, cap=16))) == 16  # heavy load: up to the engine's cap
    p.on_arrival(job("late", 60), 60)
    assert p.release(60.0, view(0, cap=16, free=50, total=1000)) == []  # KV 95% used


def test_adaptive_shrinks_on_slow_steps_and_grows_on_fast_ones():
    p = Adaptive(target_step_s=0.1, initial=8, min_batch=2)
    for k in range(40):
        p.on_arrival(job(f"r{k}", 0.0), 0.0)
    assert len(p.release(0.0, view(0, cap=32))) == 8
    p.release(1.0, view(8, cap=32, step=0.5))  # slow step
    assert p.cap < 8
    slow_cap = p.cap
    for k in range(5):
        p.release(2.0 + k, view(p.cap, cap=32, step=0.05 + k * 1e-4))  # fast steps at the cap
    assert p.cap > slow_cap


def test_adaptive_target_defaults_to_a_multiple_of_the_fastest_step():
    p = Adaptive(initial=8, min_batch=2)
    for k in range(40):
        p.on_arrival(job(f"r{k}", 0.0), 0.0)
    p.release(0.0, view(0, cap=32, step=0.6))  # a slow machine: 0.6 s is its fastest step so far
    assert p.target() == pytest.approx(1.8)
    p.release(1.0, view(8, cap=32, step=0.7))  # under the target at the cap: grows
    assert p.cap == 9
    p.release(2.0, view(9, cap=32, step=2.5))  # over it: shrinks
    assert p.cap == 7


def test_kv_reservation_by_prediction_admits_more_than_by_max_tokens():
    def released(kv: KvReservation) -> int:
        p = FcfsContinuous(kv=kv)
        for k in range(20):
            p.on_arrival(job(f"r{k}", k, pred=40, std=8, prompt=40, max_tokens=256), k)
        return len(p.release(20.0, view(0, cap=64, free=100, total=100)))

    by_max = released(KvReservation(mode="max_tokens"))  # 296 tokens = 19 blocks → 5
    by_pred = released(KvReservation(mode="predicted", margin_std=1.0, min_margin=0.2))  # 88 → 6 blocks → 16
    assert by_max == 5
    assert by_pred == 16


def test_kv_reservation_counts_the_output_once_per_sequence_and_grows_per_sequence():
    """A request of 4 beams (or n=4 samples) shares its prompt's blocks, not its outputs'."""
    from dataclasses import replace

    kv = KvReservation(mode="predicted", margin_std=0.0, min_margin=0.0)
    one = job("one", pred=40, prompt=40)
    four = replace(job("four", pred=40, prompt=40), sequences=4)
    assert (kv.tokens(one), kv.tokens(four)) == (80, 200)
    assert KvReservation(mode="max_tokens").tokens(four) == 40 + 4 * 256
    v = view(1, total=1000)
    assert kv.take(four, v) == 13  # 200 tokens → 13 blocks of 16
    # each beam's output reached the (13·16 - 40) / 4 = 42 tokens its share covers: grown to
    # 2x, for every beam
    assert kv.regrow({"four": four}, EngineView(1, 8, 1000, 1000, 16, output_tokens=lambda rid: 41)) == 0
    assert kv.regrow({"four": four}, EngineView(1, 8, 1000, 1000, 16, output_tokens=lambda rid: 42)) == 1
    assert kv.held == -(-(40 + 4 * 84) // 16)
    assert kv.regrow({"four": four}, EngineView(1, 8, 1000, 1000, 16, output_tokens=lambda rid: 60)) == 0


def test_kv_reservation_always_lets_one_request_into_an_empty_engine():
    p = FcfsContinuous(kv=KvReservation(mode="max_tokens"))
    p.on_arrival(job("big", 0.0, prompt=2000, max_tokens=2000), 0.0)
    assert ids(p.release(0.0, view(0, free=10, total=10))) == ["big"]


def test_magnus_hrrn_runs_short_groups_first_but_long_ones_age():
    est = ServingTimeEstimator(a=0.1, slope=0.0)
    p = Magnus(estimator=est, kv=KvReservation(mode="none"))
    p.on_arrival(job("long", 0.0, pred=200), 0.0)
    p.on_arrival(job("short", 1.0, pred=10), 1.0)
    # at t=2: long ratio (2 + 20)/20 = 1.1; short (1 + 1)/1 = 2 → short first
    assert ids(p.release(2.0, view(7)))[0] == "short"
    p2 = Magnus(estimator=ServingTimeEstimator(a=0.1, slope=0.0), kv=KvReservation(mode="none"))
    p2.on_arrival(job("long", 0.0, pred=200), 0.0)
    p2.on_arrival(job("short", 99.0, pred=10), 99.0)
    # at t=100: long (100 + 20)/20 = 6; short (1 + 1)/1 = 2 → the aged long one first
    assert ids(p2.release(100.0, view(7)))[0] == "long"


def test_magnus_groups_similar_predicted_lengths_together():
    p = Magnus(estimator=ServingTimeEstimator(a=0.1, slope=0.0), kv=KvReservation(mode="none"))
    for k, pred in enumerate([10, 200, 12, 190, 11, 205]):
        p.on_arrival(job(f"r{k}-{pred}", 0.0, pred=pred), 0.0)
    out = p.release(1.0, view(0, cap=3))
    assert sorted(j.predicted for j in out) == [10, 11, 12]


def test_serving_time_estimator_fits_a_linear_step_time():
    est = ServingTimeEstimator(a=1.0, slope=1.0, forget=1.0)
    for b in (1, 2, 4, 8, 16, 8, 4):
        est.observe(b, 0.02 + 0.003 * b)
    assert est.a == pytest.approx(0.02, rel=1e-6)
    assert est.slope == pytest.approx(0.003, rel=1e-6)
    assert est.best_batch(32) == 32  # throughput b / t(b) grows with b
    est.max_step_s = 0.05
    assert est.best_batch(32) == 10  # 0.02 + 0.003·10 = 0.05


def test_step_cost_fit_measures_the_per_token_cost_once_token_counts_spread():
    fit = StepCostFit(forget=1.0)
    for _ in range(20):  # saturated decode: the same 32 tokens every step — nothing to fit
        fit.observe(32, 0.005 + 2e-6 * 32)
    assert fit.token_cost_s == 0.0 and fit.overhead_s == 0.0
    for n in (512, 32, 300, 32, 480, 32, 100, 32):  # prefill chunks among the decodes
        fit.observe(n, 0.005 + 2e-6 * n)
    assert fit.token_cost_s == pytest.approx(2e-6, rel=1e-6)
    assert fit.overhead_s == pytest.approx(0.005, rel=1e-6)
    fit.observe(0, 1.0)  # an empty step says nothing
    assert fit.token_cost_s == pytest.approx(2e-6, rel=1e-6)
    assert EngineView(20, 32, 0, 0, 16, 0.1, 2e-6, 0.005).decode_step_s == pytest.approx(0.005 + 20 * 2e-6)


def test_magnus_reserves_kv_when_recompute_is_expensive_and_admits_optimistically_when_cheap():
    def released(token_cost: float, overhead: float) -> tuple[int, bool]:
        p = Magnus(estimator=ServingTimeEstimator(a=0.1, slope=0.0),
                   kv=KvReservation(mode="predicted", margin_std=0.0, min_margin=0.0))
        for k in range(20):  # 40 + 56 = 96 tokens = 6 blocks each
            p.on_arrival(job(f"r{k}", 0.0, pred=56, prompt=40), 0.0)
        # the recent mean step is a long prefill step: it must not make the recompute look cheap
        out = p.release(1.0, view(0, cap=32, free=30, total=30, step=2.0, token_cost=token_cost,
                                  overhead=overhead))
        return len(out), p.kv.optimistic

    # a CPU step: 55 ms + 3.7 ms per token; recomputing 96 tokens = 0.36 s = 6 one-request decode
    # steps → reserve: 30 blocks / 6 = 5 requests
    assert released(3.7e-3, 0.055) == (5, False)
    # a launch-bound step: 5 ms + 2 µs per token → 0.04 steps → admit up to the room, like vLLM
    assert released(2e-6, 0.005) == (20, True)
    # bf16 on AMX: 27 ms + 0.27 ms per token → 0.93 steps, near 1: the measured cost wanders
    # across such a threshold with the machine's noise, so the default (0.5) keeps away from it
    assert released(2.65e-4, 0.027) == (5, False)
    # not measured yet → reserve
    assert released(0.0, 0.0) == (5, False)
    # 0 turns the optimism off
    p = Magnus(kv=KvReservation(mode="predicted"), optimistic_below_steps=0.0)
    p.on_arrival(job("a", 0.0), 0.0)
    p.release(1.0, view(0, step=0.2, token_cost=1e-9, overhead=0.005))
    assert not p.kv.optimistic
    assert make_policy(PolicyConfig(name="hybrid", kv_optimistic_below_steps=0.0)).optimistic_below_steps == 0.0


@pytest.mark.parametrize("name", ["magnus", "hybrid"])
def test_kv_reservation_setting_forces_reserving_on_or_off(name: str):
    """`PolicyConfig.kv_reservation`: "always" reserves even where a recompute measures cheap,
    "off" never reserves (not even before the step cost is measured) and keeps the HRRN order,
    "auto" is the measured rule above."""
    def released(setting: str, token_cost: float, overhead: float) -> tuple[list[str], int]:
        p = make_policy(PolicyConfig(name=name, kv_reservation=setting, kv_margin_std=0.0, kv_min_margin=0.0))
        for k in range(12):  # 40 + 56 = 96 tokens = 6 blocks each
            p.on_arrival(job(f"r{k}", 0.0, pred=56, prompt=40), 0.0)
        p.on_arrival(job("short", 0.5, pred=4, prompt=40), 0.5)
        out = p.release(1.0, view(0, cap=32, free=30, total=30, step=0.06, token_cost=token_cost,
                                  overhead=overhead))
        return ids(out), p.kv.held

    cheap, dear, unmeasured = (2e-6, 0.005), (3.7e-3, 0.055), (0.0, 0.0)
    # reserving: the short one (44 tokens, 3 blocks) then 7 of 6 blocks fill 1.5 × 30 (kv_fraction)
    for cost in (cheap, dear, unmeasured):
        out, held = released("always", *cost)
        assert (len(out), held, out[0]) == (8, 45, "short")  # the short group first (HRRN)
        out, held = released("off", *cost)
        assert (len(out), held, out[0]) == (13, 0, "short")
    out, held = released("auto", *cheap)
    assert (len(out), held) == (13, 0)
    assert released("auto", *dear)[1] == 45 and released("auto", *unmeasured)[1] == 45
    with pytest.raises(ValueError, match="kv_reservation"):
        PolicyConfig(name=name, kv_reservation="sometimes")


def test_kv_reservations_held_before_going_optimistic_are_given_back():
    kv = KvReservation(mode="predicted", margin_std=0.0, min_margin=0.0)
    p = FcfsContinuous(kv=kv)
    p.on_arrival(job("a", 0.0, pred=56, prompt=40), 0.0)
    (a,) = p.release(0.0, view(0, cap=8, free=30, total=30))
    assert kv.held == 6
    kv.optimistic = True
    p.on_arrival(job("b", 1.0, pred=56, prompt=40), 1.0)
    (b,) = p.release(1.0, view(1, cap=8, free=24, total=30))
    assert kv.held == 6  # b reserved nothing
    p.on_finish(a, 2.0, 56)
    p.on_finish(b, 2.0, 56)
    assert kv.held == 0


def test_a_reservation_outgrown_by_its_request_grows_and_holds_back_admission():
    kv = KvReservation(mode="predicted", margin_std=0.0, min_margin=0.0)  # growth 2 by default
    p = FcfsContinuous(kv=kv)
    p.on_arrival(job("a", 0.0, pred=56, prompt=40, max_tokens=256), 0.0)
    p.release(0.0, view(0, cap=8, free=15, total=15))
    assert kv.held == 6  # 40 + 56 tokens
    p.on_arrival(job("b", 1.0, pred=56, prompt=40), 1.0)
    out = {"a": 55}

    def progress(running: int = 1) -> EngineView:
        return EngineView(running, 8, 9, 15, 16, output_tokens=out.get)

    assert p.release(1.0, progress(running=8)) == []  # no room: nothing grows or moves
    assert kv.held == 6
    out["a"] = 56  # a reached what its blocks cover: reserve 2 × 56 more, 40 + 112 = 10 blocks
    assert p.release(1.0, progress()) == []  # b's 6 no longer fit beside a's 10 in 15
    assert kv.held == 10 and kv.grown == 1
    out["a"] = 100  # inside the grown reservation (120 tokens): nothing changes
    p.release(1.0, progress())
    assert kv.held == 10 and kv.grown == 1


def test_a_grown_reservation_stops_at_max_tokens_and_growth_zero_keeps_the_bet():
    for growth, held in ((2.0, 7), (0.0, 6)):  # 40 + 64 tokens = 7 blocks at most
        kv = KvReservation(mode="predicted", margin_std=0.0, min_margin=0.0, growth=growth)
        p = FcfsContinuous(kv=kv)
        p.on_arrival(job("a", 0.0, pred=56, prompt=40, max_tokens=64), 0.0)
        p.release(0.0, view(0, cap=8, free=100, total=100))
        p.on_arrival(job("b", 1.0), 1.0)
        p.release(1.0, EngineView(1, 8, 94, 100, 16, output_tokens={"a": 60}.get))
        assert kv._held["a"] == held
    with pytest.raises(ValueError, match="growth"):
        KvReservation(growth=1.0)


def test_an_optimistic_release_holds_nothing_and_does_not_grow():
    kv = KvReservation(mode="predicted", optimistic=True)
    p = FcfsContinuous(kv=kv)
    p.on_arrival(job("a", 0.0, pred=8, prompt=40), 0.0)
    p.release(0.0, view(0))
    p.on_arrival(job("b", 1.0), 1.0)
    p.release(1.0, EngineView(1, 8, 990, 1000, 16, output_tokens={"a": 200}.get))
    assert kv._held["a"] == 0 and kv.grown == 0


def test_vtc_light_tenant_is_not_starved_by_a_heavy_one():
    p = FairVtc()
    for k in range(20):
        p.on_arrival(job(f"heavy{k}", k * 0.01, tenant="heavy"), k * 0.01)
    p.on_arrival(job("light0", 1.0, tenant="light"), 1.0)
    p.on_arrival(job("light1", 1.1, tenant="light"), 1.1)
    out = ids(p.release(2.0, view(0, cap=4)))
    assert "light0" in out and "light1" in out  # FCFS would have given all 4 slots to "heavy"


def test_vtc_lifts_a_returning_tenant_to_the_backlogged_minimum():
    v = VirtualTokenCounter()
    v.charge("a", 1000, 0)
    v.charge("b", 5000, 0)
    v.on_backlogged("c", {"a", "b"})
    assert v.counters["c"] == 1000  # no banked credit for having been idle
    assert v.pick({"a", "b", "c"}) == "a"


def test_vtc_corrects_charges_with_the_true_length():
    p = FairVtc(VirtualTokenCounter(w_in=0.0, w_out=1.0))
    j = job("r", 0.0, pred=100)
    p.on_arrival(j, 0.0)
    p.release(0.0, view(0))
    assert p.vtc.counters["t"] == 100
    p.on_finish(j, 1.0, 30)
    assert p.vtc.counters["t"] == 30


def test_hybrid_tiers_inside_a_tenant_and_fairness_across_tenants():
    p = Hybrid(aging_s=1000.0, estimator=ServingTimeEstimator(a=0.1, slope=0.0), kv=KvReservation(mode="none"))
    p.on_arrival(job("a-low", 0.0, tenant="a", priority=1, pred=10), 0.0)
    p.on_arrival(job("a-high", 0.1, tenant="a", priority=0, pred=200), 0.1)
    p.on_arrival(job("b-1", 0.2, tenant="b", pred=10), 0.2)
    out = ids(p.release(1.0, view(0, cap=2)))
    assert set(out) == {"a-high", "b-1"}  # one per tenant; within "a" the higher tier wins


def test_removed_jobs_are_never_released():
    p = FcfsContinuous()
    p.on_arrival(job("a", 0.0), 0.0)
    p.on_arrival(job("b", 0.1), 0.1)
    assert p.remove("a").rid == "a"
    assert p.remove("a") is None
    assert ids(p.release(1.0, view(0))) == ["b"]


def test_release_never_exceeds_the_engine_room():
    for name in POLICY_NAMES:
        p = make_policy(PolicyConfig(name=name, static_batch_size=16, min_batch=1, window_s=0.0))
        for k in range(50):
            p.on_arrival(job(f"r{k}", 0.0, pred=10 + k), 0.0)
        assert len(p.release(1.0, view(5, cap=8))) <= 3, name


def test_a_forgotten_tenant_comes_back_as_a_newcomer():
    """A deleted tenant's counter goes (the table grew with every tenant ever served); one
    created again under its id is lifted to the least backlogged tenant's, as any newcomer."""
    vtc = VirtualTokenCounter()
    vtc.charge("gone", 100, 100)
    vtc.charge("busy", 10, 10)
    vtc.forget("gone")
    vtc.forget("never seen")
    assert "gone" not in vtc.counters
    vtc.on_backlogged("gone", ["busy"])
    assert vtc.counters["gone"] == vtc.counters["busy"] == 30.0


def test_only_policies_that_release_whenever_there_is_room_are_work_conserving():
    """What the overload estimate reads: free seats are taken by what waits only under a
    policy that releases it at once and reserves no KV blocks."""
    conserving = {name for name in POLICY_NAMES if make_policy(PolicyConfig(name=name)).work_conserving}
    assert conserving == {"fcfs-continuous", "vtc", "priority"}
    assert not PriorityAging(kv=KvReservation(mode="max_tokens")).work_conserving
