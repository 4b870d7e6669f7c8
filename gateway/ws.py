"""GET /v1/ws: several concurrent generation requests multiplexed on one WebSocket.

The JSON protocol is documented in docs/websocket.md. In short::

    client → {"type":"auth","api_key":"lmg-..."}           (only if no Authorization header)
    client → {"type":"request","id":"c1","endpoint":"chat.completions","body":{...}}
    server → {"type":"token","id":"c1","index":0,"text":"Hi","token_ids":[...]}   (many)
    server → {"type":"done","id":"c1","finish_reasons":["stop"],"usage":{...}}
    client → {"type":"cancel","id":"c1"}   server → {"type":"cancelled","id":"c1"}
    server → {"type":"error","id":"c1"|null,"status":400,"error":{...OpenAI error...}}

One trio task per request, all in the socket's nursery: closing the socket (or
the client vanishing) cancels the nursery, and each task's `events_of` finally
aborts its request in the runtime. A malformed frame gets an error frame and
the socket stays open; a frame above `max_ws_frame_bytes` gets an error frame
and close code 1009 (message too big).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import trio
from quart import Blueprint, websocket

from actors.messages import Failed, Finished, TenantContext, TokenDelta
from actors.metrics import UNAUTHENTICATED
from gateway.app import bearer, check_one_authorization, request_id_of
from gateway.errors import ApiError, invalid_request, log_failure, malformed_json
from gateway.routes_openai import (
    CacheDirectives,
    Handle,
    decode_request,
    echo_texts,
    events_of,
    failed_error,
    new_request_id,
    submit_all,
    to_generate_calls,
    tools_of,
    unfinished_error,
    usage_json,
)

if TYPE_CHECKING:
    from gateway.app import GatewayState

log = logging.getLogger("lmgate.gateway.ws")
WS_PATH = "/v1/ws"

AUTH_TIMEOUT_S = 10.0
DRAIN_POLL_S = 0.05
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
# Answers of the reader's (errors for refused frames) queued for the writer; a full queue
# holds the reader up to UNREAD_REPLIES_S, then the socket is closed as not reading (a client
# that writes and never reads would otherwise queue them for ever)
MAX_UNREAD_REPLIES = 64
UNREAD_REPLIES_S = 10.0
CLOSE_TIMEOUT_S = 5.0  # for the last error frame and the close frame of a socket ending on an error
CLOSE_DRAIN_S = 30.0  # then frames are read and dropped until the client closes, for at most this long,
DRAIN_IDLE_S = 1.0  # and while they keep coming


class AuthFrame(msgspec.Struct, tag="auth", tag_field="type"):
    api_key: str


# a request's id is repeated in every frame of its answer: a megabyte id made each token
# frame a megabyte (4 MB of frames sent 1.2 GB back within 10 s)
MAX_ID_CHARS = 128
FrameId = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]


class RequestFrame(msgspec.Struct, tag="request", tag_field="type"):
    id: FrameId
    endpoint: Literal["completions", "chat.completions"]
    body: msgspec.Raw
    cache_control: str | None = None  # as HTTP's Cache-Control request header (`no-cache`, `no-store`)


class CancelFrame(msgspec.Struct, tag="cancel", tag_field="type"):
    id: FrameId


ClientFrame = AuthFrame | RequestFrame | CancelFrame
_decoder = msgspec.json.Decoder(ClientFrame)
_encoder = msgspec.json.Encoder()


def decode_frame(data: str | bytes) -> ClientFrame:
    """Parse one client frame; ApiError 400 on anything malformed."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ApiError(400, invalid_request(exc, "invalid frame"), code="invalid_frame") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise malformed_json(data, exc, frame=True) from exc
    except RecursionError as exc:  # msgspec's decoder recurses per nesting level
        raise ApiError(400, "malformed JSON frame: nested too deeply", code="invalid_json") from exc


def frame_id_of(data: str | bytes) -> str | None:
    """The `id` of a frame `decode_frame` refused, when it is JSON with a string `id` (a
    request with a field of the wrong type: its error frame names it); else None."""
    try:
        value = msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    frame_id = value.get("id") if isinstance(value, dict) else None
    return frame_id if isinstance(frame_id, str) and len(frame_id) <= MAX_ID_CHARS else None


def error_frame(request_id: str | None, exc: ApiError) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "id": request_id, "status": exc.status, **exc.body()}
    if exc.retry_after is not None:
        frame["retry_after"] = round(exc.retry_after, 3)  # seconds, to the millisecond
    return frame


@dataclass
class Session:
    """One socket: its tenant, its live requests (id → cancel scope), a send lock."""

    state: GatewayState
    request_id: str = "-"  # the upgrade's `X-Request-Id` (given or made), in the socket's log lines
    tenant: TenantContext | None = None
    api_key: str | None = None  # the key it authenticated with: checked again for every request
    active: dict[str, trio.CancelScope] = field(default_factory=dict)
    # cancelled, "cancelled" not sent yet (its quota settling): a repeated cancel is ignored,
    # and the id cannot be reused until then (no frames of two requests under one id)
    cancelling: set[str] = field(default_factory=set)
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    drained: bool = False  # the server shut down and this socket's streams are done: close it
    # the reader's answers (errors for frames it refused), sent by `write_replies`: the
    # reader does not wait on a send (`reply`; see `_serve`)
    replies: tuple[trio.MemorySendChannel[dict[str, Any]], trio.MemoryReceiveChannel[dict[str, Any]]] = field(
        default_factory=lambda: trio.open_memory_channel[dict[str, Any]](MAX_UNREAD_REPLIES))
    writer: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def send(self, frame: dict[str, Any]) -> None:
        data = _encoder.encode(frame).decode()
        async with self.send_lock:
            await websocket.send(data)

    def note_failure(self, frame_id: str | None, exc: ApiError) -> None:
        """A frame answered with an error: counted as the tenant's refusal when it was one
        (`lmgate_rejections_total`, as HTTP's) and logged as an HTTP answer with an error is
        (`log_failure`: the socket's request id, then the frame's id)."""
        tenant = self.tenant.tenant_id if self.tenant is not None else UNAUTHENTICATED
        if self.tenant is not None and exc.refused_before_admission:
            self.state.runtime.count_rejection(tenant, exc.status, exc.code or "error")
        log_failure("WS", WS_PATH, self.request_id if frame_id is None else f"{self.request_id}/{frame_id}",
                    tenant, exc)

    async def refuse(self, frame_id: str | None, exc: ApiError) -> None:
        """Answer a frame the reader refuses with its error frame (`note_failure`)."""
        self.note_failure(frame_id, exc)
        await self.reply(error_frame(frame_id, exc))

    async def reply(self, frame: dict[str, Any]) -> None:
        """Queue an answer of the reader's. A full queue (a burst of frames to answer) holds
        the reader until the writer catches up, but at most `UNREAD_REPLIES_S`: answers that
        do not go out for that long mean a client that does not read, and the ApiError then
        raised ends the socket (the reader must not wait longer: see `_serve`)."""
        try:
            self.replies[0].send_nowait(frame)
            return
        except trio.WouldBlock:
            pass
        with trio.move_on_after(UNREAD_REPLIES_S):
            await self.replies[0].send(frame)
            return
        raise ApiError(400, f"the client sent frames whose answers it does not read ({MAX_UNREAD_REPLIES} unsent "
                       f"for {UNREAD_REPLIES_S:g} s)", code="client_not_reading")

    async def write_replies(self) -> None:
        """Send the reader's answers, until `writer.cancel()` (before the socket closes: a
        send after the close is an error)."""
        with self.writer:
            async for frame in self.replies[1]:
                await self.send(frame)

    async def discard_frames(self, *, idle_s: float = math.inf) -> None:
        """Read and drop frames until cancelled, or until none came for `idle_s`: while a
        socket ends, a connection lost (or the client's close or EOF) reaches the app as
        Hypercorn's `websocket.disconnect` through queues that only reading empties; left
        full, the send that found the connection gone waits on them for ever (and with it
        the socket's handler), and a client still sending never has its close read."""
        while True:
            with trio.move_on_after(idle_s) as idle:
                await websocket.receive()
            if idle.cancelled_caught:
                return

    async def receive(self) -> str | bytes:
        """Next frame; raises ApiError(413) if it is above the size limit."""
        data = await websocket.receive()
        size = len(data.encode()) if isinstance(data, str) else len(data)
        if size > self.state.config.max_ws_frame_bytes:
            raise ApiError(
                413,
                f"frame of {size} bytes exceeds the limit of {self.state.config.max_ws_frame_bytes}",
                code="frame_too_large",
            )
        return data

    async def run_request(self, frame: RequestFrame, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run one request to completion, streaming frames; errors become error frames."""
        handles: list[Handle] = []
        with trio.CancelScope() as scope:
            self.active[frame.id] = scope
            task_status.started()
            try:
                await self._stream(frame, handles)
            except ApiError as exc:
                self.note_failure(frame.id, exc)
                await self.send(error_frame(frame.id, exc))
            finally:
                self.active.pop(frame.id, None)
        try:
            if scope.cancelled_caught:
                if handles:  # "cancelled" means gone: its quota settled, its concurrency slot free
                    await handles[0].wait_settled()
                await self.send({"type": "cancelled", "id": frame.id})
        finally:
            self.cancelling.discard(frame.id)  # (also when the request ended before the cancel took)

    async def _stream(self, frame: RequestFrame, handles: list[Handle]) -> None:
        if self.tenant is None:  # checked before spawning; kept for the type checker
            raise ApiError(401, "not authenticated", code="missing_api_key")
        # as every HTTP request: a key revoked or expired, a tenant deleted or its models
        # changed since the socket opened, holds for the socket's next request too
        self.tenant = await self.state.authenticate_key(self.api_key)
        # the socket streams every request, whatever the body's `stream` says (ignored here,
        # so a field that HTTP refuses with a stream, prompt_logprobs, is not refused here)
        req = msgspec.structs.replace(decode_request(frame.endpoint, bytes(frame.body)), stream=False)
        self.state.check_generation_model(req.model, self.tenant)
        request_id = new_request_id(frame.endpoint)
        if tools_of(req) is not None:
            raise ApiError(400, "tool calls are answered over HTTP (streamed or not); the WebSocket streams text",
                           code="unsupported_value", param="tools")
        calls = to_generate_calls(req, self.tenant, request_id, cache=CacheDirectives.parse(frame.cache_control))
        # (each choice's first frame carries its prompt's logprobs here, chat's too: admission
        # bounds one copy per choice — counted once, as chat's HTTP answer has them, a review
        # found a 30k-token prompt's logprobs sent 64 times past the bound)
        calls = [msgspec.structs.replace(c, prompt_logprob_copies=None,
                                         prompt_logprobs_param="n" if req.n > 1 else "prompt_logprobs",
                                         stream=True)  # (what the runtime is told: the answer goes out as it comes)
                 for c in calls]
        echo = echo_texts(self.state, req, calls)
        handle = await submit_all(self.state, calls, request_id, req.n)
        handles.append(handle)
        async with aclosing(events_of(handle)) as events:
            await self._forward(frame.id, events, echo, req.n)

    async def _forward(self, frame_id: str, events: AsyncIterator[Any], echo: list[str] | None, n: int) -> None:
        started: set[int] = set()
        async for event in events:
            if isinstance(event, TokenDelta):
                head = ""
                if echo is not None and event.index not in started:  # echo: the prompt (chat: the prefill) first
                    head = echo[event.index // n]
                started.add(event.index)
                token: dict[str, Any] = {
                    "type": "token",
                    "id": frame_id,
                    "index": event.index,
                    "text": head + event.text,
                    "token_ids": event.token_ids,
                }
                if event.logprobs is not None:
                    token["logprobs"] = event.logprobs
                if event.finish_reason is not None:  # the choice's last frame (`done` lists every choice's)
                    token["finish_reason"] = event.finish_reason
                if event.prompt_logprobs is not None:  # the prompt's, on each choice's first frame
                    token["prompt_token_ids"] = [p.token_id for p in event.prompt_logprobs]
                    token["prompt_logprobs"] = [p.logprob for p in event.prompt_logprobs]
                await self.send(token)
            elif isinstance(event, Finished):
                await self.send(
                    {
                        "type": "done",
                        "id": frame_id,
                        "request_id": event.request_id,
                        "finish_reasons": event.finish_reasons,
                        "usage": usage_json(event),
                        "cached": event.cached,
                    }
                )
                return
            elif isinstance(event, Failed):
                raise failed_error(event)
        # (as `collect` and the SSE body: no frame at all left the client's stream waiting)
        raise unfinished_error()


async def _authenticate_first_frame(session: Session) -> None:
    """No Authorization header: the first frame must be an auth frame."""
    with trio.move_on_after(AUTH_TIMEOUT_S) as timeout:
        data = await session.receive()
        try:
            frame = decode_frame(data)
        except ApiError:  # not even a frame: still, what is missing is the auth frame
            frame = None
    if timeout.cancelled_caught:
        raise ApiError(401, "no auth frame received in time", code="missing_api_key")
    if not isinstance(frame, AuthFrame):
        raise ApiError(401, "first frame must be {'type':'auth','api_key':...}", code="missing_api_key")
    session.tenant = await session.state.authenticate_key(frame.api_key)
    session.api_key = frame.api_key
    await session.send({"type": "ready"})


def close_code(fatal: ApiError) -> int:
    """The close code of a socket ended by `fatal`: 1009 for a frame too large, 1013 (try
    again later) when the server could not serve it for now (a 503: the key could not be
    checked while Redis is down), 1011 for its own failure, else 1008 (a bad key, a client
    not reading). 1008 tells a client not to come back with the same credentials."""
    if fatal.code == "frame_too_large":
        return CLOSE_TOO_BIG
    if fatal.status == 503:
        return CLOSE_TRY_AGAIN_LATER
    return CLOSE_SERVER_ERROR if fatal.status >= 500 else CLOSE_POLICY


async def _open(session: Session) -> ApiError | None:
    """Authenticate the socket (header, or its first frame) and say `ready`; returns the
    error that refuses it (raised inside the nursery it would arrive in an exception group)."""
    try:
        if session.tenant is None:
            await _authenticate_first_frame(session)
        else:
            await session.send({"type": "ready"})
    except ApiError as exc:
        return exc
    return None


async def _serve(session: Session, nursery: trio.Nursery) -> ApiError:
    """Read frames until one is fatal (too big, or answers the client leaves unread);
    returns that error (raising it inside the nursery would arrive wrapped in an exception
    group). The reader does not wait on a send: its answers are queued (`Session.reply`,
    which holds it at most `UNREAD_REPLIES_S` when the queue is full). A reader waiting
    behind a stream's send to a client that does not read stops emptying Hypercorn's queue
    to the app, and when that client's connection then dies, the send that finds it gone
    waits on the full queue to tell the app: the socket would never end."""
    limit = session.state.config.max_streams_per_socket
    while True:
        try:
            data = await session.receive()
            try:
                frame = decode_frame(data)
            except ApiError as exc:
                await session.refuse(frame_id_of(data), exc)
                continue
            if isinstance(frame, CancelFrame):
                scope = session.active.get(frame.id)
                if scope is not None:
                    session.cancelling.add(frame.id)
                    scope.cancel()
                elif frame.id not in session.cancelling:  # (a repeated cancel: "cancelled" is on its way)
                    await session.reply(error_frame(frame.id, ApiError(404, f"no active request {frame.id!r}",
                                                                 code="unknown_request")))
            elif isinstance(frame, AuthFrame):
                await session.reply(error_frame(None, ApiError(400, "already authenticated", code="invalid_frame")))
            elif frame.id in session.active or frame.id in session.cancelling:
                await session.refuse(frame.id, ApiError(409, f"request id {frame.id!r} is already active",
                                                        code="duplicate_id"))
            elif session.state.draining.is_set():
                await session.refuse(frame.id, ApiError(503, "server shutting down: send this request to "
                                                        "another server", code="shutting_down", retry_after=1.0))
            elif len(session.active) >= limit:
                await session.refuse(frame.id, ApiError(429, f"at most {limit} concurrent requests per socket",
                                                        code="too_many_streams", retry_after=1.0))
            else:
                await nursery.start(session.run_request, frame)
        except ApiError as exc:  # too big, or not reading
            return exc


async def _close_when_drained(session: Session, scope: trio.CancelScope) -> None:
    """Shutdown: once the server drains and this socket's streams are done (each ended with
    `done`, or with a 503 `shutting_down` error at the grace period's end), stop serving
    it, so that it closes with 1001 (going away) rather than hold the shutdown until
    Hypercorn cuts it."""
    await session.state.draining.wait()
    while session.active or session.cancelling:
        await trio.sleep(DRAIN_POLL_S)
    session.drained = True
    scope.cancel()


def ws_blueprint(state: GatewayState) -> Blueprint:
    bp = Blueprint("ws", __name__)

    @bp.websocket(WS_PATH)
    async def ws() -> Any:
        session = Session(state, request_id_of(websocket.headers.get("X-Request-Id")))
        header = websocket.headers.get("Authorization")
        if header is not None:
            try:
                check_one_authorization(websocket.headers)
                session.tenant = await state.authenticate(header)
                session.api_key = bearer(header)
            except ApiError as exc:  # reject the upgrade with an HTTP error, named as every answer is
                refusal = exc.response()
                refusal.headers["X-Request-Id"] = session.request_id
                # counted and logged as HTTP's refusals are (`after_request` does not see a
                # WebSocket's): key guessing over the socket was invisible
                state.metrics.requests.labels(WS_PATH, "GET", str(exc.status), UNAUTHENTICATED).inc()
                log_failure("GET", WS_PATH, session.request_id, UNAUTHENTICATED, exc)
                return refusal
        await websocket.accept(headers={"X-Request-Id": session.request_id})
        state.metrics.ws_connections.inc()
        state.metrics.requests.labels(WS_PATH, "GET", "101", session.tenant.tenant_id if session.tenant is not None
                                      else UNAUTHENTICATED).inc()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_close_when_drained, session, nursery.cancel_scope)
                nursery.start_soon(session.write_replies)
                fatal = await _open(session)
                if fatal is None:
                    async with trio.open_nursery() as requests:
                        fatal = await _serve(session, requests)
                        # ending: read on (see `Session.discard_frames`) until the requests'
                        # tasks, whose sends may wait on the client, and the goodbye are done
                        nursery.start_soon(session.discard_frames)
                        requests.cancel_scope.cancel()  # (no "cancelled" frames: the socket is what ends)
                else:
                    nursery.start_soon(session.discard_frames)
                session.writer.cancel()  # the queued answers go unsent: the socket is closing
                session.note_failure(None, fatal)
                with trio.move_on_after(CLOSE_TIMEOUT_S):
                    await session.send(error_frame(None, fatal))
                    await websocket.close(close_code(fatal), fatal.code or "")
                nursery.cancel_scope.cancel()
            if session.drained:
                await websocket.close(CLOSE_GOING_AWAY, "shutting_down")
            else:  # closed on an error: read the client's frames while they keep coming, so that
                # its close or EOF, which ends this handler, is read (a handler that returned left
                # them unread, and a client that flooded without reading kept the connection open)
                with trio.move_on_after(CLOSE_DRAIN_S):
                    await session.discard_frames(idle_s=DRAIN_IDLE_S)
        finally:
            state.metrics.ws_connections.dec()
        return None

    return bp
