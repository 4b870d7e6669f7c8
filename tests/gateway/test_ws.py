"""The /v1/ws protocol over a real socket: auth, multiplexing, cancel, malformed and
oversized frames, and socket close → every request cancelled."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any

import httpx
import pytest
import trio
from httpx_ws import WebSocketDisconnect, WebSocketUpgradeError, aconnect_ws

from gateway import ws as ws_module
from gateway.config import GatewayConfig
from tests.gateway.conftest import MODEL, Gateway, word


def request_frame(rid: str, content: str = "hi", endpoint: str = "chat.completions", **body: Any) -> dict[str, Any]:
    if endpoint == "chat.completions":
        payload = {"model": MODEL, "messages": [{"role": "user", "content": content}], **body}
    else:
        payload = {"model": MODEL, "prompt": content, **body}
    return {"type": "request", "id": rid, "endpoint": endpoint, "body": payload}


async def frames_until_done(ws: Any, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Collect frames per id until each id got a done/error/cancelled frame."""
    by_id: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    open_ids = set(ids)
    with trio.fail_after(5):
        while open_ids:
            frame = await ws.receive_json()
            by_id.setdefault(frame.get("id"), []).append(frame)
            if frame["type"] in ("done", "error", "cancelled"):
                open_ids.discard(frame.get("id"))
    return by_id


async def test_header_auth_and_multiplexed_requests(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        assert await ws.receive_json() == {"type": "ready"}
        await ws.send_json(request_frame("a", max_tokens=3))
        await ws.send_json(request_frame("b", endpoint="completions", max_tokens=2, n=2))
        frames = await frames_until_done(ws, {"a", "b"})
    tokens_a = [f for f in frames["a"] if f["type"] == "token"]
    assert "".join(f["text"] for f in tokens_a) == word(0, 0) + word(0, 1) + word(0, 2)
    assert tokens_a[0]["token_ids"] == [0]
    done_a = frames["a"][-1]
    assert done_a["type"] == "done" and done_a["finish_reasons"] == ["length"]
    assert done_a["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}
    by_index = {0: "", 1: ""}
    for f in frames["b"]:
        if f["type"] == "token":
            by_index[f["index"]] += f["text"]
    assert by_index == {0: word(0, 0) + word(0, 1), 1: word(1, 0) + word(1, 1)}
    assert frames["b"][-1]["finish_reasons"] == ["length", "length"]


async def test_cache_control_of_a_request_frame(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        assert await ws.receive_json() == {"type": "ready"}
        await ws.send_json({**request_frame("a", max_tokens=1), "cache_control": "no-cache"})
        await frames_until_done(ws, {"a"})
        assert (gateway.runtime.calls[-1].cache_lookup, gateway.runtime.calls[-1].cache_store) == (False, True)
        await ws.send_json(request_frame("b", max_tokens=1))
        await frames_until_done(ws, {"b"})
        assert (gateway.runtime.calls[-1].cache_lookup, gateway.runtime.calls[-1].cache_store) == (True, True)


async def test_ids_longer_than_128_characters_are_refused_without_being_echoed(gateway: Gateway) -> None:
    """Every frame of an answer repeats its id: a megabyte id made each token frame a
    megabyte (4 MB of request frames sent 1.2 GB back in 10 s)."""
    long_id = "x" * 129
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        assert await ws.receive_json() == {"type": "ready"}
        for frame in (request_frame(long_id, max_tokens=1), {"type": "cancel", "id": long_id}):
            await ws.send_json(frame)
            error = await ws.receive_json()
            assert (error["id"], error["status"], error["error"]["code"]) == (None, 400, "invalid_frame")
            assert "length <= 128" in error["error"]["message"] and long_id not in json.dumps(error)
        await ws.send_json(request_frame("y" * 128, max_tokens=1))  # 128 is fine
        assert (await frames_until_done(ws, {"y" * 128}))["y" * 128][-1]["type"] == "done"
    assert len(gateway.runtime.calls) == 1


async def test_auth_frame(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client) as ws:
        await ws.send_json({"type": "auth", "api_key": gateway.api_key})
        assert await ws.receive_json() == {"type": "ready"}
        await ws.send_json(request_frame("a", max_tokens=1))
        frames = await frames_until_done(ws, {"a"})
    assert frames["a"][-1]["type"] == "done"


async def test_bad_auth_frame_is_an_error_and_close(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client) as ws:
        await ws.send_json({"type": "auth", "api_key": "lmg-wrong"})
        frame = await ws.receive_json()
        assert (frame["type"], frame["status"]) == ("error", 401)
        with pytest.raises(WebSocketDisconnect) as info:
            await ws.receive_json()
    assert info.value.code == 1008


async def test_a_key_redis_cannot_check_closes_try_again_later(gateway: Gateway, redis_server) -> None:
    """A key not seen lately, sent while Redis is down, cannot be checked: a 503 frame and
    close 1013 (try again later). It was 1008, which says the credential was refused."""
    _, unseen = await gateway.stores.tenants.create_key("t1", "never used")
    redis_server.stop()
    try:
        async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client) as ws:
            await ws.send_json({"type": "auth", "api_key": unseen})
            frame = await ws.receive_json()
            assert (frame["type"], frame["status"], frame["error"]["code"]) == ("error", 503, "auth_unavailable"), frame
            with pytest.raises(WebSocketDisconnect) as info:
                await ws.receive_json()
        assert info.value.code == 1013
    finally:
        await trio.to_thread.run_sync(redis_server.start)


async def test_request_before_auth_is_refused(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client) as ws:
        await ws.send_json(request_frame("a"))
        frame = await ws.receive_json()
        assert frame["status"] == 401
    for first in ('{"type": "request", "id": "a"}', "garbage"):  # not even a frame: still a 401
        async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client) as ws:
            await ws.send_text(first)
            frame = await ws.receive_json()
            assert (frame["status"], frame["error"]["code"]) == (401, "missing_api_key"), frame
    assert gateway.runtime.calls == []


async def test_bad_header_rejects_the_upgrade(gateway: Gateway, caplog) -> None:  # noqa: ANN001
    """Refused as HTTP refuses, and as visible: an `X-Request-Id`, a log line, a count in
    `lmgate_http_requests_total` (an audit: key guessing over the socket left no trace);
    the socket's refused frames are logged too, and an accepted upgrade is counted."""
    import logging

    import gateway.errors as errors

    caplog.set_level(logging.INFO, logger="lmgate.gateway")
    errors._failure_lines.__init__()  # (earlier tests' lines: another budget)
    async with httpx.AsyncClient() as client:
        with pytest.raises(WebSocketUpgradeError) as info:
            async with aconnect_ws(gateway.ws_url, client, headers={"Authorization": "Bearer lmg-wrong",
                                                                    "X-Request-Id": "trace-42"}):
                pass
        assert info.value.response.status_code == 401
        assert info.value.response.headers["X-Request-Id"] == "trace-42"  # as every HTTP answer
        assert "request trace-42 GET /v1/ws: 401 invalid_api_key (tenant -)" in caplog.text
        async with aconnect_ws(gateway.ws_url, client, headers={**gateway.headers, "X-Request-Id": "trace-43"}) as ws:
            assert ws.response is not None and ws.response.headers["X-Request-Id"] == "trace-43"
            assert await ws.receive_json() == {"type": "ready"}
            await ws.send_json(request_frame("bad\nframe", max_tokens=-5))
            assert (await ws.receive_json())["status"] == 400
        assert f"request trace-43/bad\\x0aframe WS /v1/ws: 400 invalid_value param max_tokens (tenant {gateway.tenant_id})" \
            in caplog.text
        async with aconnect_ws(gateway.ws_url, client, headers={"X-Request-Id": "trace-44"}) as ws:
            await ws.send_json({"type": "auth", "api_key": "lmg-guess"})
            assert (await ws.receive_json())["status"] == 401
        assert "request trace-44 WS /v1/ws: 401 invalid_api_key (tenant -)" in caplog.text
        text = (await client.get(gateway.base_url + "/metrics", headers=gateway.headers)).text
    assert 'route="/v1/ws",status="401",tenant="-"' in text and f'route="/v1/ws",status="101",tenant="{gateway.tenant_id}"' in text


async def test_cancel_frame_cancels_only_that_request(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        await ws.receive_json()
        await ws.send_json(request_frame("slow", "HANG"))
        first = await ws.receive_json()
        assert (first["type"], first["id"]) == ("token", "slow")
        await ws.send_json(request_frame("fast", max_tokens=2))
        await ws.send_json({"type": "cancel", "id": "slow"})
        await ws.send_json({"type": "cancel", "id": "slow"})  # repeated before "cancelled": ignored
        frames = await frames_until_done(ws, {"slow", "fast"})
        await ws.send_json({"type": "cancel", "id": "slow"})  # no longer active
        again = await ws.receive_json()
    assert frames["slow"][-1] == {"type": "cancelled", "id": "slow"}
    assert not any(f["type"] == "error" for f in frames["slow"])  # no 404 for the repeat
    assert frames["fast"][-1]["type"] == "done"
    slow_id = next(c.request_id for c in gateway.runtime.calls if c.messages[0].content == "HANG")
    assert gateway.runtime.cancelled == {slow_id}
    assert (again["type"], again["status"]) == ("error", 404)


async def test_malformed_frames_get_error_frames_and_socket_stays(gateway: Gateway) -> None:
    bad = [
        "not json",
        '{"type": "launch"}',
        '{"type": "request", "id": "x"}',
        '{"type": "request", "id": "x", "endpoint": "embeddings", "body": {}}',
        b'{"type": "request", "id": "\xff"}',
        # nested deeper than msgspec's decoder recurses (it raised RecursionError, which closed the socket)
        '{"type": "request", "id": "d", "endpoint": "completions", "body": ' + "[" * 5000 + "]" * 5000 + "}",
    ]
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        await ws.receive_json()
        for data in bad:
            if isinstance(data, bytes):
                await ws.send_bytes(data)
            else:
                await ws.send_text(data)
            frame = await ws.receive_json()
            assert (frame["type"], frame["status"]) == ("error", 400), data
            assert set(frame["error"]) == {"message", "type", "param", "code"}
        # a frame with a field of the wrong type is refused under its id (it was null)
        await ws.send_json({**request_frame("typed"), "cache_control": 5})
        frame = await ws.receive_json()
        assert (frame["id"], frame["status"], frame["type"]) == ("typed", 400, "error")
        # a well-formed frame with a bad body is an error for that id
        await ws.send_json(request_frame("bad", temperature=-3))
        frame = await ws.receive_json()
        assert (frame["id"], frame["status"], frame["error"]["param"]) == ("bad", 400, "temperature")
        tools = [{"type": "function", "function": {"name": "f"}}]
        await ws.send_json(request_frame("t", tools=tools, tool_choice="required"))  # tool calls: HTTP only
        frame = await ws.receive_json()
        assert (frame["id"], frame["status"], frame["error"]["param"]) == ("t", 400, "tools")
        await ws.send_json(request_frame("s", guided_json="[" * 5000 + "]" * 5000))  # a schema's text, too deep
        frame = await ws.receive_json()
        assert (frame["id"], frame["status"], frame["error"]["param"]) == ("s", 400, "guided_json")
        await ws.send_json({**request_frame("m"), "body": {"model": "nope", "prompt": "x"}, "endpoint": "completions"})
        assert (await ws.receive_json())["status"] == 404
        await ws.send_json(request_frame("ok", max_tokens=1))
        frames = await frames_until_done(ws, {"ok"})
    assert frames["ok"][-1]["type"] == "done"


async def test_oversized_frame_errors_and_closes_1009(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        await ws.receive_json()
        await ws.send_json(request_frame("big", "x" * (gateway.config.max_ws_frame_bytes + 1)))
        frame = await ws.receive_json()
        assert (frame["type"], frame["status"], frame["error"]["code"]) == ("error", 413, "frame_too_large")
        with pytest.raises(WebSocketDisconnect) as info:
            await ws.receive_json()
    assert info.value.code == 1009
    assert gateway.runtime.calls == []


async def test_stream_limit_and_duplicate_ids(gateway: Gateway) -> None:
    limit = gateway.config.max_streams_per_socket
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        await ws.receive_json()
        for i in range(limit):
            await ws.send_json(request_frame(f"h{i}", "HANG"))
            assert (await ws.receive_json())["type"] == "token"
        await ws.send_json(request_frame("h0", "HANG"))
        assert (await ws.receive_json())["status"] == 409
        await ws.send_json(request_frame("extra", "HANG"))
        frame = await ws.receive_json()
        assert (frame["id"], frame["status"], frame["error"]["code"]) == ("extra", 429, "too_many_streams")


async def test_socket_close_cancels_all_requests(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        await ws.receive_json()
        for rid in ("a", "b", "c"):
            await ws.send_json(request_frame(rid, "HANG"))
        for _ in range(3):
            await ws.receive_json()
    ids = [c.request_id for c in gateway.runtime.calls]
    with trio.fail_after(5):
        for rid in ids:
            await gateway.runtime.cancel_events[rid].wait()
    assert gateway.runtime.cancelled == set(ids)


@pytest.mark.parametrize("auth", ["header", "frame"])
async def test_an_open_socket_sees_revocation_and_model_changes(gateway: Gateway, auth: str) -> None:
    """Each request on a socket is authorized as an HTTP request would be: a model the
    tenant may no longer use is a 404, a revoked key a 401, from the next request on."""
    key_id, key = await gateway.stores.tenants.create_key("t1", "socket")
    headers = {"Authorization": f"Bearer {key}"} if auth == "header" else {}
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=headers) as ws:
        if auth == "frame":
            await ws.send_json({"type": "auth", "api_key": key})
        assert await ws.receive_json() == {"type": "ready"}
        await ws.send_json(request_frame("a", max_tokens=1))
        assert (await frames_until_done(ws, {"a"}))["a"][-1]["type"] == "done"
        await gateway.stores.tenants.update_tenant("t1", models=("other-*",))
        await ws.send_json(request_frame("b", max_tokens=1))
        [refused] = (await frames_until_done(ws, {"b"}))["b"]
        assert refused["type"] == "error" and refused["error"]["code"] == "model_not_found"
        await gateway.stores.tenants.update_tenant("t1", models=("*",))
        await gateway.stores.tenants.revoke_key(key_id)
        await ws.send_json(request_frame("c", max_tokens=1))
        [refused] = (await frames_until_done(ws, {"c"}))["c"]
        assert refused["type"] == "error" and refused["error"]["code"] == "invalid_api_key"


async def test_a_shutdown_closes_sockets_once_their_streams_are_done(nursery: trio.Nursery, gateway: Gateway) -> None:
    """On SIGTERM a socket takes no new requests (503 shutting_down), lets its streams
    finish, then closes with 1001 (going away); an idle one closes at once. The server
    stops well inside its grace period instead of waiting for Hypercorn to cut the sockets."""
    import dataclasses
    import time

    from tests.gateway.conftest import start_gateway

    config = dataclasses.replace(gateway.config, shutdown_grace_seconds=5.0)
    base_url, runtime, stop = await start_gateway(nursery, gateway.stores, config)
    runtime.delay = 0.05
    ws_url = base_url.replace("http://", "ws://") + "/v1/ws"
    closed: dict[str, tuple[int, float]] = {}
    frames: list[dict[str, Any]] = []
    streaming = trio.Event()

    async def idle() -> None:
        async with httpx.AsyncClient() as client, aconnect_ws(ws_url, client, headers=gateway.headers) as ws:
            assert await ws.receive_json() == {"type": "ready"}
            with pytest.raises(WebSocketDisconnect) as gone:
                await ws.receive_json()
            closed["idle"] = (gone.value.code, time.monotonic())

    async def unauthenticated() -> None:  # still owes its auth frame
        async with httpx.AsyncClient() as client, aconnect_ws(ws_url, client) as ws:
            with pytest.raises(WebSocketDisconnect) as gone:
                await ws.receive_json()
            closed["unauthenticated"] = (gone.value.code, time.monotonic())

    async def busy() -> None:
        async with httpx.AsyncClient() as client, aconnect_ws(ws_url, client, headers=gateway.headers) as ws:
            assert await ws.receive_json() == {"type": "ready"}
            await ws.send_json(request_frame("long", max_tokens=20))
            frames.append(await ws.receive_json())
            streaming.set()
            await stop_sent.wait()
            await ws.send_json(request_frame("late", max_tokens=1))
            with pytest.raises(WebSocketDisconnect) as gone:
                while True:
                    frames.append(await ws.receive_json())
            closed["busy"] = (gone.value.code, time.monotonic())

    stop_sent = trio.Event()
    async with trio.open_nursery() as clients:
        clients.start_soon(idle)
        clients.start_soon(unauthenticated)
        clients.start_soon(busy)
        await streaming.wait()
        t0 = time.monotonic()
        stop.set()
        await trio.sleep(0.1)  # the server is draining
        stop_sent.set()
    assert closed["idle"][0] == 1001 and closed["idle"][1] - t0 < 1.0
    assert closed["unauthenticated"][0] == 1001 and closed["unauthenticated"][1] - t0 < 1.0  # not at its auth timeout
    late = [f for f in frames if f.get("id") == "late"]
    assert [(f["type"], f["status"], f["error"]["code"]) for f in late] == [("error", 503, "shutting_down")]
    long = [f for f in frames if f.get("id") == "long"]
    assert long[-1]["type"] == "done" and sum(f["type"] == "token" for f in long) == 20  # it finished
    assert closed["busy"][0] == 1001 and closed["busy"][1] - t0 < 3.0  # after its stream, not at the grace's end


async def test_a_body_s_stream_field_is_ignored_so_prompt_logprobs_pass(gateway: Gateway) -> None:
    """HTTP refuses prompt_logprobs with stream true; the socket always streams and ignores
    the field, so it does not refuse them."""
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        assert await ws.receive_json() == {"type": "ready"}
        await ws.send_json(request_frame("a", endpoint="completions", max_tokens=1, prompt_logprobs=1, stream=True))
        frames = await frames_until_done(ws, {"a"})
    assert frames["a"][-1]["type"] == "done", frames
    assert gateway.runtime.calls[-1].params.prompt_logprobs == 1
    # each choice's first frame carries them: admission bounds a copy per choice (chat's HTTP
    # answer has one, and was counted so here too: a review)
    assert gateway.runtime.calls[-1].prompt_logprob_copies is None
    first = next(f for f in frames["a"] if f["type"] == "token")
    assert first["prompt_logprobs"][0] is None and len(first["prompt_logprobs"]) == len(first["prompt_token_ids"])


# ---------------------------------------------------------------- clients that do not read


class RawWs:
    """A WebSocket client on a bare trio socket with a small receive buffer: it writes
    frames and reads nothing, so the server's sends to it block, then it resets (RST)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, gateway: Gateway) -> RawWs:
        host, port = gateway.base_url.removeprefix("http://").split(":")
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        await sock.send((f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                         f"Authorization: Bearer {gateway.api_key}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        return cls(sock)

    async def send_json(self, obj: dict[str, Any]) -> None:
        data, mask = json.dumps(obj).encode(), os.urandom(4)
        assert len(data) < 65536
        head = bytes([0x81, 0x80 | len(data)]) if len(data) < 126 else bytes([0x81, 0x80 | 126]) + struct.pack(
            ">H", len(data))
        out = head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        while out:
            out = out[await self.sock.send(out):]

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


async def ws_connections(gateway: Gateway) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(gateway.base_url + "/metrics")).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("lmgate_ws_connections ")))


@pytest.mark.parametrize("unread", [40, 100])
async def test_a_client_that_writes_but_never_reads_then_resets_ends_its_socket(
        gateway: Gateway, unread: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # streams fill the client's buffers; then frames the reader answers (unknown cancels):
    # the reader used to wait behind a blocked stream's send and stop emptying Hypercorn's
    # queue, so the reset's disconnect never reached the app and the socket's handler
    # (and the connection gauge) stayed for ever. 100 unread answers: closed as not reading
    monkeypatch.setattr(ws_module, "UNREAD_REPLIES_S", 0.3)
    raw = await RawWs.connect(gateway)
    for i in range(4):
        await raw.send_json({"type": "request", "id": f"r{i}", "endpoint": "completions",
                             "body": {"model": MODEL, "prompt": "x", "max_tokens": 400, "n": 4}})
    await trio.sleep(0.3)
    for i in range(unread):
        await raw.send_json({"type": "cancel", "id": f"u{i}"})
    await trio.sleep(0.5)
    assert await ws_connections(gateway) == 1
    raw.reset()
    with trio.fail_after(5):
        while await ws_connections(gateway) != 0:
            await trio.sleep(0.05)
    ids = [c.request_id for c in gateway.runtime.calls]
    with trio.fail_after(5):
        for rid in ids:
            await gateway.runtime.cancel_events[rid].wait()


async def test_a_client_that_floods_without_reading_then_ends_its_side_gets_the_connection_closed(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed as not reading, the socket is read on (frames dropped) until the client's
    EOF or close: a handler that returned left Hypercorn's queue of the client's frames
    unread, so a client still sending never had its EOF read and the server's end of the
    connection stayed open for good."""
    monkeypatch.setattr(ws_module, "UNREAD_REPLIES_S", 0.3)
    raw = await RawWs.connect(gateway)
    with trio.move_on_after(3):  # floods past the server giving up (and past it stopping to read, before)
        i = 0
        while True:
            await raw.send_json({"type": "cancel", "id": f"u{i}"})
            i += 1
    raw.sock.shutdown(socket.SHUT_WR)
    with trio.fail_after(15):
        while await raw.sock.recv(65536):  # what the server sent, then its EOF: the connection ends
            pass
    raw.sock.close()


async def test_a_client_that_reads_may_send_a_burst_of_frames_to_answer(gateway: Gateway) -> None:
    """A burst of frames the reader answers (here 150 cancels of unknown ids, or requests
    beyond the socket's stream limit) outruns the writer: the reader waits for it rather
    than take the client for one that does not read (the socket was closed)."""
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        assert await ws.receive_json() == {"type": "ready"}
        got: list[dict[str, Any]] = []

        async def read() -> None:
            while len(got) < 150:
                got.append(await ws.receive_json())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for i in range(150):
                await ws.send_json({"type": "cancel", "id": f"u{i}"})
        assert [f["error"]["code"] for f in got] == ["unknown_request"] * 150
        await ws.send_json(request_frame("after", max_tokens=1))
        assert (await frames_until_done(ws, {"after"}))["after"][-1]["type"] == "done"


def test_retry_after_in_error_frames_is_to_the_millisecond() -> None:
    from gateway.errors import ApiError

    exc = ApiError(429, "slow down", code="rate_limit_exceeded", retry_after=43.07073613900002)
    assert ws_module.error_frame("r", exc)["retry_after"] == 43.071
    assert exc.event_body()["retry_after"] == 43.071  # as SSE's error event carries it


async def test_a_stream_the_runtime_closes_without_its_end_gets_an_error_frame(gateway: Gateway) -> None:
    """No `done` and no error frame left the client's stream waiting until the socket
    closed (the SSE body and the JSON answer said internal_error)."""
    async with httpx.AsyncClient() as client, aconnect_ws(gateway.ws_url, client, headers=gateway.headers) as ws:
        assert (await ws.receive_json())["type"] == "ready"
        await ws.send_json(request_frame("cut", "CUT", endpoint="completions", max_tokens=4))
        frames = await frames_until_done(ws, {"cut"})
        await ws.send_json(request_frame("after", endpoint="completions", max_tokens=1))  # the socket goes on
        after = await frames_until_done(ws, {"after"})
    assert [f["type"] for f in frames["cut"]] == ["token", "error"]
    assert (frames["cut"][-1]["status"], frames["cut"][-1]["error"]["code"]) == (500, "internal_error")
    assert after["after"][-1]["type"] == "done"


@pytest.mark.parametrize("gateway_config", [GatewayConfig(host="127.0.0.1", port=0, sse_ping_seconds=0.2)])
async def test_an_idle_socket_is_pinged_so_proxies_keep_it(gateway: Gateway) -> None:
    """A socket whose requests wait (or that has none) sees a ping frame every
    `sse_ping_seconds`, as an SSE stream sees comment lines: a proxy's read timeout
    (nginx's 60 s) cut it before (the audit)."""
    raw = await RawWs.connect(gateway)

    async def take(n: int) -> bytes:
        got = b""
        while len(got) < n:
            got += await raw.sock.recv(n - len(got))
        return got

    opcodes = []
    with trio.fail_after(5):
        while 0x9 not in opcodes:  # (before or after the `ready` text frame)
            head = await take(2)
            size = head[1] & 0x7F
            if size == 126:
                size = struct.unpack(">H", await take(2))[0]
            await take(size)
            opcodes.append(head[0] & 0x0F)
    assert 0x9 in opcodes, opcodes
    raw.reset()
