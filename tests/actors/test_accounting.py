"""actors.accounting: one request's accounting failing leaves the others' alone."""

from __future__ import annotations

import trio

from actors.accounting import Accounting, UsageRecord


def record(request_id: str) -> UsageRecord:
    return UsageRecord(tenant_id="t", request_id=request_id, quota_tenant=None, reserved=True, ran=True,
                       prompt_tokens=3, model="m", outcome="ok")


async def test_one_requests_accounting_failing_does_not_cancel_the_others(caplog) -> None:
    """An error in one request's accounting failed the actor's nursery, which cancelled every
    other settle in flight (those waiting out a Redis outage lost their usage); it is logged,
    its request counted as settled, and the others go on."""
    send, recv = trio.open_memory_channel(10)
    accounting = Accounting(recv, None, model_name="m", feedback=None, service_time=None)
    release, done = trio.Event(), []

    async def fake_record(c: UsageRecord) -> None:
        if c.request_id == "bad":
            raise RuntimeError("boom")
        await release.wait()  # (a settle waiting for Redis)
        done.append(c.request_id)
        c.settled.set()

    accounting._record = fake_record
    slow, bad = record("slow"), record("bad")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(accounting.run)
            await send.send(slow)
            await send.send(bad)
            await bad.settled.wait()
            release.set()
            await slow.settled.wait()
            nursery.cancel_scope.cancel()
    assert done == ["slow"] and accounting.pending == 0
    assert "accounting of request bad failed" in caplog.text
