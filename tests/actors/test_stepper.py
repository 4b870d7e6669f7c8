"""The stepper's measure of the engine's capacity, and the runtime's service-time means:
what the overload estimate (`Runtime.estimated_wait_s`) reads."""

from __future__ import annotations

import pytest

from actors.runtime import ServiceTime
from actors.stepper import DrainRate


def test_the_drain_rate_is_measured_only_while_the_engine_is_saturated():
    drain = DrainRate(window=4, least=3, stale_s=2.0)
    drain.observe(1.0, 1.0, True, 1)  # the stretch starts with the step: at 0
    drain.observe(2.0, 1.0, True, 1)
    assert drain.per_s(2.5) is None  # two requests: no rate yet
    drain.observe(3.0, 1.0, True, 1)
    assert drain.per_s(3.0) == pytest.approx(1.0)  # 3 in 3 s
    assert drain.per_s(4.0) == pytest.approx(0.75)  # nothing finished since: it is seen to slow
    drain.left(4.0, 2)  # two aborted between steps: the window keeps the last 4, from the one before
    assert drain.per_s(4.0) == pytest.approx(4 / (4.0 - 1.0))
    drain.observe(4.5, 0.5, False, 3)  # a step with room to spare: its requests measure demand, not capacity
    assert drain.per_s(4.5) == pytest.approx(4 / (4.5 - 1.0))
    drain.observe(6.0, 1.0, False, 0)  # 2 s without a saturated step: the stretch ends
    assert drain.per_s(6.0) is None
    drain.left(6.5, 3)  # (aborts outside a stretch are not counted)
    drain.observe(8.0, 1.0, True, 0)
    assert drain.per_s(8.0) is None
    with pytest.raises(ValueError):
        DrainRate(window=2, least=3)


def test_requests_that_finish_together_count_over_the_time_they_took():
    """8 requests finishing in one step every 10 s are 0.8 a second, however soon after
    a batch it is read (counted from the first of them, it read 140 a second at 0.05 s)."""
    drain = DrainRate(window=16)
    for k in range(1, 5):
        for t in range(10 * (k - 1), 10 * k - 1):
            drain.observe(t + 1.0, 1.0, True, 0)
        drain.observe(10.0 * k, 1.0, True, 8)
        assert drain.per_s(10.0 * k + 0.05) == pytest.approx(0.8, rel=0.01)


def test_a_stretch_ends_after_a_while_without_a_saturated_step():
    """The engine went idle without a step that was not saturated (its last requests were
    aborted, or all ended in a saturated step): the old stretch is dropped, not read as
    the rate of a burst ten minutes later."""
    drain = DrainRate(window=4, least=3, stale_s=2.0)
    for t in range(1, 5):
        drain.observe(float(t), 1.0, True, 1)
    assert drain.per_s(4.0) == pytest.approx(1.0)
    assert drain.per_s(600.0) is None
    drain.observe(601.0, 1.0, True, 1)  # a new stretch, from this step's start
    drain.observe(602.0, 1.0, True, 2)
    assert drain.per_s(602.0) == pytest.approx(3 / 2)


def test_service_time_starts_as_a_mean_and_guesses_from_the_decode_step_time_before():
    s = ServiceTime(alpha=0.1, initial=2.0, initial_tokens=128.0)
    assert s.expected(0.0) == 2.0  # nothing measured: the guess
    assert s.expected(0.05) == pytest.approx(128 * 0.05)  # a typical request's tokens at the measured pace
    s.observe(6.0, 64)
    assert (s.value, s.tokens) == (6.0, 64)  # the first request replaces the guesses whole
    assert s.expected(0.5) == 6.0  # observed: the step time is not read
    s.observe(2.0, 32)
    assert (s.value, s.tokens) == (4.0, 48)  # then a plain mean ...
    for _ in range(20):
        s.observe(4.0, 48)
    s.observe(14.0, 48)
    assert s.value == pytest.approx(5.0)  # ... until its weight falls to alpha


def estimate(*, outside: int, running: int, waiting: list[tuple[str, int]], seats: int = 4,
             drain: DrainRate | None = None, now: float = 100.0, service_s: float = 6.0,
             for_blocks: bool = True, held_back: bool = False, kv_free: float = 1.0,
             ages: tuple[float, ...] = (), waited: tuple[float, ...] = ()) -> float:
    """`Runtime.estimated_wait_s` over a stand-in engine: `waiting` its waiting sequences
    as (request id, tokens left), waiting for KV blocks (`for_blocks`) or for the step's
    token budget; `outside` requests admitted and not in the engine yet, which a policy
    may hold back while seats are free (`held_back`); `kv_free` the share of its 1,000 KV
    blocks free; `ages` how long the requests running in the engine have been in it,
    `waited` those waiting in it."""
    from types import SimpleNamespace

    from actors import runtime as runtime_module
    from actors.runtime import Runtime
    from actors.stepper import Stepper

    def waiting_work(typical: float, owner=None) -> float:  # type: ignore[no-untyped-def]
        shares: dict[str, float] = {}
        for i, (rid, left) in enumerate(waiting):
            key = rid if owner is not None else str(i)
            shares[key] = max(shares.get(key, 0.0), min(1.0, left / typical))
        return sum(shares.values())

    service = ServiceTime()
    service.observe(service_s, 100)
    stand_in = SimpleNamespace(
        engine=SimpleNamespace(scheduler=SimpleNamespace(num_waiting=len(waiting), num_running=running,
                                                         waiting_work=waiting_work,
                                                         running_ids=lambda: [f"r{i}" for i in range(len(ages))],
                                                         waits_for_blocks=for_blocks and bool(waiting)),
                               config=SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=seats)),
                               block_manager=SimpleNamespace(num_blocks=1000, num_free_blocks=int(1000 * kv_free)),
                               owner_of=lambda sid: sid),
        stepper=SimpleNamespace(drain=drain or DrainRate(), mean_decode_step_s=0.05,
                                active={**{f"r{i}": SimpleNamespace(scheduled_at=now - age) for i, age in enumerate(ages)},
                                        **{f"w{i}": SimpleNamespace(scheduled_at=now - age) for i, age in enumerate(waited)}}),
        queue=SimpleNamespace(policy=SimpleNamespace(work_conserving=not held_back)),
        _service_time=service, waiting=lambda: outside + len(waiting))
    stand_in.stepper.median_age_s = lambda t, among=None: Stepper.median_age_s(stand_in.stepper, t, among)  # type: ignore[arg-type]
    clock = runtime_module.time.monotonic
    runtime_module.time.monotonic = lambda: now
    try:
        return Runtime.estimated_wait_s(stand_in)  # type: ignore[arg-type]
    finally:
        runtime_module.time.monotonic = clock


def test_the_overload_estimate_counts_the_seats_the_kv_cache_lets_run():
    """Requests waiting in the engine while seats are free wait for KV blocks: as many run
    as fit, not `max_num_seqs` (an audit: first tokens 15-34 s after admission under an
    8 s limit, with 2 of 4 seats running); and with no place free, one request must end
    before the next starts."""
    two_fit = estimate(outside=3, running=2, waiting=[("a", 100), ("b", 100)])
    assert two_fit == pytest.approx((3 + 2 + 1) / 2 * 6.0)
    assert estimate(outside=0, running=4, waiting=[]) == pytest.approx(1 / 4 * 6.0)  # seats full
    assert estimate(outside=0, running=3, waiting=[]) == 0.0  # a seat is free
    # those on their way in take the free seat, then the request waits for one to end
    assert estimate(outside=2, running=3, waiting=[]) == pytest.approx((2 - 1 + 1) / 4 * 6.0)
    # a burst into an idle engine waits for the step's token budget, not for blocks: every
    # seat will run (counted as the one running, it was refused with Retry-After of minutes)
    burst = [(f"r{i}", 100) for i in range(62)]
    assert estimate(outside=0, running=1, waiting=burst, seats=64, for_blocks=False) == 0.0  # a seat is left
    assert estimate(outside=1, running=1, waiting=burst, seats=64, for_blocks=False) == pytest.approx(1 / 64 * 6.0)
    # seats free but not the KV blocks to fill them: 2 running hold 90% of the cache
    assert estimate(outside=3, running=2, waiting=[], kv_free=0.1) == pytest.approx((3 - 0 + 1) / 4 * 6.0)
    assert estimate(outside=3, running=2, waiting=[], kv_free=0.5) == pytest.approx((3 - 2 + 1) / 4 * 6.0)
    # a policy that holds requests back while seats are free (fcfs-static, time-window,
    # KV reservations): the free seats are not theirs (counted so, every estimate was 0)
    assert estimate(outside=100, running=10, waiting=[], seats=128, held_back=True) == pytest.approx(101 / 128 * 6.0)


def test_the_measured_rate_counts_requests_not_their_sequences():
    drain = DrainRate(window=8, least=3)
    for t in range(1, 5):
        drain.observe(2.0 * t, 2.0, True, 1)  # a request every 2 s since 0
    choices = [("n4", 100)] * 4  # one n=4 request's choices waiting in the engine
    assert estimate(outside=3, running=4, waiting=choices, drain=drain, now=8.0) == pytest.approx((3 + 1 + 1) / 0.5)
    # a burst right after a busy stretch, into an engine with seats free: those that take
    # them start at once (costed at all of the burst, the sixth of 8 was refused at 10.9 s)
    assert estimate(outside=5, running=0, waiting=[], drain=drain, now=8.0) == pytest.approx((5 - 4 + 1) / 0.5)
    assert estimate(outside=3, running=0, waiting=[], drain=drain, now=8.0) == 0.0


def test_the_estimate_before_the_rate_costs_a_request_no_shorter_than_those_running():
    """The requests that ended were short ones (6 s here) and those in the engine have run
    for longer: a request is costed at twice their lower median time so far (taken to run
    as long again), not at the short ones' mean (after three 16-token warm-ups, 128-token
    requests were costed at 0.5 s each and admitted streams waited up to 20 s under an 8 s
    limit). One long request beside short ones does not set it; once the rate is measured
    it is not read."""
    assert estimate(outside=3, running=2, waiting=[("a", 100)], ages=(20.0, 30.0)) == pytest.approx((3 + 1 + 1) / 2 * 40.0)
    assert estimate(outside=3, running=2, waiting=[("a", 100)], ages=(1.0, 2.0)) == pytest.approx((3 + 1 + 1) / 2 * 6.0)
    assert estimate(outside=3, running=4, waiting=[], ages=(1.0, 2.0, 2.5, 90.0)) == pytest.approx((3 + 1) / 4 * 6.0)
    # those waiting in the engine are counted as waiting, not by their time there (a review)
    assert estimate(outside=0, running=2, waiting=[("a", 100), ("b", 100)], ages=(1.0, 2.0),
                    waited=(30.0, 40.0, 50.0)) == pytest.approx((2 + 1) / 2 * 6.0)
    drain = DrainRate(window=8, least=3)
    for t in range(1, 5):
        drain.observe(2.0 * t, 2.0, True, 1)
    assert estimate(outside=3, running=4, waiting=[], drain=drain, now=8.0, ages=(40.0,) * 4) == pytest.approx(4 / 0.5)
