"""The engine facade: requests in, per-request deltas out, one step at a time.

    engine.add_request(rid, prompt_token_ids, params)
    while engine.has_unfinished():
        for delta in engine.step():      # schedule → run the model → sample/detokenize/stop
            ...

The engine is synchronous and single-threaded by contract: the stepper actor
calls `step()` from one worker thread and applies `add_request`/`abort` between
steps. `abort` frees the request's KV blocks at once.

A request with `n > 1` runs one sequence through prefill; at its first sample
the row of logits is sampled `n` times and the sequence is forked, the children
sharing the prompt's KV blocks copy-on-write.

A beam search request (`use_beam_search`) runs its beams as sequences too. A beam
that has run is *held* by the step scheduler (no token appended) until every beam of
the request has reported its candidates; then `gpu.beam_search.BeamSearch.advance`
picks the next beams: a parent's first child continues the parent's sequence, further
children fork it copy-on-write, a parent with no child is freed. The request emits
nothing until the search ends; then one delta per returned hypothesis holds its whole
text (beams can replace each other's past, so no prefix is final before the end).

Prompt logprobs (`SamplingParams.prompt_logprobs`): the request's prompt chunks carry
their next tokens (`actors.step_scheduler.ScheduledSeq.logprob_targets`); the runner
returns each position's logprob of the token that follows, and the request's first
delta of every choice carries them all (`StepDelta.prompt_logprobs`). A hit's positions
never run, so such a request takes prefix-cache hits only over blocks whose logprobs an
earlier request left in `gpu.prompt_logprobs.PromptLogprobCache` (all but the last of
them; after a preemption too, until it has them all), and one that shares more leading
blocks with a scoring request in flight waits for that one first. A request
with `max_tokens` 0 ends at the end of its prefill without sampling: its choices each
get one delta with no tokens, finish reason "length".
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from actors.step_scheduler import RequestRejected, SchedRequest, StepScheduler, prefix_namespace
from gpu.beam_search import BeamConfig, BeamSearch, Continuation, beam_candidates
from gpu.block_manager import BlockManager
from gpu.config import EngineConfig
from gpu.detokenizer import IncrementalDetokenizer, StopChecker
from gpu.loader import load_checkpoint, weights_fingerprint
from gpu.lora import LoraAdapter, LoraManager
from gpu.model import release_free_heap
from gpu.prompt_logprobs import PromptLogprobCache
from gpu.quantization import calibration_prompts
from gpu.runner import ModelRunner
from gpu.sampling import Sampler, SamplingParams, SamplingParamsError, SeqSamplingState
from gpu.structured import GrammarCompiler, GuidedDecodingError, first_line
from gpu.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)
NOT_FINITE = "the model's output for this request was not a number (NaN or infinity)"

__all__ = ["Engine", "StepDelta", "CompletionOutput", "RequestRejected", "cpu_has_native_bf16", "resolve_dtype",
           "generate"]


@dataclass(frozen=True)
class StepDelta:
    """What one step produced for one choice of one request."""

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" when this choice ended
    request_finished: bool = False  # every choice of the request has ended
    prompt_tokens: int = 0
    completion_tokens: int = 0  # of this choice, so far
    cached_prompt_tokens: int = 0  # prompt tokens its first step found in the prefix cache (not computed)
    # on a choice's first delta when the request asked for prompt logprobs: per prompt
    # position, (logprob of that token given the ones before, ((id, logprob), ...) the k most
    # likely there, the token's rank there (`gpu.runner.PromptLogprobs.ranks`)); position 0
    # has no context: (None, (), None)
    prompt_logprobs: tuple[tuple[float | None, tuple[tuple[int, float], ...], int | None], ...] | None = None
    # finish_reason "error": why this choice failed (its structured-output grammar hit one of
    # llguidance's limits mid-way; or, `fault`, the model's output was not finite); the
    # caller fails the whole request with it (a 400 for the constraint, a 500 for a fault)
    error: str | None = None
    fault: bool = False
    # on a request's last delta: tokens it decoded that no choice returns (the beams a beam
    # search ran and did not return); they cost what returned tokens cost, so they are billed
    unreturned_tokens: int = 0


@dataclass
class _Choice:
    seq_id: str
    index: int
    detok: IncrementalDetokenizer
    stop: StopChecker
    sampling: SeqSamplingState
    finish_reason: str | None = None
    scheduled: bool = True  # False: a fork that ended on its first token and never ran


class _BeamStop:
    """A beam's text as `Engine._beam_text` reads it, for its stop strings, kept from one
    round to the next: a candidate is tested by pushing its one token onto a copy. (Each
    candidate re-decoded its beam's whole text: 2.9 ms at 1000 tokens, 47 ms a step at
    width 8, and every request in the batch waited for it.)"""

    __slots__ = ("detok", "stop", "n", "ended")

    def __init__(self, detok: IncrementalDetokenizer, stop: StopChecker, n: int = 0, ended: bool = False) -> None:
        self.detok, self.stop, self.n, self.ended = detok, stop, n, ended

    @classmethod
    def fresh(cls, tokenizer: Tokenizer, p: SamplingParams) -> _BeamStop:
        return cls(IncrementalDetokenizer(tokenizer, skip_special_tokens=p.skip_special_tokens),
                   StopChecker(tuple(p.stop), p.include_stop_str_in_output))

    def _copy(self) -> _BeamStop:
        return _BeamStop(self.detok.copy(), copy.copy(self.stop), self.n, self.ended)

    def extended(self, tok: int, p: SamplingParams, eos_token_ids: Iterable[int]) -> _BeamStop:
        """This beam with `tok` after it (as `_beam_text`'s loop takes it)."""
        nxt = self._copy()
        nxt.n += 1
        if nxt.ended or nxt.stop.stopped:
            return nxt
        if (tok in eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            nxt.ended = True
            return nxt
        piece = nxt.detok.push(tok)
        if piece:
            nxt.stop.push(piece, armed=nxt.n >= p.min_tokens)
        return nxt

    def stopped(self) -> bool:
        """Whether its text ends at a stop string (`_beam_text(...)[1]`)."""
        if self.stop.stopped:
            return True
        end = self._copy()
        tail = end.detok.finish()
        if tail:
            end.stop.push(tail)
        return end.stop.stopped


@dataclass
class _Request:
    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    max_tokens: int
    arrival: float
    choices: list[_Choice] = field(default_factory=list)
    forked: bool = False
    adapter: str | None = None  # LoRA adapter key, name@version (None: the base model)
    cache_salt: str | None = None  # who shares its cached prefix (`Engine.add_request`)
    priority: int = 0
    beam: BeamSearch | None = None  # a beam search request (it has no `choices` until it ends)
    beam_seqs: list[str] = field(default_factory=list)  # sequence of each running beam
    beam_reports: dict[str, tuple[list[float], list[int]]] = field(default_factory=dict)  # seq -> candidates
    beam_forks: int = 0  # forked beam sequences so far (names them)
    beam_decoded: int = 0  # tokens its beams decoded so far: one per running beam per step
    beam_stops: dict[tuple[int, ...], _BeamStop] = field(default_factory=dict)  # running beams' texts, by tokens
    # prompt logprobs by position (`SamplingParams.prompt_logprobs`), filled as chunks run
    prompt_lp: list[tuple[float | None, tuple[tuple[int, float], ...]] | None] | None = None
    prompt_lp_missing: int = 0  # positions not yet filled
    scoring_blocks: list[int] = field(default_factory=list)  # chain hashes it registered (Engine._scoring_blocks)
    grammar: object | None = None  # the compiled constraint (`params.guided`); each choice runs a copy
    cached_tokens: int = 0  # prompt tokens its first step took from the prefix cache

    @property
    def namespace(self) -> str | None:
        """Its prefix-cache namespace (`actors.step_scheduler.SchedRequest.namespace`)."""
        return prefix_namespace(self.adapter, self.cache_salt)

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done
        return len(self.choices) == (self.params.n if self.forked else 1) and all(
            c.finish_reason for c in self.choices
        )


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bfloat16 dot-product instructions for oneDNN's bf16 GEMMs:
    AVX512-BF16 (Cooper Lake, Sapphire Rapids and later Xeons; AMD Zen 4 and later) or
    AMX tiles. False when torch cannot tell."""
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(p()) for p in probes if p is not None)
    except RuntimeError:
        return False


def resolve_dtype(name: str, device: str, *, native_bf16: bool | None = None) -> torch.dtype:
    """"auto" → the measured-fastest dtype that stays correct on this device: bfloat16 on
    CUDA and on a CPU with native bf16 dot products (`cpu_has_native_bf16`, or
    `native_bf16` when given), float32 on other CPUs.

    Why: a decode step streams every weight once, so halving the bytes is the largest
    lever on a CPU — 1.6-1.7x the engine's throughput on a Zen 4 and ~2x on an AMX Xeon
    (docs/benchmarking.md), with next-token distributions within a small KL of float32's.
    On an AVX2-only CPU oneDNN cannot pack bf16 weights and bf16 runs 2.4x slower than
    float32 (a Zen 1, a 32-row projection); AVX-512 without BF16 is unmeasured, so float32
    stays the choice wherever native bf16 is missing. float32 remains the dtype that is
    token-identical to the transformers reference (greedy runs part at near-ties in bf16).
    """
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        return torch.bfloat16 if native else torch.float32
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of auto, {', '.join(table)}") from None


class Engine:
    """Continuous-batching engine over a paged KV cache (see module docstring)."""

    def __init__(self, config: EngineConfig | None = None, *, checkpoint=None, tokenizer: Tokenizer | None = None):
        self.config = config or EngineConfig()
        if self.config.num_threads > 0:
            torch.set_num_threads(self.config.num_threads)
        self.dtype = resolve_dtype(self.config.dtype, self.config.device)
        ckpt = checkpoint or self._load_checkpoint()
        self.model_config = ckpt.config
        self.weights_fingerprint = weights_fingerprint(ckpt.state_dict)  # (before the runner packs them)
        self.tokenizer = tokenizer or load_tokenizer(ckpt)
        dtype_bytes = torch.tensor([], dtype=self.dtype).element_size()
        cache = self.config.cache
        self.num_blocks = cache.num_blocks_for(self.model_config, dtype_bytes)
        self.max_model_len = min(self.config.scheduler.max_model_len, self.model_config.max_position_embeddings)
        if self.max_model_len < self.config.scheduler.max_model_len:
            log.warning("--max-model-len %d is more than the model's %d positions: %d it is",
                        self.config.scheduler.max_model_len, self.model_config.max_position_embeddings,
                        self.max_model_len)
        self.runner = ModelRunner(
            ckpt, num_blocks=self.num_blocks, block_size=cache.block_size,
            dtype=self.dtype, device=self.config.device, huge_pages=cache.huge_pages,
            batch_invariant=self.config.batch_invariant, quantization=self.config.quantization,
            calibration=calibration_prompts(self.tokenizer) if self.config.quantization != "none" else (),
        )
        del ckpt  # a checkpoint the caller passed stays theirs; a loaded one is freed here...
        release_free_heap()  # ...and its pages, with the loader's other temporaries, go back to the OS
        model = self.runner.model
        self.lora = LoraManager(self.config.lora, self.model_config, self.dtype, self.config.device,
                                scales=model.smoothing_scales())
        # the adapter of every live request, with how many requests hold it: the runner gets
        # these objects, so an adapter the LRU evicts (or a newer version replaces) keeps
        # serving the requests that use it
        self._live_adapters: dict[str, list] = {}  # LoraAdapter.key -> [LoraAdapter, requests]
        self.block_manager = BlockManager(self.num_blocks, cache.block_size, cache.enable_prefix_caching)
        # prompt logprobs by prefix block: with the prefix cache on, scoring requests take hits too
        self.prompt_lp_cache = PromptLogprobCache(cache.block_size,
                                                  self.num_blocks if cache.enable_prefix_caching else 0)
        # scoring requests still computing their prompt's logprobs, by the chain hash of each full
        # block of their prompt; and the scoring requests held back until one of them has its
        # logprobs (they share its leading blocks: see `_stage_or_schedule`)
        self._scoring_blocks: dict[int, str] = {}
        self._staged: dict[str, list[tuple[_Request, SchedRequest]]] = {}
        log.info("engine: %s on %s (dtype %r), %d KV blocks of %d tokens%s%s", str(self.dtype).removeprefix("torch."),
                 self.config.device, self.config.dtype, self.num_blocks, cache.block_size,
                 ", batch-invariant" if self.config.batch_invariant else "",
                 f", {self.config.quantization} GEMMs" if self.config.quantization != "none" else "")
        sched_cfg = self.config.scheduler
        if sched_cfg.max_model_len != self.max_model_len:
            from dataclasses import replace

            sched_cfg = replace(sched_cfg, max_model_len=self.max_model_len)
        self.scheduler = StepScheduler(sched_cfg, self.block_manager)
        self.sampler = Sampler()
        # structured outputs: compiled grammars by spec (admission shares it to check specs early)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self._seq_owner: dict[str, tuple[_Request, _Choice]] = {}
        self._beam_owner: dict[str, _Request] = {}  # sequence of a running beam -> its request
        self._rng = torch.Generator().manual_seed(self.config.seed)
        self.num_steps = 0
        # cumulative counters (exported by the runtime's metrics; read by tests and benchmarks)
        # prefill/decode_tokens_fed: the tokens steps fed to the model in prefill chunks (prompts
        # past their prefix hits, and the recompute of preempted requests) and in decodes (one
        # token a sequence; a 1-token chunk counts here, as the attention treats it)
        self.counters = {"steps": 0, "prompt_tokens": 0, "prefix_hit_tokens": 0,
                         "preemptions": 0, "generated_tokens": 0,
                         "prefill_tokens_fed": 0, "decode_tokens_fed": 0}
        self._started: set[str] = set()
        self.last_step_tokens = 0  # tokens fed to the latest step (prefill chunks + decodes)
        self.last_step_seqs = 0  # sequences in the latest step's plan (prefill chunks, decodes, beams, n>1 choices)

    def _load_checkpoint(self):
        if not self.config.model_cache_dir:
            return load_checkpoint(self.config.model, self.dtype)
        from pathlib import Path

        from gpu.convert import load_cached

        return load_cached(self.config.model, self.dtype, Path(self.config.model_cache_dir))

    # ----------------------------------------------------------------- intake
    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        adapter: str | LoraAdapter | None = None,
        grammar: object | None = None,
        cache_salt: str | None = None,
    ) -> int:
        """Queue a request; returns its prompt length in tokens.

        `cache_salt`: only requests of the same salt share cached prefix blocks (and cached
        prompt logprobs); None shares with every unsalted request (vLLM's `cache_salt`).

        `adapter`: the name of a LoRA adapter to run it with (`gpu.lora.LoraManager`; loaded
        now if it is not), or the adapter itself (loaded already: the runtime loads it off
        the event loop), None for the base model. `grammar`: `params.guided` compiled
        already (`GrammarCompiler.prototype`, as admission does off the event loop); None
        compiles it here (a cache hit if it was compiled before).

        Raises `ValueError` subclasses with a clear message: `SamplingParamsError`
        (bad parameter), `RequestRejected` (can never fit: prompt plus max_tokens
        beyond the context window or the whole KV cache), `gpu.lora.LoraError` (no such
        adapter, or one that cannot be served), or a duplicate id.
        """
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestRejected("prompt is empty")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise RequestRejected(f"prompt token ids must be integers in [0, {vocab})")
        room = self.max_model_len - len(ids)
        if room < (0 if params.max_tokens == 0 else 1):  # a prompt only scored may fill the window
            raise RequestRejected(
                f"prompt is {len(ids)} tokens; this model's context window is {self.max_model_len}"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if len(ids) + max_tokens > self.max_model_len:
            raise RequestRejected(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context window "
                f"of {self.max_model_len} tokens"
            )
        if params.use_beam_search:
            self._check_beams_fit(len(ids), max_tokens, params.beam_width)
        if params.guided is not None and grammar is None:
            try:
                grammar = self.grammars.prototype(params.guided)
            except GuidedDecodingError as e:
                raise SamplingParamsError("guided", str(e)) from None
        lora = self.lora.get(adapter) if isinstance(adapter, str) else adapter
        key = lora.key if lora is not None else None  # name@version: its prefix-cache namespace
        req = _Request(request_id, params, ids, max_tokens, time.monotonic(), adapter=key, priority=priority,
                       grammar=grammar, cache_salt=cache_salt)
        # a prefill-only request (max_tokens 0) is scheduled as one token's; it never samples
        sched = SchedRequest(request_id, list(ids), max(1, max_tokens), priority=priority, adapter=key,
                             cache_salt=cache_salt)
        if params.prompt_logprobs is None:
            self.scheduler.add(sched)
        else:
            self.scheduler.check(sched)
            req.prompt_lp = [(None, (), None)] + [None] * (len(ids) - 1)
            req.prompt_lp_missing = len(ids) - 1
            self._stage_or_schedule(req, sched)
        self.counters["prompt_tokens"] += len(ids)
        self._requests[request_id] = req
        if lora is not None:
            self._hold_adapter(lora)
        if params.use_beam_search:
            req.beam = BeamSearch(self._beam_config(params, max_tokens))
            req.beam_seqs.append(request_id)
            self._beam_owner[request_id] = req
        else:
            req.choices.append(self._new_choice(req, request_id, 0))
            self._seq_owner[request_id] = (req, req.choices[0])
        return len(ids)

    def _check_beams_fit(self, prompt_len: int, max_tokens: int, width: int) -> None:
        """A beam family must fit the running set and the KV cache all at once: held beams
        wait for their siblings (see `actors.step_scheduler.StepScheduler._release_held`)."""
        seats = self.scheduler.config.max_num_seqs
        if width > seats:
            raise RequestRejected(f"beam search with {width} beams; this engine runs at most {seats} sequences")
        per_beam = self.block_manager.blocks_for(prompt_len + max_tokens - 1)
        if width * per_beam > self.num_blocks:
            raise RequestRejected(
                f"{width} beams of prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) need up to "
                f"{width * per_beam} KV blocks; the cache has {self.num_blocks}"
            )

    def _beam_config(self, params: SamplingParams, max_tokens: int) -> BeamConfig:
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= self.eos_token_ids
        return BeamConfig(params.beam_width, max_tokens, frozenset(stops), params.length_penalty,
                          params.early_stopping, params.min_tokens)

    def _new_choice(self, req: _Request, seq_id: str, index: int) -> _Choice:
        p = req.params
        return _Choice(
            seq_id=seq_id,
            index=index,
            detok=IncrementalDetokenizer(self.tokenizer, skip_special_tokens=p.skip_special_tokens),
            stop=StopChecker(tuple(p.stop), p.include_stop_str_in_output),
            sampling=SeqSamplingState.create(p, req.prompt_token_ids, tuple(self.eos_token_ids), child_index=index,
                                             matcher=req.grammar.deep_copy() if req.grammar is not None else None),
        )

    def adapter_key(self, request_id: str) -> str | None:
        """The LoRA adapter a queued or running request runs with, as name@version (its
        `LoraAdapter.key`, read when the request was added); None for the base model."""
        return self._requests[request_id].adapter

    def _hold_adapter(self, lora: LoraAdapter) -> None:
        held = self._live_adapters.setdefault(lora.key, [lora, 0])
        held[1] += 1

    def _drop(self, req: _Request) -> None:
        """Forget a finished or aborted request (its choices are already off the scheduler)."""
        del self._requests[req.request_id]
        if req.scoring_blocks or req.request_id in self._staged:
            self._release_staged(req)
        if req.adapter is not None:
            held = self._live_adapters[req.adapter]
            held[1] -= 1
            if held[1] == 0:
                del self._live_adapters[req.adapter]

    def owner_of(self, seq_id: str) -> str:
        """The request a scheduler sequence (a choice, a beam) belongs to (an unknown id: itself)."""
        owner = self._seq_owner.get(seq_id)
        if owner is not None:
            return owner[0].request_id
        beam = self._beam_owner.get(seq_id)  # (a forked beam: `rid#bK`)
        return beam.request_id if beam is not None else seq_id

    def decoded_tokens(self, request_id: str) -> int:
        """Tokens a running request has decoded so far, over all its choices or beams (0 when
        it is not here). A beam search returns nothing before its end, so what its beams
        ran is billed from this when it is cancelled."""
        req = self._requests.get(request_id)
        if req is None:
            return 0
        if req.beam is not None:
            return req.beam_decoded
        return sum(len(c.sampling.output_token_ids) for c in req.choices)

    def abort(self, request_id: str) -> bool:
        """Drop a request now; its KV blocks are freed before this returns."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        self._drop(req)
        for c in req.choices:
            if c.scheduled:
                self.scheduler.abort(c.seq_id)
            self._seq_owner.pop(c.seq_id, None)
            self._started.discard(c.seq_id)
        self._free_beams(req)
        return True

    def _free_beams(self, req: _Request) -> None:
        for sid in req.beam_seqs:
            self.scheduler.abort(sid)
            self._beam_owner.pop(sid, None)
            self._started.discard(sid)
        req.beam_seqs = []

    # ------------------------------------------------------------------ state
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> dict:
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "kv_usage": self.scheduler.kv_usage,
            "num_blocks": self.num_blocks,
            "requests": len(self._requests),
            **self.counters,
            "lora_loaded": len(self.lora.loaded()),
            **{f"lora_{k}": v for k, v in self.lora.counters.items() if k in ("loads", "reloads", "evictions")},
        }

    # ------------------------------------------------------------------- step
    def step(self) -> list[StepDelta]:
        """One engine step: schedule → run → sample → detokenize/stop → deltas."""
        plan = self.scheduler.schedule()
        self.last_step_seqs = len(plan.seqs)
        self.counters["preemptions"] += len(plan.preempted)  # (a plan of no sequences may preempt too)
        for sid in plan.preempted:
            # a held beam's report goes with its KV: its family waits for it to recompute and
            # report again (advanced on the old one, the family appended a token to a beam
            # still recomputing: the scheduler refuses that, and the step failed)
            if (owner := self._beam_owner.get(sid)) is not None:
                owner.beam_reports.pop(sid, None)
        if not plan.seqs:
            return []
        self.num_steps += 1
        self._count(plan)
        out = self.runner.execute(plan, {name: held[0] for name, held in self._live_adapters.items()})
        # requests failed alone this step (request id -> why): a beam search's logits or a
        # scoring request's prompt logprobs not finite, a beam's or a prefill's output that
        # could not be processed (each of those failed the step, or answered NaN: reviews)
        faulted: dict[str, str] = {}
        self._record_prompt_logprobs(out.prompt_logprobs, faulted)
        # one finiteness check a step (NaN or infinity: a broken adapter, an overflow): a
        # row of it fails its request (a beam search here, a sampled choice in `_emit`),
        # zeroed so that nothing downstream computes on it
        logits_all, unfinite = out.logits, set()
        if logits_all.numel():
            finite = torch.isfinite(logits_all).all(dim=-1)
            if not bool(finite.all()):
                unfinite = set(torch.nonzero(~finite).flatten().tolist())
                for i in unfinite:
                    req = self._requests.get(self.owner_of(out.seq_ids[i]))
                    if req is not None and req.beam is not None:
                        faulted[req.request_id] = NOT_FINITE
                logits_all = torch.where(finite[:, None], logits_all, torch.zeros((), dtype=logits_all.dtype))
        beams_reported = self._report_beams(out.seq_ids, logits_all)
        rows, states, targets, prefilled = self._sampling_batch(out.seq_ids)
        sampled_by_seq: dict[str, int] = {}
        picks: list[tuple[_Request, _Choice, int | None, int, float | None, list | None]] = []
        if rows:
            logits = logits_all
            if rows != list(range(logits.shape[0])):  # copy only for a repeated (n>1) or skipped row
                logits = logits.index_select(0, torch.tensor(rows, dtype=torch.int64))
            broken = {k for k, row in enumerate(rows) if row in unfinite} if unfinite else set()
            res = self.sampler.sample(logits, states, generator=self._rng)
            for k, (req, choice, fork_index) in enumerate(targets):
                tok = res.token_ids[k]
                asked = req.params.logprobs is not None  # (the sampler computes them for every row if any asked)
                lp = res.logprobs[k] if asked and res.logprobs is not None else None
                top = res.top_logprobs[k] if asked and res.top_logprobs is not None else None
                if not fork_index:  # None (plain) or 0 (the parent of an n>1 fork)
                    sampled_by_seq[choice.seq_id] = tok
                picks.append((req, choice, fork_index, tok, lp, top, k in broken))
        held = [sid for req in beams_reported for sid in req.beam_reports] + [c.seq_id for _, c in prefilled]
        self.scheduler.update(plan, sampled_by_seq, held=held)
        for req, choice, fork_index, tok, *_ in picks:  # fork before any choice can finish
            if fork_index:
                self._fork(req, choice, tok)
            if fork_index is not None and fork_index == req.params.n - 1:
                req.forked = True
        deltas = [self._emit_guarded(req, choice, tok, lp, top, fault) for req, choice, _, tok, lp, top, fault in picks]
        for req, choice in prefilled:
            if req.request_id not in faulted:
                deltas += self._guarded(faulted, req, self._end_prefill_only, req, choice)
        for req in beams_reported:
            if len(req.beam_reports) == len(req.beam_seqs) and req.request_id not in faulted:
                deltas += self._guarded(faulted, req, self._advance_beams, req)
        if faulted:
            deltas = [d for d in deltas if d.request_id not in faulted]
            for rid, why in faulted.items():
                req = self._requests.get(rid)
                if req is None:
                    continue
                self.abort(rid)
                log.error("request %s: %s", rid, why)
                deltas.append(StepDelta(
                    request_id=rid, index=0, text="", token_ids=(), logprobs=None, top_logprobs=None,
                    finish_reason="error", request_finished=True, prompt_tokens=len(req.prompt_token_ids),
                    cached_prompt_tokens=req.cached_tokens, completion_tokens=0, error=why, fault=True))
        for rid in {d.request_id for d in deltas}:
            req = self._requests.get(rid)
            if req is not None and req.finished:
                self._drop(req)
        return deltas

    def _count(self, plan) -> None:
        c = self.counters
        c["steps"] += 1
        self.last_step_tokens = plan.num_tokens
        decodes = sum(1 for s in plan.seqs if s.decode)  # (a one-token prompt chunk is prefill)
        c["decode_tokens_fed"] += decodes
        c["prefill_tokens_fed"] += plan.num_tokens - decodes
        for s in plan.seqs:
            if s.request_id not in self._started:
                self._started.add(s.request_id)
                if "#" not in s.request_id:  # forked children start from shared blocks, not hits
                    c["prefix_hit_tokens"] += s.start_pos
                    owner = self._seq_owner.get(s.request_id)
                    req = owner[0] if owner is not None else self._beam_owner.get(s.request_id)  # (a beam search's)
                    if req is not None and not req.cached_tokens:  # (a preempted one starts again)
                        req.cached_tokens = s.start_pos

    def _sampling_batch(self, seq_ids: Iterable[str]):
        """Rows of logits to sample, with their sampling states; n>1 parents get n rows.
        Also the (request, choice) of prefill-only requests whose prefill ended (no row)."""
        rows: list[int] = []
        states: list[SeqSamplingState] = []
        targets: list = []
        prefilled: list[tuple[_Request, _Choice]] = []
        for row, sid in enumerate(seq_ids):
            owner = self._seq_owner.get(sid)
            if owner is None:
                continue
            req, choice = owner
            if req.max_tokens == 0:
                prefilled.append(owner)
            elif req.params.n > 1 and not req.forked:
                for i in range(req.params.n):
                    c = choice if i == 0 else self._new_choice(req, f"{req.request_id}#{i}", i)
                    rows.append(row)
                    states.append(c.sampling)
                    targets.append((req, c, i))
            else:
                rows.append(row)
                states.append(choice.sampling)
                targets.append((req, choice, None))
        return rows, states, targets, prefilled

    def _record_prompt_logprobs(self, chunks, faulted: dict[str, str]) -> None:
        """File the prompt logprobs of this step's chunks (`gpu.runner.PromptLogprobs`) by
        position; once a request has them all, its later chunks stop asking (a recompute
        after preemption would only repeat them) and it may take prefix hits again. A chunk
        of values not finite puts its request in `faulted`, filed nowhere (a review: a
        scoring request answered NaN, and the prompt-logprob cache kept it for the next)."""
        for sid, chunk in chunks.items():
            req = self._requests.get(sid)
            if req is None or req.prompt_lp is None or not req.prompt_lp_missing:
                continue
            if not all(math.isfinite(v) for v in chunk.logprobs) or not all(
                    math.isfinite(v) for row in chunk.top for _, v in row):
                faulted[req.request_id] = NOT_FINITE
                continue
            for i, (lp, top, rank) in enumerate(zip(chunk.logprobs, chunk.top, chunk.ranks, strict=True)):
                pos = chunk.start + i + 1
                if req.prompt_lp[pos] is None:
                    req.prompt_lp_missing -= 1
                req.prompt_lp[pos] = (lp, tuple(top), rank)
            if not req.prompt_lp_missing:
                sched = self.scheduler.get(sid)
                if sched is not None:
                    sched.prompt_logprobs = sched.max_prefix_blocks = None
                self.prompt_lp_cache.store(req.prompt_token_ids, req.namespace, req.params.prompt_logprobs,
                                           req.prompt_lp)
                self._release_staged(req)

    def _stage_or_schedule(self, req: _Request, sched: SchedRequest) -> None:
        """Schedule a scoring request, or hold it back until a scoring request in flight that
        shares at least two more of its leading full blocks than the prompt-logprob cache
        knows has its logprobs (then those blocks come from the caches instead of running
        twice: the answers of a multiple-choice question sent together)."""
        cache = self.prompt_lp_cache
        hashes = cache.block_hashes(req.prompt_token_ids, req.namespace)
        known = cache.lookup(req.prompt_token_ids, req.namespace, req.params.prompt_logprobs, hashes)
        shared, owner = 0, None
        for i, h in enumerate(hashes):
            rid = self._scoring_blocks.get(h)
            if rid is None:
                break
            shared, owner = i + 1, rid
        if cache.max_blocks and owner is not None and shared - len(known) // cache.block_size >= 2:
            self._staged.setdefault(owner, []).append((req, sched))
            return
        self._schedule_scoring(req, sched, hashes, known)

    def _schedule_scoring(self, req: _Request, sched: SchedRequest, hashes: list[int], known: list) -> None:
        """Fill what the prompt-logprob cache knows of `req`'s prompt (`known`, its lookup),
        then schedule it: with at most all but the last known block as prefix hits (the last
        one's last position must run: its logits give the next token's logprob)."""
        for pos in range(1, len(known)):
            if req.prompt_lp[pos] is None:
                req.prompt_lp[pos] = known[pos]
                req.prompt_lp_missing -= 1
        if req.prompt_lp_missing:
            sched.prompt_logprobs = req.params.prompt_logprobs
            sched.max_prefix_blocks = max(0, len(known) // self.block_manager.block_size - 1)
            for h in hashes:
                if self._scoring_blocks.setdefault(h, req.request_id) == req.request_id:
                    req.scoring_blocks.append(h)
        self.scheduler.add(sched)

    def _release_staged(self, req: _Request) -> None:
        """`req` has its prompt logprobs (or is gone): forget its blocks, schedule what waited on it."""
        for h in req.scoring_blocks:
            if self._scoring_blocks.get(h) == req.request_id:
                del self._scoring_blocks[h]
        req.scoring_blocks = []
        for waiting, sched in self._staged.pop(req.request_id, ()):
            if waiting.request_id in self._requests:
                self._stage_or_schedule(waiting, sched)

    def _prompt_logprobs_out(self, req: _Request):
        """`StepDelta.prompt_logprobs` of the request (None unless it asked for them)."""
        if req.prompt_lp is None:
            return None
        if req.prompt_lp_missing:  # the engine's own invariant: every prompt chunk ran before a sample
            raise RuntimeError(f"request {req.request_id!r} samples before its prompt logprobs are complete")
        return tuple(req.prompt_lp)

    def _end_prefill_only(self, req: _Request, choice: _Choice) -> list[StepDelta]:
        """A max_tokens-0 request ran its prompt: end it, one empty delta per choice."""
        self.scheduler.finish(choice.seq_id)
        self._seq_owner.pop(choice.seq_id, None)
        self._started.discard(choice.seq_id)
        choice.finish_reason = "length"
        for i in range(1, req.params.n):
            extra = self._new_choice(req, f"{req.request_id}#{i}", i)
            extra.scheduled = False
            extra.finish_reason = "length"
            req.choices.append(extra)
        req.forked = True
        prompt_lp = self._prompt_logprobs_out(req)
        n = len(req.choices)
        return [StepDelta(request_id=req.request_id, index=c.index, text="", token_ids=(), finish_reason="length",
                          request_finished=i == n - 1, prompt_tokens=len(req.prompt_token_ids),
                          cached_prompt_tokens=req.cached_tokens, prompt_logprobs=prompt_lp)
                for i, c in enumerate(req.choices)]

    def _fork(self, req: _Request, choice: _Choice, tok: int) -> None:
        """Choice `choice.index` (≥ 1) of an n>1 request forks from choice 0 after its prefill.

        The child shares the parent's KV blocks (copy-on-write) and starts with its
        own first token, sampled from the same logits row as the parent's.
        """
        parent_id = req.choices[0].seq_id
        parent = self.scheduler.get(parent_id)
        if req.max_tokens <= 1:  # its first token is its last: nothing to schedule (`_emit` ends it)
            choice.scheduled = False
            req.choices.append(choice)
            self._seq_owner[choice.seq_id] = (req, choice)
            return
        child = SchedRequest(
            choice.seq_id, list(req.prompt_token_ids), req.max_tokens,
            output_token_ids=[tok], num_computed_tokens=parent.num_computed_tokens, priority=req.priority,
            adapter=req.adapter, cache_salt=req.cache_salt,
        )
        self.scheduler.fork(parent_id, child)
        req.choices.append(choice)
        self._seq_owner[choice.seq_id] = (req, choice)

    # ------------------------------------------------------------ beam search
    def _report_beams(self, seq_ids: Sequence[str], logits: torch.Tensor) -> list[_Request]:
        """Score the candidates of every beam that ran this step (stored in its request's
        `beam_reports`; a preemption drops a beam's report, `step`); returns the requests."""
        by_req: dict[str, tuple[_Request, list[int], list[str]]] = {}
        for row, sid in enumerate(seq_ids):
            req = self._beam_owner.get(sid)
            if req is not None:
                entry = by_req.setdefault(req.request_id, (req, [], []))
                entry[1].append(row)
                entry[2].append(sid)
        for req, rows, sids in by_req.values():
            index = {sid: i for i, sid in enumerate(req.beam_seqs)}
            states = [
                SeqSamplingState(req.params, req.prompt_token_ids, req.beam.running[index[sid]].tokens,
                                 None, tuple(self.eos_token_ids))
                for sid in sids
            ]
            picked = logits.index_select(0, torch.tensor(rows, dtype=torch.int64))
            cands = beam_candidates(picked, states, req.beam.config.candidates_per_beam)
            req.beam_reports.update(zip(sids, cands, strict=True))
        return [entry[0] for entry in by_req.values()]

    def _advance_beams(self, req: _Request) -> list[StepDelta]:
        """Every beam of `req` reported: pick the next beams and move their sequences
        (continue, fork copy-on-write, free); at the end, the request's deltas."""
        beam = req.beam
        old = req.beam_seqs
        stop_hit = None
        tested: dict[tuple[int, ...], _BeamStop] = {}
        if req.params.stop:
            def stop_hit(parent: int, token: int) -> bool:
                tokens = tuple(beam.running[parent].tokens)
                state = req.beam_stops.get(tokens)
                if state is None:  # (the first round, or a beam not met before: read from its start)
                    state = _BeamStop.fresh(self.tokenizer, req.params)
                    for t in tokens:
                        state = state.extended(t, req.params, self.eos_token_ids)
                    req.beam_stops[tokens] = state
                cand = tested[(*tokens, token)] = state.extended(token, req.params, self.eos_token_ids)
                return cand.stopped()
        nxt = beam.advance([req.beam_reports[sid] for sid in old], stop_hit)
        if tested:  # the running beams' texts, for the next round
            req.beam_stops = {key: tested[key] for b in beam.running if (key := tuple(b.tokens)) in tested}
        req.beam_reports.clear()
        self.counters["generated_tokens"] += len(old)
        req.beam_decoded += len(old)
        if beam.done:
            self._free_beams(req)
            return self._beam_deltas(req)
        seqs, continued = self._move_beams(req, old, nxt)
        for i, sid in enumerate(old):
            if i not in continued:
                self.scheduler.finish(sid)
                self._beam_owner.pop(sid, None)
                self._started.discard(sid)
        for sid, token in continued.values():
            self.scheduler.append(sid, token)
        req.beam_seqs = seqs
        return []

    def _move_beams(self, req: _Request, old: list[str], nxt: list[Continuation]):
        """Sequences of the next beams: a parent's first child is the parent's sequence
        (its token appended by the caller); later children fork it. Returns the sequences
        in beam order and {parent index: (sequence, token)} of the continued ones."""
        seqs: list[str] = []
        continued: dict[int, tuple[str, int]] = {}
        for c in nxt:
            parent_sid = old[c.parent]
            if c.parent not in continued:
                continued[c.parent] = (parent_sid, c.token)
                seqs.append(parent_sid)
                continue
            req.beam_forks += 1
            child_sid = f"{req.request_id}#b{req.beam_forks}"
            parent = self.scheduler.get(parent_sid)
            self.scheduler.fork(parent_sid, SchedRequest(
                child_sid, list(req.prompt_token_ids), req.max_tokens,
                output_token_ids=[*parent.output_token_ids, c.token], priority=req.priority, adapter=req.adapter,
                cache_salt=req.cache_salt,
            ))
            self._beam_owner[child_sid] = req
            seqs.append(child_sid)
        return seqs, continued

    def _beam_text(self, req: _Request, tokens: Sequence[int]) -> tuple[str, bool]:
        """(text, stopped by a stop string) of a beam's tokens, by the rules of `_emit`."""
        p = req.params
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=p.skip_special_tokens)
        stop = StopChecker(tuple(p.stop), p.include_stop_str_in_output)
        text = ""
        for n, tok in enumerate(tokens, start=1):
            if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                break
            piece = detok.push(tok)
            if piece:
                text += stop.push(piece, armed=n >= p.min_tokens)[0]
                if stop.stopped:
                    return text, True
        tail = detok.finish()
        if tail:
            text += stop.push(tail)[0]
        if not stop.stopped:
            text += stop.flush()
        return text, stop.stopped

    def _beam_deltas(self, req: _Request) -> list[StepDelta]:
        """The `n` best hypotheses of a finished beam search, one whole delta each."""
        hyps = req.beam.results(req.params.n)
        with_lp = req.params.logprobs is not None
        unreturned = max(0, req.beam_decoded - sum(len(h.tokens) for h in hyps))
        deltas = []
        for i, h in enumerate(hyps):
            deltas.append(StepDelta(
                request_id=req.request_id,
                index=i,
                text=self._beam_text(req, h.tokens)[0],
                token_ids=h.tokens,
                logprobs=h.logprobs if with_lp else None,
                top_logprobs=tuple(() for _ in h.tokens) if with_lp else None,
                finish_reason=h.finish_reason,
                request_finished=i == len(hyps) - 1,
                prompt_tokens=len(req.prompt_token_ids),
                cached_prompt_tokens=req.cached_tokens,
                completion_tokens=len(h.tokens),
                prompt_logprobs=self._prompt_logprobs_out(req),
                unreturned_tokens=unreturned if i == len(hyps) - 1 else 0,
            ))
        return deltas

    def _guarded(self, faulted: dict[str, str], req: _Request, fn, *args) -> list[StepDelta]:
        """`fn(*args)`'s deltas; when it raises, none, and `req` is in `faulted` (it fails
        alone, not the step)."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 — one request's output must not fail the others
            log.exception("request %s: its output could not be processed", req.request_id)
            faulted.setdefault(req.request_id, f"the server failed to process this request's output "
                                                f"({type(e).__name__})")
            return []

    def _emit_guarded(self, req: _Request, choice: _Choice, tok: int, lp, top, fault: bool) -> StepDelta:
        """`_emit`, and when it raises (detokenizing, a stop string, a constraint's matcher:
        what one request's output runs through) that choice alone ends with "error", a
        `fault`: raised out of the step, it failed every request of the batch (an audit: one
        tenant's output that tripped the detokenizer failed every other tenant's)."""
        try:
            return self._emit(req, choice, tok, lp, top, fault)
        except Exception as e:  # noqa: BLE001 — one request's output must not fail the others
            log.exception("request %s: its output could not be processed", req.request_id)
            choice.finish_reason = "error"
            if choice.scheduled:
                with contextlib.suppress(Exception):  # (_emit may have finished it already)
                    self.scheduler.finish(choice.seq_id)
            self._seq_owner.pop(choice.seq_id, None)
            self._started.discard(choice.seq_id)
            return StepDelta(
                request_id=req.request_id, index=choice.index, text="", token_ids=(), logprobs=None,
                top_logprobs=None, finish_reason="error", request_finished=req.finished,
                prompt_tokens=len(req.prompt_token_ids), cached_prompt_tokens=req.cached_tokens,
                completion_tokens=len(choice.sampling.output_token_ids),
                error=f"the server failed to process this request's output ({type(e).__name__})", fault=True)

    def _emit(self, req: _Request, choice: _Choice, tok: int, lp, top, fault: bool = False) -> StepDelta:
        """Record a sampled token for one choice, check stop conditions, build its delta.

        EOS and stop token ids end the choice without adding text; a stop string
        ends it with the text cut before the match (the checker never lets part
        of a stop string out); a constrained choice whose text is complete ends with
        "stop" at once; max_tokens / the context window end it with "length". A choice
        whose logits were not finite (`fault`) ends with "error", the token unshown: an
        audit saw such a row sample the last id of the vocabulary to the cap, answered
        200, with `NaN` logprobs, and stored in the response cache.
        """
        p = req.params
        st = choice.sampling
        st.accept(tok)
        n_out = len(st.output_token_ids)
        self.counters["generated_tokens"] += 1
        reason = None
        emit = ""
        error = None
        if fault:
            reason = "error"
            error = NOT_FINITE
            log.error("request %s: %s", req.request_id, error)
        elif st.matcher is not None and st.matcher.is_error():
            # the grammar hit one of llguidance's limits: this token was not constrained, and
            # nothing after it can be; the choice (and its request) fails, the token unshown
            reason = "error"
            error = f"the output constraint failed after {n_out - 1} tokens: {first_line(st.matcher.get_error())}"
            log.warning("request %s: %s", req.request_id, error)
        elif (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"  # the sampler bans these below min_tokens
        else:
            text = choice.detok.push(tok)
            if text:  # below min_tokens stop strings do not match either (as vLLM)
                emit, stopped, _ = choice.stop.push(text, armed=n_out >= p.min_tokens)
                if stopped:
                    reason = "stop"
            if reason is None and st.grammar_done:
                reason = "stop"
        if reason is None and (n_out >= req.max_tokens or len(req.prompt_token_ids) + n_out >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if not choice.stop.stopped and error is None:
                tail = choice.detok.finish()
                if tail:  # (a character cut short, as U+FFFD: a stop string may match it too)
                    text, stopped, _ = choice.stop.push(tail, armed=n_out >= p.min_tokens)
                    emit += text
                    if stopped:
                        reason = "stop"
                if not choice.stop.stopped:
                    emit += choice.stop.flush()
            choice.finish_reason = reason
            if choice.scheduled:
                self.scheduler.finish(choice.seq_id)
            self._seq_owner.pop(choice.seq_id, None)
            self._started.discard(choice.seq_id)
        return StepDelta(
            request_id=req.request_id,
            index=choice.index,
            text=emit,
            token_ids=(tok,) if error is None else (),  # a token sampled past a broken grammar is not output
            logprobs=(lp,) if lp is not None else None,
            top_logprobs=(tuple(top),) if top is not None else None,
            finish_reason=reason,
            request_finished=reason is not None and req.finished,
            prompt_tokens=len(req.prompt_token_ids),
            cached_prompt_tokens=req.cached_tokens,
            completion_tokens=n_out,
            prompt_logprobs=self._prompt_logprobs_out(req) if n_out == 1 else None,
            error=error,
            fault=fault,
        )


@dataclass
class CompletionOutput:
    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None = None
    prompt_logprobs: list[tuple[float | None, tuple[tuple[int, float], ...], int | None]] | None = None  # StepDelta's
    error: str | None = None  # finish_reason "error": why (StepDelta.error)


def generate(
    engine: Engine,
    prompts: Sequence[str | Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    adapter: str | None | Sequence[str | None] = None,
) -> list[list[CompletionOutput]]:
    """Offline batch generation: run every prompt to completion, continuously batched.

    `adapter`: a LoRA adapter name for every prompt, or one per prompt (None: the base model).
    Returns, per prompt, its `n` choices in index order.
    """
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    outs: dict[str, dict[int, CompletionOutput]] = {}
    order = []
    adapters = [adapter] * len(prompts) if adapter is None or isinstance(adapter, str) else list(adapter)
    for i, (prompt, p, a) in enumerate(zip(prompts, params, adapters, strict=True)):
        rid = f"gen-{i}"
        engine.add_request(rid, prompt, p, adapter=a)
        order.append(rid)
        outs[rid] = {}
    while engine.has_unfinished():
        for d in engine.step():
            c = outs[d.request_id].setdefault(d.index, CompletionOutput(d.request_id, d.index, "", [], None))
            c.text += d.text
            c.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                c.logprobs = (c.logprobs or []) + list(d.logprobs)
            if d.prompt_logprobs is not None:
                c.prompt_logprobs = list(d.prompt_logprobs)
            if d.finish_reason:
                c.finish_reason = d.finish_reason
                c.error = d.error
    return [[outs[rid][k] for k in sorted(outs[rid])] for rid in order]
