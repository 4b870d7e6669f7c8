"""PrivateRedis: a real redis-server child on a free loopback port."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cache.redis_server import PrivateRedis, RedisServerError, _send_command, find_redis_server


def test_starts_on_free_port_answers_ping_and_stops(tmp_path):
    server = PrivateRedis(tmp_path)
    with pytest.raises(RedisServerError):
        _ = server.url  # not started: no port yet
    with server:
        assert server.port not in (0, 6379)
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.running and server.ping()
    assert not server.running
    assert not server.ping()


def test_restart_keeps_the_port_and_starts_empty(tmp_path):
    with PrivateRedis(tmp_path) as server:
        port = server.port
        assert _send_command(server.host, server.port, "SET", "k", "v") == b"+OK"
        server.stop()
        assert not server.ping()
        server.start()
        assert server.port == port and server.ping()
        assert _send_command(server.host, server.port, "GET", "k") == b"$-1"  # nothing kept


def test_a_persistent_server_keeps_its_data_across_a_restart(tmp_path):
    """`lmgate serve`'s private Redis (persistent): what was written is there after a stop
    and a start, even a SIGKILL's worth of it once a second has passed (appendfsync
    everysec); the throw-away one (the test fixtures') starts empty."""
    for persistent, after in ((True, b"$1"), (False, b"$-1")):
        with PrivateRedis(tmp_path / str(persistent), persistent=persistent) as server:
            assert _send_command(server.host, server.port, "SET", "k", "v") == b"+OK"
            server.stop()
            server.start()
            assert _send_command(server.host, server.port, "GET", "k").split(b"\r\n")[0] == after
    for path in [tmp_path / "True", *(tmp_path / "True").rglob("*")]:  # prompts and answers: the owner's alone
        assert path.stat().st_mode & 0o077 == 0, path
    with PrivateRedis(tmp_path / "killed", persistent=True) as server:
        assert _send_command(server.host, server.port, "SET", "k", "v") == b"+OK"
        time.sleep(1.5)
        os.kill(server.pid, signal.SIGKILL)
        server.stop()
        server.start()
        assert _send_command(server.host, server.port, "GET", "k").split(b"\r\n")[0] == b"$1"


def test_pinned_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(RedisServerError, match="exited during startup"):
            PrivateRedis(tmp_path, port=port, startup_timeout_s=5).start()


def test_missing_binary_is_a_clear_error(tmp_path):
    with pytest.raises(RedisServerError, match="could not execute"):
        PrivateRedis(tmp_path, binary=str(tmp_path / "no-such-redis-server")).start()


# --- the private redis-server never outlives its owner -----------------------

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux-only"
)
REPO_ROOT = Path(__file__).resolve().parents[2]

_OWNER_SCRIPT = """
import sys, threading, time
from cache.redis_server import PrivateRedis

server = PrivateRedis(sys.argv[1])
if sys.argv[2] == "worker-thread":
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join()  # the thread that called start() is gone before we are killed
else:
    server.start()
print(server.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _kill_if_redis_for(pid: int, data_dir: Path) -> None:
    """Test cleanup: stop a leaked server, but only the one this test started."""
    with contextlib.suppress(OSError):
        if _alive(pid) and os.readlink(f"/proc/{pid}/cwd") == str(data_dir.resolve()):
            os.kill(pid, signal.SIGKILL)


def _start_raw_redis(data_dir: Path, *, pidfile: bool) -> subprocess.Popen[bytes]:
    """A redis-server as an earlier run would have left it: serving from
    `data_dir`, in its own session, owned by nobody who will stop it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(data_dir.resolve()), "--daemonize", "no"]
    if pidfile:
        argv += ["--pidfile", str(data_dir.resolve() / "redis-server.pid")]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 10
    while not PrivateRedis(data_dir, port=port).ping():
        assert process.poll() is None and time.monotonic() < deadline, "raw redis-server did not start"
        time.sleep(0.01)
    if pidfile:
        (data_dir / "redis-server.pid").write_text(f"{process.pid}\n")
    return process


@linux_only
@pytest.mark.parametrize("starter", ["main-thread", "worker-thread"])
def test_server_dies_when_its_owner_is_sigkilled(tmp_path, starter):
    data_dir = tmp_path / "redis"
    owner = subprocess.Popen([sys.executable, "-c", _OWNER_SCRIPT, str(data_dir), starter],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE)
    redis_pid = 0
    try:
        assert owner.stdout is not None
        redis_pid = int(owner.stdout.readline())
        assert _alive(redis_pid)
        owner.kill()
        owner.wait(timeout=10)
        assert _gone_within(redis_pid, 5), "redis-server outlived its SIGKILLed owner"
    finally:
        owner.kill()
        owner.wait(timeout=10)
        if redis_pid:
            _kill_if_redis_for(redis_pid, data_dir)


@linux_only
def test_server_started_from_a_worker_thread_outlives_that_thread(tmp_path):
    # PR_SET_PDEATHSIG fires when the forking *thread* exits: the fork must not
    # happen on the short-lived thread that called start().
    server = PrivateRedis(tmp_path)
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join()
    try:
        time.sleep(0.5)
        assert server.running and server.ping()
    finally:
        server.stop()


@linux_only
def test_stale_servers_for_the_data_dir_are_reaped_and_others_left_alone(tmp_path):
    data_dir, other_dir = tmp_path / "redis", tmp_path / "other"
    forgotten = PrivateRedis(data_dir).start()  # an owner that vanished without stop()
    forgotten_pid = forgotten.pid
    assert forgotten_pid is not None
    del forgotten  # nobody will stop() it now ...
    gc.collect()  # ... and its data-dir lock goes with it, as when its process dies
    started: list[subprocess.Popen[bytes]] = []
    try:
        assert (data_dir / "redis-server.pid").read_text().strip() == str(forgotten_pid)
        orphan = _start_raw_redis(data_dir, pidfile=False)  # left by a version without pidfiles
        started.append(orphan)
        other = _start_raw_redis(other_dir, pidfile=True)
        started.append(other)
        with PrivateRedis(data_dir) as server:
            assert _gone_within(forgotten_pid, 1)
            orphan.wait(timeout=1)  # already terminated: start() waited for it
            assert other.poll() is None and _alive(other.pid)
            assert (data_dir / "redis-server.pid").read_text().strip() == str(server.pid)
        assert not (data_dir / "redis-server.pid").exists()
    finally:
        _kill_if_redis_for(forgotten_pid, data_dir)
        for process in started:
            process.kill()
            process.wait(timeout=10)


@linux_only
def test_pidfile_naming_another_process_is_not_trusted(tmp_path):
    data_dir = tmp_path / "redis"
    other = _start_raw_redis(tmp_path / "other", pidfile=False)  # a redis-server, another dir
    sleeper = subprocess.Popen(["sleep", "60"])  # not a redis-server at all
    try:
        for victim in (other, sleeper):
            data_dir.mkdir(exist_ok=True)
            (data_dir / "redis-server.pid").write_text(f"{victim.pid}\n")
            with PrivateRedis(data_dir) as server:
                assert server.ping()
            assert victim.poll() is None and _alive(victim.pid)
    finally:
        for process in (other, sleeper):
            process.kill()
            process.wait(timeout=10)


@linux_only
def test_a_second_live_server_for_the_same_data_dir_is_refused(tmp_path):
    with PrivateRedis(tmp_path) as first:
        second = PrivateRedis(tmp_path)
        try:
            with pytest.raises(RedisServerError, match="in use by another running private redis-server"):
                second.start()
        finally:
            second.stop()
        assert first.running and first.ping()
    with PrivateRedis(tmp_path) as again:  # stop() released the directory
        assert again.ping()


def test_a_server_that_reads_back_more_than_its_cap_is_given_room_for_this_run(tmp_path, caplog):
    """A data dir holding more than 90% of `maxmemory_mb` (an earlier version set no cap):
    started with the cap, Redis would refuse every write the quotas need (a review); its
    maxmemory is raised for the run so that it holds 80%, said in the log. Under the cap,
    it stays as given (noeviction)."""
    import logging

    from cache.redis_server import _used_memory

    with PrivateRedis(tmp_path, persistent=True) as server:
        for i in range(40):
            assert _send_command(server.host, server.port, "SET", f"k{i}", "x" * 100_000) == b"+OK"
    with caplog.at_level(logging.WARNING, logger="lmgate.cache"), PrivateRedis(tmp_path, persistent=True,
                                                                               maxmemory_mb=2) as server:
        cap = int(_send_command(server.host, server.port, "CONFIG", "GET", "maxmemory", timeout=2.0)
                  .split(b"\r\n")[-1])
        used = _used_memory(server.host, server.port)
        assert 0.75 < used / cap < 0.85 and "raised to" in caplog.text
        assert _send_command(server.host, server.port, "SET", "more", "v") == b"+OK"
    with PrivateRedis(tmp_path / "small", maxmemory_mb=64) as server:
        reply = _send_command(server.host, server.port, "CONFIG", "GET", "maxmemory", timeout=2.0)
        assert reply.split(b"\r\n")[-1] == str(64 << 20).encode()
