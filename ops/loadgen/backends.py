"""Send one benchmark request and time it: OpenAI-compatible SSE, or lmgate's WebSocket.

Both backends fill a `RequestResult` (see `ops.loadgen.metrics` for what each
timing means). Transport and server errors of one request are recorded in
`result.error` (it counts as failed and the text is saved in the JSON), never
raised: one bad request must not end a benchmark. Anything else propagates.

The benchmark speaks the wire protocols itself (not through `clients/`) so it
measures the server, not our own client library, and works against any
OpenAI-compatible server (vLLM, the baseline in `ops/baselines`).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from httpx_ws import WebSocketDisconnect, WebSocketUpgradeError, aconnect_ws

from ops.loadgen.dataset import BenchRequest, ChatPrompt
from ops.loadgen.metrics import RequestResult

BACKENDS = ("openai", "lmgate-ws")


@dataclass(frozen=True)
class Target:
    """A server under test. `api_key` is the default key (tenants bring their own)."""

    base_url: str
    backend: str = "openai"
    api_key: str | None = None
    model: str | None = None
    label: str = "target"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass(frozen=True)
class SendOptions:
    ignore_eos: bool = False
    temperature: float = 0.0
    use_tenant_keys: bool = True  # False for a compare target: tenants keep their labels, not their keys
    cache_control: str | None = None  # sent as the Cache-Control header (WebSocket: the frame's cache_control)


def endpoint_of(req: BenchRequest) -> str:
    """The OpenAI endpoint `req` goes to: "chat.completions" for a `ChatPrompt`, else "completions"."""
    return "chat.completions" if isinstance(req.prompt, ChatPrompt) else "completions"


def completion_body(req: BenchRequest, model: str, opts: SendOptions, *, stream: bool) -> dict[str, Any]:
    """The request body for `req` at `endpoint_of(req)` (also the WebSocket request body):
    a prompt, or a chat's messages with its application (`metadata.app`) and `user`."""
    body: dict[str, Any] = {"model": model}
    if isinstance(req.prompt, ChatPrompt):
        body["messages"] = [dict(m) for m in req.prompt.messages]
        if req.prompt.app is not None:
            body["metadata"] = {"app": req.prompt.app}
        if req.prompt.user is not None:
            body["user"] = req.prompt.user
    else:
        body["prompt"] = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
    body.update({"max_tokens": req.output_len, "temperature": opts.temperature, "stream": stream})
    if stream:
        body["stream_options"] = {"include_usage": True}
    if opts.ignore_eos:
        body["ignore_eos"] = True
    if req.tenant is not None and req.tenant.priority is not None and opts.use_tenant_keys:
        body["priority"] = req.tenant.priority
    return body


def api_key_for(req: BenchRequest, target: Target, opts: SendOptions) -> str | None:
    if opts.use_tenant_keys and req.tenant is not None:
        return req.tenant.api_key
    return target.api_key


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def request_headers(req: BenchRequest, target: Target, opts: SendOptions) -> dict[str, str]:
    """The HTTP headers of one request: its key, and the Cache-Control the run asks for."""
    headers = _auth(api_key_for(req, target, opts))
    if opts.cache_control:
        headers["Cache-Control"] = opts.cache_control
    return headers


class _Timer:
    """Turns text arrivals into TTFT and ITLs."""

    def __init__(self, result: RequestResult) -> None:
        self.result = result
        self.t0 = time.perf_counter()
        result.start = self.t0
        self.last: float | None = None
        self.chunks = 0
        self.parts: list[str] = []

    def text(self, text: str) -> None:
        if not text:
            return
        now = time.perf_counter()
        if self.last is None:
            self.result.ttft = now - self.t0
        else:
            self.result.itl.append(now - self.last)
        self.last = now
        self.chunks += 1
        self.parts.append(text)

    def finish(self, usage: dict[str, Any] | None, fallback_prompt_len: int, token_count: int = 0) -> None:
        r = self.result
        r.latency = time.perf_counter() - self.t0
        r.text = "".join(self.parts)
        usage = usage or {}
        r.prompt_len = int(usage.get("prompt_tokens") or fallback_prompt_len)
        r.output_len = int(usage.get("completion_tokens") or token_count or self.chunks)
        if self.last is None:
            if r.output_len == 0:
                r.error = r.error or "no tokens generated"
                return
            r.ttft = r.latency  # tokens without visible text (e.g. only whitespace held back)
        r.success = not r.error


class TargetRefused(RuntimeError):
    """The target refused the run's API key: nothing can be measured."""


async def resolve_model(http: httpx.AsyncClient, target: Target) -> str:
    """`target.model`, else the first id of GET /v1/models."""
    if target.model:
        return target.model
    resp = await http.get(target.base_url.rstrip("/") + "/v1/models", headers=_auth(target.api_key))
    if resp.status_code in (401, 403):
        raise TargetRefused(f"{target.base_url} refused the API key ({resp.status_code}): {resp.text[:200]} "
                            "(see --api-key, LMGATE_API_KEY)")
    if resp.status_code != 200:
        raise RuntimeError(f"{target.base_url}: GET /v1/models → {resp.status_code} {resp.text[:200]} (pass --model)")
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{target.base_url}: /v1/models lists no model (pass --model)")
    return str(data[0]["id"])


async def send_openai(
    http: httpx.AsyncClient, target: Target, model: str, req: BenchRequest, opts: SendOptions, result: RequestResult
) -> None:
    """POST /v1/completions (or /v1/chat/completions) with stream=true; parse the SSE `data:` lines."""
    url = target.base_url.rstrip("/") + "/v1/" + endpoint_of(req).replace(".", "/")
    body = completion_body(req, model, opts, stream=True)
    timer = _Timer(result)
    usage: dict[str, Any] | None = None
    try:
        async with http.stream("POST", url, json=body, headers=request_headers(req, target, opts)) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                result.error = f"HTTP {resp.status_code}: {raw[:300].decode(errors='replace')}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if obj.get("error"):
                        result.error = f"stream error: {json.dumps(obj['error'])[:300]}"
                        break
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for choice in obj.get("choices") or ():
                        timer.text(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    timer.finish(usage, req.prompt_len)


class _Socket:
    """One lmgate /v1/ws connection multiplexing up to `capacity` requests."""

    def __init__(self, ws: Any, capacity: int) -> None:
        self.ws = ws
        self.capacity = capacity
        self.routes: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.send_lock = trio.Lock()
        self.dead: str | None = None

    async def reader(self) -> None:
        try:
            while True:
                frame = json.loads(await self.ws.receive_text())
                route = self.routes.get(frame.get("id"))
                if route is not None:
                    route.send_nowait(frame)
        except (WebSocketDisconnect, trio.EndOfChannel, trio.BrokenResourceError, OSError, httpx.HTTPError) as exc:
            self.dead = f"WebSocket closed: {type(exc).__name__}: {exc}"
            for route in self.routes.values():
                route.send_nowait({"type": "error", "status": 0, "error": {"message": self.dead}})


class WsPool:
    """lmgate WebSocket connections, one group per API key, opened on demand: a
    request goes to a socket of its key with a free stream slot, else to a new one."""

    def __init__(self, http: httpx.AsyncClient, target: Target, nursery: trio.Nursery, streams_per_socket: int) -> None:
        self.http = http
        self.url = "ws" + target.base_url.rstrip("/").removeprefix("http") + "/v1/ws"
        self.nursery = nursery
        self.capacity = streams_per_socket
        self.sockets: dict[str | None, list[_Socket]] = {}
        self.lock = trio.Lock()
        self.ids = itertools.count()

    async def _socket_for(self, key: str | None) -> _Socket:
        async with self.lock:
            for s in self.sockets.get(key, []):
                if s.dead is None and len(s.routes) < s.capacity:
                    return s
            sock = await self.nursery.start(self._hold_socket, key)
            self.sockets.setdefault(key, []).append(sock)
            return sock

    async def _hold_socket(self, key: str | None, *, task_status: trio.TaskStatus[_Socket]) -> None:
        """Own one connection for the pool's lifetime (its context must be entered and
        exited by the same task), reading its frames."""
        async with aconnect_ws(self.url, self.http, headers=_auth(key), max_message_size_bytes=8 * 1024 * 1024) as ws:
            first = json.loads(await ws.receive_text())
            if first.get("type") != "ready":
                raise RuntimeError(f"WebSocket handshake: expected ready, got {first}")
            sock = _Socket(ws, self.capacity)
            task_status.started(sock)
            await sock.reader()

    async def send(self, target: Target, model: str, req: BenchRequest, opts: SendOptions, result: RequestResult) -> None:
        body = completion_body(req, model, opts, stream=True)
        body.pop("stream_options")
        key = api_key_for(req, target, opts)
        timer = _Timer(result)
        try:
            sock = await self._socket_for(key)
        except (WebSocketUpgradeError, httpx.HTTPError, OSError, RuntimeError) as exc:
            result.error = f"connect: {type(exc).__name__}: {exc}"
            timer.finish(None, req.prompt_len)
            return
        rid = f"b{next(self.ids)}"
        send, receive = trio.open_memory_channel[dict[str, Any]](1_000_000)
        sock.routes[rid] = send
        usage = None
        tokens = 0
        try:
            async with sock.send_lock:
                frame = {"type": "request", "id": rid, "endpoint": endpoint_of(req), "body": body}
                if opts.cache_control:
                    frame["cache_control"] = opts.cache_control
                await sock.ws.send_text(json.dumps(frame))
            async for frame in receive:
                kind = frame.get("type")
                if kind == "token":
                    tokens += len(frame.get("token_ids") or ())
                    timer.text(frame.get("text") or "")
                elif kind == "done":
                    usage = frame.get("usage")
                    result.cached = bool(frame.get("cached"))
                    break
                elif kind in ("error", "cancelled"):
                    result.error = f"{kind} {frame.get('status', '')}: {json.dumps(frame.get('error'))[:300]}"
                    break
        except (WebSocketDisconnect, httpx.HTTPError, OSError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            sock.routes.pop(rid, None)
        timer.finish(usage, req.prompt_len, tokens)


@asynccontextmanager
async def open_sender(target: Target, *, streams_per_socket: int = 16, timeout: float = 600.0) -> AsyncIterator[Any]:
    """Yields `send(model, req, opts, result)` for the target's backend, plus `http`
    as an attribute pair: ``(send, http)``."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as http:
        if target.backend == "openai":
            async def send(model: str, req: BenchRequest, opts: SendOptions, result: RequestResult) -> None:
                await send_openai(http, target, model, req, opts, result)

            yield send, http
            return
        async with trio.open_nursery() as nursery:
            pool = WsPool(http, target, nursery, streams_per_socket)

            async def send(model: str, req: BenchRequest, opts: SendOptions, result: RequestResult) -> None:
                await pool.send(target, model, req, opts, result)

            try:
                yield send, http
            finally:
                nursery.cancel_scope.cancel()
