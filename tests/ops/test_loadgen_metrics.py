"""Metric arithmetic of `lmgate bench serve` on hand-made timings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ops.loadgen.metrics import (
    RequestResult,
    compute_metrics,
    meets_slos,
    parse_goodput,
    parse_percentiles,
    peak_concurrency,
    per_request_arrays,
)
from ops.loadgen.report import format_summary
from ops.loadgen.scrape import counter_delta, parse_counters, parse_queue_gauges


def done(index: int, start: float, ttft: float, itl: list[float], output_len: int, prompt_len: int = 10) -> RequestResult:
    return RequestResult(index, success=True, start=start, prompt_len=prompt_len, output_len=output_len,
                         ttft=ttft, itl=itl, latency=ttft + sum(itl))


def test_tpot_is_latency_after_first_token_over_remaining_tokens() -> None:
    r = done(0, 0.0, ttft=0.5, itl=[0.1, 0.2, 0.3], output_len=4)
    assert r.latency == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)
    # chunks carrying several tokens: TPOT uses the token count, not the chunk count
    r2 = done(1, 0.0, ttft=0.5, itl=[0.6], output_len=7)
    assert r2.tpot == pytest.approx(0.6 / 6)


def test_one_token_and_failed_requests_have_no_tpot() -> None:
    assert done(0, 0.0, 0.3, [], output_len=1).tpot is None
    assert RequestResult(1, success=False, error="HTTP 500").tpot is None


def test_summary_of_hand_made_run() -> None:
    results = [
        done(0, 0.0, ttft=0.1, itl=[0.05, 0.05], output_len=3, prompt_len=20),  # e2e 0.2, tpot 0.05
        done(1, 0.5, ttft=0.3, itl=[0.1, 0.1, 0.1], output_len=4, prompt_len=30),  # e2e 0.6, tpot 0.1
        RequestResult(2, success=False, error="HTTP 503", start=0.7, prompt_len=99),
    ]
    m = compute_metrics(results, duration=2.0, percentiles=[50, 99])
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["total_input_tokens"] == 50  # failed requests do not count
    assert m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(28.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p50_ttft_ms"] == pytest.approx(200.0)
    assert m["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)  # linear interpolation between 100 and 300
    assert m["mean_tpot_ms"] == pytest.approx(75.0)
    # ITL pools every gap of every request: [50, 50, 100, 100, 100]
    assert m["mean_itl_ms"] == pytest.approx(80.0)
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["mean_e2el_ms"] == pytest.approx(400.0)
    assert m["std_e2el_ms"] == pytest.approx(200.0)
    assert m["max_concurrent_requests"] == 1  # [0, 0.2] and [0.5, 1.1] never overlap
    assert "request_goodput" not in m


def test_percentiles_match_numpy_on_many_values() -> None:
    rng = np.random.default_rng(3)
    ttfts = rng.exponential(0.2, 500)
    results = [done(i, float(i), float(t), [0.01], output_len=2) for i, t in enumerate(ttfts)]
    m = compute_metrics(results, 10.0, percentiles=[90, 99, 99.9])
    for p in (90, 99, 99.9):
        assert m[f"p{p:g}_ttft_ms"] == pytest.approx(np.percentile(ttfts * 1000, p))


def test_goodput_counts_requests_meeting_every_slo() -> None:
    results = [
        done(0, 0, ttft=0.1, itl=[0.01] * 9, output_len=10),  # ttft 100, tpot 10, e2e 190: good
        done(1, 0, ttft=0.6, itl=[0.01] * 9, output_len=10),  # ttft too high
        done(2, 0, ttft=0.1, itl=[0.05] * 9, output_len=10),  # tpot 50 too high
        done(3, 0, ttft=0.2, itl=[], output_len=1),  # no tpot: only ttft/e2e judged
        RequestResult(4, success=False, error="x"),
    ]
    slos = parse_goodput(["ttft:500", "tpot:20"])
    assert slos == {"ttft": 0.5, "tpot": 0.02}
    assert [meets_slos(r, slos) for r in results] == [True, False, False, True, False]
    assert compute_metrics(results, 4.0, slos=slos)["request_goodput"] == pytest.approx(0.5)
    assert compute_metrics(results, 4.0, slos={"e2el": 0.15})["request_goodput"] == 0.0


def test_bad_slo_and_percentile_flags_are_refused() -> None:
    for bad in (["ttft"], ["latency:5"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    with pytest.raises(ValueError):
        parse_percentiles("0,101")
    assert parse_percentiles("50,90,99") == [50.0, 90.0, 99.0]
    with pytest.raises(ValueError):
        compute_metrics([], 0.0)


def test_peak_concurrency() -> None:
    assert peak_concurrency([]) == 0
    assert peak_concurrency([(0, 1), (0.5, 2), (0.9, 1.5), (3, 4)]) == 3
    assert peak_concurrency([(0, 1), (1, 2)]) == 1  # touching intervals do not overlap


def test_empty_run_reports_zeros_not_nan() -> None:
    m = compute_metrics([RequestResult(0, error="refused")], 1.0)
    assert m["completed"] == 0 and m["failed"] == 1
    assert not any(isinstance(v, float) and math.isnan(v) for v in m.values())


def test_per_request_arrays_are_in_request_order() -> None:
    rs = [done(1, 0.2, 0.3, [0.1], 2), RequestResult(0, error="boom", prompt_len=5)]
    arrays = per_request_arrays(rs)
    assert arrays["errors"] == ["boom", ""]
    assert arrays["ttfts"] == [None, 0.3]
    assert arrays["itls"] == [[], [0.1]]
    assert arrays["output_lens"] == [0, 2]


def test_queue_gauges_from_prometheus_text() -> None:
    text = (
        "# HELP lmgate_num_requests_waiting Requests waiting\n"
        "# TYPE lmgate_num_requests_waiting gauge\n"
        "lmgate_num_requests_waiting 3.0\n"
        "lmgate_num_requests_running 7.0\n"
        'vllm:num_requests_waiting{model_name="a"} 1.0\n'
        "lmgate_step_seconds_count 5.0\n"
    )
    assert parse_queue_gauges(text) == (4.0, 7.0)
    assert parse_queue_gauges("process_cpu_seconds_total 1.0\n") is None


def test_counters_over_the_measured_window() -> None:
    """Counters and histogram sums/counts are kept with their labels; gauges, buckets and
    `_created` series are not; the delta drops a counter that went down (a restart)."""
    before = parse_counters(
        "# TYPE lmgate_num_preemptions counter\n"
        "lmgate_num_preemptions_total 2.0\n"
        "lmgate_num_preemptions_created 1.7e9\n"
        'lmgate_step_tokens_total{kind="decode"} 100.0\n'
        "lmgate_step_seconds_sum 1.5\n"
        "lmgate_step_seconds_count 10.0\n"
        'lmgate_step_seconds_bucket{le="0.1"} 9.0\n'
        "lmgate_num_requests_waiting 3.0\n"
        "vllm:num_preemptions_total 4.0\n"
        "lmgate_broken_total not-a-number\n"
    )
    assert before == {"lmgate_num_preemptions_total": 2.0, 'lmgate_step_tokens_total{kind="decode"}': 100.0,
                      "lmgate_step_seconds_sum": 1.5, "lmgate_step_seconds_count": 10.0,
                      "vllm:num_preemptions_total": 4.0}
    after = dict(before, **{"lmgate_num_preemptions_total": 5.0, "lmgate_step_seconds_sum": 4.0,
                            "lmgate_step_seconds_count": 30.0, "vllm:num_preemptions_total": 1.0,
                            'lmgate_predictor_compute_seconds_total{phase="embed"}': 0.25})
    delta = counter_delta(before, after)
    assert delta["lmgate_num_preemptions_total"] == 3.0 and delta["lmgate_step_seconds_count"] == 20.0
    assert delta['lmgate_predictor_compute_seconds_total{phase="embed"}'] == 0.25  # new series count from 0
    assert delta['lmgate_step_tokens_total{kind="decode"}'] == 0.0
    assert "vllm:num_preemptions_total" not in delta  # went down: the target restarted
    assert counter_delta(None, after) == {} and counter_delta(before, None) == {}

    m = compute_metrics([done(0, 0.0, 0.1, [0.1], 2)], 5.0)
    text = format_summary({**m, "server": delta}, [99.0], "lmgate")
    assert "Engine busy (share of duration):" in text and "0.500" in text  # 2.5 s of steps in 5 s
    assert "Length predictor, embed (s):" in text and "Length predictor, refit" not in text
    assert "lmgate server" not in format_summary({**m, "server": {}}, [99.0], "vllm")
