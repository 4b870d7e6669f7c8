"""CORS: web pages of allowed origins may call the public API (preflight and answers carry
the headers browsers check); the admin API never answers cross-origin."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import trio

from gateway.config import ConfigError, GatewayConfig
from gateway.cors import CorsConfigError, CorsPolicy
from tests.gateway.conftest import MODEL, Gateway, start_gateway

PAGE = "https://app.example.com"


def test_policy_parsing() -> None:
    assert CorsPolicy.parse("*").origins == ("*",)
    assert CorsPolicy.parse("").origins == ()
    assert CorsPolicy.parse(f" {PAGE}/, http://localhost:3000").origins == (PAGE, "http://localhost:3000")
    # as browsers send an origin: lower case, no default port (else it silently never matched)
    shouty = CorsPolicy.parse("HTTPS://App.Example.com:443, http://b.example:80, https://c.example:4430, "
                              "https://app.example.com, http://[::1]:8080")
    assert shouty.origins == ("https://app.example.com", "http://b.example", "https://c.example:4430",
                              "http://[::1]:8080")
    assert shouty.allows("https://app.example.com") and shouty.allows("http://b.example")
    for bad in ("app.example.com", "*, https://a.b", "ftp://x", "https://a.b/path"):
        with pytest.raises(CorsConfigError):
            CorsPolicy.parse(bad)
    with pytest.raises(ConfigError, match="allowed_origins"):
        GatewayConfig(allowed_origins="example.com")


def test_headers() -> None:
    any_origin, listed, off = CorsPolicy.parse("*"), CorsPolicy.parse(PAGE), CorsPolicy.parse("")
    assert any_origin.headers("/v1/models", None, None, False) == {}  # not a cross-origin request
    assert off.headers("/v1/models", PAGE, None, False) == {}
    assert listed.headers("/v1/models", "https://evil.example", None, False) == {"Vary": "Origin"}
    assert listed.headers("/v1/models", None, None, False) == {"Vary": "Origin"}
    assert any_origin.headers("/admin/tenants", PAGE, None, True) == {}
    assert any_origin.headers("/metrics", PAGE, None, False) == {}  # the operator's: it names every tenant
    assert any_origin.headers("/readyz", PAGE, None, False)["Access-Control-Allow-Origin"] == "*"
    h = listed.headers("/v1/chat/completions", PAGE, "authorization, content-type", True)
    assert h["Access-Control-Allow-Origin"] == PAGE and h["Vary"] == "Origin"
    assert h["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "POST" in h["Access-Control-Allow-Methods"] and "Access-Control-Allow-Credentials" not in h


async def test_a_page_preflights_then_calls(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        pre = await client.options("/v1/chat/completions", headers={
            "Origin": PAGE, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "*"
        assert pre.headers["access-control-allow-headers"] == "authorization, content-type"
        assert "POST" in pre.headers["access-control-allow-methods"]
        r = await client.post("/v1/chat/completions", headers={**gateway.headers, "Origin": PAGE}, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert r.headers["access-control-expose-headers"].startswith(
            "Retry-After, X-Request-Id, x-should-retry, x-ratelimit-limit-requests")
        bad = await client.post("/v1/chat/completions", headers={"Origin": PAGE}, json={})
        assert bad.status_code == 401 and bad.headers["access-control-allow-origin"] == "*"  # errors are readable
        admin = await client.options("/admin/tenants", headers={"Origin": PAGE, "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in admin.headers
        metrics = await client.get("/metrics", headers={"Origin": PAGE})
        assert metrics.status_code == 200 and "access-control-allow-origin" not in metrics.headers
        plain = await client.get("/v1/models", headers=gateway.headers)  # no Origin: no CORS headers
        assert "access-control-allow-origin" not in plain.headers


async def test_listed_origins_only(gateway: Gateway, nursery: trio.Nursery) -> None:
    config = dataclasses.replace(gateway.config, allowed_origins=PAGE)
    url, _, stop = await start_gateway(nursery, gateway.stores, config)
    async with httpx.AsyncClient(base_url=url, headers=gateway.headers) as client:
        ok = await client.get("/v1/models", headers={"Origin": PAGE})
        assert ok.headers["access-control-allow-origin"] == PAGE and ok.headers["vary"] == "Origin"
        other = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
        assert other.headers["vary"] == "Origin"  # (a shared cache keys on the origin)
    stop.set()
