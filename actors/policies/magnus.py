"""Magnus (arXiv 2406.04785) on a continuous-batching engine, and the hybrid policy.

Magnus's three ideas, as policy logic:

1. *Similar-length grouping.* Waiting requests are grouped by predicted output
   length (geometric buckets), so requests that enter the engine together
   also leave it together and a batch is not held by one long straggler.
2. *Batch size from a serving-time estimator.* `ServingTimeEstimator` fits the
   engine's step time as `a + b·running` online (least squares over the step
   times it observes) and picks the batch size that maximizes throughput
   `b / t(b)` subject to an optional per-step latency bound; the KV reservation
   by predicted length (`KvReservation(mode="predicted")`) caps it by memory —
   where a preemption is expensive. Reserving trades concurrency for fewer
   preemptions, and a preemption costs the recompute of the request's context.
   On these CPUs (a step ≈ 30-55 ms + 1.3-3.7 ms per token) recomputing a typical
   request costs ~5 steps and reserving wins (0.72-0.77 of fcfs-continuous's mean
   response time against 0.81-0.87 admitting optimistically, simulated); with a
   launch-bound step (5 ms + 2 µs per token: a small model on a GPU) it costs a
   tenth of a step, and reserving *lost* (1.01 against 0.89); bf16 on AMX
   (27 ms + 0.27 ms per token) is in between at ~1 step, where reserving still won
   by 0.01-0.03 (simulated). So Magnus reserves
   unless the engine's measured step cost (`EngineView.token_cost_s`,
   `step_overhead_s`) says that recomputing the waiting requests' mean context
   costs less than `optimistic_below_steps` (default 0.5) decode steps of the
   running batch; then it admits like vLLM.
3. *Highest response ratio next* across groups: ratio = (W + S) / S, with W the
   oldest wait in the group and S the group's estimated serving time
   (predicted tokens × t(batch)). Short groups run first while long ones age,
   so nothing starves.

`Hybrid` adds tiers (priority with aging) and per-tenant fairness (VTC) on top:
the tenant with the least virtual service goes next; within it, the lowest
effective tier, then Magnus's HRRN order.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from actors.policies.base import DecayingLeastSquares, EngineView, Job, KvReservation, PolicyBase
from actors.policies.batching import VtcAccounting, _by_tenant, fair_order
from actors.policies.fairness import VirtualTokenCounter

DEFAULT_BUCKETS: tuple[int, ...] = (8, 16, 32, 64, 96, 128, 192, 256)


@dataclass
class ServingTimeEstimator:
    """Step time t(b) ≈ a + slope·b, fitted online by least squares on (running, step time).

    Starts from the prior (`a`, `slope`) and blends in observations with an
    exponential forgetting factor so it follows load from other processes.
    """

    a: float = 0.05
    slope: float = 0.005
    forget: float = 0.98
    max_step_s: float = float("inf")  # optional latency bound per step (TPOT SLO)
    _fit: DecayingLeastSquares = field(init=False)
    _last: tuple[int, float] = (-1, -1.0)

    def __post_init__(self) -> None:
        self._fit = DecayingLeastSquares(self.forget)

    def observe(self, running: int, step_s: float) -> None:
        if step_s <= 0 or running <= 0 or (running, step_s) == self._last:
            return
        self._last = (running, step_s)
        fit = self._fit
        fit.add(running, step_s)
        if fit.n >= 3 and fit.spread > 1e-9 * max(1.0, fit.n * fit.sxx):
            slope = fit.slope()
            a = fit.intercept(slope)
            if slope > 0 and a > 0:
                self.a, self.slope = a, slope
                return
        # one batch size seen so far: keep the slope, move the intercept
        self.a = max(1e-4, fit.intercept(self.slope))

    def step_time(self, batch: int) -> float:
        return self.a + self.slope * max(1, batch)

    def serving_time(self, tokens: float, batch: int) -> float:
        """Seconds to generate `tokens` tokens in a batch of `batch`."""
        return max(1.0, tokens) * self.step_time(batch)

    def best_batch(self, cap: int) -> int:
        """Largest-throughput batch size ≤ cap whose step time meets `max_step_s`."""
        best, best_tp = 1, 0.0
        for b in range(1, max(1, cap) + 1):
            t = self.step_time(b)
            if t > self.max_step_s and b > 1:
                break
            if b / t > best_tp:
                best, best_tp = b, b / t
        return best


def _bucket(pred: float, buckets: Sequence[int]) -> int:
    return bisect.bisect_left(buckets, pred)


class Magnus(PolicyBase):
    """Length-grouped, HRRN-ordered, estimator-sized batching (see module docstring)."""

    name = "magnus"

    def __init__(self, estimator: ServingTimeEstimator | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 kv: KvReservation | None = None, optimistic_below_steps: float = 0.5) -> None:
        super().__init__(kv or KvReservation(mode="predicted"))
        if optimistic_below_steps < 0:
            raise ValueError("optimistic_below_steps must be >= 0")
        self.estimator = estimator or ServingTimeEstimator()
        self.buckets = tuple(sorted(buckets))
        self.optimistic_below_steps = optimistic_below_steps
        self.batch_size = 0  # the estimator's last choice (for reports)

    def recompute_steps(self, view: EngineView) -> float | None:
        """How many decode steps of the running batch recomputing the waiting requests'
        mean context (prompt + predicted output) would cost; None while unmeasured.

        Decode steps, not the recent mean step: a stretch of 512-token prefill chunks
        would make any recompute look cheap."""
        if view.token_cost_s <= 0 or not len(self.waiting):
            return None
        jobs = list(self.waiting)
        context = sum(j.prompt_tokens + j.predicted for j in jobs) / len(jobs)
        return view.token_cost_s * context / view.decode_step_s

    def _limit(self, now: float, view: EngineView) -> int:
        if view.step_time_s > 0:
            self.estimator.observe(max(1, view.running), view.step_time_s)
        self.batch_size = self.estimator.best_batch(view.max_running)
        if self.kv.mode == "predicted":
            cost = self.recompute_steps(view)
            if cost is not None:
                self.kv.optimistic = cost < self.optimistic_below_steps
        return max(0, self.batch_size - view.running)

    def groups(self, jobs: Iterable[Job]) -> dict[int, list[Job]]:
        out: dict[int, list[Job]] = {}
        for j in jobs:
            out.setdefault(_bucket(j.predicted, self.buckets), []).append(j)
        return out

    def hrrn_order(self, jobs: Iterable[Job], now: float) -> list[Job]:
        """Groups by highest response ratio (W + S) / S; FCFS within a group."""
        batch = max(1, self.batch_size)
        ranked = []
        for key, members in self.groups(jobs).items():
            members.sort(key=lambda j: j.arrival)
            mean_pred = sum(j.predicted for j in members) / len(members)
            s = self.estimator.serving_time(mean_pred, batch)
            w = now - members[0].arrival
            ranked.append(((w + s) / s, -key, members))
        ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
        return [j for _, _, members in ranked for j in members]

    def _choose(self, now: float, view: EngineView) -> Iterable[Job]:
        return self.hrrn_order(self.waiting, now)


class Hybrid(VtcAccounting, Magnus):
    """Fairness (VTC across tenants) → tiers with aging → Magnus HRRN within a tier."""

    name = "hybrid"

    def __init__(self, aging_s: float = 10.0, vtc: VirtualTokenCounter | None = None,
                 estimator: ServingTimeEstimator | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 kv: KvReservation | None = None, optimistic_below_steps: float = 0.5) -> None:
        if aging_s <= 0:
            raise ValueError("aging_s must be positive")
        super().__init__(estimator, buckets, kv, optimistic_below_steps)
        self.aging_s = aging_s
        self.vtc = vtc or VirtualTokenCounter()

    def _tenant_order(self, jobs: list[Job], now: float) -> list[Job]:
        tiers: dict[int, list[Job]] = {}
        for j in jobs:
            tiers.setdefault(j.priority, []).append(j)
        ranked = sorted(tiers.items(), key=lambda kv: min(j.priority - (now - j.arrival) / self.aging_s
                                                           for j in kv[1]))
        return [j for _, members in ranked for j in self.hrrn_order(members, now)]

    def _choose(self, now: float, view: EngineView) -> Iterator[Job]:
        queues = {t: self._tenant_order(js, now) for t, js in _by_tenant(self.waiting).items()}
        return fair_order(self.vtc, queues)
