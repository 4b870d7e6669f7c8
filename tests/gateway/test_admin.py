"""Admin API over real sockets and a real Redis: auth, tenants CRUD, keys, quotas, usage."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

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
        assert (await client.post("/admin/tenants", json={"id": "bad id!", "name": "x"})).status_code == 400
        assert (await client.post("/admin/tenants", json={"id": "x"})).status_code == 400
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

        assert (await client.get("/admin/tenants/ghost")).status_code == 404
        assert (await client.delete("/admin/tenants/acme")).json() == {"id": "acme", "deleted": True}
        assert (await client.delete("/admin/tenants/acme")).status_code == 404
        assert (await client.get("/admin/tenants/acme")).status_code == 404


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


async def test_admin_disabled_without_admin_key(nursery, stores, gateway_config) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from tests.gateway.conftest import start_gateway

    config = dataclasses.replace(gateway_config, admin_key=None)
    base_url, _, stop = await start_gateway(nursery, stores, config)
    async with httpx.AsyncClient(base_url=base_url, headers=ADMIN) as client:
        r = await client.get("/admin/tenants")
    stop.set()
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
