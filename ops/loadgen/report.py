"""Text tables, comparison ratios, saved JSON and PNG plots of benchmark runs.

The text block mirrors `vllm bench serve`'s so the two read side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ops.loadgen.scrape import Sample

_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}

# (key, header, higher is better)
RATIO_ROWS = (
    ("request_throughput", "request throughput (req/s)", True),
    ("output_throughput", "output throughput (tok/s)", True),
    ("median_ttft_ms", "p50 TTFT (ms)", False),
    ("p99_ttft_ms", "p99 TTFT (ms)", False),
    ("median_e2el_ms", "p50 E2E latency (ms)", False),
    ("p99_e2el_ms", "p99 E2E latency (ms)", False),
)


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def format_summary(m: Mapping[str, float], percentiles: Sequence[float], title: str) -> str:
    w = 50
    lines = [f" {title} ".center(w, "=")]

    def row(name: str, value: Any, fmt: str = "{:.2f}") -> None:
        text = fmt.format(value) if isinstance(value, float) else str(value)
        lines.append(f"{name:<40} {text:<10}")

    row("Successful requests:", int(m["completed"]))
    row("Failed requests:", int(m["failed"]))
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", int(m["total_input_tokens"]))
    row("Total generated tokens:", int(m["total_output_tokens"]))
    row("Request throughput (req/s):", m["request_throughput"])
    if "request_goodput" in m:
        row("Request goodput (req/s):", m["request_goodput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total Token throughput (tok/s):", m["total_token_throughput"])
    row("Peak concurrent requests:", int(m["max_concurrent_requests"]))
    if m.get("cached_responses"):
        row("Responses served from cache:", int(m["cached_responses"]))
    for key, (section, short) in _TITLES.items():
        lines.append(section.center(w, "-"))
        row(f"Mean {short} (ms):", m[f"mean_{key}_ms"])
        row(f"Median {short} (ms):", m[f"median_{key}_ms"])
        for p in percentiles:
            row(f"P{p:g} {short} (ms):", m[f"p{p:g}_{key}_ms"])
    server = m.get("server") or {}
    if "lmgate_step_seconds_count" in server:
        lines.append("lmgate server, measured window".center(w, "-"))
        busy = server.get("lmgate_step_seconds_sum", 0.0)
        row("Engine steps:", int(server["lmgate_step_seconds_count"]))
        row("Engine step time (s):", busy)
        if m["duration"] > 0:
            row("Engine busy (share of duration):", busy / m["duration"], "{:.3f}")
        row("Preemptions:", int(server.get("lmgate_num_preemptions_total", 0.0)))
        for phase in ("embed", "refit"):
            key = f'lmgate_predictor_compute_seconds_total{{phase="{phase}"}}'
            if key in server:
                row(f"Length predictor, {phase} (s):", server[key])
    lines.append("=" * w)
    return "\n".join(lines)


def format_tenants(per_tenant: Mapping[str, Mapping[str, float]]) -> str:
    head = f"{'tenant':<12} {'done':>5} {'fail':>5} {'req/s':>8} {'tok/s':>8} {'p50 TTFT':>9} {'p99 TTFT':>9} {'p50 E2E':>9} {'p99 E2E':>9}"
    lines = ["per tenant (latencies in ms)", head]
    for name, m in sorted(per_tenant.items()):
        lines.append(
            f"{name:<12} {int(m['completed']):>5} {int(m['failed']):>5} {m['request_throughput']:>8.2f} "
            f"{m['output_throughput']:>8.1f} {m['median_ttft_ms']:>9.0f} {m['p99_ttft_ms']:>9.0f} "
            f"{m['median_e2el_ms']:>9.0f} {m['p99_e2el_ms']:>9.0f}"
        )
    return "\n".join(lines)


def advantage(key: str, primary: Mapping[str, float], other: Mapping[str, float], higher_is_better: bool) -> float:
    """How many times better the primary target is (> 1: primary better)."""
    a, b = primary[key], other[key]
    num, den = (a, b) if higher_is_better else (b, a)
    if den == 0:
        return math.inf if num > 0 else math.nan
    return num / den


def compare_rows(primary: Mapping[str, float], other: Mapping[str, float]) -> list[dict[str, Any]]:
    return [
        {"metric": key, "label": label, "primary": primary[key], "compare": other[key],
         "advantage": advantage(key, primary, other, higher)}
        for key, label, higher in RATIO_ROWS
    ]


def format_compare(rows_by_rate: Mapping[str, list[dict[str, Any]]], primary: str, other: str) -> str:
    lines = [f"comparison: advantage = how many times better {primary} is than {other} "
             "(throughput: A/B; latency: B/A)"]
    lines.append(f"{'rate':>6}  {'metric':<28} {primary[:14]:>14} {other[:14]:>14} {'advantage':>10}")
    for rate, rows in rows_by_rate.items():
        for r in rows:
            lines.append(f"{rate:>6}  {r['label']:<28} {r['primary']:>14.2f} {r['compare']:>14.2f} {r['advantage']:>9.2f}x")
    return "\n".join(lines)


def plot_latency_vs_rate(path: Path, series: Mapping[str, list[tuple[float, Mapping[str, float]]]]) -> Path:
    """p50/p99 TTFT and E2E latency against request rate, one line per target.
    `series[label]` = [(rate, metrics), ...]. An infinite rate is drawn at the
    achieved request throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, name in ((axes[0], "ttft", "TTFT"), (axes[1], "e2el", "E2E latency")):
        for label, points in series.items():
            xs = [m["request_throughput"] if math.isinf(r) else r for r, m in points]
            for stat, style in (("median", "-o"), ("p99", "--s")):
                ax.plot(xs, [m[f"{stat}_{metric}_ms"] / 1000 for _, m in points], style,
                        label=f"{label} {'p50' if stat == 'median' else 'p99'}")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{name} (s)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(path: Path, timeline: Sequence[Sample], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    ts = [s.t for s in timeline]
    ax.step(ts, [s.waiting for s in timeline], where="post", label="waiting (queued)")
    ax.step(ts, [s.running for s in timeline], where="post", label="running")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
