"""The compute thread: every torch call of a serving process on one long-lived thread."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from actors.compute import ComputeThread, InlineCompute, release_openmp_pool


async def test_calls_run_in_order_on_one_thread_that_is_not_the_loops():
    compute = ComputeThread()
    try:
        seen: list[tuple[int, int]] = []

        def work(i: int) -> int:
            seen.append((i, threading.get_ident()))
            return i * i

        async with trio.open_nursery() as n:
            results: dict[int, int] = {}

            async def one(i: int) -> None:
                results[i] = await compute.run(work, i)

            for i in range(8):
                n.start_soon(one, i)
        assert results == {i: i * i for i in range(8)}
        assert len({tid for _, tid in seen}) == 1 and seen[0][1] != threading.get_ident()
        # the loop is free while a call runs
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.005)
                ticks += 1

        async with trio.open_nursery() as n:
            n.start_soon(ticker)
            await compute.run(time.sleep, 0.2)
            n.cancel_scope.cancel()
        assert ticks >= 5
    finally:
        compute.close()


async def test_an_exception_comes_back_and_the_thread_goes_on():
    compute = ComputeThread()
    try:
        with pytest.raises(ZeroDivisionError):
            await compute.run(lambda: 1 / 0)
        assert await compute.run(lambda: 7) == 7
        # a call made from the thread itself runs inline instead of deadlocking
        assert await compute.run(lambda: compute.run_blocking(lambda: 3) + 1) == 4
    finally:
        compute.close()


async def test_a_cancelled_caller_still_waits_for_its_call_to_finish():
    """An engine step cut off halfway would leave the engine torn: a cancel takes effect
    only once the call is done."""
    compute = ComputeThread()
    done = threading.Event()

    def slow() -> None:
        time.sleep(0.3)
        done.set()

    try:
        with trio.move_on_after(0.05) as scope:
            await compute.run(slow)
            finished_inside = done.is_set()
            await trio.sleep(0)  # the cancel lands at the next checkpoint
        assert finished_inside and scope.cancelled_caught
    finally:
        compute.close()


async def test_close_stops_the_thread_and_a_later_call_starts_another():
    compute = ComputeThread()
    first = await compute.run(threading.get_ident)
    compute.close()
    assert not any(t.ident == first for t in threading.enumerate())
    second = await compute.run(threading.get_ident)
    assert second != threading.get_ident()
    compute.close()


async def test_inline_compute_runs_on_the_calling_thread():
    assert await InlineCompute().run(threading.get_ident) == threading.get_ident()


def test_the_calling_threads_openmp_pool_can_be_released():
    import torch

    torch.ones(256, 256) @ torch.ones(256, 256)  # libgomp loaded, this thread's pool made
    assert release_openmp_pool()
