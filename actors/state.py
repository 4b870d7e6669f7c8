"""Per-request state shared by the actors of one process.

A `RequestState` is created by admission and travels (by reference) through
predictor → queue → stepper → accounting. Only the actor that currently owns
the request mutates it, except `cancelled`, which the gateway may set at any
time (the owner checks it between steps).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from actors.messages import GenerateCall, StreamEvent
from actors.predictor import Prediction
from gpu.sampling import SamplingParams


@dataclass
class ChoiceRecord:
    """Output of one choice, kept only when the response will be cached."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)  # text emitted with each token (replayable stream)
    delta_tokens: list[int] = field(default_factory=list)  # how many of `token_ids` each of `deltas` came with
    finish_reason: str | None = None
    # per token, only when the request asked for logprobs (a replay must return them too)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float, str]]] = field(default_factory=list)


@dataclass(eq=False)
class RequestState:
    call: GenerateCall
    prompt_token_ids: list[int]
    params: SamplingParams  # max_tokens resolved (never None)
    priority: int
    events: trio.MemorySendChannel[StreamEvent]
    engine_priority: int = 0  # the engine's, from the queue's policy at release (`BatchPolicy.engine_priority`)
    quota_tenant: Any = None  # what cache.quotas needs (.id, .quota); None → no quota
    reserved: bool = False
    rate_limits: Any = None  # cache.quotas.RateLimits after the reservation, for the caller's headers
    quota_capped: bool = False  # its defaulted max_tokens was lowered to what is left of the daily budget
    cacheable: bool = False  # deterministic and not `no-store`: store the response when it completes
    prediction: Prediction | None = None
    prompt_logprobs: list[Any] | None = None  # its prompt's `PromptLogprob`s, built once for all its choices
    length_features: Any = None  # actors.predictor.RequestFeatures behind `prediction` (learned from)
    cancelled: bool = False
    refunded: bool = False  # the caller never got the answer (a batch refused after it): release, not settle
    # cancelled by its caller (`Accepted.cancel`: a client gone, a cancel frame), not ended by
    # the server: released before it ran, it still counts against `requests_per_minute`
    client_cancelled: bool = False
    settled: trio.Event = field(default_factory=trio.Event)  # accounting has settled/released its quota
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache (the engine's first step)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    choices: dict[int, ChoiceRecord] = field(default_factory=dict)
    adapter: str | None = None  # the LoRA adapter `call.model` named (None: the base model)
    adapter_key: str | None = None  # its name@version at admission (part of `cache_model`)
    cache_model: str = ""  # what produced its answer, as the response cache keys it (`Admission._cached`)
    # while it leads identical requests (actors.flights): (response-cache entry key, Flight),
    # where its answer lands when it ends (`Accounting._land`)
    flight: tuple[str, Any] | None = None
    # its client went away while others waited for its answer: it generates on for them, its
    # client charged the `billed_tokens` it had generated then (`Admission._detach`)
    detached: bool = False
    billed_tokens: int = 0
    billed_prompt: int = 0  # its prompt, when it had run by then (else it was released)
    grammar: Any = None  # `params.guided` compiled at admission (gpu.structured.GrammarCompiler.prototype)

    @property
    def request_id(self) -> str:
        return self.call.request_id

    @property
    def app(self) -> str | None:
        """The application, for the length predictor and the queue: the request's tag
        (`X-Lmgate-App` / `metadata.app`), else its LoRA adapter's name — an adapter is
        usually trained for one application, and its answers' lengths follow it."""
        return self.call.app if self.call.app is not None else self.adapter

    @property
    def tenant_id(self) -> str:
        return self.call.tenant.tenant_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def channel_size(self) -> int:
        """A bound that the stepper can never hit: one delta per choice per step, plus the end."""
        mt = self.params.max_tokens or 1
        return max(8, self.params.n * mt + 4) if math.isfinite(mt) else 1024
