"""actors.flights: the registry of identical requests in flight (pure; the collapsing
itself is exercised end to end in tests/actors/test_runtime.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors.flights import Flights


async def test_a_flight_lands_once_and_answers_until_it_is_grounded():
    flights = Flights()
    flight = flights.lead("k", priority=3, leader="its state")
    assert flights.get("k") is flight and len(flights) == 1 and (flight.priority, flight.leader) == (3, "its state")
    with pytest.raises(ValueError):
        flights.lead("k", priority=0)  # one leader a key
    got = []

    async def follow() -> None:
        await flight.landed.wait()
        got.append(flight.answer)

    async with trio.open_nursery() as n:
        n.start_soon(follow)
        n.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        flights.land("k", flight, "answer", again=True)
    assert got == ["answer", "answer"] and not flight.again and flight.leader is None
    assert flights.get("k") is flight  # landed, its answer not stored yet: it still answers
    flights.land("k", flight, "another")  # a second landing changes nothing
    assert flight.answer == "answer"
    flights.ground("k", flight)
    assert flights.get("k") is None and len(flights) == 0


async def test_a_flight_without_an_answer_leaves_at_once_and_says_whether_to_fly_again():
    flights = Flights()
    cancelled = flights.lead("k", priority=0)
    flights.land("k", cancelled, None, again=True)
    assert flights.get("k") is None and cancelled.landed.is_set() and cancelled.again
    failed = flights.lead("k", priority=0)
    flights.land("k", failed, None)
    assert flights.get("k") is None and not failed.again


async def test_an_old_flight_grounded_late_does_not_ground_the_next():
    flights = Flights()
    first = flights.lead("k", priority=0)
    flights.land("k", first, None)
    second = flights.lead("k", priority=0)
    flights.ground("k", first)
    flights.land("k", first, None)
    assert flights.get("k") is second and not second.landed.is_set()
