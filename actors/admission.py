"""Admission: validate, tokenize (prompt cache), refuse early, reserve quota, serve cache hits.

Runs once per request, concurrently (the admission actor starts one task per
`AdmitMsg`), and answers `Accepted` or `Rejected` on the message's reply
channel. Order of checks, cheapest and most final first::

    model known?  → 404            prompt valid / fits the context?  → 400
    overloaded?   → 503 + Retry-After (before touching Redis: shed load cheaply)
    quota         → 429 + Retry-After (atomic reserve in Redis)
    response cache hit → replay it (no engine)
    an identical request in flight → wait for its answer (actors.flights)
                                                     else → predictor → queue

Redis outages: prompt and response caches are bypassed; quota behaviour is
`AdmissionConfig.quota_fail_open` (default True: serve without quota while
Redis is down, counted in `lmgate_redis_errors`; False: answer 503).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from actors.flights import Flight, Flights
from actors.messages import (
    Accepted,
    Failed,
    Finished,
    GenerateCall,
    Rejected,
    TenantContext,
    TokenDelta,
    TopLogprob,
    Usage,
)
from actors.metrics import Metrics
from actors.state import RequestState
from actors.stepper import Completed
from cache.quotas import Denied, DuplicateRequest, Quota, RateLimits
from cache.response_cache import CachedCompletion, scope_for
from cache.store import CacheUnavailable
from cache.tenants import Tenant
from gpu.sampling import SamplingParams, SamplingParamsError
from gpu.structured import GuidedDecodingError
from gpu.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# prompts of at least this many characters render and tokenize in a worker thread (about
# 10 ms of tokenizing: below it, the thread's hand-off costs more than the stall it spares)
OFF_LOOP_CHARS = 32_768
# what a chat message costs to render beyond its content (the template's role markers and
# the loop over it): 30,000 one-character messages rendered ~870,000 characters, 73-143 ms
# on the event loop, counted as 30,000 characters (an audit: 8 at once stalled streams 0.9 s)
MESSAGE_CHARS = 32
# an answer's prompt logprobs at most (each choice repeats the prompt's: `echo` with
# `logprobs`, `prompt_logprobs`): 64 choices of a 2,000-token prompt with 20 alternatives
# were a 257 MB answer from a 12 KB request, 1.4 GB of the server's memory (an audit)
MAX_PROMPT_LOGPROB_ENTRIES = 1_000_000
# and its output logprobs at most (choices × tokens × (alternatives + 1)): 64 choices of
# 4,000 tokens with 20 alternatives each were 5.4M entries, held by the server until the
# answer was sent (and by the response cache's record of a deterministic request)
MAX_LOGPROB_ENTRIES = 1_000_000
BROKEN_ADAPTER_LOG_S = 60.0  # a broken adapter's fault is logged at most this often


def arrival_of(call: GenerateCall) -> float:
    """When `call` reached the server, on the monotonic clock: the gateway's wall-clock
    `arrival_time` carried over, so that time to first token and end-to-end latency include
    admission (tokenizing, the prompt-cache lookup, compiling a constraint, the quota), as a
    client sees them. Now when the call has no arrival time."""
    now = time.monotonic()
    if not call.arrival_time:
        return now
    return now - min(max(0.0, time.time() - call.arrival_time), 3600.0)


@dataclass(frozen=True)
class AdmissionConfig:
    model_name: str
    max_model_len: int
    vocab_size: int
    model_aliases: frozenset[str] = frozenset()
    kv_capacity_tokens: int = 0  # tokens the whole KV cache holds (0 = unchecked)
    # what computes the answers, beyond the served name (the response cache's model key: replicas
    # sharing a Redis in another dtype or quantization, or other weights under the same name,
    # must not answer each other's requests): dtype/quantization/`gpu.loader.weights_fingerprint`
    engine_variant: str = ""
    kv_block_size: int = 16  # its page size: a beam search's beams each get whole pages
    max_sequences: int = 0  # sequences the engine runs at once (0 = unchecked): a beam search's cap
    max_waiting: int = 1024  # queue depth beyond which → 503
    max_estimated_wait_s: float = 60.0  # estimated queueing delay beyond which → 503
    quota_fail_open: bool = True
    embedding_models: frozenset[str] = frozenset()  # served for /v1/embeddings only: a 400 here
    # an identical deterministic request in flight: wait for its answer, do not generate it again
    # (actors.flights)
    collapse_identical: bool = True


@dataclass(frozen=True)
class AdmitMsg:
    call: GenerateCall
    reply: trio.MemorySendChannel[Accepted | Rejected]
    sink: trio.MemorySendChannel | None = None  # see `Admission.admit`


@dataclass(frozen=True)
class QuotaHold:
    """What `Admission.reserve_quota` did: `tenant`, whose usage is settled when the
    request ends (None: no quota applies); `reserved`, whether Redis holds a reservation
    (False while Redis is down and quotas fail open); the per-minute limits after it;
    `max_new_tokens`, what the reservation holds per sequence when the quota lowered a
    defaulted max_tokens (None: as asked)."""

    tenant: Tenant | None
    reserved: bool
    rate_limits: RateLimits | None
    max_new_tokens: int | None = None


class TenantTurns:
    """Long texts tokenized in a worker thread, one at a time (a `trio.CapacityLimiter(1)`),
    with at most one call per tenant in its queue (FIFO): a tenant's next call waits for its
    own previous one, so another tenant's call waits behind at most one of each other
    tenant's, however many that tenant sends. (With the shared FIFO alone, one tenant's 8
    clients of 900 KB prompts kept another's 40 KB /tokenize waiting 7-9 s; neither that
    route nor a prompt refused as too long costs any quota.)"""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}  # tenant -> (its lock, its calls in)

    def waiting(self) -> int:
        """Tenants with a call in or waiting (their locks are dropped with their last call)."""
        return len(self._locks)

    async def run(self, tenant_id: str, fn: Any, limiter: trio.CapacityLimiter) -> Any:
        """`fn()` in a worker thread under `limiter`, after the tenant's previous calls."""
        lock, calls = self._locks.get(tenant_id, (None, 0))
        lock = lock or trio.Lock()
        self._locks[tenant_id] = (lock, calls + 1)
        try:
            async with lock:
                return await trio.to_thread.run_sync(fn, limiter=limiter)
        finally:
            lock, calls = self._locks[tenant_id]
            if calls == 1:
                del self._locks[tenant_id]
            else:
                self._locks[tenant_id] = (lock, calls - 1)


class _Refuse(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 retry_after: float | None = None, rate_limits: RateLimits | None = None) -> None:
        super().__init__(message)
        self.rejected = (status, code, message, param, retry_after)
        self.rate_limits = rate_limits  # a quota refusal's: where the tenant stands (x-ratelimit headers)


def context_message(limit: int, what: str, reduce: str, held_by: str | None = None) -> str:
    """A `context_length_exceeded` 400's message, in OpenAI's (and vLLM's) words, which
    clients match on (litellm's ContextWindowExceededError, and so its context-window
    fallbacks, reads the message alone). `held_by`: the limit is what this server's KV cache
    holds for that (one request; each beam of a beam search), below the model's window."""
    said = (f"This model's maximum context length is {limit} tokens. However, {what}. "
            f"Please reduce the length of the {reduce}.")
    return said if held_by is None else f"{said} (On this server, {limit} tokens is what its KV cache holds for {held_by}.)"


def prompt_over(limit: int, n_prompt: int, read_as: str, max_tokens: int | None = None) -> str:
    """`context_message`'s "what" for a prompt of `n_prompt` tokens that leaves no room: one
    that fills the limit exactly is told what it asked for in all, its `max_tokens` (None: the
    one token a completion needs at least) on top."""
    if n_prompt == limit:
        asked = max_tokens or 1
        return f"you requested {n_prompt + asked} tokens ({n_prompt} in the {read_as}, {asked} in the completion)"
    return f"your {read_as} resulted in {n_prompt} tokens"


def unknown_model_message(model: str, served: list[str]) -> str:
    """The 404 text for a `model` this server does not serve (its first 100 characters),
    naming (up to 8 of) those it does."""
    shown = ", ".join(repr(m) for m in served[:8]) + (f" and {len(served) - 8} more" if len(served) > 8 else "")
    asked = repr(model[:100]) + ("..." if len(model) > 100 else "")
    return f"model {asked} does not exist; this server serves {shown}"


def logprob_extras(lps: list[float] | None, toks: list[str] | None, tops: list[Any] | None,
                   i: int, j: int) -> dict[str, Any]:
    """A replayed delta's logprobs of tokens `i` to `j` (a stored answer's, or a leader's
    record's): none without `lps`; its tokens' texts and top logprobs when kept."""
    if lps is None:
        return {}
    return {"logprobs": lps[i:j], "tokens": toks[i:j] if toks is not None else None,
            "top_logprobs": [[TopLogprob(*a) for a in row] for row in tops[i:j]] if tops is not None else None}


def is_deterministic(p: SamplingParams) -> bool:
    """Same request → same answer: greedy, beam search, or sampling with a fixed seed."""
    return p.temperature == 0 or p.seed is not None or p.use_beam_search


def is_cacheable(p: SamplingParams) -> bool:
    """The response cache may store and answer it: deterministic, and an answer it can
    replay whole (it keeps no prompt logprobs; a prefill-only request has nothing to keep)."""
    return is_deterministic(p) and p.prompt_logprobs is None and p.max_tokens != 0


def quota_room(quota: Quota | None, n_prompt: int, sequences: int, share: int = 1) -> int | None:
    """The most tokens per sequence a request of `n_prompt` prompt tokens may reserve under
    its quota's token limits (`tokens_per_minute`, `daily_token_budget`: a reservation
    counts the prompt plus `max_tokens` per sequence), or None when neither is set (pure).
    `share`: one prompt of a request of that many, which takes that share of the limits
    (each taking all of them, the first left nothing to the others: refused on every retry).
    A request that does not give max_tokens defaults to no more than this, as well as to
    the room in the context window, so that a key whose limits are below the window can
    still be used by clients that never send max_tokens (most OpenAI clients)."""
    if quota is None:
        return None
    limits = [x for x in (quota.tokens_per_minute, quota.daily_token_budget) if x is not None]
    return (min(limits) // max(1, share) - n_prompt) // max(1, sequences) if limits else None


def logprob_room(logprobs: int | None, sequences: int, share: int = 1) -> int | None:
    """The most tokens per sequence a request asking for `logprobs` alternatives (None: no
    logprobs) over `sequences` choices may generate within `MAX_LOGPROB_ENTRIES`, its
    `share` of a request of that many prompts (None: unbounded). Pure."""
    if logprobs is None:
        return None
    return MAX_LOGPROB_ENTRIES // max(1, share) // (max(1, sequences) * (logprobs + 1))


def fresh_enough(age_s: float | None, ttl_s: float, max_age_s: int | None, min_fresh_s: int | None) -> bool:
    """A stored answer `age_s` old (None: not known), kept `ttl_s` in all, satisfies a
    request's `Cache-Control: max-age` (at most that old) and `min-fresh` (kept at least that
    much longer). An answer of unknown age satisfies neither (pure)."""
    if max_age_s is None and min_fresh_s is None:
        return True
    if age_s is None:
        return False
    age_s = math.floor(age_s)  # in whole seconds, as its `Age` header says (RFC 9111 §5.1)
    return (max_age_s is None or age_s <= max_age_s) and (min_fresh_s is None or ttl_s - age_s >= min_fresh_s)


class Admission:
    """The admission logic (one instance per runtime; `admit` is re-entrant)."""

    def __init__(
        self,
        config: AdmissionConfig,
        tokenizer: Tokenizer,
        metrics: Metrics,
        *,
        to_predictor: trio.MemorySendChannel[RequestState],
        completed: trio.MemorySendChannel[Completed],
        load: Any,  # object with .waiting() -> int and .estimated_wait_s() -> float
        quotas: Any = None,  # cache.quotas.QuotaManager | None
        response_cache: Any = None,  # cache.response_cache.ResponseCache | None
        prompt_cache: Any = None,  # cache.prompt_cache.PromptCache | None
        adapters: Any = None,  # gpu.lora.LoraManager | None: LoRA adapters clients may name as `model`
        on_cancel: Any = None,  # called (no arguments) when an accepted request is cancelled
        grammars: Any = None,  # gpu.structured.GrammarCompiler | None: checks structured-output specs
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.to_predictor = to_predictor
        self.completed = completed
        self.load = load
        self.quotas = quotas
        self.response_cache = response_cache
        # a template that writes the time renders the same messages differently later (the
        # audit: a template's clock read the first request's time an hour on): nothing kept
        self.prompt_cache = None if getattr(tokenizer, "template_reads_clock", False) else prompt_cache
        # what the prompt cache keys renderings by (its `model`): the served name, and the tokenizer and chat
        # template (replicas that share a name need not share them: a rolling update, a GGUF
        # beside a folder; one must not read the other's token ids)
        self.rendered_by = f"{config.model_name}@{tokenizer.fingerprint}" if prompt_cache is not None else ""
        self._tokenize_limiter = trio.CapacityLimiter(1)  # long prompts tokenize in a thread, one at a time,
        self._tokenize_turns = TenantTurns()  # the tenants in turn
        self._broken_adapters_said: dict[str, float] = {}  # adapter -> when its fault was last logged
        self.adapters = adapters if adapters is not None and adapters.enabled else None
        self.pending = 0  # requests between the load check and the hand-off to the predictor
        self.flights = Flights()  # identical deterministic requests in flight (actors.flights)
        self._followers: dict[RequestState, trio.CancelScope] = {}  # waiting for an identical one's answer
        # where followers wait (`_follow`): the runtime's admission nursery, set when it runs;
        # None: requests never follow
        self.background: trio.Nursery | None = None
        # places of `completed` kept for those that send without waiting (set by the runtime:
        # `_accounting_room`; None: half of it)
        self.completed_reserved: int | None = None
        self.stopping = False  # the server stops: a follower whose flight ended without an answer ends too
        self.on_cancel = on_cancel
        self.grammars = grammars
        self._compile_limiter = trio.CapacityLimiter(1)
        self._rpm_blocked: dict[tuple[Any, ...], float] = {}  # tenant → monotonic time its rpm frees one

    # ------------------------------------------------------------- pieces
    async def _adapter(self, model: str) -> tuple[str, str] | None:
        """None for the base model (its id or an alias), else the LoRA adapter `model` names
        and its key (`gpu.lora.LoraManager.key_of`: from its files, off the event loop; the
        stepper loads it when the request enters the engine, under `max_loras`). Refuses an
        unknown model (404) and an adapter that cannot be served (400; the server log has
        the file and why)."""
        if model == self.config.model_name or model in self.config.model_aliases:
            return None
        if model in self.config.embedding_models:
            raise _Refuse(400, "invalid_value", f"model {model[:100]!r} is an embedding model: it serves "
                          f"/v1/embeddings only", "model")
        if self.adapters is not None:
            from gpu.lora import AdapterNotFound, LoraError

            try:
                return model, await trio.to_thread.run_sync(self.adapters.key_of, model)
            except AdapterNotFound:
                pass
            except LoraError as e:
                now = time.monotonic()
                if now - self._broken_adapters_said.get(model, -math.inf) >= BROKEN_ADAPTER_LOG_S:
                    # (once a minute per adapter: any tenant may name it at its request rate)
                    self._broken_adapters_said[model] = now
                    log.warning("LoRA adapter %r cannot be served: %s", model, e)
                raise _Refuse(400, "invalid_value", f"LoRA adapter {model!r} cannot be served: {e.reason}",
                              "model") from None
        served = [self.config.model_name] + (self.adapters.names() if self.adapters is not None else [])
        raise _Refuse(404, "model_not_found", unknown_model_message(model, served), "model")

    async def _tokenize(self, call: GenerateCall) -> tuple[list[int], Any]:
        """The prompt's token ids, and for chat messages the prompt cache did not hold, the
        rendering to store there (`_remember`) once the request is admitted: stored before,
        a tenant over its quota, or a prompt too long to run, filled Redis all the same
        (the audit: 60 refused 1 MB bodies, 110 MB for an hour)."""
        if call.messages is not None:
            if not call.messages:
                raise _Refuse(400, "invalid_value", "messages must not be empty", "messages")
            msgs = [{"role": m.role, "content": m.content} for m in call.messages]
            ending = {"add_generation_prompt": call.add_generation_prompt,
                      "continue_final_message": call.continue_final_message}
            if self.prompt_cache is not None:
                try:
                    hit = await self.prompt_cache.get(scope_for(call.tenant.as_tenant()), self.rendered_by,
                                                      msgs, **ending)
                    result = "hit" if hit is not None else "miss"
                except CacheUnavailable:
                    hit, result = None, "error"
                    self.metrics.redis_errors.labels("prompt_cache_get").inc()
                self.metrics.prompt_cache_lookups.labels(result).inc()
                if hit is not None:
                    return list(hit.token_ids), None
            def render() -> tuple[str, list[int] | None]:
                text = self.tokenizer.apply_chat_template(msgs, **ending)
                return text, self._encode(text)

            try:
                chars = sum(len(m["content"]) + MESSAGE_CHARS for m in msgs)
                text, ids = await self._off_loop(render, chars, call.tenant.tenant_id)
            except Exception as e:  # template errors (e.g. raise_exception for bad roles) are the caller's
                raise _Refuse(400, "invalid_value", f"messages: {e}", "messages") from e
            if ids is None:
                raise self._too_long("messages")
            return ids, (msgs, text, ids) if self.prompt_cache is not None else None
        if call.prompt_token_ids is not None:
            ids = list(call.prompt_token_ids)
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise _Refuse(400, "invalid_value",
                              f"prompt token ids must be in [0, {self.config.vocab_size}); got {bad[0]}", "prompt")
            return ids, None
        if call.prompt is not None:
            prompt = call.prompt
            ids = await self._off_loop(lambda: self._encode(prompt), len(prompt), call.tenant.tenant_id)
            if ids is None:
                raise self._too_long("prompt")
            return ids, None
        raise _Refuse(400, "invalid_value", "a prompt is required", "prompt")

    def _encode(self, text: str) -> list[int] | None:
        """`text`'s tokens, or None once a prefix of it is already more than the window
        (`Tokenizer.encode_within`): a megabyte of digits took two seconds to tokenize, only
        to be refused, and a refused request costs its tenant no `requests_per_minute`."""
        return self.tokenizer.encode_within(text, self.config.max_model_len)

    def _too_long(self, param: str) -> _Refuse:
        return _Refuse(400, "context_length_exceeded", context_message(
            self.config.max_model_len, f"your {param} resulted in over {self.config.max_model_len} tokens", param),
            param)

    async def _off_loop(self, fn: Any, chars: int, tenant_id: str) -> Any:
        """`fn()` (rendering and tokenizing a prompt): in a worker thread when the text is
        long (`OFF_LOOP_CHARS`), one at a time and the tenants in turn (`TenantTurns`), so
        that other requests' streams go on (the audit: a tenant limited to a request a
        minute stalled every stream for seconds with prompts too long to run, each refused
        and so never counted) and one tenant's many long prompts do not queue ahead of
        another's."""
        if chars < OFF_LOOP_CHARS:
            return fn()
        return await self._tokenize_turns.run(tenant_id, fn, self._tokenize_limiter)

    async def _remember(self, call: GenerateCall, rendering: Any) -> None:
        """Store a chat prompt's rendering (`_tokenize`) in the prompt cache, unless the
        request said `no-store` (its conversation must not stay in Redis)."""
        if rendering is None or self.prompt_cache is None or not call.cache_store:
            return
        from cache.prompt_cache import RenderedPrompt

        msgs, text, ids = rendering
        try:
            await self.prompt_cache.put(scope_for(call.tenant.as_tenant()), self.rendered_by, msgs,
                                        call.add_generation_prompt, RenderedPrompt(text, ids),
                                        call.continue_final_message)
        except CacheUnavailable:
            self.metrics.redis_errors.labels("prompt_cache_put").inc()

    def _resolve_params(self, call: GenerateCall, n_prompt: int) -> SamplingParams:
        p = call.params
        room = self.config.max_model_len - n_prompt
        if n_prompt == 0:
            raise _Refuse(400, "invalid_value", "prompt is empty", "prompt")
        read_as = "messages" if call.messages is not None else "prompt"
        if p.prompt_logprobs is not None:
            copies = call.prompt_logprob_copies
            if copies is None:
                copies = max(p.n, p.beam_width)
            entries = copies * n_prompt * (p.prompt_logprobs + 1)
            bound = MAX_PROMPT_LOGPROB_ENTRIES // call.batch_size  # (each of the request's prompts: its share)
            if entries > bound:
                share = f" (this prompt's share: the answer's bound is shared by {call.batch_size} prompts)" \
                    if call.batch_size > 1 else ""
                raise _Refuse(400, "invalid_value", (
                    f"the answer would hold {entries} prompt logprobs ({copies} copies of the {n_prompt} tokens of "
                    f"the {read_as}, each with {p.prompt_logprobs} alternatives); at most {bound}{share}: ask for "
                    f"fewer choices, fewer alternatives, or a shorter {read_as}"), call.prompt_logprobs_param)
        if room < (0 if p.max_tokens == 0 else 1):  # a prompt only scored (max_tokens 0) may fill the window
            limit, held = self._context_limit(p)
            raise _Refuse(400, "context_length_exceeded", context_message(
                limit, prompt_over(limit, n_prompt, read_as, p.max_tokens), read_as, held), read_as)
        outside = [t for t in p.stop_token_ids if t >= self.config.vocab_size]
        if outside:
            raise _Refuse(400, "invalid_value", f"stop_token_ids: token id {outside[0]} is not in the vocabulary "
                          f"(ids are below {self.config.vocab_size})", "stop_token_ids")
        beyond = [t for t, _ in p.logit_bias if t >= self.config.vocab_size]
        if beyond:
            raise _Refuse(400, "invalid_value", f"logit_bias token id {beyond[0]} is not in the vocabulary "
                          f"(ids are below {self.config.vocab_size})", "logit_bias")
        seats = self.config.max_sequences
        if seats and p.beam_width > seats:
            raise _Refuse(400, "invalid_value", f"beam search with {p.beam_width} beams; this server runs at most "
                          f"{seats} sequences at once", "best_of" if p.best_of is not None else "n")
        cap = call.tenant.max_tokens_cap
        cap_kv, held_by = self._kv_room(p)
        seqs = max(p.n, p.beam_width)
        # the output logprobs a whole answer holds: its n choices' (a beam search returns n
        # of its beams); a stream (SSE, the WebSocket) sends them as they come, holding none
        lp_room = None if call.stream else logprob_room(p.logprobs, p.n, call.batch_size)
        max_tokens = p.max_tokens
        if max_tokens is None:
            if cap is not None and cap < 1:
                raise _Refuse(400, "invalid_value",
                              f"this key's max_tokens limit is {cap}: it may not generate", call.max_tokens_param)
            if cap_kv:  # a cache smaller than the context window bounds what one request can grow to
                room = min(room, cap_kv - n_prompt)
                if room < 1:
                    raise _Refuse(400, "context_length_exceeded", context_message(
                        cap_kv, prompt_over(cap_kv, n_prompt, read_as), read_as, held_by), read_as)
            max_tokens = min(room, cap) if cap is not None else room
            fits = quota_room(call.tenant.quota, n_prompt, seqs, call.batch_size)
            if fits is not None and fits < max_tokens:
                # below min_tokens (or a token) it never fits: lowered to that, the quota's
                # 429 says so with what the request needs at least (left at the window's
                # room it was "needs 8192 tokens"; below min_tokens, a 400 blaming the window)
                max_tokens = min(max_tokens, max(fits, p.min_tokens, 1))
        defaulted = p.max_tokens is None or call.max_tokens_default
        if lp_room is not None and max_tokens > lp_room and defaulted:  # (past it even so: the 400 below)
            max_tokens = min(max_tokens, max(lp_room, p.min_tokens, 1))
        if cap is not None and max_tokens > cap and call.max_tokens_default:
            max_tokens = cap
        if cap is not None and max_tokens > cap:
            raise _Refuse(400, "invalid_value",
                          f"{call.max_tokens_param} {max_tokens} exceeds this key's limit of {cap}", call.max_tokens_param)
        if lp_room is not None and max_tokens > lp_room:
            share = f" (this prompt's share: the bound is shared by {call.batch_size} prompts)" \
                if call.batch_size > 1 else ""
            asked = "min_tokens" if defaulted else call.max_tokens_param  # (a default is lowered to min_tokens)
            raise _Refuse(400, "invalid_value", (
                f"the answer would hold {p.n * max_tokens * (p.logprobs + 1)} logprobs ({p.n} choices of "
                f"{max_tokens} tokens, each with {p.logprobs} alternatives); at most "
                f"{MAX_LOGPROB_ENTRIES // call.batch_size}{share}: ask for fewer choices, fewer alternatives, "
                f"or a smaller {asked}, or stream the answer"), "n" if p.n > 1 else asked)
        requested = f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the {read_as}, {max_tokens} " \
                    "in the completion)"
        if cap_kv and n_prompt + (1 if max_tokens else 0) > cap_kv:  # the prompt alone is too long (said first:
            raise _Refuse(400, "context_length_exceeded", context_message(  # a smaller max_tokens cannot help)
                cap_kv, prompt_over(cap_kv, n_prompt, read_as, max_tokens), read_as, held_by), read_as)
        limit, held = self._context_limit(p)
        if n_prompt + max_tokens > limit:
            raise _Refuse(400, "context_length_exceeded", context_message(
                limit, requested, f"{read_as} or completion", held), call.max_tokens_param)
        try:  # the request's own fields were checked; what is filled in here may clash with them
            return msgspec.structs.replace(p, max_tokens=max_tokens)
        except SamplingParamsError as e:
            why = "" if p.max_tokens is not None else (
                " (max_tokens was not given: it defaults to the room left in the context window and KV cache"
                + (f", capped at this key's limit of {cap})" if cap is not None else ")"))
            raise _Refuse(400, "invalid_value", f"{e}{why}", e.field) from e

    async def _compile_grammar(self, call: GenerateCall, p: SamplingParams) -> Any:
        """The request's structured-output constraint compiled (None: it has none). A spec
        that does not compile is the client's 400, before the request queues. A large schema
        compiles for up to seconds: in a worker thread, one at a time (so a client sending
        many cannot take the engine's cores), and the engine gets the result with the
        request, so it never compiles on the event loop."""
        if p.guided is None or self.grammars is None:
            return None
        field = call.guided_field or "response_format"
        try:
            if self.grammars.is_compiled(p.guided):
                grammar = self.grammars.prototype(p.guided)
            else:
                start = time.monotonic()
                grammar = await trio.to_thread.run_sync(self.grammars.prototype, p.guided,
                                                        limiter=self._compile_limiter)
                self.metrics.grammar_compile.observe(time.monotonic() - start)
        except GuidedDecodingError as e:
            raise _Refuse(400, "invalid_value", f"{field}: {e}", field) from None
        return grammar

    def _context_limit(self, p: SamplingParams) -> tuple[int, str | None]:
        """The tokens one sequence of this request may reach, as a refusal names them: the
        window, or what the KV cache holds for it when that is fewer (with for whom). The
        smaller is the one that applies: naming the window's 8192 to a request over both
        sent a client retrying under it to a second 400."""
        cap_kv, held_by = self._kv_room(p)
        if cap_kv and cap_kv < self.config.max_model_len:
            return cap_kv, held_by
        return self.config.max_model_len, None

    def _kv_room(self, p: SamplingParams) -> tuple[int, str]:
        """Tokens one sequence of this request may fill in the KV cache (0 = unchecked), and
        for whom: all of it for one request, whole pages of an equal share for each beam of
        a beam search (its beams must fit together: `gpu.engine.Engine._check_beams_fit`)."""
        cap_kv = self.config.kv_capacity_tokens
        beams = p.beam_width
        if not cap_kv or beams <= 1:
            return cap_kv, "one request"
        block = self.config.kv_block_size
        return cap_kv // block // beams * block, f"each of {beams} beams"

    def _check_load(self) -> None:
        # requests past this check and not yet handed to the predictor count too: admit()
        # awaits Redis after it, and a burst would otherwise all pass against the same count
        waiting = self.load.waiting() + self.pending
        if waiting >= self.config.max_waiting:
            # (the count can pass the limit by admissions under way and preempted requests:
            # the limit is what the client can act on)
            raise _Refuse(503, "overloaded", f"server overloaded: its queue is full ({self.config.max_waiting} "
                          "requests waiting, --max-waiting)",
                          retry_after=max(1.0, self.load.estimated_wait_s()))
        est = self.load.estimated_wait_s()
        if est > self.config.max_estimated_wait_s:
            raise _Refuse(503, "overloaded", f"server overloaded: estimated wait {est:.1f}s, over the "
                          f"{self.config.max_estimated_wait_s:g}s limit",
                          retry_after=max(1.0, est - self.config.max_estimated_wait_s))

    def _rpm_key(self, tenant: TenantContext) -> tuple[Any, ...]:
        # the tenant as it stands: one re-created, or given another limit, is not blocked
        return (tenant.tenant_id, tenant.created_at, tenant.quota.requests_per_minute if tenant.quota else None)

    def check_rpm_block(self, tenant: TenantContext) -> None:
        """A 429 at once, before any tokenizing, for a tenant whose requests per minute Redis
        said were used up, until the window frees one: every request of it is refused then
        anyway (each counts one), and tokenizing a large body costs the event loop ~0.4 s
        per MB: a tenant over its limit could slow everyone else for free (the audit: 4
        loops of 1 MB bodies took another tenant's p50 from 0.4 s to 12.5 s). Kept per
        process (best effort: another replica learns it from its own refusal)."""
        until = self._rpm_blocked.get(self._rpm_key(tenant))
        if until is None:
            return
        left = until - time.monotonic()
        if left <= 0:
            del self._rpm_blocked[self._rpm_key(tenant)]
            return
        rpm = tenant.quota.requests_per_minute if tenant.quota else None
        raise _Refuse(429, "rate_limit_exceeded", f"quota requests_per_minute: {rpm} requests per minute reached",
                      retry_after=left, rate_limits=RateLimits(limit_requests=rpm, remaining_requests=0,
                                                               reset_requests_s=left))

    def rpm_refusal(self, tenant: TenantContext, request_id: str) -> Rejected | None:
        """`check_rpm_block` for a route that counts no requests (/tokenize): the 429 as a
        `Rejected` (counted in `lmgate_rejections`), or None."""
        try:
            self.check_rpm_block(tenant)
        except _Refuse as r:
            return self.rejected(request_id, tenant.tenant_id, r)
        return None

    RPM_BLOCKS_KEPT = 10_000  # blocks held at most (each lasts a minute at most)

    def _block_rpm(self, tenant: TenantContext, retry_after_s: float) -> None:
        # At the cap, the blocks that ended go (those of tenants gone quiet), then, if all are
        # live, the one that ends soonest (the cap was met by clearing them all: every
        # tenant's block was lifted at once).
        now = time.monotonic()
        key = self._rpm_key(tenant)
        if key not in self._rpm_blocked and len(self._rpm_blocked) >= self.RPM_BLOCKS_KEPT:
            self._rpm_blocked = {k: until for k, until in self._rpm_blocked.items() if until > now}
            while len(self._rpm_blocked) >= self.RPM_BLOCKS_KEPT:
                del self._rpm_blocked[min(self._rpm_blocked, key=self._rpm_blocked.__getitem__)]
        self._rpm_blocked[key] = now + retry_after_s

    async def count_refused(self, tenant: TenantContext, request_id: str) -> None:
        """Count a request refused (400) after its prompt was tokenized against the tenant's
        requests per minute (`QuotaManager.count_refused`), and refuse its next ones before
        tokenizing (`check_rpm_block`) once that fills the minute. Best effort: with Redis
        down it is skipped (and counted in `lmgate_redis_errors`), as the refusal stands."""
        if self.quotas is None or tenant.quota is None or tenant.quota.requests_per_minute is None:
            return
        try:
            if not self.quotas.store.reachable():
                raise CacheUnavailable("Redis was unreachable a moment ago: skipped")
            retry = await self.quotas.count_refused(tenant.as_tenant(), request_id)
        except CacheUnavailable:
            self.metrics.redis_errors.labels("count_refused").inc()
            return
        if retry is not None:
            self._block_rpm(tenant, retry)

    async def _release_orphan(self, who: Any, request_id: str) -> None:
        """Release the reservation a refused request's reserve may have made though its reply
        was lost (a Redis that timed out runs the script when it wakes): with quotas failing
        closed, it held the tenant's `max_concurrent` slot, tokens and RPM entry for the
        reservation's minute, though nothing ran. Tried for that minute; a release that
        lands first marks the id settled, so a late reserve then reserves nothing."""
        delay = 0.5
        with trio.move_on_after(getattr(self.quotas, "reservation_ttl_s", 60.0)):
            while True:
                await trio.sleep(delay)
                try:
                    await self.quotas.release(who, request_id, refund_rpm=True)
                    return
                except CacheUnavailable:
                    delay = min(delay * 2, 10.0)
                except Exception:  # (a system task must not raise: it would end the run)
                    log.exception("releasing the reservation of refused request %s failed", request_id)
                    return

    async def reserve_quota(self, tenant: TenantContext, request_id: str, prompt_tokens: int,
                            max_new_tokens: int, sequences: int = 1, *, lowest: int | None = None,
                            group: str | None = None, group_left: int = 1) -> QuotaHold:
        """Reserve `prompt_tokens + max_new_tokens × sequences` against the tenant's quota (atomically,
        every limit at once); `_Refuse` (429, a 400 for a request that can never pass, or
        503 when Redis is down and quotas fail closed) if it may not run. Redis down and
        failing open: no reservation, but the hold names the tenant, so its usage is
        settled once Redis is back. `lowest` (a request whose client did not choose
        `max_new_tokens`): the reservation may lower it as far as this, to what is left of
        the daily budget (the hold says how far). `group`: the request's id when this is one
        of its prompts, `group_left` of which are still to reserve, this one included
        (`QuotaManager.reserve`)."""
        if self.quotas is None or tenant.quota is None:
            return QuotaHold(None, False, None)
        who = tenant.as_tenant()
        sent = False
        try:
            if not self.quotas.store.reachable():  # (failed to answer within the last second)
                raise CacheUnavailable("Redis was unreachable a moment ago: skipped")
            sent = True
            res = await self.quotas.reserve(who, request_id, prompt_tokens, max_new_tokens, sequences=sequences,
                                            min_new_tokens=None if lowest is None else min(lowest, max_new_tokens),
                                            group=group, group_left=group_left)
        except CacheUnavailable as e:
            self.metrics.redis_errors.labels("reserve").inc()
            if self.config.quota_fail_open:
                return QuotaHold(who, False, None)
            # (its reply lost, the reservation may have been made: it would hold a slot for a
            # minute. Not after a refusal, a definite answer: the script never ran, and a
            # release would write to a Redis out of memory for every refused request)
            if sent and self.quotas.store.unreachable_at is not None:
                trio.lowlevel.spawn_system_task(self._release_orphan, who, request_id)
            raise _Refuse(503, "quota_unavailable", "quota service unavailable", retry_after=1.0) from e
        except DuplicateRequest as e:
            raise _Refuse(400, "invalid_value", str(e), "request_id") from e
        if isinstance(res, Denied):
            # a spent daily budget is OpenAI's `insufficient_quota` (its clients stop, where a
            # `rate_limit_exceeded` is retried); a per-minute limit is a rate limit, and so is
            # a daily budget a minute's wait frees (held by running requests, or midnight near)
            spent = res.limit == "daily_token_budget" and (res.retry_after_s is None or res.retry_after_s > 60)
            code = "insufficient_quota" if spent else "rate_limit_exceeded"
            if res.retry_after_s is None:  # can never pass: this is the caller's request, not load
                raise _Refuse(400 if res.limit == "max_tokens_cap" else 429,
                              code if res.limit != "max_tokens_cap" else "invalid_value",
                              f"quota {res.limit}: {res.reason}",
                              "max_tokens" if res.limit == "max_tokens_cap" else None, rate_limits=res.limits)
            if res.limit == "requests_per_minute":
                self._block_rpm(tenant, res.retry_after_s)
            raise _Refuse(429, code, f"quota {res.limit}: {res.reason}",
                          retry_after=res.retry_after_s, rate_limits=res.limits)
        lowered = res.max_new_tokens if res.max_new_tokens is not None and res.max_new_tokens < max_new_tokens else None
        return QuotaHold(who, True, res.limits, lowered)

    @staticmethod
    def _defaulted(call: GenerateCall) -> bool:
        """Whether the request's max_tokens is a default the quota may lower, not the client's
        choice. Not for an only-if-cached request: it generates nothing, and its answer is
        looked up (and billed) under the max_tokens it came with."""
        return (call.params.max_tokens is None or call.max_tokens_default) and not call.cache_only

    async def _reserve(self, call: GenerateCall, st: RequestState) -> None:
        hold = await self.reserve_quota(call.tenant, call.request_id, st.prompt_tokens, st.params.max_tokens,
                                        max(st.params.n, st.params.beam_width),
                                        lowest=max(1, st.params.min_tokens) if self._defaulted(call) else None,
                                        group=call.batch_id, group_left=call.batch_size - call.batch_index)
        st.quota_tenant, st.reserved, st.rate_limits = hold.tenant, hold.reserved, hold.rate_limits
        if hold.max_new_tokens is not None:  # the daily budget's rest: it ends at `length` there
            st.params = msgspec.structs.replace(st.params, max_tokens=hold.max_new_tokens)
            st.quota_capped = True

    def rejected(self, request_id: str, tenant_id: str, refusal: _Refuse) -> Rejected:
        """A refusal as the caller's `Rejected`, counted in `lmgate_rejections`."""
        status, code, message, param, retry = refusal.rejected
        self.metrics.rejections.labels(tenant_id, str(status), code).inc()
        return Rejected(request_id, status, code, message, param, retry, refusal.rate_limits)

    async def _lookup(self, call: GenerateCall, st: RequestState) -> CachedCompletion | None:
        """The stored answer the request may be given, or None. Only a deterministic
        single-choice request is looked up, and not when the caller asked for a fresh answer
        (`call.cache_lookup`, counted as a "bypass" lookup). An entry older than the
        caller's `max-age`, or kept for less than its `min-fresh`, is a miss."""
        if self.response_cache is None or not is_cacheable(st.params) or st.params.n != 1:
            return None
        if not call.cache_lookup:
            self.metrics.cache_lookups.labels("bypass").inc()
            return None
        try:
            hit = await self.response_cache.get(call.tenant.as_tenant(), st.cache_model, st.prompt_token_ids,
                                                st.params)
        except CacheUnavailable:
            self.metrics.redis_errors.labels("response_cache_get").inc()
            hit = None
        if hit is not None and not self._usable(call, st, hit):
            hit = None
        self.metrics.cache_lookups.labels("hit" if hit else "miss").inc()
        return hit

    def _usable(self, call: GenerateCall, st: RequestState, hit: CachedCompletion) -> bool:
        """A stored answer may answer the request: it has the logprobs asked for (an older
        entry may not), and it is as fresh as the caller's `Cache-Control` asks."""
        if st.params.logprobs is not None and hit.logprobs is None:
            return False
        return fresh_enough(hit.age_s(time.time()), self.response_cache.ttl_s,
                            call.cache_max_age_s, call.cache_min_fresh_s)

    FLIGHTS_FOLLOWED = 8  # flights a request waits for at most, one after another (each cancelled)

    def _flight_to_follow(self, call: GenerateCall, st: RequestState) -> Flight | None:
        """The flight of an identical request (`actors.flights`) this one, which missed the
        cache, is to wait for, or None: it generates its own answer, and leads a flight
        when none is in the air and its answer would be stored. Who follows: the module
        docstring of `actors.flights`."""
        if (not self.config.collapse_identical or self.background is None or self.response_cache is None
                or st.params.n != 1 or not is_cacheable(st.params)):
            return None
        key = self.response_cache.entry_key(call.tenant.as_tenant(), st.cache_model, st.prompt_token_ids, st.params)
        flight = self.flights.get(key)
        if flight is None:
            if st.cacheable:
                st.flight = (key, self.flights.lead(key, st.priority, st))
            return None
        leader = flight.leader
        # (a leader cancelled, not generating on, lands without an answer a moment later: a
        # stream sent its tokens so far then ended 503 — a client's retry right after it left)
        if ((leader is not None and leader.cancelled)
                or (call.stream and leader is not None and leader.params.use_beam_search)  # (its tokens: at its end)
                or not call.cache_lookup or st.priority > flight.priority
                or (leader is not None and leader.tenant_id != st.tenant_id and not leader.scheduled_at)
                or not fresh_enough(0.0, self.response_cache.ttl_s, call.cache_max_age_s, call.cache_min_fresh_s)):
            return None
        return flight

    def _follow(self, call: GenerateCall, st: RequestState, flight: Flight) -> trio.CancelScope:
        """Wait, in the background, for `flight`'s answer (`_await_flight`); the scope
        returned, cancelled, gives up waiting (the client went away)."""
        scope = self._followers[st] = trio.CancelScope()
        flight.followers += 1
        self.background.start_soon(self._await_flight, call, st, flight, scope)
        return scope

    @property
    def following(self) -> int:
        """Requests waiting for an identical one's answer."""
        return len(self._followers)

    def _detach(self, st: RequestState) -> bool:
        """A leader whose client went away while identical requests wait for its answer
        generates on for them (they started over, before: ~2.5x the time, measured). Its
        client's part ends now: it is charged what it had generated (`billed_tokens`;
        nothing if it had not started), its reservation settled at once (the client's retry,
        identical, then waits for the same answer instead of being refused for its slot);
        the rest is charged to no one (the followers pay for their answers, as cache hits).
        It stops when its last follower goes (`_await_flight`); what it generated after its
        client left is then charged to its tenant (`Accounting._handle`: no one was given it).
        False: not a leader with followers, a beam search (its tokens are known only at its
        end), a refunded request (a batch refused after it: its answer is not kept), or
        accounting's inbox full: cancel it."""
        if (st.flight is None or st.detached or st.cancelled or st.finished_at or st.refunded
                or st.params.use_beam_search):
            return False
        flight = st.flight[1]
        if flight.followers <= 0 or flight.landed.is_set():
            return False
        if not self._accounting_room():
            return False
        st.client_cancelled = True
        bill = dataclasses.replace(st, flight=None)  # (the client's part, as any cancelled request)
        self.completed.send_nowait(Completed(bill, "cancelled"))
        st.detached, st.billed_tokens = True, st.completion_tokens
        st.billed_prompt = st.prompt_tokens if st.scheduled_at else 0  # (not run yet: released)
        st.reserved = False  # (settled by `bill`; `quota_tenant` kept: what it generates for no one is charged)
        return True

    def followers(self) -> list[RequestState]:
        """The requests waiting for an identical one's answer (their reservations are kept
        alive as a queued request's are: `Runtime._keep_reservations`)."""
        return list(self._followers)

    def end_following(self, message: str) -> int:
        """Shutdown: every request waiting for an identical one's answer gets a 503
        `shutting_down` and ends (`Runtime.end_streams`: the one it waits for ends too, and it
        must not then start on its own). Returns how many."""
        self.stopping = True
        for st, scope in self._followers.items():
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                st.events.send_nowait(Failed(st.request_id, 503, "shutting_down", message))
            st.cancelled = True
            scope.cancel()
        return len(self._followers)

    async def _await_flight(self, call: GenerateCall, st: RequestState, flight: Flight | None,
                            scope: trio.CancelScope) -> None:
        """A follower's answer: its flight's replayed into the request's events (counted in
        `lmgate_collapsed_requests_total{result="answered"}`, billed as a cache hit), or,
        when the flight lands without one, it leads or follows the next flight (the leader
        was cancelled), or is sent on to be generated as any other request ("generated").
        Cancelled (`scope`: its client went away, or the server stops), it ends having run
        nothing. Its end is sent to accounting awaiting room (a burst of followers all
        answered at once may outnumber what its inbox holds)."""
        answer = None
        streamed = [0, 0]  # a stream's position in its leader's answer: deltas, tokens sent (`_tail`)
        try:
            with scope:
                followed = 0
                while flight is not None:
                    followed += 1
                    try:
                        if call.stream:
                            await self._tail(call, st, flight, streamed)
                        else:
                            await flight.landed.wait()
                    finally:
                        flight.followers -= 1
                        leader = flight.leader
                        if flight.followers == 0 and leader is not None and leader.detached and not leader.cancelled:
                            leader.cancelled = True  # generating for no one now: it stops
                            if self.on_cancel is not None:
                                self.on_cancel()
                    if flight.answer is not None:
                        answer = flight.answer if self._usable(call, st, flight.answer) or streamed[0] else None
                        break
                    if (not flight.again or followed >= self.FLIGHTS_FOLLOWED or self.stopping or streamed[0]
                            or st.cancelled):
                        break
                    flight = self._flight_to_follow(call, st)  # (it may lead the next one)
                    if flight is not None:
                        flight.followers += 1
            # (it leaves `_followers` once accounting has its end: `_end_follower_now` tells it otherwise)
            if scope.cancel_called or st.cancelled:
                st.events.close()
                if streamed[1]:  # (a stream that left part-way is billed what it was sent, as any stream is)
                    st.completion_tokens = streamed[1]
                    st.scheduled_at = st.scheduled_at or st.first_token_at  # (it ran: `Accounting._handle`)
                await self._tell_accounting(Completed(st, "cancelled"))
                self._followers.pop(st, None)
            elif answer is not None:
                self.metrics.collapsed.labels("answered").inc()
                if streamed[0]:
                    self._replay_end(call, st, answer, st.events)
                else:
                    self._replay(call, st, answer, st.events, whole=not call.stream)
                await self._tell_accounting(Completed(st, "cached"))
                self._followers.pop(st, None)
            elif streamed[0]:  # (part of an answer sent: it can neither lead another nor start alone)
                await self._end_follower(st, 503, "unavailable", "the identical request whose answer this "
                                         "stream was sent ended without finishing it; retry")
            elif self.stopping:  # (the server stops: it would start now, to be ended at the grace's end)
                await self._end_follower(st, 503, "shutting_down", "server shutting down: the identical request "
                                         "this one waited for ended without an answer")
            else:
                self._followers.pop(st, None)
                self.metrics.collapsed.labels("generated").inc()
                try:
                    self._check_load()  # (it was let in as one that takes no place)
                    self.to_predictor.send_nowait(st)
                except trio.WouldBlock:
                    await self._end_follower(st, 503, "overloaded", "server overloaded: admission backlog full")
                except _Refuse as r:
                    await self._end_follower(st, r.rejected[0], r.rejected[1], r.rejected[2])
        except Exception:  # a bug: this request ends, the admission actor (where it waits) goes on
            log.exception("request %s failed waiting for an identical request's answer", st.request_id)
            await self._end_follower(st, 503, "unavailable",
                                     "the request failed waiting for an identical request's answer")
        except BaseException:  # the admission actor stops (a crash, the server's end): it ends too
            self._end_follower_now(st, "the server stopped waiting for this request's answer; retry")
            raise

    async def _tail(self, call: GenerateCall, st: RequestState, flight: Flight, pos: list[int]) -> None:
        """A streamed follower is sent its leader's answer as the leader generates it — what
        it has so far at once, then each delta as the stepper records it (`Flight.advance`)
        — until the flight lands (the leader's answer is whole, or it has none). `pos`:
        the deltas and tokens of the answer sent, advanced here. Returns early when the
        client has gone (`st.cancelled`)."""
        leader = flight.leader
        while True:
            progress = flight.progress  # (taken before reading: a delta recorded after is its set)
            rec = leader.choices.get(0) if leader is not None else None
            if rec is not None:
                self._send_recorded(call, st, rec, pos)
            if flight.landed.is_set() or st.cancelled:
                return
            await progress.wait()

    @staticmethod
    def _send_recorded(call: GenerateCall, st: RequestState, rec: Any, pos: list[int]) -> None:
        """The deltas of `rec` (a leader's `ChoiceRecord`) from `pos` on into the follower's
        events, each as the leader's stream had it (its text, tokens and logprobs; the last
        with the reason the choice ended, once it has). A client gone sets `st.cancelled`."""
        with_logprobs = st.params.logprobs is not None
        i, j = pos
        try:
            while i < len(rec.deltas):
                k = rec.delta_tokens[i]
                extras = logprob_extras(rec.logprobs if with_logprobs and len(rec.logprobs) >= j + k else None,
                                        rec.tokens,
                                        rec.top_logprobs if rec.top_logprobs and len(rec.top_logprobs) >= j + k else None,
                                        j, j + k)
                last = i == len(rec.deltas) - 1
                st.events.send_nowait(TokenDelta(call.request_id, 0, rec.deltas[i], rec.token_ids[j:j + k], **extras,
                                                 finish_reason=rec.finish_reason if last else None))
                i, j = i + 1, j + k
                if not st.first_token_at:
                    st.first_token_at = time.monotonic()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            st.cancelled = True
        finally:
            pos[:] = [i, j]

    @staticmethod
    def _replay_end(call: GenerateCall, st: RequestState, hit: CachedCompletion,
                    send: trio.MemorySendChannel) -> None:
        """The end of a replayed answer (`_replay`'s, or a streamed follower's whose deltas
        `_tail` sent): its `Finished`, billed as a cache hit; `send` closed."""
        usage = Usage(st.prompt_tokens, hit.usage.completion_tokens, st.prompt_tokens)  # nothing computed
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            send.send_nowait(Finished(call.request_id, [hit.finish_reason], usage, cached=True))
        send.close()
        st.completion_tokens = hit.usage.completion_tokens
        st.finish_reasons[0] = hit.finish_reason
        st.finished_at = time.monotonic()
        st.first_token_at = st.first_token_at or st.finished_at

    async def _end_follower(self, st: RequestState, status: int, code: str, message: str) -> None:
        """A follower that will not be answered ends with `status` `code` on its stream (counted
        as a rejection), and its hold goes; if it led a flight meanwhile, that lands without
        an answer."""
        self._followers[st] = self._followers.get(st) or trio.CancelScope()  # (until accounting has it)
        self.metrics.rejections.labels(st.tenant_id, str(status), code).inc()
        self._fail_follower(st, status, code, message)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._tell_accounting(Completed(st, "rejected"))
        self._followers.pop(st, None)

    def _fail_follower(self, st: RequestState, status: int, code: str, message: str) -> None:
        """A follower's last event, its stream closed, and the flight it led meanwhile (if
        any) landed without an answer: what both ways of ending one share."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            st.events.send_nowait(Failed(st.request_id, status, code, message))
        st.events.close()
        if st.flight is not None:
            self.flights.land(*st.flight, None)
            st.flight = None

    def _accounting_room(self) -> bool:
        """Room in accounting's inbox for a follower's end (or a detached leader's bill):
        beyond what is kept for those that send without waiting (`completed_reserved`: the
        stepper, the queue count on one place per request that can be alive, and raise
        without it; a flight's followers are all answered at once, and may be thousands)."""
        stats = self.completed.statistics()
        reserved = self.completed_reserved if self.completed_reserved is not None else stats.max_buffer_size // 2
        return stats.current_buffer_used < max(1, stats.max_buffer_size - reserved)

    async def _tell_accounting(self, completed: Completed) -> None:
        """A follower's end into accounting's inbox, once it has room (`_accounting_room`)."""
        while not self._accounting_room():
            await trio.sleep(0.005)
        self.completed.send_nowait(completed)

    def _end_follower_now(self, st: RequestState, message: str) -> None:
        """`_end_follower` where nothing may be awaited (its task is cancelled): best effort."""
        if self._followers.pop(st, None) is None:
            return  # (it had ended, or gone on to be generated)
        self._fail_follower(st, 503, "unavailable", message)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            self.completed.send_nowait(Completed(st, "cancelled"))

    async def _only_cached(self, call: GenerateCall, st: RequestState) -> CachedCompletion:
        """The stored answer of an `only-if-cached` request (`call.cache_only`), looked up
        before any quota is taken: without one it is a 504 `not_cached` that holds nothing
        (the caller's next request is not refused for a slot this one took)."""
        hit = await self._lookup(call, st)
        if hit is None:
            size = getattr(self.response_cache, "max_entry_bytes", None)
            raise _Refuse(504, "not_cached", "no stored answer for this request satisfies its Cache-Control "
                          "(only-if-cached): only a deterministic request (temperature 0, or a seed) with "
                          "n = 1 is stored, once it has been answered"
                          + (f", and only an answer of at most {size // 1024} KiB (long answers with top logprobs "
                             "are not)" if size else ""))
        return hit

    async def _cached(self, call: GenerateCall, st: RequestState, sink=None,
                      hit: CachedCompletion | None = None) -> Accepted | None:
        """A stored answer replayed (`hit`, else `_lookup`), or None: the request goes to
        the engine."""
        if hit is None:
            hit = await self._lookup(call, st)
        if hit is None:
            return None
        # into the sink through the request's own clone (closed below: the replay is whole)
        send, recv = (st.events, None) if sink is not None else trio.open_memory_channel(len(hit.token_ids) + 2)
        self._replay(call, st, hit, send)
        self.completed.send_nowait(Completed(st, "cached"))
        return Accepted(call.request_id, st.prompt_tokens, recv, lambda: None, cached=True,
                        cache_age_s=hit.age_s(time.time()), settled=st.settled, rate_limits=st.rate_limits)

    def _replay(self, call: GenerateCall, st: RequestState, hit: CachedCompletion, send: trio.MemorySendChannel,
                *, whole: bool = False) -> None:
        """`hit` as the request's events into `send` (closed after: the request has ended,
        as a cache hit; the caller tells accounting), token by token as it was streamed, or
        in one delta (`whole`, or an entry stored without its deltas)."""
        n = len(hit.token_ids)
        lps = hit.logprobs
        toks = hit.tokens if hit.tokens is not None and len(hit.tokens) == n else None
        tops = hit.top_logprobs if hit.top_logprobs is not None and len(hit.top_logprobs) == n else None
        if len(hit.deltas) == n and not whole:  # replay token by token, as it was streamed (the last one ends the choice)
            for i, (text, tok) in enumerate(zip(hit.deltas, hit.token_ids, strict=True)):
                send.send_nowait(TokenDelta(call.request_id, 0, text, [tok], **logprob_extras(lps, toks, tops, i, i + 1),
                                            finish_reason=hit.finish_reason if i == n - 1 else None))
        else:
            send.send_nowait(TokenDelta(call.request_id, 0, hit.text, list(hit.token_ids),
                                        **logprob_extras(lps, toks, tops, 0, n), finish_reason=hit.finish_reason))
        self._replay_end(call, st, hit, send)

    # ------------------------------------------------------------- the whole path
    async def admit(self, call: GenerateCall, sink: trio.MemorySendChannel | None = None) -> Accepted | Rejected:
        """`sink`: an unbounded channel the request's events go to (through a clone, closed
        when the request ends) instead of a channel of its own; `Accepted.events` is then
        None. Several requests sharing one sink are read as one stream without a task per
        request (the gateway's batched prompts)."""
        tenant = call.tenant.tenant_id
        pending = False
        st: RequestState | None = None
        admitted = False
        grammar = None
        tokenizing = False  # from tokenizing to the reservation, which counts or denies the request
        following: trio.CancelScope | None = None  # waiting for an identical request's answer (`_follow`)
        try:
            self.check_rpm_block(call.tenant)
            adapter = await self._adapter(call.model)
            tokenizing = True
            ids, rendering = await self._tokenize(call)
            params = self._resolve_params(call, len(ids))
            grammar = await self._compile_grammar(call, params)
            self._check_load()
            self.pending += 1  # no await since the check: the count and the check agree
            pending = True
            prio = call.tenant.priority if call.priority is None else min(call.priority, call.tenant.priority)
            send, recv = trio.open_memory_channel(0)  # replaced below once the size is known
            st = RequestState(call, ids, params, prio, send,
                              cacheable=is_cacheable(params) and call.cache_store,
                              adapter=adapter[0] if adapter else None, adapter_key=adapter[1] if adapter else None,
                              grammar=grammar, arrival=arrival_of(call))
            send.close()
            recv.close()
            if sink is not None:
                try:
                    send, recv = sink.clone(), None
                except trio.ClosedResourceError:  # the batch this belongs to was dropped meanwhile
                    raise _Refuse(499, "client_closed_request", "the client went away before admission") from None
            else:
                send, recv = trio.open_memory_channel(st.channel_size())
            st.events = send
            st.cache_model = "+".join(filter(None, (self.config.model_name, self.config.engine_variant,
                                                    st.adapter_key)))
            st.admitted_at = time.monotonic()
            tokenizing = False
            hit = await self._only_cached(call, st) if call.cache_only else None
            await self._reserve(call, st)
            try:
                await self._remember(call, rendering)
                cached = await self._cached(call, st, sink, hit)
                # an identical request being generated: its answer is this one's (else this may lead)
                flight = self._flight_to_follow(call, st) if cached is None else None
            except BaseException:  # a bug, or a Redis error no cache path expects: the hold must go
                self.completed.send_nowait(Completed(st, "rejected"))
                raise
            if cached is not None:
                admitted = True
                return cached
            if flight is not None:
                following = self._follow(call, st, flight)
            else:
                try:
                    self.to_predictor.send_nowait(st)
                except trio.WouldBlock:
                    self.completed.send_nowait(Completed(st, "rejected"))
                    raise _Refuse(503, "overloaded", "server overloaded: admission backlog full",
                                  retry_after=1.0) from None
            admitted = True
        except _Refuse as r:
            if tokenizing and r.rejected[0] == 400:
                await self.count_refused(call.tenant, call.request_id)
            return self.rejected(call.request_id, tenant, r)
        finally:
            if pending:
                self.pending -= 1
            if not admitted and st is not None:
                st.events.close()  # (a sink's clone must not hold the shared stream open)
            if admitted and grammar is not None:  # counted once admitted: not a request refused after compiling
                self.metrics.structured.labels(st.params.guided.kind).inc()

        def cancel() -> None:
            if st.detached or self._detach(st):  # others wait for its answer: it generates on, for them
                (recv if recv is not None else send).close()
                return
            st.cancelled = True
            st.client_cancelled = True
            (recv if recv is not None else send).close()
            if following is not None:
                following.cancel()
            if self.on_cancel is not None:
                self.on_cancel()

        def refund() -> None:
            st.refunded = True

        return Accepted(call.request_id, st.prompt_tokens, recv, cancel, settled=st.settled,
                        rate_limits=st.rate_limits, refund=refund)
