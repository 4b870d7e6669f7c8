"""Tenants and their API keys, stored in Redis; keys only ever stored hashed.

A key is shown once, at creation: ``lmg-`` + 32 random bytes (urlsafe base64).
Redis holds only ``HMAC-SHA256(server_secret, key)``: a dump of Redis does not
yield usable keys, and without the server secret the digests cannot even be
brute-forced offline.

Layout (under the store prefix)::

    tenant:<id>          JSON Tenant
    tenants              SET of tenant ids
    tenant_index         ZSET of the same ids, every score 0 (pages in id order: ZRANGE BYLEX)
    key:<digest>         JSON _KeyRecord (id, tenant, name, display prefix, created, digest)
    keyid:<key id>       <digest>            (revoke by id)
    tenant_keys:<id>     SET of key ids      (list / delete with the tenant)

``authenticate`` is on every request, so it is one round trip: a Lua script
reads the key record and the tenant it points to.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import fnmatch
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

import msgspec
import trio
from coredis import PureToken

from cache.quotas import MAX_LIMIT, Quota
from cache.store import CacheUnavailable, RedisStore, redacted_url

__all__ = [
    "ApiKeyInfo",
    "KEY_PREFIX",
    "SecretMismatch",
    "SecretTooShort",
    "Tenant",
    "TenantExists",
    "TenantNotFound",
    "TenantRegistry",
    "check_name",
    "check_tenant_id",
    "decode_tenant",
    "hash_key",
    "is_admin_key",
    "is_tenant_id",
]

KEY_PREFIX = "lmg-"
_DISPLAY_CHARS = 8  # "lmg-" + 4 chars of the random part, enough to tell keys apart
# ids are URL path segments (/admin/tenants/<id>): "." and ".." would be dot segments,
# which an HTTP client resolves, climbing to another route; "-" is what the metrics name
# requests answered before a key was read (`actors.metrics.UNAUTHENTICATED`)
_TENANT_ID = re.compile(r"^(?!\.{1,2}$|-$)[A-Za-z0-9_.-]{1,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode's Cc: no name shows or logs them right


log = logging.getLogger("lmgate.cache")


def is_tenant_id(text: str) -> bool:
    """`text` could name a tenant: 1-64 letters, digits, '_', '.' or '-', not '.', '..' or '-'."""
    return _TENANT_ID.match(text) is not None


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    """A customer of the gateway. ``priority`` is the scheduling tier (higher first);
    ``shared_cache_pool`` opts into the cross-tenant response cache and the engine's
    prefix cache shared across tenants (outside it, a tenant's cached prefixes are its
    own: a hit would tell it another tenant's prompt); ``models``, when set,
    lists the models its keys may use (`may_use`), else every served one may be."""

    id: str
    name: str
    priority: int = 0
    shared_cache_pool: bool = False
    quota: Quota = Quota()
    created_at: float = 0.0
    models: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_models(self.models)

    def may_use(self, model: str) -> bool:
        return may_use(self.models, model)


_clamped_warned: set[str] = set()


def decode_tenant(raw: bytes | str) -> Tenant:
    """A stored tenant record as a Tenant. Records outlive the version that wrote them: a
    quota limit above MAX_LIMIT (accepted before 2026-12-05; refused since, as the quota
    scripts count in doubles) reads as MAX_LIMIT, as unlimited in practice as the number
    written, with a warning once per tenant, and is stored so at the tenant's next update.
    Anything else a record fails is raised (msgspec.ValidationError)."""
    try:
        return msgspec.json.decode(raw, type=Tenant)
    except msgspec.ValidationError:
        data = msgspec.json.decode(raw)
        quota = data.get("quota") if isinstance(data, dict) else None
        over = sorted(k for k, v in quota.items() if isinstance(v, int) and v > MAX_LIMIT) if isinstance(
            quota, dict) else []
        if not over:
            raise
        data["quota"] = {**quota, **dict.fromkeys(over, MAX_LIMIT)}
        tenant = msgspec.convert(data, type=Tenant)
        if tenant.id not in _clamped_warned:
            _clamped_warned.add(tenant.id)
            log.warning("tenant %r: quota %s above %d (stored by an older version) read as %d, its largest "
                        "exact value; an update of the tenant stores it so", tenant.id, ", ".join(over),
                        MAX_LIMIT, MAX_LIMIT)
        return tenant


MAX_MODEL_PATTERNS = 256
MAX_KEY_EXPIRY = 253402300799.0  # 9999-12-31T23:59:59Z: what Redis (PXAT) and every client can hold


MAX_NAME_CHARS = 256  # a tenant's or a key's display name: every listing returns it


def check_name(name: str, what: str) -> None:
    """ValueError unless `name` has at most MAX_NAME_CHARS characters, none of them a control
    character (a NUL or an escape code would show in listings and log lines)."""
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"a {what} has at most {MAX_NAME_CHARS} characters, got {len(name)}")
    if _CONTROL.search(name):
        raise ValueError(f"a {what} may not hold control characters")


def check_tenant_id(tenant_id: str) -> None:
    """ValueError unless `tenant_id` could name a tenant (`is_tenant_id`)."""
    if not is_tenant_id(tenant_id):
        raise ValueError(f"tenant id must be 1-64 letters, digits, '_', '.' or '-' (not '.', '..' or '-'), "
                         f"got {tenant_id!r}")


def check_models(models: tuple[str, ...] | None) -> None:
    """ValueError unless `models` is None or at most MAX_MODEL_PATTERNS names or patterns
    of 1 to 256 characters."""
    if models is None:
        return
    if len(models) > MAX_MODEL_PATTERNS:
        raise ValueError(f"models lists at most {MAX_MODEL_PATTERNS} names or patterns, got {len(models)}")
    for m in models:
        if not 1 <= len(m) <= 256:
            raise ValueError("a model name or pattern in models has 1 to 256 characters")


def may_use(models: tuple[str, ...] | None, model: str) -> bool:
    """Whether a tenant with the allow-list `models` may use `model`: None allows every
    model; otherwise a name or a shell-style pattern (`acme-*`, `*`) must match it
    (case-sensitive). A LoRA-serving gateway (LoRAX's use) keeps each customer's adapters
    to that customer this way."""
    return models is None or any(fnmatch.fnmatchcase(model, m) for m in models)


class ApiKeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the admin API may show about a key: never the key, never its digest."""

    id: str
    tenant_id: str
    name: str
    prefix: str
    created_at: float
    expires_at: float | None = None  # unix time after which it no longer authenticates
    # issued by a server whose secret was not yet proven (`check_secret`): if that secret was
    # not the keys' own, the key works nowhere once the right one is recorded; reissue it then
    unproven: bool = False


class _KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant_id: str
    name: str
    prefix: str
    created_at: float
    digest: str
    expires_at: float | None = None
    # issued by a server whose secret was unproven (`check_secret`): proves nothing about it
    unproven: bool = False

    def info(self) -> ApiKeyInfo:
        return ApiKeyInfo(
            id=self.id, tenant_id=self.tenant_id, name=self.name,
            prefix=self.prefix, created_at=self.created_at, expires_at=self.expires_at, unproven=self.unproven,
        )


class KeyAuth(msgspec.Struct, frozen=True):
    """What a key that authenticates says: its tenant, and when the key expires (None: never)."""

    tenant: Tenant
    expires_at: float | None = None


class TenantNotFound(KeyError):
    pass


class TenantExists(ValueError):
    pass


class SecretMismatch(RuntimeError):
    """This Redis's keys were issued under another server secret: none would authenticate."""


class SecretTooShort(ValueError):
    """A server secret below `MIN_SECRET_BYTES`: a setting to fix, not a bug."""


MIN_SECRET_BYTES = 16


def hash_key(secret: bytes, plaintext: str) -> str:
    """HMAC-SHA256(secret, key) as hex: the only form a key is stored in."""
    return hmac.new(secret, plaintext.encode(), hashlib.sha256).hexdigest()


def is_admin_key(presented: str | None, admin_key: str | None) -> bool:
    """Constant-time check of an admin key. False when either side is missing/empty.

    Both sides are hashed first so the comparison time does not depend on
    lengths either.
    """
    if not presented or not admin_key:
        return False
    a = hashlib.sha256(presented.encode()).digest()
    b = hashlib.sha256(admin_key.encode()).digest()
    return hmac.compare_digest(a, b)


def _new_plaintext_key() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


# KEYS[1] = key:<digest>; ARGV[1] = prefix of tenant keys -> {record, tenant} or nil
_AUTHENTICATE = """
local rec = redis.call('GET', KEYS[1])
if not rec then return false end
local tid = cjson.decode(rec)['tenant_id']
local tenant = redis.call('GET', ARGV[1] .. tid)
if not tenant then return false end
return {rec, tenant}
"""

# ARGV: store prefix, key id -> 1 revoked, 0 unknown
_REVOKE = """
local p = ARGV[1]
local digest = redis.call('GET', p .. 'keyid:' .. ARGV[2])
if not digest then return 0 end
local rec = redis.call('GET', p .. 'key:' .. digest)
if rec then
  redis.call('SREM', p .. 'tenant_keys:' .. cjson.decode(rec)['tenant_id'], ARGV[2])
end
redis.call('DEL', p .. 'key:' .. digest, p .. 'keyid:' .. ARGV[2])
return 1
"""

# ARGV: store prefix, tenant id -> 1 deleted, 0 unknown. Deletes the tenant's keys too.
_DELETE_TENANT = """
local p = ARGV[1]
local tid = ARGV[2]
if ARGV[3] ~= '' then
  local tenant = redis.call('GET', p .. 'tenant:' .. tid)
  if not tenant or (cjson.decode(tenant)['created_at'] or 0) ~= tonumber(ARGV[3]) then return 0 end
end
if redis.call('DEL', p .. 'tenant:' .. tid) == 0 then return 0 end
redis.call('SREM', p .. 'tenants', tid)
redis.call('ZREM', p .. 'tenant_index', tid)
for _, kid in ipairs(redis.call('SMEMBERS', p .. 'tenant_keys:' .. tid)) do
  local digest = redis.call('GET', p .. 'keyid:' .. kid)
  if digest then redis.call('DEL', p .. 'key:' .. digest) end
  redis.call('DEL', p .. 'keyid:' .. kid)
end
redis.call('DEL', p .. 'tenant_keys:' .. tid)
return 1
"""


# ARGV: store prefix, tenant id, the tenant's created_at, key id, digest, record JSON, PXAT ms ('' = never)
# -> 1 issued, 0 the tenant is gone (or was deleted and created again since it was read).
# One script, so a key is never written for a tenant a concurrent delete has just removed:
# the delete takes the keys it finds listed, and a key written after it would outlive it.
_CREATE_KEY = """
local p = ARGV[1]
local tenant = redis.call('GET', p .. 'tenant:' .. ARGV[2])
if not tenant or (cjson.decode(tenant)['created_at'] or 0) ~= tonumber(ARGV[3]) then return 0 end
if ARGV[7] == '' then
  redis.call('SET', p .. 'key:' .. ARGV[5], ARGV[6])
  redis.call('SET', p .. 'keyid:' .. ARGV[4], ARGV[5])
else
  redis.call('SET', p .. 'key:' .. ARGV[5], ARGV[6], 'PXAT', ARGV[7])
  redis.call('SET', p .. 'keyid:' .. ARGV[4], ARGV[5], 'PXAT', ARGV[7])
end
redis.call('SADD', p .. 'tenant_keys:' .. ARGV[2], ARGV[4])
return 1
"""


# KEYS: the tenant record; ARGV: the record as read, the record to write -> 1 written,
# 0 changed since it was read (read again and retry), -1 gone. An update is a read, a merge
# and this compare-and-set: two admins' edits on two replicas both land, and a tenant
# deleted and created again meanwhile is not overwritten with the deleted one's record.
_UPDATE_TENANT = """
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# ARGV: store prefix -> how many live API keys the tenants hold, up to COUNT_KEYS_UP_TO (the
# secret check's question: were keys issued here before any fingerprint of their secret
# was recorded?). An expired key's id stays listed until its tenant goes: only ids whose
# record lives count. Read-only, so a Redis refusing writes still answers it.
COUNT_KEYS_UP_TO = 1000
_COUNT_KEYS = """
local p = ARGV[1]
local n, seen = 0, 0
for _, tid in ipairs(redis.call('SMEMBERS', p .. 'tenants')) do
  local cursor = '0'
  repeat
    local page = redis.call('SSCAN', p .. 'tenant_keys:' .. tid, cursor, 'COUNT', 100)
    cursor = page[1]
    for _, kid in ipairs(page[2]) do
      n = n + redis.call('EXISTS', p .. 'keyid:' .. kid)
      seen = seen + 1
      if n >= tonumber(ARGV[2]) or seen >= 10 * tonumber(ARGV[2]) then return n end
    end
  until cursor == '0'
end
return n
"""

UPDATE_ATTEMPTS = 50
INDEX_PAGE = 1000  # tenant ids copied into the sorted index per round trip (`_index_in_step`)
INDEX_CHECK_S = 300.0  # the index compared with the set in full at most this often (`_index_in_step`)
LOST_DATA_CHECK_S = 15.0  # how often `watch_for_lost_data` looks, besides after each outage


class TenantRegistry:
    """Tenant CRUD, API key lifecycle and authentication. Create inside ``async with store``.

    ``secret`` is the server secret keys are HMACed with (>= 16 bytes); changing
    it invalidates every issued key.
    """

    def __init__(self, store: RedisStore, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise SecretTooShort(f"the server secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)} "
                                 "(LMGATE_SECRET, or the server_secret file in the data dir)")
        self.store = store
        self._secret = secret
        self._authenticate = store.register_script(_AUTHENTICATE)
        self._update_tenant = store.register_script(_UPDATE_TENANT)
        self._revoke = store.register_script(_REVOKE)
        self._delete_tenant = store.register_script(_DELETE_TENANT)
        self._create_key = store.register_script(_CREATE_KEY)
        self._count_keys = store.register_script(_COUNT_KEYS)
        # the fingerprint is recorded once a key issued before this time authenticates
        # (`check_secret`: keys of a version that recorded none); None: nothing pending
        self._fingerprint_pending_since: float | None = None
        self._fingerprint_seen = False  # Redis held (or took) it: its loss is a loss of data
        self._index_lock = trio.Lock()  # one `_index_in_step` mend at a time
        self._index_checked_at: float | None = None  # (monotonic) its last full comparison with the set
        # Redis came back without its data (`watch_for_lost_data`) and holds no tenant yet:
        # /readyz says so (every key answers 401 meanwhile)
        self.lost_data = False

    # -- the server secret ---------------------------------------------------

    async def check_secret(self, *, generated: bool = False) -> bool:
        """Check that this Redis's keys were issued under our secret; raise SecretMismatch if not.

        Redis keeps ``HMAC(secret, "lmgate secret check")`` (written by the first gateway,
        with NX): not the secret, and nothing a key can be derived from. A gateway started
        with another secret — a replica with its own data dir, a container whose data dir
        was lost — would answer every existing key with 401; it is stopped at start-up
        instead. Returns True when this call recorded the fingerprint.

        A Redis holding keys but no fingerprint (issued by a version before 2026-12-05,
        which recorded none) cannot tell which secret is theirs, and the first gateway to
        start after an upgrade, maybe one given the wrong secret, must not decide it for
        the fleet: the fingerprint is recorded only once one of those keys authenticates
        here (`lookup_key`), which proves the secret; until then it is logged as pending.
        `generated` (this server made its secret just now) cannot be theirs: refused.
        """
        mine = self._fingerprint()
        key = self.store.key("secret_check")
        with self.store.guard():
            # read first: a Redis refusing writes (maxmemory, a replica in a failover) still
            # answers the check when the fingerprint is there
            theirs = await self.store.client.get(key)
            if theirs is None:
                keys = int(await self._count_keys(args=[self.store.prefix, COUNT_KEYS_UP_TO]))
                if keys and generated:
                    some = f"at least {keys}" if keys >= COUNT_KEYS_UP_TO else str(keys)
                    raise SecretMismatch(
                        f"this Redis holds {some} API key(s), issued under a secret this server does not "
                        "have (its secret was generated just now, in a new data dir), so none would "
                        "authenticate here: give it the secret they were issued under (LMGATE_SECRET, or "
                        "the server_secret file of the data dir that issued them)")
                if not keys:
                    if await self.store.client.set(key, mine, condition=PureToken.NX):
                        await self.store.client.delete([self.store.key("secret_pending_since")])
                        self._fingerprint_seen = True
                        return True
                    theirs = await self.store.client.get(key)
        if theirs is None:
            await self._pend(keys)
            return False
        theirs = theirs.decode() if isinstance(theirs, bytes) else theirs
        if theirs != mine:
            raise SecretMismatch(
                "the API keys in this Redis were issued under another server secret, so none would "
                "authenticate here: give every gateway that shares this Redis the same secret "
                "(LMGATE_SECRET, or the same data_dir/server_secret file)")
        self._fingerprint_seen = True
        return False

    async def _pend(self, keys: int) -> None:
        """`check_secret` found `keys` keys and no fingerprint: record it once a key issued
        before the cut-off authenticates. The cut-off is written once, by the first gateway
        to find keys without a fingerprint, and read by every other: a key issued after it,
        by a gateway that may have the wrong secret, proves nothing after a restart either.
        A Redis refusing the write: its cut-off as read, else now."""
        pending = self.store.key("secret_pending_since")
        with contextlib.suppress(CacheUnavailable), self.store.guard():
            await self.store.client.set(pending, repr(time.time()), condition=PureToken.NX)
        with self.store.guard():
            since = await self.store.client.get(pending)
        # (not later than now: a cut-off written by a host whose clock runs ahead would let keys
        # issued here meanwhile, maybe under the wrong secret, count as issued before it)
        self._fingerprint_pending_since = min(float(since), time.time()) if since is not None else time.time()
        some = f"at least {keys}" if keys >= COUNT_KEYS_UP_TO else str(keys)
        log.warning(
            "this Redis holds %s API key(s) but no fingerprint of the secret they were issued under (written by a "
            "version before 2026-12-05, or deleted to rotate the secret): it is recorded once a key issued before "
            "%s authenticates here; if they all answer 401, this server has another secret than the one that "
            "issued them", some, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._fingerprint_pending_since)))

    async def watch_for_lost_data(self, every_s: float = LOST_DATA_CHECK_S) -> None:
        """Run for as long as the server does: each time Redis answers after an outage, and
        every `every_s` (a restart between two calls of an idle server is no outage it
        sees), see whether it came back without its data (restarted without persistence, a
        failover to an empty replica): the secret's fingerprint, there since start-up, is
        gone, and so is the set of tenants. Then every tenant, key, quota and stored
        response is gone too, and each request answers 401 or 404 with nothing in the log
        to say why: say it, once, as an error, and record the fingerprint again (a gateway
        with another secret is still refused). The fingerprint gone but the tenants there
        is a deliberate rotation (docs/api.md), or an eviction: not recorded again (that
        would refuse the gateways started with the new secret), said once, and no longer
        watched."""
        import coredis

        reported = False
        while True:
            with trio.move_on_after(every_s):
                await self.store.answered()
            if not self._fingerprint_seen:
                continue
            key, tenants = self.store.key("secret_check"), self.store.key("tenants")
            try:
                with self.store.guard():
                    fingerprint = await self.store.client.get(key)
                    gone = fingerprint is None and not await self.store.client.exists([tenants])
            except CacheUnavailable:
                continue
            except coredis.exceptions.RedisError as e:  # (an ACL refusing the read, a proxy's own error)
                log.warning("cannot look for a Redis that lost its data (%s): not looked for again", e)
                return
            if fingerprint is not None:
                reported = False
                if self.lost_data:
                    with contextlib.suppress(CacheUnavailable), self.store.guard():
                        if await self.store.client.exists([tenants]):
                            self.lost_data = False
                            log.warning("Redis at %s holds tenants again", redacted_url(self.store.url))
                continue
            if not gone:
                log.warning("the server secret's fingerprint was deleted from Redis at %s while its tenants remain "
                            "(a rotation of the secret, or evicted: give Redis maxmemory-policy noeviction): not "
                            "recorded again", redacted_url(self.store.url))
                self._fingerprint_seen = False
                return
            if not reported:
                reported = self.lost_data = True
                log.error("Redis at %s has lost its data (the server secret's fingerprint, kept since start-up, "
                          "is gone, and every tenant with it): its tenants, API keys, quotas and stored responses "
                          "are gone, so every key answers 401; restore it from a backup or its persistence file, "
                          "or create the tenants again (the admin API)", redacted_url(self.store.url))
            with contextlib.suppress(CacheUnavailable), self.store.guard():  # (a read-only replica refuses it)
                if await self.store.client.set(key, self._fingerprint(), condition=PureToken.NX):
                    reported = False

    def _fingerprint(self) -> str:
        return hmac.new(self._secret, b"lmgate secret check", hashlib.sha256).hexdigest()

    async def _record_proven_fingerprint(self, pending: float) -> None:
        """A key issued before Redis found no fingerprint (`pending`) authenticated: our
        secret is theirs, so record its fingerprint (NX: a replica may have done so
        already). Failed or cancelled, it stays pending: the next such key tries again."""
        self._fingerprint_pending_since = None  # (one caller at a time records it)
        recorded = False
        try:
            with self.store.guard():
                key = self.store.key("secret_check")
                if await self.store.client.set(key, self._fingerprint(), condition=PureToken.NX):
                    await self.store.client.delete([self.store.key("secret_pending_since")])
                    log.info("an API key issued before the secret's fingerprint was kept authenticated: "
                             "recorded the fingerprint (a gateway with another secret is now refused at start)")
                recorded = await self.store.client.get(key) is not None
        finally:
            if recorded:
                self._fingerprint_seen = True
            else:
                self._fingerprint_pending_since = pending

    # -- tenants -------------------------------------------------------------

    async def create_tenant(
        self,
        tenant_id: str,
        name: str,
        *,
        priority: int = 0,
        shared_cache_pool: bool = False,
        quota: Quota | None = None,
        models: tuple[str, ...] | None = None,
    ) -> Tenant:
        """Create a tenant; raises TenantExists if the id is taken."""
        check_name(name, "tenant name")
        check_tenant_id(tenant_id)
        tenant = Tenant(
            id=tenant_id, name=name, priority=priority, shared_cache_pool=shared_cache_pool,
            quota=quota or Quota(), created_at=time.time(), models=models,
        )
        with self.store.guard():
            # one round trip; SADD and ZADD are harmless when the id already exists (listed)
            async with self.store.client.pipeline(transaction=True) as pipe:
                created = pipe.set(
                    self.store.key("tenant", tenant_id), msgspec.json.encode(tenant),
                    condition=PureToken.NX,
                )
                pipe.sadd(self.store.key("tenants"), [tenant_id])
                pipe.zadd(self.store.key("tenant_index"), {tenant_id: 0})
            if not await created:
                raise TenantExists(f"tenant {tenant_id!r} already exists")
        return tenant

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        with self.store.guard():
            raw = await self.store.client.get(self.store.key("tenant", tenant_id))
        return None if raw is None else decode_tenant(raw)

    async def which_exist(self, tenant_ids: list[str]) -> set[str] | None:
        """Those of `tenant_ids` whose records are there now; None when Redis holds no set
        of tenants at all (it came back empty, or lost the set): no answer then."""
        with self.store.guard():
            if not await self.store.client.exists([self.store.key("tenants")]):
                return None
            if not tenant_ids:
                return set()
            raws = await self.store.client.mget([self.store.key("tenant", t) for t in tenant_ids])
        return {t for t, raw in zip(tenant_ids, raws, strict=True) if raw is not None}

    async def list_tenants(self, limit: int | None = None,
                           after: str | None = None) -> tuple[list[Tenant], bool, str | None]:
        """Tenants sorted by id: those after `after` (an id, not necessarily one that
        exists), at most `limit` (None: all); whether more follow; and the last id the page
        covered, where the next starts (None: none) — a tenant deleted between reading the
        ids and their records is left out, so the page may hold fewer, even none, though
        more follow. Only the page's ids and records are read, from the sorted index (all
        50,000 records took ~0.7 s of the event loop to read and write out; all 200,000 ids,
        read and sorted for each page, 0.46 s), which `_index_in_step` first mends if it
        does not list what the set of tenants does (and when Redis refuses that, the set
        is read, as before the index)."""
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1")
        indexed = await self._index_in_step()
        with self.store.guard():
            if indexed:
                found = await self.store.client.zrange(
                    self.store.key("tenant_index"), "-" if after is None else b"(" + after.encode(), "+",
                    sortby=PureToken.BYLEX, **({} if limit is None else {"offset": 0, "count": limit + 1}))
                ids = [m.decode() for m in found]
            else:
                ids = sorted(m.decode() for m in await self.store.client.smembers(self.store.key("tenants")))
                ids = ids[bisect.bisect_right(ids, after):] if after is not None else ids
                ids = ids[:limit + 1] if limit is not None else ids
            more = limit is not None and len(ids) > limit
            ids = ids[:limit] if limit is not None else ids
            if not ids:
                return [], False, None
            raws = await self.store.client.mget([self.store.key("tenant", i) for i in ids])
        return [decode_tenant(r) for r in raws if r is not None], more, ids[-1]

    async def _index_in_step(self) -> bool:
        """Mend the sorted index of tenant ids where it does not list what the set of
        tenants does: after an upgrade from a version that kept only the set (the index is
        built then, once, by whichever server lists first), and while such a version still
        runs beside this one, creating and deleting tenants in the set alone. Compared in
        full when the counts differ, and at most every `INDEX_CHECK_S` besides (an old
        version's create and delete between two listings leave the counts equal: a review
        found a tenant left out for good). In pages of `INDEX_PAGE` ids, each its own round
        trip, so the event loop is never held long; what is in step is not written (a
        Redis refusing writes still has its index checked). One mend at a time per
        registry. Returns False when Redis refuses the mend's writes (read-only, out of
        memory) with the counts apart: the listing then reads the set. Raises
        CacheUnavailable (unreachable)."""
        client, members, index = self.store.client, self.store.key("tenants"), self.store.key("tenant_index")
        async with self._index_lock:
            with self.store.guard():
                async with client.pipeline(transaction=False) as pipe:
                    set_count, index_count = pipe.scard(members), pipe.zcard(index)
                in_set, in_index = await set_count, await index_count
            now = time.monotonic()
            due = self._index_checked_at is None or now - self._index_checked_at >= INDEX_CHECK_S
            if in_set == in_index and not due:
                return True
            try:
                with self.store.guard():
                    added, dropped = await self._mend_index(client, members, index)
            except CacheUnavailable:
                if self.store.unreachable_at is not None:
                    raise
                return in_set == in_index  # (refused: the set read instead, unless the counts agree)
            self._index_checked_at = now
            if added or dropped:
                log.info("tenant index mended for listing: %d ids added, %d dropped (%d tenants)", added, dropped,
                         in_set)
            return True

    @staticmethod
    async def _mend_index(client: Any, members: str, index: str) -> tuple[int, int]:
        """Add the set's ids the index lacks and drop those it lists that the set does not;
        returns how many of each."""
        added = dropped = 0
        cursor = 0
        while True:
            cursor, page = await client.sscan(members, cursor, count=INDEX_PAGE)
            ids = list(page)
            if ids:
                missing = [m for m, score in zip(ids, await client.zmscore(index, ids), strict=True) if score is None]
                if missing:
                    added += await client.zadd(index, {m: 0 for m in missing})
            if not cursor:
                break
        cursor = 0
        while True:
            cursor, scored = await client.zscan(index, cursor, count=INDEX_PAGE)
            ids = [m.member for m in scored]
            if ids:
                gone = [m for m, there in zip(ids, await client.smismember(members, ids), strict=True) if not there]
                if gone:
                    dropped += await client.zrem(index, gone)
            if not cursor:
                break
        return added, dropped

    async def update_tenant(
        self,
        tenant_id: str,
        *,
        name: str | None = None,
        priority: int | None = None,
        shared_cache_pool: bool | None = None,
        quota: Quota | None = None,
        quota_changes: Mapping[str, int | None] | None = None,
        models: tuple[str, ...] | None | msgspec.UnsetType = msgspec.UNSET,
    ) -> Tenant:
        """Change the given fields (None = keep, but for `models`: UNSET = keep, None = every
        model, as does `("*",)`). `quota` replaces the quota; `quota_changes` sets the limits
        it names (None: unlimited) and keeps the others, after `quota` if both are given.
        Raises TenantNotFound; ValueError for a bad name or limit.

        Atomic against other writers: the merge applies to the record as stored when it is
        written (a compare-and-set, retried when another update landed in between).
        """
        if name is not None:
            check_name(name, "tenant name")
        key = self.store.key("tenant", tenant_id)
        for _ in range(UPDATE_ATTEMPTS):
            with self.store.guard():
                raw = await self.store.client.get(key)
            if raw is None:
                raise TenantNotFound(tenant_id)
            current = decode_tenant(raw)
            changes: dict[str, Any] = {
                k: v for k, v in {
                    "name": name, "priority": priority, "shared_cache_pool": shared_cache_pool, "quota": quota,
                }.items() if v is not None
            }
            if quota_changes:
                changes["quota"] = msgspec.structs.replace(changes.get("quota", current.quota), **quota_changes)
            if models is not msgspec.UNSET:
                changes["models"] = models
            updated = msgspec.structs.replace(current, **changes)
            with self.store.guard():
                done = await self._update_tenant(keys=[key], args=[raw, msgspec.json.encode(updated)])
            if done == 1:
                return updated
            if done == -1:
                raise TenantNotFound(tenant_id)
        raise CacheUnavailable(f"tenant {tenant_id!r} changed under {UPDATE_ATTEMPTS} updates in a row; retry")

    async def delete_tenant(self, tenant_id: str, *, created_at: float | None = None) -> bool:
        """Delete a tenant and all its API keys. False if it did not exist, or, given
        `created_at`, if the tenant under the id is not the one created then (deleted and
        created again since it was read)."""
        with self.store.guard():
            return bool(await self._delete_tenant(
                args=[self.store.prefix, tenant_id, "" if created_at is None else repr(created_at)]))

    # -- API keys ------------------------------------------------------------

    async def create_key(self, tenant_id: str, name: str, *, expires_at: float | None = None) -> tuple[str, str]:
        """Issue a key: returns ``(key_id, plaintext)``. The plaintext is not stored
        anywhere; show it to the user once. `expires_at` (unix time): the key stops
        authenticating then, and Redis drops its record (its id stays listed until
        then only). ValueError for a time not in the future."""
        if expires_at is not None and not (math.isfinite(expires_at) and time.time() < expires_at <= MAX_KEY_EXPIRY):
            raise ValueError("expires_at must be a time in the future, before the year 10000")
        check_name(name, "key name")
        tenant = await self.get_tenant(tenant_id)
        if tenant is None:
            raise TenantNotFound(tenant_id)
        plaintext = _new_plaintext_key()
        digest = hash_key(self._secret, plaintext)
        record = _KeyRecord(
            id="key_" + secrets.token_hex(8), tenant_id=tenant_id, name=name,
            prefix=plaintext[:_DISPLAY_CHARS], created_at=time.time(), digest=digest, expires_at=expires_at,
            unproven=self._fingerprint_pending_since is not None,
        )
        if record.unproven:
            log.warning("key %s issued while this server's secret is unproven (this Redis holds keys issued before "
                        "any fingerprint of their secret, and none has authenticated here yet): if its secret is "
                        "not theirs, once a server with theirs records it, this server is refused at its next "
                        "start and this key works nowhere", record.id)
        pxat = "" if expires_at is None else str(math.ceil(expires_at * 1000))
        with self.store.guard():
            issued = await self._create_key(args=[self.store.prefix, tenant_id, repr(tenant.created_at), record.id,
                                                  digest, msgspec.json.encode(record), pxat])
        if not issued:
            raise TenantNotFound(tenant_id)
        return record.id, plaintext

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke a key by id; it stops authenticating immediately. False if unknown."""
        with self.store.guard():
            return bool(await self._revoke(args=[self.store.prefix, key_id]))

    async def list_keys(self, tenant_id: str) -> list[ApiKeyInfo]:
        """The tenant's keys (id, name, display prefix, created), oldest first."""
        with self.store.guard():
            kids = [k.decode() for k in await self.store.client.smembers(
                self.store.key("tenant_keys", tenant_id))]
            if not kids:
                return []
            digests = await self.store.client.mget([self.store.key("keyid", k) for k in kids])
            present = [d.decode() for d in digests if d is not None]
            if not present:
                return []
            raws = await self.store.client.mget([self.store.key("key", d) for d in present])
        records = [msgspec.json.decode(r, type=_KeyRecord) for r in raws if r is not None]
        return [r.info() for r in sorted(records, key=lambda r: (r.created_at, r.id))]

    async def authenticate(self, plaintext: str | None) -> Tenant | None:
        """The tenant owning this key, or None (unknown, revoked, expired, malformed). One round trip."""
        found = await self.lookup_key(plaintext)
        return None if found is None else found.tenant

    async def lookup_key(self, plaintext: str | None) -> KeyAuth | None:
        """As `authenticate`, with the key's expiry."""
        if not plaintext or not plaintext.startswith(KEY_PREFIX):
            return None
        digest = hash_key(self._secret, plaintext)
        with self.store.guard():
            found = await self._authenticate(
                keys=[self.store.key("key", digest)], args=[self.store.key("tenant", "")]
            )
        if not found:
            return None
        raw_record, raw_tenant = found
        record = msgspec.json.decode(raw_record, type=_KeyRecord)
        if not hmac.compare_digest(record.digest.encode(), digest.encode()):
            return None
        if record.expires_at is not None and time.time() >= record.expires_at:  # (Redis drops it about now)
            return None
        pending = self._fingerprint_pending_since
        if pending is not None and record.created_at < pending and not record.unproven:
            with contextlib.suppress(CacheUnavailable):  # (the next such key tries again)
                await self._record_proven_fingerprint(pending)
        return KeyAuth(decode_tenant(raw_tenant), record.expires_at)
