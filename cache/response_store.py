"""Stored responses of the Responses API (`store: true`), kept per tenant in Redis.

A stored response is what `GET /v1/responses/{id}` returns, and what a later request's
`previous_response_id` continues from: the conversation the model read (the earlier
turns and this request's input, as Responses items) and the response with its output.
Instructions are not kept in the conversation: as OpenAI's, they apply to one request
and are not carried over.

Redis key: ``{prefix}resp2:<owner>:<response id>``, value JSON, TTL ``ttl_s`` (OpenAI
keeps stored responses 30 days). The owner (`owner_of`) is the tenant's id and its
record's creation time, so one tenant can neither read nor continue nor delete another's
responses — to it they do not exist — and a tenant deleted and created again under the
same id does not find the deleted one's (they expire with their TTL). A background
response's stream events are kept beside it (``{prefix}resp2events:<owner>:<id>``, a list,
for as long as the running server keeps them itself) so that a stream resumes on any server.
Entries bigger than ``max_entry_bytes`` are not stored (`put` returns False): a
conversation that long no longer fits the model's context anyway.

A background response (`background: true`) is stored as soon as it is accepted and
rewritten as it runs (`put(..., existing=True)`, so a response deleted meanwhile is not
brought back), with `running_until`: the time by which the server running it will have
written it again. A response still queued or in progress past that time was left by a
server that stopped (`StoredResponse.orphaned`). A cancellation asked of a server that
does not run the response is a flag (`request_cancel`) the running one reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from coredis import PureToken

from cache.store import CacheUnavailable, RedisStore, redacted_url

__all__ = ["ResponseStore", "StoredResponse", "owner_of"]

_encoder = msgspec.json.Encoder()


class StoredResponse(msgspec.Struct, frozen=True, kw_only=True):
    """`response`: the Response object as returned. `context`: the items of the turns
    before this request (from its `previous_response_id`); `input`: this request's own
    input items, each with an `id`. The next turn reads context + input + output."""

    response: dict[str, Any]
    context: list[dict[str, Any]]
    input: list[dict[str, Any]]
    # a background response still running: the (Unix) time by which it is written again
    running_until: float | None = None
    last_sequence: int | None = None  # its last stream event's sequence_number

    @property
    def status(self) -> str:
        return str(self.response.get("status"))

    def orphaned(self, now: float) -> bool:
        """Still queued or in progress, but no longer kept up to date: its server stopped."""
        return (self.status in ("queued", "in_progress") and self.running_until is not None
                and now > self.running_until)

    def conversation(self) -> list[dict[str, Any]]:
        """The items a request continuing this response starts from: its output's text
        without the logprobs (the model never reads them, and kept in every later turn's
        copy they could grow a chain past what a stored response may take)."""
        return [*self.context, *self.input, *map(_without_logprobs, self.response.get("output", []))]


def _without_logprobs(item: dict[str, Any]) -> dict[str, Any]:
    content = item.get("content")
    if not isinstance(content, list) or not any(isinstance(p, dict) and "logprobs" in p for p in content):
        return item
    return {**item, "content": [{k: v for k, v in p.items() if k != "logprobs"} if isinstance(p, dict) else p
                                for p in content]}


_decoder = msgspec.json.Decoder(StoredResponse)


class StoredHead(msgspec.Struct, frozen=True, kw_only=True):
    """A stored response's Response object as stored (JSON), and until when its server keeps
    it up to date: what a GET returns, read without decoding the turns before it or the
    answer itself (decoded whole and encoded again, a 1.7 MB answer with logprobs took
    ~175 ms of the event loop a GET; 8 GETs at once stalled every stream ~0.4-1 s)."""

    response: msgspec.Raw
    running_until: float | None = None

    def current(self, now: float) -> bool:
        """Whether it is returned as stored: not a run whose server stopped updating it
        (`StoredResponse.orphaned` needs the whole record then)."""
        return self.running_until is None or now <= self.running_until


_head_decoder = msgspec.json.Decoder(StoredHead)


def owner_of(tenant_id: str, created_at: float) -> str:
    """Whose stored responses these are: the tenant, as created at `created_at` (its record's)."""
    return f"{tenant_id}:{round(created_at * 1e6)}"


# KEYS: the events list; ARGV: the first event's index (its sequence number), ttl ms,
# events... -> {events appended, the list's length before}. Appends only what the list
# lacks, so that a push retried (a reply lost, coredis re-sending after a timeout, the
# PEXPIRE of a push that landed failing) never appends an event twice: event k stays at
# index k. A list shorter than the first index (it expired meanwhile) takes nothing: the
# caller pushes again from its length.
_PUSH_EVENTS = """
local before = redis.call('LLEN', KEYS[1])
local first = tonumber(ARGV[1])
if before < first then return {0, before} end
local n = 0
for i = 3 + before - first, #ARGV do
  redis.call('RPUSH', KEYS[1], ARGV[i])
  n = n + 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {n, before}
"""


# KEYS: the cancel flag; ARGV: "1" (cancel) or "delete", ttl ms. A cancel renews the flag
# (its server may be cut off for longer than it lives) but does not overwrite a delete's.
_FLAG_CANCEL = """
if ARGV[1] ~= 'delete' and redis.call('GET', KEYS[1]) == 'delete' then
  redis.call('PEXPIRE', KEYS[1], math.max(redis.call('PTTL', KEYS[1]), tonumber(ARGV[2])))
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class ResponseStore:
    """Per-tenant stored responses. Every method raises CacheUnavailable when Redis
    cannot be reached: at once, without asking, while it could not be reached a moment
    ago (`RedisStore.guard_reachable`)."""

    def __init__(self, store: RedisStore, *, ttl_s: float = 30 * 86400, max_entry_bytes: int = 8 << 20,
                 on_error: Callable[[], None] | None = None) -> None:
        """`on_error` is called for each call Redis failed or that skipped it (a metric)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.store = store
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.on_error = on_error
        self._push_events = store.register_script(_PUSH_EVENTS)
        self._flag_cancel = store.register_script(_FLAG_CANCEL)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            with self.store.guard_reachable():
                yield
        except CacheUnavailable:
            if self.on_error is not None:
                self.on_error()
            raise

    def _key(self, owner: str, response_id: str) -> str:
        return self.store.key("resp2", owner, response_id)

    def _cancel_key(self, owner: str, response_id: str) -> str:
        return self.store.key("resp2cancel", owner, response_id)

    def fits(self, stored: StoredResponse) -> bool:
        """Whether `stored` is small enough to keep (`max_entry_bytes`)."""
        return len(_encoder.encode(stored)) <= self.max_entry_bytes

    async def put(self, owner: str, stored: StoredResponse, *, existing: bool = False) -> bool:
        """Store (or replace) `stored` under its response id for `ttl_s`; False when it is
        too large to keep or, with `existing`, when no such response is stored (deleted)."""
        value = _encoder.encode(stored)
        if len(value) > self.max_entry_bytes:
            return False
        # (room kept for tenants and quotas: as an outage for a new response; a stored one is
        # still rewritten — a background run's end, else read as failed)
        if not existing and not self.store.room_for_optional():
            raise CacheUnavailable(f"Redis at {redacted_url(self.store.url)} is nearly full (its maxmemory): "
                                   "responses are not stored")
        with self._guard():
            done = await self.store.client.set(self._key(owner, stored.response["id"]), value,
                                               px=round(self.ttl_s * 1000),
                                               condition=PureToken.XX if existing else None)
        return bool(done)

    async def request_cancel(self, owner: str, response_id: str, ttl_s: float = 300.0, *, delete: bool = False) -> None:
        """Ask the server running a background response to cancel it (`cancel_requested`);
        `delete`: it is being deleted, so that server keeps nothing of it either (its events,
        which it would share again, and would stream from memory)."""
        with self._guard():
            await self._flag_cancel(keys=[self._cancel_key(owner, response_id)],
                                    args=["delete" if delete else "1", round(ttl_s * 1000)])

    async def cancel_requested(self, owner: str, response_id: str) -> str | None:
        """None, or what was asked of the server running it: "cancel" or "delete"."""
        with self._guard():
            asked = await self.store.client.get(self._cancel_key(owner, response_id))
        if asked is None:
            return None
        return "delete" if asked in (b"delete", "delete") else "cancel"

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        with self._guard():
            raw = await self.store.client.get(self._key(owner, response_id))
        return None if raw is None else _decoder.decode(raw)

    async def head(self, owner: str, response_id: str) -> StoredHead | None:
        """`get`'s response still encoded (`StoredHead`)."""
        with self._guard():
            raw = await self.store.client.get(self._key(owner, response_id))
        return None if raw is None else _head_decoder.decode(raw)

    async def delete(self, owner: str, response_id: str) -> bool:
        """True if the response was stored (and is gone now); its events go with it."""
        with self._guard():
            found = bool(await self.store.client.delete([self._key(owner, response_id)]))
            await self.store.client.delete([self._events_key(owner, response_id)])
        return found

    def _events_key(self, owner: str, response_id: str) -> str:
        return self.store.key("resp2events", owner, response_id)

    async def push_events(self, owner: str, response_id: str, events: list[dict[str, Any]], ttl_s: float, *,
                          first: int) -> tuple[int, int]:
        """Append a background response's stream events `events`, the first of which is
        event (sequence number) `first`, so that event k is at index k; kept `ttl_s` after
        the last push, so that any server resumes its stream (`read_events`). Idempotent:
        events the list holds already are not appended again. Returns the bytes appended and
        the list's length before: when that is below `first` (the list expired), nothing was
        appended, and the caller pushes again from there."""
        if not events:
            return 0, first
        encoded = [_encoder.encode(e) for e in events]
        with self._guard():
            added, before = await self._push_events(keys=[self._events_key(owner, response_id)],
                                                    args=[first, round(ttl_s * 1000), *encoded])
        return sum(map(len, encoded[len(encoded) - int(added):])) if added else 0, int(before)

    async def read_events(self, owner: str, response_id: str, start: int) -> list[dict[str, Any]]:
        """The events pushed from index (sequence number) `start` on; [] when none (or expired)."""
        with self._guard():
            raw = await self.store.client.lrange(self._events_key(owner, response_id), max(0, start), -1)
        return [msgspec.json.decode(r) for r in raw]
