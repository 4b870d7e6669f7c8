"""The runtime: the actors of one serving process, wired by bounded channels.

    gateway ─ AdmitMsg ─▶ admission ─▶ predictor ─▶ queue ─▶ stepper (steps the engine)
                              │                        ▲        │
                              │                  Demand(slots)──┘
                              └───────── Completed ─────────▶ accounting ─▶ Redis, predictor feedback

`Runtime.submit(call)` is the gateway's entry point for generation; `Runtime.embed(call)`
runs a /v1/embeddings request (`actors.embeddings.EmbeddingService`: quota through
admission, batches on the compute thread between engine steps, a `UsageRecord` to
accounting). Each actor runs
under a supervisor: if it crashes, what it owned fails cleanly (the stepper
fails its in-flight requests; the queue fails its waiting ones) and the actor
is restarted with the same channels.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from actors.accounting import Accounting
from actors.admission import Admission, AdmissionConfig, AdmitMsg
from actors.compute import ComputeThread, InlineCompute, release_openmp_pool
from actors.embeddings import EmbeddingConfig, EmbeddingService, SentenceEmbedder
from actors.messages import (
    Accepted,
    EmbedCall,
    Embedded,
    Failed,
    GenerateCall,
    LengthFeedback,
    Rejected,
)
from actors.metrics import Metrics
from actors.policies import BatchPolicy
from actors.predictor import PredictorConfig, PredictorService, RunningLengthEstimator
from actors.queue import QueueActor, engine_view
from actors.queue_policy import QueueConfig
from actors.state import RequestState
from actors.stepper import Completed, Demand, Stepper
from cache.quotas import Progress
from cache.store import CacheUnavailable
from gpu.config import EngineConfig
from gpu.engine import Engine

log = logging.getLogger(__name__)


PREDICT_BATCH = 32  # instructions embedded per call at most (MiniLM's batch)
REDIS_DEGRADED_S = 5.0  # /readyz lists a Redis error this long after it (a refusing Redis answers reads)


@dataclass(frozen=True)
class RuntimeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    # "running": per-tenant/app running estimate (no model, no embeddings);
    # "magnus": actors.predictor.PredictorService — MiniLM instruction embeddings, input
    # length and the user's history, refit online in the background, kept in Redis
    length_predictor: str = "running"
    # a file holding a saved Magnus predictor (LengthPredictor.to_bytes): started from when
    # Redis holds none (PredictorService.load_or_seed), so a new deployment is not blind
    predictor_seed: str | None = None
    model_name: str = ""  # served model id; "" → derived from the checkpoint
    max_estimated_wait_s: float = 60.0
    quota_fail_open: bool = True
    collapse_identical: bool = True  # identical deterministic requests in flight generate once (actors.flights)
    metrics_tenant_histograms: int = 200  # tenants with latency histograms of their own (`Metrics.latency_tenant`)
    admission_concurrency: int = 256
    channel_size: int = 256
    # the model /v1/embeddings serves (actors.embeddings), or None: no embeddings
    embeddings: EmbeddingConfig | None = None
    # where engine steps run: a worker thread (the event loop overlaps the step), or the trio
    # thread (the loop waits; actors.stepper's docstring has the measurements of both)
    step_in_thread: bool = True


def served_model_name(model: str) -> str:
    """The id `/v1/models` shows for `--model`: the bundled model's HF name, else the
    checkpoint's file or folder name."""
    from pathlib import Path

    from gpu.loader import BUNDLED_ALIASES

    if model.lower() in BUNDLED_ALIASES:  # (as `gpu.loader.resolve_source` matches them)
        return "SmolLM2-135M-Instruct"
    import os

    p = Path(os.path.abspath(Path(model).expanduser()))  # (`--model .` named it ""; a symlink keeps its name)
    return (p.stem if p.suffix == ".gguf" else p.name) or "model"


class ServiceTime:
    """EWMAs of a request's time in the engine, and of the tokens each of its sequences
    generated, for the overload estimate (`Runtime.estimated_wait_s`). They start as plain
    means (the first request replaces the guesses whole: at a weight of `alpha` the guess
    of 2 s held for a dozen requests, and a restarted server admitted 3x what it could
    serve in its limit, measured by an audit)."""

    def __init__(self, alpha: float = 0.1, initial: float = 2.0, initial_tokens: float = 128.0):
        self.alpha = alpha
        self.value = initial
        self.tokens = initial_tokens
        self.count = 0  # requests observed

    def observe(self, seconds: float, tokens_per_sequence: float | None = None) -> None:
        self.count += 1
        weight = max(self.alpha, 1 / self.count)
        self.value += weight * (seconds - self.value)
        if tokens_per_sequence is not None:
            self.tokens += weight * (max(1.0, tokens_per_sequence) - self.tokens)

    def expected(self, decode_step_s: float) -> float:
        """A request's time in the engine: as observed; before any request ended, a typical
        request's tokens at the engine's recent time for a decode step (0: none measured
        yet, the initial guess), which knows this machine's and this batch's pace where
        the guess does not."""
        if self.count or decode_step_s <= 0:
            return self.value
        return self.tokens * decode_step_s


class Runtime:
    """Holds the engine and the actors; see the module docstring."""

    INTAKE_BUFFER: int | None = None  # queue → stepper buffer (None: max_num_seqs; 0 was the old hand-over)
    FOLLOWER_ROOM = 1024  # accounting's inbox beyond one place per request that can be alive (followers')

    def __init__(
        self,
        config: RuntimeConfig,
        engine: Engine,
        *,
        quotas: Any = None,
        response_cache: Any = None,
        prompt_cache: Any = None,
        store: Any = None,
        metrics: Metrics | None = None,
        policy: BatchPolicy | None = None,
        length_service: PredictorService | None = None,
        compute: ComputeThread | InlineCompute | None = None,
    ) -> None:
        """`policy` (a policy object instead of `config.queue`'s) and `length_service` (a
        Magnus predictor service, its embedder loaded, instead of a fresh one) are for
        drivers that run the runtime in-process on a predictor trained elsewhere
        (`ops.bench_sched --driver runtime`). `compute`: where torch runs (`open_runtime`
        builds the engine on it first); by default a new `ComputeThread`, or the trio thread
        itself when `config.step_in_thread` is False. Closed when `run` ends."""
        self.config = config
        self.compute = compute or (ComputeThread() if config.step_in_thread else InlineCompute())
        self.engine = engine
        self.store = store
        self.metrics = metrics or Metrics(tenant_histograms=config.metrics_tenant_histograms)
        self.registry = self.metrics.registry
        self.model_name = config.model_name or served_model_name(engine.config.model)
        # clients may also name the model the way the operator did (--model)
        self.model_aliases = frozenset({self.model_name, engine.config.model})
        emb = config.embeddings
        self.embedding_model_name = emb.served_name if emb is not None else None
        self.embedding_aliases = emb.aliases if emb is not None else frozenset()
        if self.embedding_aliases & self.model_aliases:
            raise ValueError(f"the embedding model's name {self.embedding_model_name!r} is the served model's")
        self.embeddings: EmbeddingService | None = None  # loaded in `run`
        lora = getattr(engine, "lora", None)
        if lora is not None:
            # LoraError if a configured adapter has one of these names
            lora.reserve(self.model_aliases | self.embedding_aliases)
        # what one request may hold, as the API reports it (/v1/models, /tokenize) and the
        # Responses API's truncation budgets: the context window, or the KV cache when that
        # is smaller (admission refuses more either way, naming which one)
        kv_tokens = engine.num_blocks * engine.config.cache.block_size
        self.max_model_len = min(engine.max_model_len, kv_tokens)
        if kv_tokens < engine.max_model_len:
            log.warning("the KV cache holds %d tokens, fewer than the context window of %d: one request may hold "
                        "at most %d (a larger --kv-cache-mb, or a smaller --max-model-len)",
                        kv_tokens, engine.max_model_len, kv_tokens)
        self.quotas = quotas
        self.tokenizer = engine.tokenizer
        self.ready = False
        self._service_time = ServiceTime()
        cs = config.channel_size
        self._admit_send, self._admit_recv = trio.open_memory_channel[AdmitMsg](cs)
        self._pred_send, self._pred_recv = trio.open_memory_channel[RequestState](cs)
        self._predicting = 0  # requests taken from _pred_recv and not yet sent to the queue
        self._prediction_batch: list[RequestState] = []  # those requests (failed if the actor crashes)
        self._feedback_failed_logged = -math.inf
        self._queue_send, self._queue_recv = trio.open_memory_channel[RequestState](cs)
        # Released requests wait here for the next step boundary. Buffered, so a burst the
        # policy releases together enters the engine together: unbuffered, the queue handed
        # them over one per step while a step ran in the worker thread (the stepper takes
        # what is ready between steps, and only one sender is ever ready). The stepper counts
        # what is buffered when it reports demand, so it never holds more than max_num_seqs.
        intake = engine.config.scheduler.max_num_seqs if self.INTAKE_BUFFER is None else self.INTAKE_BUFFER
        self._intake_send, self._intake_recv = trio.open_memory_channel[RequestState](intake)
        self._demand_send, self._demand_recv = trio.open_memory_channel[Demand](1)
        # accounting must never block the stepper: one slot per request that can be alive
        cap = config.queue.max_waiting + engine.config.scheduler.max_num_seqs + cs * 3
        cap += emb.max_in_flight if emb is not None else 0  # an embedding request's UsageRecord
        # and room for the ends of requests that waited for an identical one's answer (they wait
        # for it: `Admission._tell_accounting`), and the bills of leaders whose clients left
        self._done_reserved = cap
        self._done_send, self._done_recv = trio.open_memory_channel[Completed](cap + self.FOLLOWER_ROOM)
        self._fb_send, self._fb_recv = trio.open_memory_channel[LengthFeedback](cs)
        self.predictor = RunningLengthEstimator(config.predictor)
        if config.length_predictor not in ("running", "magnus"):
            raise ValueError(f"length_predictor must be 'running' or 'magnus', got {config.length_predictor!r}")
        # the embedder is loaded in `run` (seconds of work, on the compute thread)
        if length_service is not None and config.length_predictor != "magnus":
            raise ValueError("a length_service needs length_predictor='magnus'")
        self.length_service = length_service or (
            PredictorService(store=store) if config.length_predictor == "magnus" else None)
        # One torch job at a time on a CPU engine's cores: the embedder (and the refit)
        # running beside an engine step made it 1.5-2x slower — two OpenMP teams on 2
        # cores, each preempting the other's threads mid-barrier: an embedding every 0.33 s
        # cost the engine 140-190 ms of step time each (docs/scheduling.md, "Through the
        # server"). Serialized, an embedding costs what it takes alone. A GPU engine's step
        # is mostly device time, so there the two overlap.
        self.compute_lock = (trio.Lock() if self.length_service is not None
                             and not str(engine.config.device).startswith("cuda") else None)
        if self.length_service is not None:
            self.length_service.compute_lock = self.compute_lock
            self.length_service.on_compute = lambda phase, s: self.metrics.predictor_compute.labels(phase).inc(s)
            if self.compute_lock is not None:  # a CPU engine: embed on the engine's thread
                self.length_service.compute = self.compute
        self.queue = QueueActor(config.queue, self._queue_recv, self._demand_recv, self._intake_send,
                                self._done_send, self.metrics, policy=policy,
                                engine_view=lambda: engine_view(engine, self.stepper.mean_step_s,
                                                                self.stepper.step_cost),
                                room=lambda: self.stepper.room())
        self.stepper = Stepper(engine, self._intake_recv, self._demand_send, self._done_send, self.metrics,
                               max_inflight=engine.config.scheduler.max_num_seqs, compute_lock=self.compute_lock,
                               step_in_thread=config.step_in_thread,
                               compute=self.compute if isinstance(self.compute, ComputeThread) else None)
        self.admission = Admission(
            AdmissionConfig(
                model_name=self.model_name,
                model_aliases=self.model_aliases,
                kv_capacity_tokens=engine.num_blocks * engine.config.cache.block_size,
                engine_variant=(f"{str(engine.dtype).removeprefix('torch.')}/{engine.config.quantization}"
                                f"/{getattr(engine, 'weights_fingerprint', '')}"),
                kv_block_size=engine.config.cache.block_size,
                max_sequences=engine.scheduler.config.max_num_seqs,
                max_model_len=engine.max_model_len,
                vocab_size=engine.model_config.vocab_size,
                max_waiting=config.queue.max_waiting,
                max_estimated_wait_s=config.max_estimated_wait_s,
                quota_fail_open=config.quota_fail_open,
                collapse_identical=config.collapse_identical,
                embedding_models=self.embedding_aliases,
            ),
            engine.tokenizer, self.metrics,
            to_predictor=self._pred_send, completed=self._done_send, load=self,
            quotas=quotas, response_cache=response_cache, prompt_cache=prompt_cache,
            adapters=getattr(engine, "lora", None), on_cancel=self.queue.notice_cancel,
            grammars=getattr(engine, "grammars", None),
        )
        self.accounting = Accounting(
            self._done_recv, self.metrics, model_name=self.model_name, feedback=self._fb_send,
            service_time=self._service_time, quotas=quotas, response_cache=response_cache,
            flights=self.admission.flights,
        )
        # followers' ends go to accounting only beyond what its senders that cannot wait need
        self.admission.completed_reserved = self._done_reserved
        # read at scrape time: never stale (after a drain, between steps)
        self.metrics.waiting.set_function(self.waiting)
        self.metrics.running.set_function(lambda: self.engine.scheduler.num_running)
        self.metrics.following.set_function(lambda: self.admission.following)
        self.metrics.tenant_queue.policy = lambda: self.queue.policy

    # ------------------------------------------------------------------ models
    def served_models(self) -> list[str]:
        """What `/v1/models` lists: the model, then the LoRA adapters clients may name, then
        the embedding model."""
        lora = getattr(self.engine, "lora", None)
        adapters = lora.names() if lora is not None and lora.enabled else []
        return [self.model_name] + adapters + ([self.embedding_model_name] if self.embedding_model_name else [])

    def serves(self, model: str) -> bool:
        """`model` is the served model, an alias of it, a LoRA adapter this server has, or
        the embedding model (by any of its names)."""
        if model == self.model_name or model in self.model_aliases or model in self.embedding_aliases:
            return True
        lora = getattr(self.engine, "lora", None)
        return lora is not None and lora.enabled and lora.folder(model) is not None

    # ------------------------------------------------------------------ load
    def waiting(self) -> int:
        """Requests admitted and not yet running: on their way through the predictor, in
        the queue, released to the stepper but not yet taken (the intake buffer) or parked
        there for a LoRA slot (`max_loras`), and waiting inside the engine."""
        return (self._pred_recv.statistics().current_buffer_used + self._predicting
                + self._queue_recv.statistics().current_buffer_used
                + len(self.queue) + self._intake_recv.statistics().current_buffer_used
                + len(self.stepper.parked) + self.engine.scheduler.num_waiting)

    def estimated_wait_s(self) -> float:
        """The wait a request admitted now would have: the work ahead of it in typical
        requests, past the engine's free seats (none while requests wait in it for KV
        blocks, no more than the free blocks hold, and none under a policy that holds
        requests back), plus the request that must end to free its place once they are
        taken — at the rate requests leave the engine while it is saturated
        (`Stepper.drain`, measured; a request waiting in the engine counts its largest
        share then, an n > 1 one once), or, until that is measured, through the engine's
        seats (as many as run while requests wait for blocks, else `max_num_seqs`), each a
        typical request's time in the engine, no shorter than twice the time the requests
        running in it have spent there so far (`Stepper.median_age_s`). (The seats alone
        over-admitted 2-4x where the KV cache held fewer requests than `max_num_seqs`: an
        audit's first tokens came 15-34 s after admission under an 8 s limit.) A sequence
        waiting inside the engine counts as the share of a typical sequence's tokens it has
        left to write (at most one): the 56 choices of an `n=64, max_tokens=8` request
        waiting for slots are a few requests' work, not 56 (they had every other request
        refused, "estimated wait 109 s", for a request done in 4 s)."""
        sched = self.engine.scheduler
        seats = max(1, self.engine.config.scheduler.max_num_seqs)
        outside = self.waiting() - sched.num_waiting
        full = sched.waits_for_blocks or sched.num_running >= seats
        # (a policy that holds requests back while seats are free: none counted free)
        free = 0 if full or not getattr(self.queue.policy, "work_conserving", False) else seats - sched.num_running
        bm = self.engine.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        if free and sched.num_running and used > 0:
            # no more seats than the free KV blocks hold at the running requests' mean
            # footprint (a KV-full engine between the steps that say so counted 2 of 4
            # seats free: requests were let in to wait 12-17 s under an 8 s limit)
            free = min(free, bm.num_free_blocks * sched.num_running // used)

        def ahead(work: float) -> float:
            # the requests ahead take the free seats first; once they are all taken, each
            # one ahead, and the one before the request, must end for it to start (a burst
            # into an idle engine was costed at all of itself: refused with seats free)
            return work - free + 1 if work >= free else 0.0

        now = time.monotonic()
        rate = self.stepper.drain.per_s(now)
        if rate is not None:  # (in requests: the rate counts requests, an n > 1 one once)
            return ahead(outside + sched.waiting_work(self._service_time.tokens, self.engine.owner_of)) / rate
        if sched.waits_for_blocks:  # (not for the step's token budget: more run once prefilled)
            seats = max(1, min(seats, sched.num_running))
        waiting = ahead(outside + sched.waiting_work(self._service_time.tokens))
        if not waiting:
            return 0.0
        # no shorter than twice the time the requests running in the engine have been in it
        # (those that ended may have been shorter ones: `Stepper.median_age_s`; those waiting
        # in it are counted as waiting already). Twice, as a request that has run a while is
        # taken to run as long again — in a steady stream the median request is halfway
        # through (once: a burst of long requests into an idle engine was costed at half its
        # time until they ended). Near the end of requests that all started together it
        # over-estimates, up to twice (a review): it refuses for a while rather than admits
        # past the limit
        running = {self.engine.owner_of(sid) for sid in sched.running_ids()}
        service = max(self._service_time.expected(self.stepper.mean_decode_step_s),
                      2 * self.stepper.median_age_s(now, running))
        return waiting / seats * service

    def forget_tenants(self, tenant_ids: Collection[str]) -> None:
        """Tenants were deleted: their metric series and fairness counters go (kept, they
        grew every scrape and the fairness table with every tenant ever served). A request
        of one still running records its series again when it ends (the server's periodic
        sweep drops them then, `gateway.routes_admin.forget_deleted_tenants`). A counter
        stays while requests of its tenant wait or run: forgotten, it read as no service at
        all, and its backlog went ahead of every other tenant of its tier (a review)."""
        self.metrics.forget_tenants(tenant_ids)
        policy = self.queue.policy
        vtc = getattr(policy, "vtc", None)
        if vtc is None:
            return
        busy = {job.tenant for job in policy} | {st.tenant_id for st in self.stepper.active.values()}
        for tenant_id in tenant_ids:
            if tenant_id not in busy:
                vtc.forget(tenant_id)

    def count_rejection(self, tenant_id: str, status: int, reason: str) -> None:
        """A request the gateway refused before admission saw it (a body that does not
        decode, an unknown model, a parameter out of range): `lmgate_rejections_total`
        counts it beside admission's own refusals."""
        self.metrics.rejections.labels(tenant_id, str(status), reason).inc()

    def status(self) -> dict:
        degraded = []
        if self.store is not None and (not self.store.healthy or self.store.failed_within(REDIS_DEGRADED_S)):
            # (a Redis refusing writes answers the reads between: `healthy` alone flickered)
            degraded.append(f"redis: {self.store.last_error or 'unreachable'}")
        denied = getattr(self.store, "denied_within", lambda _: None)(REDIS_DEGRADED_S * 12) if self.store else None
        if denied is not None:  # (an ACL denying what lmgate needs: served as when Redis is down)
            degraded.append(f"redis_denied: {denied}")
        if (failing := self.stepper.failing()) is not None:
            degraded.append(f"engine: its latest step failed ({failing})")
        stats = self.engine.stats()
        return {
            "ready": self.ready,
            "degraded": degraded,
            "model": self.model_name,
            "queue_len": len(self.queue),
            "waiting": self.waiting(),  # (the queue's and every stage before the engine runs a request)
            "running": stats["running"],
            "engine_waiting": stats["waiting"],
            "kv_usage": stats["kv_usage"],
            "in_flight": len(self.stepper.active),
        }

    async def drain(self) -> None:
        """Abort every request still in the runtime and return once each has been accounted
        (quota settled or released, usage recorded). Shutdown runs this before it cancels
        the actors: a stream the server cut at the end of its grace period is then charged
        for what it generated and frees its `max_concurrent` slot, rather than holding it
        until the reservation's TTL and never reaching the usage counters."""
        while True:
            for st in [*self.stepper.active.values(), *self.stepper.parked]:
                st.cancelled = True  # queued requests reach the stepper as slots free, then this
            busy = (self.stepper.active or self.waiting() or self.admission.pending or self.accounting.pending
                    or self._done_recv.statistics().current_buffer_used or self._admit_recv.statistics().current_buffer_used)
            if not busy:
                return
            self.stepper.poke()
            await trio.sleep(0.02)

    # ---------------------------------------------------------------- entry
    async def submit(self, call: GenerateCall, sink: trio.MemorySendChannel | None = None) -> Accepted | Rejected:
        """Admit one request. On `Accepted`, consume `events` until `Finished`/`Failed`;
        close it (or call `cancel`) to abort. `sink`: send the events there instead (an
        unbounded channel several requests share; `Accepted.events` is then None; see
        `actors.admission.Admission.admit`)."""
        if call.arrival_time == 0.0:
            import msgspec

            call = msgspec.structs.replace(call, arrival_time=time.time())
        reply_send, reply_recv = trio.open_memory_channel[Accepted | Rejected](1)
        try:
            self._admit_send.send_nowait(AdmitMsg(call, reply_send, sink))
        except trio.WouldBlock:
            self.metrics.rejections.labels(call.tenant.tenant_id, "503", "overloaded").inc()
            return Rejected(call.request_id, 503, "overloaded", "server overloaded: admission backlog full",
                            retry_after=1.0)
        # closed with `close()`, never `async with`: its `aclose` is a checkpoint, where a
        # cancel arriving just after the answer did would drop an Accepted on the floor with
        # its request running (a client gone ~2 ms after sending: generated to the end)
        try:
            reply = await reply_recv.receive()
        except trio.Cancelled:
            # Admission may have answered after the cancel was delivered: its Accepted
            # sits in the buffer, and closing the channel would drop it with the request
            # still running (and billed in full). Abort it here; an answer that comes
            # after the close finds the channel broken and is aborted by admission.
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                late = reply_recv.receive_nowait()
                if isinstance(late, Accepted):
                    late.cancel()
            raise
        finally:
            reply_recv.close()
        return reply

    @property
    def embedding_dim(self) -> int | None:
        """The embedding model's vector size (None: no embedding model loaded)."""
        return self.embeddings.embedder.dim if self.embeddings is not None else None

    @property
    def embedding_max_tokens(self) -> int | None:
        """The most tokens one input of the embedding model may have."""
        return self.embeddings.embedder.max_length if self.embeddings is not None else None

    @property
    def embedding_min_tokens(self) -> int | None:
        """The fewest tokens a cut may leave an input: its special tokens and one of text."""
        return self.embeddings.embedder.min_length if self.embeddings is not None else None

    async def embed(self, call: EmbedCall) -> Embedded | Rejected:
        """A `/v1/embeddings` request's vectors (`actors.embeddings.EmbeddingService`)."""
        if self.embeddings is None or call.model not in self.embedding_aliases:
            return Rejected(call.request_id, 400, "invalid_value", f"model {call.model[:100]!r} does not serve "
                            f"embeddings" + (f"; {self.embedding_model_name!r} does" if self.embedding_model_name
                                             else ": this server has no embedding model"), "model")
        return await self.embeddings.embed(call)

    # ---------------------------------------------------------------- actors
    async def _admission_actor(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        limiter = trio.CapacityLimiter(self.config.admission_concurrency)

        async def one(msg: AdmitMsg) -> None:
            async with limiter:
                try:
                    result = await self.admission.admit(msg.call, msg.sink)
                except Exception:  # noqa: BLE001 — a bug in admission must answer, not hang the caller
                    log.exception("admission failed")
                    result = Rejected(msg.call.request_id, 500, "internal_error",
                                      "admission failed on an internal error (the server log has it)")
                with contextlib.suppress(trio.BrokenResourceError, trio.WouldBlock):
                    msg.reply.send_nowait(result)
                    return
                # the caller went away after admission said yes: abort what it started
                if isinstance(result, Accepted):
                    result.cancel()

        async with trio.open_nursery() as nursery:
            self.admission.background = nursery  # (followers of identical requests wait there: actors.flights)
            task_status.started()
            async for msg in self._admit_recv:
                nursery.start_soon(one, msg)

    async def _predictor_actor(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        service = self.length_service

        async def feedback() -> None:
            async for fb in self._fb_recv:
                try:
                    if fb.finish_reason == "stop":  # the running estimate learns uncensored lengths only
                        self.predictor.observe(fb.tenant_id, fb.app, fb.tokens)
                    if service is not None and fb.features is not None:
                        # refits run in a worker thread, started in this nursery (a refit
                        # that fails is logged there: it must not take the actor down)
                        await service.observe(fb.features, fb.tokens, nursery, fb.finish_reason)
                except Exception:  # noqa: BLE001 — feedback is advice: a bad one must not cost requests
                    self._log_feedback_failure()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feedback)
            task_status.started()
            async for st in self._pred_recv:
                batch = [st]  # everything already waiting is embedded in one call (a burst)
                while len(batch) < PREDICT_BATCH:
                    try:
                        batch.append(self._pred_recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                self._predicting = len(batch)  # still waiting, for admission's load check
                self._prediction_batch = list(batch)
                if service is not None:
                    try:
                        for one, (pred, feats) in zip(batch, await service.predict_many(batch), strict=True):
                            one.prediction, one.length_features = pred, feats
                    except Exception:  # noqa: BLE001 — a prediction is advice: never lose the request
                        log.exception("length prediction failed; using the running estimate")
                for one in batch:
                    if one.prediction is None:
                        one.prediction = self.predictor.predict(one.tenant_id, one.app, one.params.max_tokens)
                    if log.isEnabledFor(logging.DEBUG):  # (what an operator reads a prediction from)
                        log.debug("request %s: predicted %.0f ± %.0f output tokens (%s; max_tokens %d)",
                                  one.request_id, one.prediction.tokens, one.prediction.std,
                                  one.prediction.source, one.params.max_tokens)
                    await self._queue_send.send(one)
                    self._predicting -= 1
                    batch_left = self._prediction_batch
                    if batch_left and batch_left[0] is one:
                        batch_left.pop(0)

    def _fail_predicting(self, message: str) -> None:
        """The predictor actor crashed: end the requests it had taken and not yet queued
        with a 503 (an audit: a refit that raised cancelled the actor while it predicted a
        batch, and those requests hung, counted nowhere, never settled)."""
        batch, self._prediction_batch, self._predicting = self._prediction_batch, [], 0
        for st in batch:
            self._end_failed(st, "predictor_error",
                             "the server's length predictor failed while it handled this request; retry", "error")

    def _log_feedback_failure(self) -> None:
        """A finished request's length feedback failed: logged at most once a minute."""
        now = time.monotonic()
        if now - self._feedback_failed_logged >= 60.0:
            self._feedback_failed_logged = now
            log.exception("length feedback failed (logged at most once a minute)")

    async def _load_embeddings(self) -> None:
        """The /v1/embeddings model, loaded on the compute thread (torch's one thread)."""
        cfg = self.config.embeddings
        if cfg is None or self.embeddings is not None:
            return
        # threads=0: the torch thread count is process-wide; the engine owns it
        embedder = await self.compute.run(lambda: SentenceEmbedder(cfg.path, threads=0))
        self.embeddings = EmbeddingService(embedder, cfg, admission=self.admission, accounting=self._done_send,
                                           metrics=self.metrics, compute=self.compute, compute_lock=self.compute_lock)
        log.info("embedding model %s loaded (%d dimensions, %d tokens at most)", self.embedding_model_name,
                 embedder.dim, embedder.max_length)

    async def _load_length_predictor(self) -> None:
        """Magnus predictor: load the embedder (worker thread) and any model saved in Redis."""
        service = self.length_service
        if service is None:
            return
        if service.embedder is None and self.embeddings is not None and self.embeddings.config.model == "bundled":
            service.embedder = self.embeddings.embedder  # /v1/embeddings serves the same model: one copy
        if service.embedder is None:  # one given with the service is kept
            # threads=0: the torch thread count is process-wide; the engine owns it
            service.embedder = await self.compute.run(lambda: SentenceEmbedder(threads=0))
        seed_path = self.config.predictor_seed
        seed = Path(seed_path).read_bytes() if seed_path else None
        how = await service.load_or_seed(seed)
        if how == "restored":
            log.info("length predictor restored from Redis (%d samples)", service.predictor.num_samples)
        elif how == "seeded":
            log.info("length predictor seeded from %s (%d samples); Redis held none", seed_path,
                     service.predictor.num_samples)

    def end_streams(self, message: str = "server shutting down") -> int:
        """Shutdown, at the end of the grace period: every request still waiting or running
        gets a last `Failed` (503 `shutting_down`) on its stream — an SSE client then sees an
        error event and ``[DONE]``, a WebSocket client an error frame, rather than a cut
        connection — and is aborted; accounting charges what it generated. Embedding (and
        score, rerank) requests stop after their current batch and answer the same 503
        (`EmbeddingService.end_all`). Returns how many."""
        ended = self._fail_waiting(message, code="shutting_down", outcome="cancelled")
        ended += self.admission.end_following(message)
        for st in [*self.stepper.active.values(), *self.stepper.parked]:
            if not st.cancelled:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                    st.events.send_nowait(Failed(st.request_id, 503, "shutting_down", message))
                st.cancelled = True  # no token after the Failed; the stepper aborts it between steps
                ended += 1
        self.stepper.poke()
        if self.embeddings is not None:
            ended += self.embeddings.end_all(message)
        return ended

    def shed_for_shutdown(self, grace_s: float) -> int:
        """At the start of a shutdown: when the queue would not clear within the grace
        period (`estimated_wait_s`), every request still in it gets its 503
        `shutting_down` at once, so its client retries on another server now rather than at
        the grace period's end; a queue that clears in time is left to run. Returns how many."""
        if self.estimated_wait_s() <= grace_s:
            return 0
        self.admission.stopping = True  # (followers of what is shed must not start in its place)
        return self._fail_waiting("server shutting down: it would not start before the server stops",
                                  code="shutting_down", outcome="cancelled")

    def _fail_waiting(self, message: str, *, code: str = "queue_error", outcome: str = "error") -> int:
        """End every request the queue holds with a 503 `code` on its stream; returns how many."""
        failed = 0
        for st in self.queue.drain():
            self._end_failed(st, code, message, outcome)
            failed += 1
        return failed

    def _end_failed(self, st: RequestState, code: str, message: str, outcome: str) -> None:
        """End a request not yet running with a 503 `code` on its stream, and account it."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            st.events.send_nowait(Failed(st.request_id, 503, code, message))
        st.cancelled = True
        st.events.close()
        self._done_send.send_nowait(Completed(st, outcome))

    def _holding_reservations(self) -> list[RequestState]:
        """Requests that hold a quota reservation and have not ended: waiting in the queue,
        running in the engine, or waiting for an identical request's answer."""
        live = ([job.payload for job in self.queue.policy] + list(self.stepper.active.values()) + self.stepper.parked
                + self.admission.followers())
        return [st for st in live if st.reserved and st.quota_tenant is not None and not st.cancelled]

    def _embedding_holds(self) -> dict[str, Any]:
        """Request id -> quota tenant of the embedding, score and rerank requests holding a
        reservation while they compute."""
        return dict(self.embeddings.holding) if self.embeddings is not None else {}

    async def _keep_reservations(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Every third of the quota reservations' TTL, extend those of the requests still
        waiting or running (`cache.quotas.QuotaManager.extend`): a request may outlive the
        TTL (a long answer on a busy CPU, a long wait in the queue), and its expired
        concurrency slot would let its tenant start one request too many. Redis down: the
        next round tries again (a reservation lost meanwhile is settled all the same).

        Each running request's usage so far goes with it (`Progress`): should this process
        die, its reservations lapse charged that much, so what it streamed is billed up to
        the last round. A reservation found lapsed (this process was cut off from Redis,
        or stalled, for a TTL) is logged: its tokens went back to the tenant's limits,
        which others may have spent meanwhile, and the request is charged when it ends."""
        task_status.started()
        ttl = getattr(self.quotas, "reservation_ttl_s", None)
        if ttl is None:
            await trio.sleep_forever()
        while True:
            await trio.sleep(ttl / 3)
            by_tenant: dict[str, tuple[Any, list[str], dict[str, Progress]]] = {}
            for st in self._holding_reservations():
                _, rids, progress = by_tenant.setdefault(st.quota_tenant.id, (st.quota_tenant, [], {}))
                rids.append(st.request_id)
                if st.request_id in self.stepper.active:
                    progress[st.request_id] = Progress(st.prompt_tokens, st.completion_tokens,
                                                       st.adapter or self.model_name)
            for rid, tenant in self._embedding_holds().items():  # (billed whole when they end: no progress)
                by_tenant.setdefault(tenant.id, (tenant, [], {}))[1].append(rid)
            for tenant, rids, progress in by_tenant.values():
                try:
                    live = await self.quotas.extend(tenant, rids, progress=progress)
                except CacheUnavailable:
                    self.metrics.redis_errors.labels("extend").inc()
                    continue
                # (not those that ended meanwhile: settled, they are no longer live)
                holding = {st.request_id for st in self._holding_reservations()} | set(self._embedding_holds())
                lapsed = sum(rid in holding for rid in rids) - live
                if lapsed > 0:
                    log.warning("%d of tenant %r's %d quota reservations had lapsed (this server was cut off "
                                "from Redis, or stalled, for over %.0f s): their tokens went back to its limits, "
                                "and those requests are charged their real usage when they end",
                                lapsed, tenant.id, len(rids), ttl)

    async def _supervise(
        self,
        name: str,
        run: Callable[..., Awaitable[None]],
        on_crash: Callable[[str], None] | None = None,
        *,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run an actor; when it crashes, clean up what it owned and start it again."""
        started = False
        while True:
            try:
                if not started:
                    await run(task_status=task_status)
                else:
                    await run()
                return  # channel closed: orderly shutdown
            except Exception as e:  # noqa: BLE001 — supervision is the point
                log.exception("actor %s crashed; restarting", name)
                self.metrics.actor_restarts.labels(name).inc()
                if on_crash is not None:
                    on_crash(f"{name} crashed: {type(e).__name__}: {e}")
                await trio.sleep(0.05)
            finally:
                started = True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start every actor; `task_status.started()` once they all are."""
        if isinstance(self.compute, ComputeThread):
            # torch run on this (trio) thread before — a test, a benchmark's calibration — left
            # it an OpenMP pool of its own: free it, so the compute thread's is the only one
            release_openmp_pool()
        try:
            await self._load_embeddings()
            await self._load_length_predictor()
            async with trio.open_nursery() as nursery:
                await nursery.start(self._supervise, "accounting", self.accounting.run)
                await nursery.start(self._supervise, "stepper", self.stepper.run, self.stepper.fail_all)
                await nursery.start(self._supervise, "queue", self.queue.run, self._fail_waiting)
                await nursery.start(self._supervise, "predictor", self._predictor_actor, self._fail_predicting)
                await nursery.start(self._supervise, "admission", self._admission_actor)
                await nursery.start(self._supervise, "reservations", self._keep_reservations)
                if self.length_service is not None and self.length_service.store is not None:
                    # replicas of the Redis learn each other's observations (PredictorService.share)
                    await nursery.start(self._supervise, "predictor-share", self.length_service.share)
                if hasattr(self.store, "watch"):  # a hung Redis is found back by this, not by requests
                    await nursery.start(self._supervise, "redis-watch", self.store.watch)
                self.ready = True
                task_status.started()
        finally:
            # every call on it has returned (they are shielded): its OpenMP pool goes with it
            self.compute.close()


SHUTDOWN_DRAIN_S = 10.0  # longest a shutdown waits for in-flight requests to be aborted and accounted


@contextlib.asynccontextmanager
async def open_runtime(
    config: RuntimeConfig,
    *,
    engine: Engine | None = None,
    quotas: Any = None,
    response_cache: Any = None,
    prompt_cache: Any = None,
    store: Any = None,
) -> AsyncIterator[Runtime]:
    """Build the engine (in a worker thread: loading takes seconds) and run the actors.

    Leaving the block aborts what is still in flight and waits (at most
    `SHUTDOWN_DRAIN_S`) until accounting has settled it, then cancels every actor.
    """
    compute = ComputeThread() if config.step_in_thread else InlineCompute()
    if engine is None:
        # built on the thread that will step it (actors.compute); with steps on the trio
        # thread, in a passing worker thread rather than blocking the loop for seconds
        build = compute.run if isinstance(compute, ComputeThread) else trio.to_thread.run_sync
        engine = await build(Engine, config.engine)
    rt = Runtime(config, engine, quotas=quotas, response_cache=response_cache,
                 prompt_cache=prompt_cache, store=store, compute=compute)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        try:
            yield rt
        finally:
            rt.ready = False
            # shielded: this also runs when the caller is being cancelled (Ctrl-C, a test's end)
            with trio.CancelScope(deadline=trio.current_time() + SHUTDOWN_DRAIN_S, shield=True) as drain:
                await rt.drain()
            if drain.cancelled_caught:
                log.warning("shutdown: %d requests were not accounted within %.0f s (is Redis down?)",
                            rt.accounting.pending + len(rt.stepper.active), SHUTDOWN_DRAIN_S)
            nursery.cancel_scope.cancel()
