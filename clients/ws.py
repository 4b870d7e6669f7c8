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
cancels whatever is still running server-side. A dropped connection ends every open
stream with `ConnectionFailed`, and a stream started on a closed session raises it.
"""

from __future__ import annotations

import itertools
import math
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from httpx_ws import HTTPXWSException, aconnect_ws

from clients.client import Delta, Usage, usage_from
from clients.errors import ConnectionFailed, LmgateError, error_for

if TYPE_CHECKING:
    from clients.client import LmgateClient


class WsStream:
    """One request on a session. Iterate for `Delta`s; `usage`/`finish_reasons` are
    set when the ``done`` frame arrives."""

    def __init__(self, session: WsSession, request_id: str, endpoint: str, body: dict[str, Any]) -> None:
        self.session = session
        self.id = request_id
        self.endpoint = endpoint
        self._body = body
        self._receive: MemoryObjectReceiveStream[Any] | None = None
        self.done = False
        self.usage: Usage | None = None
        self.finish_reasons: list[str] = []

    async def start(self) -> None:
        if self._receive is None:
            self._receive = await self.session._start(self)

    async def __aenter__(self) -> WsStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel server-side if not finished; idempotent."""
        if self._receive is None:
            return
        if not self.done:
            self.done = True
            with anyio.CancelScope(shield=True):
                await self.session._cancel(self.id)
        self.session._forget(self.id)
        self._receive.close()

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        await self.start()
        if self._receive is None:
            raise RuntimeError("stream did not start")
        try:
            async for delta in self._deltas():
                yield delta
        finally:  # left early (also a bare `async for` broken out of): cancel server-side
            await self.aclose()

    async def _deltas(self) -> Any:
        assert self._receive is not None
        ended: set[int] = set()  # choices whose finish came on their last token frame
        async for frame in self._receive:
            if isinstance(frame, LmgateError):
                self.done = True
                raise frame
            kind = frame.get("type")
            if kind == "token":
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
            elif kind == "error":
                self.done = True
                raise error_for(frame.get("status", 500), frame, retry_after=frame.get("retry_after"))
            elif kind == "cancelled":
                self.done = True
                return


class WsSession:
    """An open /v1/ws connection (header auth). Create with `LmgateClient.ws()`."""

    def __init__(self, client: LmgateClient) -> None:
        self.client = client
        self._ids = itertools.count(1)
        self._streams: dict[str, MemoryObjectSendStream[Any]] = {}
        self._stack = AsyncExitStack()
        self._ws: Any = None
        self._send_lock = anyio.Lock()
        self.closed_error: LmgateError | None = None
        self._ended: LmgateError | None = None  # set when the socket is gone: new streams fail with it

    @property
    def url(self) -> str:
        base = self.client.base_url
        return ("wss://" + base[len("https://"):] if base.startswith("https://") else "ws://" + base.split("://", 1)[-1]) + "/v1/ws"

    async def __aenter__(self) -> WsSession:
        try:
            # A copy of the headers: httpx_ws adds its upgrade headers to the dict it is
            # given, which would then leak into every later plain request.
            self._ws = await self._stack.enter_async_context(
                aconnect_ws(self.url, self.client.http, headers=dict(self.client.headers), max_message_size_bytes=4 * 1024 * 1024)
            )
            first = await self._ws.receive_json()
        except Exception as exc:
            await self._stack.aclose()
            raise _connection_error(exc) from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stack.aclose()
            raise
        if first.get("type") != "ready":
            await self._stack.aclose()
            raise error_for(first.get("status", 500), first)
        task_group = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(task_group.cancel_scope.cancel)
        task_group.start_soon(self._reader)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._ended = self._ended or ConnectionFailed("the WebSocket session is closed")
        await self._stack.aclose()

    async def _reader(self) -> None:
        try:
            while True:
                frame = await self._ws.receive_json()
                target = self._streams.get(frame.get("id"))
                if target is not None:
                    try:
                        target.send_nowait(frame)  # unbounded: never waits on one stream
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        self._streams.pop(frame.get("id"), None)
                elif frame.get("type") == "error" and frame.get("id") is None:
                    self.closed_error = error_for(frame.get("status", 500), frame)
        except (HTTPXWSException, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError, ValueError) as exc:  # closed, reset, or a frame that is not JSON
            error = self.closed_error or ConnectionFailed(f"WebSocket closed: {exc}")
            self._ended = error
            for stream in list(self._streams.values()):
                with anyio.move_on_after(1):
                    await stream.send(error)
                stream.close()
            self._streams.clear()

    async def _send(self, frame: dict[str, Any]) -> None:
        if self._ended is not None:
            raise self._ended
        try:
            async with self._send_lock:
                await self._ws.send_json(frame)
        except (HTTPXWSException, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionFailed(f"WebSocket closed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - wsproto refuses to send on a closed connection
            if type(exc).__module__.startswith("wsproto"):
                raise ConnectionFailed(f"WebSocket closed: {exc}") from exc
            raise

    async def _start(self, stream: WsStream) -> MemoryObjectReceiveStream[Any]:
        if self._ended is not None:
            raise self._ended
        cache_control = stream._body.pop("cache_control")
        body = await self.client._body(dict(stream._body.pop("params")), **stream._body)
        send, receive = anyio.create_memory_object_stream[Any](math.inf)
        self._streams[stream.id] = send
        frame = {"type": "request", "id": stream.id, "endpoint": stream.endpoint, "body": body}
        if cache_control:
            frame["cache_control"] = cache_control
        try:
            await self._send(frame)
        except BaseException:
            self._forget(stream.id)
            receive.close()
            raise
        return receive

    async def _cancel(self, request_id: str) -> None:
        if request_id in self._streams:
            try:
                await self._send({"type": "cancel", "id": request_id})
            except Exception:  # noqa: BLE001 - socket already gone: the server cancels on close
                return

    def _forget(self, request_id: str) -> None:
        send = self._streams.pop(request_id, None)
        if send is not None:
            send.close()

    def _stream(self, endpoint: str, params: dict[str, Any], cache_control: str | None, **fields: Any) -> WsStream:
        rid = f"r{next(self._ids)}"
        return WsStream(self, rid, endpoint, {"params": params, "cache_control": cache_control, **fields})

    def chat_stream(self, messages: list[dict[str, Any]], *, cache_control: str | None = None,
                    **params: Any) -> WsStream:
        return self._stream("chat.completions", params, cache_control, messages=messages)

    def completions_stream(self, prompt: str | list[int], *, cache_control: str | None = None,
                           **params: Any) -> WsStream:
        return self._stream("completions", params, cache_control, prompt=prompt)


def _connection_error(exc: BaseException) -> LmgateError:
    from httpx_ws import WebSocketUpgradeError

    if isinstance(exc, WebSocketUpgradeError):
        response = exc.response
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError, httpx.StreamError):
            # httpx_ws closes the refusal unread: classify by status, and say what was refused
            body = {"error": {"message": f"WebSocket upgrade refused with HTTP {response.status_code}"
                              + (" (is the API key valid?)" if response.status_code == 401 else "")}}
        return error_for(response.status_code, body, response.headers)
    if isinstance(exc, LmgateError):
        return exc
    return ConnectionFailed(f"WebSocket connect failed: {exc}")


__all__ = ["WsSession", "WsStream"]
