"""/healthz, /readyz (incl. Redis down → degraded), /metrics, /openapi.json."""

from __future__ import annotations

import logging
import os
import re
import signal

import httpx
import pytest
import trio

from cache.redis_server import PrivateRedis
from gateway import errors
from tests.gateway.conftest import MODEL, FakeRuntime, Gateway, start_gateway


async def wait_for(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_healthz_and_readyz(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["degraded"] == []
        redis, tenants = gateway.stores.redis, gateway.stores.tenants
        redis.memory_used, redis.memory_max, tenants.lost_data = 95, 100, True  # (as `check_memory`, the watch read)
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["degraded"] == ["redis_lost_data", "redis_near_maxmemory"]
        redis.memory_used, redis.memory_max, tenants.lost_data = 0, 0, False
        gateway.runtime.ready = False
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_ready"


async def test_readyz_degraded_when_redis_is_down(gateway: Gateway, redis_server: PrivateRedis) -> None:
    _, unseen_key = await gateway.stores.tenants.create_key("t1", "never used")
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        assert (await client.get("/v1/models")).status_code == 200  # remembered as a recent key
    redis_server.stop()
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
            r = await client.get("/readyz")
            assert r.status_code == 200
            assert "redis_unavailable" in r.json()["degraded"]
            # a key that authenticated recently keeps working while Redis is down
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
            assert r.status_code == 200
            # a key never seen cannot be checked: a 503 with Retry-After, not a 401 or 500
            r = await client.get("/v1/models", headers={"Authorization": f"Bearer {unseen_key}"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        await trio.to_thread.run_sync(redis_server.start)


async def test_metrics_count_requests_by_route_status_tenant(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        text = (await client.get("/metrics")).text
    assert 'lmgate_http_requests_total{method="POST",route="/v1/completions",status="200",tenant="t1"} 1.0' in text
    assert 'lmgate_http_requests_total{method="POST",route="/v1/completions",status="404",tenant="t1"} 1.0' in text
    assert "lmgate_http_request_duration_seconds_bucket" in text


async def test_a_scrape_is_formatted_off_the_event_loop_and_gzipped_when_asked(gateway: Gateway) -> None:
    """Formatting a scrape takes ~1 s per 1,000 tenants that sent requests: on the event
    loop it stalled every stream and request for as long. Formatted in a worker thread,
    the gateway answers meanwhile; and the body is gzipped for a scraper that asks
    (Prometheus does: 7 MB of text per 1,000 tenants)."""
    import threading

    metrics = gateway.runtime.metrics
    render, started, release = metrics.render, threading.Event(), threading.Event()

    def slow_render(compress: bool) -> bytes:
        started.set()
        release.wait(10)
        return render(compress)

    metrics.render = slow_render
    scraped: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=gateway.base_url) as client, trio.open_nursery() as nursery:

        async def scrape() -> None:
            scraped.append(await client.get("/metrics", headers={"Accept-Encoding": "gzip"}))

        nursery.start_soon(scrape)
        await trio.to_thread.run_sync(started.wait, 10)
        with trio.fail_after(5):
            assert (await client.get("/healthz")).status_code == 200  # while the scrape is formatted
        release.set()
    [r] = scraped
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert "lmgate_http_requests_total" in r.text  # (httpx unzips it)
    metrics.render = render
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        for refused in ("identity", "gzip;q=0", "identity, gzip;q=0"):
            r = await client.get("/metrics", headers={"Accept-Encoding": refused})
            assert "content-encoding" not in r.headers and "lmgate_http_requests_total" in r.text, refused
            assert r.headers["vary"] == "Accept-Encoding"


async def test_scrapes_that_wait_for_one_being_formatted_share_the_next(gateway: Gateway) -> None:
    """Scrapes are formatted one at a time (each is seconds of a thread at thousands of
    tenants: 45 at once stalled the event loop for 5.7 s), and those that came while one
    was formatted share one formatted after it."""
    import threading

    metrics = gateway.runtime.metrics
    render, calls, release = metrics.render, [], threading.Event()

    def counted(compress: bool) -> bytes:
        calls.append(compress)
        release.wait(10)
        return render(compress)

    metrics.render = counted
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url) as client, trio.open_nursery() as nursery:
            bodies: list[str] = []

            async def scrape() -> None:
                bodies.append((await client.get("/metrics", headers={"Accept-Encoding": "gzip"})).text)

            nursery.start_soon(scrape)
            await wait_for(lambda: len(calls) == 1)
            for _ in range(5):
                nursery.start_soon(scrape)
            await trio.sleep(0.2)
            assert len(calls) == 1  # one at a time
            release.set()
        assert len(calls) == 2 and len(bodies) == 6 and all("lmgate_" in b for b in bodies)
    finally:
        metrics.render = render


def test_accept_encoding_is_read_with_its_q_values() -> None:
    from gateway.app import accepts_gzip

    assert accepts_gzip("gzip") and accepts_gzip("br, GZIP;q=0.5") and accepts_gzip("*")
    assert not accepts_gzip(None) and not accepts_gzip("identity") and not accepts_gzip("gzip;q=0")
    assert not accepts_gzip("gzip;q=bogus") and not accepts_gzip("x-gzip")
    assert not accepts_gzip("*, gzip;q=0") and accepts_gzip("gzip, *;q=0")  # (the named one rules)


async def test_metrics_may_ask_for_a_key(nursery: trio.Nursery, stores, gateway_config) -> None:  # type: ignore[no-untyped-def]
    """With `metrics_key` set, /metrics answers only that key or the admin key: it names
    every tenant and its counts."""
    import dataclasses

    config = dataclasses.replace(gateway_config, metrics_key="scrape-me")
    base_url, _, stop = await start_gateway(nursery, stores, config)
    async with httpx.AsyncClient(base_url=base_url) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = await client.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for key in ("scrape-me", config.admin_key):
            r = await client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and "lmgate_http_requests_total" in r.text
    stop.set()


async def test_openapi_describes_public_and_admin_apis(gateway: Gateway, nursery: trio.Nursery) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/responses/{response_id}",
                 "/v1/responses/{response_id}/cancel",
                 "/v1/models", "/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank", "/admin/tenants",
                 "/admin/tenants/{tenant_id}/usage"):
        assert path in doc["paths"]
    # every route the app serves is described, with each of its methods
    from gateway.app import create_app

    app = create_app(FakeRuntime(nursery), gateway.stores, gateway.config)
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        methods = {m.lower() for m in rule.methods or ()} - {"head", "options"}
        if rule.websocket:
            methods = {"get"}
        assert path in doc["paths"], path
        assert methods <= set(doc["paths"][path]), (path, methods)
    admin_ops = [op for path, item in doc["paths"].items() if path.startswith("/admin") for op in item.values()]
    assert all("401" not in op["responses"] and "403" in op["responses"] for op in admin_ops)  # never a 401
    schemas = doc["components"]["schemas"]
    assert "max_completion_tokens" in schemas["ChatRequest"]["properties"]
    assert "prompt" in schemas["CompletionRequest"]["required"]
    assert schemas["CompletionRequest"]["properties"]["max_tokens"]["default"] == 16
    assert "prompt_logprobs" in schemas["ChatRequest"]["properties"]
    assert "previous_response_id" in schemas["ResponsesRequest"]["properties"]
    assert "requests_per_minute" in schemas["Quota"]["properties"]
    assert schemas["RerankRequest"]["required"] == ["query", "documents"]
    assert "text_1" in schemas["ScoreRequest"]["properties"]
    # what routes answer: every body may be too large (413) or in an unknown coding (415)
    with_body = [op for item in doc["paths"].values() for op in item.values() if "requestBody" in op]
    assert len(with_body) > 15 and all({"413", "415"} <= set(op["responses"]) for op in with_body)
    assert {"429", "501"} <= set(doc["paths"]["/tokenize"]["post"]["responses"])
    create = doc["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schemas[create["$ref"].rsplit("/", 1)[1]]["allOf"][1] == {"required": ["model"]}


def test_recent_keys_expire_and_are_bounded() -> None:
    from cache.tenants import Tenant
    from gateway.app import RecentKeys

    keys = RecentKeys(max_age_s=10, max_entries=2)
    t = Tenant(id="t", name="t")
    keys.put("a", t, now=0)
    assert keys.get("a", now=10) == t
    assert keys.get("a", now=10.1) is None
    keys.put("b", t, now=1)
    keys.put("c", t, now=2)
    assert keys.get("a", now=3) is None  # evicted: oldest of three
    keys.forget("b")
    assert keys.get("b", now=3) is None and keys.get("c", now=3) == t
    keys.put("d", t, now=5, expires_in=2)  # a key that expires is not remembered past it
    assert keys.get("d", now=6.9) == t and keys.get("d", now=7) is None


def test_rate_limit_headers_in_openais_form() -> None:
    from cache.quotas import RateLimits
    from gateway.app import rate_limit_headers

    assert rate_limit_headers(RateLimits()) == {}
    headers = rate_limit_headers(RateLimits(60, 59, 0.02, 1000, 250, 371.5))
    assert headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "20ms", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "250", "x-ratelimit-reset-tokens": "6m11.5s"}
    assert rate_limit_headers(RateLimits(limit_tokens=9, remaining_tokens=0, reset_tokens_s=1.0)) == {
        "x-ratelimit-limit-tokens": "9", "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1s"}


async def test_every_answer_carries_a_request_id(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        mine = await client.get("/v1/models", headers={"X-Request-Id": "trace-42/a:b"})
        assert mine.headers["x-request-id"] == "trace-42/a:b"  # a caller's (a proxy's, a tracer's) id follows
        fresh = [await client.get("/v1/models"), await client.get("/nope"),
                 await client.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces"})]
        ids = [r.headers["x-request-id"] for r in fresh]
        assert all(i.startswith("req_") for i in ids) and len(set(ids)) == 3


async def test_a_failed_request_is_logged_once_under_its_request_id(gateway: Gateway, caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The docs promise the server's log of a failure names the request id a caller quotes;
    only unexpected 500s were logged, so a refused request could not be found in the log.
    One line each, with status, code, param and tenant; never the message (it may echo the
    request) nor a line break a path smuggled in."""
    monkeypatch.setattr(errors, "_failure_lines", errors._FailureLines())  # (earlier tests' lines: another budget)
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        with caplog.at_level(logging.INFO, logger="lmgate.gateway"):
            r = await client.post("/v1/chat/completions", headers={"X-Request-Id": "mine-1"},
                                  json={"model": MODEL, "messages": [{"role": "SECRETROLE", "content": "hi"}]})
            assert r.status_code == 400, r.text
            r = await client.get("/v1/nope%0Aforged", headers={"X-Request-Id": "mine-2"})
            assert r.status_code == 404
            assert (await client.get("/v1/models", headers={"Authorization": "Bearer lmg-wrong"})).status_code == 401
            assert (await client.get("/v1/models")).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "lmgate.gateway" and r.getMessage().startswith(
        "request ")]
    assert lines[:2] == ["request mine-1 POST /v1/chat/completions: 400 invalid_value param messages (tenant t1)",
                         "request mine-2 GET /v1/nope\\x0aforged: 404 not_found (tenant -)"]
    assert re.fullmatch(r"request req_\w+ GET /v1/models: 401 invalid_api_key \(tenant -\)", lines[2])
    assert len(lines) == 3 and "SECRETROLE" not in caplog.text


async def test_a_hung_redis_costs_one_request_its_timeouts_not_every_request(gateway: Gateway,
                                                                           redis_server: PrivateRedis) -> None:
    """A Redis that stops answering (not refusing: a partition, a stalled host): the first
    request waits out the key lookup's timeouts and is served from the recently seen keys;
    for the next second the lookups go there at once."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers, timeout=30) as client:
        assert (await client.post("/v1/completions", json=body)).status_code == 200  # the key is seen
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            started = trio.current_time()
            assert (await client.post("/v1/completions", json=body)).status_code == 200
            first = trio.current_time() - started
            started = trio.current_time()
            for _ in range(3):
                assert (await client.post("/v1/completions", json=body)).status_code == 200
            three = trio.current_time() - started
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
    assert first >= 0.9  # (the store's timeout: 1 s)
    assert three < first / 3, (first, three)


async def test_readyz_answers_at_once_while_a_stalled_redis_is_watched(gateway: Gateway,
                                                                      redis_server: PrivateRedis) -> None:
    """Once the store's watcher knows Redis is down, /readyz says so without asking it: a
    stalled Redis held every probe 2 s (a ping's timeouts), past Kubernetes' default probe
    timeout of 1 s, so every replica sharing the Redis would have left its Service at once."""
    store = gateway.stores.redis
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client, trio.open_nursery() as nursery:
        await nursery.start(store.watch)  # (as `lmgate serve` runs it)
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            assert "redis_unavailable" in (await client.get("/readyz")).json()["degraded"]  # (finds it out)
            started = trio.current_time()
            for _ in range(3):
                r = await client.get("/readyz")
                assert r.status_code == 200 and "redis_unavailable" in r.json()["degraded"]
            assert trio.current_time() - started < 0.9
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        with trio.fail_after(10):  # the watcher finds it back
            while "redis_unavailable" in (await client.get("/readyz")).json()["degraded"]:
                await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
