"""Arrival schedules: reproducible from the seed, right mean rate and burstiness."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ops.loadgen.dataset import LengthRange, RandomSpec, build_workload
from ops.loadgen.schedule import arrival_offsets, parse_rates

SPEC = RandomSpec(LengthRange(4, 8), LengthRange(2, 3))


def test_same_seed_same_schedule_prompts_and_lengths() -> None:
    a = build_workload(SPEC, 50, 3.0, 0.5, seed=7)
    b = build_workload(SPEC, 50, 3.0, 0.5, seed=7)
    assert a == b
    c = build_workload(SPEC, 50, 3.0, 0.5, seed=8)
    assert [r.send_at for r in a] != [r.send_at for r in c]
    assert [r.prompt for r in a] != [r.prompt for r in c]


def test_rate_does_not_change_prompts() -> None:
    """Independent random streams: a different rate moves the arrivals only."""
    slow = build_workload(SPEC, 20, 1.0, 1.0, seed=1)
    fast = build_workload(SPEC, 20, 8.0, 1.0, seed=1)
    assert [(r.prompt, r.output_len) for r in slow] == [(r.prompt, r.output_len) for r in fast]
    assert slow[-1].send_at > fast[-1].send_at


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_mean_rate_and_burstiness(burstiness: float) -> None:
    rate, n = 5.0, 20000
    times = arrival_offsets(n, rate, burstiness, np.random.default_rng(0))
    assert np.all(np.diff(times) >= 0)
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert n / times[-1] == pytest.approx(rate, rel=0.05)
    # Gamma(k, θ): coefficient of variation² = 1/k — burstier below 1, Poisson at 1
    cv2 = gaps.var() / gaps.mean() ** 2
    assert cv2 == pytest.approx(1 / burstiness, rel=0.1)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_offsets(5, math.inf, 1.0, np.random.default_rng(0)).tolist() == [0.0] * 5


def test_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    for n, rate, burst in ((-1, 1.0, 1.0), (3, 0.0, 1.0), (3, 1.0, 0.0)):
        with pytest.raises(ValueError):
            arrival_offsets(n, rate, burst, rng)
    assert parse_rates("1, 2,inf") == [1.0, 2.0, math.inf]
    for bad in ("", "0", "1,-2", "fast"):
        with pytest.raises(ValueError):
            parse_rates(bad)
