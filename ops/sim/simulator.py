"""Discrete-event simulator of the serving loop: a policy + the real step scheduler.

The scheduling is not modeled, it is the real thing: `actors.step_scheduler.StepScheduler`
over a real `gpu.block_manager.BlockManager` (chunked prefill, prefix hits,
preemption and recompute all happen as in the engine). Only the model is
replaced: each step takes `StepTimeModel.predict(plan)` seconds of virtual time,
and a request finishes when it has produced its recorded true output length.

    result = simulate(requests, policy, SimConfig(...), step_model)

Calibrate `StepTimeModel` on step times measured in the real engine
(`StepTimeModel.fit`); `ops.bench_sched` reports how close simulated mean
response times come to the real runs.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from actors.policies import BatchPolicy, EngineView, Job, StepCostFit
from actors.step_scheduler import SchedRequest, StepPlan, StepScheduler
from gpu.block_manager import BlockManager
from gpu.config import SchedulerConfig


@dataclass(frozen=True)
class StepFeatures:
    """What the step time depends on, read from a step plan."""

    num_tokens: int  # tokens fed this step (prefill chunks + decodes)
    num_seqs: int
    context_tokens: int  # sum over sequences of the positions they attend to
    # of num_tokens, those fed in prefill chunks (prompts, and the recompute of preempted
    # requests); reported, not a term of `StepTimeModel`: a separate prefill price did not
    # fit measured steps better (docs/scheduling.md, nineteenth session)
    prefill_tokens: int = 0

    @classmethod
    def of(cls, plan: StepPlan) -> StepFeatures:
        ctx = sum(s.start_pos + len(s.token_ids) for s in plan.seqs)
        prefill = sum(len(s.token_ids) for s in plan.seqs if len(s.token_ids) != 1)
        return cls(plan.num_tokens, len(plan.seqs), ctx, prefill)

    def vector(self) -> list[float]:
        return [1.0, float(self.num_tokens), float(self.num_seqs), float(self.context_tokens)]


@dataclass(frozen=True)
class StepTimeModel:
    """t = c0 + c_tok·tokens + c_seq·seqs + c_ctx·context (seconds), non-negative coefficients."""

    coef: tuple[float, float, float, float] = (0.02, 0.0004, 0.0005, 0.000002)

    def predict(self, f: StepFeatures) -> float:
        return float(np.dot(self.coef, f.vector()))

    @classmethod
    def fit(cls, samples: Sequence[tuple[StepFeatures, float]]) -> StepTimeModel:
        """Least squares with non-negativity (coefficients that come out negative are dropped)."""
        if len(samples) < 8:
            raise ValueError(f"need at least 8 measured steps to calibrate, got {len(samples)}")
        x = np.array([f.vector() for f, _ in samples])
        y = np.array([t for _, t in samples])
        active = list(range(x.shape[1]))
        while True:
            c, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
            if (c >= 0).all() or len(active) == 1:
                break
            active.pop(int(np.argmin(c)))
        coef = [0.0] * x.shape[1]
        for i, v in zip(active, c, strict=True):
            coef[i] = max(0.0, float(v))
        return cls(tuple(coef))  # type: ignore[arg-type]

    def r2(self, samples: Sequence[tuple[StepFeatures, float]]) -> float:
        y = np.array([t for _, t in samples])
        p = np.array([self.predict(f) for f, _ in samples])
        ss = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float(((y - p) ** 2).sum()) / ss if ss > 0 else 0.0


@dataclass(frozen=True)
class SimRequest:
    rid: str
    tenant: str
    prompt_token_ids: tuple[int, ...]
    output_tokens: int  # true length (the request finishes after producing this many)
    max_tokens: int
    arrival: float
    predicted: float = 0.0
    predicted_std: float = 0.0
    priority: int = 0
    app: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class SimConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_blocks: int = 700
    block_size: int = 16
    enable_prefix_caching: bool = True
    step_time_ewma: float = 0.2  # how the EngineView's step time follows measured steps
    max_sim_s: float = 1e7  # safety: stop if virtual time runs away


@dataclass
class RequestRecord:
    rid: str
    tenant: str
    arrival: float
    prompt_tokens: int
    output_tokens: int = 0
    released: float = -1.0
    first_token: float = -1.0
    finished: float = -1.0

    @property
    def latency(self) -> float:
        return self.finished - self.arrival

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival


@dataclass
class SimResult:
    records: list[RequestRecord]
    steps: int
    preemptions: int
    duration: float


def simulate(requests: Sequence[SimRequest], policy: BatchPolicy, config: SimConfig,
             step_model: StepTimeModel) -> SimResult:
    """Run `requests` (arrival times in seconds from 0) to completion in virtual time."""
    bm = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
    sched = StepScheduler(config.scheduler, bm)
    pending = sorted(requests, key=lambda r: r.arrival)
    by_id = {r.rid: r for r in pending}
    if len(by_id) != len(pending):
        raise ValueError("request ids must be unique")
    records = {r.rid: RequestRecord(r.rid, r.tenant, r.arrival, len(r.prompt_token_ids)) for r in pending}
    jobs: dict[str, Job] = {}
    produced: dict[str, int] = {}
    wake: list[float] = []
    now, i, steps, preemptions, step_time = 0.0, 0, 0, 0, 0.0
    cost_fit = StepCostFit()  # what the runtime's stepper measures, over the simulated steps
    done = 0
    while done < len(pending):
        if now > config.max_sim_s:
            raise RuntimeError(f"simulation ran past {config.max_sim_s}s of virtual time")
        while i < len(pending) and pending[i].arrival <= now:
            r = pending[i]
            job = Job(r.rid, r.tenant, len(r.prompt_token_ids), r.max_tokens, r.arrival, r.predicted,
                      r.predicted_std, r.priority, r.app, r.user)
            jobs[r.rid] = job
            policy.on_arrival(job, now)
            i += 1
        view = EngineView(sched.num_running + sched.num_waiting, config.scheduler.max_num_seqs,
                          bm.num_free_blocks, bm.num_blocks, bm.block_size, step_time, cost_fit.token_cost_s,
                          cost_fit.overhead_s, sched.output_tokens)
        for job in policy.release(now, view):
            r = by_id[job.rid]
            sched.add(SchedRequest(r.rid, list(r.prompt_token_ids), r.max_tokens, priority=policy.engine_priority(job)))
            records[r.rid].released = now
            produced[r.rid] = 0
        plan = sched.schedule() if sched.has_unfinished else None
        if plan is None or plan.is_empty:
            nxt = [pending[i].arrival] if i < len(pending) else []
            w = policy.next_wakeup(now)
            if w is not None and w > now:
                heapq.heappush(wake, w)
            while wake and wake[0] <= now:
                heapq.heappop(wake)
            if wake:
                nxt.append(wake[0])
            if not nxt:
                if sched.has_unfinished or len(policy):
                    raise RuntimeError("simulation stalled: work left but no event to wait for")
                break
            now = max(now, min(nxt))
            continue
        dt = step_model.predict(StepFeatures.of(plan))
        cost_fit.observe(plan.num_tokens, dt)
        now += dt
        steps += 1
        preemptions += len(plan.preempted)
        step_time = dt if step_time == 0 else step_time + config.step_time_ewma * (dt - step_time)
        sampled = {s.request_id: 100 for s in plan.seqs if s.sample}
        sched.update(plan, sampled)
        for rid in sampled:
            rec = records[rid]
            produced[rid] += 1
            if rec.first_token < 0:
                rec.first_token = now
            target = min(by_id[rid].output_tokens, by_id[rid].max_tokens)
            if produced[rid] >= max(1, target):
                sched.finish(rid)
                rec.finished, rec.output_tokens = now, produced[rid]
                policy.on_finish(jobs[rid], now, produced[rid])
                done += 1
    return SimResult(list(records.values()), steps, preemptions, now)
