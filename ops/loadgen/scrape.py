"""Timeline of queued and running requests, scraped from the target's `/metrics`; and
the target's counters over the measured window (`fetch_counters`, `counter_delta`).

Any Prometheus text exposition with gauges whose names end in
``num_requests_waiting`` / ``num_requests_running`` works: lmgate's
``lmgate_num_requests_*``, vLLM's ``vllm:num_requests_*``, the baseline's
``hf_static_num_requests_*``. Series with labels are summed. A target without
such gauges (or without `/metrics`) gives no timeline; that is not an error.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import trio

WAITING, RUNNING = "num_requests_waiting", "num_requests_running"


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the benchmark start
    waiting: float
    running: float


def _series(text: str) -> Iterator[tuple[str, str, float]]:
    """(series as exposed, metric name, value) of each sample line of a Prometheus text
    exposition; comments and lines whose value is not a number are skipped."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            number = float(value)
        except ValueError:
            continue
        yield key.strip(), key.split("{", 1)[0].strip(), number


def parse_queue_gauges(text: str) -> tuple[float, float] | None:
    """(waiting, running) from a Prometheus text exposition, or None if absent."""
    found: dict[str, float] = {}
    for _, name, value in _series(text):
        for suffix in (WAITING, RUNNING):
            if name.endswith(suffix):
                found[suffix] = found.get(suffix, 0.0) + value
    if WAITING not in found and RUNNING not in found:
        return None
    return found.get(WAITING, 0.0), found.get(RUNNING, 0.0)


async def scrape_timeline(
    http: httpx.AsyncClient, base_url: str, t0: float, out: list[Sample], interval: float = 0.5
) -> None:
    """Append a Sample to `out` every `interval` seconds until cancelled. Returns at
    once if the first scrape finds no queue gauges (404, refused, other metrics)."""
    url = base_url.rstrip("/") + "/metrics"
    first = True
    while True:
        try:
            resp = await http.get(url, timeout=5.0)
            values = parse_queue_gauges(resp.text) if resp.status_code == 200 else None
        except httpx.HTTPError:
            values = None
        if values is None:
            if first:
                return
        else:
            out.append(Sample(time.perf_counter() - t0, values[0], values[1]))
        first = False
        await trio.sleep(interval)


_COUNTER_SUFFIXES = ("_total", "_sum", "_count")


def parse_counters(text: str) -> dict[str, float]:
    """Every counter-like series of a Prometheus text exposition — names ending in
    `_total`, or a histogram's `_sum`/`_count` — keyed as exposed, labels included
    (`lmgate_step_tokens_total{kind="decode"}`). Malformed lines are skipped."""
    return {key: value for key, name, value in _series(text) if name.endswith(_COUNTER_SUFFIXES)}


async def fetch_counters(http: httpx.AsyncClient, base_url: str) -> dict[str, float] | None:
    """`parse_counters` of the target's `/metrics` now, or None if it has none (404,
    refused, timed out): a target without metrics is not an error."""
    try:
        resp = await http.get(base_url.rstrip("/") + "/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    return parse_counters(resp.text) if resp.status_code == 200 else None


def counter_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """What each counter gained between two scrapes (series new in `after` count from 0);
    empty if either scrape failed. A counter that went down (the target restarted) is left
    out rather than reported negative."""
    if before is None or after is None:
        return {}
    out = {}
    for key, value in after.items():
        gained = value - before.get(key, 0.0)
        if gained >= 0:
            out[key] = gained
    return out
