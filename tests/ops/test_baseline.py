"""The HF static-batching baseline: its batching rule (pure) and, with the real
model, the server end to end driven by the load generator."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import trio

from ops.baselines.hf_static_server import BaselineConfig, next_batch, serve
from ops.bench_serve import build_parser, run
from ops.loadgen.backends import SendOptions, Target
from ops.loadgen.dataset import LengthRange, RandomSpec, build_warmups, build_workload
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
async def test_load_generator_and_api_against_baseline(baseline_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = RandomSpec(LengthRange(8, 16), LengthRange(2, 4))
    requests = build_workload(spec, 6, math.inf, 1.0, seed=0)
    with trio.fail_after(120):
        outcome = await run_workload(Target(baseline_url, label="baseline"), requests, build_warmups(spec, 1, seed=0),
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
    assert outcome.warmup_failures == 0
    assert outcome.timeline and max(s.running for s in outcome.timeline) <= 4

    # the CLI path: a sweep, --compare (the same server twice), JSON and plots
    args = build_parser().parse_args([
        "--base-url", baseline_url, "--label", "a", "--compare", baseline_url, "--compare-label", "b",
        "--num-prompts", "2", "--random-input-min", "8", "--random-input-max", "12",
        "--random-output-min", "2", "--random-output-max", "3", "--ignore-eos", "--request-rate", "inf,20",
        "--goodput", "e2el:60000", "--save-result", str(tmp_path / "r.json"), "--plot", str(tmp_path / "plots"),
        "--disable-tqdm",
    ])
    with trio.fail_after(120):
        await run(args)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [(r["target"], r["request_rate"]) for r in saved["runs"]] == [("a", "inf"), ("b", "inf"), ("a", "20"), ("b", "20")]
    assert all(r["completed"] == 2 and r["request_goodput"] > 0 for r in saved["runs"])
    assert saved["runs"][0]["output_lens"] == saved["runs"][1]["output_lens"]  # same workload on both targets
    assert set(saved["comparisons"]) == {"inf", "20"}
    assert (tmp_path / "plots" / "latency_vs_rate.png").stat().st_size > 0

    # the other endpoints, on the same server (loading the model twice would double the test)
    await check_chat_non_stream_and_errors(baseline_url)


async def check_chat_non_stream_and_errors(baseline_url: str) -> None:
    async with httpx.AsyncClient(base_url=baseline_url, timeout=60) as http:
        chat = (await http.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, "temperature": 0,
        })).json()
        assert "Paris" in chat["choices"][0]["message"]["content"]
        assert chat["usage"]["completion_tokens"] <= 12
        plain = (await http.post("/v1/completions", json={"model": "m", "prompt": [504, 3458, 282], "max_tokens": 3,
                                                         "temperature": 0, "ignore_eos": True})).json()
        assert plain["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
        async with http.stream("POST", "/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "stream": True, "ignore_eos": True,
        }) as resp:
            lines = [line async for line in resp.aiter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][5:])["choices"][0]["finish_reason"] == "length"
        for body in ({"model": "m", "prompt": "x", "temperature": 0.7}, {"model": "m", "prompt": []},
                     {"model": "m", "prompt": "x", "max_tokens": 0}):
            resp = await http.post("/v1/completions", json=body)
            assert resp.status_code == 400 and resp.json()["error"]["message"]
        assert (await http.get("/v1/models")).json()["data"][0]["id"]
