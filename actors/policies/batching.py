"""The classic batching policies (seed 001): static, continuous, priority, time-window,
load-based, adaptive, and per-tenant fair (VTC).

Each is a `PolicyBase` subclass that only says *how many* may be released now
(`_limit`) and *in which order* (`_choose`); see `actors.policies.base`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from actors.policies.base import EngineView, Job, KvReservation, PolicyBase
from actors.policies.fairness import VirtualTokenCounter


def _fcfs(jobs: Iterable[Job]) -> list[Job]:
    return sorted(jobs, key=lambda j: j.arrival)


class FcfsStatic(PolicyBase):
    """TF-Serving/Triton-style static batching: a fixed batch of `batch_size`,
    first-come-first-served; the next batch starts only when the engine is empty
    (every request of the previous batch has finished)."""

    name = "fcfs-static"

    def __init__(self, batch_size: int = 8, kv: KvReservation | None = None) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        super().__init__(kv)
        self.batch_size = batch_size

    def _limit(self, now: float, view: EngineView) -> int:
        return min(self.batch_size, view.max_running) if view.running == 0 else 0

    def _choose(self, now: float, view: EngineView) -> Iterable[Job]:
        return _fcfs(self.waiting)


class FcfsContinuous(PolicyBase):
    """vLLM-style continuous batching: first-come-first-served whenever there is room."""

    name = "fcfs-continuous"
    releases_at_once = True

    def _choose(self, now: float, view: EngineView) -> Iterable[Job]:
        return _fcfs(self.waiting)


class TimeWindow(PolicyBase):
    """Collect for up to `window_s`: release once `min_batch` are waiting or the oldest
    has waited `window_s`, at most `max_batch` at a time, FCFS."""

    name = "time-window"

    def __init__(self, window_s: float = 0.5, min_batch: int = 4, max_batch: int = 32,
                 kv: KvReservation | None = None) -> None:
        if window_s < 0 or min_batch <= 0 or max_batch < min_batch:
            raise ValueError("need window_s >= 0 and 0 < min_batch <= max_batch")
        super().__init__(kv)
        self.window_s, self.min_batch, self.max_batch = window_s, min_batch, max_batch

    def _limit(self, now: float, view: EngineView) -> int:
        oldest = self.waiting.oldest()
        if oldest is None:
            return 0
        # the deadline exactly as `next_wakeup` computes it: `now - arrival >= window` can be
        # False at that very wakeup (float rounding), and nothing would wake the driver again
        if len(self.waiting) >= self.min_batch or now >= oldest.arrival + self.window_s:
            return min(view.room, self.max_batch)
        return 0

    def _choose(self, now: float, view: EngineView) -> Iterable[Job]:
        return _fcfs(self.waiting)

    def next_wakeup(self, now: float) -> float | None:
        oldest = self.waiting.oldest()
        return None if oldest is None else oldest.arrival + self.window_s


class LoadBased(PolicyBase):
    """Batch size follows load: the running target grows linearly from `min_batch`
    (load ≤ `low`) to the engine's cap (load ≥ `high`), load = waiting + running;
    nothing is released while KV usage is above `kv_high`."""

    name = "load-based"

    def __init__(self, min_batch: int = 4, low: int = 4, high: int = 32, kv_high: float = 0.9,
                 kv: KvReservation | None = None) -> None:
        if min_batch <= 0 or high <= low:
            raise ValueError("need min_batch > 0 and high > low")
        super().__init__(kv)
        self.min_batch, self.low, self.high, self.kv_high = min_batch, low, high, kv_high

    def target(self, load: int, cap: int) -> int:
        frac = min(1.0, max(0.0, (load - self.low) / (self.high - self.low)))
        return min(cap, max(self.min_batch, round(self.min_batch + frac * (cap - self.min_batch))))

    def _limit(self, now: float, view: EngineView) -> int:
        if view.kv_usage > self.kv_high:
            return 0
        return max(0, self.target(len(self.waiting) + view.running, view.max_running) - view.running)

    def _choose(self, now: float, view: EngineView) -> Iterable[Job]:
        return _fcfs(self.waiting)


class Adaptive(PolicyBase):
    """Batch size from observed step times (AIMD): while the recent step time stays
    under the target and the running set is at the cap, the cap grows by one;
    when a step is slower than the target, the cap shrinks by `decrease`.

    The target is `target_step_s` if given, else `auto_factor` × the fastest step
    seen so far (≈ the cost of a near-empty step on this machine right now), so
    the policy keeps a per-token latency bound relative to the hardware instead
    of an absolute number that a slow or shared CPU can never meet.
    """

    name = "adaptive"

    def __init__(self, target_step_s: float | None = None, initial: int = 8, min_batch: int = 2,
                 decrease: float = 0.8, auto_factor: float = 3.0, kv: KvReservation | None = None) -> None:
        if (target_step_s is not None and target_step_s <= 0) or min_batch <= 0 or not 0 < decrease < 1:
            raise ValueError("need target_step_s > 0 (or None), min_batch > 0, 0 < decrease < 1")
        if auto_factor <= 1:
            raise ValueError("auto_factor must be > 1")
        super().__init__(kv)
        self.target_step_s, self.cap, self.min_batch, self.decrease = target_step_s, initial, min_batch, decrease
        self.auto_factor = auto_factor
        self._fastest = math.inf
        self._last_step = 0.0

    def target(self) -> float:
        if self.target_step_s is not None:
            return self.target_step_s
        return self.auto_factor * self._fastest

    def _adapt(self, view: EngineView) -> None:
        t = view.step_time_s
        if t <= 0 or t == self._last_step:
            return  # no new measurement since the last decision
        self._last_step = t
        self._fastest = min(self._fastest, t)
        if t > self.target():
            self.cap = max(self.min_batch, math.floor(self.cap * self.decrease))
        elif view.running >= self.cap:
            self.cap = min(view.max_running, self.cap + 1)

    def _limit(self, now: float, view: EngineView) -> int:
        self._adapt(view)
        return max(0, min(self.cap, view.max_running) - view.running)

    def _choose(self, now: float, view: EngineView) -> Iterable[Job]:
        return _fcfs(self.waiting)


class VtcAccounting:
    """Mixin for policies that keep a `self.vtc` (S-LoRA's virtual token counter):
    a tenant that becomes backlogged is lifted to the least-served backlogged
    tenant's counter; released requests are charged prompt + predicted tokens,
    corrected by the true length when they finish. Put it before the policy base
    in the class bases (it calls `super()`)."""

    vtc: VirtualTokenCounter

    def on_arrival(self, job: Job, now: float) -> None:
        backlogged = self._competing(job)
        if job.tenant not in backlogged:
            self.vtc.on_backlogged(job.tenant, backlogged)
        super().on_arrival(job, now)

    def _competing(self, job: Job) -> set[str]:
        """The tenants waiting that `job` competes with for service (every one here)."""
        return {j.tenant for j in self.waiting}

    def _released(self, job: Job, now: float) -> None:
        self.vtc.charge(job.tenant, job.prompt_tokens, job.predicted)

    def on_finish(self, job: Job, now: float, output_tokens: int) -> None:
        if job.rid in self.inflight:
            self.vtc.charge(job.tenant, 0, output_tokens - job.predicted)
        super().on_finish(job, now, output_tokens)


class FairVtc(VtcAccounting, PolicyBase):
    """Per-tenant fairness alone: the backlogged tenant with the least virtual
    service goes next (S-LoRA VTC), FCFS within a tenant."""

    name = "vtc"
    releases_at_once = True

    def __init__(self, vtc: VirtualTokenCounter | None = None, kv: KvReservation | None = None) -> None:
        super().__init__(kv)
        self.vtc = vtc or VirtualTokenCounter()

    def _choose(self, now: float, view: EngineView) -> Iterator[Job]:
        return fair_order(self.vtc, {t: _fcfs(js) for t, js in _by_tenant(self.waiting).items()})


def _by_tenant(jobs: Iterable[Job]) -> dict[str, list[Job]]:
    out: dict[str, list[Job]] = {}
    for j in jobs:
        out.setdefault(j.tenant, []).append(j)
    return out


def fair_order(vtc: VirtualTokenCounter, queues: dict[str, list[Job]]) -> Iterator[Job]:
    """Interleave per-tenant queues (each already in its own order) by VTC, charging
    a shadow copy of the counters as jobs are taken (the real charge happens on release).
    Tenants of equal service go in the order of their next jobs' arrivals (a tenant just
    lifted to the others' counter ties with them), not of their names. The shadow holds
    only the queued tenants' counters: the table keeps every tenant ever served, and
    copying it all on every pass cost time in the number of tenants, not of waiting ones."""
    shadow = VirtualTokenCounter(vtc.w_in, vtc.w_out, {t: vtc.counters.get(t, 0.0) for t in queues})
    heads = {t: 0 for t, q in queues.items() if q}
    while heads:
        t = min(heads, key=lambda t: (shadow.counters.get(t, 0.0), queues[t][heads[t]].arrival, t))
        job = queues[t][heads[t]]
        yield job
        shadow.charge(t, job.prompt_tokens, job.predicted)
        heads[t] += 1
        if heads[t] >= len(queues[t]):
            del heads[t]


class PriorityAging(VtcAccounting, PolicyBase):
    """Tiers with aging, and fairness across the tenants of a tier. The runtime's default.

    A tier's turn comes by its oldest request's effective priority, tier − waited /
    aging_s (lower first; ties: the older), so nothing starves; within a tier the tenant
    with the least service so far goes next (S-LoRA's virtual token counter, as `vtc`),
    FCFS within a tenant. Without the fairness, one tenant's flood delayed every other
    tenant of its tier by its whole backlog (an audit: a light tenant's TTFT went from 0.09
    to 4.6-5.9 s beside 8-24 streams of a heavy one; under `hybrid`, which has it, 1.3-2.1 s).
    """

    name = "priority"
    releases_at_once = True

    def __init__(self, aging_s: float = 10.0, vtc: VirtualTokenCounter | None = None,
                 kv: KvReservation | None = None) -> None:
        if aging_s <= 0:
            raise ValueError("aging_s must be positive")
        super().__init__(kv)
        self.aging_s = aging_s
        self.vtc = vtc or VirtualTokenCounter()
        self._engine_values: dict[str, int] = {}  # of the jobs the last `_choose` yielded

    def engine_priority(self, job: Job) -> int:
        """The tier's turn as the queue took it, in whole tiers: a tier goes by its oldest
        waiting request's `priority − waited / aging_s`, which orders tiers as `priority +
        arrival / aging_s` does at any moment (the `now` is common to all), so the engine's
        static value goes on aging the requests it holds — one preempts a running request
        of another tier only if its tier would have gone first here. Its tier's oldest when
        it was chosen, not its own arrival: a light tenant's fresh request released before a
        heavy one's backlog has the tier's turn, and the values rise in release order within
        a tier (a review: by arrival, the backlog released after it evicted it). Floored to
        a whole number, so that the values of one tier's requests are equal between
        multiples of `aging_s` and the engine keeps their release order (FCFS: no
        preemption among them; one step at most between requests let in close together).
        Handed the bare tier, a tier-0 request the queue had aged in was evicted for every
        tier-9 one: 108 s for 64 tokens, against 10 s at tier 9 (an audit)."""
        value = self._engine_values.get(job.rid)
        return value if value is not None else math.floor(job.priority + job.arrival / self.aging_s)

    def _competing(self, job: Job) -> set[str]:
        """Only its tier's: fairness is among the tenants of a tier. Lifted to the least
        served waiting tenant of every tier, a tenant coming back to a busy tier took the
        counter of one starved in a lower tier, and with it the tier, for tens of seconds
        (an audit: another tenant of the tier went 31.7 s without a start, against 2.0)."""
        return {j.tenant for j in self.waiting if j.priority == job.priority}

    def _choose(self, now: float, view: EngineView) -> Iterator[Job]:
        tiers: dict[int, list[Job]] = {}
        for j in self.waiting:
            tiers.setdefault(j.priority, []).append(j)
        orders = {p: fair_order(self.vtc, {t: _fcfs(js) for t, js in _by_tenant(members).items()})
                  for p, members in tiers.items()}
        by_age = {p: _fcfs(members) for p, members in tiers.items()}
        oldest = dict.fromkeys(tiers, 0)  # index of each tier's oldest request not yet chosen
        chosen: set[str] = set()
        self._engine_values.clear()
        while orders:
            p = min(orders, key=lambda p: (p - (now - by_age[p][oldest[p]].arrival) / self.aging_s,
                                           by_age[p][oldest[p]].arrival))
            job = next(orders[p])
            chosen.add(job.rid)
            self._engine_values[job.rid] = math.floor(p + by_age[p][oldest[p]].arrival / self.aging_s)
            yield job
            while oldest[p] < len(by_age[p]) and by_age[p][oldest[p]].rid in chosen:
                oldest[p] += 1
            if oldest[p] == len(by_age[p]):
                del orders[p]
