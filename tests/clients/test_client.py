"""LmgateClient and AdminClient against a real gateway, each scenario under trio AND asyncio."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest

from clients import (
    AdminClient,
    AuthError,
    BadRequest,
    LmgateClient,
    LmgateError,
    NotCached,
    NotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    ServerError,
)
from clients.errors import ConnectionFailed
from tests.clients.conftest import MODEL, Served
from tests.gateway.conftest import word

BACKENDS = ["trio", "asyncio"]
HELLO = [{"role": "user", "content": "hello"}]


def run(backend: str, scenario: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(scenario, backend=backend)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_completions_and_chat(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key) as client:
            assert await client.models() == [MODEL]
            comp = await client.completions("a b c", max_tokens=2)
            assert comp.text == word(0, 0) + word(0, 1)
            assert comp.usage.prompt_tokens == 3
            chat = await client.chat(HELLO, max_tokens=3, n=2)
            assert [c.text for c in chat.choices] == ["".join(word(i, j) for j in range(3)) for i in (0, 1)]
            assert chat.choices[0].finish_reason == "length"
            batch = await client.completions(["a", "b c"], max_tokens=1, echo=True, logprobs=1)
            assert [c.text for c in batch.choices] == ["a" + word(0, 0), "b c" + word(0, 0)]
            assert batch.usage.prompt_tokens == 3
            assert batch.choices[1].logprobs is not None
            assert batch.choices[1].logprobs["token_logprobs"] == [None, -2.0, -0.5]  # the prompt's, then its own

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sse_stream(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            async with client.chat_stream(HELLO, max_tokens=3) as stream:
                deltas = [d async for d in stream]
            assert "".join(d.text for d in deltas) == word(0, 0) + word(0, 1) + word(0, 2)
            assert deltas[-1].finish_reason == "length"
            assert stream.usage is not None and stream.usage.completion_tokens == 3
            # bare `async for` works too
            texts = [d.text async for d in client.completions_stream("x", max_tokens=2)]
            assert "".join(texts) == word(0, 0) + word(0, 1)

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_control_reaches_the_server_on_every_path(served: Served, backend: str) -> None:
    def directives() -> tuple[bool, bool]:
        call = served.runtime.calls[-1]
        return call.cache_lookup, call.cache_store

    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            await client.completions("a", max_tokens=1, cache_control="no-cache")
            assert directives() == (False, True)
            await client.chat(HELLO, max_tokens=1, cache_control="no-store")
            assert directives() == (True, False)
            async with client.chat_stream(HELLO, max_tokens=1, cache_control="no-cache, no-store") as stream:
                [d async for d in stream]
            assert directives() == (False, False)
            await client.completions("a", max_tokens=1)
            assert directives() == (True, True)
            async with client.ws() as session:
                async with session.completions_stream("a", max_tokens=1, cache_control="no-cache") as ws_stream:
                    [d async for d in ws_stream]
                assert directives() == (False, True)
                async with session.chat_stream(HELLO, max_tokens=1) as ws_stream:
                    [d async for d in ws_stream]
                assert directives() == (True, True)

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_breaking_out_of_a_stream_cancels_server_side(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            async with client.chat_stream([{"role": "user", "content": "HANG"}]) as stream:
                async for _ in stream:
                    break
            # a cancel scope around a stream cancels it too
            with anyio.move_on_after(0.3):
                async with client.completions_stream("HANG") as stream2:
                    async for _ in stream2:
                        pass

    run(backend, scenario)
    ids = [c.request_id for c in served.runtime.calls]
    assert len(ids) == 2
    wait_until(lambda: served.cancelled_ids() == set(ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ws_session_multiplexing_and_cancel(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key) as client, client.ws() as session:
            async with (
                session.chat_stream(HELLO, max_tokens=3) as a,
                session.completions_stream("x y", max_tokens=2, n=2) as b,
                session.chat_stream([{"role": "user", "content": "HANG"}]) as hang,
            ):
                text_a = "".join([d.text async for d in a])
                got_b: dict[int, str] = {0: "", 1: ""}
                async for d in b:
                    got_b[d.index] += d.text
                async for _ in hang:
                    break  # leaving early sends a cancel frame
            assert text_a == word(0, 0) + word(0, 1) + word(0, 2)
            assert a.usage is not None and a.usage.completion_tokens == 3
            assert got_b == {0: word(0, 0) + word(0, 1), 1: word(1, 0) + word(1, 1)}
            assert b.finish_reasons == ["length", "length"]
            # the session still works after a cancel
            async with session.completions_stream("z", max_tokens=1) as c:
                assert [d.text async for d in c][0] == word(0, 0)

    run(backend, scenario)
    hang_id = next(c.request_id for c in served.runtime.calls if c.messages and c.messages[0].content == "HANG")
    wait_until(lambda: hang_id in served.cancelled_ids())
    assert served.cancelled_ids() == {hang_id}


@pytest.mark.parametrize("backend", BACKENDS)
def test_typed_errors(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with LmgateClient(served.base_url, "lmg-wrong", model=MODEL) as bad:
            with pytest.raises(AuthError) as over_http:
                await bad.chat(HELLO)
            with pytest.raises(AuthError) as over_ws:  # the refused upgrade's own error JSON
                async with bad.ws():
                    pass
            assert over_ws.value.code == over_http.value.code == "invalid_api_key"
            assert str(over_ws.value) == str(over_http.value)
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            with pytest.raises(BadRequest) as info:
                await client.chat(HELLO, temperature=-1)
            assert info.value.param == "temperature"
            with pytest.raises(NotFound):
                await client.completions("x", model="gpt-9")
            with pytest.raises(BadRequest):
                async with client.chat_stream(HELLO, top_p=0) as s:
                    [d async for d in s]
            async with client.ws() as session:
                with pytest.raises(BadRequest):
                    async with session.chat_stream(HELLO, n=0) as s:
                        [d async for d in s]
            with pytest.raises(ServerError):  # an error event inside an SSE stream
                async with client.completions_stream("FAIL") as s:
                    [d async for d in s]
        async with LmgateClient("http://127.0.0.1:9", served.api_key, model=MODEL) as nowhere:
            with pytest.raises(ConnectionFailed):
                await nowhere.chat(HELLO)

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retry_honours_retry_after(served: Served, backend: str) -> None:
    from actors.messages import Rejected

    served.runtime.reject = Rejected("", 503, "overloaded", "busy", retry_after=0.2)

    async def scenario() -> float:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as plain:
            with pytest.raises(Overloaded) as info:
                await plain.chat(HELLO)
            assert info.value.retry_after == 1.0  # header rounds up to whole seconds
        policy = RetryPolicy(max_attempts=3, base_delay=0.01)
        async with LmgateClient(served.base_url, served.api_key, model=MODEL, retry=policy) as client:
            start = time.monotonic()
            with pytest.raises(Overloaded):
                await client.chat(HELLO)
            return time.monotonic() - start

    elapsed = run(backend, scenario)
    assert len(served.runtime.calls) == 1 + 3
    assert elapsed >= 2.0  # two waits of Retry-After (1 s), not the 10 ms backoff


def test_retry_then_success(served: Served) -> None:
    """A 429 with Retry-After is retried; the next attempt succeeds."""
    from actors.messages import Rejected

    served.runtime.reject = Rejected("", 429, "rate_limit_exceeded", "slow down", retry_after=0.01)

    async def clear_later() -> None:
        await anyio.sleep(0.5)
        served.runtime.reject = None

    async def scenario() -> str:
        policy = RetryPolicy(max_attempts=5, base_delay=0.01)
        async with anyio.create_task_group() as tg, LmgateClient(served.base_url, served.api_key, model=MODEL, retry=policy) as client:
            tg.start_soon(clear_later)
            return (await client.completions("x", max_tokens=1)).text

    assert run("trio", scenario) == word(0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ws_stream_refused_before_its_first_token_is_sent_again(served: Served, backend: str) -> None:
    """As over SSE: a 429/503 for a WebSocket stream is retried on its session, under a new
    id, until the server takes it; the other streams of the session go on meanwhile."""
    from actors.messages import Rejected

    served.runtime.reject = Rejected("", 503, "overloaded", "server overloaded", retry_after=0.01)

    async def scenario() -> tuple[str, str, str]:
        policy = RetryPolicy(max_attempts=50, base_delay=0.02, max_delay=0.05)
        async with LmgateClient(served.base_url, served.api_key, model=MODEL, retry=policy) as client, \
                client.ws() as session:
            stream = session.chat_stream(HELLO, max_tokens=2)
            first_id = stream.id
            async with anyio.create_task_group() as tg:
                async def clear_later() -> None:
                    await anyio.sleep(0.3)
                    served.runtime.reject = None
                tg.start_soon(clear_later)
                async with stream:
                    text = "".join([d.text async for d in stream])
            return text, first_id, stream.id

    text, first_id, last_id = run(backend, scenario)
    assert text == word(0, 0) + word(0, 1)
    assert last_id != first_id and len(served.runtime.calls) > 2  # refused, then sent again


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ws_stream_is_not_retried_without_a_policy_or_after_its_first_token(served: Served, backend: str) -> None:
    from actors.messages import Rejected

    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client, client.ws() as session:
            served.runtime.reject = Rejected("", 503, "overloaded", "server overloaded", retry_after=0.01)
            with pytest.raises(Overloaded):
                async with session.chat_stream(HELLO, max_tokens=2) as refused:
                    [d async for d in refused]
            served.runtime.reject = None
        policy = RetryPolicy(max_attempts=5, base_delay=0.01)
        async with LmgateClient(served.base_url, served.api_key, model=MODEL, retry=policy) as client, \
                client.ws() as session:
            got = []
            with pytest.raises(Overloaded):  # "GONE": a token, then a 503 shutting_down
                async with session.chat_stream([{"role": "user", "content": "GONE"}], max_tokens=4) as cut:
                    async for d in cut:
                        got.append(d.text)
            assert got == [word(0, 0)]

    run(backend, scenario)
    assert len(served.runtime.calls) == 2  # neither was sent again


def test_a_retry_after_beyond_max_retry_after_is_raised_at_once(served: Served) -> None:
    """A spent daily budget says "retry in hours": the call raises with that, it does not sleep."""
    from actors.messages import Rejected

    served.runtime.reject = Rejected("", 429, "quota_exceeded", "daily budget spent", retry_after=52846.0)

    async def scenario() -> float | None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL, retry=RetryPolicy()) as client:
            with anyio.fail_after(5), pytest.raises(RateLimited) as err:
                await client.completions("x", max_tokens=1)
            return err.value.retry_after

    assert run("trio", scenario) == 52846.0
    assert len(served.runtime.calls) == 1


def test_an_only_if_cached_miss_raises_not_cached_over_http_and_the_websocket(served: Served) -> None:
    """The 504 `not_cached` of `only-if-cached` is `NotCached` (a `NotFound`), never retried."""
    from actors.messages import Rejected

    served.runtime.reject = Rejected("", 504, "not_cached", "no stored answer")

    async def scenario() -> list[LmgateError]:
        raised = []
        async with LmgateClient(served.base_url, served.api_key, model=MODEL, retry=RetryPolicy()) as client:
            with pytest.raises(NotCached) as err:
                await client.chat(HELLO, cache_control="only-if-cached")
            raised.append(err.value)
            async with client.ws() as session:
                with pytest.raises(NotCached) as err:
                    async with session.chat_stream(HELLO, cache_control="only-if-cached") as stream:
                        [d async for d in stream]
                raised.append(err.value)
        return raised

    errors = run("trio", scenario)
    assert [(e.status, e.code, e.type, isinstance(e, NotFound)) for e in errors] == [
        (504, "not_cached", "not_found_error", True)] * 2
    assert len(served.runtime.calls) == 2 and all(c.cache_only for c in served.runtime.calls)


def test_rate_limited_without_retry_after_is_not_retried() -> None:
    policy = RetryPolicy()
    assert not policy.retryable(RateLimited("over budget", status=429, retry_after=None))
    assert policy.retryable(RateLimited("later", status=429, retry_after=3))
    assert policy.delay(0, 5.0) == 5.0
    assert policy.delay(10, None) <= policy.max_delay * (1 + policy.jitter)


@pytest.mark.parametrize("backend", BACKENDS)
def test_admin_client(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with AdminClient(served.base_url, served.admin_key) as admin:
            tenant = await admin.create_tenant("acme", "Acme", priority=1, quota={"requests_per_minute": 5})
            assert tenant["quota"]["requests_per_minute"] == 5
            assert [t["id"] for t in await admin.list_tenants()] == ["acme", "t1"]
            admin.TENANTS_PAGE = 1  # (a page at a time, as for more than 1,000 tenants)
            assert [t["id"] for t in await admin.list_tenants()] == ["acme", "t1"]
            assert (await admin.update_tenant("acme", name="Acme 2"))["name"] == "Acme 2"
            assert (await admin.set_quota("acme", max_concurrent=2))["quota"]["max_concurrent"] == 2
            key_id, key = await admin.create_key("acme", "ci")
            assert [k["id"] for k in await admin.list_keys("acme")] == [key_id]
            async with LmgateClient(served.base_url, key, model=MODEL) as client:
                assert (await client.completions("x", max_tokens=1)).text == word(0, 0)
                await admin.revoke_key(key_id)
                with pytest.raises(AuthError):
                    await client.completions("x")
            assert await admin.usage("acme") == []
            await admin.delete_tenant("acme")
            with pytest.raises(NotFound):
                await admin.get_tenant("acme")
        async with AdminClient(served.base_url, "not-admin") as nobody:
            with pytest.raises(PermissionDenied):
                await nobody.list_tenants()

    run(backend, scenario)


def test_shared_http_client_is_not_closed(served: Served) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient() as http:
            async with LmgateClient(served.base_url, served.api_key, http=http) as client:
                await client.models()
            assert not http.is_closed

    run("trio", scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ws_stream_read_late_does_not_stall_the_others(served: Served, backend: str) -> None:
    # 4 x 400 token frames for `big` arrive before `small` is read: the session's reader
    # used to wait on big's full 1024-frame buffer, and small never finished
    async def scenario() -> None:
        async with (LmgateClient(served.base_url, served.api_key, model=MODEL) as client, client.ws() as session,
                    session.completions_stream("x", max_tokens=400, n=4) as big):
            await anyio.sleep(0.5)  # let big's frames pile up
            async with session.completions_stream("y", max_tokens=2) as small:
                with anyio.fail_after(10):
                    assert "".join([d.text async for d in small]) == word(0, 0) + word(0, 1)
            with anyio.fail_after(10):
                assert sum(1 for _ in [d async for d in big if d.text]) == 1600

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_a_ws_stream_waits_for_the_servers_cancelled(served: Served, backend: str) -> None:
    # the server answers `cancelled` once the request is gone (its quota settled): a stream
    # closed early returns only then, so a request sent next cannot be refused for it
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client, client.ws() as session:
            for attempt in range(3):
                async with session.chat_stream([{"role": "user", "content": "HANG"}]) as stream:
                    async for _ in stream:
                        break
                hung = [c.request_id for c in served.runtime.calls if c.messages[0].content == "HANG"]
                assert len(hung) == attempt + 1 and set(hung) <= served.cancelled_ids()
            async with session.completions_stream("z", max_tokens=1) as after:
                assert "".join([d.text async for d in after]) == word(0, 0)

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bare_async_for_broken_out_of_cancels_server_side(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client, client.ws() as session:
            async for _ in session.chat_stream([{"role": "user", "content": "HANG"}]):
                break  # no `async with`: the dropped iterator cancels, with the session still open
            [call] = served.runtime.calls
            with anyio.fail_after(5):
                while call.request_id not in served.cancelled_ids():
                    await anyio.sleep(0.02)

    run(backend, scenario)


class _Proxy:
    """A TCP proxy in a thread whose connections can be cut (RST) mid-stream."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target_port))
            self.socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:  # type: ignore[no-untyped-def]
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        import socket
        import struct

        for s in self.socks:
            try:  # shutdown wakes the pump blocked in recv (a bare close would wait for it)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dropped_ws_connection_is_connection_failed(served: Served, backend: str) -> None:
    proxy = _Proxy(int(served.base_url.rsplit(":", 1)[1]))

    async def scenario() -> None:
        async with LmgateClient(f"http://127.0.0.1:{proxy.port}", served.api_key, model=MODEL) as client, \
                client.ws() as session:
            with pytest.raises(ConnectionFailed):
                async with session.chat_stream([{"role": "user", "content": "HANG"}]) as stream:
                    async for _ in stream:
                        proxy.cut()
            with pytest.raises(ConnectionFailed):  # a new stream on the dead session
                async with session.completions_stream("x", max_tokens=1) as again:
                    [d async for d in again]
        # leaving the session after that raised nothing (no exception group)

    try:
        run(backend, scenario)
    finally:
        proxy.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_closed_client_raises_connection_failed_at_once(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL, retry=RetryPolicy()) as client:
            pass
        with anyio.fail_after(2):  # not retried with backoff
            with pytest.raises(ConnectionFailed, match="closed"):
                await client.chat(HELLO)
            with pytest.raises(ConnectionFailed, match="closed"):
                async with client.chat_stream(HELLO) as s:
                    [d async for d in s]

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_responses_api(served: Served, backend: str) -> None:
    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            first = await client.respond("hello", instructions="Be brief.", max_output_tokens=2)
            assert first.text == word(0, 0) + word(0, 1) and first.status == "incomplete"
            assert first.usage is not None and first.usage["output_tokens"] == 2
            async with client.respond_stream("more", previous_response_id=first.id, max_output_tokens=3) as events:
                seen = [e async for e in events]
            deltas = "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta")
            assert events.response is not None and deltas == events.response.text == word(0, 0) + word(0, 1) + word(0, 2)
            assert events.usage is not None and events.usage.completion_tokens == 3
            assert [m.content for m in served.runtime.calls[-1].messages] == ["hello", first.text, "more"]
            assert (await client.get_response(first.id)).raw == first.raw
            page = await client.list_input_items(events.response.id, order="asc", limit=1)
            assert [i["content"][0]["text"] for i in page["data"]] == ["more"] and not page["has_more"]
            assert (await client.list_input_items(events.response.id, before=page["first_id"]))["data"] == []
            await client.delete_response(first.id)
            with pytest.raises(NotFound):
                await client.get_response(first.id)
            with pytest.raises(BadRequest):
                await client.respond([{"type": "input_image"}])
            with pytest.raises(ServerError):
                async with client.respond_stream("FAIL") as failing:
                    [e async for e in failing]
            with pytest.raises(Overloaded):  # response.failed with code shutting_down: retryable, as a 503 is
                async with client.respond_stream("GONE") as gone:
                    [e async for e in gone]
            async with client.respond_stream("HANG") as hanging:  # leaving early aborts it
                async for _ in hanging:
                    break

    run(backend, scenario)
    wait_until(lambda: served.runtime.calls[-1].request_id in served.cancelled_ids())


@pytest.mark.parametrize("backend", BACKENDS)
def test_background_responses(served: Served, backend: str) -> None:
    async def scenario() -> str:
        async with LmgateClient(served.base_url, served.api_key, model=MODEL) as client:
            queued = await client.respond("hello", max_output_tokens=3, background=True)
            assert queued.status == "queued" and queued.text == ""
            done = queued
            with anyio.fail_after(10):
                while done.status in ("queued", "in_progress"):
                    await anyio.sleep(0.05)
                    done = await client.get_response(queued.id)
            assert done.status == "incomplete" and done.text == word(0, 0) + word(0, 1) + word(0, 2)
            assert (await client.cancel_response(done.id)).raw == done.raw  # ended: as it ended
            with pytest.raises(BadRequest):  # not background
                await client.cancel_response((await client.respond("x", max_output_tokens=1)).id)
            # a background stream left early does not end the response: it is read on after the last event
            async with client.respond_stream("HANG", background=True) as events:
                first = []
                async for event in events:
                    first.append(event)
                    if len(first) == 5:  # ... the first delta
                        break
            hung = first[0]["response"]["id"]
            assert hung not in served.cancelled_ids()
            cancelled = await client.cancel_response(hung)
            assert cancelled.status == "cancelled" and cancelled.text == word(0, 0)
            async with client.resume_stream(hung, starting_after=first[-1]["sequence_number"]) as rest:
                tail = [e async for e in rest]
            assert [e["sequence_number"] for e in first + tail] == list(range(len(first) + len(tail)))
            assert tail[-1]["type"] == "response.cancelled" and rest.response is not None
            assert rest.response.status == "cancelled"
            return hung

    hung = run(backend, scenario)
    wait_until(lambda: hung in served.cancelled_ids())
