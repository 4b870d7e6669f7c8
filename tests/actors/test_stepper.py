"""The stepper's measure of the engine's capacity, and the runtime's service-time means:
what the overload estimate (`Runtime.estimated_wait_s`) reads."""

from __future__ import annotations

import pytest

from actors.runtime import ServiceTime
from actors.stepper import DrainRate


def test_the_drain_rate_is_measured_only_while_the_engine_is_saturated():
    drain = DrainRate(window=4, least=3)
    drain.observe(0.0, True, 1)
    drain.observe(1.0, True, 1)
    assert drain.per_s(1.5) is None  # two completions: no rate yet
    drain.observe(2.0, True, 1)
    assert drain.per_s(2.0) == pytest.approx(1.0)  # 2 intervals in 2 s
    assert drain.per_s(4.0) == pytest.approx(0.5)  # nothing finished since: it is seen to slow
    drain.observe(2.5, True, 2)  # two at once; the window keeps the last 4
    assert drain.per_s(2.5) == pytest.approx(3 / 1.5)
    drain.observe(3.0, False, 1)  # idle: the stretch ends, and an idle gap measures nothing
    assert drain.per_s(100.0) is None
    drain.observe(101.0, True, 0)
    assert drain.per_s(102.0) is None
    with pytest.raises(ValueError):
        DrainRate(window=2, least=3)


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
