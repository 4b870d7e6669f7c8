"""The baseline: Hugging Face transformers `generate` behind an OpenAI-compatible
API, with first-come-first-served *static* batches — how TF-Serving/Triton-style
systems serve an LLM.

    python -m ops.baselines.hf_static_server --port 8100 [--batch-size 8] [--max-wait-ms 50]

Policy (`next_batch`)::

    requests queue in arrival order
    a batch of up to B starts when B are waiting, or the oldest has waited max-wait
    one batch runs at a time, left-padded, until its longest request is done
    (rows that finish early sit idle in the batch); then the next batch forms

Tokens stream as the batch produces them: a `StoppingCriteria` sees every new
column of the batch, hands each row's token to that row's stream, and marks rows
done at their own `max_tokens` or EOS (so SSE is as fair to the baseline as it can
be; only the batching policy differs from lmgate).

Same model as lmgate: the bundled SmolLM2 GGUF, dequantized by transformers
(`from_pretrained(dir, gguf_file=name)`, kept converted by `ops.hf_reference`), in the dtype `lmgate serve` picks with the same
flag (`--dtype auto`, the default of both: bfloat16 on a CPU with AVX512-BF16 or AMX,
float32 elsewhere), greedy (temperature 0 only).
Endpoints: POST /v1/completions (text or token-id prompt), POST /v1/chat/completions,
both with `stream`, `stream_options.include_usage`, `max_tokens`, `ignore_eos`;
GET /v1/models; GET /metrics (`hf_static_num_requests_waiting`/`_running`, which
`lmgate bench serve` scrapes into its timeline). API keys are accepted and ignored.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
import trio

MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class BaselineConfig:
    host: str = "127.0.0.1"
    port: int = 8100
    batch_size: int = 8
    max_wait_ms: float = 50.0
    threads: int = 2
    max_model_len: int = 2048
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16": run it in the dtype lmgate is measured in

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max wait must be >= 0 ms, got {self.max_wait_ms}")


def next_batch(arrivals: Sequence[float], now: float, batch_size: int, max_wait: float) -> tuple[int, float]:
    """The static batching rule, pure: given the queued requests' arrival times (oldest
    first), return ``(n, wait)``: start a batch of the first `n` now (n > 0), or
    nothing (n = 0) and re-check after `wait` seconds (inf: queue empty)."""
    if not arrivals:
        return 0, math.inf
    if len(arrivals) >= batch_size:
        return batch_size, 0.0
    waited = now - arrivals[0]
    if waited >= max_wait:
        return len(arrivals), 0.0
    return 0, max_wait - waited


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


@dataclass
class Pending:
    """One queued request. The batch thread sends ``("token", id)`` and finally
    ``("done", reason)`` on `send` (an unbounded trio channel)."""

    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    send: trio.MemorySendChannel[tuple[str, Any]]
    arrival: float = field(default_factory=time.monotonic)


class HFModel:
    """transformers model + tokenizer loaded from the bundled GGUF (sync, used from one thread)."""

    def __init__(self, threads: int, dtype: str = "auto") -> None:
        import torch

        from gpu.engine import resolve_dtype
        from ops.hf_reference import load_model, load_tokenizer

        torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer()  # transformers' own GGUF conversion, kept by ops.hf_reference
        self.model = load_model(resolve_dtype(dtype, "cpu"))
        gen = self.model.generation_config
        eos = gen.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        # EOS is handled per row by RowStopper (ignore_eos differs between rows of one batch)
        gen.eos_token_id = None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids or {0})
        self.vocab_size = self.model.config.vocab_size

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def run_batch(self, batch: list[Pending], emit: Any) -> None:
        """Generate for one static batch (blocking). `emit(events)` gets, after every
        step, a list of ``(row, kind, value)``."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        longest = max(len(p.prompt_ids) for p in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, longest - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            mask[row, longest - len(p.prompt_ids):] = 1
        steps = max(p.max_tokens for p in batch)
        eos_ids = self.eos_ids

        class RowStopper(StoppingCriteria):
            """Streams each row's newest token and stops rows at their own limit/EOS."""

            def __init__(self) -> None:
                self.counts = [0] * len(batch)
                self.done = [False] * len(batch)

            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                events = []
                newest = input_ids[:, -1].tolist()  # (B,)
                for row, p in enumerate(batch):
                    if self.done[row]:
                        continue
                    token = int(newest[row])
                    if token in eos_ids and not p.ignore_eos:
                        self.done[row] = True
                        events.append((row, "done", "stop"))
                        continue
                    self.counts[row] += 1
                    events.append((row, "token", token))
                    if self.counts[row] >= p.max_tokens:
                        self.done[row] = True
                        events.append((row, "done", "length"))
                emit(events)
                return torch.tensor(self.done, dtype=torch.bool)

        stopper = RowStopper()
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                pad_token_id=self.pad_id, stopping_criteria=StoppingCriteriaList([stopper]),
            )
        emit([(row, "done", "length") for row in range(len(batch)) if not stopper.done[row]])


class StaticBatcher:
    """FCFS queue + the one batch running at a time (see module docstring)."""

    def __init__(self, model: HFModel, config: BaselineConfig, registry: prometheus_client.CollectorRegistry) -> None:
        self.model = model
        self.config = config
        self.queue: deque[Pending] = deque()
        self.changed = trio.Event()
        self.waiting = prometheus_client.Gauge("hf_static_num_requests_waiting", "Queued requests", registry=registry)
        self.running = prometheus_client.Gauge("hf_static_num_requests_running", "Requests in the running batch", registry=registry)
        self.batch_size = prometheus_client.Histogram(
            "hf_static_batch_size", "Requests per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )

    def submit(self, pending: Pending) -> None:
        self.queue.append(pending)
        self.waiting.set(len(self.queue))
        self.changed.set()

    async def run(self) -> None:
        while True:
            n, wait = next_batch([p.arrival for p in self.queue], time.monotonic(),
                                 self.config.batch_size, self.config.max_wait_ms / 1000.0)
            if n == 0:
                self.changed = trio.Event()
                with trio.move_on_after(wait):
                    await self.changed.wait()
                continue
            batch = [self.queue.popleft() for _ in range(n)]
            self.waiting.set(len(self.queue))
            self.running.set(len(batch))
            self.batch_size.observe(len(batch))
            token = trio.lowlevel.current_trio_token()

            def emit(events: list[tuple[int, str, Any]], batch: list[Pending] = batch, token: Any = token) -> None:
                trio.from_thread.run_sync(_deliver, batch, events, trio_token=token)

            await trio.to_thread.run_sync(self.model.run_batch, batch, emit)
            self.running.set(0)


def _deliver(batch: list[Pending], events: list[tuple[int, str, Any]]) -> None:
    for row, kind, value in events:
        try:
            batch[row].send.send_nowait((kind, value))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; a static batch cannot drop its row, it just runs on


class TextStream:
    """Incremental detokenization of one row: emits only text that is final (never
    half a UTF-8 character)."""

    def __init__(self, model: HFModel) -> None:
        self.model = model
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.model.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new

    def flush(self) -> str:
        text = self.model.decode(self.ids)
        new, self.sent = text[self.sent:], len(text)
        return new


def _request_fields(body: dict[str, Any], model: HFModel, config: BaselineConfig, chat: bool) -> tuple[list[int], int, bool]:
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    temperature = body.get("temperature", 1.0)
    if temperature not in (0, 0.0, None):
        raise ApiError(400, "this baseline only does greedy decoding: send temperature 0", "temperature")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1", "n")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", "messages")
        ids = model.encode_chat([{"role": m["role"], "content": m.get("content") or ""} for m in messages])
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            ids = model.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and 0 <= t < model.vocab_size for t in prompt):
            ids = list(prompt)
        else:
            raise ApiError(400, "prompt must be a non-empty string or list of token ids", "prompt")
        max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = config.max_model_len - len(ids)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, "max_tokens must be a positive integer", "max_tokens")
    if len(ids) + max_tokens > config.max_model_len:
        raise ApiError(400, f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds {config.max_model_len}", "max_tokens")
    return ids, max_tokens, bool(body.get("ignore_eos", False))


def create_app(model: HFModel, batcher: StaticBatcher, config: BaselineConfig, registry: prometheus_client.CollectorRegistry):
    from quart import Response, request
    from quart_trio import QuartTrio

    app = QuartTrio("hf_static_server")
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = None

    def error(exc: ApiError) -> Response:
        return Response(json.dumps(exc.body), status=exc.status, content_type="application/json")

    @app.get("/v1/models")
    async def models() -> Response:
        return Response(json.dumps({"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "baseline"}]}),
                        content_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(prometheus_client.generate_latest(registry), content_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def handle(chat: bool) -> Response:
        try:
            body = json.loads(await request.get_data())
            ids, max_tokens, ignore_eos = _request_fields(body, model, config, chat)
        except json.JSONDecodeError as exc:
            return error(ApiError(400, f"malformed JSON: {exc}"))
        except ApiError as exc:
            return error(exc)
        send, receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
        batcher.submit(Pending(ids, max_tokens, ignore_eos, send))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def events() -> AsyncIterator[tuple[str, Any]]:
            with receive:
                async for kind, value in receive:
                    yield kind, value
                    if kind == "done":
                        return

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def sse() -> AsyncIterator[bytes]:
                stream, n = TextStream(model), 0
                chunk_obj = obj + ".chunk" if chat else obj
                async for kind, value in events():
                    if kind == "token":
                        n += 1
                        text = stream.push(value)
                        if text:
                            yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": MODEL_NAME,
                                        "choices": [choice(text, None)]})
                    else:
                        yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": MODEL_NAME,
                                    "choices": [choice(stream.flush(), value)]})
                if include_usage:
                    yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": MODEL_NAME, "choices": [],
                                "usage": _usage(len(ids), n)})
                yield b"data: [DONE]\n\n"

            resp = Response(sse(), content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            resp.timeout = None
            return resp

        tokens, finish = [], "length"
        async for kind, value in events():
            if kind == "token":
                tokens.append(value)
            else:
                finish = value
        text = model.decode(tokens)
        message = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
        out = {"id": rid, "object": obj, "created": created, "model": MODEL_NAME,
               "choices": [{**message, "finish_reason": finish}], "usage": _usage(len(ids), len(tokens))}
        return Response(json.dumps(out), content_type="application/json")

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await handle(chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await handle(chat=True)

    return app


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def serve(config: BaselineConfig, *, shutdown_trigger: Any = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Load the model, then serve until `shutdown_trigger` returns (default: SIGINT/SIGTERM).
    Reports the bound URLs through `task_status` once the socket listens."""
    import hypercorn.config
    import hypercorn.trio

    model = await trio.to_thread.run_sync(HFModel, config.threads, config.dtype)
    registry = prometheus_client.CollectorRegistry()
    batcher = StaticBatcher(model, config, registry)
    app = create_app(model, batcher, config, registry)
    hc = hypercorn.config.Config()
    hc.bind = [f"{config.host}:{config.port}"]
    hc.accesslog = None
    hc.keep_alive_timeout = 600

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        await hypercorn.trio.serve(app, hc, shutdown_trigger=shutdown_trigger or on_signal, task_status=task_status)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ops.baselines.hf_static_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--batch-size", type=int, default=8, help="B: requests per static batch")
    ap.add_argument("--max-wait-ms", type=float, default=50.0, help="start a partial batch once its oldest waited this long")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="model dtype, resolved as lmgate serve resolves it (auto: bfloat16 on a CPU with "
                         "AVX512-BF16 or AMX, else float32); compare with lmgate serve --dtype set the same")
    args = ap.parse_args(argv)
    config = BaselineConfig(args.host, args.port, args.batch_size, args.max_wait_ms, args.threads, args.max_model_len,
                            args.dtype)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(serve, config)
            print(f"hf_static_server: ready on {' '.join(urls)}", file=sys.stderr, flush=True)

    print("hf_static_server: loading the model", file=sys.stderr, flush=True)
    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
