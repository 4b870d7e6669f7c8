"""Accounting actor: everything that happens after a request leaves the engine.

For each `Completed`:
- quota: `settle` with the real token counts (finished, cancelled mid-way or
  failed), or `release` when the request never reached the engine — so usage
  is counted exactly once, disconnects and failures included;
- response cache: store deterministic, fully finished answers;
- predictor feedback: the true output length of requests that ended on EOS/stop;
- metrics: outcome, end-to-end latency, TPOT, generated tokens.

A `UsageRecord` (an embedding request: `actors.embeddings.EmbeddingService`) is settled
or released the same way, and its outcome counted.

Redis work never blocks the stepper (this actor has its own bounded inbox, and the
stepper's sends are sized to it), and each request is accounted in its own task. The
response-cache store is retried briefly; a quota settle or release is retried with
backoff for up to `settle_patience_s` (default one hour), so a Redis outage delays a
request's usage record and frees its `max_concurrent` slot late, but does not lose
them: a settle after the reservation's TTL still records the usage. Requests served
fail-open while Redis was down (no reservation) are settled the same way, so their
usage is recorded once Redis is back. Metrics and predictor feedback do not wait for the
settle: the dashboards show what is served during an outage, when it is served.
`pending` counts requests not yet fully
accounted (the runtime's shutdown waits for it to reach 0).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from actors.flights import Flights
from actors.messages import LengthFeedback
from actors.metrics import Metrics
from actors.stepper import Completed
from cache.store import CacheUnavailable

log = logging.getLogger(__name__)


@dataclass
class UsageRecord:
    """A request that did not go through the engine (an embedding request), to account:
    its quota settled with `prompt_tokens` under `model` if it `ran` (else its reservation
    released), and its outcome counted in `lmgate_requests`. `settled` as
    `RequestState.settled`."""

    tenant_id: str
    request_id: str
    quota_tenant: Any  # cache.tenants.Tenant | None (`actors.admission.QuotaHold.tenant`)
    reserved: bool
    ran: bool
    prompt_tokens: int
    model: str
    outcome: str  # "ok", "cancelled" or "error"
    settled: trio.Event = field(default_factory=trio.Event)


class Accounting:
    def __init__(
        self,
        inbox: trio.MemoryReceiveChannel[Completed | UsageRecord],
        metrics: Metrics,
        *,
        model_name: str,
        feedback: trio.MemorySendChannel[LengthFeedback],
        service_time: Any,  # object with .observe(seconds)
        quotas: Any = None,
        response_cache: Any = None,
        retries: int = 3,
        settle_patience_s: float = 3600.0,
        flights: Flights | None = None,  # the admission's (`Admission.flights`): where leaders' answers land
    ) -> None:
        self.inbox = inbox
        self.metrics = metrics
        self.model_name = model_name
        self.feedback = feedback
        self.service_time = service_time
        self.quotas = quotas
        self.response_cache = response_cache
        self.retries = retries
        self.settle_patience_s = settle_patience_s
        self.flights = flights if flights is not None else Flights()
        self._nursery: trio.Nursery | None = None  # run's (`_ground_later`)
        self.settled = 0  # settle/release calls that succeeded (for tests and /metrics)
        self.pending = 0  # Completed messages being handled (a settle waiting for Redis included)

    async def _with_retry(self, op: str, fn, *args, on_failure: Any = None) -> Any:
        """`fn(*args)`, retried quickly; `on_failure()` is called at the first failure."""
        delay = 0.05
        for attempt in range(self.retries):
            try:
                return await fn(*args)
            except CacheUnavailable:
                self.metrics.redis_errors.labels(op).inc()
                if on_failure is not None and attempt == 0:
                    on_failure()
                if attempt == self.retries - 1:
                    log.warning("%s failed after %d attempts", op, self.retries)
                    return None
                await trio.sleep(delay)
                delay *= 4
        return None

    async def _patiently(self, op: str, fn, *args, on_failure: Any = None) -> Any:
        """`fn(*args)` until Redis answers: quick retries, then backoff up to 5 s between
        tries, for at most `settle_patience_s`. None if it never did. `on_failure()`: called
        once, when Redis first does not answer. A Redis that did not answer within the last
        second (`RedisStore.reachable`) is not tried at once: the answer waiting on
        `on_failure` goes out now, and the tries in the background begin."""
        store = getattr(self.quotas, "store", None)
        if store is not None and not store.reachable():
            if on_failure is not None:
                on_failure()
            result = None
        else:
            result = await self._with_retry(op, fn, *args, on_failure=on_failure)
        if result is not None:
            return result
        delay = 1.0
        self.metrics.settle_backlog.inc()
        try:
            with trio.move_on_after(self.settle_patience_s):
                while True:
                    # the next try: after the backoff, or as soon as Redis answers anything (the
                    # store's watcher finds it back within a second; a settle asleep in its 5 s
                    # backoff held its request's max_concurrent slot that much longer)
                    woken = False
                    with trio.move_on_after(delay):
                        if store is not None and hasattr(store, "answered"):
                            await store.answered()
                            woken = True
                        else:
                            await trio.sleep_forever()
                    if woken:  # every settle owed wakes at once: spread them over half a second
                        await trio.sleep(random.random() * 0.5)
                    delay = min(5.0, delay * 2)
                    try:
                        result = await fn(*args)
                    except CacheUnavailable:
                        self.metrics.redis_errors.labels(op).inc()
                        continue
                    log.debug("%s succeeded once Redis was back", op)
                    return result
        finally:
            self.metrics.settle_backlog.dec()
        log.error("%s gave up after %.0f s without Redis; usage of this request is lost", op, self.settle_patience_s)
        return None

    async def handle(self, c: Completed | UsageRecord) -> None:
        """One request's accounting. An error here is logged and ends this request's
        accounting only: raised, it failed the actor's nursery, which cancelled every other
        request's settle (those waiting out a Redis outage lost their usage)."""
        self.pending += 1
        try:
            if isinstance(c, UsageRecord):
                await self._record(c)
            else:
                landed = self._land(c)
                if landed is not None and self._nursery is not None:
                    self._nursery.start_soon(self._ground_later, *landed)
                try:
                    await self._handle(c)
                finally:  # (its answer stored, or not to be: the cache answers from now on)
                    if landed is not None:
                        self.flights.ground(*landed)
        except Exception:
            st = c if isinstance(c, UsageRecord) else c.state
            log.exception("accounting of request %s failed", st.request_id)
            st.settled.set()  # (what waits for its settle, a WebSocket's `cancelled`, goes on)
        finally:
            self.pending -= 1

    async def _settle(self, tenant: Any, request_id: str, *, reserved: bool, ran: bool, prompt_tokens: int,
                      completion_tokens: int, model: str, settled: trio.Event, refund_rpm: bool = False) -> None:
        """Settle a request's quota with its real usage if it ran (also a fail-open request,
        which holds no reservation: its usage is owed all the same), else release its
        reservation; `settled` is set when done.

        The caller's last frame waits for `settled` so that its next request is not refused
        for this one's slot; while Redis does not answer, that next request cannot be
        refused for it either (its own reservation fails the same way), so `settled` is set
        at the first failure, not after a retry loop that may last as long as the outage
        (each answer waited SETTLE_WAIT_S for nothing before)."""
        try:
            if self.quotas is not None and tenant is not None and (reserved or ran):
                if ran:
                    ok = await self._patiently("settle", self.quotas.settle, tenant, request_id,
                                               prompt_tokens, completion_tokens, model, on_failure=settled.set)
                else:
                    ok = await self._patiently("release", functools.partial(self.quotas.release, refund_rpm=refund_rpm),
                                               tenant, request_id, on_failure=settled.set)
                if ok is not None:
                    self.settled += 1
        finally:
            settled.set()

    async def _record(self, r: UsageRecord) -> None:
        self.metrics.requests.labels(r.tenant_id, r.outcome).inc()
        await self._settle(r.quota_tenant, r.request_id, reserved=r.reserved, ran=r.ran,
                           prompt_tokens=r.prompt_tokens, completion_tokens=0, model=r.model, settled=r.settled,
                           refund_rpm=True)  # (released before its first batch: not its client's doing alone)

    def _observe(self, c: Completed, ran: bool) -> None:
        """The request's metrics: counted when it ends, not once its quota is settled (a
        settle waits for Redis, for up to `settle_patience_s` in an outage, while requests
        are still served fail-open)."""
        st = c.state
        tenant = st.tenant_id
        if c.outcome == "rejected":
            return
        if st.detached:  # its client's part was counted when it left (`Admission._detach`): the rest
            self.metrics.generation_tokens.labels(tenant).inc(max(0, st.completion_tokens - st.billed_tokens))
            if c.outcome != "ok" and st.scheduled_at and not st.billed_prompt:  # (charged with the rest: `_handle`)
                self.metrics.prompt_tokens.labels(tenant).inc(st.prompt_tokens)
            return
        self.metrics.requests.labels(tenant, c.outcome).inc()
        if not ran:  # cancelled or refused before the engine had it: nothing billed, nothing counted
            return
        self.metrics.prompt_tokens.labels(tenant).inc(st.prompt_tokens)  # billed: also a cached answer's
        if c.outcome != "cached":
            self.metrics.generation_tokens.labels(tenant).inc(st.completion_tokens)
        if c.outcome != "ok":
            return
        self.metrics.e2e.labels(self.metrics.latency_tenant(tenant)).observe(st.finished_at - st.arrival)
        if st.first_token_at and st.completion_tokens > 1 and not st.params.use_beam_search:
            per_choice = st.completion_tokens / max(1, st.params.n)
            if per_choice > 1:
                self.metrics.tpot.labels(self.metrics.latency_tenant(tenant)).observe(
                    (st.finished_at - st.first_token_at) / (per_choice - 1)
                )
        if st.scheduled_at:
            sequences = max(1, st.params.n, st.params.beam_width)
            self.service_time.observe(st.finished_at - st.scheduled_at, st.completion_tokens / sequences)

    def _feed_back(self, st: Any) -> None:
        """The predictor learns how long sampled answers run; beam search favours other
        lengths, and a scoring request (prompt logprobs, or no output at all) says nothing
        of them. Advisory: never stalls accounting (dropped when the predictor's inbox is full).
        A request cut at a max_tokens its quota lowered is "capped": it says nothing of where
        it would have stopped (censored), nor that it would not have (a runaway)."""
        finish = st.finish_reasons.get(0)
        p = st.params
        if (p.n == 1 and not p.use_beam_search and p.prompt_logprobs is None and p.max_tokens != 0
                and finish in ("stop", "length")):
            if finish == "stop" and st.prediction is not None:  # (its true length: how far the prediction was)
                self.metrics.predictor_error.labels(st.prediction.source).observe(
                    (st.prediction.tokens + 1) / (st.completion_tokens + 1))
            if finish == "length" and st.quota_capped:
                finish = "capped"
            try:
                self.feedback.send_nowait(LengthFeedback(st.tenant_id, st.app, st.completion_tokens,
                                                         st.length_features, finish))
            except trio.WouldBlock:
                pass

    async def _handle(self, c: Completed) -> None:
        st = c.state
        ran = (bool(st.scheduled_at) or c.outcome == "cached") and not st.refunded
        self._observe(c, ran)
        if c.outcome == "ok" and ran:
            self._feed_back(st)
        if st.detached:  # its client's part was settled when it left (`Admission._detach`)
            rest = st.completion_tokens - st.billed_tokens
            prompt = (st.prompt_tokens if st.scheduled_at else 0) - st.billed_prompt  # (run after it was released)
            if (c.outcome != "ok" and (rest > 0 or prompt > 0) and self.quotas is not None
                    and st.quota_tenant is not None):
                # stopped with its followers gone, or failed: what it computed after its client
                # left was given to no one, and is charged to its tenant (else free of every limit)
                # (a request of the usage rows unless its client's part was one: released, it was not)
                counted = st.billed_prompt > 0
                await self._patiently("settle", functools.partial(self.quotas.settle, count_request=not counted),
                                      st.quota_tenant, st.request_id + "~rest", max(0, prompt), max(0, rest),
                                      st.adapter or self.model_name)
        else:
            await self._settle(st.quota_tenant, st.request_id, reserved=st.reserved, ran=ran,
                               prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens,
                               model=st.adapter or self.model_name, settled=st.settled,
                               refund_rpm=st.refunded or not st.client_cancelled)
        if c.outcome != "ok" or not ran:
            return
        if st.cacheable and self.response_cache is not None and st.params.n == 1 and 0 in st.choices:
            await self._store(st)

    def _land(self, c: Completed) -> tuple[str, Any] | None:
        """A request that led identical ones in flight (`actors.flights`) gives them its
        answer as soon as it ends, before its settle and store wait for Redis: the answer
        the cache would store, or None (it ran no whole answer: when it was cancelled one
        of them leads again, else they each go on alone). Returns the flight to ground
        once the answer is stored (None: it had none)."""
        st = c.state
        if st.flight is None:
            return None
        key, flight = st.flight
        st.flight = None
        answer = None
        try:
            if c.outcome == "ok" and st.scheduled_at and not st.refunded and st.params.n == 1 and 0 in st.choices:
                answer = self._answer(st)
        finally:  # (it lands whatever happens: its followers wait for nothing else)
            self.flights.land(key, flight, answer, again=c.outcome == "cancelled")
        return (key, flight) if answer is not None else None

    @staticmethod
    def _answer(st) -> Any:
        """The request's answer as the response cache keeps it (`CachedCompletion`), or None
        when a replay could not answer in full (a token came without its logprob)."""
        from cache.response_cache import CachedCompletion, CachedUsage

        rec = st.choices[0]
        with_logprobs = st.params.logprobs is not None
        if with_logprobs and len(rec.logprobs) != len(rec.token_ids):
            return None
        return CachedCompletion(
            text=rec.text,
            token_ids=rec.token_ids,
            finish_reason=rec.finish_reason or "stop",
            usage=CachedUsage(prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens),
            deltas=rec.deltas,
            logprobs=rec.logprobs if with_logprobs else None,
            tokens=rec.tokens if with_logprobs else None,
            top_logprobs=rec.top_logprobs if with_logprobs and rec.top_logprobs else None,
            stored_at=time.time(),
        )

    async def _store(self, st) -> None:
        value = self._answer(st)
        if value is None:
            return  # not every token came with its logprob: a replay could not answer in full
        tenant = st.call.tenant.as_tenant()
        stored = await self._with_retry("response_cache_put", self.response_cache.put, tenant,
                                        st.cache_model or self.model_name, st.prompt_token_ids, st.params, value)
        fits = getattr(self.response_cache, "fits", None)
        self.metrics.cache_stores.labels("failed" if stored is None else "stored" if stored else
                                         "redis_full" if fits is not None and fits(value) else "too_large").inc()

    LANDED_KEPT_S = 30.0  # a landed answer answers identical requests this long at most, stored or not

    async def _ground_later(self, key: str, flight: Any) -> None:
        """A landed answer leaves the registry once stored (`handle`), or after
        `LANDED_KEPT_S`: the store waits for the quota's settle, which waits out a Redis
        outage (up to an hour), and every distinct answer would be held in memory as long."""
        await trio.sleep(self.LANDED_KEPT_S)
        self.flights.ground(key, flight)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async for c in self.inbox:
                nursery.start_soon(self.handle, c)
