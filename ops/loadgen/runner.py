"""Run one workload against one target: warm-ups, then the timed schedule, with an
optional concurrency cap, a progress bar and the queue timeline scraper.

`--max-concurrency` follows vLLM: the arrival schedule is kept, but a request
whose send time has come waits for a free slot, and its timings start when it is
actually sent (so the cap shows up in throughput, not in TTFT).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
from tqdm import tqdm

from ops.loadgen.backends import SendOptions, Target, open_sender, resolve_model
from ops.loadgen.dataset import BenchRequest
from ops.loadgen.metrics import RequestResult
from ops.loadgen.scrape import Sample, counter_delta, fetch_counters, scrape_timeline


@dataclass(frozen=True)
class RunConfig:
    max_concurrency: int | None = None
    streams_per_socket: int = 16  # lmgate-ws: requests multiplexed on one WebSocket
    scrape_interval: float = 0.5  # seconds; 0 disables the /metrics timeline
    progress: bool = True
    timeout: float = 600.0  # per request

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be >= 1, got {self.max_concurrency}")


@dataclass
class RunOutcome:
    target: Target
    model: str
    results: list[RequestResult]
    duration: float
    timeline: list[Sample] = field(default_factory=list)
    warmup_failures: int = 0
    # the target's counters gained over the measured requests (warm-ups excluded):
    # `scrape.counter_delta`; empty when the target exposes no /metrics
    server_counters: dict[str, float] = field(default_factory=dict)


async def run_workload(
    target: Target,
    requests: Sequence[BenchRequest],
    warmups: Sequence[BenchRequest],
    opts: SendOptions,
    cfg: RunConfig,
    *,
    desc: str = "",
) -> RunOutcome:
    async with open_sender(target, streams_per_socket=cfg.streams_per_socket, timeout=cfg.timeout) as (send, http):
        model = await resolve_model(http, target)

        warm = [RequestResult(r.index) for r in warmups]
        if warmups:
            async with trio.open_nursery() as nursery:
                for r, res in zip(warmups, warm, strict=True):
                    nursery.start_soon(send, model, r, opts, res)
        warmup_failures = sum(not r.success for r in warm)
        if warmups and warmup_failures == len(warmups):
            raise RuntimeError(f"{target.label}: every warm-up request failed, e.g. {warm[0].error}")

        results = [RequestResult(r.index, tenant=r.tenant.label if r.tenant else "") for r in requests]
        limiter = trio.CapacityLimiter(cfg.max_concurrency) if cfg.max_concurrency else None
        bar = tqdm(total=len(requests), desc=desc or target.label, disable=not cfg.progress, file=sys.stderr, leave=False)
        timeline: list[Sample] = []

        async def one(req: BenchRequest, res: RequestResult) -> None:
            if limiter is None:
                await send(model, req, opts, res)
            else:
                async with limiter:
                    await send(model, req, opts, res)
            bar.update(1)

        before = await fetch_counters(http, target.base_url)
        t0 = time.perf_counter()
        async with trio.open_nursery() as outer:
            if cfg.scrape_interval > 0:
                outer.start_soon(scrape_timeline, http, target.base_url, t0, timeline, cfg.scrape_interval)
            async with trio.open_nursery() as nursery:
                for req, res in zip(requests, results, strict=True):
                    if not math.isinf(req.send_at):
                        await trio.sleep_until(trio.current_time() + max(0.0, t0 + req.send_at - time.perf_counter()))
                    nursery.start_soon(one, req, res)
            duration = time.perf_counter() - t0
            outer.cancel_scope.cancel()
        server = counter_delta(before, await fetch_counters(http, target.base_url))
        bar.close()
        for res in results:
            res.start -= t0
    return RunOutcome(target, model, results, duration, timeline, warmup_failures, server)
