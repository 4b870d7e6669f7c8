"""Admin API over real sockets and a real Redis: auth, tenants CRUD, keys, quotas, usage."""

from __future__ import annotations

import datetime as dt
import gzip
import time
from typing import Any

import httpx
import pytest
import trio

from cache.quotas import Admitted, Denied, Quota
from gateway.app import MAX_PREDICTOR_BYTES
from tests.gateway.conftest import ADMIN_KEY, MODEL, Gateway

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_KEY}"}],
    ids=["missing", "wrong", "scheme"],
)
async def test_admin_requires_the_admin_key(gateway: Gateway, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=headers) as client:
        for method, path in [("GET", "/admin/tenants"), ("POST", "/admin/tenants"), ("DELETE", "/admin/keys/x")]:
            r = await client.request(method, path, json={"id": "x", "name": "x"})
            assert r.status_code == 403, (method, path)
            assert r.json()["error"]["type"] == "permission_error"


async def test_tenant_key_is_not_an_admin_key(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        assert (await client.get("/admin/tenants")).status_code == 403


async def test_tenant_lifecycle(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as client:
        r = await client.post("/admin/tenants", json={"id": "acme", "name": "Acme", "priority": 2})
        assert r.status_code == 201, r.text
        assert (r.json()["id"], r.json()["priority"]) == ("acme", 2)
        assert (await client.post("/admin/tenants", json={"id": "acme", "name": "again"})).status_code == 409
        for bad in ("bad id!", "", "x" * 65, "ténant"):
            r = await client.post("/admin/tenants", json={"id": bad, "name": "x"})
            assert (r.status_code, r.json()["error"]["param"]) == (400, "id"), r.text
        r = await client.post("/admin/tenants", json={"id": "x", "name": "a\u0000b"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "name"), r.text
        r = await client.patch("/admin/tenants/acme", json={"name": "\u001b[31mred"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "name"), r.text
        r = await client.post("/admin/tenants/acme/keys", json={"name": "line\nbreak"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "name"), r.text
        for dots in (".", ".."):  # dot segments: a client resolves /admin/tenants/.. to another route
            assert (await client.post("/admin/tenants", json={"id": dots, "name": "x"})).status_code == 400
        # "-" is the metrics' tenant of requests answered before a key was read
        assert (await client.post("/admin/tenants", json={"id": "-", "name": "x"})).status_code == 400
        assert (await client.post("/admin/tenants", json={"id": "--", "name": "x"})).status_code == 201
        assert (await client.delete("/admin/tenants/--")).status_code == 200
        assert (await client.post("/admin/tenants", json={"id": "...", "name": "x"})).status_code == 201
        assert (await client.delete("/admin/tenants/...")).status_code == 200  # three dots are a plain segment
        assert (await client.post("/admin/tenants", json={"id": "x"})).status_code == 400
        for tier in (-1, 10, 2**63 - 1):  # tiers are 0-9: aging bounds a lower tier's wait by the gap
            r = await client.post("/admin/tenants", json={"id": "x", "name": "x", "priority": tier})
            assert (r.status_code, r.json()["error"]["param"]) == (400, "priority"), r.text
        r = await client.patch("/admin/tenants/acme", json={"priority": 10})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "priority"), r.text
        assert (await client.post("/admin/tenants", content=b"{nope")).status_code == 400

        ids = [t["id"] for t in (await client.get("/admin/tenants")).json()["data"]]
        assert ids == ["acme", "t1"]

        r = await client.patch("/admin/tenants/acme", json={"name": "Acme Corp", "shared_cache_pool": True})
        assert (r.json()["name"], r.json()["shared_cache_pool"], r.json()["priority"]) == ("Acme Corp", True, 2)
        assert (await client.patch("/admin/tenants/ghost", json={"name": "x"})).status_code == 404

        r = await client.put("/admin/tenants/acme/quota", json={"requests_per_minute": 10, "max_tokens_cap": 64})
        assert r.json()["quota"]["requests_per_minute"] == 10
        assert (await client.put("/admin/tenants/acme/quota", json={"requests_per_minute": -1})).status_code == 400
        tenant = await gateway.stores.tenants.get_tenant("acme")
        assert tenant is not None and tenant.quota.max_tokens_cap == 64
        assert type(tenant.quota) is Quota and tenant.quota == Quota(requests_per_minute=10, max_tokens_cap=64)

        # a misspelt field is a 400 naming it, not ignored: a PUT replaces the whole quota, and
        # `{"rpm": 5}` set every limit to unlimited
        for method, path, body, param in [
            ("PUT", "/admin/tenants/acme/quota", {"rpm": 5}, "rpm"),
            ("PATCH", "/admin/tenants/acme", {"bogus": 1}, "bogus"),
            ("PATCH", "/admin/tenants/acme", {"quota": {"tokens_per_minute": 5, "tpm": 5}}, "quota"),
            ("POST", "/admin/tenants", {"id": "new", "name": "n", "quota": {"rpm": 5}}, "quota"),
            ("POST", "/admin/tenants/acme/keys", {"name": "k", "expires": 60}, "expires"),
        ]:
            r = await client.request(method, path, json=body)
            assert (r.status_code, r.json()["error"]["param"]) == (400, param), (method, path, r.text)
            assert "unknown field" in r.json()["error"]["message"]
        tenant = await gateway.stores.tenants.get_tenant("acme")
        assert tenant is not None and tenant.quota.requests_per_minute == 10  # untouched
        assert (await client.get("/admin/tenants/new")).status_code == 404

        assert (await client.get("/admin/tenants/ghost")).status_code == 404
        assert (await client.delete("/admin/tenants/acme")).json() == {"id": "acme", "deleted": True}
        assert (await client.delete("/admin/tenants/acme")).status_code == 404
        assert (await client.get("/admin/tenants/acme")).status_code == 404


async def test_patch_merges_and_a_bad_limit_or_name_is_a_400_naming_it(gateway: Gateway) -> None:
    """PATCH is a JSON merge patch: a quota merges limit by limit (null: unlimited), null
    models allow every model, null where a value is required is a 400; an out-of-range
    limit names itself, and names are bounded."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as client:
        r = await client.post("/admin/tenants", json={"id": "pm", "name": "P", "models": ["x"],
                                                      "quota": {"max_concurrent": 2, "requests_per_minute": 5}})
        assert r.status_code == 201, r.text

        async def patch(body: object) -> httpx.Response:
            return await client.patch("/admin/tenants/pm", json=body)

        r = await patch({"quota": {"requests_per_minute": 100}})
        assert (r.json()["quota"]["max_concurrent"], r.json()["quota"]["requests_per_minute"]) == (2, 100)
        r = await patch({"quota": {"max_concurrent": None}, "models": None})
        assert (r.json()["quota"]["max_concurrent"], r.json()["quota"]["requests_per_minute"]) == (None, 100)
        assert r.json()["models"] is None
        for field in ("name", "priority", "shared_cache_pool"):
            r = await patch({field: None})
            assert (r.status_code, r.json()["error"]["param"]) == (400, field), r.text
        r = await patch({"quota": None})
        assert set(r.json()["quota"].values()) == {None}
        for method, path, body, param in [
            ("PUT", "/admin/tenants/pm/quota", {"max_concurrent": -1}, "max_concurrent"),
            ("PATCH", "/admin/tenants/pm", {"quota": {"daily_token_budget": -5}}, "quota.daily_token_budget"),
            ("PATCH", "/admin/tenants/pm", {"quota": {"max_concurrent": "5"}}, "quota.max_concurrent"),  # a type
            ("POST", "/admin/tenants", {"id": "n", "name": "n", "quota": {"max_tokens_cap": 1.5}}, "quota.max_tokens_cap"),
            ("POST", "/admin/tenants", {"id": "n", "name": "n", "quota": {"tokens_per_minute": -1}},
             "quota.tokens_per_minute"),
            ("POST", "/admin/tenants", {"id": "n", "name": "n" * 257}, "name"),
            ("PATCH", "/admin/tenants/pm", {"name": "n" * 257}, "name"),
            ("POST", "/admin/tenants/pm/keys", {"name": "k" * 257}, "name"),
        ]:
            r = await client.request(method, path, json=body)
            assert (r.status_code, r.json()["error"]["param"]) == (400, param), (method, body, r.text)
            # the message names the field as the body spells it, not the server's class
            assert "Quota." not in r.json()["error"]["message"], r.text
            if param.split(".")[-1] in ("max_concurrent", "daily_token_budget", "tokens_per_minute"):
                assert param in r.json()["error"]["message"], r.text
        assert (await client.get("/admin/tenants/n")).status_code == 404
        assert set((await client.get("/admin/tenants/pm")).json()["quota"].values()) == {None}


async def test_keys_create_use_revoke(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as admin:
        r = await admin.post("/admin/tenants/t1/keys", json={"name": "ci"})
        assert r.status_code == 201
        created = r.json()
        assert created["key"].startswith("lmg-")
        listed = (await admin.get("/admin/tenants/t1/keys")).json()["data"]
        assert created["id"] in [k["id"] for k in listed]
        assert all("key" not in k and "digest" not in k for k in listed)
        detail = (await admin.get("/admin/tenants/t1")).json()
        assert created["id"] in [k["id"] for k in detail["keys"]]
        assert (await admin.post("/admin/tenants/ghost/keys", json={})).status_code == 404

        user = {"Authorization": f"Bearer {created['key']}"}
        async with httpx.AsyncClient(base_url=gateway.base_url, headers=user) as client:
            assert (await client.get("/v1/models")).status_code == 200
            assert (await admin.delete(f"/admin/keys/{created['id']}")).json()["revoked"] is True
            assert (await client.get("/v1/models")).status_code == 401
        assert (await admin.delete(f"/admin/keys/{created['id']}")).status_code == 404


async def test_tenants_are_listed_a_page_at_a_time(gateway: Gateway) -> None:
    """All at once, 50,000 tenants were 12.7 MB and ~0.7 s of the event loop."""
    for i in range(5):
        await gateway.stores.tenants.create_tenant(f"p{i}", name=f"P{i}")
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as client:
        everyone = (await client.get("/admin/tenants")).json()  # (100 by default)
        assert [t["id"] for t in everyone["data"]] == ["p0", "p1", "p2", "p3", "p4", "t1"]
        assert everyone["has_more"] is False
        first = (await client.get("/admin/tenants", params={"limit": 4})).json()
        assert ([t["id"] for t in first["data"]], first["has_more"]) == (["p0", "p1", "p2", "p3"], True)
        assert (first["first_id"], first["last_id"]) == ("p0", "p3")
        rest = (await client.get("/admin/tenants", params={"limit": 4, "after": first["last_id"]})).json()
        assert ([t["id"] for t in rest["data"]], rest["has_more"]) == (["p4", "t1"], False)
        for bad in ("0", "1001", "ten", "", " 5", "+5", "1_0", "1e3", "-1"):
            r = await client.get("/admin/tenants", params={"limit": bad})
            assert (r.status_code, r.json()["error"]["param"]) == (400, "limit"), bad


async def test_a_deleted_tenants_series_leave_the_metrics(gateway: Gateway) -> None:
    """~100 series a tenant that sent requests: kept after its deletion, every scrape grew
    with every tenant ever served (an audit: 1,000 deleted of 2,000, the same 7.4 MB)."""
    await gateway.stores.tenants.create_tenant("t2", name="other")
    _, key2 = await gateway.stores.tenants.create_key("t2", "k")
    for key in (gateway.headers["Authorization"].split()[1], key2):
        async with httpx.AsyncClient(base_url=gateway.base_url, headers={"Authorization": f"Bearer {key}"}) as c:
            assert (await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
                    ).status_code == 200
    gateway.runtime.metrics.requests.labels("t1", "ok").inc()  # (the fake runtime records none itself)
    gateway.runtime.metrics.requests.labels("t2", "ok").inc()
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as client:
        before = (await client.get("/metrics")).text
        assert (await client.delete("/admin/tenants/t1")).status_code == 200
        after = (await client.get("/metrics")).text
    assert 'tenant="t1"' in before and 'tenant="t1"' not in after
    assert 'lmgate_http_requests_total{method="POST",route="/v1/completions",status="200",tenant="t2"} 1.0' in after
    assert 'lmgate_requests_total{outcome="ok",tenant="t2"} 1.0' in after


async def test_a_tenant_deleted_through_another_replica_leaves_this_ones_metrics_too(gateway: Gateway) -> None:
    """The replica that answers a DELETE drops its series at once; the others look every
    few minutes for tenants that have series but are tenants no more."""
    from gateway.routes_admin import forget_gone_tenants

    state = gateway.runtime.gateway_state
    await gateway.stores.tenants.create_tenant("elsewhere", name="x")
    for t in ("t1", "elsewhere"):
        gateway.runtime.metrics.requests.labels(t, "ok").inc()
        state.metrics.requests.labels("/v1/completions", "POST", "200", t).inc()
    state.metrics.requests.labels("/v1/completions", "POST", "401", "-").inc()
    assert await forget_gone_tenants(state) == []
    assert await gateway.stores.tenants.delete_tenant("elsewhere")  # (as another replica's DELETE does)
    assert await forget_gone_tenants(state) == ["elsewhere"]
    assert gateway.runtime.metrics.tenants() == {"t1"} and state.metrics.tenants() == {"t1", "-"}
    # a Redis that came back empty, or lost the set of tenants, deleted nobody
    store = gateway.stores.redis
    await store.client.delete([store.key("tenants")])
    gateway.runtime.metrics.requests.labels("t1", "ok").inc()
    assert await forget_gone_tenants(state) == [] and gateway.runtime.metrics.tenants() == {"t1"}


async def test_the_sweep_of_deleted_tenants_never_takes_the_server_down(gateway: Gateway, monkeypatch, caplog) -> None:
    """It runs beside the server: a Redis refusing its reads (an ACL) stops it, said once;
    any other error is logged and it tries again. Out of it, either ended the server."""
    import coredis

    from gateway import routes_admin

    state = gateway.runtime.gateway_state
    calls = []

    async def failing(_state) -> list[str]:  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) < 3:
            raise KeyError("a bug")
        raise coredis.exceptions.AuthorizationError("NOPERM this user has no permissions to run 'mget'")

    monkeypatch.setattr(routes_admin, "forget_gone_tenants", failing)
    with trio.fail_after(5):
        await routes_admin.forget_deleted_tenants(state, every_s=0.01)  # (returns: it does not raise)
    assert len(calls) == 3
    assert "looking for tenants deleted through other replicas failed" in caplog.text
    assert "not looked for again" in caplog.text


async def test_usage_per_day_and_model(gateway: Gateway) -> None:
    tenant = await gateway.stores.tenants.get_tenant("t1")
    assert tenant is not None
    quotas = gateway.stores.quotas
    for rid, (p, c) in {"r1": (10, 5), "r2": (3, 4)}.items():
        await quotas.reserve(tenant, rid, p, c)
        await quotas.settle(tenant, rid, p, c, MODEL)
    today = dt.datetime.now(dt.UTC).date()
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as client:
        r = await client.get("/admin/tenants/t1/usage")
        assert r.status_code == 200, r.text
        rows = r.json()["data"]
        assert rows == [
            {"day": today.isoformat(), "model": MODEL, "requests": 2, "prompt_tokens": 13,
             "completion_tokens": 9, "total_tokens": 22}
        ]
        r = await client.get("/admin/tenants/t1/usage", params={"from": "2020-01-01", "to": "2020-01-02"})
        assert r.json()["data"] == []
        assert (await client.get("/admin/tenants/t1/usage", params={"from": "yesterday"})).status_code == 400
        bad_range = {"from": "2020-01-02", "to": "2020-01-01"}
        assert (await client.get("/admin/tenants/t1/usage", params=bad_range)).status_code == 400
        assert (await client.get("/admin/tenants/ghost/usage")).status_code == 404
        # the default week before the first day there is is that day alone, not an overflow
        r = await client.get("/admin/tenants/t1/usage", params={"to": "0001-01-03"})
        assert (r.status_code, r.json()["from"]) == (200, "0001-01-01")
        assert r.json()["tenant_exists"] is True
        # a deleted tenant's rows stay readable, by id, for billing; a re-created id continues them
        assert (await client.delete("/admin/tenants/t1")).status_code == 200
        r = await client.get("/admin/tenants/t1/usage")
        assert r.status_code == 200, r.text
        assert r.json()["tenant_exists"] is False and r.json()["data"] == rows
        assert (await client.get("/admin/tenants/t1/usage", params={"to": "2020-01-01"})).status_code == 404
        assert (await client.post("/admin/tenants", json={"id": "t1", "name": "again"})).status_code == 201
        r = await client.get("/admin/tenants/t1/usage")
        assert r.json()["tenant_exists"] is True and r.json()["data"] == rows
        deep = b'{"id": "deep", "name": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        r = await client.post("/admin/tenants", content=deep)
        assert (r.status_code, r.json()["error"]["param"]) == (400, "extra")  # refused before it is read


async def test_admin_disabled_without_admin_key(nursery, stores, gateway_config) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from tests.gateway.conftest import start_gateway

    config = dataclasses.replace(gateway_config, admin_key=None)
    base_url, _, stop = await start_gateway(nursery, stores, config)
    async with httpx.AsyncClient(base_url=base_url, headers=ADMIN) as client:
        r = await client.get("/admin/tenants")
    stop.set()
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


# ---------------------------------------------------------------- the length predictor
def _predictor(seed: int, n: int = 120):
    """A Magnus predictor fitted on synthetic requests whose embeddings are random (so its
    blob does not compress below the gateway's body cap)."""
    import numpy as np

    from actors.predictor import LengthPredictor, RequestFeatures

    rng = np.random.default_rng(seed)
    p = LengthPredictor()
    for k in range(n):
        e = rng.normal(size=384)
        p.observe(RequestFeatures("t1", "qa", f"u{k % 3}", 20 + k, 256, (e / np.linalg.norm(e)).astype(np.float32)),
                  30 + (k * seed) % 90)
    p.fit()
    return p


async def test_predictor_routes_answer_409_without_the_magnus_predictor(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as client:
        assert (await client.get("/admin/predictor")).json() == {"object": "length_predictor", "kind": "running"}
        for method in ("GET", "PUT"):
            path = "/admin/predictor/export" if method == "GET" else "/admin/predictor"
            r = await client.request(method, path, content=b"x")
            assert r.status_code == 409, (method, r.text)
            assert r.json()["error"]["code"] == "predictor_unavailable"
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        assert (await client.get("/admin/predictor")).status_code == 403  # a tenant key is not the admin key


async def test_predictor_export_then_replace_live_and_persisted(gateway: Gateway) -> None:
    from actors.predictor import LengthPredictor, PredictorService, RequestFeatures

    service = PredictorService(_predictor(1), store=gateway.stores.redis)
    gateway.runtime.length_service = service  # what actors.runtime.Runtime exposes
    probe = RequestFeatures("t1", "qa", "u1", 80, 256, None)
    upload = _predictor(2, n=160)
    blob = upload.to_bytes()
    assert len(blob) > gateway.config.max_body_bytes  # a predictor is bigger than any API body
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as client:
        info = (await client.get("/admin/predictor")).json()
        assert (info["kind"], info["samples"], info["fitted"], info["refits"]) == ("magnus", 120, True, 0)
        r = await client.get("/admin/predictor/export")
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        assert LengthPredictor.from_bytes(r.content).predict(probe) == service.predictor.predict(probe)

        r = await client.put("/admin/predictor", content=blob, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert (r.json()["samples"], r.json()["saved"]) == (160, True)
        assert service.predictor.predict(probe) == upload.predict(probe)  # served live
        restarted = PredictorService(store=gateway.stores.redis)
        assert await restarted.load() and restarted.predictor.predict(probe) == upload.predict(probe)

        for bad in (b"", b"not a predictor at all"):
            r = await client.put("/admin/predictor", content=bad)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_predictor", r.text
        assert service.predictor.predict(probe) == upload.predict(probe)  # a bad upload changes nothing
        # gzipped, it is decoded up to the route's limit, not the API's (a 413 naming that limit)
        r = await client.put("/admin/predictor", content=gzip.compress(blob),
                             headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"})
        assert r.status_code == 200, r.text
        too_big = gzip.compress(b"\0" * (MAX_PREDICTOR_BYTES + 1))
        r = await client.put("/admin/predictor", content=too_big, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and str(MAX_PREDICTOR_BYTES) in r.json()["error"]["message"], r.text
        assert "--max-body-bytes" not in r.json()["error"]["message"]
    # only the admin may send a body that large; anyone else is refused before it is read
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        assert (await client.put("/admin/predictor", content=blob)).status_code in (403, 413)
        r = await client.post("/v1/chat/completions", content=blob, headers={"Content-Type": "application/json"})
        assert r.status_code == 413


def test_the_body_cap_is_lifted_only_for_an_admin_predictor_upload() -> None:
    from werkzeug.datastructures import Headers

    from gateway.app import MAX_PREDICTOR_BYTES, request_class_for
    from gateway.config import GatewayConfig

    cls = request_class_for(GatewayConfig(admin_key=ADMIN_KEY, max_body_bytes=1024))

    def cap(method: str, path: str, key: str | None) -> int | None:
        headers = Headers({"Authorization": f"Bearer {key}"} if key else {})
        req = cls(method, "http", path, b"", headers, "", "1.1", max_content_length=1024, send_push_promise=None,
                  scope={})
        return req.body._max_content_length

    assert cap("PUT", "/admin/predictor", ADMIN_KEY) == MAX_PREDICTOR_BYTES
    assert cap("PUT", "/admin/predictor", "wrong") == 1024
    assert cap("PUT", "/admin/predictor", None) == 1024
    assert cap("POST", "/admin/predictor", ADMIN_KEY) == 1024
    assert cap("PUT", "/admin/tenants/t1/quota", ADMIN_KEY) == 1024
    no_admin = request_class_for(GatewayConfig(max_body_bytes=1024))
    req = no_admin("PUT", "http", "/admin/predictor", b"", Headers({"Authorization": "Bearer x"}), "", "1.1",
                   max_content_length=1024, send_push_promise=None, scope={})
    assert req.body._max_content_length == 1024


async def test_a_tenant_uses_only_the_models_it_may(gateway: Gateway) -> None:
    """`models` on a tenant: every route that names a model answers 404 for one it may not
    use (as for one that does not exist), and /v1/models lists only the others."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as admin:
        r = await admin.post("/admin/tenants", json={"id": "acme", "name": "Acme", "models": ["acme-*"]})
        assert r.status_code == 201 and r.json()["models"] == ["acme-*"]
        key = (await admin.post("/admin/tenants/acme/keys", json={"name": "k"})).json()["key"]
        bad = await admin.post("/admin/tenants", json={"id": "bad", "name": "Bad", "models": [""]})
        assert bad.status_code == 400
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=auth) as client:
        assert (await client.get("/v1/models")).json()["data"] == []
        for r in (await client.post("/v1/chat/completions", json=chat),
                  await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}),
                  await client.post("/v1/responses", json={"model": MODEL, "input": "x"}),
                  await client.post("/tokenize", json={"model": MODEL, "prompt": "x"}),
                  await client.post("/tokenize", json={"prompt": "x"}),  # (no model it may use: none)
                  await client.post("/v1/chat/completions", json={**chat, "model": "fake-alias"}),
                  await client.get(f"/v1/models/{MODEL}")):
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
            assert "may not use" in r.json()["error"]["message"] or "may use no model" in r.json()["error"]["message"]
        assert not gateway.runtime.calls
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as admin:
        r = await admin.patch("/admin/tenants/acme", json={"models": ["fake-alias"]})  # the model by its alias
        assert r.json()["models"] == ["fake-alias"]
        bad = await admin.patch("/admin/tenants/acme", json={"models": ["x" * 300]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "models"
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=auth) as client:
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == [MODEL]
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        assert (await client.post("/v1/chat/completions", json={**chat, "model": "fake-alias"})).status_code == 200
    # the other tenant's keys are not restricted
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200


async def test_a_key_made_to_expire_stops_working(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as admin:
        r = await admin.post("/admin/tenants/t1/keys", json={"name": "demo", "expires_in_seconds": 1})
        assert r.status_code == 201 and r.json()["expires_at"] > time.time()
        key = r.json()["key"]
        listed = (await admin.get("/admin/tenants/t1/keys")).json()["data"]
        assert [k["expires_at"] for k in listed if k["name"] == "demo"] == [r.json()["expires_at"]]
        for body in ({"expires_in_seconds": 0}, {"expires_in_seconds": 1e-9}, {"expires_at": time.time() - 5},
                     {"expires_at": time.time() + 60, "expires_in_seconds": 60}, {"expires_in_seconds": 1e300},
                     {"expires_at": 1e300}, {"expires_in_seconds": 9.3e15}):
            bad = await admin.post("/admin/tenants/t1/keys", json={"name": "x", **body})
            assert bad.status_code == 400 and bad.json()["error"]["param"] in body, bad.text
    async with httpx.AsyncClient(base_url=gateway.base_url, headers={"Authorization": f"Bearer {key}"}) as client:
        assert (await client.get("/v1/models")).status_code == 200
        await trio.sleep(1.1)
        assert (await client.get("/v1/models")).status_code == 401


async def test_a_tenant_created_again_as_the_old_one_goes_keeps_its_reservations(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting a tenant resets its limits, so one created again under its id starts afresh.
    The reset comes first, while the id is taken: a new tenant's request admitted the moment
    the old one is gone keeps its slot (a reset after the delete wiped it, and the new
    tenant ran past its max_concurrent)."""
    tenants, quotas = gateway.stores.tenants, gateway.stores.quotas
    delete = tenants.delete_tenant
    admitted = []

    async def delete_then_create_again(tenant_id: str, **kwargs: Any) -> bool:
        deleted = await delete(tenant_id, **kwargs)
        again = await tenants.create_tenant(tenant_id, "again", quota=Quota(max_concurrent=1))
        admitted.append(await quotas.reserve(again, "new-1", 10, 10))
        return deleted

    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as client:
        r = await client.post("/admin/tenants", json={"id": "re", "name": "Re", "quota": {"max_concurrent": 1}})
        assert r.status_code == 201, r.text
        old = await tenants.get_tenant("re")
        assert old is not None and isinstance(await quotas.reserve(old, "old-1", 10, 10), Admitted)
        monkeypatch.setattr(tenants, "delete_tenant", delete_then_create_again)
        assert (await client.delete("/admin/tenants/re")).status_code == 200
    again = await tenants.get_tenant("re")
    assert again is not None and again.name == "again"
    assert [type(a) for a in admitted] == [Admitted]
    assert await quotas.running("re") == 1  # the new tenant's request; the old one's slot went
    assert isinstance(await quotas.reserve(again, "new-2", 10, 10), Denied)  # its max_concurrent holds
    assert await quotas.extend(old, ["old-1"]) == 1  # the old request runs on, not lapsed
    assert await quotas.settle(old, "old-1", 10, 5, MODEL)  # its usage is recorded...
    assert await quotas.running("re") == 1  # ...and the new tenant's slot stays taken


async def test_a_change_redis_refuses_is_a_503_saying_it_may_have_been_made(gateway: Gateway) -> None:
    """Under maxmemory (noeviction) creating a tenant was a 500 with a traceback (refused
    inside a transaction, which coredis words otherwise); every change is a 503 whose
    message says to read back before retrying (a stalled Redis carries it out on waking)."""
    redis = gateway.stores.redis.client
    [policy] = (await redis.config_get(["maxmemory-policy"])).values()
    [maxmemory] = (await redis.config_get(["maxmemory"])).values()
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ADMIN) as client:
        await redis.config_set({"maxmemory": "1", "maxmemory-policy": "noeviction"})
        try:
            for method, path, body in (("POST", "/admin/tenants", {"id": "oom", "name": "o"}),
                                       ("POST", "/admin/tenants/t1/keys", {"name": "k"}),
                                       ("PATCH", "/admin/tenants/t1", {"name": "renamed"})):
                r = await client.request(method, path, json=body)
                assert r.status_code == 503 and r.headers["retry-after"] == "1", (method, path, r.text)
                assert r.json()["error"]["code"] == "store_unavailable"
                assert "may or may not have been made" in r.json()["error"]["message"]
                assert r.headers["x-should-retry"] == "false"  # (AdminClient's RetryPolicy obeys it)
            r = await client.get("/admin/tenants/t1")  # reads are served
            assert r.status_code == 200 and r.json()["name"] != "renamed"
        finally:
            await redis.config_set({"maxmemory": maxmemory, "maxmemory-policy": policy})
        assert (await client.post("/admin/tenants", json={"id": "oom", "name": "o"})).status_code == 201
