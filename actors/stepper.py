"""The stepper actor: owns the engine and runs its steps.

Loop (one iteration per engine step)::

    take new requests from the queue (non-blocking; block only when idle)
    apply aborts (cancelled requests leave the engine before the next step)
    report free capacity to the queue
    deltas = await compute.run(engine.step)          # step_in_thread (the default)
      or: let the event loop go idle, take what the queue released, deltas = engine.step()
    route deltas to per-request channels; finished requests → accounting

Where a step runs (`step_in_thread`, `lmgate serve --step-thread`). By default on the
runtime's compute thread (`actors.compute.ComputeThread`: one long-lived thread for all of
the process's torch work; trio's worker threads guaranteed nothing, and where a second
OpenMP pool existed — in-process, the trio thread had run torch — every step on 2 cores took
1.5-1.7x as long): the event loop streams tokens,
answers HTTP and admits requests while the engine steps. Or on the trio thread
(`step_in_thread=False`): the stepper first lets the loop go idle (streams written, cancels
and releases taken, so a burst the queue releases enters together; at most `settle_s`),
then steps, blocking the loop; the loop's work runs between steps instead of inside them.
In both, released requests wait in the intake channel (buffered: `Runtime` sizes it to
max_num_seqs) and all of them enter at the next step boundary; the demand the stepper
reports counts them.

Measured in docs/scheduling.md ("One thread for torch", "Where the step runs"): in-process,
the runtime on the compute thread matches `ops.bench_sched`'s loop (magnus ÷
fcfs-continuous 0.818 against 0.837, steps 47-55 ms against 46-51). On a GPU the step is
device time and overlapping it with the loop is the point.

The engine is touched only from this actor, and only between steps or inside
the compute thread's step, never both at once: `add_request`/`abort` run on the trio
thread while no step is in flight.

An exception from `engine.step()` fails the requests that were in the engine
(each gets a `Failed` event and is settled), not the process; the actor goes on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing

from actors.compute import ComputeThread
from actors.messages import Failed, Finished, PromptLogprob, TokenDelta, TopLogprob, Usage
from actors.metrics import Metrics
from actors.policies import StepCostFit
from actors.state import ChoiceRecord, RequestState
from cache.response_cache import scope_for
from gpu.engine import Engine, StepDelta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Demand:
    """Stepper → queue: how many more requests the engine can take now."""

    slots: int


@dataclass(frozen=True)
class Completed:
    """Stepper → accounting: a request left the engine (finished, cancelled or failed)."""

    state: RequestState
    outcome: str  # "ok" | "cancelled" | "error"


STEP_TIME_EWMA = 0.2  # weight of the newest step in `Stepper.mean_step_s` (as ops.sim's SimConfig.step_time_ewma)


class DrainRate:
    """How many requests leave the engine a second while it is saturated (its seats full,
    requests waiting in it for KV blocks, or its step budget spent with requests waiting):
    its capacity as measured, for the overload estimate (`Runtime.estimated_wait_s`).
    Measured, it counts what a formula of seats and service times misses: a KV cache that
    holds fewer requests than there are seats, preemptions, a batch slower per token. Over
    the last `window` requests to leave in the current saturated stretch, from the
    stretch's start (or the request before the window): requests that finish together in
    one step count over the time they took, not from the first of them. Steps that are not
    saturated add no requests (they measure demand, not capacity) but their time counts;
    `stale_s` without a saturated step (longer than a slow CPU's step) ends the stretch:
    an engine gone idle, or whose last requests were aborted, is no measure of a new
    burst. Fewer than `least` requests give no rate. Time runs on to now: an engine that
    stops finishing requests is seen to slow. Pure: the caller passes the clock."""

    def __init__(self, window: int = 16, least: int = 3, stale_s: float = 5.0) -> None:
        if least < 1 or window < least:
            raise ValueError("need 1 <= least <= window")
        self.window, self.least, self.stale_s = window, least, stale_s
        self._ends: collections.deque[float] = collections.deque()
        self._start: float | None = None  # the stretch's start, or the last end the window let go
        self._last = 0.0  # when the latest saturated step ended

    def observe(self, now: float, step_s: float, saturated: bool, finished: int) -> None:
        """A step of `step_s` seconds ended at `now`; `finished` requests ended in it."""
        if self._start is not None and now - step_s - self._last > self.stale_s:
            self._ends.clear()
            self._start = None
        if not saturated:
            return
        if self._start is None:
            self._start = now - step_s
        self._last = now
        self.left(now, finished)

    def left(self, now: float, count: int) -> None:
        """`count` requests left the engine at `now` (between steps: aborted), freeing what a
        finished one frees. Counted only within a saturated stretch."""
        if self._start is None or now - self._last > self.stale_s:
            return
        for _ in range(count):
            if len(self._ends) == self.window:
                self._start = self._ends.popleft()
            self._ends.append(now)

    def per_s(self, now: float) -> float | None:
        """Requests leaving a second, or None (no saturated stretch now, or too few seen)."""
        start = self._start
        if start is None or len(self._ends) < self.least or now - self._last > self.stale_s or now <= start:
            return None
        return len(self._ends) / (now - start)


class Stepper:
    def __init__(
        self,
        engine: Engine,
        intake: trio.MemoryReceiveChannel[RequestState],
        demand: trio.MemorySendChannel[Demand],
        completed: trio.MemorySendChannel[Completed],
        metrics: Metrics,
        *,
        max_inflight: int,
        compute_lock: trio.Lock | None = None,
        step_in_thread: bool = True,
        settle_s: float = 0.05,
        compute: ComputeThread | None = None,
    ) -> None:
        if settle_s < 0:
            raise ValueError("settle_s must be >= 0")
        self.engine = engine
        self.step_in_thread = step_in_thread
        # the thread steps run on (`step_in_thread`): one long-lived thread, shared with the
        # process's other torch work — see actors.compute for why not trio's worker threads
        self.compute = (compute or ComputeThread()) if step_in_thread else None
        self.settle_s = settle_s  # the longest a step on the trio thread waits for the loop to go idle
        # held around every engine step when the engine shares its CPU cores with other
        # torch work of this process (the Magnus embedder; see Runtime.compute_lock)
        self.compute_lock = compute_lock
        self.intake = intake
        self.demand = demand
        self.completed = completed
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.active: dict[str, RequestState] = {}
        # LoRA (vLLM's max_loras): at most this many distinct adapters among the requests in
        # the engine; a request of another adapter waits here, in order (`parked`), until
        # one of them is done. Without the cap every running request of its own adapter kept
        # that adapter in memory (12 rank-64 adapters at --max-loras 2: 4.1 GB).
        lora = getattr(engine, "lora", None)
        self.max_loras: int | None = lora.config.max_loras if lora is not None and lora.enabled else None
        self.parked: list[RequestState] = []
        self.last_step_s = 0.0  # duration of the latest engine step
        # the latest step that raised (monotonic; -inf: none) and why, the latest that did
        # not, and when a failure's traceback was last logged: `/readyz` says the engine is
        # failing while the latest step raised, and the log does not grow a traceback a step
        self.step_failed_at = self.step_ok_at = self._traceback_logged_at = -math.inf
        self.step_error = ""
        self._failures_unlogged = 0
        # what policies read as `EngineView.step_time_s` ("recent mean step time"): an EWMA
        # with the simulator's weight (SimConfig.step_time_ewma), so a policy behaves served as
        # it does in ops.bench_sched and the simulator; the raw last step let one 512-token
        # prefill step look like the batch's pace (the adaptive policy cut its cap on it)
        self.mean_step_s = 0.0
        self.step_cost = StepCostFit()  # seconds per token fed, over every step (policies read it)
        self.drain = DrainRate()  # requests finished a second while saturated (the overload estimate reads it)
        # the same EWMA over steps that only decode (a token per sequence): the pace of
        # generation, which a prefill step (the first of every burst) does not show
        self.mean_decode_step_s = 0.0
        self._token_texts: dict[int, str] = {}  # `_token_text`'s
        # engine counters exported as Prometheus counters: each exports what follows this point
        self._exported = {"preemptions": metrics.preemptions,
                          "prefill_tokens_fed": metrics.step_tokens.labels("prefill"),
                          "decode_tokens_fed": metrics.step_tokens.labels("decode"),
                          "lora_loads": metrics.lora_loads.labels("load"),
                          "lora_reloads": metrics.lora_loads.labels("reload"),
                          "lora_evictions": metrics.lora_evictions}
        # (adapter loads count from 0: the ones at start, checking --lora-modules, are real loads)
        self._seen = {k: 0 if k.startswith("lora_") else int(engine.stats().get(k, 0)) for k in self._exported}
        self._wakeup = trio.Event()

    def median_age_s(self, now: float, among: Collection[str] | None = None) -> float:
        """The lower median of the time the requests in the engine (those named in `among`)
        have spent in it so far (0 with none): a floor under a request's time in the engine
        that knows the requests running now. The overload estimate reads it before the
        drain rate is measured; the mean of the requests that ended knows only those (after
        three 16-token warm-ups, a burst of 128-token requests was costed at 0.5 s each:
        admitted streams waited up to 20 s under an 8 s limit). The lower median, so that
        one long request beside short ones does not set it."""
        ages = sorted(now - st.scheduled_at for rid, st in self.active.items()
                      if st.scheduled_at and (among is None or rid in among))
        return ages[(len(ages) - 1) // 2] if ages else 0.0

    def poke(self) -> None:
        """Wake an idle stepper (a cancel arrived)."""
        self._wakeup.set()

    # ------------------------------------------------------------ intake
    def _may_enter(self, st: RequestState) -> bool:
        """Whether `st` may enter the engine now (`max_loras`): a base-model request always;
        an adapter's while nothing is parked and its adapter runs already or the engine's
        requests use fewer than `max_loras` adapters. Once one waits, every adapter request
        after it waits too, so that the adapters running drain and it is not overtaken for
        good by their newer requests."""
        if self.max_loras is None or st.adapter is None or st.cancelled:
            return True
        if self.parked:
            return False
        return self._adapter_fits(st.adapter)

    def _adapter_fits(self, adapter: str) -> bool:
        running = {s.adapter for s in self.active.values() if s.adapter is not None}
        return adapter in running or len(running) < (self.max_loras or 0)

    def _enter_or_park(self, st: RequestState) -> bool:
        """True if `st` may enter now; else it is parked (`parked`), and False."""
        if self._may_enter(st):
            return True
        self.parked.append(st)
        return False

    async def _unpark(self) -> None:
        """Parked requests enter, in order, as their adapters fit (`max_loras`); cancelled
        ones end where they stand."""
        for st in [s for s in self.parked if s.cancelled]:
            self.parked.remove(st)
            self._finish(st, "cancelled")
        while self.parked and self._adapter_fits(self.parked[0].adapter or ""):
            st = self.parked[0]
            adapter = await self._load_adapter(st)  # (parked meanwhile: a shutdown's end_streams sees it)
            self.parked.remove(st)
            self._admit(st, adapter)

    def _admit(self, st: RequestState, adapter: Any = None) -> None:
        """Hand `st` to the engine; `adapter`: its LoRA adapter loaded already
        (`_load_adapter`), else the engine looks it up by name."""
        if st.cancelled:
            self._finish(st, "cancelled")
            return
        try:
            # the engine's priority is the queue policy's (`BatchPolicy.engine_priority`: the
            # step scheduler runs lower values first and preempts for them under KV pressure)
            # tenants share cached prefixes only within the shared cache pool: a hit shows in
            # `cached_tokens` and in time, and would tell one tenant another's prompt. The
            # salt is the response cache's scope, the tenant's creation time in it: a tenant
            # id deleted and created again must not see the deleted tenant's prompts either
            salt = None if st.call.tenant.shared_cache_pool else scope_for(st.call.tenant.as_tenant())
            self.engine.add_request(st.request_id, st.prompt_token_ids, st.params, priority=st.engine_priority,
                                    adapter=adapter if adapter is not None else st.adapter, grammar=st.grammar,
                                    cache_salt=salt)
        except ValueError as e:  # admission validated already; this is a last line of defence
            from gpu.lora import AdapterNotFound, LoraError

            if isinstance(e, LoraError):  # its adapter's files were removed, or broken, while it waited
                failed = Failed(st.request_id, 404 if isinstance(e, AdapterNotFound) else 400,
                                "model_not_found" if isinstance(e, AdapterNotFound) else "invalid_value",
                                f"LoRA adapter {st.adapter!r} cannot be served: {e.reason}", "model")
            else:
                failed = Failed(st.request_id, 400, "invalid_request_error", str(e))
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                st.events.send_nowait(failed)  # (a detached request's client is gone: Admission._detach)
            self._finish(st, "error")
            return
        if st.adapter is not None:
            key = self.engine.adapter_key(st.request_id)
            if key != st.adapter_key and st.adapter_key is not None and st.cache_model.endswith(st.adapter_key):
                # its files were replaced while it waited: it runs the version the engine read,
                # and its answer is cached as that version's, not as the one admission saw
                st.cache_model = st.cache_model[:-len(st.adapter_key)] + (key or "")
                st.adapter_key = key
        st.scheduled_at = time.monotonic()
        self.metrics.queue_time.labels(self.metrics.latency_tenant(st.tenant_id)).observe(st.scheduled_at - st.admitted_at)
        self.active[st.request_id] = st

    def _received(self) -> Iterator[RequestState]:
        """The requests released to the stepper and not yet taken, as they come."""
        while True:
            try:
                yield self.intake.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    def _drain_intake(self) -> int:
        n = 0
        for st in self._received():
            if self._enter_or_park(st):
                self._admit(st)
            n += 1
        return n

    async def _take_intake(self) -> None:
        """`_drain_intake`, with a LoRA adapter the LRU dropped (or whose files changed) since
        admission loaded in a worker thread first: `engine.add_request` would load it on
        the event loop (about 0.2 s for a rank-64 adapter)."""
        for st in self._received():
            if self._enter_or_park(st):
                self._admit(st, await self._load_adapter(st))

    async def _load_adapter(self, st: RequestState) -> Any:
        """The `gpu.lora.LoraAdapter` `st` runs with, from the LRU, else read in a worker
        thread; None for the base model, or when it cannot be loaded (`_admit` says why).
        The engine is handed this object: looked up again by name, it could have been
        dropped from the LRU meanwhile by other loads, and read on the event loop."""
        lora = getattr(self.engine, "lora", None)
        if st.adapter is None or lora is None:
            return None
        try:
            if lora.is_current(st.adapter):
                return lora.get(st.adapter)
            return await trio.to_thread.run_sync(lora.get, st.adapter)
        except ValueError:  # (gpu.lora.LoraError)
            return None

    async def _settle(self) -> None:
        """Before a step on the trio thread: let every other task run until it blocks
        (streams written, releases sent), taking released requests as they come, for at
        most `settle_s`."""
        with trio.move_on_after(self.settle_s):
            while True:
                await trio.testing.wait_all_tasks_blocked()
                if not self._drain_intake():
                    return

    def _apply_cancels(self) -> None:
        aborted = 0
        for rid, st in list(self.active.items()):
            if st.cancelled:
                self._bill_beams(st)
                self.engine.abort(rid)
                del self.active[rid]
                self._finish(st, "cancelled")
                aborted += 1
        if aborted:  # no step may follow to refresh the gauges (the last request just left)
            self.drain.left(time.monotonic(), aborted)
            self._export_stats()

    def _bill_beams(self, st: RequestState) -> None:
        """Before a beam search leaves the engine unfinished: its beams ran, though none came
        back (a beam search returns nothing before its end), so they are charged."""
        if st.params.use_beam_search:
            st.completion_tokens = max(st.completion_tokens, self.engine.decoded_tokens(st.request_id))

    def _export_stats(self) -> None:
        """The engine's gauges and counters into /metrics: after every step, and after
        aborts, which free KV blocks and running slots between steps."""
        stats = self.engine.stats()
        self.metrics.kv_usage.set(stats["kv_usage"])
        self.metrics.lora_loaded.set(stats.get("lora_loaded", 0))
        for key, counter in self._exported.items():
            value = stats.get(key, 0)
            if value > self._seen[key]:
                counter.inc(value - self._seen[key])
                self._seen[key] = value

    def room(self) -> int:
        """How many more requests the engine can take now; released requests still in the
        intake buffer are on their way in, and count. Parked ones (`max_loras`) do not: the
        engine's free slots stay open to base-model requests while they wait; but once as
        many are parked as the engine has slots, nothing more is taken until they move."""
        if len(self.parked) >= self.max_inflight:
            return 0
        return self.max_inflight - len(self.active) - self.intake.statistics().current_buffer_used

    def _report_demand(self) -> None:
        free = self.room()
        if free > 0:
            try:
                self.demand.send_nowait(Demand(free))
            except trio.WouldBlock:
                pass  # a demand is already pending; the queue will serve it

    # ------------------------------------------------------------ routing
    def _token_text(self, token_id: int) -> str:
        """A token's text for logprobs: its own text, or, for a token that is part of a
        UTF-8 character, ``bytes:\\xNN...`` (as OpenAI spells them) — decoded alone such
        tokens all read U+FFFD, and completions' top_logprobs, keyed by text, lost entries.
        Remembered (at most the vocabulary): each is asked for 21 times a token with 20
        alternatives, on the event loop."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._spell(token_id)
        return text

    def _spell(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        raw = tokenizer.token_bytes(token_id) if hasattr(tokenizer, "token_bytes") else None
        if raw is None:
            return tokenizer.decode([token_id], skip_special_tokens=False)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _step_failed(self, error: Exception) -> None:
        """An engine step raised: its requests fail with a 500 that names no internals (the
        exception may name other tenants' requests; an audit saw every tenant of the batch
        shown it), and the traceback is logged at most once a minute, the failures between
        counted (an audit: ~17 lines a request while every step failed)."""
        now = self.step_failed_at = time.monotonic()
        self.step_error = f"{type(error).__name__}: {error}"
        self.metrics.engine_errors.inc()
        if now - self._traceback_logged_at >= 60.0:
            self._traceback_logged_at = now
            log.error("engine step failed (%d more since the last traceback logged)", self._failures_unlogged,
                      exc_info=error)
            self._failures_unlogged = 0
        else:
            self._failures_unlogged += 1
            log.error("engine step failed again: %s", self.step_error)
        self.fail_all("engine step failed (the server's log has why)")

    def failing(self) -> str | None:
        """Why the engine is failing, while its latest step raised (within the last minute):
        for `/readyz`'s `degraded`; None otherwise."""
        now = time.monotonic()
        if self.step_failed_at > self.step_ok_at and now - self.step_failed_at < 60.0:
            return self.step_error
        return None

    def _route(self, d: StepDelta) -> None:
        st = self.active.get(d.request_id)
        if st is None:
            return
        if d.error is not None:  # a choice failed (its output constraint broke): the request fails
            self.engine.abort(d.request_id)  # its other choices, if any still run
            del self.active[d.request_id]
            failed = Failed(d.request_id, 500, "engine_error", d.error) if d.fault else Failed(
                d.request_id, 400, "invalid_value", d.error, st.call.guided_field or "response_format")
            try:
                st.events.send_nowait(failed)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                pass
            self._finish(st, "error")
            return
        now = time.monotonic()
        if not st.first_token_at:
            st.first_token_at = now
            if not st.params.use_beam_search:  # a beam search's first delta comes with its last
                self.metrics.ttft.labels(self.metrics.latency_tenant(st.tenant_id)).observe(now - st.arrival)
        st.completion_tokens += len(d.token_ids) + d.unreturned_tokens
        st.cached_prompt_tokens = max(st.cached_prompt_tokens, d.cached_prompt_tokens)
        top = tokens = None
        if d.logprobs is not None:  # token texts only when asked for: decoding costs per token
            text_of = self._token_text
            tokens = [text_of(t) for t in d.token_ids]
            if d.top_logprobs is not None:
                top = [[TopLogprob(t, lp, text_of(t)) for t, lp in row] for row in d.top_logprobs]
        if st.cacheable and st.params.n == 1:  # (only one choice's answer is stored: held for nothing else)
            rec = st.choices.setdefault(d.index, ChoiceRecord())
            rec.text += d.text
            rec.token_ids.extend(d.token_ids)
            rec.deltas.append(d.text)
            rec.delta_tokens.append(len(d.token_ids))
            if d.logprobs is not None:
                rec.logprobs.extend(d.logprobs)
                rec.tokens.extend(tokens)
                rec.top_logprobs.extend([[(a.token_id, a.logprob, a.token) for a in row] for row in top or ()])
            if d.finish_reason:
                rec.finish_reason = d.finish_reason
            if st.flight is not None:  # (streamed followers send it on: `Admission._tail`)
                st.flight[1].advance()
        if not st.cancelled and not st.detached:  # (a detached request's client is gone: Admission._detach)
            prompt_lps = None
            if d.prompt_logprobs is not None:
                # built once a request and shared by its choices (each brings the same): 64
                # choices of a 741-token prompt built ~1M objects, 2 s of the event loop
                prompt_lps = st.prompt_logprobs
                if prompt_lps is None:
                    text_of = self._token_text
                    prompt_lps = st.prompt_logprobs = [
                        PromptLogprob(t, text_of(t), lp, [TopLogprob(a, v, text_of(a)) for a, v in row], rank)
                        for t, (lp, row, rank) in zip(st.prompt_token_ids, d.prompt_logprobs, strict=True)]
            try:
                st.events.send_nowait(
                    TokenDelta(
                        st.request_id, d.index, d.text, list(d.token_ids),
                        list(d.logprobs) if d.logprobs is not None else None, top, tokens, prompt_lps,
                        d.finish_reason,
                    )
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                st.cancelled = True  # the consumer went away: abort before the next step
        if d.finish_reason:
            st.finish_reasons[d.index] = d.finish_reason
        if d.request_finished:
            del self.active[st.request_id]
            self._finish(st, "ok")

    def _finish(self, st: RequestState, outcome: str) -> None:
        st.finished_at = time.monotonic()
        st.prompt_logprobs = None  # (its choices have them: the state need not hold them longer)
        if outcome == "ok":
            usage = Usage(st.prompt_tokens, st.completion_tokens, st.cached_prompt_tokens)
            reasons = [st.finish_reasons.get(i, "stop") for i in range(st.params.n)]
            try:
                st.events.send_nowait(Finished(st.request_id, reasons, usage))
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                pass
        st.events.close()
        self.completed.send_nowait(Completed(st, outcome))

    def fail_all(self, message: str) -> None:
        """Fail every request in the engine (engine error or actor crash)."""
        for rid, st in list(self.active.items()):
            self._bill_beams(st)
            self.engine.abort(rid)
            try:
                st.events.send_nowait(Failed(rid, 500, "engine_error", message))
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                pass
            del self.active[rid]
            self._finish(st, "error")
        self._export_stats()

    # ------------------------------------------------------------ loop
    async def _step(self) -> list[StepDelta]:
        if self.compute is not None:
            return await self.compute.run(self.engine.step)
        return self.engine.step()  # blocks the event loop for the step (see the module docstring)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._unpark()  # (first: they came before what the intake holds)
            if not self.active:
                self._report_demand()
                # idle: wait for work (or a poke), without spinning
                with trio.move_on_after(0.5):
                    st = await self.intake.receive()
                    if self._enter_or_park(st):
                        self._admit(st, await self._load_adapter(st))
            await self._take_intake()
            self._apply_cancels()
            self._report_demand()
            if not self.engine.has_unfinished():
                await trio.lowlevel.checkpoint()
                continue
            if not self.step_in_thread:
                await self._settle()
                self._apply_cancels()
                if not self.engine.has_unfinished():
                    continue
            t0 = time.perf_counter()
            try:
                if self.compute_lock is None:
                    deltas = await self._step()
                else:
                    async with self.compute_lock:
                        t0 = time.perf_counter()  # a step's time excludes waiting for the lock
                        deltas = await self._step()
            except Exception as e:  # noqa: BLE001 — an engine error fails the step's requests, not the process
                self._step_failed(e)
                continue
            self.step_ok_at = time.monotonic()
            dt = self.last_step_s = time.perf_counter() - t0
            self.mean_step_s = dt if self.mean_step_s == 0 else self.mean_step_s + STEP_TIME_EWMA * (dt - self.mean_step_s)
            self.step_cost.observe(self.engine.last_step_tokens, dt)
            if 0 < self.engine.last_step_tokens == self.engine.last_step_seqs:
                m = self.mean_decode_step_s
                self.mean_decode_step_s = dt if m == 0 else m + STEP_TIME_EWMA * (dt - m)
            self.metrics.step_time.observe(dt)
            if self.engine.last_step_seqs:
                self.metrics.batch_size.observe(self.engine.last_step_seqs)
            sched = self.engine.scheduler
            cfg = sched.config
            saturated = (sched.waits_for_blocks or self.engine.last_step_seqs >= cfg.max_num_seqs
                         or (sched.num_waiting > 0 and self.engine.last_step_tokens >= cfg.max_num_batched_tokens))
            self.drain.observe(time.monotonic(), dt, saturated, sum(1 for d in deltas if d.request_finished))
            for d in deltas:
                self._route(d)
            self._export_stats()
