"""The HF static-batching baseline: its batching rule (pure) and, with the real
model, the server end to end driven by the load generator."""

from __future__ import annotations

import json
import math

import pytest
import trio

from ops.baselines.hf_static_server import BaselineConfig, next_batch, serve
from ops.bench_serve import build_parser, run
from ops.loadgen.backends import SendOptions, Target
from ops.loadgen.dataset import LengthRange, RandomSpec, build_workload
from ops.loadgen.runner import RunConfig, run_workload


def test_full_batch_starts_at_once() -> None:
    assert next_batch([0.0, 0.0, 0.01], now=0.01, batch_size=2, max_wait=1.0) == (2, 0.0)


def test_partial_batch_waits_for_the_oldest_to_reach_max_wait() -> None:
    n, wait = next_batch([10.0, 10.02], now=10.03, batch_size=8, max_wait=0.05)
    assert n == 0 and wait == pytest.approx(0.02)
    assert next_batch([10.0, 10.02], now=10.05, batch_size=8, max_wait=0.05) == (2, 0.0)


def test_empty_queue_waits_forever() -> None:
    assert next_batch([], now=1.0, batch_size=8, max_wait=0.05) == (0, math.inf)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        BaselineConfig(batch_size=0)
    with pytest.raises(ValueError):
        BaselineConfig(max_wait_ms=-1)


@pytest.fixture
async def baseline_url(nursery: trio.Nursery) -> str:  # type: ignore[misc]
    stop = trio.Event()
    urls = await nursery.start(
        lambda task_status: serve(BaselineConfig(port=0, batch_size=4, max_wait_ms=20), shutdown_trigger=stop.wait,
                                  task_status=task_status)
    )
    yield urls[0]
    stop.set()


@pytest.mark.slow
async def test_load_generator_against_baseline(baseline_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = RandomSpec(LengthRange(8, 16), LengthRange(3, 5))
    requests = build_workload(spec, 6, math.inf, 1.0, seed=0)
    with trio.fail_after(120):
        outcome = await run_workload(Target(baseline_url, label="baseline"), requests, [],
                                     SendOptions(ignore_eos=True), RunConfig(progress=False, scrape_interval=0.2))
    assert [r.error for r in outcome.results] == [""] * 6
    # ignore_eos: exactly the asked-for lengths; usage gives the exact prompt lengths
    assert [r.output_len for r in outcome.results] == [r.output_len for r in requests]
    assert [r.prompt_len for r in outcome.results] == [r.prompt_len for r in requests]
    # static batches of 4: the two requests of the second batch get their first token
    # only after the whole first batch finished
    by_ttft = sorted(outcome.results, key=lambda r: r.start + r.ttft)
    first_batch_end = max(r.start + r.latency for r in by_ttft[:4])
    assert all(r.start + r.ttft >= first_batch_end - 0.05 for r in by_ttft[4:])
    assert outcome.timeline and max(s.running for s in outcome.timeline) <= 4

    # the CLI path: a sweep, --compare (the same server twice), JSON and plots
    args = build_parser().parse_args([
        "--base-url", baseline_url, "--label", "a", "--compare", baseline_url, "--compare-label", "b",
        "--num-prompts", "3", "--random-input-min", "8", "--random-input-max", "12",
        "--random-output-min", "2", "--random-output-max", "3", "--ignore-eos", "--request-rate", "inf,20",
        "--goodput", "e2el:60000", "--save-result", str(tmp_path / "r.json"), "--plot", str(tmp_path / "plots"),
        "--disable-tqdm", "--num-warmups", "1",
    ])
    with trio.fail_after(120):
        await run(args)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [(r["target"], r["request_rate"]) for r in saved["runs"]] == [("a", "inf"), ("b", "inf"), ("a", "20"), ("b", "20")]
    assert all(r["completed"] == 3 and r["request_goodput"] > 0 for r in saved["runs"])
    assert saved["runs"][0]["output_lens"] == saved["runs"][1]["output_lens"]  # same workload on both targets
    assert set(saved["comparisons"]) == {"inf", "20"}
    assert (tmp_path / "plots" / "latency_vs_rate.png").stat().st_size > 0
