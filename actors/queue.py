"""The queue actor: waiting requests, released by the configured batching policy.

Two tasks share one policy object (`actors.policies`, chosen by
`QueueConfig.policy`; default "priority": tiers with aging)::

    arrivals ──▶ [ policy.on_arrival ] ──▶ dispatcher ── policy.release(now, view) ──▶ stepper intake
                                               ▲
                            stepper ── Demand(slots) ──┘

On each `Demand(slots)` the dispatcher asks the policy what to release, never
more than `slots`, so ordering decisions are made as late as possible: a
request that arrives while the engine is full can still overtake older ones.
When the policy holds back (a static batch still running, a time window not
yet full), the dispatcher waits for an arrival, the policy's own wakeup time,
or `poll_s`, and asks again with a fresh engine view.

`engine_view` (optional) tells the policy the engine's running count, free KV
blocks and step time; without it the view is synthesized from the demand (room
= slots, KV unconstrained). Released requests are reconciled when their
`RequestState.finished_at` is set (the stepper sets it on every outcome), so
policies learn true lengths and KV reservations are given back without a
separate completion channel: at the next release decision, or within
`reconcile_s` while nothing waits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import trio

from actors.metrics import Metrics
from actors.policies import BatchPolicy, EngineView, Job, StepCostFit, make_policy
from actors.queue_policy import QueueConfig
from actors.state import RequestState
from actors.stepper import Completed, Demand

_UNBOUNDED_BLOCKS = 1 << 30


def job_of(st: RequestState, now: float) -> Job:
    """A policy's view of a request. Tenant tiers run higher-first; policies run lower first."""
    pred = st.prediction
    return Job(
        rid=st.request_id, tenant=st.tenant_id, prompt_tokens=st.prompt_tokens,
        max_tokens=int(st.params.max_tokens or 1), arrival=now,
        predicted=float(pred.tokens) if pred is not None else float(st.params.max_tokens or 1),
        predicted_std=float(pred.std) if pred is not None else 0.0,
        priority=-st.priority, app=st.app, user=st.call.user, payload=st,
        sequences=max(st.params.n, st.params.beam_width),
    )


def engine_view(engine: Any, step_time_s: float = 0.0, cost: StepCostFit | None = None) -> EngineView:
    """The `EngineView` of a `gpu.engine.Engine` (reads counters only; safe between steps);
    `cost` is the stepper's fit of step time on tokens fed."""
    sched, bm = engine.scheduler, engine.block_manager
    return EngineView(sched.num_running + sched.num_waiting, sched.config.max_num_seqs,
                      bm.num_free_blocks, bm.num_blocks, bm.block_size, step_time_s,
                      cost.token_cost_s if cost else 0.0, cost.overhead_s if cost else 0.0, sched.output_tokens)


class QueueActor:
    def __init__(
        self,
        config: QueueConfig,
        arrivals: trio.MemoryReceiveChannel[RequestState],
        demand: trio.MemoryReceiveChannel[Demand],
        to_stepper: trio.MemorySendChannel[RequestState],
        completed: trio.MemorySendChannel[Completed],
        metrics: Metrics,
        *,
        policy: BatchPolicy | None = None,
        engine_view: Callable[[], EngineView] | None = None,
        room: Callable[[], int] | None = None,
        poll_s: float = 0.02,
        reconcile_s: float = 0.5,
    ) -> None:
        self.config = config
        self.policy: BatchPolicy = policy if policy is not None else make_policy(config.policy_config())
        self.arrivals = arrivals
        self.demand = demand
        self.to_stepper = to_stepper
        self.completed = completed
        self.metrics = metrics
        self._view = engine_view
        self._room = room  # the stepper's room now (`Stepper.room`): what its demands report, read live
        self.poll_s = poll_s
        # with nothing waiting but requests in flight, how often finished ones are reconciled
        # (the policy learns their lengths, reservations go back, the KV gauge follows)
        self.reconcile_s = reconcile_s
        self._arrived = trio.Event()
        self._cancelled = trio.Event()  # a request was cancelled: purge the queue of such
        self._released: dict[str, Job] = {}
        self._kv_grown = 0  # the policy's KvReservation.grown already counted in metrics

    def __len__(self) -> int:
        return len(self.policy)

    def drain(self) -> list[RequestState]:
        """Remove and return everything waiting (shutdown / crash recovery)."""
        out = []
        for job in list(self.policy):
            if self.policy.remove(job.rid) is not None:
                out.append(job.payload)
        return out

    def notice_cancel(self) -> None:
        """A request was cancelled (the gateway's abort): cancelled requests leave the queue
        soon, not when the policy would have released them — until then they counted as
        waiting, for the gauge and for admission's overload check (a dropped batch of a
        thousand prompts looked like a thousand waiting)."""
        self._cancelled.set()

    def purge_cancelled(self) -> int:
        """Remove every cancelled request still waiting (each goes to accounting, which
        releases its quota); returns how many."""
        gone = 0
        for job in [j for j in self.policy if j.payload.cancelled]:
            if self.policy.remove(job.rid) is not None:
                st: RequestState = job.payload
                st.events.close()
                self.completed.send_nowait(Completed(st, "cancelled"))
                gone += 1
        return gone

    async def _purger(self) -> None:
        while True:
            await self._cancelled.wait()
            self._cancelled = trio.Event()
            self.purge_cancelled()
            await trio.sleep(0.05)  # a burst of cancels (a dropped batch): one pass

    def _reconcile(self, now: float) -> None:
        """Tell the policy about released requests that have left the engine."""
        for rid, job in list(self._released.items()):
            st: RequestState = job.payload
            if st.finished_at:
                del self._released[rid]
                self.policy.on_finish(job, now, st.completion_tokens)

    def _current_view(self, slots: int) -> EngineView:
        if self._view is None:
            return EngineView(0, slots, _UNBOUNDED_BLOCKS, _UNBOUNDED_BLOCKS, 16)
        v = self._view()
        # never more than the stepper asked for
        running = max(v.running, v.max_running - slots)
        return dataclasses.replace(v, running=running)

    def _report_kv(self) -> None:
        """The policy's KV ledger as metrics: blocks reserved, reservations grown since last time."""
        kv = getattr(self.policy, "kv", None)
        if kv is None:
            return
        self.metrics.kv_reserved.set(kv.held)
        if kv.grown > self._kv_grown:
            self.metrics.kv_grown.inc(kv.grown - self._kv_grown)
            self._kv_grown = kv.grown

    async def _receive_arrivals(self) -> None:
        async for st in self.arrivals:
            if st.cancelled:  # cancelled on its way here (admission, predictor)
                st.events.close()
                self.completed.send_nowait(Completed(st, "cancelled"))
                continue
            self.policy.on_arrival(job_of(st, trio.current_time()), trio.current_time())
            self._arrived.set()

    async def _release(self, slots: int) -> int:
        """One release decision; returns how many live requests went to the stepper."""
        now = trio.current_time()
        self._reconcile(now)
        sent = 0
        released = self.policy.release(now, self._current_view(slots))[:slots]
        self._report_kv()
        # (read before the sends below wait: the next release decision may replace them)
        engine_priority = {job.rid: self.policy.engine_priority(job) for job in released}
        for job in released:
            st: RequestState = job.payload
            if st.cancelled:
                st.events.close()
                self.completed.send_nowait(Completed(st, "cancelled"))
                self.policy.on_finish(job, now, 0)
                continue
            self._released[job.rid] = job
            st.engine_priority = engine_priority[job.rid]
            await self.to_stepper.send(st)
            sent += 1
        return sent

    def _newest(self, want: Demand) -> Demand:
        """The stepper's room now (`room`), else its latest report, `want` if it sent none
        since. It reports every step (and every 0.5 s idle), dropping a report while one is
        pending: polling on the first one's slots saw the engine as full as it was then for
        good (fcfs-static, which releases only into an empty engine, then waited for ever),
        and a report waits up to 0.5 s for an idle stepper to send it."""
        while True:
            try:
                want = self.demand.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return want if self._room is None else Demand(max(0, self._room()))

    async def _dispatch(self) -> None:
        async for want in self.demand:
            while True:
                want = self._newest(want)
                if want.slots > 0 and await self._release(want.slots):  # (no room now: poll again)
                    break
                self._arrived = trio.Event()
                wake = self.policy.next_wakeup(trio.current_time())
                # nothing waiting: no release to decide, but requests in flight still finish —
                # wake now and then to reconcile them, or their reservations (and the
                # lmgate_kv_reserved_blocks gauge) would stay held until the next arrival
                timeout = self.poll_s if len(self.policy) else self.reconcile_s if self._released else math.inf
                if wake is not None:
                    timeout = min(timeout, max(0.0, wake - trio.current_time()))
                with trio.move_on_after(timeout):
                    await self._arrived.wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_arrivals)
            nursery.start_soon(self._dispatch)
            nursery.start_soon(self._purger)
            task_status.started()
