"""gateway.responses_live: what a server keeps of its Responses runs."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from gateway.responses_live import LiveResponse, LiveResponses


def ended(response_id: str) -> LiveResponse:
    """A stored response (not background) that has been answered, its end not yet taken by Redis."""
    turn = SimpleNamespace(renderer=SimpleNamespace(response_id=response_id), done=True, unwritten=True)
    return LiveResponse("o", turn, SimpleNamespace(aborted=False), background=False)  # type: ignore[arg-type]


def test_ended_responses_waiting_for_redis_are_kept_up_to_a_bound(caplog) -> None:
    """Each stored response answered in an outage is kept until Redis takes it (GET answers
    from it): without a bound, an outage at 50 requests/s kept 30,000 of them."""
    lives = LiveResponses(max_unwritten=2)
    made = [ended(f"resp_{i}") for i in range(3)]
    for live in made:
        lives.add(live)
    assert lives.get("o", "resp_2") is made[2]  # (each call prunes)
    assert [live.turn.unwritten for live in made] == [False, True, True]  # the oldest let go: its retry ends
    assert "the oldest 1 are let go" in caplog.text
    assert lives.get("o", "resp_0") is None and lives.get("o", "resp_1") is made[1]
    made[1].turn.unwritten = False  # written
    assert lives.get("o", "resp_1") is None and len(lives) == 1


async def test_an_end_waiting_for_redis_lets_a_shutdown_go_at_once() -> None:
    """Its wait grows to a minute between tries (a Redis refusing writes never "answers"):
    a shutdown must not wait it out (the app waits for its tasks up to grace + 5 s)."""
    from gateway.responses_live import keep_when_answered

    async def keep() -> None:
        raise AssertionError("not tried again once draining")

    turn = SimpleNamespace(renderer=SimpleNamespace(response_id="resp_1"), req=SimpleNamespace(background=False),
                           unwritten=True, keep=keep)
    store = SimpleNamespace(store=SimpleNamespace(answered=trio.sleep_forever))
    draining = trio.Event()

    async def shutdown() -> None:
        await trio.sleep(0.1)
        draining.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(shutdown)
        with trio.fail_after(2):
            assert not await keep_when_answered(turn, store, gone=lambda: False, retry_s=30, draining=draining)
    assert not turn.unwritten  # (given up: let go)
