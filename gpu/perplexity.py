"""Perplexity of a text under the served model, from prompt logprobs (as llama.cpp's
`llama-perplexity` and Hugging Face's "perplexity of fixed-length models" guide).

A text longer than the window is scored in overlapping windows (Hugging Face's sliding
window): window w covers tokens [w*stride, w*stride + window); it scores only the tokens
the windows before it did not, each given up to `window - stride` tokens of context
before the region. A window's first token has no context in it, so it is never scored:
the text's first token, and with `stride == window` (windows that do not overlap) the
first token of every window, are left out, as in Hugging Face's method::

    tokens   0 ......................................... N
    win 0    [ scored ........... )
    win 1             [ context  | scored ..... )
    win 2                        [ context  | scored ...)

All windows run as one batch of prefill-only requests (`max_tokens` 0,
`prompt_logprobs` 0); perplexity = exp(-mean logprob of the scored tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    start: int  # the window is tokens [start, end)
    end: int
    first_scored: int  # tokens [first_scored, end) are scored here


def windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows of a text of `num_tokens` tokens (pure; see the module docstring)."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window; got window {window}, stride {stride}")
    if num_tokens < 2:
        raise ValueError("a text needs at least 2 tokens to score")
    out: list[Window] = []
    scored_to = 1  # token 0 has no context
    start = 0
    while scored_to < num_tokens:
        end = min(start + window, num_tokens)
        first = max(scored_to, start + 1)
        if end > first:
            out.append(Window(start, end, first))
        scored_to = max(scored_to, end)
        start += stride
    return out


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    mean_logprob: float
    windows: int


def perplexity(engine, token_ids: Sequence[int], *, window: int, stride: int) -> PerplexityResult:
    """Score `token_ids` with `engine` (a `gpu.engine.Engine`) window by window, batched."""
    from gpu.engine import generate
    from gpu.sampling import SamplingParams

    wins = windows(len(token_ids), window, stride)
    outs = generate(engine, [list(token_ids[w.start : w.end]) for w in wins],
                    SamplingParams(max_tokens=0, prompt_logprobs=0))
    total, count = 0.0, 0
    for w, [o] in zip(wins, outs, strict=True):
        for lp, *_ in o.prompt_logprobs[w.first_scored - w.start :]:
            total += lp
            count += 1
    mean = total / count
    return PerplexityResult(math.exp(-mean), count, mean, len(wins))


__all__ = ["PerplexityResult", "Window", "perplexity", "windows"]
