"""The batching-policy interface (pure logic: no trio, no engine, no clock of its own).

A policy owns the requests that have arrived but are not yet in the engine and
decides, each time it is asked, which of them to hand to the engine now::

    policy.on_arrival(job, now)                 # a request arrived (prediction attached)
    jobs = policy.release(now, view)            # who enters the engine now (maybe nobody)
    policy.on_finish(job, now, output_tokens)   # it left the engine (true length known)
    policy.remove(rid)                          # cancelled while waiting
    policy.next_wakeup(now)                     # when to ask again even if nothing happens

`view` (`EngineView`) is what a policy may know about the engine: how many
requests it holds, its running cap, free and total KV blocks, and the recent
step time. The caller (the queue actor, the benchmark's driver, the simulator)
calls `release` after every arrival, every engine step and every wakeup; a
policy never needs to be told that time passed.

KV reservations (`KvReservation`): a policy that admits by *predicted* length
reserves `prompt + predicted + margin·std` tokens per released request and
releases only while the sum of reservations of the requests in the engine fits
the cache. The engine itself still allocates on demand and preempts (recompute)
when a request outgrows its reservation, so a wrong prediction costs time,
never an OOM or a failed request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(eq=False)
class Job:
    """One waiting request as a policy sees it. `payload` is the caller's object."""

    rid: str
    tenant: str
    prompt_tokens: int
    max_tokens: int
    arrival: float
    predicted: float = 0.0  # expected output tokens
    predicted_std: float = 0.0
    priority: int = 0  # tier; LOWER runs first (the runtime maps a tenant's tier to this)
    app: str | None = None
    user: str | None = None
    payload: Any = None
    released_at: float = -1.0
    # sequences it runs at once, each with its own output (n samples, or best_of beams):
    # they share the prompt's KV blocks, not the outputs'
    sequences: int = 1


@dataclass(frozen=True)
class EngineView:
    """What a policy may know about the engine when it releases work."""

    running: int  # requests inside the engine (running + its own waiting)
    max_running: int  # the engine's running cap (max_num_seqs)
    free_blocks: int
    total_blocks: int
    block_size: int
    step_time_s: float = 0.0  # recent mean step time (0 = not measured yet)
    token_cost_s: float = 0.0  # marginal seconds per token fed to a step (`StepCostFit`; 0 = unknown)
    step_overhead_s: float = 0.0  # a step's fixed cost, from the same fit
    # output tokens generated so far by a released request the engine holds (None: it holds
    # no such request); what lets a KV reservation grow when a request outgrows it
    output_tokens: Callable[[str], int | None] | None = None

    @property
    def decode_step_s(self) -> float:
        """What a step of decodes only (one token per running request) costs, by the fit."""
        return self.step_overhead_s + self.token_cost_s * max(1, self.running)

    @property
    def room(self) -> int:
        return max(0, self.max_running - self.running)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 0.0


@dataclass
class DecayingLeastSquares:
    """Sums for a least-squares line y ≈ intercept + slope·x over (x, y) pairs whose
    weight decays by `forget` per new pair (1 = plain least squares), so a fit follows
    a machine whose speed drifts."""

    forget: float = 0.99
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        f = self.forget
        self.n = f * self.n + 1
        self.sx = f * self.sx + x
        self.sy = f * self.sy + y
        self.sxx = f * self.sxx + x * x
        self.sxy = f * self.sxy + x * y

    @property
    def spread(self) -> float:
        """n² × the weighted variance of x (0 when every x was the same)."""
        return self.n * self.sxx - self.sx ** 2

    def slope(self) -> float:
        """Only meaningful when `spread` > 0."""
        return (self.n * self.sxy - self.sx * self.sy) / self.spread

    def intercept(self, slope: float) -> float:
        return (self.sy - slope * self.sx) / self.n


@dataclass
class StepCostFit:
    """Step time ≈ overhead + token_cost · tokens, fitted online (least squares with
    exponential forgetting) on (tokens fed, seconds) of every engine step.

    Why a second fit beside Magnus's `ServingTimeEstimator` (step time by *running
    requests*): under saturation the running count sits at the cap and that slope is
    not identifiable, while the tokens per step still vary (prefill chunks of up to
    `max_num_batched_tokens` against one token per decode), so this slope — what one
    more token of prefill, e.g. a preempted request's recompute, costs — stays
    measurable. `token_cost_s` is 0 until the fit has seen a spread of token counts.
    """

    forget: float = 0.99
    min_steps: int = 8
    _fit: DecayingLeastSquares = field(init=False)
    _steps: int = 0

    def __post_init__(self) -> None:
        self._fit = DecayingLeastSquares(self.forget)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        self._fit.add(tokens, seconds)
        self._steps += 1

    @property
    def steps(self) -> int:
        """Steps observed (empty ones are not)."""
        return self._steps

    @property
    def identified(self) -> bool:
        """Enough steps, and token counts that spread (std ≥ 1 token and ≥ 5% of the mean)."""
        f = self._fit
        return self._steps >= self.min_steps and f.spread > f.n ** 2 * max(1.0, (0.05 * f.sx / f.n) ** 2)

    @property
    def token_cost_s(self) -> float:
        return max(0.0, self._fit.slope()) if self.identified else 0.0

    @property
    def overhead_s(self) -> float:
        return max(0.0, self._fit.intercept(self.token_cost_s)) if self.identified else 0.0


class BatchPolicy(Protocol):
    name: str

    def on_arrival(self, job: Job, now: float) -> None: ...
    def release(self, now: float, view: EngineView) -> list[Job]: ...
    def on_finish(self, job: Job, now: float, output_tokens: int) -> None: ...
    def remove(self, rid: str) -> Job | None: ...
    def next_wakeup(self, now: float) -> float | None: ...
    def engine_priority(self, job: Job) -> int: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Job]: ...


@dataclass
class KvReservation:
    """Blocks reserved by released requests, by predicted length (or max_tokens).

    mode "predicted": prompt + predicted + margin_std·std (at least
    `min_margin` × predicted), capped at prompt + max_tokens;
    mode "max_tokens": prompt + max_tokens (the conservative static-serving rule);
    the output part counts once per sequence of the request (`Job.sequences`);
    mode "none": nothing reserved (vLLM-style optimistic admission).
    `fraction` of the cache may be reserved in total.

    `optimistic` (set by a policy between rounds, see `Magnus`) admits the next
    releases like mode "none" — no check, no reservation — while reservations
    already held stay held until their requests finish.

    `growth` (see `regrow`): a request whose output reaches what its reservation
    covers has it grown to `growth` × its output so far (capped at max_tokens), so
    the ledger stops admitting on the strength of a prediction that has been proven
    wrong; 0 leaves reservations as they were taken.
    """

    mode: str = "predicted"
    margin_std: float = 1.0
    min_margin: float = 0.2
    fraction: float = 1.0
    optimistic: bool = False
    growth: float = 2.0
    _held: dict[str, int] = field(default_factory=dict)
    grown: int = 0  # reservations grown so far (`regrow`)

    def __post_init__(self) -> None:
        if self.mode not in ("predicted", "max_tokens", "none"):
            raise ValueError(f"unknown KV reservation mode {self.mode!r}")
        if self.growth != 0 and self.growth <= 1:
            raise ValueError(f"growth must be 0 (off) or > 1, got {self.growth}")

    def tokens(self, job: Job) -> int:
        if self.mode == "max_tokens":
            return job.prompt_tokens + job.sequences * job.max_tokens
        margin = max(self.margin_std * job.predicted_std, self.min_margin * job.predicted)
        out = min(float(job.max_tokens), job.predicted + margin)
        return job.prompt_tokens + job.sequences * max(1, math.ceil(out))

    def blocks(self, job: Job, block_size: int) -> int:
        return -(-self.tokens(job) // block_size)

    @property
    def reserving(self) -> bool:
        """Do releases reserve blocks right now?"""
        return self.mode != "none" and not self.optimistic

    @property
    def held(self) -> int:
        return sum(self._held.values())

    def fits(self, job: Job, view: EngineView, extra: int = 0) -> bool:
        """Would releasing `job` (after `extra` blocks already chosen this round) fit?"""
        if not self.reserving:
            return True
        budget = int(view.total_blocks * self.fraction)
        need = self.blocks(job, view.block_size)
        # an empty engine always takes one request: the head of the line progresses
        return self.held + extra + need <= budget or (not self._held and extra == 0)

    def take(self, job: Job, view: EngineView) -> int:
        n = self.blocks(job, view.block_size) if self.reserving else 0
        self._held[job.rid] = n
        return n

    def give_back(self, rid: str) -> None:
        self._held.pop(rid, None)

    def regrow(self, inflight: Mapping[str, Job], view: EngineView) -> int:
        """Grow the reservations that released requests have outgrown; returns how many grew.

        A reservation is a bet on a prediction. Once a request's output reaches the
        tokens its blocks cover, the bet is lost, and keeping the ledger at the old size
        lets the policy admit more work against blocks this request is about to take:
        the engine then preempts (recompute) instead. Growing the reservation to
        `growth` × the output so far (doubling by default: a request that outgrows its
        prediction repeatedly is re-reserved O(log) times, never per token) keeps
        admission honest. Only reservations actually held grow (an optimistic release
        held none), and only while the engine reports progress (`view.output_tokens`).
        """
        if not self.growth or view.output_tokens is None or not self._held:
            return 0
        grew = 0
        for rid, held in self._held.items():
            job = inflight.get(rid)
            if held <= 0 or job is None:
                continue
            # output tokens the blocks hold for each of its sequences
            covered = (held * view.block_size - job.prompt_tokens) // job.sequences
            out = view.output_tokens(rid)
            if out is None or out < covered or covered >= job.max_tokens:
                continue
            want = min(job.max_tokens, math.ceil(self.growth * max(1, out)))
            self._held[rid] = -(-(job.prompt_tokens + job.sequences * want) // view.block_size)
            grew += 1
        self.grown += grew
        return grew


class WaitingSet:
    """Insertion-ordered waiting jobs with O(1) removal by id."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def __contains__(self, rid: str) -> bool:
        return rid in self._jobs

    def add(self, job: Job) -> None:
        if job.rid in self._jobs:
            raise ValueError(f"job {job.rid!r} is already waiting")
        self._jobs[job.rid] = job

    def pop(self, rid: str) -> Job | None:
        return self._jobs.pop(rid, None)

    def oldest(self) -> Job | None:
        return next(iter(self._jobs.values()), None)


class PolicyBase:
    """Shared bookkeeping: the waiting set, released-but-unfinished jobs, KV reservations.

    Subclasses implement `_choose(now, view) -> Iterable[Job]`: candidates in the
    order they should run; the base releases them while the engine has room and
    the reservation fits, stopping at the first that does not fit (head-of-line
    order is the policy's decision, so it is not skipped silently).
    """

    name = "base"
    releases_at_once = False  # it releases what waits whenever the engine has room (no batch, window or threshold)

    def __init__(self, kv: KvReservation | None = None) -> None:
        self.waiting = WaitingSet()
        self.inflight: dict[str, Job] = {}
        self.kv = kv or KvReservation(mode="none")

    @property
    def work_conserving(self) -> bool:
        """Whether nothing waits here while the engine has room: it releases at once and
        reserves no KV blocks. The overload estimate counts the engine's free seats as
        taken by what waits only then (a policy that holds requests back while seats are
        free had every estimate at 0)."""
        return self.releases_at_once and not self.kv.reserving

    def __len__(self) -> int:
        return len(self.waiting)

    def __iter__(self) -> Iterator[Job]:
        return iter(self.waiting)

    def on_arrival(self, job: Job, now: float) -> None:
        self.waiting.add(job)

    def remove(self, rid: str) -> Job | None:
        return self.waiting.pop(rid)

    def on_finish(self, job: Job, now: float, output_tokens: int) -> None:
        self.inflight.pop(job.rid, None)
        self.kv.give_back(job.rid)

    def next_wakeup(self, now: float) -> float | None:
        return None

    def engine_priority(self, job: Job) -> int:
        """The engine's priority of a job `release` just returned, read before the next
        `release` (lower runs first; the engine preempts a running request of a higher value
        for a waiting one of a lower under KV pressure): one for all here, so that the engine
        keeps the order it was handed the requests in.
        A policy that orders by tier across tenants says so; the others' order is the
        queue's (handed the tenant's tier, the engine evicted a tier-0 request for every
        higher-tier one however the queue had aged or fairly ordered it: a single request
        under `hybrid` took 66 s beside a tier-9 tenant's load, 6 s beside a tier-0's)."""
        return 0

    def _limit(self, now: float, view: EngineView) -> int:
        """How many requests may be released now (before KV checks)."""
        return view.room

    def _choose(self, now: float, view: EngineView) -> Iterable[Job]:
        raise NotImplementedError

    def _released(self, job: Job, now: float) -> None:
        """Hook: a job was just released (fairness counters, etc.)."""

    def release(self, now: float, view: EngineView) -> list[Job]:
        limit = self._limit(now, view)
        if limit <= 0 or not len(self.waiting):
            return []
        self.kv.regrow(self.inflight, view)
        out: list[Job] = []
        extra = 0
        for job in self._choose(now, view):
            if len(out) >= limit:
                break
            if not self.kv.fits(job, view, extra):
                break
            extra += self.kv.blocks(job, view.block_size) if self.kv.reserving else 0
            out.append(job)
        for job in out:
            self.waiting.pop(job.rid)
            self.kv.take(job, view)
            job.released_at = now
            self.inflight[job.rid] = job
            self._released(job, now)
        return out
