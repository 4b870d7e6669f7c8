"""The stepper's measure of the engine's capacity, and the runtime's service-time means:
what the overload estimate (`Runtime.estimated_wait_s`) reads."""

from __future__ import annotations

import pytest

from actors.runtime import ServiceTime
from actors.stepper import DrainRate


def test_the_drain_rate_is_measured_only_while_the_engine_is_saturated():
    drain = DrainRate(window=4, least=3, stale_s=5.0)
    drain.observe(1.0, 1.0, True, 1)  # the stretch starts with the step: at 0
    drain.observe(2.0, 1.0, True, 1)
    assert drain.per_s(2.5) is None  # two requests: no rate yet
    drain.observe(3.0, 1.0, True, 1)
    assert drain.per_s(3.0) == pytest.approx(1.0)  # 3 in 3 s
    assert drain.per_s(6.0) == pytest.approx(0.5)  # nothing finished since: it is seen to slow
    drain.left(6.0, 2)  # two aborted between steps: the window keeps the last 4, from the one before
    assert drain.per_s(6.0) == pytest.approx(4 / (6.0 - 1.0))
    drain.observe(7.0, 1.0, False, 1)  # not saturated: the stretch ends (an idle gap measures nothing)
    assert drain.per_s(7.0) is None
    drain.left(7.5, 3)  # (aborts outside a stretch are not counted)
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
    drain = DrainRate(window=4, least=3, stale_s=5.0)
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
