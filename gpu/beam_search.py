"""Beam search: the pure selection logic, and the scoring of one step's logits.

A beam search request keeps `width` running beams that all have the same number of
output tokens. Each round, every running beam reports its best candidates (its
`candidates_per_beam` most likely next tokens, with log-probabilities) and `advance`
picks the next beams. The rule is Hugging Face transformers' (`_beam_search`, 5.x),
so that greedy-equivalent output is token-identical to `model.generate(num_beams=k)`:

1. Every candidate scores `beam.score + logprob` (summed log-probabilities). The best
   K = max(2, 1 + #stop ids) · width of all of them, best first, are looked at.
2. A candidate *hits* when its token is a stop id (EOS unless ignore_eos, or a
   `stop_token_ids` entry), when a stop string now matches (`stop_hit`), or when it
   reaches max_tokens.
3. The next beams are the best `width` candidates that do not hit.
4. Candidates that hit *and* rank among the best `width` become finished hypotheses,
   scored `summed logprob / length ** length_penalty` (length counts the stop token),
   unless the search can no longer improve (below) or, with `early_stopping=True`,
   `width` hypotheses already exist. Only the best `width` hypotheses are kept.
5. Improvement is possible while fewer than `width` hypotheses exist or the best
   running beam's score over `L ** length_penalty` beats the worst hypothesis. L is the
   current length (`early_stopping=False`) or, for "never" with a positive penalty,
   max_tokens. Once impossible, it stays so.
6. The search ends when no improvement is possible, when `early_stopping=True` and
   `width` hypotheses exist, when every candidate looked at hits, or when no beam runs.

This module knows nothing of the KV cache: the engine maps beams to sequences (a
beam that continues keeps its sequence; a second child forks it copy-on-write; a
beam with no child is freed) and calls `advance` once every running beam reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gpu.sampling import SeqSamplingState, apply_logit_bias, apply_penalties, apply_token_bans

# The score Hugging Face gives an empty hypothesis slot; a real score is far above it.
_NO_SCORE = -1.0e9


@dataclass(frozen=True)
class BeamConfig:
    """One request's beam search settings (from its `SamplingParams`)."""

    width: int
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()  # EOS (unless ignore_eos) and stop_token_ids
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    min_tokens: int = 0  # stop ids are masked below it (by `beam_candidates`), stop strings unarmed

    @property
    def candidates_per_beam(self) -> int:
        """K: how many candidates are looked at, so that `width` survive K - width hits."""
        return max(2, 1 + len(self.stop_token_ids)) * self.width


@dataclass
class Beam:
    """A running beam: its output tokens, their logprobs, and the summed logprob."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    score: float = 0.0


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam. `score` is length-normalized; `finish_reason` "stop" or "length"."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    score: float
    finish_reason: str


@dataclass(frozen=True)
class Continuation:
    """A next running beam: beam `parent` of the previous round extended by `token`."""

    parent: int
    token: int
    logprob: float


# stop_hit(parent index, token) -> does the parent's text plus this token match a stop string?
StopHit = Callable[[int, int], bool]


class BeamSearch:
    """The state of one request's beam search (see the module docstring)."""

    def __init__(self, config: BeamConfig) -> None:
        if config.width < 1 or config.max_tokens < 1:
            raise ValueError("beam search needs width >= 1 and max_tokens >= 1")
        self.config = config
        self.running: list[Beam] = [Beam()]  # one beam until the first round: all would be equal
        self.finished: list[Hypothesis] = []  # best first, at most `width`
        self.improvable = True
        self.done = False

    @property
    def length(self) -> int:
        """Output tokens every running beam has."""
        return len(self.running[0].tokens) if self.running else 0

    def advance(
        self, candidates: Sequence[tuple[Sequence[float], Sequence[int]]], stop_hit: StopHit | None = None
    ) -> list[Continuation]:
        """One round. `candidates[i]` = beam i's (scores, token ids[, the model's logprobs of
        them]), best first: a beam ranks by its scores (the log-probabilities after
        penalties and `logit_bias`), and keeps the model's own logprobs (the scores when
        not given) as what its tokens report.

        Returns the next running beams (also applied to `self.running`), best first; sets
        `done` when the search is over (the running beams are then to be dropped).
        """
        cfg = self.config
        if self.done:
            raise RuntimeError("the beam search is over")
        if len(candidates) != len(self.running):
            raise ValueError(f"{len(self.running)} beams run, {len(candidates)} reported")
        length = self.length + 1  # of every candidate
        pool = [
            (beam.score + lp, i, tok, raw)
            for i, (beam, cand) in enumerate(zip(self.running, candidates, strict=True))
            for lp, tok, raw in zip(cand[0], cand[1], cand[2] if len(cand) > 2 else cand[0], strict=True)
        ]
        pool.sort(key=lambda c: -c[0])  # stable: ties keep beam order, then candidate order
        top = pool[: cfg.candidates_per_beam]
        at_max = length >= cfg.max_tokens
        armed = length >= cfg.min_tokens

        def hits(c: tuple[float, int, int, float]) -> str | None:
            if c[2] in cfg.stop_token_ids or (armed and stop_hit is not None and stop_hit(c[1], c[2])):
                return "stop"
            return "length" if at_max else None

        reasons = [hits(c) for c in top]
        nxt = [c for c, r in zip(top, reasons, strict=True) if r is None][: cfg.width]
        self._add_finished(top[: cfg.width], reasons[: cfg.width], length)
        previous = self.running
        self.running = [
            Beam(previous[i].tokens + [tok], previous[i].logprobs + [lp], score) for score, i, tok, lp in nxt
        ]
        self._update_improvable(length)
        full = len(self.finished) >= cfg.width
        self.done = (
            not self.improvable
            or (cfg.early_stopping is True and full)
            or all(r is not None for r in reasons)
            or not self.running
        )
        return [Continuation(i, tok, lp) for _, i, tok, lp in nxt]

    def _add_finished(self, ranked: list, reasons: list[str | None], length: int) -> None:
        cfg = self.config
        if not self.improvable or (cfg.early_stopping is True and len(self.finished) >= cfg.width):
            return
        added = False
        for (score, i, tok, lp), reason in zip(ranked, reasons, strict=True):
            if reason is None:
                continue
            beam = self.running[i]
            self.finished.append(Hypothesis(
                tuple(beam.tokens) + (tok,), tuple(beam.logprobs) + (lp,),
                score / (length ** cfg.length_penalty), reason,
            ))
            added = True
        if added:
            self.finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
            del self.finished[cfg.width:]

    def _update_improvable(self, length: int) -> None:
        cfg = self.config
        if not self.improvable or len(self.finished) < cfg.width or not self.running:
            return
        best_length = cfg.max_tokens if cfg.early_stopping == "never" and cfg.length_penalty > 0 else length
        best_possible = self.running[0].score / (best_length ** cfg.length_penalty)
        self.improvable = best_possible > self.finished[-1].score

    def results(self, n: int) -> list[Hypothesis]:
        """The `n` best hypotheses, best first (running beams fill in, as "length", should
        fewer than `n` have finished)."""
        out = list(self.finished[:n])
        for beam in self.running[: n - len(out)]:
            out.append(Hypothesis(tuple(beam.tokens), tuple(beam.logprobs),
                                  beam.score / (max(1, len(beam.tokens)) ** self.config.length_penalty), "length"))
        return out


@torch.no_grad()
def beam_candidates(
    logits: torch.Tensor, states: Sequence[SeqSamplingState], k: int
) -> list[tuple[list[float], list[int], list[float]]]:
    """Each row's `k` best candidates, best first, from logits (B, V): (their scores, token
    ids, the model's own logprobs of them — what `logprobs` reports, as for sampling).

    Scores are log_softmax of the raw logits, then the min_tokens mask (-inf), the
    repetition/frequency/presence penalties and the logit_bias applied to the log-probabilities — Hugging
    Face applies its logits processors after the log-softmax in beam search, so the
    masked mass is not renormalized. `states[i]` holds row i's beam (its output tokens).
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be (B={len(states)}, V), got {tuple(logits.shape)}")
    raw = logits.float().log_softmax(dim=-1)
    lp = apply_logit_bias(apply_penalties(apply_token_bans(raw.clone(), states), states), states)
    vals, ids = lp.topk(min(k, lp.shape[1]), dim=-1)
    return list(zip(vals.tolist(), ids.tolist(), raw.gather(1, ids).tolist(), strict=True))
