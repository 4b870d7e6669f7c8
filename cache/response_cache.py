"""Edge cache of whole completions for deterministic requests.

The caller decides what is deterministic (greedy decoding, or sampling with a
fixed seed); this module only promises that a hit was produced by a request with
the *same* model, prompt token ids and every sampling parameter. The key is::

    sha256(msgpack([model, prompt_token_ids, params]))   # params: a Struct or mapping

encoded with msgspec's deterministic order (dict keys sorted), so any change of
any parameter is a different key. Entries live under a scope: the tenant (its id
and creation time, `scope_for`), or ``shared`` for tenants that opted into the shared
pool — one tenant never sees another's private answers.

The value keeps per-token text deltas so a hit can be replayed as a stream
that looks like the original one.

Redis key: ``{prefix}rc1:<scope>:<sha256 hex>``, value msgpack, TTL ``ttl_s``
(``rc1``: bump the number when the value format changes, old entries then just
miss and expire).
Entries bigger than ``max_entry_bytes`` are not stored (one huge answer must not
evict many small ones).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from cache.store import RedisStore
from cache.tenants import Tenant

__all__ = [
    "SHARED_SCOPE",
    "CacheStats",
    "CachedCompletion",
    "CachedUsage",
    "ResponseCache",
    "response_key",
    "scope_for",
]

SHARED_SCOPE = "shared"

_key_encoder = msgspec.msgpack.Encoder(order="deterministic")
_value_encoder = msgspec.msgpack.Encoder()


class CachedUsage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int


class CachedCompletion(msgspec.Struct, frozen=True, kw_only=True):
    """A finished completion, enough to answer again or replay it as a stream.

    ``deltas[i]`` is the text emitted with ``token_ids[i]`` (may be "" while a
    multi-byte character is incomplete); ``"".join(deltas) == text``. When the request
    asked for logprobs (they are part of its key), ``logprobs[i]``, ``tokens[i]`` and
    ``top_logprobs[i]`` (``(token_id, logprob, text)`` alternatives) go with
    ``token_ids[i]``, so a replay answers with them too; None otherwise (and in entries
    stored before they were kept). ``stored_at`` gives a hit its age (HTTP's `Age`,
    `Cache-Control: max-age`).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: CachedUsage
    deltas: list[str] = []
    logprobs: list[float] | None = None
    tokens: list[str] | None = None
    top_logprobs: list[list[tuple[int, float, str]]] | None = None
    stored_at: float = 0.0  # unix time it was stored (0: not known, an entry stored before it was kept)

    def age_s(self, now: float) -> float | None:
        """Seconds since it was stored, or None when that is not known."""
        return max(0.0, now - self.stored_at) if self.stored_at > 0 else None


_value_decoder = msgspec.msgpack.Decoder(CachedCompletion)


class CacheStats(msgspec.Struct, kw_only=True):
    """In-process counters (per ResponseCache instance). A server's metrics count the
    lookups and stores (`lmgate_response_cache_lookups_total`, `..._stores_total`)."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    skipped_too_large: int = 0


def response_key(
    model: str, prompt_token_ids: Sequence[int], params: msgspec.Struct | Mapping[str, Any]
) -> str:
    """sha256 hex over model, prompt token ids and every sampling parameter (pure)."""
    payload = _key_encoder.encode([model, list(prompt_token_ids), params])
    return hashlib.sha256(payload).hexdigest()


def scope_for(tenant: Tenant) -> str:
    """Cache namespace of a tenant: the shared pool if it opted in, else ``t:<id>:<µs>``.

    The ``t:`` prefix keeps a tenant named ``shared`` out of the shared pool (tenant ids
    cannot contain ``:``), and the record's creation time keeps a tenant id that was
    deleted and created again from answering with the deleted tenant's entries.
    """
    if tenant.shared_cache_pool:
        return SHARED_SCOPE
    return f"t:{tenant.id}:{round(tenant.created_at * 1e6)}"


class ResponseCache:
    """get/put of CachedCompletion per (scope, model, prompt ids, params)."""

    def __init__(
        self, store: RedisStore, *, ttl_s: float = 3600.0, max_entry_bytes: int = 256 * 1024
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        if max_entry_bytes <= 0:
            raise ValueError("max_entry_bytes must be > 0")
        self.store = store
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.stats = CacheStats()

    def entry_key(
        self, tenant: Tenant, model: str, prompt_token_ids: Sequence[int],
        params: msgspec.Struct | Mapping[str, Any],
    ) -> str:
        """The Redis key of the entry answering this request: one key, one answer (also
        what `actors.flights` collapses identical requests in flight by)."""
        return self.store.key("rc1", scope_for(tenant), response_key(model, prompt_token_ids, params))

    async def get(
        self, tenant: Tenant, model: str, prompt_token_ids: Sequence[int],
        params: msgspec.Struct | Mapping[str, Any],
    ) -> CachedCompletion | None:
        """The cached completion or None (also for an entry that does not decode:
        `RedisStore.get_value`). Raises CacheUnavailable (callers usually treat that as a
        miss: fail open)."""
        key = self.entry_key(tenant, model, prompt_token_ids, params)
        hit = await self.store.get_value(key, _value_decoder.decode)
        if hit is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return hit

    def fits(self, completion: CachedCompletion) -> bool:
        """Whether `completion` is small enough to store (`max_entry_bytes`): a `put` that
        returned False for one that fits found Redis nearly full."""
        return len(_value_encoder.encode(completion)) <= self.max_entry_bytes

    async def put(
        self, tenant: Tenant, model: str, prompt_token_ids: Sequence[int],
        params: msgspec.Struct | Mapping[str, Any], completion: CachedCompletion,
    ) -> bool:
        """Store with TTL. False (and nothing stored) when the encoded entry is larger
        than ``max_entry_bytes``, or Redis is nearly full (`RedisStore.room_for_optional`)."""
        value = _value_encoder.encode(completion)
        if len(value) > self.max_entry_bytes:
            self.stats.skipped_too_large += 1
            return False
        key = self.entry_key(tenant, model, prompt_token_ids, params)
        if not await self.store.set_value(key, value, self.ttl_s):  # (Redis nearly full: `fits` tells them apart)
            return False
        self.stats.stores += 1
        return True
