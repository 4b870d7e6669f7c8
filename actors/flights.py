"""Collapsed forwarding: identical deterministic requests in flight at once generate once.

A deterministic request (`actors.admission.is_cacheable`) that misses the response cache
while an identical one — the same response-cache entry key: the tenant's cache scope, the
model, the prompt's token ids and every parameter — is being generated waits for that one's
answer and is given it, as a cache hit, instead of generating the same tokens again: a
burst of identical requests (a popular prompt, a client's retries after a timeout, a
dashboard's panels asking at once) took a sequence each, and was stored as many times.

The first such request is the flight's *leader*: it runs as any request does, and when it
ends its answer *lands* (`Flights.land`, by accounting, as soon as it completes: before its
quota is settled or the answer stored in Redis). The others are *followers*: they wait
without taking a sequence, a queue place or a place in the overload estimate, then replay
the answer. A leader that ends without one (cancelled by its client, refused, failed, or
an answer the cache would not keep) lands `None`: its followers go on; the first of them
to look again leads the next flight, the others follow it.

Who follows (`Admission._follow`): a request that looked the cache up (not `no-cache`, not
`only-if-cached`), not streamed (a stream's first token would wait for the leader's last),
and whose priority is not above the leader's (it would wait behind a request the
scheduler puts after it). Who leads: a request that would store its answer (not
`no-store`). Within one server only: replicas do not see each other's flights (Redis holds
finished answers only).
"""

from __future__ import annotations

from typing import Any

import trio

__all__ = ["Flight", "Flights"]


class Flight:
    """One answer being generated: `landed` is set once `answer` is final (a
    `cache.response_cache.CachedCompletion`, or None: there is none to share)."""

    __slots__ = ("answer", "followers", "landed", "priority")

    def __init__(self, priority: int) -> None:
        self.priority = priority  # the leader's (higher runs first)
        self.landed = trio.Event()
        self.answer: Any = None
        self.followers = 0  # waiting for it now


class Flights:
    """The flights of one server, by response-cache entry key. Holds one entry per leader
    in flight (so at most the requests the server holds), each removed when it lands."""

    def __init__(self) -> None:
        self._by_key: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> Flight | None:
        """The flight in the air for `key` (never one that landed)."""
        return self._by_key.get(key)

    def lead(self, key: str, priority: int) -> Flight:
        """A new flight for `key`, whose leader the caller is. There must be none in flight."""
        if key in self._by_key:
            raise ValueError(f"a flight for {key!r} is already in the air")
        flight = self._by_key[key] = Flight(priority)
        return flight

    def land(self, key: str, flight: Flight, answer: Any) -> None:
        """The leader ended: `answer` to its followers (None: they go on alone). Idempotent:
        a flight lands once, the first answer stands."""
        if self._by_key.get(key) is flight:
            del self._by_key[key]
        if not flight.landed.is_set():
            flight.answer = answer
            flight.landed.set()
