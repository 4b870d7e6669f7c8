"""Sampling parameters and the batched sampler.

`SamplingParams` is what a request asks for (OpenAI / vLLM names and meanings); it is
a frozen `msgspec.Struct` because it travels inside actor messages. It is validated
on construction (a bad value raises `SamplingParamsError`, whose `.field` names it,
for the gateway's 400) and on decode (msgspec re-raises the same message as
`msgspec.ValidationError`).

`Sampler.sample` turns one step's logits `(B, V)` into one token per row. Every
transformation is a batched tensor op over the rows that need it:

    raw logits ──▶ min_tokens mask ──▶ repetition penalty (prompt + output, HF)
               ──▶ frequency / presence penalties (output counts, OpenAI) ──▶ logit_bias
               ──▶ grammar mask (structured outputs, `gpu.structured`)
               ──▶ greedy rows: argmax
               ──▶ random rows: / temperature ──▶ top-k ──▶ top-p ──▶ min-p
                               ──▶ inverse-CDF draw (one uniform per row)

Top-k / top-p rows work on their best K = max(1024, top_k) candidates (`topk`, not a
full sort; exact, with a full-sort fallback, see `truncated_candidates`). The input
logits are never modified.

The draw picks index i with probability p_i: the first index whose cumulative
probability exceeds u · total, u ~ U[0, 1). Each *seeded* row draws its u from its own
`torch.Generator`: a seeded request produces the same tokens whatever else is in the
batch, as long as its logits are the same.

Logprobs are those of the *raw* model distribution, `log_softmax(logits)` before any
penalty, mask, temperature or truncation (vLLM's default "raw logprobs"); they say
how likely the model found the token, not how likely this sampler was to pick it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import torch

from gpu import layer_ops
from gpu.structured import GuidedDecoding, allowed_tokens, apply_bitmask, check_shape, fill_bitmask

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
MAX_N = 64
MAX_LOGIT_BIAS = 1024
MAX_STOP_TOKEN_IDS = 1024  # as logit_bias: a request cannot name more ids than that
# Temperatures below this are treated as greedy (dividing by ~0 overflows).
GREEDY_EPS = 1e-5


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range. `.field` names it (as in the OpenAI request)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid sampling parameter {field!r}: {message}")
        self.field = field
        self.reason = message


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens for one request. Defaults follow vLLM/OpenAI.

    temperature 0 means greedy; top_k 0 or -1 disables top-k; logprobs None disables
    logprobs, k returns the sampled token's logprob plus the k most likely
    alternatives (k ≤ 20). `stop` strings end generation (the stop string is not
    returned unless include_stop_str_in_output); `stop_token_ids` end it too and, like
    EOS, are masked until `min_tokens` tokens exist; stop strings match only from the
    `min_tokens`-th token's text on (vLLM's rule). `ignore_eos` keeps generating
    past EOS (EOS is then an ordinary token, not masked). `seed` makes sampling
    reproducible regardless of batch composition; with n > 1, sample i uses seed + i.

    `use_beam_search` decodes by beam search instead of sampling (`gpu.beam_search`):
    `best_of` beams (default `n`) run, and the `n` best finished hypotheses are returned.
    It is deterministic: the scores are the model's log-probabilities (after the
    min_tokens mask and the penalties, applied to log-probabilities as Hugging Face
    does), so temperature and seed do not apply, and top_k/top_p/min_p, which would
    restrict sampling, are refused. `length_penalty` divides a hypothesis's summed
    log-probability by its length to that power; `early_stopping` is Hugging Face's
    stopping rule (False: a heuristic, True: stop once `best_of` hypotheses exist,
    "never": the canonical search).

    `prompt_logprobs` k (vLLM's name) returns, for every prompt token after the first,
    its logprob given the tokens before it plus the k most likely tokens there (raw model
    distribution, as `logprobs`): scoring a text. `max_tokens` 0 runs the prompt only
    (prefill) and generates nothing: with `prompt_logprobs`, a pure scoring request.

    `guided` constrains the text to a JSON schema, any JSON object, a regex, one of a list
    of strings or a grammar (`gpu.structured.GuidedDecoding`; OpenAI's `response_format`,
    vLLM's `guided_*`): tokens that would leave the language are never sampled, and the
    choice ends ("stop") as soon as the text is complete. Not with beam search.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # (token id, bias) pairs, sorted by id: added to those logits before sampling (OpenAI's
    # logit_bias; a dict is accepted too); -100 all but bans a token, +100 all but forces it
    logit_bias: tuple[tuple[int, float], ...] = ()
    use_beam_search: bool = False
    best_of: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    prompt_logprobs: int | None = None
    guided: GuidedDecoding | None = None

    def __post_init__(self) -> None:
        # A bare string is a common client shape for `stop` ("stop": "\n").
        if isinstance(self.stop, str):
            msgspec.structs.force_setattr(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            msgspec.structs.force_setattr(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            msgspec.structs.force_setattr(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias
        if isinstance(bias, dict | list | tuple):  # → ((id, bias), ...) sorted: one form, one cache key
            try:
                pairs = tuple(sorted((k, v) for k, v in (bias.items() if isinstance(bias, dict) else bias)))
            except (TypeError, ValueError):
                pairs = None  # not pairs of comparable ids: `_validate` says what is wrong
            if pairs is not None:
                msgspec.structs.force_setattr(self, "logit_bias", pairs)
        _validate(self)

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax (temperature ~0 or top_k 1)."""
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def beam_width(self) -> int:
        """Beams a beam search runs (`best_of`, else `n`); 0 when sampling."""
        if not self.use_beam_search:
            return 0
        return self.best_of if self.best_of is not None else self.n


def _check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise SamplingParamsError(name, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise SamplingParamsError(name, f"must be <= {hi}, got {value}")


def _check_float(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SamplingParamsError(name, f"must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or value > hi:
        left = "(" if lo_open else "["
        raise SamplingParamsError(name, f"must be in {left}{lo}, {hi}], got {value}")


def _validate(p: SamplingParams) -> None:
    _check_int("n", p.n, 1, MAX_N)
    _check_float("temperature", p.temperature, 0.0, 100.0)
    _check_int("top_k", p.top_k, -1)
    _check_float("top_p", p.top_p, 0.0, 1.0, lo_open=True)
    _check_float("min_p", p.min_p, 0.0, 1.0)
    _check_float("repetition_penalty", p.repetition_penalty, 0.0, 10.0, lo_open=True)
    _check_float("frequency_penalty", p.frequency_penalty, -2.0, 2.0)
    _check_float("presence_penalty", p.presence_penalty, -2.0, 2.0)
    if p.seed is not None:
        _check_int("seed", p.seed, 0, 2**63 - 1 - MAX_N)
    if not isinstance(p.stop, tuple):
        raise SamplingParamsError("stop", f"must be a string or a list of strings, got {p.stop!r}")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise SamplingParamsError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(p.stop)}")
    for s in p.stop:
        if not isinstance(s, str):
            raise SamplingParamsError("stop", f"stop strings must be strings, got {s!r}")
        if not s:
            raise SamplingParamsError("stop", "stop strings must not be empty")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise SamplingParamsError("stop", f"a stop string is longer than {MAX_STOP_STRING_CHARS} characters")
    if not isinstance(p.stop_token_ids, tuple) or len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise SamplingParamsError("stop_token_ids", f"must be a list of at most {MAX_STOP_TOKEN_IDS} token ids")
    for t in p.stop_token_ids:
        _check_int("stop_token_ids", t, 0)
    if p.max_tokens is not None:
        _check_int("max_tokens", p.max_tokens, 0)
    _check_int("min_tokens", p.min_tokens, 0)
    if p.max_tokens is not None and p.min_tokens > p.max_tokens:
        raise SamplingParamsError(
            "min_tokens", f"min_tokens ({p.min_tokens}) must be <= max_tokens ({p.max_tokens})"
        )
    if p.logprobs is not None:
        _check_int("logprobs", p.logprobs, 0, MAX_LOGPROBS)
    if p.prompt_logprobs is not None:
        _check_int("prompt_logprobs", p.prompt_logprobs, 0, MAX_LOGPROBS)
    if p.guided is not None:
        problem = check_shape(p.guided) if isinstance(p.guided, GuidedDecoding) else "must be a GuidedDecoding"
        if problem is not None:
            raise SamplingParamsError("guided", problem)
        # a stop would cut the text where the constraint does not end it: a "stop" that breaks it
        for name in ("stop", "stop_token_ids"):
            if getattr(p, name) and not p.guided.stoppable:
                raise SamplingParamsError(name, "cannot be combined with an output constraint (a schema, regex, "
                                                "choice, grammar or tool call): the constraint decides where the "
                                                "text ends")
    if not isinstance(p.logit_bias, tuple) or len(p.logit_bias) > MAX_LOGIT_BIAS:
        raise SamplingParamsError("logit_bias", f"must map at most {MAX_LOGIT_BIAS} token ids to biases")
    for pair in p.logit_bias:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise SamplingParamsError("logit_bias", "must map token ids to biases")
        _check_int("logit_bias", pair[0], 0)
        _check_float("logit_bias", pair[1], -100.0, 100.0)
    if len({t for t, _ in p.logit_bias}) != len(p.logit_bias):
        raise SamplingParamsError("logit_bias", "a token id is listed twice")
    for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "use_beam_search"):
        if not isinstance(getattr(p, name), bool):
            raise SamplingParamsError(name, f"must be a boolean, got {getattr(p, name)!r}")
    _validate_beam_search(p)


def _validate_beam_search(p: SamplingParams) -> None:
    """`best_of`, `length_penalty`, `early_stopping`, and what beam search cannot combine with."""
    if p.best_of is not None:
        _check_int("best_of", p.best_of, 1, MAX_N)
        if p.best_of < p.n:
            raise SamplingParamsError("best_of", f"best_of ({p.best_of}) must be >= n ({p.n})")
        if not p.use_beam_search and p.best_of != p.n:
            raise SamplingParamsError("best_of", "best_of > n is supported with use_beam_search only")
    _check_float("length_penalty", p.length_penalty, -10.0, 10.0)
    if not (isinstance(p.early_stopping, bool) or p.early_stopping == "never"):
        raise SamplingParamsError("early_stopping", f"must be true, false or \"never\", got {p.early_stopping!r}")
    if not p.use_beam_search:
        return
    if p.max_tokens == 0:
        raise SamplingParamsError("max_tokens", "beam search generates at least one token")
    if p.guided is not None:
        raise SamplingParamsError("guided", "structured outputs (a schema, regex, choice or grammar) are not "
                                            "supported with beam search")
    for name, off in (("top_k", p.top_k in (0, -1)), ("top_p", p.top_p == 1.0), ("min_p", p.min_p == 0.0)):
        if not off:
            raise SamplingParamsError(name, "restricts sampling, and beam search does not sample")
    if p.logprobs:
        raise SamplingParamsError(
            "logprobs", "beam search returns each token's logprob but no top alternatives "
                        "(completions: logprobs 0; chat: top_logprobs 0 or none)"
        )


# ----------------------------------------------------------------- per-sequence state
def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `seed` on `device` (must match the logits' device)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class SeqSamplingState:
    """What the sampler needs to know about one running sequence.

    The engine owns it and appends each sampled token to `output_token_ids`.
    `generator` is None for unseeded requests (the sampler's own randomness is used).
    `matcher` is the sequence's `llguidance.LLMatcher` when its request is constrained
    (`params.guided`): the sampler masks by it, the engine advances it (`accept`).
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    eos_token_ids: tuple[int, ...] = ()
    matcher: object | None = None

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        eos_token_ids: Sequence[int] = (),
        *,
        child_index: int = 0,
        device: torch.device | str = "cpu",
        matcher: object | None = None,
    ) -> SeqSamplingState:
        """State for sample `child_index` of a request; seeded children use seed + child_index.
        `matcher`: a fresh matcher of `params.guided` (`gpu.structured.GrammarCompiler.matcher`)."""
        gen = None
        if params.seed is not None:
            gen = make_generator(params.seed + child_index, device)
        return cls(params, prompt_token_ids, [], gen, tuple(eos_token_ids), matcher)

    def accept(self, token_id: int) -> None:
        """Record a sampled token (and advance the grammar, if any)."""
        self.output_token_ids.append(token_id)
        if self.matcher is not None and not self.matcher.is_stopped():
            self.matcher.consume_token(token_id)

    @property
    def grammar_done(self) -> bool:
        """True once a constrained sequence's text is complete (or its grammar failed)."""
        return self.matcher is not None and self.matcher.is_stopped()

    def banned_token_ids(self) -> tuple[int, ...]:
        """Ids that may not be sampled now: stop ids (and EOS unless ignore_eos) below min_tokens."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return ()
        eos = () if self.params.ignore_eos else self.eos_token_ids
        return tuple(dict.fromkeys((*eos, *self.params.stop_token_ids)))


def make_states(
    params: SamplingParams,
    prompt_token_ids: Sequence[int],
    eos_token_ids: Sequence[int] = (),
    device: torch.device | str = "cpu",
) -> list[SeqSamplingState]:
    """The `params.n` sequence states of one request (child i seeded with seed + i).

    Seeded children are reproducible and (since their seeds differ) different from each
    other; unseeded children differ because they draw different noise rows.
    """
    return [
        SeqSamplingState.create(params, prompt_token_ids, eos_token_ids, child_index=i, device=device)
        for i in range(params.n)
    ]


@dataclass(frozen=True)
class SamplerOutput:
    """One step's result, row i for batch entry i.

    `logprobs[i]` is the raw-distribution logprob of `token_ids[i]` and `top_logprobs[i]`
    the `params.logprobs` most likely (id, logprob) pairs, best first; both are None
    when no row asked for logprobs, and rows that did not ask get an empty list.
    """

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


# ------------------------------------------------------------------------ sampler
class Sampler:
    """Batched sampler; `seed` seeds the randomness of unseeded requests (None: random)."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _engine_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    @torch.no_grad()
    def sample(
        self,
        logits: torch.Tensor,
        batch: Sequence[SeqSamplingState],
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        """One token per row of `logits` (B, V) float32, row i sampled with `batch[i]`.

        Unseeded rows draw their noise from `generator` when given (the engine's), else
        from the sampler's own; seeded rows always use their state's generator.
        """
        if logits.dim() != 2 or logits.shape[0] != len(batch):
            raise ValueError(f"logits must be (B={len(batch)}, V), got {tuple(logits.shape)}")
        raw = logits.float()
        params = [s.params for s in batch]
        x = raw
        if any(_modifies_logits(s) for s in batch):
            x = raw.clone()  # raw is kept for logprobs
            x = apply_logit_bias(apply_penalties(apply_token_bans(x, batch), batch), batch)
            x = apply_grammars(x, raw, batch)

        tokens = torch.empty(len(batch), dtype=torch.long, device=x.device)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if greedy_rows:
            tokens[_index(greedy_rows, x)] = layer_ops.argmax(_take_rows(x, greedy_rows))
        if random_rows:
            picked = self._sample_random(
                _take_rows(x, random_rows), [batch[i] for i in random_rows], generator
            )
            tokens[_index(random_rows, x)] = picked
        return _logprobs_output(raw, tokens.tolist(), params)

    def _sample_random(
        self, x: torch.Tensor, batch: Sequence[SeqSamplingState], generator: torch.Generator | None
    ) -> torch.Tensor:
        """Tokens (R,) for non-greedy rows of penalized logits `x` (R, V).

        Rows with top-k/top-p are sampled among their sorted candidates only (compact,
        no full-vocabulary scatter); the others over the whole vocabulary.
        """
        dev = x.device
        rows, vocab = x.shape
        params = [s.params for s in batch]
        if any(p.temperature != 1.0 for p in params):
            x = x / _column([p.temperature for p in params], dev)  # (R, V)
        out = torch.empty(rows, dtype=torch.long, device=dev)
        trunc = [i for i, p in enumerate(params) if _truncates(p, vocab)]
        dense = [i for i, p in enumerate(params) if not _truncates(p, vocab)]
        if dense:
            probs = _apply_min_p(_take_rows(x, dense).softmax(dim=-1), [params[i] for i in dense])
            out[_index(dense, x)] = self._draw(probs, [batch[i] for i in dense], generator)  # probs: (D, V)
        if trunc:
            sub = [params[i] for i in trunc]
            vals, ids = truncated_candidates(_take_rows(x, trunc), sub)  # (T, K) best first
            probs = _apply_min_p(vals.softmax(dim=-1), sub)  # (T, K)
            pick = self._draw(probs, [batch[i] for i in trunc], generator)  # (T,)
            out[_index(trunc, x)] = ids.gather(1, pick[:, None]).flatten()
        return out

    def _draw(
        self, probs: torch.Tensor, batch: Sequence[SeqSamplingState], generator: torch.Generator | None
    ) -> torch.Tensor:
        """One categorical draw per row of `probs` (R, W) (unnormalised, ≥ 0).

        Inverse CDF: one uniform per row, `searchsorted` in the row's float64 cumulative
        sum. (This replaced an exponential race, argmax(p / Exp(1)), which drew W noise
        values per row: 20 ms of a 136 ms decode step at 24 rows on CPU.) Seeded rows
        draw their uniform from their own generator, unseeded rows from `generator` (the
        engine's) or the sampler's. One value per row, whatever the batch or the candidate
        width, so a seeded row's stream does not depend on the rest of the batch. float64
        keeps the cumulative sum's rounding (~1e-16 per step) far below the smallest
        probability that can matter.
        """
        rows, width = probs.shape
        dev = probs.device
        u = torch.empty(rows, dtype=torch.float64, device=dev)
        unseeded = []
        for i, s in enumerate(batch):
            if s.generator is not None:
                u[i] = _uniform((1,), s.generator, dev)[0]
            else:
                unseeded.append(i)
        if unseeded:
            gen = generator or self._engine_generator(dev)
            u[_index(unseeded, u)] = _uniform((len(unseeded),), gen, dev)
        cdf = probs.double().cumsum_(dim=-1)  # (R, W)
        target = (u * cdf[:, -1]).unsqueeze(1)  # (R, 1) in [0, total)
        picked = torch.searchsorted(cdf, target, right=True).clamp_max_(width - 1)  # first cdf > target
        # right=True never lands on a zero-probability entry unless rounding put target at
        # the very total; then take the row's most likely token instead
        zero = probs.gather(1, picked).squeeze(1) <= 0
        if bool(zero.any()):
            picked[zero] = probs[zero].argmax(dim=-1, keepdim=True)
        return picked.squeeze(1)


def _modifies_logits(s: SeqSamplingState) -> bool:
    p = s.params
    return (
        s.matcher is not None
        or bool(s.banned_token_ids())
        or bool(p.logit_bias)
        or p.repetition_penalty != 1.0
        or p.frequency_penalty != 0.0
        or p.presence_penalty != 0.0
    )


def _index(rows: list[int], x: torch.Tensor) -> torch.Tensor | slice:
    return slice(None) if len(rows) == x.shape[0] else torch.tensor(rows, device=x.device)


def _take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] without a copy when `rows` is every row (the common, homogeneous batch)."""
    return x if len(rows) == x.shape[0] else x[torch.tensor(rows, device=x.device)]


def _uniform(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """U[0, 1) float64 values drawn on the generator's own device, then moved to `device`.

    Drawing where the generator lives lets a CPU generator drive CUDA logits, and makes
    a seeded request's samples the same on either device (given the same logits).
    """
    return torch.rand(shape, dtype=torch.float64, device=gen.device, generator=gen).to(device)


# ------------------------------------------------------------------ logits processing
def apply_token_bans(logits: torch.Tensor, batch: Sequence[SeqSamplingState]) -> torch.Tensor:
    """Set banned ids (EOS / stop ids below min_tokens) to -inf, in place."""
    rows: list[int] = []
    cols: list[int] = []
    vocab = logits.shape[1]
    for i, s in enumerate(batch):
        for t in s.banned_token_ids():
            if t < vocab:
                rows.append(i)
                cols.append(t)
    if rows:
        logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = -math.inf
    return logits


def apply_grammars(logits: torch.Tensor, raw: torch.Tensor, batch: Sequence[SeqSamplingState]) -> torch.Tensor:
    """Mask the rows of constrained sequences to the tokens their grammar allows next, in place
    (`gpu.structured.apply_bitmask`; `raw` is the fallback where the request's bans leave none)."""
    rows = [i for i, s in enumerate(batch) if s.matcher is not None]
    if not rows:
        return logits
    vocab = logits.shape[1]
    allowed = allowed_tokens(fill_bitmask([batch[i].matcher for i in rows], vocab), vocab, logits.device)
    if len(rows) == logits.shape[0]:
        return apply_bitmask(logits, allowed, raw)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = apply_bitmask(logits[index], allowed, raw[index])
    return logits


def apply_logit_bias(logits: torch.Tensor, batch: Sequence[SeqSamplingState]) -> torch.Tensor:
    """Add each row's `logit_bias` to its logits, in place (ids beyond the vocabulary are skipped;
    the gateway's admission refuses them with a 400)."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    vocab = logits.shape[1]
    for i, s in enumerate(batch):
        for t, b in s.params.logit_bias:
            if t < vocab:
                rows.append(i)
                cols.append(t)
                vals.append(b)
    if rows:
        dev = logits.device
        idx = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
        logits.index_put_(idx, torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)
    return logits


def _padded(seqs: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """(R, L) ids, each row padded by repeating its first id (a duplicate is harmless below)."""
    width = max(1, max((len(s) for s in seqs), default=1))
    out = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        row = torch.as_tensor(s if isinstance(s, list) else list(s), dtype=torch.long)
        out[i, : len(row)] = row
        out[i, len(row):] = row[0]
    return out.to(device)


def apply_penalties(logits: torch.Tensor, batch: Sequence[SeqSamplingState]) -> torch.Tensor:
    """Repetition (HF: prompt + output) then frequency/presence (OpenAI: output) penalties, in place.

    Repetition: a logit l of a token seen in prompt or output becomes l / r if l > 0
    else l * r. Frequency/presence: l -= f * count + p * (count > 0), counts over the
    output only. Only rows with a non-neutral penalty are touched, and only at the
    positions of their seen tokens: the work is O(rows × sequence length), not O(rows × V)
    (apart from one count table for frequency penalties). A token listed twice is
    written twice with the same value, so duplicates need no special care.
    """
    vocab = logits.shape[1]
    dev = logits.device
    rep_rows = [
        i for i, s in enumerate(batch)
        if s.params.repetition_penalty != 1.0 and (s.prompt_token_ids or s.output_token_ids)
    ]
    if rep_rows:
        ids = _padded(
            [[*batch[i].prompt_token_ids, *batch[i].output_token_ids] for i in rep_rows], dev
        ).clamp_(max=vocab - 1)  # (R, L)
        rows = torch.tensor(rep_rows, device=dev)[:, None].expand_as(ids)  # (R, L)
        r = _column([batch[i].params.repetition_penalty for i in rep_rows], dev)  # (R, 1)
        seen = logits[rows, ids]  # (R, L)
        logits[rows, ids] = torch.where(seen > 0, seen / r, seen * r)
    fp_rows = [
        i for i, s in enumerate(batch)
        if (s.params.frequency_penalty != 0.0 or s.params.presence_penalty != 0.0)
        and s.output_token_ids
    ]
    if fp_rows:
        ids = _padded([batch[i].output_token_ids for i in fp_rows], dev).clamp_(max=vocab - 1)
        lengths = torch.tensor([len(batch[i].output_token_ids) for i in fp_rows], device=dev)
        real = torch.arange(ids.shape[1], device=dev)[None, :] < lengths[:, None]  # (R, L)
        counts = torch.zeros((len(fp_rows), vocab), dtype=torch.float32, device=dev)
        counts.scatter_add_(1, ids, real.float())  # padding adds 0
        c = counts.gather(1, ids)  # (R, L) count of the token at each position
        f = _column([batch[i].params.frequency_penalty for i in fp_rows], dev)
        p = _column([batch[i].params.presence_penalty for i in fp_rows], dev)
        rows = torch.tensor(fp_rows, device=dev)[:, None].expand_as(ids)
        logits[rows, ids] = logits[rows, ids] - f * c - p * (c > 0).float()
    return logits


# Candidates examined for top-p before falling back to sorting the whole vocabulary.
TOP_P_CANDIDATES = 1024


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def _truncates(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1.0


def truncated_candidates(
    x: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p on temperature-scaled logits `x` (R, V), kept compact.

    Returns `(vals, ids)`, both (R, K), best first: the logits of each row's candidates
    with the dropped ones at -inf, and their token ids. Top-p is taken on the
    top-k-renormalized distribution (HF order) and always keeps the best token.

    Instead of sorting all V logits (the slow part of sampling), it takes the best
    K = max(TOP_P_CANDIDATES, largest top_k) with `topk`. That is exact: top-k keeps a
    prefix of at most K; a nucleus is the shortest prefix reaching mass p, so it fits
    in K whenever those K already hold mass p. Rows where they do not (a very flat
    distribution) are redone with a full sort.
    """
    rows, vocab = x.shape
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    widest = max((k for k in ks if k < vocab), default=0)
    width = min(vocab, max(TOP_P_CANDIDATES, widest))
    vals, ids = x.topk(width, dim=-1)  # (R, K), sorted best first
    vals, overflow = _cut(vals, x, ks, [p.top_p for p in params])
    if overflow.any():
        vals, ids = x.sort(dim=-1, descending=True)  # (R, V)
        vals, _ = _cut(vals, x, ks, [p.top_p for p in params])
    return vals, ids


def _cut(
    vals: torch.Tensor, x: torch.Tensor, ks: Sequence[int], top_ps: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask sorted candidate logits `vals` (R, K) by top-k and top-p; flag rows needing more."""
    rows, width = vals.shape
    vocab = x.shape[1]
    dev = vals.device
    k = torch.tensor(ks, device=dev)[:, None]  # (R, 1); vocab = off
    vals = vals.masked_fill(torch.arange(width, device=dev)[None, :] >= k, -torch.inf)
    top_p = _column(top_ps, dev)  # (R, 1)
    has_k = k < vocab
    # Mass of each candidate in the distribution top-p sees: renormalized over top-k,
    # else over the whole vocabulary (candidates beyond K included via logsumexp of x).
    lse = torch.where(has_k[:, 0], vals.logsumexp(dim=-1), x.logsumexp(dim=-1))  # (R,)
    probs = (vals - lse[:, None]).exp()  # (R, K)
    cum = probs.cumsum(dim=-1)
    drop = (cum - probs > top_p) & (top_p < 1.0)
    drop[:, 0] = False  # always keep the best token
    overflow = (~has_k[:, 0]) & (top_p[:, 0] < 1.0) & (cum[:, -1] < top_p[:, 0]) & (width < vocab)
    return vals.masked_fill(drop, -torch.inf), overflow


def _apply_min_p(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zero probabilities below min_p × the row's best, and renormalize (only if asked)."""
    if not any(p.min_p > 0.0 for p in params):
        return probs
    floor = probs.amax(dim=-1, keepdim=True) * _column([p.min_p for p in params], probs.device)
    probs = probs.masked_fill(probs < floor, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def processed_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The sampling distribution (R, V) of non-greedy rows as a dense tensor.

    Temperature, then top-k, top-p, min-p (Hugging Face's warper order). The sampler
    uses the same functions but stays compact; this dense form is for inspection and tests.
    """
    dev = logits.device
    rows, vocab = logits.shape
    x = logits / _column([p.temperature for p in params], dev)  # (R, V)
    trunc = [i for i, p in enumerate(params) if _truncates(p, vocab)]
    if trunc:
        idx = torch.tensor(trunc, device=dev)
        vals, ids = truncated_candidates(x[idx], [params[i] for i in trunc])
        x[idx] = torch.full_like(x[idx], -torch.inf).scatter_(1, ids, vals)
    return _apply_min_p(x.softmax(dim=-1), params)


def _logprobs_output(
    raw: torch.Tensor, tokens: list[int], params: Sequence[SamplingParams]
) -> SamplerOutput:
    wanted = [p.logprobs for p in params]
    if all(k is None for k in wanted):
        return SamplerOutput(token_ids=tokens)
    lp = raw.log_softmax(dim=-1)  # (B, V)
    tok = torch.tensor(tokens, device=raw.device)[:, None]
    chosen = lp.gather(1, tok).flatten().tolist()
    kmax = max((k or 0) for k in wanted)
    top: list[list[tuple[int, float]]] = [[] for _ in params]
    if kmax > 0:
        vals, ids = lp.topk(kmax, dim=-1)  # (B, kmax)
        vals_l, ids_l = vals.tolist(), ids.tolist()
        for i, k in enumerate(wanted):
            if k:
                top[i] = chosen_first_among_ties(list(zip(ids_l[i][:k], vals_l[i][:k], strict=True)),
                                                 tokens[i], chosen[i])
    return SamplerOutput(token_ids=tokens, logprobs=chosen, top_logprobs=top)


def chosen_first_among_ties(top: list[tuple[int, float]], token: int, logprob: float) -> list[tuple[int, float]]:
    """`top` (best first, as topk gives it) with `token`, the one sampled, first among the
    alternatives whose logprob equals its own, taking the place of the last of them if topk
    cut it off. topk orders ties as it likes, and greedy's argmax picks by its own rule: in
    bfloat16, where exact ties are common, the greedy token came second in its own
    `top_logprobs`, and a client rebuilding the greedy text from `top_logprobs[0]` got
    another text (OpenAI's answers list the sampled token first among equals)."""
    for j, (_, value) in enumerate(top):
        if value == logprob:
            if top[j][0] == token:
                return top
            rest = [pair for pair in top if pair[0] != token]
            if len(rest) == len(top):
                rest.pop()  # (a tie too: top is sorted, and its j-th equals the token's)
            return [*rest[:j], (token, logprob), *rest[j:]]
    return top
