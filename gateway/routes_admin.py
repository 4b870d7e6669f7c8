"""Admin API under /admin (Bearer = the configured admin key, else 403).

::

    POST   /admin/tenants                      create  {id, name, priority?, shared_cache_pool?, quota?}
    GET    /admin/tenants                      list
    GET    /admin/tenants/<id>                 read (with its keys, never their plaintext)
    PATCH  /admin/tenants/<id>                 update  {name?, priority?, shared_cache_pool?, quota?, models?}
                                               (a JSON merge patch: quota merges limit by limit)
    DELETE /admin/tenants/<id>                 delete (and all its keys)
    PUT    /admin/tenants/<id>/quota           set the quota (whole Quota object)
    POST   /admin/tenants/<id>/keys            create a key {name}: the plaintext is in this reply only
    GET    /admin/tenants/<id>/keys            list keys
    DELETE /admin/keys/<key_id>                revoke
    GET    /admin/tenants/<id>/usage?from=YYYY-MM-DD&to=YYYY-MM-DD   usage per day and model
    GET    /admin/predictor                    the length predictor: what it has learned (JSON)
    GET    /admin/predictor/export             the Magnus predictor as a file (application/octet-stream)
    PUT    /admin/predictor                    serve from an uploaded predictor (body: such a file)

Store errors map to statuses here: TenantNotFound 404, TenantExists 409,
ValueError (bad id, negative quota) 400, CacheUnavailable 503. The predictor routes
answer 409 `predictor_unavailable` when the gateway runs the simple running estimate
(no Magnus predictor to export or replace) and 400 `invalid_predictor` for an upload
that is not a saved predictor; an upload may be up to 64 MiB (app.MAX_PREDICTOR_BYTES).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
import trio
from quart import Blueprint, Response, request

from actors.metrics import UNAUTHENTICATED
from actors.predictor import PredictorBlobError
from cache.quotas import Quota
from cache.store import CacheUnavailable
from cache.tenants import (
    MAX_KEY_EXPIRY,
    MAX_NAME_CHARS,
    TenantExists,
    TenantNotFound,
    check_models,
    check_name,
    check_tenant_id,
)
from gateway.errors import ApiError, decode_json

if TYPE_CHECKING:
    from gateway.app import GatewayState

log = logging.getLogger(__name__)

MAX_USAGE_DAYS = 366


class QuotaBody(Quota, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A quota as the admin API takes it: a `Quota` whose unknown fields are a 400. A PUT
    replaces the whole quota, so a misspelt limit (`rpm`) ignored would have set every limit
    to unlimited. (Stored quotas decode leniently: `Quota`.)"""

    def plain(self) -> Quota:
        """As a `Quota` (what is stored and compared: structs of two types are never equal)."""
        return Quota(**msgspec.structs.asdict(self))


def plain_quota(quota: QuotaBody | None) -> Quota | None:
    return None if quota is None else quota.plain()


Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
MAX_PRIORITY = 9
# a tier: 0 (the default) to 9; aging lifts a waiting request a tier per --aging-seconds, so a
# bounded range bounds how long a tier-0 tenant can wait behind the highest (an unbounded
# one let an admin's typo starve every other tenant for days)
Priority = Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIORITY)]


class TenantCreate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    name: Name
    priority: Priority = 0
    shared_cache_pool: bool = False
    quota: QuotaBody | None = None
    models: list[str] | None = None  # the models its keys may use (names or patterns like "acme-*"); None: all


class QuotaPatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The limits a PATCH names (null: unlimited); the others are kept."""

    requests_per_minute: int | None | msgspec.UnsetType = msgspec.UNSET
    tokens_per_minute: int | None | msgspec.UnsetType = msgspec.UNSET
    max_concurrent: int | None | msgspec.UnsetType = msgspec.UNSET
    max_tokens_cap: int | None | msgspec.UnsetType = msgspec.UNSET
    daily_token_budget: int | None | msgspec.UnsetType = msgspec.UNSET

    def changes(self) -> dict[str, int | None]:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not msgspec.UNSET}


class TenantUpdate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A PATCH, as a JSON merge patch (RFC 7396): the fields given change, the others are
    kept; `quota` merges limit by limit (a null limit: unlimited; `"quota": null`: every
    limit unlimited), `"models": null` allows every model. `name`, `priority` and
    `shared_cache_pool` cannot be null (a 400)."""

    name: Name | msgspec.UnsetType = msgspec.UNSET
    priority: Priority | msgspec.UnsetType = msgspec.UNSET
    shared_cache_pool: bool | msgspec.UnsetType = msgspec.UNSET
    quota: QuotaPatch | None | msgspec.UnsetType = msgspec.UNSET
    models: list[str] | None | msgspec.UnsetType = msgspec.UNSET  # replaces the list; null or ["*"]: every model


def given(value: S | msgspec.UnsetType) -> S | None:
    return None if value is msgspec.UNSET else value  # type: ignore[return-value]


def models_of(models: list[str] | None) -> tuple[str, ...] | None:
    """A tenant's `models` as stored, or a 400 naming the field."""
    if models is None:
        return None
    try:
        check_models(tuple(models))
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_value", param="models") from exc
    return tuple(models)


class KeyCreate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Name = "default"
    expires_at: float | None = None  # unix time; or
    expires_in_seconds: float | None = None  # from now; neither: the key never expires

    def expiry(self) -> float | None:
        """When the key expires (unix time), or None; 400 for both fields, or a time not at
        least a second ahead or past `MAX_KEY_EXPIRY`."""
        if self.expires_at is not None and self.expires_in_seconds is not None:
            raise ApiError(400, "give expires_at or expires_in_seconds, not both", code="invalid_value",
                           param="expires_in_seconds")
        now = time.time()
        if self.expires_in_seconds is not None:
            if not (math.isfinite(self.expires_in_seconds) and 1 <= self.expires_in_seconds <= MAX_KEY_EXPIRY - now):
                raise ApiError(400, "expires_in_seconds must be a number of seconds from 1 until the year 9999",
                               code="invalid_value", param="expires_in_seconds")
            return now + self.expires_in_seconds
        if self.expires_at is not None and not (math.isfinite(self.expires_at)
                                                and now + 1 <= self.expires_at <= MAX_KEY_EXPIRY):
            raise ApiError(400, "expires_at must be a time (unix seconds) at least a second ahead and before the "
                           "year 10000", code="invalid_value", param="expires_at")
        return self.expires_at


S = TypeVar("S")


def decode_body(raw: bytes, kind: type[S], *, quota_prefix: str = "quota.") -> S:
    """An admin body (an empty one is `{}`: every field its default); a limit out of range
    is a 400 naming it (`quota_param`, `as_body_spells_it`)."""
    try:
        return decode_json(raw or b"{}", kind)
    except ApiError as exc:
        nested = _QUOTA_PATH.search(exc.message)  # a wrong type inside a tenant body's quota
        exc.param = quota_param(exc.message, quota_prefix) or (f"quota.{nested.group(1)}" if nested else exc.param)
        exc.message = as_body_spells_it(exc.message, quota_prefix)
        raise


_QUOTA_FIELD = re.compile(r"\bQuota\.(\w+)")
_QUOTA_PATH = re.compile(r"at `\$\.quota\.(\w+)")


def as_body_spells_it(message: str, prefix: str) -> str:
    """A quota's ValueError message with its field named as the body spells it
    (`quota.max_concurrent`), not as the server's class (`Quota.max_concurrent`)."""
    return _QUOTA_FIELD.sub(lambda found: prefix + found.group(1), message)


def quota_param(message: str, prefix: str) -> str | None:
    """The limit a quota's ValueError ("Quota.max_concurrent must be >= 0 ...") is about, as
    the error's `param` (`quota.max_concurrent` in a tenant body), or None."""
    found = _QUOTA_FIELD.search(message)
    return prefix + found.group(1) if found else None


def check_param(check: Callable[[], None], param: str) -> None:
    """Run a store-side check of one body field (`cache.tenants.check_name`, ...) up front,
    so that its ValueError is a 400 naming the field."""
    try:
        check()
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_value", param=param) from exc


def to_json(value: Any) -> Any:
    return msgspec.to_builtins(value)


def parse_day(text: str | None, default: dt.date, name: str) -> dt.date:
    if text is None:
        return default
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise ApiError(400, f"{name} must be YYYY-MM-DD, got {text!r}", code="invalid_value", param=name) from exc


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def store_errors(fn: F) -> F:
    """Translate the store's exceptions into API errors."""

    @wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except TenantNotFound as exc:
            raise ApiError(404, f"tenant {exc.args[0]!r} not found", code="tenant_not_found") from exc
        except TenantExists as exc:
            raise ApiError(409, str(exc), code="tenant_exists") from exc
        except CacheUnavailable as exc:
            if request.method in ("GET", "HEAD"):
                raise ApiError(503, "tenant store unavailable", code="store_unavailable", retry_after=1) from exc
            # (a Redis that stalled runs the commands it was sent once it wakes: a create then
            # exists, and its retry is a 409; a key issued so is listed, its plaintext never shown)
            # (x-should-retry: false: a client retrying it blindly could issue two keys, or be told
            # 409 for a tenant its first try created)
            raise ApiError(503, "tenant store unavailable: this change may or may not have been made; read it "
                           "back before retrying", code="store_unavailable", retry_after=1,
                           should_retry=False) from exc
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from exc

    return wrapper  # type: ignore[return-value]


MAX_TENANTS_PAGE = 1000  # tenants `GET /admin/tenants` lists at most at once
DELETED_TENANTS_CHECK_S = 300.0  # how often `forget_deleted_tenants` looks


async def forget_gone_tenants(state: GatewayState) -> list[str]:
    """Drop this process's series and fairness counters of the tenants that have series
    here but are tenants no more (deleted through another replica: the replica that
    answers a DELETE drops its own at once); returns their ids. Nothing while Redis holds
    no tenants at all (it came back empty, or lost the set: not a deletion)."""
    seen = sorted((state.runtime.metrics.tenants() | state.metrics.tenants()) - {UNAUTHENTICATED})
    there = await state.stores.tenants.which_exist(seen)
    if there is None:
        return []
    gone = sorted(set(seen) - there)
    if gone:  # (all at once: one pass over the series, however many went)
        state.forget_tenants(gone)
    return gone


async def forget_deleted_tenants(state: GatewayState, every_s: float = DELETED_TENANTS_CHECK_S) -> None:
    """Run for as long as the server does: `forget_gone_tenants` every `every_s` (skipped
    while Redis is unreachable). A Redis that refuses the reads (an ACL, a proxy) stops it,
    said once; any other error is logged and the next round tries again: the server goes on."""
    import coredis

    while True:
        await trio.sleep(every_s)
        try:
            await forget_gone_tenants(state)
        except CacheUnavailable:
            continue
        except coredis.exceptions.RedisError as e:
            log.warning("cannot look for tenants deleted through other replicas (%s): their series stay "
                        "here until a restart; not looked for again", e)
            return
        except Exception:  # noqa: BLE001 — a background sweep must not take the server down
            log.exception("looking for tenants deleted through other replicas failed")


def admin_blueprint(state: GatewayState) -> Blueprint:
    bp = Blueprint("admin", __name__, url_prefix="/admin")
    tenants = state.stores.tenants
    quotas = state.stores.quotas

    @bp.before_request
    async def _admin_only() -> None:
        state.require_admin(request.headers.get("Authorization"))

    async def existing(tenant_id: str) -> Any:
        tenant = await tenants.get_tenant(tenant_id)
        if tenant is None:
            raise TenantNotFound(tenant_id)
        return tenant

    @bp.post("/tenants")
    @store_errors
    async def create_tenant() -> Any:
        body = decode_body(await request.get_data(cache=False), TenantCreate)
        check_param(lambda: check_tenant_id(body.id), "id")
        check_param(lambda: check_name(body.name, "tenant name"), "name")
        tenant = await tenants.create_tenant(
            body.id, body.name, priority=body.priority, shared_cache_pool=body.shared_cache_pool, quota=plain_quota(body.quota),
            models=models_of(body.models),
        )
        return to_json(tenant), 201

    @bp.get("/tenants")
    @store_errors
    async def list_tenants() -> Any:
        """A page of tenants by id (OpenAI's list form): `limit` (default 100, at most
        1,000) after the id `after`; `has_more` says whether to ask again, after `last_id`
        (which a page emptied by deletions still has)."""
        raw = request.args.get("limit", "100")
        limit = int(raw) if re.fullmatch(r"[0-9]{1,5}", raw) else 0
        if not 1 <= limit <= MAX_TENANTS_PAGE:
            raise ApiError(400, f"limit must be an integer from 1 to {MAX_TENANTS_PAGE}, got {raw!r}",
                           code="invalid_value", param="limit")
        page, more, last = await tenants.list_tenants(limit, request.args.get("after"))
        # (last_id: the last id the page covered, a tenant deleted meanwhile included: the cursor)
        return {"object": "list", "data": to_json(page), "first_id": page[0].id if page else None,
                "last_id": last, "has_more": more}

    @bp.get("/tenants/<tenant_id>")
    @store_errors
    async def read_tenant(tenant_id: str) -> Any:
        tenant = await existing(tenant_id)
        return {**to_json(tenant), "keys": to_json(await tenants.list_keys(tenant_id))}

    @bp.patch("/tenants/<tenant_id>")
    @store_errors
    async def update_tenant(tenant_id: str) -> Any:
        body = decode_body(await request.get_data(cache=False), TenantUpdate)
        name = body.name
        if isinstance(name, str):
            check_param(lambda: check_name(name, "tenant name"), "name")
        try:
            tenant = await tenants.update_tenant(
                tenant_id, name=given(body.name), priority=given(body.priority),
                shared_cache_pool=given(body.shared_cache_pool),
                quota=Quota() if body.quota is None else None,
                quota_changes=body.quota.changes() if isinstance(body.quota, QuotaPatch) else None,
                models=body.models if body.models is msgspec.UNSET else models_of(body.models),
            )
        except ValueError as exc:
            raise ApiError(400, as_body_spells_it(str(exc), "quota."), code="invalid_value",
                           param=quota_param(str(exc), "quota.")) from exc
        return to_json(tenant)

    @bp.delete("/tenants/<tenant_id>")
    @store_errors
    async def delete_tenant(tenant_id: str) -> Any:
        # a tenant re-created under this id starts afresh (usage rows stay): its limits are
        # reset first, while the id is still taken, so no new tenant's reservation is lost
        tenant = await tenants.get_tenant(tenant_id)
        if tenant is None:
            raise TenantNotFound(tenant_id)
        if await quotas.reset_limits(tenant_id, created_at=tenant.created_at) < 0:
            raise TenantNotFound(tenant_id)  # deleted meanwhile by another call (and maybe created again)
        if not await tenants.delete_tenant(tenant_id, created_at=tenant.created_at):
            raise TenantNotFound(tenant_id)  # deleted meanwhile by another call (and maybe created again)
        # this process's series and fairness counter of it (other replicas drop theirs within
        # `DELETED_TENANTS_CHECK_S`: `forget_deleted_tenants`)
        state.forget_tenants([tenant_id])
        return {"id": tenant_id, "deleted": True}

    @bp.put("/tenants/<tenant_id>/quota")
    @store_errors
    async def set_quota(tenant_id: str) -> Any:
        quota = decode_body(await request.get_data(cache=False), QuotaBody, quota_prefix="")
        return to_json(await tenants.update_tenant(tenant_id, quota=quota.plain()))

    @bp.post("/tenants/<tenant_id>/keys")
    @store_errors
    async def create_key(tenant_id: str) -> Any:
        body = decode_body(await request.get_data(cache=False), KeyCreate)
        check_param(lambda: check_name(body.name, "key name"), "name")
        expires_at = body.expiry()
        key_id, plaintext = await tenants.create_key(tenant_id, body.name, expires_at=expires_at)
        return {"id": key_id, "tenant_id": tenant_id, "name": body.name, "key": plaintext,
                "expires_at": expires_at}, 201

    @bp.get("/tenants/<tenant_id>/keys")
    @store_errors
    async def list_keys(tenant_id: str) -> Any:
        await existing(tenant_id)
        return {"object": "list", "data": to_json(await tenants.list_keys(tenant_id))}

    @bp.delete("/keys/<key_id>")
    @store_errors
    async def revoke_key(key_id: str) -> Any:
        if not await tenants.revoke_key(key_id):
            raise ApiError(404, f"key {key_id!r} not found", code="key_not_found")
        return {"id": key_id, "revoked": True}

    @bp.get("/tenants/<tenant_id>/usage")
    @store_errors
    async def usage(tenant_id: str) -> Any:
        """Usage rows are the id's, for billing: they outlive a deleted tenant (a re-created
        id continues them); 404 only for an id with neither a tenant nor rows in the range."""
        exists = await tenants.get_tenant(tenant_id) is not None
        today = dt.datetime.now(dt.UTC).date()
        day_to = parse_day(request.args.get("to"), today, "to")
        week_before = day_to - dt.timedelta(days=min(6, (day_to - dt.date.min).days))
        day_from = parse_day(request.args.get("from"), week_before, "from")
        if day_to < day_from:
            raise ApiError(400, "'from' must not be after 'to'", code="invalid_value", param="from")
        if (day_to - day_from).days >= MAX_USAGE_DAYS:
            raise ApiError(400, f"at most {MAX_USAGE_DAYS} days per query", code="invalid_value", param="from")
        rows = await quotas.get_usage(tenant_id, day_from, day_to)
        if not exists and not rows:
            raise TenantNotFound(tenant_id)
        data = [
            {**to_json(r), "total_tokens": r.prompt_tokens + r.completion_tokens} for r in rows
        ]
        return {"object": "list", "tenant_id": tenant_id, "tenant_exists": exists, "from": day_from.isoformat(),
                "to": day_to.isoformat(), "data": data}

    def length_service() -> Any:
        service = getattr(state.runtime, "length_service", None)
        if service is None:
            raise ApiError(409, "this gateway runs the running length estimate, not the Magnus predictor "
                                "(--length-predictor magnus, or a magnus/hybrid scheduling policy)",
                           code="predictor_unavailable")
        return service

    def describe(service: Any, **extra: Any) -> dict:
        return {"object": "length_predictor", "kind": "magnus", "refits": service.refits,
                "refit_failures": service.refit_failures, "refitting": service.refitting, "sharing": service.sharing(), **extra,
                **service.predictor.summary()}

    @bp.get("/predictor")
    async def read_predictor() -> Any:
        service = getattr(state.runtime, "length_service", None)
        if service is None:
            return {"object": "length_predictor", "kind": "running"}
        return describe(service)

    @bp.get("/predictor/export")
    async def export_predictor() -> Any:
        blob = length_service().export()
        return Response(blob, mimetype="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="lmgate-predictor.npz"'})

    @bp.put("/predictor")
    async def replace_predictor() -> Any:
        service = length_service()
        blob = await request.get_data()
        if not blob:
            raise ApiError(400, "the body must be a saved predictor (lmgate predictor train/export, or "
                                "GET /admin/predictor/export)", code="invalid_predictor")
        try:
            saved = await service.replace(blob)
        except PredictorBlobError as exc:
            raise ApiError(400, str(exc), code="invalid_predictor") from exc
        return describe(service, saved=saved)

    return bp
