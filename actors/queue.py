"""The queue actor: waiting requests, ordered by policy, handed out on demand.

Two tasks share one policy object (`actors.queue_policy`)::

    arrivals ──▶ [ policy: priority + aging ] ──▶ dispatcher ──▶ stepper intake
                                                      ▲
                                   stepper ── Demand(slots) ──┘

The dispatcher sends only as many requests as the stepper reported free
slots, so ordering decisions are made as late as possible: a request that
arrives while the engine is full can still overtake older, lower-priority ones.
"""

from __future__ import annotations

import trio

from actors.metrics import Metrics
from actors.queue_policy import PriorityAgingQueue, QueueConfig
from actors.state import RequestState
from actors.stepper import Completed, Demand


class QueueActor:
    def __init__(
        self,
        config: QueueConfig,
        arrivals: trio.MemoryReceiveChannel[RequestState],
        demand: trio.MemoryReceiveChannel[Demand],
        to_stepper: trio.MemorySendChannel[RequestState],
        completed: trio.MemorySendChannel[Completed],
        metrics: Metrics,
    ) -> None:
        self.policy: PriorityAgingQueue[RequestState] = PriorityAgingQueue(config, trio.current_time)
        self.arrivals = arrivals
        self.demand = demand
        self.to_stepper = to_stepper
        self.completed = completed
        self.metrics = metrics
        self._arrived = trio.Event()

    def __len__(self) -> int:
        return len(self.policy)

    def _pop_live(self) -> RequestState | None:
        """Next request to run; cancelled ones are settled on the way out."""
        while (st := self.policy.pop()) is not None:
            if not st.cancelled:
                return st
            st.events.close()
            self.completed.send_nowait(Completed(st, "cancelled"))
        return None

    def drain(self) -> list[RequestState]:
        """Remove and return everything waiting (shutdown / crash recovery)."""
        out = []
        while (st := self.policy.pop()) is not None:
            out.append(st)
        return out

    async def _receive_arrivals(self) -> None:
        async for st in self.arrivals:
            self.policy.push(st, -st.priority)  # tenant tiers run higher-first; the policy runs lower keys first
            self.metrics.waiting.set(len(self.policy))
            self._arrived.set()

    async def _dispatch(self) -> None:
        async for want in self.demand:
            sent = 0
            while sent < want.slots:
                st = self._pop_live()
                if st is None:
                    if sent:
                        break  # the engine has work; do not hold its demand hostage
                    self._arrived = trio.Event()
                    await self._arrived.wait()
                    continue
                await self.to_stepper.send(st)
                sent += 1
            self.metrics.waiting.set(len(self.policy))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_arrivals)
            nursery.start_soon(self._dispatch)
            task_status.started()
