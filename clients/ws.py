"""WebSocket session: many concurrent requests on one socket (protocol: docs/websocket.md).

::

    async with client.ws() as session:
        async with session.chat_stream(messages, max_tokens=64) as a, session.completions_stream("x") as b:
            async for delta in a: ...
            async for delta in b: ...

A background reader task (anyio task group, so trio or asyncio) routes frames by
request id to per-request memory streams. Those buffers are unbounded: the reader must
never wait on one stream, or a stream read later (or never) would stall every other
stream on the socket; what they hold is bounded by the tokens the caller asked for.
Leaving a stream before its ``done`` frame (break inside ``async with``, an exception, a
cancel scope; or a bare ``async for`` broken out of, once the iterator is dropped) sends
``{"type":"cancel"}`` for that id; leaving the session closes the socket, which
cancels whatever is still running server-side. A dropped connection, or the session
left, ends every open stream with `ConnectionFailed`, and a stream started on a closed
session raises it; the connection is dropped when a ping goes unanswered for the
client's read timeout (`ping_settings`).
The one exception: when the server closes the socket because a request frame was
larger than its limit (413 ``frame_too_large``), the stream(s) whose frame was too
large get that `BadRequest` (it would fail again), the others `ConnectionFailed`.
Cancelling ``async with client.ws()`` while it connects (a cancel scope, a timeout)
closes what was opened and propagates the cancellation, under trio and asyncio.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import anyio
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from httpx_ws import HTTPXWSException, aconnect_ws

from clients.client import (
    SEND_ERRORS,
    Delta,
    Usage,
    checked_headers,
    describe,
    request_error,
    usage_from,
    with_retry,
)
from clients.errors import ConnectionFailed, InvalidRequest, LmgateError, error_for

if TYPE_CHECKING:
    from clients.client import LmgateClient


# How long closing an unfinished stream waits for the server's answer to its cancel
# (the answer comes once the request's quota has settled: at most ~2 s with a slow Redis).
CANCEL_ACK_SECONDS = 5.0


class WsStream:
    """One request on a session. Iterate for `Delta`s; `usage`/`finish_reasons` are
    set when the ``done`` frame arrives. As `TokenStream`, one object is one request:
    once ended or closed, iterating it again yields nothing, and entering it again
    raises `InvalidRequest`."""

    def __init__(self, session: WsSession, request_id: str, endpoint: str, body: dict[str, Any]) -> None:
        self.session = session
        self.id = request_id
        self.endpoint = endpoint
        self._body = body
        self._receive: MemoryObjectReceiveStream[Any] | None = None
        self._closed = False
        self._closing: anyio.Event | None = None  # set once an aclose has finished
        self.done = False
        self.usage: Usage | None = None
        self.finish_reasons: list[str] = []

    async def start(self) -> None:
        """Send the request frame (once; not after the stream was closed)."""
        if self._receive is None and not self._closed:
            self._receive = await self.session._start(self)

    async def __aenter__(self) -> Self:
        if self._closed:
            raise InvalidRequest("this stream was used already: a stream is one request, start a new one")
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel server-side if not finished, and wait (at most `CANCEL_ACK_SECONDS`) for
        the server's ``cancelled``: it means the request is gone, charged, and its
        `max_concurrent` slot free, so a request sent next is not refused for this one.
        Idempotent. The cancel frame is sent even when the caller is being cancelled; the
        wait for its answer is not shielded (a cancelled caller does not wait)."""
        self._closed = True
        if self._receive is None:
            return
        if self._closing is not None:  # another aclose is at work (an abandoned iterator's): wait for it
            await self._closing.wait()
            return
        self._closing = anyio.Event()
        try:
            if not self.done:
                self.done = True
                with anyio.CancelScope(shield=True):
                    sent = await self.session._cancel(self.id)
                if sent:
                    await self._acknowledged()
        finally:
            self.session._forget(self.id)
            self._receive.close()
            self._closing.set()

    async def _acknowledged(self) -> None:
        """Read this stream's frames up to the one that ends it: ``cancelled``, or a
        ``done``/``error`` that crossed the cancel; the socket's loss ends the wait too."""
        assert self._receive is not None
        with anyio.move_on_after(CANCEL_ACK_SECONDS):
            async for frame in self._receive:
                if isinstance(frame, LmgateError) or frame.get("type") in ("cancelled", "done", "error"):
                    return

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        if self._closed:  # ended or closed: its frames were consumed (the buffer is closed)
            return
        await self.start()
        assert self._receive is not None  # start() sent it or raised
        try:
            async for delta in self._deltas():
                yield delta
        finally:  # left early (also a bare `async for` broken out of): cancel server-side
            await self.aclose()

    async def _deltas(self) -> Any:
        assert self._receive is not None
        ended: set[int] = set()  # choices whose finish came on their last token frame
        started = False  # a token came: an error after it is not retried (its tokens went out)
        attempt = 0
        async for frame in self._receive:
            if isinstance(frame, LmgateError):
                self.done = True
                raise frame
            kind = frame.get("type")
            if kind == "error":
                error = error_for(frame.get("status", 500), frame, retry_after=frame.get("retry_after"))
                if not started and self.session.client.retry.retries(error, attempt):
                    await anyio.sleep(self.session.client.retry.delay(attempt, error.retry_after))
                    attempt += 1
                    await self.session._resend(self)
                    continue
                self.done = True
                raise error
            if kind == "token":
                started = True
                reason = frame.get("finish_reason")  # on a choice's last frame
                if reason is not None:
                    ended.add(frame["index"])
                yield Delta(frame["index"], frame["text"], reason, frame.get("token_ids"))
            elif kind == "done":
                self.done = True
                self.usage = usage_from(frame.get("usage"))
                self.finish_reasons = list(frame.get("finish_reasons") or [])
                for index, reason in enumerate(self.finish_reasons):
                    if index not in ended:
                        yield Delta(index, "", reason)
                return
            elif kind == "cancelled":
                self.done = True
                return


@dataclass
class _Route:
    """Where the reader puts one request's frames, and the size of the request frame that
    started it, in UTF-8 bytes, as the server measures it against its frame limit."""

    send: MemoryObjectSendStream[Any]
    request_bytes: int


class WsSession:
    """An open /v1/ws connection (header auth). Create with `LmgateClient.ws()`.
    `closed_error`: the last error the server sent for no request (its reason, when it
    closes the socket), or None."""

    def __init__(self, client: LmgateClient) -> None:
        self.client = client
        self._ids = itertools.count(1)
        self._routes: dict[str, _Route] = {}
        self._stack = AsyncExitStack()
        self._ws: Any = None
        self._send_lock = anyio.Lock()
        self.closed_error: LmgateError | None = None
        self._closing_frame: dict[str, Any] | None = None  # the error frame behind closed_error
        self._ended: str | None = None  # why the socket is gone: new streams fail with ConnectionFailed saying so

    @property
    def closed(self) -> bool:
        """The socket is gone (dropped, or closed by the server or by leaving the session):
        a stream started now fails; open a new session."""
        return self._ended is not None

    @property
    def url(self) -> str:
        """ws:// (wss://) for the client's http:// (https://) base URL; InvalidRequest for
        any other (as a plain request on that client would be)."""
        scheme, sep, rest = self.client.base_url.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise InvalidRequest(f"the base URL {self.client.base_url!r} is not http:// or https://")
        return ("wss://" if scheme.lower() == "https" else "ws://") + rest + "/v1/ws"

    async def __aenter__(self) -> Self:
        # (opening a session sends no request: the client's `RetryPolicy` retries it as any
        # idempotent call, a refused upgrade or a "not now" (503) first frame included)
        await with_retry(self.client.retry, self._connect)
        task_group = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(task_group.cancel_scope.cancel)
        task_group.start_soon(self._reader)
        return self

    async def _connect(self) -> None:
        """Open the socket and read the server's `ready`; the typed error, the socket
        closed, if it does not come."""
        try:
            self.client._check_open()
            # A copy of the headers: httpx_ws adds its upgrade headers to the dict it is
            # given, which would then leak into every later plain request.
            headers = checked_headers(dict(self.client.headers))
            self._ws = await self._stack.enter_async_context(
                aconnect_ws(self.url, _ReadsRefusals(self.client.http), headers=headers, max_message_size_bytes=4 * 1024 * 1024,
                            **ping_settings(self.client.http.timeout.read))
            )
            first = await self._ws.receive_json()
        except BaseException as exc:
            await self._unwind(exc)
            if isinstance(exc, Exception):
                raise _connection_error(exc) from exc
            raise  # a cancellation (or KeyboardInterrupt...) as it is
        if first.get("type") != "ready":
            await self._stack.aclose()
            raise error_for(first.get("status", 500), first, retry_after=first.get("retry_after"))

    async def _unwind(self, exc: BaseException) -> None:
        """Close what a failed or cancelled `__aenter__` opened, in the cancel-scope
        nesting it was opened in. httpx_ws's connection holds a task group (a cancel
        scope); exiting it inside a scope opened later, such as a shielding one, is what
        anyio forbids ("Cancel scope stack corrupted" under trio, "Attempted to exit a
        cancel scope that isn't the current task's current cancel scope" under asyncio).
        No shield is needed: httpx_ws shields its own closing handshake. `exc` is passed
        in, so the connection's context managers unwind as for that exception."""
        await self._stack.__aexit__(type(exc), exc, exc.__traceback__)

    async def __aexit__(self, *exc: object) -> None:
        self._ended = self._ended or "the WebSocket session is closed"
        try:
            await self._stack.aclose()  # cancels the reader, which then ends no stream
        finally:
            self._end_streams(lambda _route: ConnectionFailed(self._ended or "", retryable=False))

    async def _reader(self) -> None:
        try:
            while True:
                frame = await self._ws.receive_json()
                route = self._routes.get(frame.get("id"))
                if route is not None:
                    try:
                        route.send.send_nowait(frame)  # unbounded: never waits on one stream
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        self._routes.pop(frame.get("id"), None)
                elif frame.get("type") == "error" and frame.get("id") is None:
                    self._closing_frame = frame
                    self.closed_error = error_for(frame.get("status", 500), frame)
        except (HTTPXWSException, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError, ValueError) as exc:  # closed, reset, or a frame that is not JSON
            self._drop(exc)

    def _drop(self, exc: BaseException) -> None:
        """The socket is gone (`exc`): end every open stream with `ConnectionFailed`, not
        retryable (its request was sent: it may have run), except those whose request frame was over the limit
        the server closed the socket for: those get its 413 `BadRequest`, which a retry
        would get again. The reader puts them into the streams' buffers without waiting
        (they are unbounded), and every stream gets an error of its own."""
        closing = self._closing_frame
        said = describe(exc) if str(exc) else f"the connection was lost ({type(exc).__name__})"
        reason = said if closing is None else f"{self.closed_error} ({said})"
        self._ended = f"WebSocket closed: {reason}"
        limit = _frame_limit(closing)  # None unless the server closed it for a frame too large
        ended = self._ended

        def error(route: _Route) -> LmgateError:
            if closing is not None and limit is not None and route.request_bytes > limit:
                return error_for(closing.get("status", 413), closing)
            # (its request was sent: the server may have run, and billed, it: not retryable)
            return ConnectionFailed(ended, retryable=False)

        self._end_streams(error)

    def _end_streams(self, error: Callable[[_Route], LmgateError]) -> None:
        """End every open stream with `error(its route)` (a stream read later raises it)."""
        for route in self._routes.values():
            try:
                route.send.send_nowait(error(route))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # that stream was closed meanwhile
            route.send.close()
        self._routes.clear()

    async def _send(self, text: str) -> None:
        """Send one frame (JSON text); ConnectionFailed if the socket is gone."""
        if self._ended is not None:
            raise ConnectionFailed(self._ended)
        try:
            async with self._send_lock:
                await self._ws.send_text(text)
        except (HTTPXWSException, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionFailed(f"WebSocket closed: {describe(exc)}") from exc
        except Exception as exc:  # noqa: BLE001 - wsproto refuses to send on a closed connection
            if type(exc).__module__.startswith("wsproto"):
                raise ConnectionFailed(f"WebSocket closed: {describe(exc)}") from exc
            raise

    async def _request_frame(self, stream: WsStream) -> str:
        fields = dict(stream._body)  # not popped: a start that failed here can be tried again
        cache_control = fields.pop("cache_control")
        body = await self.client._body(dict(fields.pop("params")), **fields)
        frame = {"type": "request", "id": stream.id, "endpoint": stream.endpoint, "body": body}
        if cache_control:
            frame["cache_control"] = cache_control
        return json.dumps(frame)

    async def _resend(self, stream: WsStream) -> None:
        """Send a refused stream's request again (`RetryPolicy`), under a new id: the
        refused one may not be cleared server-side yet. Its frames keep their buffer."""
        route = self._routes.pop(stream.id, None)
        if route is None or self._ended is not None:
            raise ConnectionFailed(self._ended or "the stream was closed")
        stream.id = f"r{next(self._ids)}"
        text = await self._request_frame(stream)
        self._routes[stream.id] = _Route(route.send, len(text.encode()))
        await self._send(text)

    async def _start(self, stream: WsStream) -> MemoryObjectReceiveStream[Any]:
        if self._ended is not None:
            raise ConnectionFailed(self._ended)
        text = await self._request_frame(stream)
        send, receive = anyio.create_memory_object_stream[Any](math.inf)
        self._routes[stream.id] = _Route(send, len(text.encode()))
        try:
            await self._send(text)
        except BaseException:
            self._forget(stream.id)
            receive.close()
            raise
        return receive

    async def _cancel(self, request_id: str) -> bool:
        """Send a cancel frame for a live request; whether it was sent."""
        if request_id not in self._routes:
            return False
        try:
            await self._send(json.dumps({"type": "cancel", "id": request_id}))
        except Exception:  # noqa: BLE001 - socket already gone: the server cancels on close
            return False
        return True

    def _forget(self, request_id: str) -> None:
        route = self._routes.pop(request_id, None)
        if route is not None:
            route.send.close()

    def _stream(self, endpoint: str, params: dict[str, Any], cache_control: str | None, **fields: Any) -> WsStream:
        rid = f"r{next(self._ids)}"
        return WsStream(self, rid, endpoint, {"params": params, "cache_control": cache_control, **fields})

    def chat_stream(self, messages: list[dict[str, Any]], *, cache_control: str | None = None,
                    **params: Any) -> WsStream:
        return self._stream("chat.completions", params, cache_control, messages=messages)

    def completions_stream(self, prompt: str | list[int], *, cache_control: str | None = None,
                           **params: Any) -> WsStream:
        return self._stream("completions", params, cache_control, prompt=prompt)


def ping_settings(read_timeout: float | None) -> dict[str, float]:
    """httpx_ws's keepalive for a client whose reads time out after `read_timeout`: a
    WebSocket's requests may be silent for long (queued, a beam search), so no read
    deadline applies to their frames; the connection is pinged instead, every half of
    `read_timeout`, and closed (every stream failing with `ConnectionFailed`) when a ping
    goes unanswered that long. Both at most httpx_ws's own 20 s; None: its defaults."""
    if read_timeout is None:
        return {}
    return {"keepalive_ping_interval_seconds": min(20.0, read_timeout / 2),
            "keepalive_ping_timeout_seconds": min(20.0, read_timeout)}


_LIMIT = re.compile(r"limit of (\d+)")


def _frame_limit(frame: dict[str, Any] | None) -> int | None:
    """The limit a ``frame_too_large`` error frame states ("frame of N bytes exceeds the
    limit of L"); None for another frame, or one stating none (then no stream can be told
    apart, and every one gets ConnectionFailed)."""
    error = (frame or {}).get("error") or {}
    if error.get("code") != "frame_too_large":
        return None
    match = _LIMIT.search(str(error.get("message") or ""))
    return int(match.group(1)) if match else None


REFUSAL_BODY_MAX = 64 * 1024


class _ReadsRefusals:
    """The httpx client as httpx_ws sees it (it only calls `stream`): an answer other
    than 101 has its body read (up to REFUSAL_BODY_MAX bytes) before httpx_ws raises
    WebSocketUpgradeError over it, which closes it unread otherwise, so that the
    refusal's error JSON (its `code`, `param`, message) reaches `_connection_error`."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    @asynccontextmanager
    async def stream(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        async with self.http.stream(method, url, **kwargs) as response:
            if response.status_code != 101:
                body = b""
                try:
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > REFUSAL_BODY_MAX:
                            body = b""  # not an lmgate refusal: classified by its status alone
                            break
                except httpx.HTTPError:
                    body = b""
                response._content = body  # what response.json() reads (httpx's own cache of the body)
            yield response


def _connection_error(exc: BaseException) -> LmgateError:
    """The error for a failed connect: the server's refusal of the upgrade as its typed
    error, httpx's exceptions as for a plain request."""
    from httpx_ws import WebSocketUpgradeError

    if isinstance(exc, WebSocketUpgradeError):
        response = exc.response
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError, httpx.StreamError):
            # no JSON (not from lmgate, or over REFUSAL_BODY_MAX): classify by status, say what was refused
            body = {"error": {"message": f"WebSocket upgrade refused with HTTP {response.status_code}"
                              + (" (is the API key valid?)" if response.status_code == 401 else "")}}
        return error_for(response.status_code, body, response.headers)
    if isinstance(exc, LmgateError):
        return exc
    if isinstance(exc, SEND_ERRORS):
        return request_error(exc, "WebSocket connect", idempotent=True)
    return ConnectionFailed(f"WebSocket connect failed: {describe(exc)}")


__all__ = ["WsSession", "WsStream"]
