"""Per-request timings → the figures `vllm bench serve` reports (same names).

Definitions (all per *completed* request unless noted):

- TTFT: send → first chunk carrying generated text.
- ITL: gaps between consecutive text-carrying chunks (one list per request; a
  chunk with several tokens counts as one gap, as in vLLM).
- TPOT = (E2E latency − TTFT) / (output tokens − 1); requests with one output
  token have no TPOT.
- E2E latency (e2el): send → last byte of the response.
- Throughputs divide by the benchmark's wall duration (first send → last finish).
- Goodput: completed requests meeting *every* given SLO, per second.
- Peak concurrency: most requests in flight at one instant (from send/finish times).

Times are seconds in `RequestResult`, milliseconds in the report (like vLLM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestResult:
    """What one request did. `start` is its send time (seconds, any monotonic origin)."""

    index: int
    success: bool = False
    error: str = ""
    tenant: str = ""
    start: float = 0.0
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    cached: bool = False
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """`["ttft:500", "e2el:2000"]` → {"ttft": 0.5, "e2el": 2.0} (SLOs in ms → seconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput expects NAME:MS with NAME in {SLO_METRICS}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput expects NAME:MS with MS a number, got {item!r}") from None
        if not ms > 0:
            raise ValueError(f"goodput SLO must be > 0 ms, got {item!r}")
        slos[name] = ms / 1000.0
    return slos


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--percentiles expects numbers in (0, 100], got {text!r}") from None
    if not values or any(not 0 < p <= 100 for p in values):
        raise ValueError(f"percentiles must be in (0, 100], got {text!r}")
    return values


def meets_slos(r: RequestResult, slos: Mapping[str, float]) -> bool:
    """A completed request is good if every given SLO holds (a missing TPOT — one
    output token — counts as meeting the TPOT SLO)."""
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.latency}
    return all(values[k] is None or values[k] <= limit for k, limit in slos.items())


def peak_concurrency(intervals: Sequence[tuple[float, float]]) -> int:
    """Most intervals open at one instant; an interval ending exactly when another
    starts does not overlap it."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def _summary(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=float) * 1000.0
    if ms.size == 0:
        ms = np.zeros(1)
    out = {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(ms.std()),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def compute_metrics(
    results: Sequence[RequestResult],
    duration: float,
    *,
    slos: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = (99.0,),
) -> dict[str, float]:
    """The summary of one run (vLLM's key names). `duration` in seconds, > 0."""
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    done = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_len for r in done)
    out: dict[str, float] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_concurrent_requests": peak_concurrency([(r.start, r.start + r.latency) for r in done]),
        "cached_responses": sum(r.cached for r in done),
    }
    if slos:
        out["request_goodput"] = sum(meets_slos(r, slos) for r in done) / duration
    series = {
        "ttft": [r.ttft for r in done],
        "tpot": [t for r in done if (t := r.tpot) is not None],
        "itl": [g for r in done for g in r.itl],
        "e2el": [r.latency for r in done],
    }
    for name in LATENCY_METRICS:
        out.update(_summary(name, series[name], percentiles))
    return out


def per_request_arrays(results: Sequence[RequestResult]) -> dict[str, list]:
    """The per-request arrays of the saved JSON (vLLM's names), in request order."""
    rs = sorted(results, key=lambda r: r.index)
    return {
        "input_lens": [r.prompt_len for r in rs],
        "output_lens": [r.output_len for r in rs],
        "ttfts": [r.ttft if r.success else None for r in rs],
        "itls": [r.itl for r in rs],
        "e2els": [r.latency if r.success else None for r in rs],
        "start_times": [r.start for r in rs],
        "tenants": [r.tenant for r in rs],
        "errors": [r.error for r in rs],
    }
