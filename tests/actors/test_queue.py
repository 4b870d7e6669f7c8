"""The queue actor with its batching policy, over real trio channels (no engine)."""

from __future__ import annotations

import trio
import trio.testing

from actors.messages import GenerateCall, StreamEvent, TenantContext
from actors.metrics import Metrics
from actors.policies import EngineView, PolicyConfig
from actors.predictor import Prediction
from actors.queue import QueueActor
from actors.queue_policy import QueueConfig
from actors.state import RequestState
from actors.stepper import Completed, Demand
from gpu.sampling import SamplingParams


def state(rid: str, *, tier: int = 0, tenant: str = "t", pred: float | None = None) -> RequestState:
    send, _recv = trio.open_memory_channel[StreamEvent](16)
    params = SamplingParams(max_tokens=64)
    call = GenerateCall(rid, TenantContext(tenant, priority=tier), "m", params, prompt="x")
    st = RequestState(call, [1, 2, 3], params, tier, send)
    if pred is not None:
        st.prediction = Prediction(pred, 0.0, "test")
    return st


class Harness:
    def __init__(self, config: QueueConfig, view=None, room=None):
        self.arr_send, arr_recv = trio.open_memory_channel[RequestState](64)
        self.dem_send, dem_recv = trio.open_memory_channel[Demand](1)
        self.out_send, self.out_recv = trio.open_memory_channel[RequestState](64)
        self.done_send, self.done_recv = trio.open_memory_channel[Completed](64)
        self.actor = QueueActor(config, arr_recv, dem_recv, self.out_send, self.done_send, Metrics(),
                                engine_view=view, room=room)

    async def arrive(self, *states: RequestState) -> None:
        for st in states:
            await self.arr_send.send(st)
        await trio.testing.wait_all_tasks_blocked()

    async def take(self, slots: int) -> list[str]:
        await self.dem_send.send(Demand(slots))
        await trio.testing.wait_all_tasks_blocked()
        out = []
        while True:
            try:
                out.append(self.out_recv.receive_nowait().request_id)
            except trio.WouldBlock:
                return out


async def test_default_policy_runs_higher_tiers_first(nursery):
    h = Harness(QueueConfig())
    await nursery.start(h.actor.run)
    await h.arrive(state("bronze0"), state("bronze1"), state("gold", tier=5))
    assert await h.take(1) == ["gold"]
    assert await h.take(5) == ["bronze0", "bronze1"]
    assert len(h.actor) == 0


async def test_a_released_request_carries_its_policys_engine_priority(nursery):
    """The engine is handed the policy's priority (`BatchPolicy.engine_priority`), not the
    tenant's bare tier: under `priority`, the tier aged as the queue ages it; under the
    others, one value for all (the engine evicted a tier-0 request the queue had let in for
    every higher-tier one, whatever the policy: an audit)."""
    states = {"low": state("low"), "gold": state("gold", tier=5)}
    h = Harness(QueueConfig())
    await nursery.start(h.actor.run)
    await h.arrive(*states.values())
    assert await h.take(2) == ["gold", "low"]
    gold_then_low = states["low"].engine_priority - states["gold"].engine_priority
    assert gold_then_low in (4, 5, 6)  # five tiers, arrived together (floored to whole tiers)
    others = {"a": state("a"), "b": state("b", tier=9)}
    h2 = Harness(QueueConfig(policy=PolicyConfig(name="hybrid")))
    await nursery.start(h2.actor.run)
    await h2.arrive(*others.values())
    assert len(await h2.take(2)) == 2
    assert {st.engine_priority for st in others.values()} == {0}


async def test_configured_policy_is_used_and_demand_caps_the_release(nursery):
    h = Harness(QueueConfig(policy=PolicyConfig(name="magnus")))
    await nursery.start(h.actor.run)
    assert h.actor.policy.name == "magnus"
    await h.arrive(state("long", pred=200), state("short", pred=5), state("mid", pred=60))
    assert await h.take(1) == ["short"]


async def static_batches(nursery, running: dict[str, int], *, live_room: bool = False) -> Harness:
    """A queue of fcfs-static batches of 2 before an engine of 8 seats running `running["n"]`,
    four requests waiting; `live_room`: the queue reads the stepper's room live."""
    h = Harness(QueueConfig(policy=PolicyConfig(name="fcfs-static", static_batch_size=2)),
                lambda: EngineView(running["n"], 8, 1000, 1000, 16),
                room=(lambda: 8 - running["n"]) if live_room else None)
    await nursery.start(h.actor.run)
    await h.arrive(*(state(f"r{k}") for k in range(4)))
    return h


async def released_by_a_poll(h: Harness) -> list[str]:
    """What the dispatcher releases at its next polls, with no new demand."""
    await trio.sleep(0.1)
    await trio.testing.wait_all_tasks_blocked()
    got = []
    while True:
        try:
            got.append(h.out_recv.receive_nowait().request_id)
        except trio.WouldBlock:
            return got


async def test_static_batches_wait_for_an_empty_engine(nursery):
    running = {"n": 0}
    h = await static_batches(nursery, running)
    assert await h.take(8) == ["r0", "r1"]
    running["n"] = 2
    assert await h.take(8) == []  # held: the batch is still in the engine
    running["n"] = 0
    assert await released_by_a_poll(h) == ["r2", "r3"]  # the dispatcher polls with a fresh view


async def test_a_static_batch_goes_once_the_engine_empties_after_a_demand_made_while_it_ran(nursery):
    """The stepper reports its room every step: a demand made while a batch ran (6 of 8
    seats) must not stand for the engine's state for good. The dispatcher polled on it,
    saw 2 running after the engine had emptied, and fcfs-static never released again."""
    running = {"n": 0}
    h = await static_batches(nursery, running)
    assert await h.take(8) == ["r0", "r1"]
    running["n"] = 2
    assert await h.take(6) == []  # the room while the batch runs
    running["n"] = 0
    assert await h.take(8) == []  # the stepper, the batch done, reports its room (queued behind)
    assert await released_by_a_poll(h) == ["r2", "r3"]  # the next poll takes the newer report


async def test_the_room_read_live_releases_the_next_batch_without_a_new_demand(nursery):
    """With the stepper's room read live (as the runtime wires it), the next static batch
    goes at the first poll after the engine empties, not when an idle stepper next reports
    (up to 0.5 s later: a served fcfs-static request took 0.8 s instead of 0.3)."""
    running = {"n": 0}
    h = await static_batches(nursery, running, live_room=True)
    assert await h.take(8) == ["r0", "r1"]
    running["n"] = 2
    assert await h.take(6) == []
    running["n"] = 0
    assert await released_by_a_poll(h) == ["r2", "r3"]


async def test_cancelled_waiting_requests_are_settled_not_sent(nursery):
    h = Harness(QueueConfig())
    await nursery.start(h.actor.run)
    gone, kept = state("gone"), state("kept")
    await h.arrive(gone, kept)
    gone.cancelled = True
    assert await h.take(2) == ["kept"]
    done = h.done_recv.receive_nowait()
    assert done.state is gone and done.outcome == "cancelled"


async def test_a_release_of_cancelled_requests_alone_empties_the_queue(nursery):
    """Cancelled before the purger saw it (no `notice_cancel`), released, dropped: nothing
    goes to the stepper, and the queue must not keep counting it."""
    h = Harness(QueueConfig())
    await nursery.start(h.actor.run)
    gone = state("gone")
    await h.arrive(gone)
    assert len(h.actor) == 1
    gone.cancelled = True
    assert await h.take(2) == []
    assert h.done_recv.receive_nowait().outcome == "cancelled"
    assert len(h.actor) == 0


async def test_cancelled_requests_leave_the_queue_when_noticed_without_a_release(nursery):
    h = Harness(QueueConfig())
    await nursery.start(h.actor.run)
    states = [state(f"r{k}") for k in range(5)]
    await h.arrive(*states)
    for st in states[:3]:
        st.cancelled = True
    h.actor.notice_cancel()  # what a cancel does (Admission's on_cancel): no demand, no step needed
    await trio.sleep(0.1)
    assert len(h.actor) == 2
    done = [h.done_recv.receive_nowait() for _ in range(3)]
    assert [(d.state.request_id, d.outcome) for d in done] == [("r0", "cancelled"), ("r1", "cancelled"),
                                                              ("r2", "cancelled")]
    late = state("late")
    late.cancelled = True  # cancelled before it reached the queue: never waits
    await h.arrive(late)
    assert len(h.actor) == 2 and h.done_recv.receive_nowait().state is late
    assert await h.take(5) == ["r3", "r4"]


async def test_finished_requests_give_back_their_kv_reservation(nursery):
    def view() -> EngineView:
        return EngineView(0, 8, 6, 6, 16)  # 6 blocks (×1.5 overcommit = 9); one request reserves 3 + 64 tokens = 5

    h = Harness(QueueConfig(policy=PolicyConfig(name="magnus")), view)
    await nursery.start(h.actor.run)
    a, b, c = state("a", pred=70), state("b", pred=70), state("c", pred=70)
    await h.arrive(a, b, c)
    first = await h.take(8)
    assert len(first) == 1  # KV reservation by predicted length holds the rest
    assert await h.take(8) == []
    a_or = {"a": a, "b": b, "c": c}[first[0]]
    a_or.finished_at = 1.0
    a_or.completion_tokens = 60
    await trio.sleep(0.1)  # the held demand is re-evaluated on the next poll
    await trio.testing.wait_all_tasks_blocked()
    assert h.out_recv.receive_nowait().request_id in {"a", "b", "c"}  # the reservation was given back


async def test_reservations_go_back_when_the_last_requests_finish_with_nothing_waiting(nursery):
    """The queue drains, then its released requests finish: with no arrival to trigger a
    release decision, the dispatcher still reconciles them, so the KV gauge reads 0 (it read
    the last batch's reservations forever after a served benchmark)."""
    def view() -> EngineView:
        return EngineView(0, 8, 64, 64, 16)

    h = Harness(QueueConfig(policy=PolicyConfig(name="magnus")), view)
    h.actor.reconcile_s = 0.05
    await nursery.start(h.actor.run)
    a, b = state("a", pred=70), state("b", pred=70)
    await h.arrive(a, b)
    assert sorted(await h.take(8)) == ["a", "b"]
    reg = h.actor.metrics.registry
    assert reg.get_sample_value("lmgate_kv_reserved_blocks") == 10
    assert await h.take(8) == []  # the stepper asks for more; nothing waits
    for st in (a, b):
        st.finished_at, st.completion_tokens = 1.0, 60
    await trio.sleep(0.2)
    assert reg.get_sample_value("lmgate_kv_reserved_blocks") == 0
    assert h.actor.policy.kv.held == 0 and not h.actor.policy.inflight


async def test_a_request_that_outgrows_its_reservation_holds_back_the_next(nursery):
    progress: dict[str, int] = {}

    def view() -> EngineView:  # 4 blocks (×1.5 = 6 may be reserved); what each request generated so far
        return EngineView(len(progress), 8, 4, 4, 16, output_tokens=progress.get)

    h = Harness(QueueConfig(policy=PolicyConfig(name="magnus")), view)
    await nursery.start(h.actor.run)
    await h.arrive(state("a", pred=8))  # 3 + 10 tokens: 1 block
    assert await h.take(8) == ["a"]
    progress["a"] = 60  # far past its prediction: its reservation grows to 3 + 64 tokens, 5 blocks
    await h.arrive(state("b", pred=8), state("c", pred=8))
    assert await h.take(8) == ["b"]  # 5 + 1 fill the 6; without growth all three would hold 3
    reg = h.actor.metrics.registry
    assert reg.get_sample_value("lmgate_kv_reserved_blocks") == 6
    assert reg.get_sample_value("lmgate_kv_reservations_grown_total") == 1


async def test_drain_returns_everything_waiting(nursery):
    h = Harness(QueueConfig())
    await nursery.start(h.actor.run)
    await h.arrive(state("x"), state("y"))
    assert sorted(s.request_id for s in h.actor.drain()) == ["x", "y"]
    assert len(h.actor) == 0
