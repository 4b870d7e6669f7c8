"""Who runs next: waiting-request ordering (pure logic, no trio).

Policy, not mechanism: the queue decides the order in which admitted requests
are handed to the stepper; the step scheduler decides how a step is packed.

`PriorityAgingQueue` orders by an effective priority::

    effective = tier - waited_seconds / aging_seconds      (lower runs first)

so a tier-2 request that has waited `2 * aging_seconds` competes with a fresh
tier-0 one: nothing starves. Ties go first-come-first-served. The order is
recomputed on `pop` (O(n) over the waiting set, which admission keeps bounded);
a heap would be stale because aging changes every key over time at the same
rate only within one tier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from actors.policies import PolicyConfig

T = TypeVar("T")


@dataclass(frozen=True)
class QueueConfig:
    aging_seconds: float = 10.0  # one tier of priority gained per this many seconds waited
    max_waiting: int = 1024  # admission refuses (503) beyond this
    # the batching policy (`actors.policies`); None → "priority" with `aging_seconds`
    policy: PolicyConfig | None = None

    def policy_config(self) -> PolicyConfig:
        """The policy the queue actor runs (its aging follows `aging_seconds` unless set)."""
        if self.policy is None:
            return PolicyConfig(name="priority", aging_s=self.aging_seconds)
        return self.policy

    def __post_init__(self) -> None:
        if self.aging_seconds <= 0:
            raise ValueError("aging_seconds must be positive")
        if self.max_waiting <= 0:
            raise ValueError("max_waiting must be positive")


@dataclass
class _Entry(Generic[T]):
    seq: int
    priority: int
    enqueued: float
    item: T = field(compare=False)


class PriorityAgingQueue(Generic[T]):
    """Waiting requests by tier with aging; FCFS within equal effective priority."""

    def __init__(self, config: QueueConfig, clock: Callable[[], float]):
        self.config = config
        self._clock = clock
        self._entries: dict[int, _Entry[T]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[T]:
        return (e.item for e in self._entries.values())

    def push(self, item: T, priority: int) -> int:
        """Add an item; returns a handle for `remove`."""
        self._seq += 1
        self._entries[self._seq] = _Entry(self._seq, priority, self._clock(), item)
        return self._seq

    def remove(self, handle: int) -> T | None:
        e = self._entries.pop(handle, None)
        return None if e is None else e.item

    def _key(self, e: _Entry[T], now: float) -> tuple[float, int]:
        return (e.priority - (now - e.enqueued) / self.config.aging_seconds, e.seq)

    def pop(self) -> T | None:
        """Remove and return the item that should run next (None when empty)."""
        if not self._entries:
            return None
        now = self._clock()
        best = min(self._entries.values(), key=lambda e: self._key(e, now))
        del self._entries[best.seq]
        return best.item

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting item has waited (0 when empty)."""
        if not self._entries:
            return 0.0
        return self._clock() - min(e.enqueued for e in self._entries.values())
