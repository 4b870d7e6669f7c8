"""Async client of the admin API (/admin/..., admin key as Bearer). Replies are the
gateway's JSON objects (dicts); errors are the typed `clients.errors` classes, as for
`LmgateClient` (a closed client: `ConnectionFailed`; a failed POST or PATCH is retried
only if it cannot have reached the server, and a change answered 503 not at all: the
server says `x-should-retry: false`, as its outcome is unknown; read it back). Ids are sent as one path segment each
("?", "%" or ".." stay part of the id; an empty id, or one holding "/", is
`InvalidRequest`), so no id reaches another tenant, key or route."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx

from clients.client import JsonApi, RetryPolicy
from clients.client import path_segment as seg


class AdminClient(JsonApi):
    TENANTS_PAGE = 1000  # tenants `list_tenants` asks for at once (the server's most)

    def __init__(
        self,
        base_url: str,
        admin_key: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, admin_key, timeout=timeout, retry=retry, http=http)

    async def _call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        """`method` /admin`path`; every id in `path` must be escaped with `seg`."""
        return await self._request_json(method, "/admin" + path, body, params=params)

    # -- tenants

    async def create_tenant(
        self,
        tenant_id: str,
        name: str,
        *,
        priority: int = 0,
        shared_cache_pool: bool = False,
        quota: dict[str, int | None] | None = None,
        models: list[str] | None = None,
    ) -> dict[str, Any]:
        """`models`: the models its keys may use (names or patterns such as "acme-*"); None: all."""
        body: dict[str, Any] = {"id": tenant_id, "name": name, "priority": priority, "shared_cache_pool": shared_cache_pool}
        if quota is not None:
            body["quota"] = quota
        if models is not None:
            body["models"] = models
        return await self._call("POST", "/tenants", body)

    async def list_tenants(self) -> list[dict[str, Any]]:
        """Every tenant, by id (the server lists them a page at a time)."""
        tenants: list[dict[str, Any]] = []
        params = {"limit": str(self.TENANTS_PAGE)}
        while True:
            page = await self._call("GET", "/tenants", params=params)
            tenants += page["data"]
            if not page.get("has_more") or page.get("last_id") is None:
                return tenants
            params = {"limit": str(self.TENANTS_PAGE), "after": page["last_id"]}  # (after the ids it covered)

    async def get_tenant(self, tenant_id: str) -> dict[str, Any]:
        """The tenant and its keys (ids, names, display prefixes; never the plaintext)."""
        return await self._call("GET", f"/tenants/{seg(tenant_id)}")

    async def update_tenant(self, tenant_id: str, **fields: Any) -> dict[str, Any]:
        """Change name / priority / shared_cache_pool / quota / models (others unchanged)."""
        return await self._call("PATCH", f"/tenants/{seg(tenant_id)}", fields)

    async def delete_tenant(self, tenant_id: str) -> None:
        await self._call("DELETE", f"/tenants/{seg(tenant_id)}")

    async def set_quota(self, tenant_id: str, **limits: int | None) -> dict[str, Any]:
        """Replace the quota: requests_per_minute, tokens_per_minute, max_concurrent,
        max_tokens_cap, daily_token_budget (omitted = unlimited)."""
        return await self._call("PUT", f"/tenants/{seg(tenant_id)}/quota", limits)

    # -- keys

    async def create_key(self, tenant_id: str, name: str = "default", *,
                         expires_in_seconds: float | None = None, expires_at: float | None = None) -> tuple[str, str]:
        """Returns (key_id, plaintext key). The plaintext is shown only this once.
        The key stops working `expires_in_seconds` from now, or at `expires_at` (Unix
        seconds; one or the other, a 400 for both); default: never (`list_keys` shows it)."""
        body: dict[str, Any] = {"name": name}
        if expires_in_seconds is not None:
            body["expires_in_seconds"] = expires_in_seconds
        if expires_at is not None:
            body["expires_at"] = expires_at
        reply = await self._call("POST", f"/tenants/{seg(tenant_id)}/keys", body)
        return reply["id"], reply["key"]

    async def list_keys(self, tenant_id: str) -> list[dict[str, Any]]:
        return (await self._call("GET", f"/tenants/{seg(tenant_id)}/keys"))["data"]

    async def revoke_key(self, key_id: str) -> None:
        await self._call("DELETE", f"/keys/{seg(key_id)}")

    # -- usage

    async def usage(
        self, tenant_id: str, day_from: dt.date | None = None, day_to: dt.date | None = None
    ) -> list[dict[str, Any]]:
        """Rows {day, model, requests, prompt_tokens, completion_tokens, total_tokens}
        (default: the last 7 UTC days)."""
        params = {}
        if day_from is not None:
            params["from"] = day_from.isoformat()
        if day_to is not None:
            params["to"] = day_to.isoformat()
        return (await self._call("GET", f"/tenants/{seg(tenant_id)}/usage", params=params))["data"]
