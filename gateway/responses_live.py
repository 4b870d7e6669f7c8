"""Responses API runs in flight on this server: what `GET /v1/responses/{id}` reads while a
response runs, and background mode (`background: true`).

A background response is accepted (admission and quotas as any request), stored at once
as `queued`, and answered at once; it then runs in the app's nursery (`run_background`),
not in the request that created it, so neither a client that disconnects nor one that
never reads ends it. While it runs:
- every stream event is kept in order (`LiveResponse.log`, `sequence_number` k at index
  k), so a stream that dropped resumes after the last event it read
  (`GET ...?stream=true&starting_after=N`);
- it is rewritten in the store every `tick_s` while it changes, and at least every
  `orphan_after_s / 3` while it waits, with the time by which it is written again
  (`StoredResponse.running_until`): another server of the same Redis reads its progress,
  and a response whose server stopped reads as failed instead of in progress for good;
- its events are pushed to Redis each tick too (`share_events`), so that a stream resumes
  on any server of the same Redis, which reads them there (half a second behind);
- a cancellation (`POST .../cancel`) ends it as `cancelled`, whether asked here
  (`LiveResponse.cancel`) or of another server (a flag read every tick); deleting it
  cancels it too, and its later writes do not bring it back (`put(existing=True)`).

Events of background responses are kept `keep_s` after their end (at most `max_kept`
of them), for a stream to resume; the response itself is in the store for its TTL.
A response that is not background is here only while it runs (`GET` shows its output so
far on this server; other servers find it once it is stored, at its end).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from actors.messages import Failed
from cache.store import CacheUnavailable
from gateway.sse import IDLE, Idle

if TYPE_CHECKING:
    from cache.response_store import ResponseStore
    from gateway.routes_openai import Handle
    from gateway.routes_responses import Turn

log = logging.getLogger("lmgate.gateway")

TICK_S = 1.0  # how often a running background response is written and its cancel flag read
ORPHAN_AFTER_S = 30.0  # a background response not written for this long was left by a stopped server
FINAL_WRITE_S = 3.0  # at most this long to store how a cancelled or interrupted run ended
FINAL_RETRY_S = 5.0  # then, Redis down, its end is written again when it answers, or after this
RETRY_MAX_S = 60.0  # (doubling up to this)
MAX_UNWRITTEN = 256  # ended runs kept here at most, waiting for Redis to take them (the oldest let go)
EVENTS_KEEP_S = 600.0  # a background response's events are kept this long after its end, here and in Redis
TERMINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete",
                   "failed": "response.failed", "cancelled": "response.cancelled"}


@dataclass(eq=False)
class LiveResponse:
    """One Responses run on this server."""

    owner: str  # `cache.response_store.owner_of` its tenant
    turn: Turn
    handle: Handle
    background: bool
    log: list[dict[str, Any]] = field(default_factory=list)  # background: every event so far
    ended: trio.Event = field(default_factory=trio.Event)  # background: the run is over and stored
    ended_at: float | None = None
    cancel_asked: bool = False
    deleted: bool = False  # (its later writes must not store it again)
    pushed: int = 0  # events of `log` shared in Redis for other servers' streams (`share_events`)
    pushed_bytes: int = 0
    scope: trio.CancelScope | None = None
    _grew: trio.Event = field(default_factory=trio.Event)

    @property
    def response_id(self) -> str:
        return self.turn.renderer.response_id

    @property
    def over(self) -> bool:
        """Nothing more will come: a background run has ended; another has ended, or its
        client went away (its body was abandoned without ever being read, perhaps)."""
        if self.background:
            return self.ended.is_set()
        return self.turn.done or self.handle.aborted

    def snapshot(self) -> dict[str, Any]:
        """The Response object as it stands, with the output so far."""
        return self.turn.renderer.current()

    def add(self, event: dict[str, Any]) -> None:
        self.log.append(event)
        self._grew.set()
        self._grew = trio.Event()

    def end(self) -> None:
        self.ended_at = time.monotonic()
        self.ended.set()
        self._grew.set()

    def cancel(self) -> None:
        """End the run as `cancelled` (idempotent; nothing once it has ended)."""
        if self.ended.is_set():
            return
        self.cancel_asked = True
        if self.scope is not None:
            self.scope.cancel()

    async def follow(self, after: int, idle_after: float | None = None) -> AsyncIterator[dict[str, Any] | Idle]:
        """The events after sequence number `after`, then each as it comes, until the last;
        with `idle_after`, an `IDLE` after each `idle_after` seconds without one (a stream's ping)."""
        i = max(0, after + 1)  # the log holds event k at index k
        while True:
            while i < len(self.log):
                yield self.log[i]
                i += 1
            if self.ended.is_set():
                return
            with trio.move_on_after(math.inf if idle_after is None else idle_after) as idle:
                await self._grew.wait()
            if idle.cancelled_caught:
                yield IDLE


class LiveResponses:
    """The runs of this server by (owner, response id); ended background runs stay
    `keep_s` (at most `max_kept` of them, the oldest go first)."""

    def __init__(self, *, keep_s: float = EVENTS_KEEP_S, max_kept: int = 64, max_unwritten: int = MAX_UNWRITTEN
                 ) -> None:
        self.keep_s = keep_s
        self.max_kept = max_kept
        self.max_unwritten = max_unwritten
        self._live: dict[tuple[str, str], LiveResponse] = {}

    def __len__(self) -> int:
        return len(self._live)

    def add(self, live: LiveResponse) -> None:
        self._prune()
        self._live[(live.owner, live.response_id)] = live

    def get(self, owner: str, response_id: str) -> LiveResponse | None:
        """The run, unless it was deleted (here, or by another server: `keep_stored`)."""
        self._prune()
        live = self._live.get((owner, response_id))
        if live is not None and live.deleted:
            del self._live[(owner, response_id)]
            return None
        return live

    def pop(self, owner: str, response_id: str) -> LiveResponse | None:
        return self._live.pop((owner, response_id), None)

    def running(self) -> int:
        """Background runs not yet ended."""
        # (a copy taken at once: a /metrics scrape reads this from a worker thread)
        return sum(1 for live in list(self._live.values()) if live.background and not live.ended.is_set())

    def _prune(self) -> None:
        now = time.monotonic()
        kept: list[tuple[float, tuple[str, str]]] = []
        unwritten: list[LiveResponse] = []  # ended, their end not yet taken by Redis: GET answers from them
        for key, live in list(self._live.items()):
            if not live.background:
                if live.over and not live.turn.unwritten:
                    del self._live[key]
                    continue
            elif live.ended_at is not None:
                if now - live.ended_at > self.keep_s:
                    del self._live[key]
                    continue
                if not live.turn.unwritten:  # (the unwritten are not among the `max_kept`)
                    kept.append((live.ended_at, key))
            if live.over and live.turn.unwritten:
                unwritten.append(live)
        kept.sort()
        for _, key in kept[:max(0, len(kept) - self.max_kept)]:
            del self._live[key]
        if len(unwritten) > self.max_unwritten:  # (in the order they were added: the oldest first)
            for live in unwritten[:len(unwritten) - self.max_unwritten]:
                live.turn.unwritten = False  # (its retry ends; pruned at the next call)
            log.warning("more than %d ended responses wait for Redis to take them: the oldest %d are let go "
                        "(not stored)", self.max_unwritten, len(unwritten) - self.max_unwritten)


def only_cancelled(group: BaseExceptionGroup) -> trio.Cancelled | None:
    """A `trio.Cancelled` of the group when it holds nothing else (nested groups too)."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            walk(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e)

    walk(group)
    return leaves[0] if leaves and all(isinstance(e, trio.Cancelled) for e in leaves) else None  # type: ignore[return-value]


async def run_background(live: LiveResponse, store: ResponseStore, *, tick_s: float = TICK_S,
                         orphan_after_s: float = ORPHAN_AFTER_S, draining: trio.Event | None = None) -> None:
    """Run a background response to its end, keeping its events and its stored copy up to
    date (see the module docstring). Cancelled from outside (the server stopping), it is
    stored as failed before the cancellation goes on. An end Redis could not take is
    written once it answers (`write_when_answered`; not past `draining`, the server's
    shutdown)."""
    turn, renderer = live.turn, live.turn.renderer
    failure: str | None = None
    stopped = True  # until the run ends here: what leaves early is the server stopping
    try:
        with trio.CancelScope() as live.scope:
            if live.cancel_asked:
                live.scope.cancel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_stored, live, store, tick_s, orphan_after_s)
                try:
                    async with aclosing(turn.events(live.handle)) as events:
                        async for event in events:
                            live.add(event)
                except Exception as exc:  # (the runtime's stream closed without an end)
                    log.exception("background response %s failed", live.response_id)
                    failure = str(getattr(exc, "message", exc)) or type(exc).__name__
                nursery.cancel_scope.cancel()
        stopped = False
    except BaseExceptionGroup as group:  # its tasks cancelled from outside (a server cut short)
        cancelled = only_cancelled(group)
        if cancelled is None:
            raise
        raise cancelled from None  # as one Cancelled: Quart logged the group as an error
    finally:
        if renderer.running:
            if stopped:
                failure = "the server stopped before the response ended"
            ended = (renderer.cancelled() if live.cancel_asked and failure is None
                     else renderer.failed(Failed(live.response_id, 500, "server_error",
                                                 failure or "the response ended without an answer")))
            for event in ended:
                live.add(event)
        with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_S) as final:
            if (not turn.kept or turn.unwritten) and not live.deleted:
                await turn.keep()
            live.deleted = live.deleted or turn.deleted  # (its write found it deleted by another server)
            if not live.deleted:
                await share_events(live, store)
        if final.cancelled_caught and not turn.kept:
            turn.unwritten = True
        live.end()
    if turn.unwritten:  # (not when cut short from outside: the server is stopping)
        await write_when_answered(live, store, draining=draining)


async def write_when_answered(live: LiveResponse, store: ResponseStore, *, retry_s: float = FINAL_RETRY_S,
                              give_up_s: float = EVENTS_KEEP_S, draining: trio.Event | None = None) -> None:
    """A background run ended while Redis could not take its end: the stored copy still
    reads queued or in progress (then, its `running_until` past, failed as if this server
    had stopped), though it was generated, billed and maybe cancelled. Write it
    (`keep_when_answered`), then share its last events."""
    written = await keep_when_answered(live.turn, store, gone=lambda: live.deleted or live.turn.deleted,
                                       retry_s=retry_s, give_up_s=give_up_s, draining=draining)
    live.deleted = live.deleted or live.turn.deleted  # (its write found it deleted by another server)
    if written and not live.deleted:
        await share_events(live, store)


async def keep_foreground_when_answered(live: LiveResponse, store: ResponseStore, *,
                                        draining: trio.Event | None = None) -> None:
    """A stored response answered while Redis could not take it: stored once Redis answers
    (`keep_when_answered`), else a later `previous_response_id` gets a 404. Given up, it is
    let go (GET then reads the store: not found)."""
    async def asked_deleted() -> bool:  # (of another server, which found nothing stored to delete)
        return await store.cancel_requested(live.owner, live.response_id) == "delete"

    if not await keep_when_answered(live.turn, store, gone=lambda: live.turn.deleted, draining=draining,
                                    asked_deleted=asked_deleted):
        live.turn.unwritten = False
    if live.turn.deleted:  # a write in flight as it was deleted (here or elsewhere) may have landed after the delete
        with contextlib.suppress(CacheUnavailable):
            await store.delete(live.owner, live.response_id)


async def keep_when_answered(turn: Turn, store: ResponseStore, *, gone: Callable[[], bool],
                             retry_s: float = FINAL_RETRY_S, give_up_s: float = EVENTS_KEEP_S,
                             draining: trio.Event | None = None,
                             asked_deleted: Callable[[], Awaitable[bool]] | None = None) -> bool:
    """Write `turn`'s end, which Redis could not take (`Turn.unwritten`), once Redis answers
    again (woken by the store's watcher), or after `retry_s` meanwhile (doubling up to
    RETRY_MAX_S, with jitter: a Redis refusing writes never "answers", and many such ends
    must not all write at once), until it is written, `gone()` or `asked_deleted()`,
    `give_up_s` has passed, the server drains (a shutdown does not wait on Redis), or
    `LiveResponses` lets it go (too many waiting); this server's GET answers from the run
    until then (`retrieve`). Returns whether it was written."""
    give_up = trio.current_time() + give_up_s
    wait = retry_s
    written = False
    while turn.unwritten and not gone():
        if trio.current_time() >= give_up or (draining is not None and draining.is_set()):
            log.warning("response %s: its end could not be stored (Redis down)%s", turn.renderer.response_id,
                        ": the stored copy will read as failed" if turn.req.background else "")
            turn.unwritten = False
            return False
        with trio.move_on_at(min(give_up, trio.current_time() + wait + random.uniform(0, 1))):
            await first_of(store.store.answered, *([draining.wait] if draining is not None else []))
        wait = min(wait * 2, RETRY_MAX_S)
        if draining is not None and draining.is_set():
            continue  # (given up above)
        try:
            if asked_deleted is not None and await asked_deleted():
                turn.deleted = True
                break
            if turn.unwritten:  # (let go meanwhile: too many waiting)
                await turn.keep()
                written = not turn.unwritten
        except CacheUnavailable:
            continue
        except Exception:  # (a Redis reply not foreseen): given up, not left waiting for good
            log.exception("response %s: its end could not be stored", turn.renderer.response_id)
            turn.unwritten = False
            return False
    if written and asked_deleted is not None:  # (another server's delete may have come as it was written)
        with contextlib.suppress(CacheUnavailable):
            if await asked_deleted():
                turn.deleted = True
    return written and not gone()


async def first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as one of `waits` returns."""
    async with trio.open_nursery() as nursery:
        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)


async def share_events(live: LiveResponse, store: ResponseStore) -> None:
    """Push the events not yet shared to Redis, for streams that resume on another server;
    best effort, and not past `store.max_entry_bytes` of them (those streams then get the
    terminal event alone, as without this)."""
    if live.pushed >= len(live.log) or live.pushed_bytes > store.max_entry_bytes:
        return
    end = len(live.log)  # (the run may add events while this waits for Redis)
    try:
        added, before = await store.push_events(live.owner, live.response_id, live.log[live.pushed:end],
                                                EVENTS_KEEP_S, first=live.pushed)
        if before < live.pushed:  # the shared list expired (a long wait without events): again from its start
            added, _ = await store.push_events(live.owner, live.response_id, live.log[before:end], EVENTS_KEEP_S,
                                               first=before)
    except CacheUnavailable as exc:
        log.debug("background response %s: events not shared this time: %s", live.response_id, exc)
        return
    live.pushed_bytes += added
    live.pushed = end


async def keep_stored(live: LiveResponse, store: ResponseStore, tick_s: float, orphan_after_s: float) -> None:
    """Each tick: cancel the run if another server was asked to; store it again if it
    changed, or if its `running_until` is a third spent. A write that finds it deleted
    cancels it."""
    turn, renderer = live.turn, live.turn.renderer
    written, written_at = -1, time.monotonic()  # the store has it as accepted, before any event
    while True:
        await trio.sleep(tick_s)
        try:
            asked = await store.cancel_requested(live.owner, live.response_id)
            if asked is not None:  # (asked of another server)
                live.deleted = live.deleted or asked == "delete"  # (nothing of it kept or shared again)
                live.cancel()
                return
            if renderer.last_sequence == written and time.monotonic() - written_at < orphan_after_s / 3:
                continue
            stored = turn.stored(running_until=time.time() + orphan_after_s)
            if not store.fits(stored):
                written, written_at = renderer.last_sequence, math.inf  # (its end is stored only if it fits)
                continue
            if not await store.put(live.owner, stored, existing=True):
                live.deleted = True
                live.cancel()
                return
            await share_events(live, store)  # (after the write that finds a deleted response out)
            written, written_at = renderer.last_sequence, time.monotonic()
        except CacheUnavailable as exc:
            log.debug("background response %s: not stored this tick: %s", live.response_id, exc)
        except Exception:  # (a Redis reply not foreseen): the run goes on, its end is stored by the run
            log.exception("background response %s: its stored copy was not updated", live.response_id)


__all__ = ["LiveResponse", "LiveResponses", "ORPHAN_AFTER_S", "TERMINAL_EVENTS", "keep_foreground_when_answered",
           "keep_when_answered", "run_background", "write_when_answered"]
