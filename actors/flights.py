"""Collapsed forwarding: identical deterministic requests in flight at once generate once.

A deterministic request (`actors.admission.is_cacheable`) that misses the response cache
while an identical one — the same response-cache entry key: the tenant's cache scope, the
model, the prompt's token ids and every parameter — is being generated waits for that one's
answer and is given it, as a cache hit, instead of generating the same tokens again: a
burst of identical requests (a popular prompt, a client's retries after a timeout, a
dashboard's panels asking at once) took a sequence each, and was stored as many times.

The first such request is the flight's *leader*: it runs as any request does, and when it
ends its answer *lands* (`Flights.land`, by accounting, as soon as it completes: before its
quota is settled or the answer stored in Redis; the flight stays in the air, answering at
once, until the store is done: `Flights.ground`). The others are *followers*: they wait
without taking a sequence, a queue place or a place in the overload estimate, then replay
the answer; a streamed follower is sent the leader's answer as it is generated (what it
has so far at once, then each delta as the leader's stream gets it: `Admission._tail`),
so its first token waits for the leader's first, not its last. A leader whose client
goes away while followers wait generates on for them (`Admission._detach`). A leader that ends without an answer lands `None`: when it was
cancelled (it could not generate on), the first follower to look again leads the next
flight and the others follow it; when it failed or was refused (what would fail each
copy: a broken adapter, an output constraint, an engine fault), its followers each go on
alone, at once, rather than one after another. A streamed follower already sent part of
the answer does neither: its stream ends with a 503 `unavailable` error (retry).

Who follows (`Admission._flight_to_follow`): a request that looked the cache up (not
`no-cache`, not `only-if-cached`), not streamed behind a beam search (whose tokens all come
at its end), whose priority is not above the leader's (it would wait behind a request
the scheduler puts after it), of the leader's tenant unless the leader already runs (a
tenant of a shared cache pool would wait in another tenant's turn of the queue), and that
a fresh answer satisfies (its `Cache-Control: min-fresh`). Who leads: a request that
would store its answer (not `no-store`). Within one server only: replicas do not see each
other's flights (Redis holds finished answers only).
"""

from __future__ import annotations

from typing import Any

import trio

__all__ = ["Flight", "Flights"]


class Flight:
    """One answer being generated: `landed` is set once `answer` is final (a
    `cache.response_cache.CachedCompletion`, or None: there is none to share)."""

    __slots__ = ("again", "answer", "followers", "landed", "leader", "priority", "progress")

    def __init__(self, priority: int, leader: Any = None) -> None:
        self.priority = priority  # the leader's (higher runs first)
        self.leader = leader  # its actors.state.RequestState (who it is, whether it runs yet)
        self.landed = trio.Event()
        self.answer: Any = None
        self.again = False  # landed without an answer, which another copy may well give (it was cancelled)
        self.followers = 0  # waiting for it now
        self.progress = trio.Event()  # set, and replaced, as the leader's answer grows, and when it lands

    def advance(self) -> None:
        """The leader's answer grew (the stepper recorded a delta), or it landed: streamed
        followers send what is new (`Admission._tail`)."""
        progress, self.progress = self.progress, trio.Event()
        progress.set()


class Flights:
    """The flights of one server, by response-cache entry key. Holds one entry per leader
    in flight (so at most the requests the server holds), each removed when it lands
    without an answer, or once its answer is stored (`Accounting.handle`; 30 s at most)."""

    def __init__(self) -> None:
        self._by_key: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> Flight | None:
        """The flight for `key`: in the air, or landed with an answer not yet stored."""
        return self._by_key.get(key)

    def lead(self, key: str, priority: int, leader: Any = None) -> Flight:
        """A new flight for `key`, whose leader the caller is. There must be none."""
        if key in self._by_key:
            raise ValueError(f"a flight for {key!r} is already in the air")
        flight = self._by_key[key] = Flight(priority, leader)
        return flight

    def land(self, key: str, flight: Flight, answer: Any, *, again: bool = False) -> None:
        """The leader ended: `answer` to its followers. Without one (None) the flight
        leaves at once, and `again` says whether a follower should lead another (the leader
        was cancelled) or each go on alone (it failed). With one, it stays until `ground`:
        a request that misses the cache meanwhile (the answer not stored yet) is answered
        at once. Idempotent: a flight lands once, the first answer stands."""
        if flight.landed.is_set():
            return
        flight.answer, flight.again, flight.leader = answer, again and answer is None, None
        if answer is None:
            self.ground(key, flight)
        flight.landed.set()
        flight.advance()

    def ground(self, key: str, flight: Flight) -> None:
        """The flight leaves the registry (its answer is in the response cache, or not to be)."""
        if self._by_key.get(key) is flight:
            del self._by_key[key]
