"""gateway.server: the whole `serve()` path (private Redis, dev tenant, Hypercorn) with a
stand-in runtime, and graceful shutdown: streams finish within the grace period,
longer ones are cut and their requests cancelled."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from cache.redis_server import PrivateRedis
from cache.store import RedisStore
from gateway.app import GatewayStores
from gateway.config import GatewayConfig
from gateway.server import serve, server_secret
from gateway.sse import parse_events
from tests.gateway.conftest import ADMIN_KEY, MODEL, FakeRuntime, Gateway, start_gateway, word

TEST_KV_MB = 256  # 5.8k fp32 tokens: room for these tests; the 1.5 GiB default was zeroed per server

pytestmark = pytest.mark.usefixtures("free_engines")  # engines: see tests/conftest.py


def test_server_secret_is_created_private_and_stable(tmp_path: Path) -> None:
    first = server_secret(tmp_path, env={})
    assert len(first) >= 32
    assert stat.S_IMODE(os.stat(tmp_path / "server_secret").st_mode) == 0o600
    assert server_secret(tmp_path, env={}) == first
    assert server_secret(tmp_path, env={"LMGATE_SECRET": "x" * 20}) == b"x" * 20


def test_the_streams_are_ended_before_the_cut_with_time_for_their_error_events() -> None:
    from gateway.server import shutdown_schedule

    assert shutdown_schedule(30) == (29.5, 30)
    assert shutdown_schedule(0.6) == (0.3, 0.6)  # halfway through a short grace
    assert shutdown_schedule(0) == (0, 0.25)  # none at all: the cut waits for the error events
    end, cut = shutdown_schedule(0.2)
    assert (end, cut) == (0.1, 0.35)


async def run_serve(nursery: trio.Nursery, config: GatewayConfig) -> tuple[str, io.StringIO, trio.Event, FakeRuntime]:
    runtimes: list[FakeRuntime] = []

    @asynccontextmanager
    async def factory(config: GatewayConfig, stores: GatewayStores) -> AsyncIterator[FakeRuntime]:
        runtimes.append(FakeRuntime(nursery))
        yield runtimes[-1]

    out = io.StringIO()
    stop = trio.Event()
    urls = await nursery.start(
        lambda task_status: serve(config, runtime_factory=factory, shutdown_trigger=stop.wait, out=out, task_status=task_status)
    )
    return urls[0], out, stop, runtimes[0]


async def test_serve_with_private_redis_prints_a_dev_key_that_outlives_a_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=None, dev_tenant=True, shutdown_grace_seconds=0.2,
                           kv_cache_mb=TEST_KV_MB)
    base_url, out, stop, _ = await run_serve(nursery, config)
    key = re.search(r"API key \(shown once\): (\S+)", out.getvalue()).group(1)  # type: ignore[union-attr]
    redis_url = re.search(r"private redis-server at (\S+)", out.getvalue()).group(1)  # type: ignore[union-attr]
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.json()["choices"][0]["text"] == word(0, 0)
        assert (await client.get("/readyz")).status_code == 200
    # what start-up loaded is out of the collector's way while it serves (full collections
    # scanned it all: 270-380 ms of the event loop each during large logprob requests)
    import gc

    assert gc.get_freeze_count() > 0
    stop.set()
    # the private redis-server is stopped when serve() returns
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with trio.fail_after(10):
        while True:
            try:
                (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
            except OSError:
                break
            await trio.sleep(0.05)
    # started again on the same data dir: the private Redis kept the tenant and its key
    base_url, out, stop, _ = await run_serve(nursery, config)
    assert "shown once" not in out.getvalue() and "tenant 'dev' exists" in out.getvalue()
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200, r.text
    stop.set()
    with trio.fail_after(10):  # (and collectable again once served)
        while gc.get_freeze_count():
            await trio.sleep(0.05)


async def test_dev_tenant_is_created_only_once(nursery: trio.Nursery, tmp_path: Path, redis_url: str) -> None:
    config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=redis_url, shutdown_grace_seconds=0.1,
                           kv_cache_mb=TEST_KV_MB)
    _, out1, stop1, _ = await run_serve(nursery, config)
    stop1.set()
    _, out2, stop2, _ = await run_serve(nursery, config)
    stop2.set()
    assert "API key" in out1.getvalue() and "API key" not in out2.getvalue()


async def test_a_redis_that_may_evict_quota_keys_is_warned_of_at_start(
        nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every quota key has a TTL, so a `volatile-*` policy evicts them as an `allkeys-*`
    one evicts tenants: only `noeviction` is safe, and the start says so otherwise."""
    with PrivateRedis(tmp_path / "redis") as server:
        config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=server.url, shutdown_grace_seconds=0.1,
                               kv_cache_mb=TEST_KV_MB)
        _, _, stop, _ = await run_serve(nursery, config)
        stop.set()
        assert "maxmemory-policy" not in caplog.text  # Redis's default: noeviction
        async with RedisStore(server.url) as store:
            await store.client.config_set({"maxmemory-policy": "volatile-lru"})
        _, _, stop, _ = await run_serve(nursery, config)
        stop.set()
        (warning,) = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        assert warning.levelno == logging.WARNING and "'volatile-lru'" in warning.getMessage()


async def test_a_gateway_with_another_secret_does_not_start(nursery: trio.Nursery, tmp_path: Path,
                                                            redis_url: str) -> None:
    from cache.tenants import SecretMismatch

    config = GatewayConfig(port=0, data_dir=str(tmp_path / "a"), redis_url=redis_url, shutdown_grace_seconds=0.1,
                           kv_cache_mb=TEST_KV_MB)
    _, out, stop, _ = await run_serve(nursery, config)
    stop.set()
    assert "API key" in out.getvalue()
    # a replica (or a container that lost its data dir) generates another secret: every key
    # issued so far would answer 401 there, so it refuses to start and says why
    other = dataclasses.replace(config, data_dir=str(tmp_path / "b"))
    with pytest.raises(BaseException) as info:
        await serve(other, shutdown_trigger=trio.sleep_forever, out=io.StringIO())
    leaves = [info.value]
    while isinstance(leaves[-1], BaseExceptionGroup):
        leaves.append(leaves[-1].exceptions[0])
    assert isinstance(leaves[-1], SecretMismatch)
    # the same secret (LMGATE_SECRET's job) starts
    os.environ["LMGATE_SECRET"] = (tmp_path / "a" / "server_secret").read_text().strip()
    try:
        _, _, stop2, _ = await run_serve(nursery, other)
        stop2.set()
    finally:
        del os.environ["LMGATE_SECRET"]


async def test_a_new_secret_refused_is_refused_again_at_the_next_start(nursery: trio.Nursery, tmp_path: Path,
                                                                      redis_url: str) -> None:
    """A Redis holding keys of a version that kept no fingerprint: a gateway whose secret
    was generated at this start is refused. It wrote the secret's file before the check, so
    the next start (a restart policy's) took the file as given and served 401s."""
    from cache.tenants import SecretMismatch, TenantRegistry

    async with RedisStore(redis_url) as store:  # what the old version left: keys, no fingerprint
        old = TenantRegistry(store, b"the old deployment's secret....")
        await old.create_tenant("acme", "Acme")
        await old.create_key("acme", "k")
    config = GatewayConfig(port=0, data_dir=str(tmp_path / "new"), redis_url=redis_url, shutdown_grace_seconds=0.1,
                           kv_cache_mb=TEST_KV_MB, dev_tenant=False)
    for _ in range(2):
        with pytest.raises(BaseException) as info:
            await serve(config, shutdown_trigger=trio.sleep_forever, out=io.StringIO())
        leaves = [info.value]
        while isinstance(leaves[-1], BaseExceptionGroup):
            leaves.append(leaves[-1].exceptions[0])
        assert isinstance(leaves[-1], SecretMismatch) and "generated just now" in str(leaves[-1])
        assert not (tmp_path / "new" / "server_secret").exists()
    # nor is one made at a start that failed before Redis could take it (Redis not up yet)
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
    with pytest.raises(BaseException):  # noqa: B017, PT011 - (an exception group of the unreachable Redis)
        await serve(dataclasses.replace(config, redis_url=nowhere), shutdown_trigger=trio.sleep_forever,
                    out=io.StringIO())
    assert not (tmp_path / "new" / "server_secret").exists()


async def read_sse(base_url: str, headers: dict[str, str], body: dict[str, Any], started: trio.Event) -> list[str]:
    async with (
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10) as client,
        client.stream("POST", "/v1/completions", json=body) as r,
    ):
        text = ""
        try:
            async for chunk in r.aiter_text():
                text += chunk
                started.set()
        except httpx.RemoteProtocolError:
            pass  # cut by the server at the end of the grace period
    return parse_events(text)


async def test_graceful_shutdown_lets_short_streams_finish_and_cuts_long_ones(
    nursery: trio.Nursery, gateway: Gateway
) -> None:
    config = dataclasses.replace(gateway.config, shutdown_grace_seconds=1.0)
    base_url, runtime, stop = await start_gateway(nursery, gateway.stores, config)
    runtime.delay = 0.05
    results: dict[str, list[str]] = {}
    short_started, long_started = trio.Event(), trio.Event()

    async def short() -> None:
        results["short"] = await read_sse(base_url, gateway.headers, {"model": MODEL, "prompt": "x", "max_tokens": 10, "stream": True}, short_started)

    async def long() -> None:
        results["long"] = await read_sse(base_url, gateway.headers, {"model": MODEL, "prompt": "HANG", "stream": True}, long_started)

    async with trio.open_nursery() as clients, httpx.AsyncClient(base_url=base_url) as idle:
        assert (await idle.get("/readyz")).status_code == 200  # a connection kept alive from before
        clients.start_soon(short)
        clients.start_soon(long)
        await short_started.wait()
        await long_started.wait()
        t0 = time.monotonic()
        stop.set()
        await trio.sleep(0.1)
        with pytest.raises(OSError):  # no longer accepting
            await trio.open_tcp_stream("127.0.0.1", int(base_url.rsplit(":", 1)[1]))
        with pytest.raises(httpx.ConnectError):  # the idle connection was closed at once
            await idle.get("/readyz")
    elapsed = time.monotonic() - t0
    assert results["short"][-1] == "[DONE]"
    texts = [json.loads(p)["choices"][0]["text"] for p in results["short"][:-1]]
    assert "".join(texts) == "".join(word(0, j) for j in range(10))
    assert results["long"][-1] != "[DONE]"
    assert 0.9 <= elapsed < 5
    hang_id = next(c.request_id for c in runtime.calls if c.prompt == "HANG")
    with trio.fail_after(5):
        await runtime.cancel_events[hang_id].wait()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read a listening socket's backlog")
async def test_the_listen_queue_takes_a_burst(gateway: Gateway) -> None:
    """The listening socket's backlog is `listen_backlog` (up to net.core.somaxconn), not
    Hypercorn's 100: a burst of connects beyond 100 waits to be accepted instead of being
    reset. `ss` shows a listening socket's backlog as its Send-Q."""
    port = gateway.base_url.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    backlog = int(out.split()[2])
    cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert backlog == min(gateway.config.listen_backlog, cap) and backlog > 100


async def read_to_eof(stream: trio.SocketStream, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection (within `seconds`)."""
    received = b""
    with trio.fail_after(seconds):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


async def test_an_answer_before_the_body_closes_the_connection(gateway: Gateway) -> None:
    """A request that announces a body it never sends (no key: a 401 at once) gets its
    answer and then EOF: the socket is closed, not held for as long as the client likes
    (held, a keyless client could take every file descriptor of the server)."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    for path in ("/v1/chat/completions", "/healthz"):  # a 401, and a 405
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n".encode())
        received = await read_to_eof(stream, 5)
        assert received.split(b"\r\n", 1)[0] in (b"HTTP/1.1 401 ", b"HTTP/1.1 405 ")
        assert b"connection: close" in received.lower()
        await stream.aclose()


async def test_a_draining_server_is_not_ready_and_sends_new_work_elsewhere(nursery: trio.Nursery, gateway: Gateway) -> None:
    """Once a shutdown starts, /readyz is 503 (`shutting_down`), a request that still
    reaches the app (pipelined on a connection) is a 503 `shutting_down`, and every answer
    closes its connection."""
    from gateway.app import create_app

    app = create_app(FakeRuntime(nursery), gateway.stores, gateway.config)
    client = app.test_client()
    assert (await client.get("/readyz")).status_code == 200
    app.extensions["lmgate"].draining.set()
    r = await client.get("/readyz")
    body = await r.get_json()
    assert r.status_code == 503 and "shutting_down" in body["degraded"] and body["ready"] is False
    assert r.headers["Connection"] == "close"
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                          headers=gateway.headers)
    assert (r.status_code, (await r.get_json())["error"]["code"]) == (503, "shutting_down")
    assert r.headers["Retry-After"] == "1"
    for path, body in [("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "x"}),
                       ("/v1/rerank", {"query": "x", "documents": ["y"]}), ("/score", {"text_1": "x", "text_2": "y"})]:
        r = await client.post(path, json=body, headers=gateway.headers)
        assert (r.status_code, (await r.get_json())["error"]["code"]) == (503, "shutting_down"), path


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"model": MODEL, "prompt": "SILENT", "max_tokens": 5, "stream": True}),
    ("/v1/responses", {"model": MODEL, "input": "SILENT", "stream": True}),
])
async def test_a_stream_whose_client_left_before_its_first_byte_is_aborted(
    nursery: trio.Nursery, gateway: Gateway, monkeypatch: pytest.MonkeyPatch, path: str, body: dict
) -> None:
    """The client disconnects as the route returns its streaming answer, before Quart
    starts the body: the body's `aclose` never runs, and only `gateway.app.HttpConnection`
    ends the request (it generated on until garbage collection freed the body: a client
    gone ~2 ms after sending held KV blocks for seconds, or the whole answer). Driven at
    the ASGI level: the disconnect arrives when the answer's start is sent."""
    from gateway.app import create_app
    from gateway.routes_openai import SseBody

    runtime = FakeRuntime(nursery)
    app = create_app(runtime, gateway.stores, gateway.config)
    kept: list[SseBody] = []  # held, as a reference cycle would: garbage collection cannot end it here
    real_init = SseBody.__init__

    def keep(self: SseBody, *args: Any) -> None:
        real_init(self, *args)
        kept.append(self)

    monkeypatch.setattr(SseBody, "__init__", keep)
    gone = trio.Event()
    raw = json.dumps(body).encode()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            gone.set()
            await trio.sleep_forever()  # the client is gone: this send never completes

    headers = [(b"authorization", f"Bearer {gateway.api_key}".encode()), (b"content-type", b"application/json"),
               (b"content-length", str(len(raw)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "extensions": {}}
    with trio.fail_after(10):
        await app(scope, receive, send)
    assert len(kept) == 1 and len(runtime.calls) == 1
    assert runtime.calls[0].request_id in runtime.cancelled  # aborted when the exchange ended


async def test_an_idle_kept_alive_connection_is_closed_after_its_timeout_and_at_a_shutdown(
    nursery: trio.Nursery, gateway: Gateway
) -> None:
    """After an answer, a kept-alive connection that sends nothing more is closed after
    `keep_alive_seconds`, and at once when the server shuts down (its keep-alive timer was
    never started: such a connection stayed open forever and held a shutdown for its grace)."""
    config = dataclasses.replace(gateway.config, keep_alive_seconds=0.5, shutdown_grace_seconds=10.0)
    base_url, _, stop = await start_gateway(nursery, gateway.stores, config)
    host, port = base_url.removeprefix("http://").rsplit(":", 1)

    async def idle_after_one_answer() -> trio.SocketStream:
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while b'"ok"}' not in answer:
                answer += await stream.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        return stream

    stream = await idle_after_one_answer()
    t0 = time.monotonic()
    with trio.fail_after(5):
        assert await stream.receive_some(65536) == b""  # EOF: the server closed it
    assert 0.3 < time.monotonic() - t0 < 3
    await stream.aclose()

    stream = await idle_after_one_answer()
    t0 = time.monotonic()
    stop.set()
    with trio.fail_after(5):
        assert await stream.receive_some(65536) == b""
    assert time.monotonic() - t0 < 3  # at once, not after the 10 s grace
    await stream.aclose()


async def test_a_private_redis_that_dies_is_reported_reaped_and_restarted_with_its_data(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cache.redis_server import PrivateRedis, _send_command
    from gateway.server import watch_private_redis

    with PrivateRedis(tmp_path / "redis", persistent=True) as private:
        pid, port = private.pid, private.port
        assert pid is not None
        assert _send_command(private.host, port, "SET", "tenant", "kept") == b"+OK"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_private_redis, private, 0.05)
            await trio.sleep(1.2)  # (the append-only file is written every second)
            assert not caplog.records  # alive: nothing to say
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(30):
                while "runs again" not in caplog.text:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert "private redis-server has exited" in caplog.text
        with pytest.raises(ChildProcessError):  # reaped: no zombie left behind
            os.waitpid(pid, os.WNOHANG)
        assert private.port == port and private.pid != pid
        assert _send_command(private.host, port, "GET", "tenant").endswith(b"kept")


@pytest.mark.parametrize("headers", [
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 8\r\n",  # a version Hypercorn does not speak
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",  # no key
])
async def test_a_websocket_upgrade_hypercorn_refuses_closes_its_connection(gateway: Gateway, headers: str) -> None:
    """The 400 said `Connection: close`, but the socket stayed open for good: a keyless
    client held a descriptor per connection."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(f"GET /v1/ws HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    received = await read_to_eof(stream, 5)
    assert received.startswith(b"HTTP/1.1 400")
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "bad_request"
    await stream.aclose()


async def test_data_sent_before_the_upgrade_is_answered_ends_the_socket_and_its_handler(gateway: Gateway) -> None:
    """A valid upgrade with a byte of data in the same write: Hypercorn answers 400 but had
    already started the app, which waited for frames that never come (with a key in the
    header it held the socket and its count in lmgate_ws_connections until shutdown)."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                          b"Authorization: Bearer " + gateway.api_key.encode() + b"\r\n\r\nx")
    assert (await read_to_eof(stream, 5)).startswith(b"HTTP/1.1 400")
    await stream.aclose()
    async with httpx.AsyncClient(base_url=gateway.base_url, headers={"Authorization": "Bearer " + ADMIN_KEY}) as c:
        with trio.fail_after(5):
            while "lmgate_ws_connections 0.0" not in (await c.get("/metrics")).text:
                await trio.sleep(0.05)


def _masked_text_frame(payload: bytes, first_byte: int = 0x81) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return bytes([first_byte, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(("frame", "code"), [
    (b"\x81\x02{}", 1002),  # unmasked
    (_masked_text_frame(b"{}", first_byte=0xC1), 1002),  # a reserved bit set
    (_masked_text_frame(b"\xff\xfe"), 1007),  # text that is not UTF-8
], ids=["unmasked", "reserved-bit", "not-utf-8"])
async def test_a_frame_the_server_cannot_accept_gets_a_close_frame_saying_why(gateway: Gateway, frame: bytes,
                                                                             code: int) -> None:
    """RFC 6455 7.1.7: the connection ended with no Close frame (the client saw 1006 and
    never why); the Close with the protocol error comes first, then EOF, and the handler ends."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                          b"Authorization: Bearer " + gateway.api_key.encode() + b"\r\n\r\n")
    received = b""
    with trio.fail_after(5):
        while b'{"type":"ready"}' not in received:
            received += await stream.receive_some(65536)
    await stream.send_all(frame)
    close = await read_to_eof(stream, 5)
    await stream.aclose()
    while close[:1] == b"\x89":  # (the server's pings: every --sse-ping-seconds, one at the start)
        close = close[2 + (close[1] & 0x7F):]
    assert close[0] == 0x88 and int.from_bytes(close[2:4], "big") == code, close
    async with httpx.AsyncClient(base_url=gateway.base_url, headers={"Authorization": "Bearer " + ADMIN_KEY}) as c:
        with trio.fail_after(5):
            while "lmgate_ws_connections 0.0" not in (await c.get("/metrics")).text:
                await trio.sleep(0.05)


@pytest.mark.parametrize("upgrade", ["Connection: upgrade\r\nUpgrade: websocket\r\n",
                                     "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"],
                         ids=["websocket", "h2c"])
async def test_a_connection_reset_under_an_upgrade_header_is_closed(gateway: Gateway, upgrade: str) -> None:
    """POSTs with an `Upgrade` header pipelined, then a reset before the second answer is
    written: h11 waits (PAUSED) for the answer to say whether the protocol switches, the
    answer's write failed, and the read loop waited for good: the socket was never closed
    (a soak leaked 14 in 22 minutes)."""
    import socket
    import struct

    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": MODEL, "prompt": "hi"}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gateway.api_key}\r\n"
               f"content-type: application/json\r\n{upgrade}content-length: {len(body)}\r\n\r\n").encode() + body

    def reset_after_two() -> None:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(request)
            sock.recv(65536)
            sock.sendall(request)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset

    def sockets() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    before = sockets()
    for _ in range(10):
        await trio.to_thread.run_sync(reset_after_two)
    with trio.fail_after(10):
        while sockets() > before + 2:  # (a pooled client socket may come and go)
            await trio.sleep(0.1)


async def test_an_upgrade_asked_of_a_plain_route_is_answered_as_its_get(gateway: Gateway) -> None:
    """RFC 9110 7.8: a server may ignore `Upgrade`. A GET of /v1/models carrying WebSocket
    upgrade headers (a client whose shared headers picked them up) got Quart's 400 "The
    browser (or proxy) sent a request that this server could not understand", without an
    X-Request-Id; it gets the route's answer."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                          b"Authorization: Bearer " + gateway.api_key.encode() + b"\r\n\r\n")
    received = await read_to_eof(stream, 5)
    await stream.aclose()
    head, body = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"x-request-id: req_" in head.lower(), head
    assert json.loads(body)["data"][0]["id"] == MODEL


async def test_http2_body_data_after_the_answer_neither_stops_the_server_nor_the_answer(gateway: Gateway) -> None:
    """HTTP/2 (prior knowledge, as httpx and the openai SDK with http2=True): a 401 or 413
    goes out before the body is read, and the client goes on uploading. The data for the
    answered stream raised KeyError in Hypercorn, which ended the whole server (anyone,
    without a key, could stop it); the client now reads its answer and the server goes on."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200_000}], "max_tokens": 1}
    async with httpx.AsyncClient(base_url=gateway.base_url, http1=False, http2=True, timeout=20) as h2c:
        for _ in range(3):
            r = await h2c.post("/v1/chat/completions", headers={"Authorization": "Bearer lmg-wrong"}, json=body)
            assert r.http_version == "HTTP/2" and r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = await h2c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {gateway.api_key}"},
                           content=b"x" * (gateway.config.max_body_bytes + 100_000))
        assert r.status_code == 413, r.text
        assert (await h2c.get("/healthz")).status_code == 200  # the same connection, still served


async def test_a_connection_that_fails_inside_the_server_is_closed_alone(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An exception escaping one connection's handler (a Hypercorn bug) ended
    `trio.serve_listeners` and the whole server; it closes that connection alone, logged."""
    from hypercorn.protocol.h11 import H11Protocol

    create = H11Protocol._create_stream

    async def failing(self, request):  # type: ignore[no-untyped-def]
        if request.target == b"/boom":
            raise RuntimeError("a bug inside the HTTP server")
        await create(self, request)

    monkeypatch.setattr(H11Protocol, "_create_stream", failing)
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await read_to_eof(stream, 5) == b""  # closed, unanswered
    await stream.aclose()
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        assert (await client.get("/healthz")).status_code == 200  # the server goes on
    assert "an HTTP connection failed inside the server" in caplog.text


async def test_a_head_the_server_cannot_read_still_gets_its_status(gateway: Gateway) -> None:
    """An answer to HEAD has no body: the JSON body made h11 refuse, and no status line went out."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    received = await read_to_eof(stream, 5)
    assert received.startswith(b"HTTP/1.1 400") and received.endswith(b"\r\n\r\n")  # headers, no body
    await stream.aclose()


@pytest.mark.parametrize(("request_bytes", "status", "code"), [
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
     "bad_request"),  # a chunk size that is not hex
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000, 431,  # past 64 KiB, no end yet
     "request_header_fields_too_large"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
     "not_implemented"),
])
async def test_http_the_server_cannot_read_gets_an_openai_error_body(gateway: Gateway, request_bytes: bytes,
                                                                     status: int, code: str) -> None:
    """Hypercorn answers these itself, before the app: the answers had empty bodies."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(request_bytes)
    head, body = (await read_to_eof(stream, 5)).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 %d" % status) and b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == code
    await stream.aclose()


async def h2c_get_healthz(host: str, port: int) -> tuple[Any, trio.SocketStream]:
    """A new HTTP/2 connection (prior knowledge) that has sent GET /healthz as stream 1: the
    client's h2 state machine, to read the answer with, and the socket."""
    import h2.connection

    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "x")],
                      end_stream=True)
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(conn.data_to_send())
    return conn, stream


async def test_an_h2c_connection_that_opens_no_stream_times_out(nursery: trio.Nursery, gateway: Gateway) -> None:
    """The HTTP/2 preface alone (prior knowledge) stopped the idle timer for good: such a
    connection was never closed. It is closed after `keep_alive_seconds`, as any idle one;
    one that makes a request is served."""
    config = dataclasses.replace(gateway.config, keep_alive_seconds=0.5)
    base_url, _, stop = await start_gateway(nursery, gateway.stores, config)
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    t0 = time.monotonic()
    await stream.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    await read_to_eof(stream, 5)  # the server's SETTINGS, then its GOAWAY and EOF
    assert 0.3 < time.monotonic() - t0 < 3
    await stream.aclose()
    # an h2c request (prior knowledge) is still served
    import h2.events

    conn, stream = await h2c_get_healthz(host, int(port))
    body, ended = b"", False
    with trio.fail_after(5):
        while not ended:
            for event in conn.receive_data(await stream.receive_some(65536)):
                body += event.data if isinstance(event, h2.events.DataReceived) else b""
                ended = ended or isinstance(event, h2.events.StreamEnded)
    assert json.loads(body) == {"status": "ok"}
    await stream.aclose()
    stop.set()



async def test_a_request_framed_by_both_length_and_chunks_ends_its_connection(gateway: Gateway) -> None:
    """RFC 9112 §6.3: a proxy that framed it by its Content-Length would take the rest of the
    chunked body for a next request; the pipelined request after it is not served."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "fake-model", "prompt": "x", "max_tokens": 1}).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + gateway.api_key.encode()
                          + b"\r\nContent-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
                          + b"\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
                          + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    received = await read_to_eof(stream, 5)
    assert received.startswith(b"HTTP/1.1 200") and b"connection: close" in received.lower()
    assert received.count(b"HTTP/1.1 ") == 1  # the pipelined request was not answered
    await stream.aclose()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read a connection's timers")
async def test_accepted_connections_have_tcp_keepalive(gateway: Gateway) -> None:
    """A peer gone without a FIN (a NAT's timeout) is found by TCP keepalive: the server's
    end of a connection runs a keepalive timer."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await stream.receive_some(65536)
    out = await trio.to_thread.run_sync(lambda: subprocess.run(
        ["ss", "-tnoH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True).stdout)
    assert "keepalive" in out, out
    await stream.aclose()


async def test_an_idle_http2_connection_is_closed_with_a_goaway(nursery: trio.Nursery, gateway: Gateway) -> None:
    """An HTTP/2 connection closed by the server (idle past `keep_alive_seconds`, or at a
    shutdown) first says so with GOAWAY (RFC 9113 6.8): its last stream id tells a client
    which requests were not processed and may be retried elsewhere. Hypercorn closed the
    socket without one."""
    import h2.events

    config = dataclasses.replace(gateway.config, keep_alive_seconds=0.5)
    base_url, _, stop = await start_gateway(nursery, gateway.stores, config)
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    conn, stream = await h2c_get_healthz(host, int(port))
    events = [event for event in conn.receive_data(await read_to_eof(stream, 5))]
    await stream.aclose()
    stop.set()
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1 for e in events)
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert len(goaway) == 1 and (goaway[0].error_code, goaway[0].last_stream_id) == (0, 1), events


async def test_the_access_log_has_a_line_per_answer_without_query_strings(  # type: ignore[no-untyped-def]
        nursery: trio.Nursery, stores, gateway_config, caplog) -> None:
    """`--access-log`: a line per answer, with the answer's X-Request-Id, never a query
    string (a client may put a key there) and never a raw control character (a forged
    line); off by default (only answers with errors are logged)."""
    caplog.set_level(logging.INFO, logger="hypercorn.access")
    base_url, _, stop = await start_gateway(nursery, stores, dataclasses.replace(gateway_config, access_log=True))
    async with httpx.AsyncClient(base_url=base_url) as client:
        await client.get("/healthz?api_key=lmg-secret", headers={"X-Request-Id": "trace-7"})
        await client.get("/v1/models/a%0Aforged%E2%80%AE")
        await client.get("/v1/models/x")
    with trio.fail_after(10):  # (a line is written once its answer has gone: after the client has it)
        # (a line with "- -" for status and bytes: the connection closed while its answer was
        # being sent, Hypercorn's; the client closing at once after an answer races its line)
        while len(lines := [r.getMessage() for r in caplog.records
                            if r.name == "hypercorn.access" and '" - - ' not in r.getMessage()]) < 3:
            await trio.sleep(0.01)
    stop.set()
    assert len(lines) == 3 and "lmg-secret" not in caplog.text, "\n".join(lines)
    assert re.fullmatch(r'127\.0\.0\.1:\d+ "GET /healthz HTTP/1\.1" 200 \d+ [0-9.]+s trace-7', lines[0]), lines[0]
    assert '"GET /v1/models/a\\x0aforged\\u202e HTTP/1.1" 404' in lines[1] and "\n" not in lines[1]
    caplog.clear()
    base_url, _, stop = await start_gateway(nursery, stores, gateway_config)  # (the default: off)
    async with httpx.AsyncClient(base_url=base_url) as client:
        await client.get("/healthz")
    stop.set()
    assert not [r for r in caplog.records if r.name == "hypercorn.access"]
