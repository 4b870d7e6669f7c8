"""Scheduling benchmark: every batching policy on the multi-application workload.

    python -m ops.bench_sched [--quick] [--json PATH] [--plot PATH] [--policies a,b] [--rates r1,r2,r3]
                              [--driver loop|runtime] [--step-thread worker|loop] [--runtime-predictor trained|cold]

1. Predictor: the Magnus length predictor (`actors.predictor.LengthPredictor`, MiniLM
   instruction embeddings) is trained online on the first half of the fixture and
   evaluated on the held-out half: MAE and share within ±25%, against the
   per-application mean.
2. Calibration: a short continuous-batching warm-up through the real engine
   measures step times; `ops.sim.StepTimeModel` is fitted on them.
3. Rates: from the simulated capacities of `fcfs-static` and `fcfs-continuous`
   (their throughput under a flood) — the sweep is `static_capacity × (0.7, 1.5, 3)`
   with the highest raised to 2 × the continuous capacity, so the highest rate is
   beyond what every policy sustains (`sweep_rates`).
4. Real runs: the held-out requests under Poisson arrivals (real clock), each
   policy deciding releases into the real `Engine` — from a synchronous driver loop
   with the offline predictor's predictions (`--driver loop`, `run_real`), or through
   the server's own actors in-process, predicting online (`--driver runtime`,
   `run_runtime`: admission, predictor service, queue actor, stepper; no HTTP).
   Greedy decoding, EOS, `max_tokens` as in the fixture. The highest rate runs
   `--real-requests` (400 by default: the queue needs a few hundred requests to
   build up), a lower rate proportionally fewer, so every rate's arrivals span
   the same window (`requests_per_rate`). With a time budget (`--time-budget`,
   and `--quick`: 14 min) the number of requests is sized from the runs'
   simulated duration, so a slow CPU runs fewer of them — and where every rate
   would leave the highest fewer than 2x the engine's sequences (no queue builds),
   only the highest rate runs for real, with as many as fit
   (`real_runs_within_budget`); the simulated sweep keeps every rate.
5. Simulation: the same request sets and arrivals in `ops.sim.simulate`
   (real step scheduler + calibrated step times): agreement with the real runs
   on mean response time — with the warm-up's step model, with a model fitted
   on the warm-up and every *other* run (leave-one-run-out: the out-of-sample
   check), and with all measured steps — then a larger sweep (more requests,
   more rates) with the model fitted on every measured step.

The machine is shared: the load average is recorded at start and end.
"""

from __future__ import annotations

import os

# One BLAS thread: the predictor's small solves are slower, not faster, when
# OpenBLAS threads fight the engine (and other users) for 2 cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import copy
import functools
import json
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from actors.policies import (
    KV_RESERVATIONS,
    LENGTH_AWARE_POLICIES,
    POLICY_NAMES,
    BatchPolicy,
    EngineView,
    Job,
    PolicyConfig,
    StepCostFit,
    make_policy,
)
from actors.predictor import LengthModelConfig, LengthPredictor, RequestFeatures
from gpu.config import CacheConfig, SchedulerConfig
from ops.cli import bench_prog, float_list, output_file, positive_int
from ops.sim.simulator import (
    RequestRecord,
    SimConfig,
    SimRequest,
    StepFeatures,
    StepTimeModel,
    simulate,
)
from ops.workload.fixture import FixtureRequest, load_fixture, split_fixture

BASELINES = ("fcfs-static", "fcfs-continuous", "magnus")
QUICK_BUDGET_S = 14 * 60.0  # --quick's whole run; the issue asks for under 15 minutes
# a real run took 0.8-1.4x its simulation with the warm-up's step model (docs/scheduling.md):
# size for the slow end
SIM_TO_WALL = 1.3
# with a time budget, the fewest requests a real run shrinks to (at the highest rate alone)
SMOKE_FLOOR_REQUESTS = 8
AFTER_REAL_RUNS_S = 60.0  # re-simulating every real run twice, the simulated sweep and the plot
# a real run that takes this many times its simulation (or 15 minutes, whichever is longer)
# is stuck: abort it (see run_timeout_s)
STUCK_RUN_FACTOR = 4.0


# ------------------------------------------------------------------ predictor
@dataclass
class PredictorEval:
    mae: float
    within_25pct: float
    baseline_mae: float
    baseline_within_25pct: float
    n_train: int
    n_test: int
    per_app: dict = field(default_factory=dict)


def _within(pred: np.ndarray, true: np.ndarray, tol: float = 0.25) -> float:
    return float(np.mean(np.abs(pred - true) <= tol * np.maximum(true, 1)))


def fixture_max_tokens(fixture: Sequence[FixtureRequest]) -> int:
    """The cap the fixture was generated with: the lengths the predictor learns are cut there."""
    caps = {r.max_tokens for r in fixture}
    if len(caps) != 1:
        raise ValueError(f"the fixture mixes max_tokens {sorted(caps)}: regenerate it with one cap")
    return caps.pop()


def features_of(r: FixtureRequest, max_tokens: int, emb: np.ndarray | None) -> RequestFeatures:
    return RequestFeatures(r.tenant, r.app, r.user, r.prompt_tokens, max_tokens, emb)


def train_and_evaluate(train: Sequence[FixtureRequest], test: Sequence[FixtureRequest],
                       embeddings: dict[str, np.ndarray], max_tokens: int,
                       config: LengthModelConfig | None = None) -> tuple[LengthPredictor, PredictorEval]:
    """Online training on `train` (refits as it goes), then predictions for `test`.

    Test requests are predicted in arrival order and observed after, as in
    serving (user histories keep growing); the regressor itself is not refit
    on test requests, so every test prediction is out-of-sample.

    Returns the predictor as training left it: the runs predict with it, so no
    held-out request's true length is in a user history its prediction reads (the
    predictor after the evaluation has all of them; predicting with it scored
    MAE 88.2 / 54.4% within ±25% against 87.0 / 56.9% as trained — the histories
    were not why this loop beat the server, but they were a leak).
    """
    p = LengthPredictor(config)
    p.train_offline((features_of(r, max_tokens, embeddings[r.id]), r.output_tokens, r.finish_reason) for r in train)
    trained = copy.deepcopy(p)
    app_mean = {}
    for r in train:
        app_mean.setdefault(r.app, []).append(r.output_tokens)
    app_mean = {a: float(np.mean(v)) for a, v in app_mean.items()}
    preds, base, true = [], [], []
    for r in test:
        f = features_of(r, max_tokens, embeddings[r.id])
        preds.append(p.predict(f).tokens)
        base.append(app_mean.get(r.app, float(np.mean(list(app_mean.values())))))
        true.append(r.output_tokens)
        model = p.model
        p.observe(f, r.output_tokens, r.finish_reason)  # history grows, weights do not
        p.model = model
    pr, ba, tr = np.array(preds), np.array(base), np.array(true, dtype=float)
    per_app = {}
    for app in sorted({r.app for r in test}):
        idx = np.array([r.app == app for r in test])
        per_app[app] = {"mae": float(np.mean(np.abs(pr[idx] - tr[idx]))),
                        "baseline_mae": float(np.mean(np.abs(ba[idx] - tr[idx]))),
                        "within_25pct": _within(pr[idx], tr[idx]),
                        "baseline_within_25pct": _within(ba[idx], tr[idx])}
    ev = PredictorEval(float(np.mean(np.abs(pr - tr))), _within(pr, tr), float(np.mean(np.abs(ba - tr))),
                       _within(ba, tr), len(train), len(test), per_app)
    return trained, ev


# ------------------------------------------------------------------ requests
@dataclass(frozen=True)
class BenchRequest:
    fx: FixtureRequest
    prompt_token_ids: tuple[int, ...]
    predicted: float
    predicted_std: float


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def sim_requests(reqs: Sequence[BenchRequest], arrivals: Sequence[float], max_tokens: int,
                 lengths: dict[str, int] | None = None) -> list[SimRequest]:
    out = []
    for i, (r, a) in enumerate(zip(reqs, arrivals, strict=True)):
        n = (lengths or {}).get(r.fx.id, r.fx.output_tokens)
        out.append(SimRequest(f"{r.fx.id}-{i}", r.fx.tenant, r.prompt_token_ids, n, max_tokens, a,
                              r.predicted, r.predicted_std, 0, r.fx.app, r.fx.user))
    return out


# ------------------------------------------------------------------ metrics
def step_profile(steps: Sequence[tuple[StepFeatures, float]]) -> dict:
    """How a real run used its steps: their count, the engine's busy seconds, and the mean
    sequences, tokens, prefill tokens and context tokens per step — what tells a policy that
    keeps fewer sequences per step (KV reservations) from one whose steps are slower, and
    what a policy's preemptions cost in recompute (prefill tokens beyond the prompts)
    (empty for no steps)."""
    if not steps:
        return {}
    n = len(steps)
    return {"steps": n, "busy_s": float(sum(t for _, t in steps)),
            "mean_step_seqs": sum(f.num_seqs for f, _ in steps) / n,
            "mean_step_tokens": sum(f.num_tokens for f, _ in steps) / n,
            "mean_step_prefill_tokens": sum(f.prefill_tokens for f, _ in steps) / n,
            "mean_step_context_tokens": sum(f.context_tokens for f, _ in steps) / n}


def summarize(records: Sequence[RequestRecord], ttft_slo: float, tpot_slo: float) -> dict:
    lat = np.array([r.latency for r in records])
    ttft = np.array([r.ttft for r in records])
    out_tok = np.array([r.output_tokens for r in records])
    start = min(r.arrival for r in records)
    end = max(r.finished for r in records)
    span = max(1e-9, end - start)
    tpot = np.where(out_tok > 1, (lat - ttft) / np.maximum(out_tok - 1, 1), 0.0)
    good = (ttft <= ttft_slo) & (tpot <= tpot_slo)
    tenants: dict[str, list[float]] = {}
    for r in records:
        tenants.setdefault(r.tenant, []).append(r.latency)
    tmean = {t: float(np.mean(v)) for t, v in sorted(tenants.items())}
    x = np.array(list(tmean.values()))
    jain = float(x.sum() ** 2 / (len(x) * (x ** 2).sum())) if len(x) and (x ** 2).sum() > 0 else 1.0
    return {
        "completed": len(records),
        "duration_s": span,
        "req_s": len(records) / span,
        "output_tok_s": float(out_tok.sum()) / span,
        "mean_latency_s": float(lat.mean()),
        "p50_latency_s": float(np.percentile(lat, 50)),
        "p99_latency_s": float(np.percentile(lat, 99)),
        "mean_ttft_s": float(ttft.mean()),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
        "goodput_req_s": float(good.sum()) / span,
        "tenant_mean_latency_s": tmean,
        "tenant_latency_jain": jain,
    }


# ------------------------------------------------------------------ real engine
class _PlanRecorder:
    """Wraps `engine.scheduler.schedule` to see each step's plan (for step-time calibration)."""

    def __init__(self, scheduler) -> None:
        self._inner = scheduler.schedule
        self.last = None
        scheduler.schedule = self

    def __call__(self):
        self.last = self._inner()
        return self.last


@dataclass
class RealRun:
    records: list[RequestRecord]
    steps: list[tuple[StepFeatures, float]]
    preemptions: int
    lengths: dict[str, int]


def run_real(engine, recorder: _PlanRecorder, reqs: Sequence[SimRequest], policy: BatchPolicy,
             max_tokens: int, *, timeout_s: float = 900.0) -> RealRun:
    """Drive the real engine: arrivals on the real clock, `policy` decides releases."""
    from gpu.sampling import SamplingParams

    if engine.has_unfinished():
        raise RuntimeError("engine must be idle before a run")
    # every run replays prompts an earlier run (or the warm-up) already computed: start
    # each from a cold prefix cache and a fresh pool's block order, as the simulator's
    # fresh BlockManager does (reused orders ran 8-13% slower on 1.5 GiB of 4 KiB pages)
    engine.block_manager.reset_block_order()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    pending = sorted(reqs, key=lambda r: r.arrival)
    by_id = {r.rid: r for r in pending}
    records = {r.rid: RequestRecord(r.rid, r.tenant, r.arrival, len(r.prompt_token_ids)) for r in pending}
    jobs: dict[str, Job] = {}
    steps: list[tuple[StepFeatures, float]] = []
    pre0 = engine.counters["preemptions"]
    sched, bm = engine.scheduler, engine.block_manager
    step_time, i, done = 0.0, 0, 0
    cost_fit = StepCostFit()  # as the runtime's stepper
    t0 = time.perf_counter()
    while done < len(pending):
        now = time.perf_counter() - t0
        if now > timeout_s:
            for rid in list(jobs):
                engine.abort(rid)
            raise RuntimeError(f"run exceeded {timeout_s}s")
        while i < len(pending) and pending[i].arrival <= now:
            r = pending[i]
            job = Job(r.rid, r.tenant, len(r.prompt_token_ids), max_tokens, r.arrival, r.predicted,
                      r.predicted_std, r.priority, r.app, r.user)
            jobs[r.rid] = job
            policy.on_arrival(job, now)
            i += 1
        view = EngineView(sched.num_running + sched.num_waiting, sched.config.max_num_seqs,
                          bm.num_free_blocks, bm.num_blocks, bm.block_size, step_time, cost_fit.token_cost_s,
                          cost_fit.overhead_s, sched.output_tokens)
        for job in policy.release(now, view):
            engine.add_request(job.rid, list(by_id[job.rid].prompt_token_ids), params,
                               priority=policy.engine_priority(job))
            records[job.rid].released = now
        if not engine.has_unfinished():
            nxt = [pending[i].arrival] if i < len(pending) else []
            w = policy.next_wakeup(now)
            if w is not None:
                nxt.append(w)
            if not nxt:
                raise RuntimeError("driver stalled: requests left but nothing to wait for")
            time.sleep(max(0.0, min(0.05, min(nxt) - now)))
            continue
        ts = time.perf_counter()
        deltas = engine.step()
        dt = time.perf_counter() - ts
        if recorder.last is not None and not recorder.last.is_empty:
            steps.append((StepFeatures.of(recorder.last), dt))
        step_time = dt if step_time == 0 else step_time + 0.2 * (dt - step_time)
        cost_fit.observe(engine.last_step_tokens, dt)
        now = time.perf_counter() - t0
        for d in deltas:
            rec = records[d.request_id]
            if rec.first_token < 0:
                rec.first_token = now
            if d.request_finished:
                rec.finished, rec.output_tokens = now, d.completion_tokens
                policy.on_finish(jobs[d.request_id], now, d.completion_tokens)
                done += 1
    lengths = {rid: rec.output_tokens for rid, rec in records.items()}
    return RealRun(list(records.values()), steps, engine.counters["preemptions"] - pre0, lengths)


def run_runtime(engine, recorder: _PlanRecorder, reqs: Sequence[SimRequest], policy: BatchPolicy,
                max_tokens: int, messages: dict[str, Sequence[dict]], predictor: LengthPredictor, *,
                embedder=None, step_in_thread: bool = True, timeout_s: float = 900.0) -> RealRun:
    """Drive the server's runtime in-process (`actors.runtime.Runtime`, no HTTP): each request
    is a chat `GenerateCall` submitted at its arrival (trio's clock) and streamed to its end,
    through admission, the Magnus predictor service, the queue actor running `policy`, and
    the stepper (`step_in_thread`: the server's `--step-thread`).

    The runtime predicts for itself, as the server does. A length-aware policy (magnus,
    hybrid) gets the Magnus predictor service: `predictor` (copied; trained offline, or a
    fresh `LengthPredictor()` for a cold start), embedding each instruction with `embedder`
    at admission and learning online as requests finish. Every other policy gets the running
    estimate, as `lmgate serve`'s `--length-predictor auto` gives it (no embeddings: they
    take engine time on a CPU). So the `predicted` fields of `reqs` are not used here (a
    simulation of the same run uses them). `messages` maps each rid to its chat messages."""
    import trio

    from actors.messages import (
        Accepted,
        ChatMessage,
        Failed,
        Finished,
        GenerateCall,
        TenantContext,
        TokenDelta,
    )
    from actors.predictor import PredictorService
    from actors.queue_policy import QueueConfig
    from actors.runtime import Runtime, RuntimeConfig
    from gpu.sampling import SamplingParams

    if engine.has_unfinished():
        raise RuntimeError("engine must be idle before a run")
    engine.block_manager.reset_block_order()  # as run_real
    records = {r.rid: RequestRecord(r.rid, r.tenant, r.arrival, len(r.prompt_token_ids)) for r in reqs}
    steps: list[tuple[StepFeatures, float]] = []
    pre0 = engine.counters["preemptions"]
    inner_step = engine.step

    def timed_step():
        ts = time.perf_counter()
        out = inner_step()
        dt = time.perf_counter() - ts
        if recorder.last is not None and not recorder.last.is_empty:
            steps.append((StepFeatures.of(recorder.last), dt))
        return out

    aware = policy.name in LENGTH_AWARE_POLICIES
    config = RuntimeConfig(engine=engine.config, queue=QueueConfig(max_waiting=max(1, 2 * len(reqs))),
                           length_predictor="magnus" if aware else "running", max_estimated_wait_s=float("inf"),
                           step_in_thread=step_in_thread)
    service = PredictorService(copy.deepcopy(predictor), embedder=embedder) if aware else None
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    async def one(rt: Runtime, r: SimRequest, t0: float) -> None:
        await trio.sleep_until(t0 + r.arrival)
        call = GenerateCall(r.rid, TenantContext(r.tenant), rt.model_name, params,
                            messages=[ChatMessage(m["role"], m["content"]) for m in messages[r.rid]],
                            stream=True, user=r.user, app=r.app)
        acc = await rt.submit(call)
        if not isinstance(acc, Accepted):
            raise RuntimeError(f"{r.rid} was not admitted: {acc}")
        rec = records[r.rid]
        async with acc.events:
            async for ev in acc.events:
                now = trio.current_time() - t0
                if isinstance(ev, TokenDelta) and rec.first_token < 0 and ev.token_ids:
                    rec.first_token = now
                elif isinstance(ev, Finished):
                    rec.finished, rec.output_tokens = now, ev.usage.completion_tokens
                    if rec.first_token < 0:
                        rec.first_token = now
                elif isinstance(ev, Failed):
                    raise RuntimeError(f"{r.rid} failed: {ev}")
        if rec.finished < 0:
            raise RuntimeError(f"{r.rid}: its stream ended without a Finished event")

    async def drive() -> None:
        rt = Runtime(config, engine, policy=policy, length_service=service)
        async with trio.open_nursery() as actors:
            await actors.start(rt.run)
            with trio.move_on_after(timeout_s) as scope:
                async with trio.open_nursery() as clients:
                    t0 = trio.current_time()
                    for r in sorted(reqs, key=lambda q: q.arrival):
                        clients.start_soon(one, rt, r, t0)
            actors.cancel_scope.cancel()
        if scope.cancelled_caught:
            for rid in list(rt.stepper.active):
                engine.abort(rid)
            raise RuntimeError(f"run exceeded {timeout_s}s")

    wrapped = "step" in vars(engine)  # someone's wrapper already (put it back after)
    engine.step = timed_step
    # this thread ran torch (calibration, run_real, the embedder): the runtime frees its
    # OpenMP pool when it starts, so its compute thread is the process's only one (actors.compute)
    try:
        trio.run(drive)
    finally:
        if wrapped:
            engine.step = inner_step
        else:
            del engine.step  # the class's method is back
    lengths = {rid: rec.output_tokens for rid, rec in records.items()}
    return RealRun(list(records.values()), steps, engine.counters["preemptions"] - pre0, lengths)


def length_agreement(lengths: Mapping[tuple[str, float, int], Mapping[str, int]]) -> dict[str, float]:
    """Per rate: the share of requests that got the same output length in every real run at
    that rate (every policy and repeat). 1.0 means the policies were compared on one
    workload: always in float32 here, in bf16 only with `--batch-invariant`."""
    by_rate: dict[float, list[Mapping[str, int]]] = {}
    for (_, rate, _), runs in lengths.items():
        by_rate.setdefault(rate, []).append(runs)
    out = {}
    for rate, runs in sorted(by_rate.items()):
        common = set.intersection(*(set(r) for r in runs))
        same = sum(len({r[rid] for r in runs}) == 1 for rid in common)
        out[f"{rate:g}"] = same / len(common) if common else float("nan")
    return out


# ------------------------------------------------------------------ orchestration
@dataclass(frozen=True)
class BenchConfig:
    quick: bool
    max_tokens: int | None = None  # every request's; None: the fixture's own cap (512 for the shipped one)
    # The KV-bound regime Magnus is about (its GPUs run out of KV before compute): 64
    # sequences on 728 blocks (512 MiB of float32 KV, 256 of bf16), where fcfs-continuous
    # preempts. The serving defaults (128 on 1.5 GiB) leave compute as the bound on these
    # CPUs: `--max-num-seqs 128 --cache-mb 1536` (docs/scheduling.md, "The serving defaults").
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    cache_mb: float = 512.0  # in float32; bf16 halves it (the same blocks, see bench_config)
    dtype: str = "float32"  # the engine's weights/KV dtype; float32 by default: the fixture's lengths are float32's
    # the engine's batch-invariant mode: in bf16 every policy's run then generates the same
    # lengths (the same workload), as float32 already does on these CPUs
    batch_invariant: bool = False
    static_batch: int = 8
    kv_optimistic_below_steps: float = PolicyConfig.kv_optimistic_below_steps  # magnus, hybrid
    kv_reservation: str = PolicyConfig.kv_reservation  # magnus, hybrid: auto | always | off
    kv_growth: float = PolicyConfig.kv_growth  # magnus, hybrid: outgrown reservations grow (0 = never)
    real_requests: int = 400  # at the highest rate; lower rates run fewer (see requests_per_rate)
    same_requests_every_rate: bool = False  # every rate runs real_requests (arrival windows differ)
    sim_requests: int = 400
    rate_factors: tuple[float, ...] = (0.7, 1.5, 3.0)  # × fcfs-static's capacity
    # the highest rate is also at least this × fcfs-continuous's capacity, so the
    # comparison against fcfs-continuous is made where it is saturated too
    continuous_overload: float = 2.0
    sim_rate_factors: tuple[float, ...] = (0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    real_policies: tuple[str, ...] = POLICY_NAMES
    repeats: int = 1  # real runs per policy and rate, in ABBA order (see run_order)
    time_budget_s: float | None = None  # whole benchmark; real_requests shrinks to fit (see requests_within_budget)
    min_real_requests: int = 24
    ttft_slo_s: float = 10.0
    tpot_slo_s: float = 0.5
    seed: int = 0
    # what drives the real runs: "loop" (run_real: the policy in a synchronous loop around
    # the engine, predictions fixed by the offline predictor) or "runtime" (run_runtime:
    # the server's actors in-process, predicting online as the server does)
    driver: str = "loop"
    step_thread: str = "worker"  # runtime driver: the server's --step-thread
    runtime_predictor: str = "trained"  # runtime driver: start from the offline predictor, or "cold"


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def calibration_arrivals(burst: int, staggered: int, gap_s: float = 0.5) -> list[float]:
    """The warm-up's arrival times: `burst` requests at once, then `staggered` ones `gap_s` apart."""
    if burst < 1 or staggered < 0 or gap_s <= 0:
        raise ValueError("need burst >= 1, staggered >= 0 and gap_s > 0")
    return [0.0] * burst + [gap_s * (k + 1) for k in range(staggered)]


def calibration_size(max_num_seqs: int, quick: bool) -> tuple[int, int]:
    """(burst, staggered) of the warm-up the step model is fitted on.

    The burst fills the engine's running cap, so the fit sees the batch sizes and
    contexts the saturated runs step at (up to `max_num_seqs` sequences and tens of
    thousands of context tokens), then every size on the way down as they finish; the
    staggered tail adds small batches with prefills in them. A warm-up of 16 at once
    (until 2026-12-01) fitted small batches well and extrapolated badly: its model
    was 19-21% short of the measured steps at 128 sequences on a Zen 4 (the context
    term, unseen at 16 sequences, came out at half its size) and 29-36% over at 32-128
    on an AMX Xeon, so the simulated continuous-batching runs, the rates and the time
    budget were off by as much. `--quick` keeps its 12 (its runs hold at most 48)."""
    if quick:
        return 6, 6
    return max(16, max_num_seqs), 16


def calibrate(engine, recorder: _PlanRecorder, reqs: Sequence[BenchRequest], max_tokens: int,
              burst: int) -> list:
    """A warm-up under continuous batching: `burst` requests at once, the rest staggered."""
    arr = calibration_arrivals(burst, len(reqs) - burst)
    run = run_real(engine, recorder, sim_requests(reqs, arr, max_tokens), make_policy(
        PolicyConfig(name="fcfs-continuous")), max_tokens)
    return run.steps


def static_capacity(reqs: Sequence[BenchRequest], cfg: BenchConfig, sim_cfg: SimConfig, model: StepTimeModel,
                    policy: str = "fcfs-static") -> float:
    """Requests/s a policy completes when everything arrives at once (simulated)."""
    flood = sim_requests(reqs, [0.0] * len(reqs), cfg.max_tokens)
    res = simulate(flood, make_policy(PolicyConfig(name=policy, static_batch_size=cfg.static_batch)), sim_cfg, model)
    return len(flood) / res.duration


def sweep_rates(cap_static: float, cap_cont: float, cfg: BenchConfig) -> list[float]:
    """`rate_factors` × fcfs-static's capacity, the highest raised to `continuous_overload` ×
    fcfs-continuous's capacity where that is higher.

    Throughput differences only show under saturation: a rate that only fcfs-static cannot
    sustain compares fcfs-continuous and magnus at a load both keep up with."""
    rates = [cap_static * f for f in cfg.rate_factors]
    rates[-1] = max(rates[-1], cap_cont * cfg.continuous_overload)
    return [round(r, 3) for r in rates]


def ratios(table: dict, rate: str) -> dict:
    """magnus ÷ each baseline that ran at `rate` (a run of magnus and fcfs-continuous
    alone reports the two ÷ fcfs-continuous ratios)."""
    m = table["magnus"][rate]
    out = {}
    if rate in table.get("fcfs-static", {}):
        s = table["fcfs-static"][rate]
        out["magnus_vs_fcfs_static_throughput"] = m["req_s"] / s["req_s"]
        out["magnus_vs_fcfs_static_latency"] = m["mean_latency_s"] / s["mean_latency_s"]
    if rate in table.get("fcfs-continuous", {}):
        c = table["fcfs-continuous"][rate]
        out["magnus_vs_fcfs_continuous_latency"] = m["mean_latency_s"] / c["mean_latency_s"]
        out["magnus_vs_fcfs_continuous_throughput"] = m["req_s"] / c["req_s"]
    return out


# The issue's targets (Magnus's own numbers) on the ratios above: (at least?, bound). "No
# loss of throughput" against fcfs-continuous allows 1%: where both keep up they complete the
# same requests and differ only in when the last one finishes.
TARGETS: dict[str, tuple[bool, float]] = {
    "magnus_vs_fcfs_static_throughput": (True, 3.34),
    "magnus_vs_fcfs_static_latency": (False, 0.103),
    "magnus_vs_fcfs_continuous_latency": (False, 0.70),
    "magnus_vs_fcfs_continuous_throughput": (True, 0.99),
}


def targets_met(r: dict) -> list[str]:
    """The ratios of `r` (as `ratios` returns them) that meet their target."""
    return [k for k, (at_least, bound) in TARGETS.items() if k in r and (r[k] >= bound if at_least else r[k] <= bound)]


def ratios_by_rate(table: dict) -> dict:
    """`ratios` at every rate all three policies ran, with the targets each meets.

    Why: one rate cannot show what the targets ask together. Against fcfs-static the
    latency ratio is smallest where magnus still keeps up and fcfs-static does not, while
    the throughput ratio needs both saturated, and the gain over fcfs-continuous only
    appears once the continuous batch is saturated too (docs/scheduling.md)."""
    common = set.intersection(*(set(table.get(p, {})) for p in ("magnus", "fcfs-static", "fcfs-continuous")))
    out = {}
    for rate in sorted(common, key=float):
        r = ratios(table, rate)
        out[rate] = {**r, "targets_met": targets_met(r)}
    return out


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """The run's configuration from parsed arguments; ValueError names a bad one."""
    cfg = BenchConfig(quick=args.quick)
    if args.quick:
        # 48 requests at the highest rate (lower rates: the same arrival window, >= 24): a smoke
        # run of the comparison — 48 requests fit in 64 sequences at once, so little queues;
        # on a slow machine the 48 shrink (to >= 24, then the highest rate alone) so the whole run
        # stays under 15 minutes
        cfg = replace(cfg, real_requests=48, sim_requests=240, real_policies=BASELINES, time_budget_s=QUICK_BUDGET_S)
    if args.policies:
        cfg = replace(cfg, real_policies=tuple(args.policies.split(",")))
    for p in cfg.real_policies:
        if p not in POLICY_NAMES:
            raise ValueError(f"unknown policy {p!r}")
    if args.real_requests is not None:
        if args.real_requests < 1:
            raise ValueError("--real-requests must be >= 1")
        cfg = replace(cfg, real_requests=args.real_requests,
                      min_real_requests=min(cfg.min_real_requests, args.real_requests))
    if args.same_requests_every_rate:
        cfg = replace(cfg, same_requests_every_rate=True)
    if args.max_tokens:
        cfg = replace(cfg, max_tokens=args.max_tokens)
    if args.sim_requests:
        cfg = replace(cfg, sim_requests=args.sim_requests)
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        cfg = replace(cfg, repeats=args.repeats)
    if args.time_budget is not None:
        if args.time_budget <= 0:
            raise ValueError("--time-budget must be positive")
        cfg = replace(cfg, time_budget_s=args.time_budget * 60)
    if args.optimistic_below_steps is not None:
        if args.optimistic_below_steps < 0:
            raise ValueError("--optimistic-below-steps must be >= 0")
        cfg = replace(cfg, kv_optimistic_below_steps=args.optimistic_below_steps)
    if args.kv_reservation is not None:
        if args.kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"--kv-reservation must be one of {', '.join(KV_RESERVATIONS)}")
        cfg = replace(cfg, kv_reservation=args.kv_reservation)
    if args.kv_growth is not None:
        if args.kv_growth != 0 and args.kv_growth <= 1:
            raise ValueError("--kv-growth must be 0 (never grow) or > 1")
        cfg = replace(cfg, kv_growth=args.kv_growth)
    if args.max_num_seqs is not None:
        if args.max_num_seqs < 1:
            raise ValueError("--max-num-seqs must be >= 1")
        cfg = replace(cfg, max_num_seqs=args.max_num_seqs)
    # the default cache is 728 blocks in any dtype (512 MiB of float32 KV, 256 of bfloat16),
    # so the KV cache binds at the same load and runs in either dtype compare
    cache_mb = args.cache_mb if args.cache_mb is not None else cfg.cache_mb / (2 if args.dtype == "bfloat16" else 1)
    if cache_mb <= 0:
        raise ValueError("--cache-mb must be positive")
    if args.driver != "runtime" and (args.step_thread or args.runtime_predictor):
        raise ValueError("--step-thread and --runtime-predictor apply to --driver runtime")
    return replace(cfg, dtype=args.dtype, cache_mb=cache_mb, driver=args.driver, batch_invariant=args.batch_invariant,
                   step_thread=args.step_thread or "worker", runtime_predictor=args.runtime_predictor or "trained")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_sched"), description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="scaled-down sweep (< 15 min)")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the report as JSON")
    ap.add_argument("--plot", type=output_file, help="PNG (default: next to --json, or bench_sched.png)")
    ap.add_argument("--policies", help="comma-separated policies for the real runs (default: all; quick: "
                                       + ",".join(BASELINES) + ")")
    ap.add_argument("--rates", type=float_list,
                    help="comma-separated arrival rates (req/s) instead of the automatic ones")
    ap.add_argument("--real-requests", type=positive_int,
                    help="requests per real run at the highest rate (default 400, --quick 48; at most the held-out "
                         "half of the fixture); a lower rate runs proportionally fewer, never below 24")
    ap.add_argument("--same-requests-every-rate", action="store_true",
                    help="run --real-requests at every rate instead (the arrival window shrinks as the rate grows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--optimistic-below-steps", type=float, metavar="STEPS",
                    help="magnus/hybrid admit without KV reservations while a preemption's recompute costs fewer "
                         f"decode steps than this (default {PolicyConfig.kv_optimistic_below_steps:g}; 0: always reserve)")
    ap.add_argument("--kv-reservation", metavar="|".join(KV_RESERVATIONS),
                    help="magnus/hybrid: auto (reserve KV by predicted length unless --optimistic-below-steps "
                         "says a recompute is cheap), always, or off (admit like vLLM), as `lmgate serve "
                         f"--kv-reservation` (default {PolicyConfig.kv_reservation})")
    ap.add_argument("--kv-growth", type=float, metavar="FACTOR",
                    help="magnus/hybrid: a KV reservation its request outgrows grows to FACTOR x the output so far, "
                         f"capped at max_tokens (default {PolicyConfig.kv_growth:g}; 0: reservations never grow)")
    ap.add_argument("--max-num-seqs", type=positive_int,
                    help="the engine's running-requests cap (default 64: the KV-bound regime; the server's default "
                         "is 128)")
    ap.add_argument("--cache-mb", type=float,
                    help="KV cache MiB (default 512 in float32, 256 in bfloat16: 728 blocks either way, so the "
                         "cache binds at the same load; the server's default is 1536)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="engine weights/KV dtype (default float32 on every machine, not the engine's auto: the "
                         "fixture's lengths are float32's); in bfloat16 the real runs generate their own lengths "
                         "and the simulator replays those")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="run the engine batch-invariant (`lmgate serve --batch-invariant`): in bfloat16 every "
                         "policy's real run then generates the same lengths, so policies are compared on one "
                         "workload (costs 0.73-0.90x the tokens/s on an AMX Xeon)")
    ap.add_argument("--fixture", type=Path, help="workload JSONL (default: the shipped ops/workload/requests.jsonl)")
    ap.add_argument("--no-real", action="store_true", help="simulation only (needs a calibration run anyway)")
    ap.add_argument("--predictor-only", action="store_true", help="only train and evaluate the length predictor")
    ap.add_argument("--step-coef", type=float_list, help="simulation only, with this step-time model instead of a calibration "
                                        "run: c0,c_tok,c_seq,c_ctx (e.g. step_model.coef of an earlier --json)")
    ap.add_argument("--max-tokens", type=int, help="max_tokens of every request (default: the fixture's own, 512)")
    ap.add_argument("--sim-requests", type=positive_int)
    ap.add_argument("--time-budget", type=float, metavar="MIN",
                    help="minutes for the whole benchmark: after calibration the real runs are sized from "
                         "their simulated duration to fit (every rate while the highest gets at least 2x "
                         "--max-num-seqs requests, or all of --real-requests if fewer; else the highest rate "
                         "alone, down to 24 requests, then 8); "
                         f"default: none, --quick: {QUICK_BUDGET_S / 60:g}")
    ap.add_argument("--repeats", type=positive_int, help="real runs per policy and rate, alternating the order (ABBA); "
                                                "the report holds their mean (default 1)")
    ap.add_argument("--driver", choices=["loop", "runtime"], default="loop",
                    help="real runs: 'loop' drives the engine from a synchronous loop with the offline "
                         "predictor's predictions; 'runtime' runs the server's actors in-process (admission, "
                         "online predictor, queue actor, stepper; no HTTP) (default: loop)")
    ap.add_argument("--step-thread", choices=["worker", "loop"],
                    help="--driver runtime: where engine steps run, as `lmgate serve --step-thread` (default worker)")
    ap.add_argument("--runtime-predictor", choices=["trained", "cold"],
                    help="--driver runtime: the runtime's predictor starts as the offline-trained one, or cold "
                         "(as a server with a fresh Redis); it learns online either way (default trained)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    try:
        cfg = bench_config(args)
    except ValueError as e:
        ap.error(str(e))
    if args.step_coef is not None and len(args.step_coef) != 4:
        ap.error("--step-coef takes four numbers: c0,c_tok,c_seq,c_ctx")
    if args.rates is not None and (not args.rates or min(args.rates) <= 0):
        ap.error("--rates must be positive arrival rates (req/s)")
    if args.fixture is not None and not args.fixture.is_file():
        ap.error(f"--fixture {args.fixture}: no such file")
    if args.step_coef:
        args.no_real = True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict = {"config": {k: v for k, v in cfg.__dict__.items()}, "loadavg_start": _loadavg(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t_start = time.perf_counter()

    import torch

    from actors.embeddings import SentenceEmbedder
    from gpu.config import EngineConfig
    from gpu.engine import Engine

    torch.set_num_threads(args.threads)
    fixture = load_fixture(args.fixture) if args.fixture else load_fixture()
    fixture_cap = fixture_max_tokens(fixture)
    if cfg.max_tokens is None:
        cfg = replace(cfg, max_tokens=fixture_cap)
        report["config"]["max_tokens"] = fixture_cap
    train, test = split_fixture(fixture, cfg.seed)

    # 1. predictor
    _log(f"embedding {len(fixture)} instructions ...")
    embedder = SentenceEmbedder(threads=args.threads)
    vecs = embedder.embed([r.instruction for r in fixture])
    embeddings = {r.id: v for r, v in zip(fixture, vecs, strict=True)}
    predictor, ev = train_and_evaluate(train, test, embeddings, fixture_cap)
    report["predictor"] = ev.__dict__
    report["predictor_within_25pct"] = ev.within_25pct
    _log(f"predictor: MAE {ev.mae:.1f} (per-app mean {ev.baseline_mae:.1f}), within ±25% "
         f"{ev.within_25pct:.1%} (per-app mean {ev.baseline_within_25pct:.1%})")
    if args.predictor_only:
        print(json.dumps(report["predictor"], indent=2))
        return 0

    # 2. engine + calibration
    sched_cfg = SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens)
    engine = Engine(EngineConfig(num_threads=args.threads, scheduler=sched_cfg, dtype=cfg.dtype,
                                 batch_invariant=cfg.batch_invariant,
                                 cache=CacheConfig(cache_bytes=int(cfg.cache_mb * 1024**2))))
    recorder = _PlanRecorder(engine.scheduler)
    preds = {}
    for r in test:
        preds[r.id] = predictor.predict(features_of(r, min(cfg.max_tokens, fixture_cap), embeddings[r.id]))
    bench_reqs = [BenchRequest(r, tuple(engine.tokenizer.render_and_encode(list(r.messages))),
                               preds[r.id].tokens, preds[r.id].std) for r in test]
    sim_cfg = SimConfig(sched_cfg, engine.num_blocks, engine.config.cache.block_size)
    report["engine"] = {"num_blocks": engine.num_blocks, "block_size": engine.config.cache.block_size,
                        "max_num_seqs": cfg.max_num_seqs, "dtype": str(engine.dtype).removeprefix("torch.")}
    if args.step_coef:
        model = StepTimeModel(tuple(args.step_coef))  # type: ignore[arg-type]
        steps = []
        report["step_model"] = {"coef": list(model.coef), "given": True,
                                "terms": ["1", "tokens", "seqs", "context_tokens"]}
    else:
        _log(f"calibrating step times (KV blocks: {engine.num_blocks}) ...")
        burst, staggered = calibration_size(cfg.max_num_seqs, cfg.quick)
        calib_reqs = bench_reqs[: burst + staggered]
        steps = calibrate(engine, recorder, calib_reqs, cfg.max_tokens, min(burst, len(calib_reqs)))
        model = StepTimeModel.fit(steps)
        report["step_model"] = {"coef": list(model.coef), "r2": model.r2(steps), "samples": len(steps),
                                "warmup_burst": min(burst, len(calib_reqs)), "warmup_requests": len(calib_reqs),
                                "terms": ["1", "tokens", "seqs", "context_tokens"]}
    _log(f"step model {tuple(round(c, 6) for c in model.coef)}" + (
        f", r2 {model.r2(steps):.2f} on {len(steps)} steps" if steps else " (given)"))

    # 3. rates
    cap_static = static_capacity(bench_reqs, cfg, sim_cfg, model)
    cap_cont = static_capacity(bench_reqs, cfg, sim_cfg, model, "fcfs-continuous")
    report["capacity_req_s"] = {"fcfs-static": cap_static, "fcfs-continuous": cap_cont}
    rates = list(args.rates) if args.rates else sweep_rates(cap_static, cap_cont, cfg)
    _log(f"simulated capacity: fcfs-static {cap_static:.2f} req/s, fcfs-continuous {cap_cont:.2f} req/s; "
         f"rates {rates}")

    def policy_for(name: str) -> BatchPolicy:
        """A fresh policy object: every run, real or simulated, starts from an empty state."""
        return make_policy(PolicyConfig(name=name, static_batch_size=cfg.static_batch,
                                        kv_optimistic_below_steps=cfg.kv_optimistic_below_steps,
                                        kv_reservation=cfg.kv_reservation,
                                        kv_growth=cfg.kv_growth))

    if cfg.real_requests > len(bench_reqs):
        _log(f"--real-requests {cfg.real_requests}: the fixture holds {len(bench_reqs)} held-out requests; "
             f"running {len(bench_reqs)}")
        cfg = replace(cfg, real_requests=len(bench_reqs), min_real_requests=min(cfg.min_real_requests, len(bench_reqs)))

    real_rates = list(rates)  # the rates run on the real engine (the simulated sweep runs all of `rates`)

    def run_requests(rate: float, n_top: int, at: Sequence[float] | None = None) -> list[SimRequest]:
        """The requests of a real run at `rate` when the highest of the real rates (`at`, default
        `real_rates`) runs `n_top`: the held-out requests in fixture order, Poisson arrivals
        seeded by the rate."""
        n = requests_per_rate(at or real_rates, n_top, cfg.min_real_requests, cfg.same_requests_every_rate)[rate]
        return sim_requests(bench_reqs[:n], poisson_arrivals(n, rate, cfg.seed + int(rate * 1000)), cfg.max_tokens)

    if cfg.time_budget_s is not None and not args.no_real:
        @functools.cache  # each call simulates every planned real run
        def real_seconds(at: tuple[float, ...], n: int) -> float:
            return SIM_TO_WALL * sum(
                cfg.repeats * simulate(run_requests(rate, n, at), policy_for(name), sim_cfg, model).duration
                for rate in at for name in cfg.real_policies)

        t_search = time.perf_counter()
        left = cfg.time_budget_s - (t_search - t_start) - AFTER_REAL_RUNS_S
        # the lower rates run for real only while the highest gets 2x the engine's sequences
        # (a queue builds); otherwise it runs alone with as many requests as fit
        fit = functools.partial(real_runs_within_budget, rates, cfg.real_requests, cfg.min_real_requests,
                                real_seconds, n_all_rates=2 * cfg.max_num_seqs)
        fit_rates, n = fit(left)
        search_s = time.perf_counter() - t_search
        if real_seconds(tuple(fit_rates), n) > left - search_s:  # the search's own time counts too
            left -= search_s
            fit_rates, n = fit(left)
        search_s = time.perf_counter() - t_search
        _log(f"time budget: sized the real runs in {search_s:.0f}s")
        report["time_budget"] = {"budget_s": cfg.time_budget_s, "left_for_real_runs_s": left,
                                 "real_requests": n, "real_rates": fit_rates, "search_s": search_s,
                                 "predicted_real_runs_s": real_seconds(tuple(fit_rates), n)}
        if n < cfg.real_requests or len(fit_rates) < len(rates):
            _log(f"time budget: {cfg.real_requests} requests per run at {len(rates)} rates would take "
                 f"~{real_seconds(tuple(rates), cfg.real_requests):.0f}s of real runs, {left:.0f}s are left: "
                 f"{n} requests at {fit_rates} (~{real_seconds(tuple(fit_rates), n):.0f}s); "
                 "the simulated sweep keeps every rate")
            cfg = replace(cfg, real_requests=n, min_real_requests=min(cfg.min_real_requests, n))
            real_rates = list(fit_rates)
    report["config"]["real_requests"] = cfg.real_requests
    report["real_rates"] = real_rates
    report["real_requests_per_rate"] = {f"{r:g}": n for r, n in requests_per_rate(
        real_rates, cfg.real_requests, cfg.min_real_requests, cfg.same_requests_every_rate).items()}

    # 4. real runs (+ the same runs simulated, for agreement)
    real: dict = {}
    sim_same: dict = {}
    agreement = []
    all_steps = list(steps)
    real_lengths: dict[tuple[str, float, int], dict[str, int]] = {}
    run_steps: dict[tuple[str, float, int], list[tuple[StepFeatures, float]]] = {}
    if not args.no_real:
        for ri, rate in enumerate(real_rates):
            per_run: dict[str, list[dict]] = {}
            per_sim: dict[str, list[dict]] = {}
            for name, rep in run_order(cfg.real_policies, cfg.repeats, ri):
                pol = policy_for(name)
                reqs = run_requests(rate, cfg.real_requests)
                timeout = run_timeout_s(simulate(reqs, policy_for(name), sim_cfg, model).duration)
                t = time.perf_counter()
                if cfg.driver == "runtime":
                    msgs = {q.rid: bench_reqs[k].fx.messages for k, q in enumerate(reqs)}
                    start = predictor if cfg.runtime_predictor == "trained" else LengthPredictor()
                    run = run_runtime(engine, recorder, reqs, pol, cfg.max_tokens, msgs, start, embedder=embedder,
                                      step_in_thread=cfg.step_thread == "worker", timeout_s=timeout)
                else:
                    run = run_real(engine, recorder, reqs, pol, cfg.max_tokens, timeout_s=timeout)
                all_steps += run.steps
                run_steps[(name, rate, rep)] = run.steps
                real_lengths[(name, rate, rep)] = run.lengths
                summ = summarize(run.records, cfg.ttft_slo_s, cfg.tpot_slo_s)
                summ["preemptions"] = run.preemptions
                summ.update(step_profile(run.steps))
                per_run.setdefault(name, []).append(summ)
                # the same requests, same arrivals, the lengths the engine actually produced
                sres = simulate(reqs_with(reqs, run.lengths), policy_for(name), sim_cfg, model)
                ssum = summarize(sres.records, cfg.ttft_slo_s, cfg.tpot_slo_s)
                per_sim.setdefault(name, []).append(ssum)
                err = abs(ssum["mean_latency_s"] - summ["mean_latency_s"]) / summ["mean_latency_s"]
                agreement.append({"policy": name, "rate": rate, "repeat": rep,
                                  "real_mean_latency_s": summ["mean_latency_s"],
                                  "sim_mean_latency_s": ssum["mean_latency_s"], "rel_err": err})
                _log(f"real {name:16s} rate {rate:6.3f}: {summ['req_s']:.3f} req/s, mean {summ['mean_latency_s']:.2f}s "
                     f"p99 {summ['p99_latency_s']:.2f}s, preempt {run.preemptions}, "
                     f"{summ.get('mean_step_seqs', 0):.1f} seqs/step, "
                     f"{summ.get('mean_step_prefill_tokens', 0):.1f} prefill tok/step (sim mean "
                     f"{ssum['mean_latency_s']:.2f}s, err {err:.1%}) [{time.perf_counter() - t:.0f}s wall, "
                     f"load {_loadavg()[0]}]")
            for name, runs in per_run.items():
                real.setdefault(name, {})[f"{rate:g}"] = mean_summary(runs)
                sim_same.setdefault(name, {})[f"{rate:g}"] = mean_summary(per_sim[name])
    report["policies"] = real
    report["sim_same_runs"] = sim_same
    report["agreement"] = agreement
    if real_lengths:
        report["real_length_agreement"] = length_agreement(real_lengths)
        _log("requests with the same length in every real run, per rate: " + ", ".join(
            f"{rate} req/s {share:.1%}" for rate, share in report["real_length_agreement"].items()))
    if agreement:
        report["agreement_mean_rel_err"] = float(np.mean([a["rel_err"] for a in agreement]))
        report["agreement_max_rel_err"] = float(np.max([a["rel_err"] for a in agreement]))
        report["agreement_within_15pct"] = float(np.mean([a["rel_err"] <= 0.15 for a in agreement]))
        # the same check with step models fitted on measured steps: leave-one-run-out (the
        # warm-up + every OTHER run: an out-of-sample prediction of each run from the machine's
        # behaviour under comparable load) and all steps (in-sample; separates the scheduling
        # model's fidelity from drift of the machine's speed during the benchmark)
        model_all = StepTimeModel.fit(all_steps)
        report["step_model_all_runs"] = {"coef": list(model_all.coef), "r2": model_all.r2(all_steps),
                                         "samples": len(all_steps)}
        loro = leave_one_run_out_models(steps, run_steps)
        for a in agreement:
            key = (a["policy"], a["rate"], a["repeat"])
            name, rate = a["policy"], a["rate"]
            reqs = reqs_with(run_requests(rate, cfg.real_requests), real_lengths[key])
            for tag, m_ in (("all_steps", model_all), ("loro", loro[key])):
                sres = simulate(reqs, policy_for(name),
                                sim_cfg, m_)
                m = summarize(sres.records, cfg.ttft_slo_s, cfg.tpot_slo_s)["mean_latency_s"]
                a[f"sim_{tag}_mean_latency_s"] = m
                a[f"rel_err_{tag}"] = abs(m - a["real_mean_latency_s"]) / a["real_mean_latency_s"]
        for tag in ("all_steps", "loro"):
            errs = [a[f"rel_err_{tag}"] for a in agreement]
            report[f"agreement_{tag}_mean_rel_err"] = float(np.mean(errs))
            report[f"agreement_{tag}_max_rel_err"] = float(np.max(errs))
            report[f"agreement_{tag}_within_15pct"] = float(np.mean([e <= 0.15 for e in errs]))
        if cfg.repeats > 1:
            report["agreement_repeat_means"] = repeat_mean_agreement(agreement)
        # the sweep extends the real runs: simulate it with every step measured so far
        model = model_all
    report["sim_sweep_step_model"] = list(model.coef)

    # 5. simulated sweep: every policy, more requests, more rates
    big = [bench_reqs[k % len(bench_reqs)] for k in range(cfg.sim_requests)]
    sim_rates = sorted({*rates, *(round(cap_static * f, 3) for f in cfg.sim_rate_factors)})
    sim: dict = {}
    for rate in sim_rates:
        arrivals = poisson_arrivals(len(big), rate, cfg.seed + 7 + int(rate * 1000))
        reqs = sim_requests(big, arrivals, cfg.max_tokens)
        for name in POLICY_NAMES:
            res = simulate(reqs, policy_for(name),
                           sim_cfg, model)
            s = summarize(res.records, cfg.ttft_slo_s, cfg.tpot_slo_s)
            s["preemptions"] = res.preemptions
            sim.setdefault(name, {})[f"{rate:g}"] = s
    report["sim_policies"] = sim

    # 6. headline ratios at the highest real rate where magnus and a baseline ran (and of the sim sweep)
    common = [r for r in (f"{x:g}" for x in real_rates)
              if r in real.get("magnus", {}) and any(r in real.get(p, {}) for p in ("fcfs-static", "fcfs-continuous"))]
    if common:
        top = max(common, key=float)
        report["ratios_rate"] = float(top)
        report.update(ratios(real, top))
    sim_top = f"{max(sim_rates):g}"
    report["sim_ratios"] = {"rate": float(sim_top), **ratios(sim, sim_top)}
    report["sim_ratios_by_rate"] = ratios_by_rate(sim)
    report["loadavg_end"] = _loadavg()
    report["wall_s"] = time.perf_counter() - t_start

    print_table(report)
    plot_path = args.plot or (args.json.with_suffix(".png") if args.json else Path("bench_sched.png"))
    plot(report, plot_path)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))
        _log(f"wrote {args.json} and {plot_path}")
    return 0


def requests_within_budget(n_max: int, n_min: int, seconds_for: Callable[[int], float], budget_s: float,
                           step: int = 4) -> int:
    """The most requests per real run, among n_max, n_max - step, ... and n_min, whose
    predicted wall time `seconds_for(n)` fits `budget_s`; n_min when even that does not fit.

    Why: a run's wall time is ~ n / rate plus the backlog's drain, and the rates are set
    from the machine's own capacity, so the same n takes 2-3x longer on a slower CPU (a
    Zen 1 core here did ~35 GFLOP/s in fp32, the AVX-512 cores of earlier runs ~120). Sizing n from the
    simulated runs keeps `--quick` quick everywhere; n_min keeps the highest rate
    above the engine's batch, where the policies differ at all.

    A bisection (the predicted time grows with n): each `seconds_for` simulates every
    planned run, 24 simulations of up to 400 requests for the default 8 policies at 3
    rates. Stepping down from 400 one step at a time took longer than the budget it was
    sizing (a 75-minute default run was still searching 12 minutes after calibration).
    """
    if n_min > n_max:
        raise ValueError(f"n_min {n_min} > n_max {n_max}")
    grid = [*range(n_max, n_min, -step), n_min]  # descending
    if seconds_for(grid[0]) <= budget_s:
        return grid[0]
    lo, hi = 0, len(grid) - 1  # grid[lo] is over the budget; find the first index that fits
    if hi == lo or seconds_for(grid[hi]) > budget_s:
        return n_min
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if seconds_for(grid[mid]) <= budget_s:
            hi = mid
        else:
            lo = mid
    return grid[hi]


def real_runs_within_budget(rates: Sequence[float], n_max: int, n_min: int,
                            seconds_for: Callable[[Sequence[float], int], float], budget_s: float,
                            n_floor: int = SMOKE_FLOOR_REQUESTS,
                            n_all_rates: int | None = None) -> tuple[list[float], int]:
    """The real runs that fit `budget_s`: (the rates to run on the real engine, requests at the
    highest). In order, the first that fits: every rate with n_max down to `n_all_rates`
    (default n_min) requests at the highest (`requests_within_budget`); the highest rate alone
    with n_max down to n_min; the highest rate alone with fewer, down to n_floor (which it
    returns when nothing fits).

    Why: on a slow CPU (AVX2, 2 cores: ~2.3 ms per token) even the minimum of 24 requests at
    three rates was predicted at ~27 minutes of real runs, which would have taken `--quick` to
    ~32 minutes. The highest rate is where the comparison is made; the lower rates stay in the
    simulated sweep. `n_all_rates` above n_min keeps the lower rates only while the highest
    gets enough requests for a queue to build: a 60-minute budget for every policy had
    chosen 24 requests at each of three rates (24 fit in the engine's 64 sequences at once,
    so the policies barely differ) over ~60 at the highest alone. `seconds_for` is called
    with tuples (so a caller may cache it).
    """
    every = tuple(rates)
    n_every = min(n_max, max(n_min, n_all_rates or n_min))
    n = requests_within_budget(n_max, n_every, lambda k: seconds_for(every, k), budget_s)
    if seconds_for(every, n) <= budget_s:
        return list(every), n
    top = (max(every),)
    n = requests_within_budget(n_max, n_min, lambda k: seconds_for(top, k), budget_s)
    if seconds_for(top, n) > budget_s and n_min > n_floor:
        n = requests_within_budget(n_min, n_floor, lambda k: seconds_for(top, k), budget_s)
    return list(top), n


def requests_per_rate(rates: Sequence[float], n_top: int, n_min: int, same: bool = False) -> dict[float, int]:
    """Requests per real run at each rate: `n_top` at the highest, `n_top × rate / highest`
    (rounded, never below `n_min`, never above `n_top`) at the others; `same`: `n_top` everywhere.

    Why: the comparison that matters is at the highest rate, where a queue builds for as long
    as requests keep arriving, so that run needs hundreds of requests; the same count at a
    rate 8x lower takes 8x longer to arrive and shows little (nothing queues there). Equal
    arrival windows keep every run about as long as the highest rate's.
    """
    top = max(rates)
    if same:
        return {r: n_top for r in rates}
    return {r: min(n_top, max(n_min, round(n_top * r / top))) for r in rates}


def run_timeout_s(simulated_s: float) -> float:
    """How long a real run may take before it counts as stuck: STUCK_RUN_FACTOR x its
    simulated duration, at least 15 minutes.

    Why not a fixed limit: the rates and request counts follow the machine's capacity, so a
    400-request fcfs-static run at the highest rate takes ~17 minutes on a slow Xeon — a
    fixed 15-minute limit aborted a whole benchmark there. Real runs took 0.8-1.4x their
    simulation; 4x is a hang, not a slow machine.
    """
    return max(900.0, STUCK_RUN_FACTOR * simulated_s)


def run_order(policies: Sequence[str], repeats: int, rate_index: int) -> list[tuple[str, int]]:
    """(policy, repeat) in the order to run them at one rate: forward, then backward (ABBA).

    The machine's speed drifts within a process (a run late in the sequence was measured
    16% faster than the same run early), so a fixed order would favour whichever policy
    runs last; alternating the direction per repeat and per rate cancels a linear drift
    in the mean of the repeats.
    """
    out = []
    for rep in range(repeats):
        seq = list(policies) if (rate_index + rep) % 2 == 0 else list(reversed(policies))
        out += [(name, rep) for name in seq]
    return out


def mean_summary(runs: Sequence[dict]) -> dict:
    """The mean of `summarize` results of repeated runs (per key; nested dicts per key).

    One run is returned as it is; with several, the individual ones are kept under "runs".
    """
    if len(runs) == 1:
        return runs[0]
    out: dict = {}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = {kk: float(np.mean([r[k][kk] for r in runs])) for kk in v}
        else:
            out[k] = float(np.mean([r[k] for r in runs]))
    out["runs"] = list(runs)
    return out


def repeat_mean_agreement(agreement: Sequence[dict], tag: str = "loro") -> dict:
    """Sim vs real on the mean of each (policy, rate)'s repeats — the numbers the tables report.

    With repeats, single runs of the same policy differ by more than 15% from each other
    when the machine's speed drifts; the mean over ABBA-ordered repeats is what the
    simulator (which has no drift) should match.
    """
    groups: dict[tuple[str, float], list[dict]] = {}
    for a in agreement:
        groups.setdefault((a["policy"], a["rate"]), []).append(a)
    rows = []
    for (name, rate), items in groups.items():
        real = float(np.mean([a["real_mean_latency_s"] for a in items]))
        sim = float(np.mean([a[f"sim_{tag}_mean_latency_s"] for a in items]))
        rows.append({"policy": name, "rate": rate, "real_mean_latency_s": real, "sim_mean_latency_s": sim,
                     "rel_err": abs(sim - real) / real})
    errs = [r["rel_err"] for r in rows]
    return {"model": tag, "rows": rows, "mean_rel_err": float(np.mean(errs)), "max_rel_err": float(np.max(errs)),
            "within_15pct": float(np.mean([e <= 0.15 for e in errs]))}


def leave_one_run_out_models(warmup: Sequence[tuple[StepFeatures, float]],
                             runs: dict[tuple, list[tuple[StepFeatures, float]]],
                             ) -> dict[tuple, StepTimeModel]:
    """For every run, a step-time model fitted on the warm-up and every *other* run's steps.

    Simulating a run with its own steps in the fit would be in-sample; with the warm-up
    alone, the model has not seen the load levels (contexts, batch sizes, the machine's
    sustained clock) the runs reach. Leaving the run out keeps the check a prediction.
    """
    out = {}
    for key in runs:
        samples = list(warmup) + [s for k, steps in runs.items() if k != key for s in steps]
        out[key] = StepTimeModel.fit(samples)
    return out


def reqs_with(reqs: Sequence[SimRequest], lengths: dict[str, int]) -> list[SimRequest]:
    from dataclasses import replace

    return [replace(r, output_tokens=lengths.get(r.rid, r.output_tokens)) for r in reqs]


def print_table(report: dict) -> None:
    ev = report["predictor"]
    print(f"\nload average: start {report['loadavg_start']}, end {report['loadavg_end']} (2 shared cores)")
    print(f"predictor (held-out {ev['n_test']}): MAE {ev['mae']:.1f} tok, within ±25% {ev['within_25pct']:.1%}; "
          f"per-app mean baseline: MAE {ev['baseline_mae']:.1f}, within ±25% {ev['baseline_within_25pct']:.1%}")
    for title, table in (("REAL ENGINE", report["policies"]), ("SIMULATED (calibrated)", report["sim_policies"])):
        if not table:
            continue
        print(f"\n{title}")
        print(f"{'policy':16s} {'rate':>6s} {'req/s':>7s} {'tok/s':>7s} {'mean':>7s} {'p50':>7s} {'p99':>7s} "
              f"{'ttft':>6s} {'good/s':>7s} {'jain':>5s} {'pre':>4s}")
        for name, by_rate in table.items():
            for rate, s in sorted(by_rate.items(), key=lambda kv: float(kv[0])):
                print(f"{name:16s} {float(rate):6.3f} {s['req_s']:7.3f} {s['output_tok_s']:7.1f} "
                      f"{s['mean_latency_s']:7.2f} {s['p50_latency_s']:7.2f} {s['p99_latency_s']:7.2f} "
                      f"{s['mean_ttft_s']:6.2f} {s['goodput_req_s']:7.3f} {s['tenant_latency_jain']:5.2f} "
                      f"{round(s.get('preemptions', 0)):4d}")
    if report.get("agreement"):
        print(f"\nsim vs real mean response time (step model from the warm-up): mean rel. error "
              f"{report['agreement_mean_rel_err']:.1%}, max {report['agreement_max_rel_err']:.1%}, "
              f"within 15%: {report['agreement_within_15pct']:.0%}")
        print(f"sim vs real (step model from the warm-up + the other runs): mean rel. error "
              f"{report['agreement_loro_mean_rel_err']:.1%}, max {report['agreement_loro_max_rel_err']:.1%}, "
              f"within 15%: {report['agreement_loro_within_15pct']:.0%}")
        print(f"sim vs real (step model from all measured steps): mean rel. error "
              f"{report['agreement_all_steps_mean_rel_err']:.1%}, max {report['agreement_all_steps_max_rel_err']:.1%}, "
              f"within 15%: {report['agreement_all_steps_within_15pct']:.0%}")
        for a in report["agreement"]:
            rep = f" #{a['repeat'] + 1}" if report["config"].get("repeats", 1) > 1 else ""
            print(f"  {a['policy']:16s} rate {a['rate']:g}{rep}: real {a['real_mean_latency_s']:.2f}s, sim "
                  f"{a['sim_mean_latency_s']:.2f}s ({a['rel_err']:.0%}), sim/other-runs "
                  f"{a['sim_loro_mean_latency_s']:.2f}s ({a['rel_err_loro']:.0%}), sim/all-steps "
                  f"{a['sim_all_steps_mean_latency_s']:.2f}s ({a['rel_err_all_steps']:.0%})")
    if report.get("agreement_repeat_means"):
        rm = report["agreement_repeat_means"]
        print(f"sim vs real on the means of the repeats (warm-up + other runs' steps): mean rel. error "
              f"{rm['mean_rel_err']:.1%}, max {rm['max_rel_err']:.1%}, within 15%: {rm['within_15pct']:.0%}")
    for k in ("magnus_vs_fcfs_static_throughput", "magnus_vs_fcfs_static_latency",
              "magnus_vs_fcfs_continuous_latency", "magnus_vs_fcfs_continuous_throughput"):
        if k in report:
            print(f"{k} (real, rate {report['ratios_rate']:g}): {report[k]:.3f}")
    print(f"sim ratios at rate {report['sim_ratios']['rate']:g}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in report["sim_ratios"].items() if k != "rate"))
    by_rate = report.get("sim_ratios_by_rate")
    if by_rate:
        short = {"magnus_vs_fcfs_static_throughput": "/st thr", "magnus_vs_fcfs_static_latency": "/st lat",
                 "magnus_vs_fcfs_continuous_latency": "/co lat", "magnus_vs_fcfs_continuous_throughput": "/co thr"}
        print("\nmagnus across the simulated sweep (targets: " + ", ".join(
            f"{short[k]} {'>=' if at_least else '<='} {bound:g}" for k, (at_least, bound) in TARGETS.items()) + ")")
        print(f"{'rate':>7s} " + " ".join(f"{v:>7s}" for v in short.values()) + "  met")
        for rate, r in by_rate.items():
            print(f"{float(rate):7.3f} " + " ".join(f"{r[k]:7.3f}" for k in short)
                  + "  " + (" ".join(short[k].strip() for k in r["targets_met"]) or "-"))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors: dict[str, str] = {}
    for name, by_rate in report["sim_policies"].items():
        rs = sorted(by_rate, key=float)
        x = [float(r) for r in rs]
        (line,) = axes[0].plot(x, [by_rate[r]["req_s"] for r in rs], marker=".", label=name)
        colors[name] = line.get_color()
        axes[1].plot(x, [by_rate[r]["mean_latency_s"] for r in rs], marker=".", label=name, color=colors[name])
    for name, by_rate in report["policies"].items():
        rs = sorted(by_rate, key=float)
        x = [float(r) for r in rs]
        axes[0].scatter(x, [by_rate[r]["req_s"] for r in rs], marker="x", s=50, color=colors.get(name))
        axes[1].scatter(x, [by_rate[r]["mean_latency_s"] for r in rs], marker="x", s=50, color=colors.get(name))
    axes[0].set(xlabel="arrival rate (req/s)", ylabel="throughput (req/s)", title="throughput (lines: sim, x: real)")
    axes[1].set(xlabel="arrival rate (req/s)", ylabel="mean response time (s)", yscale="log",
                title="mean response time")
    axes[0].legend(fontsize=7)
    ag = report.get("agreement") or []
    if ag:
        axes[2].scatter([a["real_mean_latency_s"] for a in ag], [a["sim_mean_latency_s"] for a in ag],
                        s=14, color="0.6", label="warm-up steps")
        if "sim_loro_mean_latency_s" in ag[0]:
            axes[2].scatter([a["real_mean_latency_s"] for a in ag], [a["sim_loro_mean_latency_s"] for a in ag],
                            label="warm-up + other runs' steps")
        if report.get("agreement_repeat_means"):
            rows = report["agreement_repeat_means"]["rows"]
            axes[2].scatter([r["real_mean_latency_s"] for r in rows], [r["sim_mean_latency_s"] for r in rows],
                            marker="*", s=80, label="mean of repeats")
        axes[2].legend(fontsize=7)
        m = max(max(a["real_mean_latency_s"], a["sim_mean_latency_s"]) for a in ag)
        axes[2].plot([0, m], [0, m], "k--", lw=0.8)
        axes[2].plot([0, m], [0, 1.15 * m], "k:", lw=0.6)
        axes[2].plot([0, m], [0, 0.85 * m], "k:", lw=0.6)
    axes[2].set(xlabel="real mean response time (s)", ylabel="simulated (s)", title="simulator vs real (±15%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
