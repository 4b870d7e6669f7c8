"""actors.flights: the registry of identical requests in flight (pure; the collapsing
itself is exercised end to end in tests/actors/test_runtime.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors.flights import Flights


async def test_a_flight_lands_once_and_leaves_the_air():
    flights = Flights()
    flight = flights.lead("k", priority=3)
    assert flights.get("k") is flight and len(flights) == 1 and flight.priority == 3
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
        flights.land("k", flight, "answer")
    assert got == ["answer", "answer"] and flights.get("k") is None and len(flights) == 0
    flights.land("k", flight, "another")  # a second landing changes nothing
    assert flight.answer == "answer"


async def test_an_old_flight_landing_late_does_not_ground_the_next():
    flights = Flights()
    first = flights.lead("k", priority=0)
    flights.land("k", first, None)
    second = flights.lead("k", priority=0)
    flights.land("k", first, None)
    assert flights.get("k") is second and not second.landed.is_set()
