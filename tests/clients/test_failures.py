"""How the client fails: cancellation while connecting, timeouts and retries, requests
that cannot be sent, a WebSocket closed for one oversized frame, closed clients, ids
that must stay one path segment, reused streams. Each scenario against the real
gateway of tests/gateway/conftest.py, under trio and asyncio, as in test_client.py."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from clients import (
    AdminClient,
    BadRequest,
    ConnectionFailed,
    InvalidRequest,
    LmgateClient,
    LmgateError,
    NotFound,
    Overloaded,
    RetryPolicy,
    TimedOut,
)
from clients.client import ResponseStream, request_error
from tests.clients.conftest import MODEL, Served
from tests.clients.test_client import BACKENDS, HELLO, run
from tests.gateway.conftest import word

UNREACHABLE = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelling_a_ws_session_while_it_connects_leaves_cancel_scopes_intact(served: Served, backend: str) -> None:
    # Deadlines from 0 to 20 ms land before, during and after the upgrade and the ready
    # frame. Unwinding the half-open connection inside a shielding scope exited
    # httpx_ws's task group out of order: "Cancel scope stack corrupted" (trio),
    # "Attempted to exit a cancel scope that isn't the current tasks's" (asyncio).
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            with anyio.fail_after(30):
                for step in range(41):
                    with anyio.move_on_after(step * 0.0005):
                        async with client.ws():
                            await anyio.sleep(1)
                # the client and new sessions on it still work
                async with client.ws() as session, session.completions_stream("x", max_tokens=1) as stream:
                    assert "".join([d.text async for d in stream]) == word(0, 0)

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_read_timeout_is_timed_out_and_a_post_is_not_sent_again(served: Served, backend: str) -> None:
    # "SILENT" never answers: the client's 0.3 s read timeout fires after the request was
    # sent, so sending it again could generate (and bill) it twice
    policy = RetryPolicy(max_attempts=4, base_delay=0.01)

    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL, timeout=0.3, retry=policy) as client:
            with pytest.raises(TimedOut, match="timed out") as info:
                await client.completions("SILENT", max_tokens=5)
            assert isinstance(info.value, ConnectionFailed) and not info.value.retryable
            assert len(served.runtime.calls) == 1
            with pytest.raises(TimedOut, match="timed out"):
                async with client.completions_stream("SILENT") as stream:
                    [d async for d in stream]
            assert len(served.runtime.calls) == 2

    run(backend, scenario)


class _CountingTransport(httpx.AsyncHTTPTransport):
    """Counts the requests httpx tries to send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return await super().handle_async_request(request)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_connect_failure_is_retried_and_says_what_failed(backend: str) -> None:
    # a POST that could not connect never reached the server: resending it is safe; so is
    # opening a WebSocket session (it ignored the policy)
    async def scenario() -> tuple[ConnectionFailed, int, ConnectionFailed, int]:
        transport = _CountingTransport()
        async with (httpx.AsyncClient(transport=transport) as http,
                    LmgateClient(UNREACHABLE, "lmg-key", model=MODEL, http=http,
                                 retry=RetryPolicy(max_attempts=3, base_delay=0.01)) as client):
            with pytest.raises(ConnectionFailed) as info:
                await client.completions("x")
            sent = transport.sent
            with pytest.raises(ConnectionFailed) as ws_info:
                async with client.ws():
                    pass
        return info.value, sent, ws_info.value, transport.sent - sent

    error, sent, ws_error, ws_sent = run(backend, scenario)
    assert sent == 3 and error.retryable and not isinstance(error, TimedOut)
    assert str(error).startswith("POST /v1/completions: ConnectError")
    assert ws_sent == 3 and ws_error.retryable


@pytest.mark.parametrize(("exc", "method", "kind", "retryable"), [
    (httpx.ConnectError(""), "POST", ConnectionFailed, True),
    (httpx.ConnectTimeout(""), "POST", ConnectionFailed, True),
    (httpx.PoolTimeout(""), "POST", ConnectionFailed, True),
    (httpx.ReadTimeout(""), "POST", TimedOut, False),
    (httpx.WriteTimeout(""), "POST", TimedOut, False),
    (httpx.ReadTimeout(""), "GET", TimedOut, True),
    (httpx.RemoteProtocolError(""), "POST", ConnectionFailed, False),
    (httpx.ReadError(""), "DELETE", ConnectionFailed, True),
    (httpx.UnsupportedProtocol(""), "GET", InvalidRequest, False),
    (httpx.InvalidURL(""), "GET", InvalidRequest, False),
])
def test_request_error_classifies_by_whether_the_request_may_have_run(
        exc: Exception, method: str, kind: type[LmgateError], retryable: bool) -> None:
    error = request_error(exc, f"{method} /x", idempotent=method != "POST")
    assert type(error) is kind
    assert RetryPolicy.retryable(error) is retryable
    assert type(exc).__name__ in str(error)  # never an empty message, even for an exception without text


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_request_that_cannot_be_sent_is_invalid_request_at_once(served: Served, backend: str) -> None:
    port = served.base_url.rsplit(":", 1)[1]
    slow_retries = RetryPolicy(max_attempts=4, base_delay=5.0)  # a retry would take 5 s

    async def fails_every_way(client: LmgateClient) -> list[InvalidRequest]:
        errors = []
        with pytest.raises(InvalidRequest) as info:
            await client.completions("x")
        errors.append(info.value)
        with pytest.raises(InvalidRequest) as info:
            async with client.chat_stream(HELLO) as stream:
                [d async for d in stream]
        errors.append(info.value)
        with pytest.raises(InvalidRequest) as info:
            async with client.ws():
                pass
        errors.append(info.value)
        return errors

    async def scenario() -> None:
        with anyio.fail_after(4):
            for url in ("http://[::1", f"127.0.0.1:{port}", f"localhost:{port}", "ftp://127.0.0.1"):
                async with LmgateClient(url, served.api_key, model=MODEL, retry=slow_retries) as client:
                    await fails_every_way(client)
            for key in (served.api_key + "é", served.api_key + "\n"):
                async with LmgateClient(served.base_url, key, model=MODEL, retry=slow_retries) as client:
                    for error in await fails_every_way(client):
                        assert "API key" in str(error) and served.api_key not in str(error)
                async with AdminClient(served.base_url, key) as admin:
                    with pytest.raises(InvalidRequest, match="API key"):
                        await admin.list_tenants()
        assert served.runtime.calls == []

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frame_too_large_fails_its_own_stream_and_drops_the_others(served: Served, backend: str) -> None:
    # the server answers a frame over its limit (1 MiB here) with an id-less 413 error and
    # closes the socket: only the oversized request gets the 413, the running one and
    # any later one ConnectionFailed: the running one not retryable (it ran, and was billed,
    # on the server), a later one retryable on a new session (never sent)
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client, client.ws() as session:
            async with session.completions_stream("HANG") as running:
                deltas = aiter(running)
                assert (await anext(deltas)).text == word(0, 0)
                with pytest.raises(BadRequest) as info:
                    async with session.completions_stream("x " * 700_000, max_tokens=1) as huge:
                        [d async for d in huge]
                assert (info.value.status, info.value.code) == (413, "frame_too_large")
                with anyio.fail_after(5), pytest.raises(ConnectionFailed) as dropped:
                    await anext(deltas)
                assert not dropped.value.retryable and "frame" in str(dropped.value)
            with pytest.raises(ConnectionFailed) as never_sent:
                async with session.completions_stream("y", max_tokens=1) as later:
                    [d async for d in later]
            assert never_sent.value.retryable
        async with (LmgateClient(served.base_url, served.api_key, model=MODEL) as client, client.ws() as session,
                    session.completions_stream("y", max_tokens=1) as again):  # a new session works
            assert "".join([d.text async for d in again]) == word(0, 0)

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_closed_admin_client_raises_connection_failed(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with AdminClient(served.base_url, served.admin_key, retry=RetryPolicy(base_delay=5.0)) as admin:
            pass
        with anyio.fail_after(2), pytest.raises(ConnectionFailed, match="closed") as info:
            await admin.list_tenants()
        assert not info.value.retryable
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            pass
        with anyio.fail_after(2), pytest.raises(ConnectionFailed, match="closed"):
            async with client.ws():
                pass

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_admin_ids_stay_one_path_segment(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with AdminClient(served.base_url, served.admin_key) as admin:
            await admin.create_tenant("victim", "Victim")
            key_id, _ = await admin.create_key("victim")
            with pytest.raises(InvalidRequest):  # it deleted tenant "victim"
                await admin.revoke_key("../tenants/victim")
            with pytest.raises(InvalidRequest):  # it read victim's keys
                await admin.get_tenant("victim/keys")
            with pytest.raises(InvalidRequest):  # it answered JSONDecodeError
                await admin.list_keys("")
            with pytest.raises(NotFound):  # it read tenant victim
                await admin.get_tenant("victim?x=1")
            with pytest.raises(NotFound):
                await admin.get_tenant("victim#x")
            with pytest.raises(NotFound):
                await admin.delete_tenant("victim%2Fkeys")
            with pytest.raises(NotFound):
                await admin.revoke_key("..")
            assert (await admin.get_tenant("victim"))["keys"][0]["id"] == key_id
            # ".." is no tenant id (the server refuses it); "..." is, and reaches its own tenant
            with pytest.raises(BadRequest):
                await admin.create_tenant("..", "Dots")
            with pytest.raises(NotFound):  # sent as %2E%2E: not the route above
                await admin.get_tenant("..")
            await admin.create_tenant("...", "Dots")
            assert (await admin.get_tenant("..."))["name"] == "Dots"
            assert (await admin.update_tenant("...", name="Dots 2"))["name"] == "Dots 2"
            await admin.delete_tenant("...")
            assert [t["id"] for t in await admin.list_tenants()] == ["t1", "victim"]
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            with pytest.raises(InvalidRequest):
                await client.get_response("x/input_items")
            with pytest.raises(NotFound):
                await client.delete_response("..")

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_finished_stream_ends_again_and_cannot_be_entered_again(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            for make in (lambda: client.completions_stream("x", max_tokens=2),
                         lambda: client.respond_stream("x", max_output_tokens=2)):
                async with make() as stream:
                    assert [d async for d in stream]
                assert [d async for d in stream] == []  # was httpx.StreamConsumed
                with pytest.raises(InvalidRequest):  # was httpx.StreamClosed
                    async with stream:
                        pass
                bare = make()
                assert [d async for d in bare]
                assert [d async for d in bare] == []
            closed_early = client.completions_stream("x", max_tokens=2)
            async with closed_early:
                pass
            assert [d async for d in closed_early] == []
            async with client.ws() as session:
                async with session.completions_stream("x", max_tokens=2) as ws_stream:
                    assert [d async for d in ws_stream]
                assert [d async for d in ws_stream] == []  # was anyio.ClosedResourceError
                with pytest.raises(InvalidRequest):
                    async with ws_stream:
                        pass
                bare_ws = session.completions_stream("x", max_tokens=2)
                assert [d async for d in bare_ws]
                assert [d async for d in bare_ws] == []
        assert len(served.runtime.calls) == 7  # nothing was sent again

    run(backend, scenario)


def test_embed_score_and_rerank_refuse_cache_control() -> None:
    # their answers are never cached; `cache_control` went into the JSON body
    async def scenario() -> None:
        async with LmgateClient(UNREACHABLE, "lmg-key") as client:  # refused before sending
            with pytest.raises(TypeError, match="cache_control"):
                await client.embed("x", cache_control="no-cache")
            with pytest.raises(TypeError, match="cache_control"):
                await client.score("a", "b", cache_control="no-cache")
            with pytest.raises(TypeError, match="cache_control"):
                await client.rerank("q", ["d"], cache_control="no-store")

    run("trio", scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_ended_by_a_shutdown_says_when_to_retry(served: Served, backend: str) -> None:
    """A 503 in the middle of an SSE stream carries its retry_after in the event (its
    headers went out at the start), as the WebSocket's frame and a plain answer do."""
    async def scenario() -> float | None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            with pytest.raises(Overloaded) as err:
                async with client.chat_stream([{"role": "user", "content": "GONE"}], max_tokens=4) as stream:
                    [d async for d in stream]
            return err.value.retry_after

    assert run(backend, scenario) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_still_open_when_its_session_closes_raises_connection_failed(served: Served, backend: str) -> None:
    """It waited forever: leaving the session cancelled its reader, which ended no stream."""
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            async with client.ws() as session:
                stream = session.completions_stream("HANG", max_tokens=5)
                await stream.start()
            with anyio.fail_after(5), pytest.raises(ConnectionFailed, match="session is closed"):
                [d async for d in stream]

    run(backend, scenario)


class FreezingProxy:
    """A TCP proxy that, once `frozen`, forwards nothing more either way: a server that
    stopped answering (SIGSTOP, a partition) without closing its connections."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.frozen = False

    async def handle(self, downstream: anyio.abc.SocketStream) -> None:
        async with (downstream, await anyio.connect_tcp("127.0.0.1", self.port) as upstream,
                    anyio.create_task_group() as tg):
            tg.start_soon(self._pump, downstream, upstream)
            tg.start_soon(self._pump, upstream, downstream)

    async def _pump(self, source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
        try:
            async for data in source:
                if self.frozen:
                    await anyio.sleep_forever()
                await sink.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_server_fails_a_ws_stream_within_about_the_timeout(served: Served, backend: str) -> None:
    """A WebSocket stream may be silent for longer than the timeout (pings keep it), but
    a server that stops answering fails it within about 1.5 timeouts (it took httpx_ws's
    default 40 s whatever the client's timeout)."""
    async def scenario() -> None:
        proxy = FreezingProxy(int(served.base_url.rsplit(":", 1)[1]))
        async with anyio.create_task_group() as tg:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
            tg.start_soon(listener.serve, proxy.handle)
            url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
            async with (LmgateClient(url, served.api_key, model=MODEL, timeout=0.4) as client, client.ws() as session,
                        session.completions_stream("HANG", max_tokens=5) as stream):
                deltas = aiter(stream)
                assert (await anext(deltas)).text == word(0, 0)
                await anyio.sleep(1.2)  # three timeouts without a frame: the session still works
                async with session.completions_stream("x", max_tokens=1) as other:
                    assert "".join([d.text async for d in other]) == word(0, 0)
                proxy.frozen = True
                started = anyio.current_time()
                with anyio.fail_after(5), pytest.raises(ConnectionFailed):
                    await anext(deltas)
                assert anyio.current_time() - started < 1.5
            tg.cancel_scope.cancel()

    run(backend, scenario)


def _sse(*events: dict | str) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events)


CHUNK = {"id": "c1", "object": "chat.completion.chunk", "choices": [
    {"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}


def _client(handler, **kwargs) -> LmgateClient:  # type: ignore[no-untyped-def]
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return LmgateClient("http://lmgate.test", "lmg-key", model=MODEL, http=http, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_that_ends_before_its_last_event_is_connection_failed(backend: str) -> None:
    """A body ending cleanly without `[DONE]` (a proxy timing out upstream, a close-delimited
    body cut) was returned as a whole answer; an event that is not JSON raised a bare
    JSONDecodeError. Both are `ConnectionFailed`, not retryable (the request was sent)."""
    bodies = {"/v1/chat/completions": _sse(CHUNK, CHUNK),
              "/v1/completions": _sse("{not json"),
              "/v1/responses": _sse({"type": "response.created", "sequence_number": 0,
                                     "response": {"id": "resp_1", "status": "in_progress"}})}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=bodies[request.url.path], headers={"content-type": "text/event-stream"})

    async def scenario() -> list[ConnectionFailed]:
        errors, texts = [], []
        async with _client(handler) as client:
            for stream in (client.chat_stream([{"role": "user", "content": "x"}]), client.completions_stream("x"),
                           client.respond_stream("x")):
                with pytest.raises(ConnectionFailed) as info:
                    async with stream:
                        async for d in stream:
                            texts.append(getattr(d, "text", None))
                errors.append(info.value)
        assert texts == ["Hi", "Hi", None]  # (what came was passed on, then the error)
        return errors

    cut_chat, not_json, cut_response = run(backend, scenario)
    assert "ended before its last event (data: [DONE])" in str(cut_chat)
    assert "not a JSON object" in str(not_json)
    assert "response.completed" in str(cut_response)
    assert not any(e.retryable for e in (cut_chat, not_json, cut_response))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_resumed_after_its_last_event_reads_the_stored_response(backend: str) -> None:
    """The server sends nothing after a response's last event: that empty stream is no cut
    when the response has ended (a failed one raises as its `response.failed` would); a
    cut when it has not, or when events came and then the body ended (ended meanwhile or
    not, what was between them was lost)."""
    state = {"status": "completed", "events": b": ping\n\n"}
    delta = {"type": "response.output_text.delta", "sequence_number": 10, "delta": "Hel"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("stream") == "true":
            return httpx.Response(200, content=state["events"], headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"id": "resp_1", "object": "response", "status": state["status"],
                                         "output": [], "error": {"code": "shutting_down", "message": "stopped"},
                                         "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}})

    async def resumed(client: LmgateClient) -> ResponseStream:
        stream = client.resume_stream("resp_1", starting_after=9)
        async with stream:
            [e async for e in stream]
        return stream

    async def scenario() -> dict[str, object]:
        got: dict[str, object] = {}
        async with _client(handler) as client:
            ended = await resumed(client)
            got["ended"] = (ended.response.status if ended.response else None, ended.usage)
            for status, events, name in (("in_progress", b": ping\n\n", "running"),
                                         ("completed", _sse(delta), "cut"), ("failed", b": ping\n\n", "failed")):
                state.update(status=status, events=events)
                with pytest.raises(LmgateError) as info:
                    await resumed(client)
                got[name] = info.value
        return got

    got = run(backend, scenario)
    assert got["ended"][0] == "completed" and got["ended"][1].total_tokens == 3
    assert isinstance(got["running"], ConnectionFailed) and isinstance(got["cut"], ConnectionFailed)
    assert "ended before its last event" in str(got["cut"])
    assert isinstance(got["failed"], Overloaded) and got["failed"].should_retry is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_answer_saying_x_should_retry_false_is_not_retried(backend: str) -> None:
    """A spent daily budget's 429 carries a Retry-After (the next UTC day) and
    `x-should-retry: false`: the policy slept and sent it again, as OpenAI's SDKs do not."""
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(503, json={"error": {"message": "no", "type": "overloaded_error", "code": "x"}},
                              headers={"retry-after": "0", "x-should-retry": "false"})

    async def scenario() -> Overloaded:
        async with _client(handler, retry=RetryPolicy(max_attempts=4, base_delay=0.01)) as client:
            with pytest.raises(Overloaded) as info:
                await client.completions("x")
        return info.value

    error = run(backend, scenario)
    assert sent == ["/v1/completions"] and error.should_retry is False
