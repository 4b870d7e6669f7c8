"""Gateway overhead benchmark.

    python -m ops.bench_gateway [--quick] [--json PATH]

1. Cached responses: requests per second of a deterministic completion answered
   from the Redis response cache through the *whole* gateway (`lmgate serve` in
   its own process: auth → admission → quota reserve → cache hit → settle),
   against a bare Quart-Trio route returning the same JSON on the same
   Hypercorn settings, also in its own process. Same client, same concurrency.
2. Streaming: the time per output token a client sees over SSE through the
   gateway, minus the time per token of the same engine called directly
   (same model, same request, greedy, EOS ignored) → latency the gateway adds
   to each streamed token.

JSON keys: cached_rps, bare_rps, cached_vs_bare, added_ms_per_token (plus the
raw figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from ops.cli import bench_prog, output_file, positive_int

MODEL = "SmolLM2-135M-Instruct"
ADMIN_KEY = "bench-admin-key"
CACHED_BODY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- the bare route
def serve_bare(port: int, body: bytes) -> None:
    """A Quart-Trio app with one route that returns `body`, on the gateway's Hypercorn settings."""
    from quart import Response, request
    from quart_trio import QuartTrio

    from gateway.config import GatewayConfig
    from gateway.server import serve_app

    app = QuartTrio("bare")

    @app.post("/v1/completions")
    async def completions():  # noqa: ANN202
        await request.get_data()  # read the body as the gateway does (and keep-alive needs it drained)
        return Response(body, content_type="application/json")

    @app.get("/healthz")
    async def health():  # noqa: ANN202
        return {"ok": True}

    trio.run(lambda: serve_app(app, GatewayConfig(port=port), shutdown_trigger=trio.sleep_forever))


# ----------------------------------------------------------------- load
async def wait_ready(url: str, timeout: float = 300.0) -> None:
    with trio.fail_after(timeout):
        async with httpx.AsyncClient() as c:
            while True:
                try:
                    r = await c.get(url)
                    if r.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.2)


async def hammer(url: str, headers: dict, body: dict, concurrency: int, seconds: float) -> dict:
    """`concurrency` workers post `body` back to back for `seconds`; every reply must be 200."""
    done = 0
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:
        deadline = trio.current_time() + seconds

        async def worker() -> None:
            nonlocal done, errors
            while trio.current_time() < deadline:
                r = await client.post(url, json=body)
                if r.status_code == 200:
                    done += 1
                else:
                    errors += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for _ in range(concurrency):
                n.start_soon(worker)
        dt = time.perf_counter() - t0
    return {"requests": done, "errors": errors, "seconds": dt, "rps": done / dt}


async def sse_tpot(url: str, headers: dict, prompt: list[int], n: int) -> float:
    """Client-side mean time between streamed tokens after the first (one request)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True}
    stamps: list[float] = []
    async with httpx.AsyncClient(headers=headers, timeout=300) as client, \
            client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def engine_tpot(prompt: list[int], n: int, threads: int) -> float:
    from gpu.config import EngineConfig
    from gpu.engine import Engine
    from gpu.sampling import SamplingParams

    engine = Engine(EngineConfig(num_threads=threads))
    engine.add_request("direct", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    stamps = []
    while engine.has_unfinished():
        for d in engine.step():
            if d.text:
                stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


async def run(args: argparse.Namespace) -> dict:
    from clients.admin import AdminClient
    from clients.client import LmgateClient

    env = dict(os.environ)
    tmp = Path(tempfile.mkdtemp(prefix="lmgate-bench-"))
    gw_port, bare_port = free_port(), free_port()
    gw = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(gw_port), "--admin-key", ADMIN_KEY,
         "--data-dir", str(tmp), "--threads", str(args.threads), "--log-level", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    procs = [gw]
    try:
        base = f"http://127.0.0.1:{gw_port}"
        await wait_ready(base + "/readyz")
        async with AdminClient(base, ADMIN_KEY) as admin:
            await admin.create_tenant("bench", "benchmark tenant")
            _, key = await admin.create_key("bench", "bench")
        headers = {"Authorization": f"Bearer {key}"}
        async with LmgateClient(base, key, model=MODEL) as client:  # prime the response cache
            await client.completions(CACHED_BODY["prompt"], max_tokens=16, temperature=0)
        async with httpx.AsyncClient(headers=headers) as c:
            primed = await c.post(base + "/v1/completions", json=CACHED_BODY)
        bare = subprocess.Popen(
            [sys.executable, "-c", f"from ops.bench_gateway import serve_bare; serve_bare({bare_port}, "
                                   f"{primed.content!r})"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append(bare)
        await wait_ready(f"http://127.0.0.1:{bare_port}/healthz")

        # warm up both, then measure (alternating order would not change much; both run idle-hot)
        await hammer(base + "/v1/completions", headers, CACHED_BODY, args.concurrency, 1.0)
        cached = await hammer(base + "/v1/completions", headers, CACHED_BODY, args.concurrency, args.seconds)
        await hammer(f"http://127.0.0.1:{bare_port}/v1/completions", {}, CACHED_BODY, args.concurrency, 1.0)
        bare_r = await hammer(f"http://127.0.0.1:{bare_port}/v1/completions", {}, CACHED_BODY,
                              args.concurrency, args.seconds)
        bare.terminate()
        print(f"cached responses through the gateway: {cached['rps']:.0f} req/s "
              f"({cached['errors']} errors); bare route: {bare_r['rps']:.0f} req/s", flush=True)

        prompt = list(range(1000, 1128))
        gw_tpot = await sse_tpot(base + "/v1/completions", headers, prompt, args.tokens)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)  # the server's data dir (its Redis, its secret)
    direct = await trio.to_thread.run_sync(engine_tpot, prompt, args.tokens, args.threads)
    print(f"per streamed token: gateway SSE {gw_tpot * 1e3:.2f} ms, engine direct {direct * 1e3:.2f} ms",
          flush=True)
    return {
        "cached_rps": cached["rps"],
        "bare_rps": bare_r["rps"],
        "cached_vs_bare": cached["rps"] / bare_r["rps"],
        "added_ms_per_token": (gw_tpot - direct) * 1e3,
        "gateway_tpot_ms": gw_tpot * 1e3,
        "engine_tpot_ms": direct * 1e3,
        "cached_errors": cached["errors"],
        "concurrency": args.concurrency,
        "seconds": args.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_gateway"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (5 s per phase, 32 tokens)")
    ap.add_argument("--concurrency", type=positive_int, default=32)
    ap.add_argument("--seconds", type=float, default=None, help="(default 15.0; --quick 5) duration of each RPS phase")
    ap.add_argument("--tokens", type=positive_int, default=None, help="(default 96; --quick 32) tokens streamed for the per-token latency")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the engine (both runs)")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args(argv)
    # --quick shortens what was not given
    args.seconds = args.seconds if args.seconds is not None else 5.0 if args.quick else 15.0
    args.tokens = args.tokens if args.tokens is not None else 32 if args.quick else 96
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    fig = trio.run(run, args)
    print()
    for k in ("cached_rps", "bare_rps", "cached_vs_bare", "added_ms_per_token"):
        print(f"{k:<20}{fig[k]:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
