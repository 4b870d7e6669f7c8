"""/healthz, /readyz (incl. Redis down → degraded), /metrics, /openapi.json."""

from __future__ import annotations

import httpx
import trio

from cache.redis_server import PrivateRedis
from tests.gateway.conftest import MODEL, Gateway


async def test_healthz_and_readyz(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["degraded"] == []
        gateway.runtime.ready = False
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_ready"


async def test_readyz_degraded_when_redis_is_down(gateway: Gateway, redis_server: PrivateRedis) -> None:
    redis_server.stop()
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
            r = await client.get("/readyz")
            assert r.status_code == 200
            assert "redis_unavailable" in r.json()["degraded"]
            # auth cannot be checked: a 503 with Retry-After, not a 500
            r = await client.get("/v1/models")
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


async def test_openapi_describes_public_and_admin_apis(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/admin/tenants", "/admin/tenants/{tenant_id}/usage"):
        assert path in doc["paths"]
    schemas = doc["components"]["schemas"]
    assert "max_completion_tokens" in schemas["ChatRequest"]["properties"]
    assert "prompt" in schemas["CompletionRequest"]["required"]
    assert "requests_per_minute" in schemas["Quota"]["properties"]
