"""Arrival schedules: when each request of a benchmark is sent.

Inter-arrival gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)) — the
mean gap is 1/rate whatever the burstiness; burstiness 1 is a Poisson process,
< 1 is burstier (more variance), > 1 is more regular. Same definition as
`vllm bench serve`. The schedule is a pure function of its arguments and the
generator, so two targets benchmarked with the same seed see the same arrivals.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send time of each of `n` requests, in seconds after the start, non-decreasing.

    `rate` is requests per second; `math.inf` sends everything at t=0.
    The first request is sent at its first gap (not at 0), as in vLLM.
    """
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return np.cumsum(gaps)


def parse_rates(text: str) -> list[float]:
    """`"1,2,4"` → [1.0, 2.0, 4.0]; `"inf"` → [inf]. Raises ValueError on bad items."""
    rates = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--request-rate expects numbers > 0 (or inf), got {item!r}") from None
        if not value > 0:
            raise ValueError(f"request rate must be > 0 (or inf), got {item!r}")
        rates.append(value)
    if not rates:
        raise ValueError("no request rate given")
    return rates
