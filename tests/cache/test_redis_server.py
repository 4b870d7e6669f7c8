"""PrivateRedis: a real redis-server child on a free loopback port."""

from __future__ import annotations

import socket

import pytest

from cache.redis_server import PrivateRedis, RedisServerError


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
        server.stop()
        assert not server.ping()
        server.start()
        assert server.port == port and server.ping()


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
