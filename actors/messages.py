"""Typed messages between the gateway and the actors, and between actors.

Every hop is a `msgspec.Struct` over a bounded trio memory channel. Structs that
carry a reply channel are never serialized (they stay inside one process); the
rest (`TokenDelta`, `Finished`, `Failed`, `Usage`) are also what the gateway
encodes to JSON.

Request lifecycle as seen by the gateway::

    submit(GenerateCall) ──▶ admission ──▶ Rejected            (4xx / 429 / 503)
                                      └──▶ Accepted(handle) ──▶ TokenDelta* ──▶ Finished | Failed
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from cache.quotas import Quota
from cache.tenants import Tenant
from gpu.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class TenantContext(msgspec.Struct, frozen=True):
    """What the actors need to know about the caller (resolved by the gateway from the API key).

    `priority` follows `cache.tenants.Tenant.priority`: a higher tier runs first.
    Build it with `TenantContext.from_tenant(tenant)`.
    """

    tenant_id: str
    priority: int = 0
    max_tokens_cap: int | None = None
    shared_cache_pool: bool = False
    quota: Quota | None = None  # None: no quota is enforced (no Redis, or an internal caller)
    created_at: float = 0.0  # the tenant record's: tells a re-created tenant id from the deleted one
    models: tuple[str, ...] | None = None  # the tenant's allow-list (`cache.tenants.may_use`); None: any

    @classmethod
    def from_tenant(cls, tenant: Tenant) -> TenantContext:
        return cls(
            tenant_id=tenant.id,
            priority=tenant.priority,
            max_tokens_cap=tenant.quota.max_tokens_cap,
            shared_cache_pool=tenant.shared_cache_pool,
            quota=tenant.quota,
            created_at=tenant.created_at,
            models=tenant.models,
        )

    def as_tenant(self) -> Tenant:
        """The `cache.tenants.Tenant` view that quota and cache calls take."""
        return Tenant(
            id=self.tenant_id, name=self.tenant_id, priority=self.priority,
            shared_cache_pool=self.shared_cache_pool, quota=self.quota or Quota(),
            created_at=self.created_at, models=self.models,
        )


class GenerateCall(msgspec.Struct, frozen=True):
    """One OpenAI-style request, parsed and typed by the gateway."""

    request_id: str
    tenant: TenantContext
    model: str
    params: SamplingParams
    prompt: str | None = None  # /v1/completions (text)
    prompt_token_ids: list[int] | None = None  # /v1/completions (token ids)
    messages: list[ChatMessage] | None = None  # /v1/chat/completions
    # chat: how the rendered messages end (`gpu.tokenizer.Tokenizer.apply_chat_template`)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    stream: bool = False
    priority: int | None = None  # a request may ask for a LOWER priority than its tenant's tier (higher runs first)
    user: str | None = None  # OpenAI `user`: user-level semantics for the length predictor
    app: str | None = None  # application tag (header or metadata) for the length predictor
    arrival_time: float = 0.0
    # the response cache, for a deterministic request (HTTP `Cache-Control`, `gateway.routes_openai.CacheDirectives`):
    cache_lookup: bool = True  # False: generate afresh even if a stored answer exists
    cache_store: bool = True  # False: do not store this answer
    cache_max_age_s: int | None = None  # answer only from an entry stored at most this long ago
    cache_min_fresh_s: int | None = None  # answer only from an entry kept at least this much longer
    cache_only: bool = False  # only-if-cached: a stored answer or a 504, never the engine
    guided_field: str | None = None  # the request field `params.guided` came from (a 400's `param`)
    # params.max_tokens is the endpoint's default (completions' 16), not the client's: a
    # key's max_tokens_cap lowers it instead of refusing a number the client never sent
    max_tokens_default: bool = False
    max_tokens_param: str = "max_tokens"  # the request field max_tokens came from (a 400's `param`)
    # one prompt of a request with several (legacy completions): the request's id. The daily
    # budget does not count what the request's other prompts reserved as tokens that running
    # requests give back (`cache.quotas.QuotaManager.reserve`'s `group`), and a defaulted
    # max_tokens takes a share of the token limits, not all of them (`batch_index` of
    # `batch_size` prompts: each after those before it, beside those after)
    batch_id: str | None = None
    batch_index: int = 0
    batch_size: int = 1
    # the copies of its prompt's logprobs the answer holds (completions: one per choice for
    # `echo` with `logprobs` and one for `prompt_logprobs`; chat: one beside the choices;
    # None: one per sequence), bounded by admission, and the field a refusal names
    prompt_logprob_copies: int | None = None
    prompt_logprobs_param: str = "prompt_logprobs"


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens not computed: prefix-cache hits (all of them for a cached answer)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TopLogprob(msgspec.Struct, frozen=True, array_like=True, gc=False):
    # (gc=False: holds no containers, so never in a cycle; untracked, the millions of them a
    # large logprobs answer makes are not scanned by each collection)
    token_id: int
    logprob: float
    token: str = ""  # the token's text (decoded alone; may be part of a UTF-8 character)


class PromptLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One prompt token's logprob given the tokens before it (None for the first token),
    with the most likely tokens at its position (`SamplingParams.prompt_logprobs`)."""

    token_id: int
    token: str  # its text, as `TopLogprob.token`
    logprob: float | None
    top: list[TopLogprob]
    rank: int | None = None  # how many tokens are at least as likely there (1: the most likely); None first


class TokenDelta(msgspec.Struct, frozen=True):
    """New output of one choice: text that is safe to show (never a partial stop string).
    A choice's first delta carries `prompt_logprobs` when the request asked for them; its
    last, the reason it ended (the request's `Finished` still lists every choice's)."""

    request_id: str
    index: int  # choice index (n > 1)
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    tokens: list[str] | None = None  # text of each token in token_ids; only when logprobs were asked for
    prompt_logprobs: list[PromptLogprob] | None = None
    finish_reason: str | None = None  # the choice ended with this delta (a stream may say so at once)


class Finished(msgspec.Struct, frozen=True):
    """Last message of a request: every choice has ended."""

    request_id: str
    finish_reasons: list[str]  # per choice
    usage: Usage
    cached: bool = False  # served from the response cache


class Failed(msgspec.Struct, frozen=True):
    """The request ended with an error after it was accepted (engine error, shutdown)."""

    request_id: str
    status: int
    code: str
    message: str
    param: str | None = None  # the request field at fault, for a 4xx


class Rejected(msgspec.Struct, frozen=True):
    """Refused before running: bad input (4xx), over quota (429) or overloaded (503)."""

    request_id: str
    status: int
    code: str  # OpenAI-style error code / type
    message: str
    param: str | None = None
    retry_after: float | None = None
    rate_limits: Any = None  # a quota refusal's `cache.quotas.RateLimits`: where the tenant stands


StreamEvent = TokenDelta | Finished | Failed


class Accepted(msgspec.Struct):
    """Admission said yes. `events` yields `TokenDelta`s, then one `Finished` or `Failed`.

    Closing `events` (or calling `handle.cancel()`) aborts the request: the engine
    frees its KV blocks within one step and quota is settled with what was generated.
    `settled` (a `trio.Event`, or None) is set once accounting has settled or released the
    request's quota: from then on its `max_concurrent` slot is free, so a gateway that
    waits for it before its last frame never has the caller's next request refused for
    the one that just ended.
    """

    request_id: str
    prompt_tokens: int
    events: Any  # trio.MemoryReceiveChannel[StreamEvent]
    cancel: Any  # Callable[[], None]
    cached: bool = False
    cache_age_s: float | None = None  # a cached answer: seconds since it was stored (None: not known)
    settled: Any = None  # trio.Event | None
    rate_limits: Any = None  # cache.quotas.RateLimits: the tenant's per-minute limits after this request
    # call before `cancel` when the caller will never see the answer (a batch refused after
    # this prompt was admitted): its quota is released, not settled (None: cannot be; an
    # answer from the response cache was accounted when it was replayed)
    refund: Any = None  # Callable[[], None] | None


class EmbedCall(msgspec.Struct, frozen=True):
    """One `/v1/embeddings` request: `texts` or `token_ids` (the embedding model's own
    vocabulary), one vector each. `truncate`: cut inputs to at most that many tokens
    (vLLM's `truncate_prompt_tokens`; None: a longer input is a 400), or, a list, each
    text's own cut (rerank's `max_tokens_per_doc` cuts documents, not the query). `labels`:
    what the route calls each input in an error, its field first (`documents[2]`, `query`:
    the error's `param` is the field); None: `input {i}`, param `input`."""

    request_id: str
    tenant: TenantContext
    model: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    truncate: int | list[int | None] | None = None
    labels: list[str] | None = None


class Embedded(msgspec.Struct):
    """The vectors of an `EmbedCall`, in its inputs' order."""

    request_id: str
    vectors: Any  # numpy float32 (inputs, dim)
    prompt_tokens: int
    rate_limits: Any = None  # as `Accepted.rate_limits`


class LengthFeedback(msgspec.Struct, frozen=True):
    """accounting → predictor: a request ended after `tokens` output tokens, on EOS/stop
    (`finish_reason` "stop") or at its `max_tokens` ("length").

    `features` is the `actors.predictor.RequestFeatures` its prediction used (None when
    the running estimator predicted it); the Magnus predictor learns from the pair, and
    from a "length" finish that the request runs away to its cap (see
    `LengthPredictor.observe`).
    """

    tenant_id: str
    app: str | None
    tokens: int
    features: Any = None
    finish_reason: str = "stop"
