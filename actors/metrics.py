"""Prometheus metrics recorded by the actors (names follow vLLM's where one exists).

One `Metrics` object per runtime, each with its own registry, so tests and
several runtimes in one process never collide on global state.
"""

from __future__ import annotations

import contextlib
import gzip
from collections import Counter as Tally
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase

# up to ~10 minutes: an overloaded server's queue time and end-to-end latency (and a long
# non-streamed answer's HTTP time) run to minutes, and a quantile past the last bucket reads as it
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0, 320.0, 640.0)
# per token and per step: 1 ms to 20 s (a 2-core CPU under load takes ~1 s a step, and a
# quantile past the last bucket reads as that bucket: p99 must not stop at 2.5 s)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                 10.0, 20.0)


class TenantQueueCollector:
    """Per tenant, read from the batching policy at scrape time (on the event loop, where
    the policy lives): its requests waiting in the policy's queue, and the service its
    fairness counter holds (S-LoRA's virtual tokens: weighted prompt and output tokens,
    lifted to the least-served waiting tenant's when it comes back; for the priority, vtc
    and hybrid policies). A tenant held back shows as requests queued while others'
    service grows. `policy`: set by the runtime (None: no series)."""

    _labelnames = ("tenant",)

    def __init__(self) -> None:
        self.policy: Callable[[], Any] | None = None
        self._frozen: list[GaugeMetricFamily] | None = None  # what `collect` gives while frozen
        self._freezes = 0

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Read the policy now (on the event loop) and have `collect` give what was read
        until the block ends: for a scrape formatted in a worker thread, where reading the
        policy the loop mutates is not safe. (Nested or overlapping blocks keep the latest
        reading until the last ends.)"""
        self._frozen = list(self._live())
        self._freezes += 1
        try:
            yield
        finally:
            self._freezes -= 1
            if not self._freezes:
                self._frozen = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        frozen = self._frozen
        return iter(frozen) if frozen is not None else self._live()

    def _live(self) -> Iterator[GaugeMetricFamily]:
        queued, service = self._families()
        policy = self.policy() if self.policy is not None else None
        if policy is not None:
            for tenant, n in sorted(Tally(job.tenant for job in policy).items()):
                queued.add_metric([tenant], n)
            vtc = getattr(policy, "vtc", None)
            for tenant, value in sorted(getattr(vtc, "counters", {}).items()):
                service.add_metric([tenant], value)
        yield queued
        yield service

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("lmgate_tenant_requests_queued", "Requests of the tenant waiting in the "
                                  "batching policy's queue", labels=["tenant"]),
                GaugeMetricFamily("lmgate_tenant_virtual_service", "The tenant's service in the fairness "
                                  "counter (weighted tokens; priority, vtc and hybrid policies)", labels=["tenant"]))


UNAUTHENTICATED = "-"  # the tenant label of requests answered before a key was read (no tenant is "-")


def label_values(metrics: Iterable[Any], label: str) -> set[str]:
    """The values `label` takes in the series of those of `metrics` that have it."""
    values: set[str] = set()
    for m in metrics:
        if isinstance(m, MetricWrapperBase) and label in m._labelnames:
            at = m._labelnames.index(label)
            values.update(key[at] for key in list(m._metrics))
    return values


def forget_label(metrics: Iterable[Any], label: str, values: Collection[str]) -> int:
    """Drop every series whose `label` is one of `values` from those of `metrics` that have
    the label; how many series went. One pass over each metric's series, whatever the
    number of values (one `remove_by_labels` a value scanned them all each time: a sweep of
    1,000 deleted tenants held the event loop 13 s). (A deleted tenant's ~100 series
    stayed until the process ended: scrapes grew with every tenant ever served.)"""
    dropped = 0
    for m in metrics:
        if isinstance(m, MetricWrapperBase) and label in m._labelnames:
            at = m._labelnames.index(label)
            for key in [k for k in list(m._metrics) if k[at] in values]:
                m.remove(*key)
                dropped += 1
    return dropped


# predicted / true output length: under 1 the prediction was short (its KV reservation grew)
PREDICTION_RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.8, 1.0, 1.25, 2.0, 4.0, 10.0)
OTHER_TENANTS = "*"  # the tenant label of latency histograms past `Metrics.tenant_histograms` (no tenant is "*")


class Metrics:
    def forget_tenants(self, tenant_ids: Collection[str]) -> int:
        """Drop deleted tenants' series (`forget_label`); their places among the tenants
        with latency histograms of their own go free."""
        self._histogram_tenants.difference_update(tenant_ids)
        return forget_label(vars(self).values(), "tenant", set(tenant_ids))

    def tenants(self) -> set[str]:
        """The tenants that have series."""
        return label_values(vars(self).values(), "tenant")

    def latency_tenant(self, tenant_id: str) -> str:
        """The tenant label of a latency histogram (TTFT, TPOT, E2E, queue time): the
        tenant's own for the first `tenant_histograms` tenants seen (and not forgotten),
        else `OTHER_TENANTS`. Each has ~23 series a histogram: 1,000 tenants were 7 MB and
        ~1 s of CPU a scrape, which held the GIL from the engine's thread (token gaps of
        1-2 s at 2,000 tenants, an audit), unbounded as tenants came."""
        if tenant_id in self._histogram_tenants:
            return tenant_id
        if len(self._histogram_tenants) < self.tenant_histograms:
            self._histogram_tenants.add(tenant_id)
            return tenant_id
        return OTHER_TENANTS

    def render(self, compress: bool = False) -> bytes:
        """The registry in Prometheus' text format (gzipped: `compress`). Thread-safe within
        `tenant_queue.frozen()`, entered on the event loop: the gateway formats a scrape in a
        worker thread, as it takes ~1 s per 1,000 tenants that have sent requests (~100
        series each: their latency histograms), which on the event loop stalled every
        stream for as long (measured by an audit)."""
        body = generate_latest(self.registry)
        return gzip.compress(body, compresslevel=1) if compress else body

    def __init__(self, registry: CollectorRegistry | None = None, *, tenant_histograms: int = 200):
        if tenant_histograms < 0:
            raise ValueError("tenant_histograms must be >= 0")
        self.tenant_histograms = tenant_histograms
        self._histogram_tenants: set[str] = set()
        # no `<counter>_created` series (the library's switch is process-wide): Prometheus
        # does not read them from the text format, and at 2,000 tenants they were ~40% of a
        # scrape's lines (1.17 → 0.69 MB, 0.11 → 0.07 s of the GIL to format)
        disable_created_metrics()
        r = self.registry = registry or CollectorRegistry()
        self.tenant_queue = TenantQueueCollector()
        r.register(self.tenant_queue)
        self.requests = Counter(
            "lmgate_requests", "Finished requests by tenant and outcome", ["tenant", "outcome"], registry=r
        )
        self.rejections = Counter(
            "lmgate_rejections", "Requests refused, by admission or before it by the gateway (a bad body, an unknown model)", ["tenant", "status", "reason"], registry=r
        )
        self.ttft = Histogram(
            "lmgate_time_to_first_token_seconds", "Time to first token (streamed decoding; not beam search)",
            ["tenant"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "lmgate_time_per_output_token_seconds",
            "Mean time per output token after the first (streamed decoding; not beam search)",
            ["tenant"], buckets=_TPOT_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "lmgate_e2e_request_latency_seconds", "End-to-end request latency", ["tenant"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "lmgate_request_queue_time_seconds", "Time from admission to the engine", ["tenant"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "lmgate_prompt_tokens", "Prompt tokens billed: of requests the engine ran (to the end or not) or the "
            "response cache answered, and of embeddings", ["tenant"], registry=r)
        self.generation_tokens = Counter(
            "lmgate_generation_tokens", "Tokens the engine generated (not those of answers from the response cache)",
            ["tenant"], registry=r
        )
        # read at scrape time (`Runtime` sets its function): admitted requests on their way
        # through the predictor, in the queue, in the stepper's intake, and sequences waiting
        # in the engine (preempted ones included) — what admission's overload check counts
        self.waiting = Gauge("lmgate_num_requests_waiting", "Requests admitted and not yet running: in the "
                             "predictor, the queue, the stepper's intake, and sequences waiting in the engine "
                             "(preempted ones included)", registry=r)
        self.running = Gauge("lmgate_num_requests_running", "Sequences in the engine's running set (each choice "
                             "of an n>1 request and each beam counts)", registry=r)
        self.kv_usage = Gauge("lmgate_kv_cache_usage_ratio", "Share of KV blocks in use", registry=r)
        self.batch_size = Histogram(
            "lmgate_step_batch_size", "Sequences per engine step (prefill chunks and decodes)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r,
        )
        self.step_time = Histogram(
            "lmgate_step_seconds", "Engine step duration", buckets=_TPOT_BUCKETS, registry=r
        )
        self.cache_lookups = Counter(
            "lmgate_response_cache_lookups",
            "Response cache lookups of deterministic requests: hit, miss, or bypass (Cache-Control: no-cache)",
            ["result"], registry=r
        )
        self.cache_stores = Counter(
            "lmgate_response_cache_stores", "Answers of deterministic requests offered to the response cache: stored, "
            "too_large (past its entry size: not stored), redis_full (Redis past 90% of its maxmemory: not "
            "stored), or failed (Redis did not take it)", ["result"], registry=r
        )
        self.collapsed = Counter(
            "lmgate_collapsed_requests", "Requests that missed the response cache while an identical one was being "
            "generated and waited for its answer (actors.flights): answered (given it, as a cache hit), or generated "
            "(its flight ended without one: generated its own)", ["result"], registry=r
        )
        self.following = Gauge(
            "lmgate_collapsed_requests_waiting", "Requests waiting for an identical one's answer (actors.flights)",
            registry=r,
        )
        self.prompt_cache_lookups = Counter(
            "lmgate_prompt_cache_lookups", "Prompt cache lookups of chat requests: hit, miss, or error (Redis did not "
            "answer: rendered anew)", ["result"], registry=r
        )
        self.actor_restarts = Counter(
            "lmgate_actor_restarts", "Actors restarted after a crash", ["actor"], registry=r
        )
        self.engine_errors = Counter("lmgate_engine_errors", "Engine steps that raised", registry=r)
        self.preemptions = Counter(  # vLLM's vllm:num_preemptions
            "lmgate_num_preemptions", "Running requests preempted for KV blocks (their context is recomputed)",
            registry=r,
        )
        self.step_tokens = Counter(  # what a preemption costs shows as prefill beyond the prompts
            "lmgate_step_tokens", "Tokens engine steps fed to the model: kind=prefill (prompt chunks past "
            "prefix-cache hits, and the recompute of preempted requests) or kind=decode", ["kind"], registry=r,
        )
        self.kv_reserved = Gauge(
            "lmgate_kv_reserved_blocks", "KV blocks the batching policy has reserved for released requests "
            "(by predicted length; 0 for policies that do not reserve; may exceed the cache: a reservation "
            "grows with a request that outgrows its prediction, preempted or not)", registry=r,
        )
        self.kv_grown = Counter(
            "lmgate_kv_reservations_grown", "KV reservations grown because their request outgrew its prediction",
            registry=r,
        )
        self.predictor_error = Histogram(  # (the "within ±25%": the 0.8-1.25 buckets)
            "lmgate_predictor_error_ratio", "A request's predicted output length over its true one ((predicted + 1) "
            "/ (tokens + 1)), for requests that stopped on their own, by what answered the prediction (source: "
            "model, app-quantile, tenant-quantile, global-quantile, prior; or the running estimate's tenant/app, "
            "tenant, global)", ["source"], buckets=PREDICTION_RATIO_BUCKETS, registry=r,
        )
        self.predictor_compute = Counter(  # set beside lmgate_step_seconds' sum: what Magnus costs the engine
            "lmgate_predictor_compute_seconds", "Seconds the Magnus length predictor ran torch/numpy work on the "
            "engine's compute thread (CPU engine: the steps wait meanwhile): phase=embed (instruction "
            "embeddings) or phase=refit (regressor refits)", ["phase"], registry=r,
        )
        self.embedding_compute = Counter(  # beside lmgate_step_seconds' sum: what /v1/embeddings costs the engine
            "lmgate_embedding_compute_seconds", "Seconds the embedding model ran for /v1/embeddings, /v1/score and "
            "/v1/rerank on the engine's "
            "compute thread (CPU engine: the steps wait meanwhile)", registry=r,
        )
        self.embedding_running = Gauge(
            "lmgate_embedding_requests_running", "/v1/embeddings, /v1/score and /v1/rerank requests tokenizing, "
            "waiting or encoding", registry=r,
        )
        self.embedding_inputs = Counter(
            "lmgate_embedding_inputs", "Inputs embedded for /v1/embeddings, and distinct texts for /v1/score and "
            "/v1/rerank (their tokens count in lmgate_prompt_tokens)", ["tenant"], registry=r,
        )
        self.structured = Counter(
            "lmgate_structured_requests", "Requests admitted with an output constraint (gpu.structured): kind=json, "
            "json_object, regex, choice or grammar (tool calls are json)", ["kind"], registry=r,
        )
        self.grammar_compile = Histogram(
            "lmgate_grammar_compile_seconds", "Compiling an output constraint not in the compiled-grammar cache (with "
            "the wait for the one compile slot)",
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0), registry=r,
        )
        self.lora_loads = Counter(
            "lmgate_lora_adapter_loads", "LoRA adapters read from disk: kind=load (first use, or again after "
            "an eviction) or kind=reload (its files changed)", ["kind"], registry=r,
        )
        self.lora_evictions = Counter(
            "lmgate_lora_adapter_evictions", "LoRA adapters dropped from the LRU of --max-loras", registry=r,
        )
        self.lora_loaded = Gauge("lmgate_lora_adapters_loaded", "LoRA adapters in the LRU", registry=r)
        self.settle_backlog = Gauge(
            "lmgate_quota_settles_pending",
            "Quota settles/releases waiting for Redis to come back (usage not yet recorded)", registry=r,
        )
        self.redis_errors = Counter(
            "lmgate_redis_errors", "Redis calls of the request path that failed: op=reserve, settle, release, "
            "extend, response_cache_get, response_cache_put, prompt_cache_get, prompt_cache_put, count_refused or "
            "response_store (the Responses API's stored responses)",
            ["op"], registry=r
        )
