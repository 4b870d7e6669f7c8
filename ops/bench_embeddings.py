"""Embeddings benchmark: what serving /v1/embeddings (and /v1/rerank) costs, and what it
costs generation.

    python -m ops.bench_embeddings [--quick] [--json PATH]

1. Throughput: texts embedded per second through the whole gateway (`lmgate serve` in
   its own process: auth → quota reserve → tokenize → batches on the compute thread →
   settle → base64 JSON), `--concurrency` clients each posting `--batch` texts at a time,
   against the same model called in this process on the same texts (`SentenceEmbedder`:
   tokenize, then `encode_ids` over the same batches the server plans), after the server
   has stopped, on the same number of threads. The texts are sentences of 5 to 120 words
   (about 8 to 160 tokens), fixed by a seed.
2. Interference: how long a completion of `--tokens` tokens (greedy, EOS ignored) takes
   alone, and while the clients of (1) embed without pause: how much an embedding load
   slows generation (the two share the compute thread; one embedding batch of at most
   `--embedding-batch-tokens` padded tokens runs between two engine steps). Timed whole, request to answer,
   per token: a stream's chunk times, read by a client whose process also runs the load,
   came bunched.

3. Rerank: the clients of (1) post /v1/rerank instead, each request's first text the
   query and the rest its documents (`top_n` 5): texts ranked per second, against (1)'s
   texts embedded per second (what scoring and sorting add to embedding).

JSON keys: served_texts_s, direct_texts_s, served_vs_direct (throughput ratio),
served_rerank_texts_s, rerank_vs_embeddings (throughput ratio),
ms_per_token_alone, ms_per_token_with_embeddings, slowdown (with ÷ alone), plus the raw
figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from ops.bench_gateway import ADMIN_KEY, MODEL, free_port, wait_ready
from ops.cli import bench_prog, output_file, positive_int

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
WORDS = ["the", "a", "model", "server", "token", "batch", "request", "cache", "quota", "tenant", "stream",
         "socket", "answer", "question", "river", "mountain", "city", "language", "story", "morning", "evening",
         "garden", "window", "music", "number", "system", "network", "memory", "kernel", "thread", "engine",
         "paper", "letter", "friend", "market", "price", "weather"]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) + "." for _ in range(n)]


def embeddings_body(chunk: list[str]) -> dict:
    return {"model": EMBEDDING_MODEL, "input": chunk, "encoding_format": "base64"}


def rerank_body(chunk: list[str]) -> dict:
    """The chunk's first text as the query, the rest as its documents."""
    return {"model": EMBEDDING_MODEL, "query": chunk[0], "documents": chunk[1:], "top_n": 5}


async def embed_load(url: str, headers: dict, corpus: list[str], batch: int, concurrency: int,
                     seconds: float, body=embeddings_body) -> dict:  # type: ignore[no-untyped-def]
    """`concurrency` clients post `batch` texts at a time (`body` makes the request of a
    chunk), in turn through `corpus`, for `seconds`; every reply must be 200."""
    done = errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=300) as client:
        deadline = trio.current_time() + seconds

        async def worker(k: int) -> None:
            nonlocal done, errors
            i = k * batch
            while trio.current_time() < deadline:
                chunk = [corpus[(i + j) % len(corpus)] for j in range(batch)]
                i += batch * concurrency
                r = await client.post(url, json=body(chunk))
                if r.status_code == 200:
                    done += batch
                else:
                    errors += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for k in range(concurrency):
                n.start_soon(worker, k)
        dt = time.perf_counter() - t0
    return {"texts": done, "errors": errors, "seconds": dt, "texts_s": done / dt}


async def completion_s_per_token(url: str, headers: dict, prompt: list[int], n: int) -> float:
    """Seconds per token of one greedy completion of `n` tokens, timed whole."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(headers={**headers, "Cache-Control": "no-cache, no-store"}, timeout=600) as c:
        t0 = time.perf_counter()
        r = await c.post(url, json=body)
        took = time.perf_counter() - t0
    r.raise_for_status()
    assert r.json()["usage"]["completion_tokens"] == n
    return took / n


def direct_texts_s(corpus: list[str], batch: int, threads: int, seconds: float, batch_tokens: int = 512) -> float:
    """Texts per second of the model called directly, request by request as the server
    runs them (tokenize, then `plan_batches`' batches through `encode_ids`)."""
    import torch

    from actors.embeddings import SentenceEmbedder, plan_batches

    torch.set_num_threads(threads)
    emb = SentenceEmbedder(threads=threads)
    budget = batch_tokens
    emb.encode_ids(emb.tokenize(corpus[:batch]))  # warm-up
    done, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = [corpus[(i + j) % len(corpus)] for j in range(batch)]
        i += batch
        ids = emb.tokenize(chunk)
        for b in plan_batches([len(x) for x in ids], token_budget=budget):
            emb.encode_ids([ids[k] for k in b])
        done += batch
    return done / (time.perf_counter() - t0)


async def run(args: argparse.Namespace) -> dict:
    from clients.admin import AdminClient

    corpus = texts(2048)
    tmp = Path(tempfile.mkdtemp(prefix="lmgate-bench-emb-"))
    port = free_port()
    gw = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--admin-key", ADMIN_KEY,
         "--data-dir", str(tmp), "--threads", str(args.threads), "--log-level", "WARNING",
         "--embedding-batch-tokens", str(args.embedding_batch_tokens)],
        env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base + "/readyz")
        async with AdminClient(base, ADMIN_KEY) as admin:
            await admin.create_tenant("bench", "benchmark tenant")
            _, key = await admin.create_key("bench", "bench")
        headers = {"Authorization": f"Bearer {key}"}
        url = base + "/v1/embeddings"
        await embed_load(url, headers, corpus, args.batch, args.concurrency, 2.0)  # warm-up
        served = await embed_load(url, headers, corpus, args.batch, args.concurrency, args.seconds)
        print(f"served: {served['texts_s']:.1f} texts/s ({served['errors']} errors)", flush=True)
        rerank = await embed_load(base + "/v1/rerank", headers, corpus, args.batch, args.concurrency,
                                  args.seconds, rerank_body)
        print(f"served rerank: {rerank['texts_s']:.1f} texts/s ({rerank['errors']} errors)", flush=True)

        prompt = list(range(1000, 1128))
        completions = base + "/v1/completions"
        await completion_s_per_token(completions, headers, prompt, 8)  # warm-up
        alone = await completion_s_per_token(completions, headers, prompt, args.tokens)
        with_load: dict[str, float] = {}

        async def measure(nursery: trio.Nursery) -> None:
            await trio.sleep(1.0)  # the embedding load running
            with_load["tpot"] = await completion_s_per_token(completions, headers, prompt, args.tokens)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as n:
            n.start_soon(embed_load, url, headers, corpus, args.batch, args.concurrency, 3600.0)
            n.start_soon(measure, n)
        print(f"per generated token: alone {alone * 1e3:.2f} ms, while embedding "
              f"{with_load['tpot'] * 1e3:.2f} ms", flush=True)
    finally:
        gw.terminate()
        try:
            gw.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gw.kill()
            gw.wait()
        shutil.rmtree(tmp, ignore_errors=True)  # the server's data dir (its Redis, its secret)
    direct = await trio.to_thread.run_sync(direct_texts_s, corpus, args.batch, args.threads, args.seconds,
                                           args.embedding_batch_tokens)
    print(f"direct: {direct:.1f} texts/s", flush=True)
    return {
        "served_texts_s": served["texts_s"],
        "direct_texts_s": direct,
        "served_vs_direct": served["texts_s"] / direct,
        "served_rerank_texts_s": rerank["texts_s"],
        "rerank_vs_embeddings": rerank["texts_s"] / served["texts_s"],
        "served_rerank_errors": rerank["errors"],
        "ms_per_token_alone": alone * 1e3,
        "ms_per_token_with_embeddings": with_load["tpot"] * 1e3,
        "slowdown": with_load["tpot"] / alone,
        "served_errors": served["errors"],
        "batch": args.batch,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "embedding_batch_tokens": args.embedding_batch_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_embeddings"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (5 s, 32 tokens)")
    ap.add_argument("--concurrency", type=positive_int, default=4, help="embedding clients at once")
    ap.add_argument("--batch", type=positive_int, default=32, help="texts per embedding request")
    ap.add_argument("--seconds", type=float, default=None, help="(default 20.0; --quick 5) duration of each throughput run")
    ap.add_argument("--tokens", type=positive_int, default=None, help="(default 96; --quick 32) tokens generated for the time per token")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (server and direct run)")
    ap.add_argument("--embedding-batch-tokens", type=positive_int, default=512,
                    help="the server's --embedding-batch-tokens (the direct run batches the same)")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args(argv)
    # --quick shortens what was not given
    args.seconds = args.seconds if args.seconds is not None else 5.0 if args.quick else 20.0
    args.tokens = args.tokens if args.tokens is not None else 32 if args.quick else 96
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    result = trio.run(run, args)
    print(f"served ÷ direct throughput: {result['served_vs_direct']:.2f}; rerank ÷ embeddings throughput: "
          f"{result['rerank_vs_embeddings']:.2f}; time per generated token while embedding ÷ alone: "
          f"{result['slowdown']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
