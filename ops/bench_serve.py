"""`lmgate bench serve`: a serving benchmark that reports what `vllm bench serve`
reports, and runs any two targets over the same arrival schedule.

    python -m ops.bench_serve --base-url http://127.0.0.1:8000 --backend lmgate-ws \\
        --api-key $KEY --dataset random --random-input-min 32 --random-input-max 512 \\
        --random-output-min 16 --random-output-max 256 --ignore-eos \\
        --num-prompts 80 --request-rate 1,2,4 --seed 0 \\
        --compare http://127.0.0.1:8100 --compare-backend openai \\
        --save-result out.json --plot plots/

The scheduling comparison of docs/scheduling.md through the whole server: the
multi-application workload (`--dataset workload`) against `lmgate serve
--scheduling-policy magnus` and against `--scheduling-policy fcfs-continuous`, the
predictor trained online by the warm-ups (docs/scheduling.md, "Through the server").

Per rate (a comma list sweeps): warm-ups, then the timed run against the target,
then — with `--compare` — the *same* requests (arrival times, prompts, output
lengths, tenants) against the second target, one after the other (never both at
once: they would share the CPU). See docs/benchmarking.md for every definition.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from ops.cli import bench_prog
from ops.loadgen.backends import BACKENDS, SendOptions, Target, TargetRefused
from ops.loadgen.dataset import (
    DEFAULT_VOCAB,
    DatasetSpec,
    JsonlSpec,
    LengthRange,
    RandomSpec,
    Tenant,
    WorkloadSpec,
    build_warmups,
    build_workload,
    sweep_seed,
)
from ops.loadgen.metrics import (
    compute_metrics,
    parse_goodput,
    parse_percentiles,
    per_request_arrays,
)
from ops.loadgen.report import (
    compare_rows,
    format_compare,
    format_summary,
    format_tenants,
    plot_latency_vs_rate,
    plot_timeline,
    rate_label,
)
from ops.loadgen.runner import RunConfig, RunOutcome, run_workload
from ops.loadgen.schedule import parse_rates


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except where the help names its own (it would read "(default:
    first of GET /v1/models) (default: None)", or show an API key from the environment)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_serve"), description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    t = ap.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (no /v1)")
    t.add_argument("--backend", choices=BACKENDS, default="openai",
                   help="openai: POST /v1/completions with SSE; lmgate-ws: lmgate's /v1/ws")
    t.add_argument("--api-key", default=os.environ.get("LMGATE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="Bearer key (default $LMGATE_API_KEY, then $OPENAI_API_KEY)")
    t.add_argument("--model", default=None, help="model name (default: first of GET /v1/models)")
    t.add_argument("--label", default=None, help="name of the target in reports (default: its backend)")
    t.add_argument("--compare", metavar="URL2", default=None, help="second target, same schedule")
    t.add_argument("--compare-backend", choices=BACKENDS, default="openai")
    t.add_argument("--compare-api-key", default=None)
    t.add_argument("--compare-model", default=None)
    t.add_argument("--compare-label", default=None)
    t.add_argument("--ws-streams-per-socket", type=int, default=16,
                   help="lmgate-ws: requests multiplexed on one WebSocket (server max_streams_per_socket)")

    d = ap.add_argument_group("dataset")
    d.add_argument("--dataset", choices=("random", "jsonl", "workload"), default="random",
                   help="workload: the multi-application fixture of ops.bench_sched as chat requests with "
                        "their app and user, ending at EOS (measured: held-out half; warm-ups: training half)")
    d.add_argument("--dataset-path", default=None,
                   help="jsonl: file of {\"prompt\": ..., \"output_len\": N}; workload: a fixture file "
                        "(default: the shipped ops/workload/requests.jsonl)")
    d.add_argument("--num-prompts", type=int, default=100, help="measured requests per rate")
    d.add_argument("--random-input-len", type=int, default=256)
    d.add_argument("--random-output-len", type=int, default=128)
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L*(1-r), L*(1+r)] (vLLM's flag)")
    d.add_argument("--random-input-min", type=int, default=None, help="explicit range (overrides len/ratio)")
    d.add_argument("--random-input-max", type=int, default=None)
    d.add_argument("--random-output-min", type=int, default=None)
    d.add_argument("--random-output-max", type=int, default=None)
    d.add_argument("--random-vocab-size", type=int, default=DEFAULT_VOCAB)
    d.add_argument("--jsonl-output-len", type=int, default=128, help="jsonl: output length of lines without one")
    d.add_argument("--response-cache", choices=("bypass", "use"), default="bypass",
                   help="bypass: every request says Cache-Control: no-cache, no-store (lmgate's response cache "
                        "neither answers nor stores it: the engine is measured) and workload measures its whole "
                        "held-out half; use: no header, and workload measures only conversations no warm-up "
                        "repeats (338, no Q&A: a skewed length mix), so the cache is looked up but never answers")
    d.add_argument("--tenant", action="append", default=[], metavar="KEY:WEIGHT[:PRIORITY]",
                   help="multi-tenant mode (repeat): each request uses one tenant's key, drawn by weight")

    load = ap.add_argument_group("load")
    load.add_argument("--request-rate", default="inf", help="req/s, comma list sweeps (e.g. 1,2,4); inf = all at once")
    load.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of the gaps; 1 = Poisson")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--num-warmups", type=int, default=0)
    load.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (exact output lengths)")
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")

    o = ap.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    o.add_argument("--percentiles", "--metric-percentiles", dest="percentiles", default="99",
                   help="comma list; p99 is always reported")
    o.add_argument("--save-result", metavar="PATH", default=None, help="JSON with summaries and per-request arrays")
    o.add_argument("--plot", metavar="DIR", default=None, help="write PNG plots there")
    o.add_argument("--scrape-interval", type=float, default=0.5, help="seconds between /metrics scrapes; 0 = off")
    o.add_argument("--disable-tqdm", action="store_true")
    return ap


def dataset_from_args(args: argparse.Namespace) -> DatasetSpec:
    if args.dataset == "workload":
        return WorkloadSpec(args.dataset_path, distinct=args.response_cache == "use")
    if args.dataset == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path")
        return JsonlSpec(args.dataset_path, args.jsonl_output_len)

    def length(low: int | None, high: int | None, mid: int) -> LengthRange:
        if (low is None) != (high is None):
            raise ValueError("give both --random-*-min and --random-*-max")
        return LengthRange(low, high) if low is not None and high is not None else LengthRange.around(mid, args.random_range_ratio)

    return RandomSpec(
        length(args.random_input_min, args.random_input_max, args.random_input_len),
        length(args.random_output_min, args.random_output_max, args.random_output_len),
        args.random_vocab_size,
    )


def summarize(outcome: RunOutcome, rate: float, args: argparse.Namespace, slos: dict[str, float],
              percentiles: list[float]) -> dict[str, Any]:
    """One run's JSON record: vLLM-named summary + per-tenant summaries + arrays."""
    m = compute_metrics(outcome.results, outcome.duration, slos=slos, percentiles=percentiles)
    tenants = sorted({r.tenant for r in outcome.results if r.tenant})
    per_tenant = {
        t: compute_metrics([r for r in outcome.results if r.tenant == t], outcome.duration, slos=slos,
                           percentiles=percentiles)
        for t in tenants
    }
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target": outcome.target.label,
        "base_url": outcome.target.base_url,
        "backend": outcome.target.backend,
        "model_id": outcome.model,
        "request_rate": rate_label(rate),
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "num_prompts": len(outcome.results),
        "seed": args.seed,
        "response_cache": args.response_cache,
        "warmup_failures": outcome.warmup_failures,
        **m,
        "per_tenant": per_tenant,
        "timeline": [[s.t, s.waiting, s.running] for s in outcome.timeline],
        # the target's counters over the measured requests (warm-ups excluded), as /metrics names them
        "server": outcome.server_counters,
        **per_request_arrays(outcome.results),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = dataset_from_args(args)
    rates = parse_rates(args.request_rate)
    slos = parse_goodput(args.goodput)
    percentiles = sorted(set(parse_percentiles(args.percentiles)) | {99.0})
    tenants = [Tenant.parse(text, i) for i, text in enumerate(args.tenant)]
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    primary = Target(args.base_url, args.backend, args.api_key, args.model, args.label or args.backend)
    cache_control = "no-cache, no-store" if args.response_cache == "bypass" else None
    targets = [(primary, SendOptions(args.ignore_eos, args.temperature, use_tenant_keys=True,
                                     cache_control=cache_control))]
    if args.compare:
        other = Target(args.compare, args.compare_backend, args.compare_api_key, args.compare_model,
                       args.compare_label or f"compare-{args.compare_backend}")
        if other.label == primary.label:
            raise ValueError("--label and --compare-label must differ")
        targets.append((other, SendOptions(args.ignore_eos, args.temperature, use_tenant_keys=False,
                                           cache_control=cache_control)))
    cfg = RunConfig(args.max_concurrency, args.ws_streams_per_socket, args.scrape_interval,
                    not args.disable_tqdm, args.request_timeout)
    plot_dir = Path(args.plot) if args.plot else None
    if plot_dir:
        plot_dir.mkdir(parents=True, exist_ok=True)
    if args.save_result:  # checked now, not after a run of many minutes
        save_to = Path(args.save_result)
        if not save_to.parent.is_dir() or save_to.is_dir():
            raise ValueError(f"--save-result {save_to}: not a file in an existing folder")

    runs: list[dict[str, Any]] = []
    comparisons: dict[str, list[dict[str, Any]]] = {}
    for i, rate in enumerate(rates):
        seed = sweep_seed(args.seed, i)
        requests = build_workload(spec, args.num_prompts, rate, args.burstiness, seed, tenants)
        warmups = build_warmups(spec, args.num_warmups, seed, tenants)
        by_target: dict[str, dict[str, Any]] = {}
        for target, opts in targets:
            outcome = await run_workload(target, requests, warmups, opts, cfg,
                                         desc=f"{target.label} @ {rate_label(rate)} req/s")
            record = summarize(outcome, rate, args, slos, percentiles)
            runs.append(record)
            by_target[target.label] = record
            print(format_summary(record, percentiles, f"{target.label} @ {rate_label(rate)} req/s"), flush=True)
            if record["per_tenant"]:
                print(format_tenants(record["per_tenant"]), flush=True)
            if record["failed"]:
                first = next(e for e in record["errors"] if e)
                print(f"{target.label}: {record['failed']} failed, first error: {first}", file=sys.stderr)
            if plot_dir and outcome.timeline:
                plot_timeline(plot_dir / f"timeline_{target.label}_rate{rate_label(rate)}.png", outcome.timeline,
                              f"{target.label} @ {rate_label(rate)} req/s")
        if len(targets) == 2:
            comparisons[rate_label(rate)] = compare_rows(by_target[targets[0][0].label], by_target[targets[1][0].label])

    if comparisons:
        print(format_compare(comparisons, targets[0][0].label, targets[1][0].label), flush=True)
    if plot_dir and len(rates) > 1:
        series = {t.label: [(rate, r) for rate, r in zip(rates, [x for x in runs if x["target"] == t.label], strict=True)]
                  for t, _ in targets}
        plot_latency_vs_rate(plot_dir / "latency_vs_rate.png", series)
    result = {"runs": runs, "comparisons": comparisons}
    if args.save_result:
        Path(args.save_result).write_text(json.dumps(result, indent=1, allow_nan=True))
    return result


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested exception groups (a nursery wraps what a backend's
    sender raised: the WebSocket backend's unreachable server came out as a 90-line
    traceback); `exc` itself when it is not a group of one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _url_of(exc: httpx.HTTPError, fallback: str) -> str:
    """The URL a failed request went to (the primary or the --compare target)."""
    try:
        url = exc.request.url
    except RuntimeError:  # (no request attached)
        return fallback
    return f"{url.scheme}://{url.netloc.decode()}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            trio.run(run, args)
        except BaseExceptionGroup as group:
            raise _leaf(group) from None
    except (ValueError, OSError, TargetRefused) as exc:  # a bad value, a missing file, a refused key
        print(f"lmgate bench serve: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:  # the server: not there, not http(s)
        print(f"lmgate bench serve: cannot reach {_url_of(exc, args.base_url)}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
