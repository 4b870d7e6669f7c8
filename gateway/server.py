"""`lmgate serve`: Hypercorn (trio worker) serving the gateway, with a graceful stop.

Start-up order (each a scope that wraps the next, torn down in reverse)::

    private redis-server (only if no redis_url / REDIS_URL)
      └─ RedisStore (coredis; opened around serve(), never inside while_serving — STACK.md)
          └─ runtime = actors.runtime.open_runtime(config)   (engine + actors)
              └─ hypercorn.trio.serve(app) until SIGINT/SIGTERM

On SIGINT/SIGTERM Hypercorn stops accepting connections, lets open requests and
streams run for `shutdown_grace_seconds`; shortly before that ends the runtime ends
every request still running with a 503 `shutting_down` error on its stream (an SSE
error event and `[DONE]`, a WebSocket error frame), then Hypercorn cancels what is left
and the runtime accounts every aborted request before its actors stop. A second signal
cuts the grace short: the requests are ended at once, the same way, and accounted as
well. (Ctrl-C before serving starts, or a third signal, interrupts: `lmgate serve` exits
130 without a traceback.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import coredis
import hypercorn.config
import hypercorn.trio
import msgspec
import trio

from cache.quotas import QuotaManager
from cache.redis_server import PrivateRedis, RedisServerError
from cache.store import CacheUnavailable, RedisStore, eviction_warning
from cache.tenants import TenantRegistry
from gateway.app import GatewayStores, Runtime, create_app
from gateway.config import (
    ConfigError,
    GatewayConfig,
    add_config_arguments,
    config_from_args,
    device_unavailable,
    non_default_settings,
    parse_log_level,
    start_warnings,
)
from gateway.errors import report_dropped_failures
from gateway.routes_admin import forget_deleted_tenants

log = logging.getLogger("lmgate.gateway.server")

DEV_TENANT_ID = "dev"
END_STREAMS_MARGIN_S = 0.5  # requests still running this long before the grace period ends get an error event
END_STREAMS_FLUSH_S = 0.25  # at least this long between those error events and the cut, for them to go out
SECRET_FILE = "server_secret"
# each line with its time (an outage, a failed request, placed in time from the log alone)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# TCP keepalive on the listening sockets, which the accepted ones inherit (Linux): a peer
# gone without a FIN or RST (a NAT's timeout, a suspended laptop) is found after about
# TCP_KEEPIDLE + TCP_KEEPCNT x TCP_KEEPINTVL seconds of silence, and its connection closed.
# Without it, an idle WebSocket of such a peer (its requests done) held its descriptor,
# and its count in lmgate_ws_connections, for good.
TCP_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4))


class KeepaliveConfig(hypercorn.config.Config):
    """Hypercorn's config, whose listening TCP sockets have keepalive on (`TCP_KEEPALIVE`).
    (Hypercorn's own WebSocket pings would find such a peer too, but each ping task holds
    its connection open for up to an interval after it closes, a shutdown included.)"""

    def _create_sockets(self, binds: list[str], type_: int = socket.SOCK_STREAM) -> list[socket.socket]:
        sockets = super()._create_sockets(binds, type_)
        for sock in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for name, value in TCP_KEEPALIVE:
                    if hasattr(socket, name):  # Linux names; macOS has TCP_KEEPALIVE for the idle time
                        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        return sockets


# Hypercorn's atoms: client, "method path protocol", status, response bytes, seconds taken,
# the answer's X-Request-Id (a WebSocket's line is Hypercorn's at the upgrade: `-` there)
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s HTTP/%(H)s" %(s)s %(b)s %(L)ss %({x-request-id}o)s'


class EscapedLine(logging.Filter):
    """An access log line with its control characters escaped (a path may decode to a
    newline, or to Unicode's bidirectional overrides: a forged or reversed line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from gateway.errors import loggable

        record.msg, record.args = loggable(record.getMessage(), 4096), None
        return True


def hypercorn_config(config: GatewayConfig) -> hypercorn.config.Config:
    """Hypercorn settings derived from the gateway config.

    Hypercorn's own WebSocket limit is set above ours so an oversized frame
    reaches the app, which answers with an error frame before closing 1009. The listen
    backlog is `listen_backlog`: with Hypercorn's default of 100, a burst of new
    connections while the event loop is busy overflowed the kernel's queue, and clients
    got connection resets instead of the app's 503 (the kernel caps it at
    net.core.somaxconn).
    """
    hc = KeepaliveConfig()
    hc.bind = [f"{config.host}:{config.port}"]
    hc.graceful_timeout = shutdown_schedule(config.shutdown_grace_seconds)[1]
    hc.keep_alive_timeout = config.keep_alive_seconds
    hc.backlog = config.listen_backlog
    hc.websocket_max_message_size = 2 * config.max_ws_frame_bytes + 4096
    # a WebSocket gets a ping frame this often (browsers and client libraries answer it), so a
    # proxy's read timeout (nginx: 60 s) does not cut a socket whose request is queued: SSE's
    # comment lines, for WebSockets
    hc.websocket_ping_interval = config.sse_ping_seconds or None
    hc.h11_max_incomplete_size = 64 * 1024
    if config.access_log:
        # (no query string, %(q)s: it may hold a key a client put there; the path's control
        # characters escaped by `EscapedLine`, as the gateway's own lines escape them)
        hc.accesslog = logging.getLogger("hypercorn.access")
        hc.access_log_format = ACCESS_LOG_FORMAT
        if not any(isinstance(f, EscapedLine) for f in hc.accesslog.filters):
            hc.accesslog.addFilter(EscapedLine())
    else:
        hc.accesslog = None
    # Hypercorn's messages go through the root logger like everyone else's; given "-" (its
    # default) it adds its own stderr handler and every line ("Running on ...") came twice
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


def shutdown_schedule(grace_s: float) -> tuple[float, float]:
    """(end, cut): seconds after the stop signal at which the requests still running are
    ended with an error event (`END_STREAMS_MARGIN_S` before the grace ends, or halfway
    through a shorter one), and at which Hypercorn cuts the connections: the end of the
    grace, but never sooner than `END_STREAMS_FLUSH_S` after the error events (a grace of
    0 cut the streams before their error events went out)."""
    end = grace_s - min(END_STREAMS_MARGIN_S, grace_s / 2)
    return end, max(grace_s, end + END_STREAMS_FLUSH_S)


def server_secret(data_dir: str | os.PathLike[str], env: dict[str, str] | None = None) -> bytes:
    """The HMAC secret API keys are hashed with: $LMGATE_SECRET, else data_dir/server_secret
    (created 0600 on first start). Changing it invalidates every issued key (a server started
    with another secret than the Redis's keys were issued under refuses to start: `check_secret`)."""
    return read_server_secret(data_dir, env)[0]


def read_server_secret(data_dir: str | os.PathLike[str], env: dict[str, str] | None = None) -> tuple[bytes, bool]:
    """`server_secret`, and whether this call made it (and wrote its file): `serve` removes
    such a file again unless Redis took the secret, else the next start (a restart
    policy's) would find it and take it as given. Two starts on one data dir: one makes
    it, the other reads it."""
    env = dict(os.environ) if env is None else env
    if env.get("LMGATE_SECRET"):
        return env["LMGATE_SECRET"].encode(), False
    path = Path(data_dir) / SECRET_FILE
    if path.exists():
        return path.read_bytes().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip(), False
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    return value, True


@asynccontextmanager
async def open_stores(redis_url: str, secret: bytes) -> AsyncIterator[GatewayStores]:
    """Open the Redis client and the registries on it (inside the caller's trio run)."""
    async with RedisStore(redis_url) as redis:
        yield GatewayStores(redis=redis, tenants=TenantRegistry(redis, secret), quotas=QuotaManager(redis))


async def ensure_dev_tenant(tenants: TenantRegistry) -> str | None:
    """Create the development tenant and a key for it if it does not exist yet.
    Returns the plaintext key when one was created (it cannot be read back later)."""
    if await tenants.get_tenant(DEV_TENANT_ID) is not None:
        return None
    await tenants.create_tenant(DEV_TENANT_ID, "development tenant")
    _, key = await tenants.create_key(DEV_TENANT_ID, "dev")
    return key


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP while serving: the first sets `stop` (the graceful stop),
    the second `cut` (the grace cut short). Caught from when serving starts until the second;
    before, Ctrl-C interrupts start-up, and after, a third signal acts as it would
    without lmgate (SIGINT interrupts, SIGTERM and SIGHUP kill): a way out of a stuck drain.

    SIGHUP (the terminal lmgate runs in closed) killed the process mid-stream: no error
    event, and requests shorter than a quota report went unbilled. It is left alone when
    it is ignored (`nohup lmgate serve`), as the user asked."""

    def __init__(self) -> None:
        self.stop = trio.Event()
        self.cut = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        caught = [signal.SIGINT, signal.SIGTERM]
        if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            caught.append(signal.SIGHUP)
        with trio.open_signal_receiver(*caught) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.stop.is_set():
                    log.info("received %s: graceful shutdown (another signal ends every request at once)", name)
                    self.stop.set()
                else:
                    log.warning("received %s again: ending every request now", name)
                    self.cut.set()
                    return


def close_connections_for_sure() -> None:
    """Make Hypercorn's closing of a connection (`TCPServer._close`), and the start of an
    idle connection's keep-alive timer, shielded from cancellation. Idempotent.

    Why: an answer sent before the request's body has arrived (a 401 to a request that
    announces a 100 MB body; any early 4xx) ends with `Connection: close`, and Hypercorn
    closes the socket from inside the app's task — which Quart-Trio is cancelling at that
    moment (its request is done). The close was cancelled at its first await and the
    socket stayed open, for as long as the client liked: anyone, without a key, could
    hold every file descriptor of the process (the audit held 700 with a limit of 600,
    and /healthz stopped answering). Shielded, the close completes: the client sees EOF
    right after the error.
    """
    from hypercorn.events import Updated
    from hypercorn.trio.tcp_server import TCPServer

    if getattr(TCPServer._close, "_lmgate_shielded", False):
        return
    close = TCPServer._close
    send = TCPServer.protocol_send

    async def shielded_close(self: Any) -> None:
        with trio.CancelScope(shield=True):
            await close(self)

    async def shielded_idle(self: Any, event: Any) -> None:
        # The same cancellation: a connection that turns idle after an answer starts its
        # keep-alive timer from inside the app's task, and the start was cancelled. No timer
        # ran, so an idle kept-alive connection was never closed — not after
        # `keep_alive_seconds`, not at a shutdown (the timer is what closes idle
        # connections when the server stops): any client could hold a descriptor forever
        # after one request, and one idle pooled connection held a shutdown for its whole grace.
        if isinstance(event, Updated):
            with trio.CancelScope(shield=True):
                await send(self, event)
        else:
            await send(self, event)

    shielded_close._lmgate_shielded = True  # type: ignore[attr-defined]
    TCPServer._close = shielded_close  # type: ignore[method-assign]
    TCPServer.protocol_send = shielded_idle  # type: ignore[method-assign]
    _close_refused_websocket_upgrades()
    _close_frame_on_websocket_protocol_errors()
    _end_paused_reads_on_close()
    _drop_data_of_answered_h2_streams()
    _contain_connection_failures()
    _time_out_idle_h2c()
    _goaway_before_closing_idle_h2()
    _json_protocol_errors()


def protocol_error_body(status: int) -> bytes:
    """The OpenAI-style body of an error Hypercorn answers itself, before the app sees the
    request (HTTP it cannot parse: 400; headers over its limit: 431; a transfer coding
    other than chunked: 501; a WebSocket upgrade it refuses: 400)."""
    from http import HTTPStatus

    from gateway.errors import ApiError

    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return msgspec.json.encode(ApiError(status, f"{phrase}: the server cannot read this HTTP request",
                                        code=phrase.lower().replace(" ", "_").replace("-", "_")).body())


def _json_protocol_errors() -> None:
    """Hypercorn's own error answers (`protocol_error_body`) had empty bodies: clients read
    no OpenAI error object, only a status."""
    import h11
    from hypercorn.events import RawData
    from hypercorn.protocol.events import Body, EndBody, Response
    from hypercorn.protocol.h11 import H11Protocol
    from hypercorn.protocol.ws_stream import WSStream

    original = H11Protocol._send_error_response

    async def h11_error(self: Any, status_code: int) -> None:
        body = protocol_error_body(status_code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *self.config.response_headers("h11")]
        # the whole answer at once: the app's task may be answering the request meanwhile
        try:
            data = self.connection.send(h11.Response(status_code=status_code, headers=headers)) or b""
        except h11.LocalProtocolError:
            await original(self, status_code)
            return
        try:
            data += (self.connection.send(h11.Data(data=body)) or b"") + (self.connection.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            pass  # an answer to HEAD has no body (the connection closes after it)
        await self.send(RawData(data=data))

    ws_original = WSStream._send_error_response

    async def ws_error(self: Any, status_code: int) -> None:
        if self.scope.get("http_version") != "1.1":
            # HTTP/2: the stream's read loop waits until a body goes out, and a client that
            # opens no flow-control window would hold it (and its connection) for good
            await ws_original(self, status_code)
            return
        body = protocol_error_body(status_code)
        await self.send(Response(stream_id=self.stream_id, status_code=status_code,
                                 headers=[(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode()), (b"connection", b"close")]))
        await self.send(Body(stream_id=self.stream_id, data=body))
        await self.send(EndBody(stream_id=self.stream_id))
        await self.config.log.access(self.scope, {"status": status_code, "headers": []},
                                     time.time() - self.start_time)

    H11Protocol._send_error_response = h11_error  # type: ignore[method-assign]
    WSStream._send_error_response = ws_error  # type: ignore[method-assign]


def _close_refused_websocket_upgrades() -> None:
    """A WebSocket upgrade Hypercorn refuses itself (a bad `Sec-WebSocket-Version`, no
    `Sec-WebSocket-Key`, data before the handshake) got its 400 with `Connection: close`,
    but the stream never said it was over (`StreamClosed`), so the connection was never
    closed, nor timed out: anyone, without a key, held a descriptor per connection for good
    (an audit held 300). The stream now says so after such a refusal."""
    from hypercorn.events import Event
    from hypercorn.protocol.events import StreamClosed
    from hypercorn.protocol.ws_stream import WSStream

    handle = WSStream.handle

    async def handle_then_end(self: Any, event: Event) -> None:
        await handle(self, event)
        # `closed` set on an event other than the stream's end: one of the refusals above
        if self.closed and not isinstance(event, StreamClosed) and not getattr(self, "_lmgate_ended", False):
            self._lmgate_ended = True
            await self.send(StreamClosed(stream_id=self.stream_id))
            if self.app_put is not None:  # data before the handshake's answer: the app started, and waits
                await self.app_put({"type": "websocket.disconnect", "code": 1006})

    WSStream.handle = handle_then_end  # type: ignore[method-assign]


def _close_frame_on_websocket_protocol_errors() -> None:
    """A frame wsproto cannot accept (unmasked, reserved bits set, a control frame in
    pieces: 1002; text that is not UTF-8: 1007) ended the connection with no Close frame,
    so the client saw only EOF (1006, "abnormal closure") and never why. RFC 6455 (7.1.7)
    has the endpoint that fails the connection send a Close frame with the reason first.
    wsproto yields the failure as a `CloseConnection` while its connection is still open (a
    peer's own Close leaves it REMOTE_CLOSING, which Hypercorn answers already): that one
    is taken from Hypercorn's loop, and answered with the Close before the stream ends."""
    from hypercorn.protocol.events import StreamClosed
    from hypercorn.protocol.ws_stream import WSStream
    from wsproto.connection import ConnectionState
    from wsproto.events import CloseConnection

    handle_events = WSStream._handle_events

    async def handle_events_closing_first(self: Any) -> None:
        connection = self.connection
        events = connection.events
        failures: list[CloseConnection] = []

        def events_up_to_a_failure() -> Any:
            for event in events():
                if isinstance(event, CloseConnection) and connection.state == ConnectionState.OPEN:
                    failures.append(event)  # (wsproto's last event)
                    return
                yield event

        connection.events = events_up_to_a_failure
        try:
            await handle_events(self)
        finally:
            del connection.events
        if failures:  # Hypercorn's handling of a CloseConnection, with the Close frame sent first
            await self._send_wsproto_event(CloseConnection(code=failures[0].code, reason=failures[0].reason))
            await self.send(StreamClosed(stream_id=self.stream_id))

    WSStream._handle_events = handle_events_closing_first  # type: ignore[method-assign]


def _end_paused_reads_on_close() -> None:
    """A request with an `Upgrade` header (a client whose default headers picked up
    `Upgrade: websocket`, `curl --http2`'s `h2c` on a POST) leaves h11 PAUSED until the
    answer says whether the protocol switches, and Hypercorn's read loop waits inside its
    handler for the answer to finish. An answer whose write failed (the client reset the
    connection) never finishes: the read loop waited for good, nothing read the reset, and
    the socket was held until the process ended (an audit's soak leaked 14 in 22 minutes).
    Now the connection's end (`Closed`) ends such a paused read: its h11 connection says it
    is closed, and the waiting loop is woken to see it."""
    import h11
    from hypercorn.events import Closed
    from hypercorn.protocol.h11 import H11Protocol

    handle = H11Protocol.handle

    async def handle_ending_a_paused_read(self: Any, event: Any) -> None:
        if isinstance(event, Closed) and isinstance(self.connection, h11.Connection) \
                and not getattr(self, "_lmgate_closed", False):
            self._lmgate_closed = True
            self.connection.next_event = lambda: h11.ConnectionClosed()
            await self.can_read.set()
        await handle(self, event)

    H11Protocol.handle = handle_ending_a_paused_read  # type: ignore[method-assign]


def _drop_data_of_answered_h2_streams() -> None:
    """HTTP/2: body data for a stream already answered (a 401 or 413 sent before the body
    was read; httpx and the openai SDK go on uploading) raised KeyError in Hypercorn's
    event loop (its `StreamEnded` branch has the guard, its `DataReceived` branch not:
    pgjones/hypercorn #329), which ended the whole server: anyone, without a key, could
    stop it. Such data is now acknowledged (the connection's flow-control window stays
    open) and dropped; the client reads its answer once it has sent its body."""
    import h2.events
    from hypercorn.protocol.h2 import H2Protocol

    handle_events = H2Protocol._handle_events

    async def handle_events_of_open_streams(self: Any, events: list[Any]) -> None:
        # body data is checked as its turn comes: handling an earlier event of the same batch
        # (a body's first data) may answer and close its stream; the events between go to
        # Hypercorn together, as they came (one flush for them)
        run: list[Any] = []
        for event in events:
            if not isinstance(event, h2.events.DataReceived):
                run.append(event)
                continue
            if run:
                await handle_events(self, run)
                run = []
            if event.stream_id in self.streams:
                await handle_events(self, [event])
            else:
                # (not reset: httpx, the openai SDK's client, then fails the request instead of
                # reading its answer: it sends on into the reset stream)
                self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                await self._flush()
        if run:
            await handle_events(self, run)

    H2Protocol._handle_events = handle_events_of_open_streams  # type: ignore[method-assign]


def _contain_connection_failures() -> None:
    """An exception escaping one connection's handler (a Hypercorn bug, such as the one
    `_drop_data_of_answered_h2_streams` mends) ended `trio.serve_listeners`, and with it
    the whole server and every other client's stream. It now closes that connection alone
    (Hypercorn's own `finally` closes the socket) and is logged with its traceback."""
    from hypercorn.trio.tcp_server import TCPServer

    run = TCPServer.run

    async def run_alone(self: Any) -> None:
        try:
            await run(self)
        except Exception:  # noqa: BLE001 - one connection's failure, not the server's
            log.exception("an HTTP connection failed inside the server; closed it alone")

    TCPServer.run = run_alone  # type: ignore[method-assign]


def _time_out_idle_h2c() -> None:
    """An HTTP/1.1 connection that turns into HTTP/2 (h2c: the prior-knowledge preface, or
    `Upgrade: h2c`) stopped its idle timer on its first bytes and HTTP/2 starts it again
    only when a stream ends: one that never opens a stream (the 24-byte preface alone) was
    never closed. It now starts idle, as a new connection does."""
    from hypercorn.events import Updated
    from hypercorn.protocol import ProtocolWrapper
    from hypercorn.protocol.h2 import H2Protocol

    handle = ProtocolWrapper.handle

    async def handle_then_idle(self: Any, event: Any) -> None:
        was_h2 = isinstance(self.protocol, H2Protocol)
        await handle(self, event)
        if not was_h2 and isinstance(self.protocol, H2Protocol) and self.protocol.idle:
            await self.send(Updated(idle=True))

    ProtocolWrapper.handle = handle_then_idle  # type: ignore[method-assign]


GOAWAY_WRITE_S = 1.0  # how long an idle HTTP/2 connection's GOAWAY may take to write


def _goaway_before_closing_idle_h2() -> None:
    """An HTTP/2 connection the server closes (idle past `keep_alive_seconds`, or idle at a
    shutdown) now first sends GOAWAY with NO_ERROR and the last stream it processed (RFC
    9113 6.8), as Hypercorn already does for a busy connection at a shutdown. It closed
    the socket without one: a client that had just sent a request on it could not tell
    that it went unprocessed and may be retried."""
    from hypercorn.protocol.h2 import H2Protocol
    from hypercorn.trio.tcp_server import TCPServer

    initiate = TCPServer._initiate_server_close

    async def goaway_then_close(self: Any) -> None:
        h2 = getattr(self.protocol, "protocol", None)
        if isinstance(h2, H2Protocol) and not h2.closed:
            try:
                h2.connection.close_connection()
                data = h2.connection.data_to_send()
                # written here, within a second: Hypercorn's own send is shielded, and a peer
                # that reads nothing would hold this close (and a shutdown) for good
                with trio.move_on_after(GOAWAY_WRITE_S):
                    async with self.send_lock:
                        await self.stream.send_all(data)
            except Exception:  # noqa: BLE001 - a courtesy: the connection is closed either way
                log.debug("could not send GOAWAY before closing an HTTP/2 connection", exc_info=True)
        await initiate(self)

    TCPServer._initiate_server_close = goaway_then_close  # type: ignore[method-assign]


async def serve_app(
    app: Any,
    config: GatewayConfig,
    *,
    shutdown_trigger: Any = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns; reports the bound URLs via task_status.
    Then the app is draining (`GatewayState.draining`) while Hypercorn lets its connections
    finish for the grace period."""
    close_connections_for_sure()
    state = getattr(app, "extensions", {}).get("lmgate")

    async def trigger() -> None:
        await shutdown_trigger()
        if state is not None:
            state.draining.set()

    await hypercorn.trio.serve(
        upgrade_ignored_off_websocket_routes(app), hypercorn_config(config),
        shutdown_trigger=trigger if shutdown_trigger else None, task_status=task_status
    )


WEBSOCKET_PATHS = frozenset({"/v1/ws"})  # the app's WebSocket routes (`gateway.ws`)
_UPGRADE_HEADERS = (b"upgrade", b"connection", b"sec-websocket-")


def upgrade_ignored_off_websocket_routes(app: Any) -> Any:
    """`app`, with a WebSocket upgrade asked of a route that is not a WebSocket endpoint
    answered as the plain GET it also is (RFC 9110 7.8: a server may ignore `Upgrade`).
    Hypercorn hands such a request to the app as a WebSocket, and Quart, finding no
    WebSocket route, answered 400 "The browser (or proxy) sent a request that this server
    could not understand" (405 on a route with other methods), with no X-Request-Id and
    uncounted. Typically a client whose shared headers picked up `Upgrade: websocket`
    (httpx_ws adds its headers to the dict it is given). The route's answer goes out as
    ASGI's WebSocket denial response, streamed as it comes."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        # (HTTP/2's WebSocket is an extended CONNECT, whose 2xx would say the tunnel is open)
        if scope["type"] != "websocket" or scope["path"] in WEBSOCKET_PATHS or scope.get("http_version") != "1.1":
            await app(scope, receive, send)
            return
        http_scope = {**scope, "type": "http", "method": "GET",
                      "scheme": "https" if scope.get("scheme") == "wss" else "http",
                      "headers": [(k, v) for k, v in scope["headers"] if not k.lower().startswith(_UPGRADE_HEADERS)],
                      "extensions": {k: v for k, v in (scope.get("extensions") or {}).items()
                                     if k != "websocket.http.response"}}
        http_scope.pop("subprotocols", None)
        connected = False

        async def http_receive() -> dict[str, Any]:
            nonlocal connected
            while True:
                message = await receive()
                if message["type"] == "websocket.connect" and not connected:
                    connected = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                if message["type"] == "websocket.disconnect":
                    return {"type": "http.disconnect"}

        async def http_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                await send({"type": "websocket.http.response.start", "status": message["status"],
                            "headers": message.get("headers", [])})
            elif message["type"] == "http.response.body":
                await send({"type": "websocket.http.response.body", "body": message.get("body", b""),
                            "more_body": message.get("more_body", False)})

        await app(http_scope, http_receive, http_send)

    return asgi


@asynccontextmanager
async def open_gateway_runtime(config: GatewayConfig, stores: GatewayStores) -> AsyncIterator[Runtime]:
    """The real runtime (engine + actors) wired to the same Redis as the gateway:
    quotas, response cache and prompt cache."""
    from actors.runtime import open_runtime
    from cache.prompt_cache import PromptCache
    from cache.response_cache import ResponseCache
    from gateway.config import runtime_config

    async with open_runtime(
        runtime_config(config),
        quotas=stores.quotas,
        response_cache=ResponseCache(stores.redis),
        prompt_cache=PromptCache(stores.redis),
        store=stores.redis,
    ) as runtime:
        yield runtime


RuntimeFactory = Callable[[GatewayConfig, GatewayStores], AbstractAsyncContextManager[Runtime]]


async def serve(
    config: GatewayConfig,
    *,
    runtime_factory: RuntimeFactory = open_gateway_runtime,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    cut_trigger: Callable[[], Awaitable[None]] | None = None,
    out: TextIO | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Everything `lmgate serve` runs inside trio (see module docstring).

    `shutdown_trigger` returns to start the graceful stop, `cut_trigger` (after it) to cut
    its grace short; without them, the first and the second SIGINT or SIGTERM
    (`StopSignals`). They and `runtime_factory` are parameters so tests can run the whole
    start-up/shutdown path with a stand-in runtime and events.
    """
    out = out or sys.stdout
    log.info("settings other than their defaults: %s", non_default_settings(config))
    for warning in start_warnings(config):
        log.warning("%s", warning)
    # a secret made at this start cannot be the one a Redis's existing keys were issued under
    secret, generated = read_server_secret(config.data_dir)
    config_private: PrivateRedis | None = None
    async with AsyncExitStack() as stack:
        try:
            if config.redis_url is None:
                # persistent: the tenants, keys and usage outlive a restart (an append-only file
                # in the data dir); a minute to read a large one back
                private = config_private = PrivateRedis(Path(config.data_dir) / "redis", persistent=True,
                                                        startup_timeout_s=60.0,
                                                        maxmemory_mb=config.private_redis_maxmemory_mb)
                stack.enter_context(private)
                config = dataclasses.replace(config, redis_url=private.url)
                print(f"lmgate: started a private redis-server at {private.url}", file=out, flush=True)
            stores = await stack.enter_async_context(open_stores(config.redis_url or "", secret))
            # SecretMismatch stops a gateway whose secret differs from the one the keys were
            # issued under; so does an unreachable Redis (CacheUnavailable), as the secret is
            # checked here only. A Redis that answers but refuses to record a first fingerprint
            # (out of memory, read-only) is served as the docs' "When Redis is down" says: with
            # a warning.
            try:
                await stores.tenants.check_secret(generated=generated)
            except CacheUnavailable:
                if stores.redis.unreachable_at is not None:
                    raise
                log.warning("Redis refuses writes: could not record the server secret's fingerprint (%s)",
                            stores.redis.last_error or stores.redis.last_denial)
        except BaseException:
            # a secret made at this start and not taken by Redis (refused, Redis not there yet,
            # stopped) is not kept: the next start would take it as given
            if generated:
                (Path(config.data_dir) / SECRET_FILE).unlink(missing_ok=True)
            raise
        # (after the secret is kept: a Redis that refuses INFO, an ACL without @dangerous, is
        # only not warned about)
        with contextlib.suppress(CacheUnavailable, coredis.exceptions.RedisError):
            if (warning := eviction_warning(await stores.redis.eviction_policy())) is not None:
                log.warning("%s", warning)
        if config.dev_tenant:
            key = await ensure_dev_tenant(stores.tenants)
            if key is not None:
                print(f"lmgate: created tenant {DEV_TENANT_ID!r}; its API key (shown once): {key}", file=out, flush=True)
            else:
                print(f"lmgate: tenant {DEV_TENANT_ID!r} exists: use the key printed when it was created (the "
                      "admin API issues more)", file=out, flush=True)
        stores.redis.serving = True  # (from now on an outage is served through: before, it stopped the start)
        runtime = await stack.enter_async_context(runtime_factory(config, stores))
        app = create_app(runtime, stores, config)
        signals = StopSignals() if shutdown_trigger is None else None
        if signals is not None:
            shutdown_trigger, cut_trigger = signals.stop.wait, signals.cut.wait
        triggered, cut = trio.Event(), trio.Event()

        async def trigger() -> None:
            await shutdown_trigger()
            triggered.set()
            shed = getattr(runtime, "shed_for_shutdown", None)
            if shed is not None and (n := shed(config.shutdown_grace_seconds)):
                log.info("shutdown: %d queued requests would not start in time: refused now (503, retry)", n)

        async def on_cut() -> None:
            await triggered.wait()
            await cut_trigger()
            cut.set()

        def end_streams(why: str) -> None:
            end = getattr(runtime, "end_streams", None)
            ended = end("server shutting down") if end is not None else 0
            if ended:
                log.info("shutdown: ended %d requests still running %s", ended, why)

        async def end_streams_before_the_cut(serving: trio.CancelScope) -> None:
            # Hypercorn cancels what is still open when the grace period ends, which cuts a
            # stream mid-way; just before that (or at once, on a second signal), the runtime
            # ends each with an error event
            await triggered.wait()
            with trio.move_on_after(shutdown_schedule(config.shutdown_grace_seconds)[0]):
                await cut.wait()
            if not cut.is_set():
                end_streams("at the end of the grace period")
                await cut.wait()  # (returns only on a second signal: else Hypercorn returns first)
            end_streams("on a second signal")
            await trio.sleep(END_STREAMS_FLUSH_S)
            serving.cancel()

        async with trio.open_nursery() as nursery:
            if signals is not None:
                await nursery.start(signals.run)
            if cut_trigger is not None:
                nursery.start_soon(on_cut)
            if config_private is not None:
                nursery.start_soon(watch_private_redis, config_private)
            nursery.start_soon(stores.tenants.watch_for_lost_data)
            nursery.start_soon(forget_deleted_tenants, app.extensions["lmgate"])
            nursery.start_soon(report_dropped_failures)
            # what start-up loaded (the model's modules, tokenizers, the predictor and the
            # embedder: millions of objects) is moved out of the collector's generations: a full
            # collection scans only what came after (during large logprob requests, full
            # collections held the event loop 270-380 ms each, an audit measured)
            gc.collect()
            gc.freeze()
            try:
                with trio.CancelScope() as serving:
                    nursery.start_soon(end_streams_before_the_cut, serving)
                    await serve_app(app, config, shutdown_trigger=trigger, task_status=task_status)
            finally:
                gc.unfreeze()  # (collectable again once served: a process may serve again, tests do)
            nursery.cancel_scope.cancel()


async def watch_private_redis(private: PrivateRedis, interval_s: float = 2.0, max_backoff_s: float = 60.0) -> None:
    """Restart the private redis-server when it exits (and reap it), on the same port, after
    1, 2, 4, ... up to `max_backoff_s` seconds while it fails to start. It reads its
    append-only file back: tenants, keys and usage are there again, up to about the last
    second of writes (settles owed meanwhile are retried). Until then the gateway serves
    degraded, as in any Redis outage (recently seen keys, quotas fail-open; /readyz says
    `redis_unavailable`)."""
    while True:
        while private.running:  # (polling the process also reaps it once it has exited)
            await trio.sleep(interval_s)
        log.error("the private redis-server has exited (its log: %s); serving degraded, restarting it",
                  private.log_path)
        backoff = 1.0
        while not private.running:
            await trio.sleep(backoff)
            try:
                private.stop()  # (unlocks its data dir: start() takes it again)
                await trio.to_thread.run_sync(private.start)
            except RedisServerError as e:
                log.error("the private redis-server did not start again (%s); next try in %.0f s",
                          e, min(backoff * 2, max_backoff_s))
                backoff = min(backoff * 2, max_backoff_s)
        log.warning("the private redis-server runs again at %s", private.url)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lmgate serve`: one per GatewayConfig field (--log-level too), plus --config."""
    add_config_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        logging.basicConfig(level=parse_log_level(config.log_level), format=LOG_FORMAT)
        problem = device_unavailable(config.device)
        if problem is not None:
            raise ConfigError(problem)
    except ConfigError as e:
        print(f"lmgate serve: {e}", file=sys.stderr)
        return 2
    trio.run(serve, config)  # (a KeyboardInterrupt: `gateway.cli.main` says so, and exits 130)
    return 0
