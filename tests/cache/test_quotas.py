"""Quota scripts against a real Redis: each limit, atomicity across clients, settle/release."""

from __future__ import annotations

import datetime as dt
import inspect
import time

import pytest
import trio

from cache.quotas import (
    DONE_TTL_S,
    Admitted,
    Denied,
    DuplicateRequest,
    Progress,
    Quota,
    QuotaManager,
    RateLimits,
    UsageRow,
)
from cache.store import RedisStore
from cache.tenants import Tenant, TenantRegistry


def make_tenant(quota: Quota, tenant_id: str = "acme") -> Tenant:
    return Tenant(id=tenant_id, name=tenant_id, quota=quota)


@pytest.fixture
async def quotas(store: RedisStore) -> QuotaManager:
    return QuotaManager(store)


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


async def away_from_minute_edge(store: RedisStore) -> None:
    """Fixed TPM windows turn over on the Redis clock's minute: tests that need a
    few calls in one window wait out the last 2 s of a minute."""
    now = (await store.client.time()).timestamp()
    if now % 60 > 58:
        await trio.sleep(60 - now % 60 + 0.05)


async def test_unlimited_quota_admits(quotas: QuotaManager):
    tenant = make_tenant(Quota())
    for i in range(20):
        assert await quotas.reserve(tenant, f"r{i}", 1000, 1000) == Admitted(f"r{i}", 2000, None, 1000)


async def test_requests_per_minute_sliding_window(quotas: QuotaManager):
    tenant = make_tenant(Quota(requests_per_minute=3))
    for i in range(3):
        assert isinstance(await quotas.reserve(tenant, f"r{i}", 1, 1), Admitted)
    denied = await quotas.reserve(tenant, "r3", 1, 1)
    assert isinstance(denied, Denied) and denied.limit == "requests_per_minute"
    # the oldest entry leaves the 60 s window in just under 60 s
    assert 58 < denied.retry_after_s <= 60
    # settling does not give the request back: it was made
    await quotas.settle(tenant, "r0", 1, 1, "m")
    assert isinstance(await quotas.reserve(tenant, "r4", 1, 1), Denied)
    # other tenants are independent
    assert isinstance(await quotas.reserve(make_tenant(Quota(requests_per_minute=3), "other"), "r0", 1, 1), Admitted)


async def test_tokens_per_minute(store: RedisStore, quotas: QuotaManager):
    await away_from_minute_edge(store)
    tenant = make_tenant(Quota(tokens_per_minute=150))
    assert isinstance(await quotas.reserve(tenant, "a", 10, 90), Admitted)  # 100 reserved
    denied = await quotas.reserve(tenant, "b", 10, 90)
    assert isinstance(denied, Denied) and denied.limit == "tokens_per_minute"
    assert denied.reason == "100 of 150 tokens per minute used; this request needs 100"
    assert 0 < denied.retry_after_s <= 60  # rest of the fixed window
    # settle replaces the 100 reserved tokens with the 15 really used: b now fits
    assert await quotas.settle(tenant, "a", 10, 5, "m")
    assert isinstance(await quotas.reserve(tenant, "b", 10, 90), Admitted)
    # a request bigger than the whole limit can never pass: no retry
    too_big = await quotas.reserve(tenant, "c", 100, 51)
    assert isinstance(too_big, Denied) and too_big.retry_after_s is None


async def test_max_concurrent(quotas: QuotaManager):
    tenant = make_tenant(Quota(max_concurrent=2))
    assert isinstance(await quotas.reserve(tenant, "a", 1, 1), Admitted)
    assert isinstance(await quotas.reserve(tenant, "b", 1, 1), Admitted)
    assert await quotas.running("acme") == 2
    denied = await quotas.reserve(tenant, "c", 1, 1)
    assert isinstance(denied, Denied) and denied.limit == "max_concurrent"
    assert denied.retry_after_s == 1.0
    assert await quotas.settle(tenant, "a", 1, 1, "m")
    assert await quotas.running("acme") == 1
    assert isinstance(await quotas.reserve(tenant, "c", 1, 1), Admitted)


async def test_max_tokens_cap(quotas: QuotaManager):
    tenant = make_tenant(Quota(max_tokens_cap=256))
    assert isinstance(await quotas.reserve(tenant, "a", 5000, 256), Admitted)
    denied = await quotas.reserve(tenant, "b", 5, 257)
    assert isinstance(denied, Denied) and denied.limit == "max_tokens_cap"
    assert denied.retry_after_s is None and "257" in denied.reason


async def test_a_request_of_several_sequences_reserves_each_and_is_capped_per_sequence(quotas: QuotaManager):
    """n choices or best_of beams: the cap bounds each sequence's tokens, the minute counts them all."""
    tenant = make_tenant(Quota(max_tokens_cap=256, tokens_per_minute=1000))
    held = await quotas.reserve(tenant, "n4", 10, 200, sequences=4)
    assert isinstance(held, Admitted) and held.reserved_tokens == 810
    assert held.limits.remaining_tokens == 190
    over = await quotas.reserve(tenant, "n2", 10, 100, sequences=2)  # 210 more than the 190 left
    assert isinstance(over, Denied) and over.limit == "tokens_per_minute"
    capped = await quotas.reserve(tenant, "wide", 1, 257, sequences=1)
    assert isinstance(capped, Denied) and capped.limit == "max_tokens_cap"
    with pytest.raises(ValueError):
        await quotas.reserve(tenant, "none", 1, 1, sequences=0)


async def test_daily_token_budget(quotas: QuotaManager):
    tenant = make_tenant(Quota(daily_token_budget=1000))
    assert isinstance(await quotas.reserve(tenant, "a", 400, 400), Admitted)
    assert await quotas.settle(tenant, "a", 400, 400, "m")
    denied = await quotas.reserve(tenant, "b", 100, 101)
    assert isinstance(denied, Denied) and denied.limit == "daily_token_budget"
    assert denied.reason == "800 of the daily budget of 1000 tokens used; this request needs 201"
    now = time.time()
    to_midnight = 86400 - now % 86400
    assert abs(denied.retry_after_s - to_midnight) < 5
    assert isinstance(await quotas.reserve(tenant, "c", 100, 100), Admitted)  # exactly 1000


async def test_a_settled_id_stays_done_longer_than_settles_are_retried_and_no_longer(quotas: QuotaManager):
    """One `done` key per request: kept past the accounting's hour of settle retries (a
    retried settle whose first went through is not charged twice), then dropped."""
    from actors.accounting import Accounting

    tenant = make_tenant(Quota(daily_token_budget=1000))
    assert isinstance(await quotas.reserve(tenant, "once", 10, 10), Admitted)
    assert await quotas.settle(tenant, "once", 10, 5, "m")
    ttl = await quotas.store.client.ttl(quotas._base("acme") + "done:once")
    patience = inspect.signature(Accounting).parameters["settle_patience_s"].default
    assert patience < ttl <= DONE_TTL_S < 86400


async def test_reset_limits_forgets_enforcement_but_keeps_usage(quotas: QuotaManager):
    """A deleted tenant's counters go (one re-created under its id starts afresh); its
    usage rows stay for billing; other tenants are untouched."""
    tenant = make_tenant(Quota(daily_token_budget=1000, max_concurrent=1))
    other = make_tenant(Quota(daily_token_budget=1000), "acme2")
    assert isinstance(await quotas.reserve(tenant, "a", 500, 400), Admitted)
    assert await quotas.settle(tenant, "a", 500, 400, "m")
    assert isinstance(await quotas.reserve(tenant, "b", 10, 10), Admitted)  # running when the tenant goes
    assert isinstance(await quotas.reserve(other, "c", 500, 400), Admitted)
    assert isinstance(await quotas.reserve(tenant, "d", 100, 100), Denied)
    assert await quotas.reset_limits("acme") > 0
    assert await quotas.running("acme") == 0
    assert isinstance(await quotas.reserve(tenant, "d", 500, 400), Admitted)  # the budget is whole again
    assert isinstance(await quotas.reserve(other, "e", 100, 100), Denied)  # acme2's counters stayed
    today = utc_today()
    assert [r.requests for r in await quotas.get_usage("acme", today, today)] == [1]
    assert not await quotas.settle(tenant, "a", 500, 400, "m")  # settled ids stay settled
    # "b" ran through the reset: its usage is recorded, but the budget of the tenant now
    # under the id ("d" holds 900 of its 1000) is not charged for it
    assert await quotas.settle(tenant, "b", 10, 80, "m")
    assert [r.requests for r in await quotas.get_usage("acme", today, today)] == [2]
    assert await quotas.settle(tenant, "d", 500, 400, "m")  # (its max_concurrent slot)
    assert isinstance(await quotas.reserve(tenant, "f", 50, 50), Admitted)  # exactly 1000
    assert not await quotas.settle(tenant, "b", 10, 80, "m")


async def test_reset_limits_bills_lapsed_reservations_and_touches_only_the_tenant(quotas: QuotaManager):
    """A reservation that had lapsed when its tenant is deleted is charged what its replica
    last reported (the reset settles lapses first, as a reserve would); the reset names the
    tenant's keys instead of matching a pattern, so a tenant whose id the pattern would
    match ("acme*") keeps its counters."""
    tenant = make_tenant(Quota(max_concurrent=1))
    glob = make_tenant(Quota(max_concurrent=1), "acme*")
    assert isinstance(await quotas.reserve(tenant, "killed", 10, 300, ttl_s=0.3), Admitted)
    assert await quotas.extend(tenant, ["killed"], ttl_s=0.3, progress={"killed": Progress(10, 120, "m")}) == 1
    assert isinstance(await quotas.reserve(glob, "g", 10, 10), Admitted)
    await trio.sleep(0.5)
    assert await quotas.reset_limits("acme") == 0  # nothing running: the lapsed one was settled
    today = utc_today()
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in await quotas.get_usage("acme", today, today)] \
        == [(1, 10, 120)]
    assert await quotas.running("acme*") == 1
    # it was running after all (its replica cut off): its late settle records the rest of its
    # usage, and charges none of the limits of a tenant created again under the id
    again = make_tenant(Quota(daily_token_budget=100))
    assert isinstance(await quotas.reserve(again, "new", 0, 50), Admitted)
    assert await quotas.extend(tenant, ["killed"]) == 1  # not lapsed, to its replica
    assert await quotas.settle(tenant, "killed", 10, 150, "m")
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in await quotas.get_usage("acme", today, today)] \
        == [(1, 10, 150)]
    assert isinstance(await quotas.reserve(again, "fits", 0, 50), Admitted)  # 100 of 100: nothing of "killed"
    assert isinstance(await quotas.reserve(again, "over", 0, 1), Denied)


async def test_a_running_request_of_a_deleted_tenant_is_billed_what_it_reported(quotas: QuotaManager):
    """The reset drops a running request's reservation, which held what its gateway last
    reported: a gateway that then dies never settles, and the request went unbilled. The
    reset records the report, each later extension the difference, the settle the rest."""
    tenant = make_tenant(Quota())
    today = utc_today()

    async def usage() -> list[tuple[int, int, int]]:
        return [(r.requests, r.prompt_tokens, r.completion_tokens) for r in await quotas.get_usage("acme", today, today)]

    assert isinstance(await quotas.reserve(tenant, "dies", 100, 500), Admitted)
    assert isinstance(await quotas.reserve(tenant, "lives", 20, 500), Admitted)
    progress = {"dies": Progress(100, 40, "m"), "lives": Progress(20, 10, "m")}
    assert await quotas.extend(tenant, ["dies", "lives"], progress=progress) == 2
    assert await quotas.reset_limits("acme") == 2
    assert await usage() == [(2, 120, 50)]  # recorded at the reset
    # "lives" reports on after the reset (extended as a reset request: recorded, no slot)
    assert await quotas.extend(tenant, ["lives"], progress={"lives": Progress(20, 70, "m")}) == 1
    assert await usage() == [(2, 120, 110)]
    assert await quotas.settle(tenant, "lives", 20, 90, "m")  # the rest only
    assert await usage() == [(2, 120, 130)]  # "dies" never settles: billed its 100 + 40


async def test_a_reset_marker_lives_while_its_request_runs(quotas: QuotaManager, store: RedisStore):
    """A request of a deleted tenant settles against no tenant's limits while its `reset:`
    marker lives; each extension renews it, so one running longer than the marker's TTL
    does not charge a tenant created again under the id."""
    tenant = make_tenant(Quota())
    assert isinstance(await quotas.reserve(tenant, "long", 10, 10), Admitted)
    assert await quotas.reset_limits("acme") == 1
    marker = store.key("q", "{acme}", "reset:long")
    await store.client.expire(marker, 5)  # as if most of its TTL had passed
    assert await quotas.extend(tenant, ["long"]) == 1
    assert await store.client.ttl(marker) > DONE_TTL_S - 60
    await store.client.expire(marker, 2 * 86400)  # (a lapse's marker lives 2 days: never shortened)
    assert await quotas.extend(tenant, ["long"]) == 1
    assert await store.client.ttl(marker) > DONE_TTL_S + 60


async def test_a_stale_reset_changes_nothing(quotas: QuotaManager, registry: TenantRegistry):
    """Given the deleted tenant's `created_at`, the reset refuses when the tenant under the
    id is another one (deleted and created again since it was read): it erased the new
    tenant's running reservations, and the delete that followed answered 404."""
    old = await registry.create_tenant("acme", "acme")
    assert await registry.delete_tenant("acme", created_at=old.created_at)
    new = await registry.create_tenant("acme", "acme", quota=Quota(max_concurrent=1))
    assert isinstance(await quotas.reserve(new, "r1", 1, 1), Admitted)
    assert await quotas.reset_limits("acme", created_at=old.created_at) == -1
    assert await quotas.running("acme") == 1
    assert isinstance(await quotas.reserve(new, "r2", 1, 1), Denied)  # r1 still holds the slot
    assert await quotas.reset_limits("acme", created_at=new.created_at) == 1


async def test_a_defaulted_max_new_is_lowered_to_what_is_left_of_the_day(quotas: QuotaManager):
    tenant = make_tenant(Quota(daily_token_budget=1000, tokens_per_minute=10_000))
    assert isinstance(await quotas.reserve(tenant, "r0", 100, 300), Admitted)
    assert await quotas.settle(tenant, "r0", 100, 300, "m")
    got = await quotas.reserve(tenant, "r1", 50, 900, min_new_tokens=1)  # 600 left: 550 after its prompt
    assert isinstance(got, Admitted) and (got.max_new_tokens, got.reserved_tokens) == (550, 600)
    assert (await quotas.reserve(tenant, "r1", 50, 900, min_new_tokens=1)).max_new_tokens == 550  # a retry
    # the day is held by r1 now: even a token is refused, for as long as r1 runs
    held = await quotas.reserve(tenant, "r2", 50, 900, min_new_tokens=1)
    assert isinstance(held, Denied) and (held.limit, held.retry_after_s) == ("daily_token_budget", 1.0)
    assert await quotas.settle(tenant, "r1", 50, 20, "m")  # 470 used
    two = await quotas.reserve(tenant, "r3", 30, 900, sequences=2, min_new_tokens=1)  # (1000 - 470 - 30) // 2
    assert isinstance(two, Admitted) and (two.max_new_tokens, two.reserved_tokens) == (250, 530)
    assert await quotas.release(tenant, "r3")
    # never below min_new_tokens, nor above max_new_tokens; a fixed max_new is not lowered
    assert isinstance(await quotas.reserve(tenant, "r4", 30, 900, min_new_tokens=600), Denied)
    assert (await quotas.reserve(tenant, "r5", 30, 100, min_new_tokens=1)).max_new_tokens == 100
    assert await quotas.release(tenant, "r5")
    assert isinstance(await quotas.reserve(tenant, "r6", 30, 900), Denied)
    # what a running request holds and may give back is not cut from the default: a wait
    # gives it back (lowered to what its reservation left, it got a sliver of an answer)
    busy = make_tenant(Quota(daily_token_budget=1000), "busy")
    assert isinstance(await quotas.reserve(busy, "a", 50, 900), Admitted)  # holds 950
    wait = await quotas.reserve(busy, "b", 20, 900, min_new_tokens=1)
    assert isinstance(wait, Denied) and (wait.limit, wait.retry_after_s) == ("daily_token_budget", 1.0)
    assert await quotas.settle(busy, "a", 50, 100, "m")
    assert (await quotas.reserve(busy, "b", 20, 900, min_new_tokens=1)).max_new_tokens == 830
    with pytest.raises(ValueError):
        await quotas.reserve(tenant, "r7", 30, 10, min_new_tokens=11)
    # no daily budget: nothing to lower to (a minute's wait gives the per-minute limit back)
    other = make_tenant(Quota(tokens_per_minute=500), "tpm-only")
    assert isinstance(await quotas.reserve(other, "t0", 10, 100), Admitted)
    assert isinstance(await quotas.reserve(other, "t1", 10, 450, min_new_tokens=1), Denied)


async def test_a_requests_own_prompts_are_not_counted_as_given_back_to_it(quotas: QuotaManager):
    """The prompts of one request are reserved one after another: what the first holds is
    not what running requests give back to the next (counted so, a batch the rest of the
    day could never hold was told to retry in a second, on every retry — an audit — and a
    defaulted last prompt was refused instead of lowered). Another request's reservation
    still is."""
    tenant = make_tenant(Quota(daily_token_budget=30))
    assert isinstance(await quotas.reserve(tenant, "used", 1, 9), Admitted)
    assert await quotas.settle(tenant, "used", 1, 9, "m")  # 20 left
    assert isinstance(await quotas.reserve(tenant, "b-0", 1, 10, group="b"), Admitted)  # 9 left
    never = await quotas.reserve(tenant, "b-1", 1, 10, group="b")
    assert isinstance(never, Denied) and never.limit == "daily_token_budget" and never.retry_after_s > 60
    lowered = await quotas.reserve(tenant, "b-2", 1, 16, min_new_tokens=1, group="b")
    assert isinstance(lowered, Admitted) and lowered.max_new_tokens == 8
    assert await quotas.release(tenant, "b-2")
    # without a group, b-0 is a running request that may give back its 10 new tokens
    other = await quotas.reserve(tenant, "c-0", 1, 10, group="c")
    assert isinstance(other, Denied) and other.retry_after_s == 1.0
    # a lowered max_new takes its share of what is left: the group's reservations still to
    # make (taking it all, the first of a batch sent without max_tokens left the rest nothing)
    split = make_tenant(Quota(daily_token_budget=100), "split")
    shares = [await quotas.reserve(split, f"s-{i}", 2, 1000, min_new_tokens=1, group="s", group_left=3 - i)
              for i in range(3)]
    assert [s.max_new_tokens for s in shares] == [31, 31, 32]  # 100 // 3 - 2, 67 // 2 - 2, 34 - 2
    with pytest.raises(ValueError):
        await quotas.reserve(split, "s-x", 2, 10, group="s", group_left=0)


async def test_the_daily_budget_is_named_before_a_per_minute_limit_only_when_waiting_cannot_help(
        quotas: QuotaManager):
    """A request refused by a per-minute limit that the day's budget would refuse however
    the running requests end is told of the day's (retry at midnight, not in seconds to be
    refused again); one the budget refuses only for what running requests hold (they give
    back what they do not use) is told of the limit that waiting helps."""
    tenant = make_tenant(Quota(tokens_per_minute=400, daily_token_budget=500, requests_per_minute=1))
    assert isinstance(await quotas.reserve(tenant, "a", 38, 300), Admitted)
    assert await quotas.settle(tenant, "a", 38, 300, "m")
    denied = await quotas.reserve(tenant, "b", 38, 300)
    assert isinstance(denied, Denied) and denied.limit == "daily_token_budget"

    busy = make_tenant(Quota(daily_token_budget=1000, max_concurrent=1), "busy")
    assert isinstance(await quotas.reserve(busy, "long", 10, 900), Admitted)
    denied = await quotas.reserve(busy, "next", 10, 200)
    assert isinstance(denied, Denied) and denied.limit == "max_concurrent" and denied.retry_after_s == 1.0
    assert await quotas.settle(busy, "long", 10, 20, "m")
    assert isinstance(await quotas.reserve(busy, "next", 10, 200), Admitted)

    # no other limit: a budget held only by running requests is a wait, not midnight
    held = make_tenant(Quota(daily_token_budget=100), "held")
    assert isinstance(await quotas.reserve(held, "r1", 10, 50), Admitted)
    denied = await quotas.reserve(held, "r2", 10, 50)
    assert isinstance(denied, Denied) and denied.limit == "daily_token_budget" and denied.retry_after_s == 1.0
    assert "held by running requests" in denied.reason
    assert await quotas.settle(held, "r1", 10, 5, "m")
    assert isinstance(await quotas.reserve(held, "r2", 10, 50), Admitted)
    denied = await quotas.reserve(held, "r3", 10, 50)  # 15 used, 60 held: the day's, until one ends
    assert isinstance(denied, Denied) and denied.retry_after_s == 1.0
    assert await quotas.settle(held, "r2", 10, 50, "m")
    denied = await quotas.reserve(held, "r3", 10, 50)  # 75 used, nothing held: midnight
    assert isinstance(denied, Denied) and "held by running" not in denied.reason and denied.retry_after_s != 1.0
    # what a running request cannot give back (its prompt, what it reported using) is spent
    late = make_tenant(Quota(daily_token_budget=100), "late")
    assert isinstance(await quotas.reserve(late, "big_prompt", 50, 30), Admitted)
    denied = await quotas.reserve(late, "r", 30, 30)  # 50 of its 80 can never come back
    assert isinstance(denied, Denied) and denied.retry_after_s != 1.0
    assert isinstance(await quotas.reserve(late, "small", 5, 10), Admitted)
    denied = await quotas.reserve(late, "r2", 5, 20)  # 95 held, 40 of it may come back
    assert isinstance(denied, Denied) and denied.retry_after_s == 1.0
    assert await quotas.extend(late, ["big_prompt"], progress={"big_prompt": Progress(50, 25, "m")}) == 1
    denied = await quotas.reserve(late, "r2", 5, 20)  # 15 may come back now: 25 do not fit
    assert isinstance(denied, Denied) and denied.retry_after_s != 1.0


async def test_a_zero_limit_is_refused_without_a_retry_time(quotas: QuotaManager):
    """Retrying cannot help a key whose limit is 0: no Retry-After (as for a request too big)."""
    for quota, limit in ((Quota(max_concurrent=0), "max_concurrent"), (Quota(requests_per_minute=0), "requests_per_minute"),
                         (Quota(tokens_per_minute=0), "tokens_per_minute"), (Quota(daily_token_budget=0), "daily_token_budget")):
        denied = await quotas.reserve(make_tenant(quota, f"zero-{limit}"), "r", 1, 1)
        assert isinstance(denied, Denied) and denied.limit == limit and denied.retry_after_s is None, denied


async def test_quota_values_stay_exact_in_the_scripts() -> None:
    import msgspec

    with pytest.raises(msgspec.ValidationError, match="at most"):
        msgspec.json.decode(b'{"max_concurrent": 99999999999999999999999}', type=Quota)


async def test_denied_requests_consume_nothing(store: RedisStore, quotas: QuotaManager):
    await away_from_minute_edge(store)
    tenant = make_tenant(Quota(requests_per_minute=1, tokens_per_minute=100))
    assert isinstance(await quotas.reserve(tenant, "big", 100, 1), Denied)  # too many tokens
    assert isinstance(await quotas.reserve(tenant, "ok", 50, 50), Admitted)  # RPM slot unused


async def test_a_refused_request_counts_one_request_and_no_tokens(store: RedisStore, quotas: QuotaManager):
    """A request refused after its prompt was tokenized counts against requests per minute
    (each time, even under one reused id), as OpenAI counts unsuccessful requests; it takes
    no tokens and no slot, and says when the minute is full."""
    await away_from_minute_edge(store)
    tenant = make_tenant(Quota(requests_per_minute=3, tokens_per_minute=100, max_concurrent=2))
    assert await quotas.count_refused(tenant, "bad") is None  # room left
    ok = await quotas.reserve(tenant, "ok", 50, 50)  # the refusal took no tokens (all 100 left) and no slot
    assert isinstance(ok, Admitted) and ok.limits.remaining_requests == 1
    full = await quotas.count_refused(tenant, "bad")  # the same id again: counted again
    assert full is not None and 58 < full <= 60
    denied = await quotas.reserve(tenant, "next", 1, 1)
    assert isinstance(denied, Denied) and denied.limit == "requests_per_minute"
    assert await quotas.count_refused(make_tenant(Quota(tokens_per_minute=10), "free"), "bad") is None
    assert await store.client.exists([store.key("q", "{free}", "rpm")]) == 0  # no limit, no log


async def test_settle_exactly_once_and_usage(quotas: QuotaManager):
    tenant = make_tenant(Quota(max_concurrent=5))
    plan = [("r1", "llama", 10, 3), ("r2", "llama", 20, 7), ("r3", "gemma", 5, 1)]
    for rid, _, prompt, _ in plan:
        await quotas.reserve(tenant, rid, prompt, 64)
    assert await quotas.running("acme") == 3
    for rid, model, prompt, completion in plan:
        assert await quotas.settle(tenant, rid, prompt, completion, model)
    for rid, model, prompt, completion in plan:  # double settle: no-op
        assert not await quotas.settle(tenant, rid, prompt, completion, model)
    assert await quotas.running("acme") == 0
    today = utc_today()
    usage = await quotas.get_usage("acme", today - dt.timedelta(days=3), today)
    assert usage == [
        UsageRow(day=today, model="gemma", requests=1, prompt_tokens=5, completion_tokens=1),
        UsageRow(day=today, model="llama", requests=2, prompt_tokens=30, completion_tokens=10),
    ]
    assert await quotas.get_usage("other", today, today) == []
    with pytest.raises(ValueError):
        await quotas.get_usage("acme", today, today - dt.timedelta(days=1))


async def test_reserve_is_idempotent_and_finished_ids_cannot_be_reused(quotas: QuotaManager):
    tenant = make_tenant(Quota(requests_per_minute=2, max_concurrent=2))
    first = await quotas.reserve(tenant, "r1", 3, 4)
    assert isinstance(first, Admitted) and (first.request_id, first.reserved_tokens) == ("r1", 7)
    assert first.limits is not None and first.limits.remaining_requests == 1
    assert await quotas.reserve(tenant, "r1", 3, 4) == Admitted("r1", 7, None, 4)  # a retry: not counted (no limits read)
    assert await quotas.running("acme") == 1
    assert isinstance(await quotas.reserve(tenant, "r2", 1, 1), Admitted)  # 2nd of 2 per minute
    await quotas.settle(tenant, "r1", 3, 1, "m")
    with pytest.raises(DuplicateRequest):
        await quotas.reserve(tenant, "r1", 1, 1)
    await quotas.release(tenant, "r2")
    with pytest.raises(DuplicateRequest):
        await quotas.reserve(tenant, "r2", 1, 1)


async def test_release_refunds_a_request_that_never_ran(store: RedisStore, quotas: QuotaManager):
    await away_from_minute_edge(store)
    tenant = make_tenant(Quota(requests_per_minute=1, tokens_per_minute=100, max_concurrent=1))
    assert isinstance(await quotas.reserve(tenant, "a", 50, 50), Admitted)
    assert isinstance(await quotas.reserve(tenant, "b", 50, 50), Denied)
    assert await quotas.release(tenant, "a", refund_rpm=True)  # (refused by the server: not counted)
    assert not await quotas.release(tenant, "a")
    assert not await quotas.settle(tenant, "a", 50, 50, "m")  # released: settle is a no-op
    assert isinstance(await quotas.reserve(tenant, "b", 50, 50), Admitted)
    today = utc_today()
    assert await quotas.get_usage("acme", today, today) == []
    # cancelled by its client while it waited: tokens and slot back, but it counts against the
    # minute's requests (released, a key could send and cancel requests at any rate)
    assert await quotas.release(tenant, "b")
    denied = await quotas.reserve(tenant, "c", 1, 1)
    assert isinstance(denied, Denied) and denied.limit == "requests_per_minute"


async def test_reservation_expires_after_ttl(quotas: QuotaManager):
    """A gateway that crashed never settles: its slot comes back after the TTL, and a
    late settle still records the usage exactly once."""
    tenant = make_tenant(Quota(max_concurrent=1))
    assert isinstance(await quotas.reserve(tenant, "crashed", 10, 10, ttl_s=0.2), Admitted)
    assert isinstance(await quotas.reserve(tenant, "next", 10, 10), Denied)
    await trio.sleep(0.3)
    assert await quotas.running("acme") == 0
    assert isinstance(await quotas.reserve(tenant, "next", 10, 10), Admitted)
    assert await quotas.settle(tenant, "crashed", 10, 4, "m")
    assert not await quotas.settle(tenant, "crashed", 10, 4, "m")
    today = utc_today()
    assert await quotas.get_usage("acme", today, today) == [
        UsageRow(day=today, model="m", requests=1, prompt_tokens=10, completion_tokens=4)
    ]


async def test_a_live_request_extends_its_reservation(quotas: QuotaManager, store: RedisStore):
    """A request that outlives the TTL keeps its slot while its gateway extends it; a settled
    one is not brought back; one no longer extended expires as a crashed gateway's does."""
    tenant = make_tenant(Quota(max_concurrent=2, tokens_per_minute=1000))
    for rid in ("long", "done"):
        assert isinstance(await quotas.reserve(tenant, rid, 10, 10, ttl_s=0.3), Admitted)
    assert await quotas.settle(tenant, "done", 10, 1, "m")
    assert await quotas.extend(tenant, ["long", "done", "unknown"], ttl_s=1.0) == 1
    await trio.sleep(0.5)  # past the first TTL
    assert await quotas.running("acme") == 1
    assert isinstance(await quotas.reserve(tenant, "third", 1, 1, ttl_s=0.3), Admitted)
    assert isinstance(await quotas.reserve(tenant, "fourth", 1, 1), Denied)  # "long" still holds its slot
    assert await store.client.pttl(store.key("q", "{acme}", "res:long")) > 300
    await trio.sleep(0.7)  # neither extended again: both expire
    assert await quotas.running("acme") == 0
    assert await quotas.extend(tenant, ["long"]) == 0
    assert await quotas.settle(tenant, "long", 10, 10, "m")  # a late settle still counts
    assert await quotas.extend(tenant, []) == 0


async def test_a_lapsed_reservation_gives_its_tokens_back_and_a_late_settle_charges_once(quotas: QuotaManager):
    """A gateway that died, or lost Redis for a TTL, stops extending its reservations: once
    the slot lapses, the tenant's next reserve gives back the tokens it held against the day
    (they stayed charged for the rest of the day before), and a settle that comes later
    charges the real usage alone (it was charged on top of the reservation)."""
    tenant = make_tenant(Quota(daily_token_budget=1000))
    assert isinstance(await quotas.reserve(tenant, "orphan", 10, 500, ttl_s=0.2), Admitted)  # 510 held
    assert isinstance(await quotas.reserve(tenant, "early", 10, 500), Denied)  # 1020 > 1000 while held
    await trio.sleep(0.4)  # nobody extends "orphan"
    assert isinstance(await quotas.reserve(tenant, "next", 10, 500), Admitted)  # 510: the orphan's went back
    assert await quotas.settle(tenant, "orphan", 10, 20, "m")  # late: 30 charged now, once
    assert await quotas.release(tenant, "orphan") is False
    assert isinstance(await quotas.reserve(tenant, "fits", 0, 460), Admitted)  # 510 + 30 + 460 = 1000
    assert isinstance(await quotas.reserve(tenant, "over", 0, 1), Denied)
    today = utc_today()
    [row] = await quotas.get_usage("acme", today, today)
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (1, 10, 20)


async def test_a_lapsed_reservation_is_charged_what_its_replica_last_reported(quotas: QuotaManager):
    """A replica killed mid-stream never settles: its last `extend` said what each running
    request had used, and the lapse charges and records that (it was all given back, so
    what a dead replica streamed was never billed). A settle that comes after all (the
    replica was cut off, not dead) charges only the rest, and counts the request once."""
    tenant = make_tenant(Quota(daily_token_budget=1000))
    for rid in ("killed", "cut-off", "waited"):
        assert isinstance(await quotas.reserve(tenant, rid, 10, 300, ttl_s=0.3), Admitted)  # 310 each
    assert await quotas.extend(tenant, ["killed", "cut-off", "waited"], ttl_s=0.3, progress={
        "killed": Progress(10, 120, "m"), "cut-off": Progress(10, 40, "lora-a")}) == 3  # "waited" had not run
    assert isinstance(await quotas.reserve(tenant, "early", 0, 100), Denied)  # 930 + 100 > 1000
    await trio.sleep(0.5)  # nobody extends them again
    assert isinstance(await quotas.reserve(tenant, "next", 0, 800), Admitted)  # 130 + 50 + 800 = 980
    assert isinstance(await quotas.reserve(tenant, "over", 0, 21), Denied)
    today = utc_today()
    assert {(r.model, r.requests, r.prompt_tokens, r.completion_tokens)
            for r in await quotas.get_usage("acme", today, today)} == {("m", 1, 10, 120), ("lora-a", 1, 10, 40)}
    assert await quotas.settle(tenant, "cut-off", 10, 45, "lora-a")  # it went on: 5 more tokens
    assert not await quotas.settle(tenant, "cut-off", 10, 45, "lora-a")
    assert {(r.model, r.requests, r.prompt_tokens, r.completion_tokens)
            for r in await quotas.get_usage("acme", today, today)} == {("m", 1, 10, 120), ("lora-a", 1, 10, 45)}
    assert isinstance(await quotas.reserve(tenant, "fits", 0, 15), Admitted)  # 985 + 15 = 1000
    assert isinstance(await quotas.reserve(tenant, "over2", 0, 1), Denied)
    with pytest.raises(ValueError):
        await quotas.extend(tenant, ["next"], progress={"next": Progress(1, -1, "m")})


async def test_a_dead_replicas_usage_is_in_the_rows_without_the_tenants_next_request(quotas: QuotaManager):
    """Lapses were charged only from the tenant's next reserve or extension: one that sent
    nothing more lacked its dead replica's usage in the rows (the billing export), and lost
    it once the reservations' records expired. Reading usage charges them first."""
    tenant = make_tenant(Quota(daily_token_budget=1000))
    assert isinstance(await quotas.reserve(tenant, "killed", 10, 300, ttl_s=0.3), Admitted)
    assert await quotas.extend(tenant, ["killed"], ttl_s=0.3, progress={"killed": Progress(10, 120, "m")}) == 1
    await trio.sleep(0.5)  # its replica is gone: nobody extends it, and the tenant sends nothing
    today = utc_today()
    assert {(r.model, r.requests, r.prompt_tokens, r.completion_tokens)
            for r in await quotas.get_usage("acme", today, today)} == {("m", 1, 10, 120)}
    assert [r.requests for r in await quotas.get_usage("acme", today, today)] == [1]  # (charged once)


async def test_a_live_replicas_extend_settles_a_dead_ones_lapses(quotas: QuotaManager, store: RedisStore):
    """Lapses are settled by the tenant's next extend as well as its next reserve: a tenant
    whose only other traffic is a long request on a live replica has the dead replica's
    streams billed within a round, not when it next sends a request (a day's billing
    export ran before that). Their charge stays noted for a late settle for two days."""
    tenant = make_tenant(Quota(daily_token_budget=1000))
    assert isinstance(await quotas.reserve(tenant, "dead", 10, 300, ttl_s=0.2), Admitted)
    assert isinstance(await quotas.reserve(tenant, "live", 10, 300), Admitted)
    await quotas.extend(tenant, ["dead"], ttl_s=0.2, progress={"dead": Progress(10, 99, "m")})
    await trio.sleep(0.4)
    assert await quotas.extend(tenant, ["live"], progress={"live": Progress(10, 5, "m")}) == 1
    today = utc_today()
    [row] = await quotas.get_usage("acme", today, today)
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (1, 10, 99)
    assert await store.client.ttl(store.key("q", "{acme}", "lapsed:dead")) > DONE_TTL_S
    # a report past the reservation (no such thing today: the stepper's count stays within it)
    # is charged whole, to the limits as to the usage: a late settle subtracts what was noted
    assert isinstance(await quotas.reserve(tenant, "over", 10, 5, ttl_s=0.2), Admitted)
    await quotas.extend(tenant, ["over"], ttl_s=0.2, progress={"over": Progress(10, 8, "m")})
    await trio.sleep(0.4)
    assert await quotas.extend(tenant, ["live"]) == 1
    assert await quotas.settle(tenant, "over", 10, 9, "m")
    assert await quotas.settle(tenant, "live", 10, 5, "m")
    assert isinstance(await quotas.reserve(tenant, "fits", 0, 1000 - 109 - 19 - 15), Admitted)
    assert isinstance(await quotas.reserve(tenant, "full", 0, 1), Denied)


@pytest.mark.parametrize(
    ("quota", "limit"),
    [
        (Quota(requests_per_minute=37), "requests_per_minute"),
        (Quota(tokens_per_minute=37 * 30), "tokens_per_minute"),
        (Quota(max_concurrent=37), "max_concurrent"),
        (Quota(daily_token_budget=37 * 30), "daily_token_budget"),
    ],
)
async def test_concurrent_reserves_from_two_clients_admit_exactly_n(redis_url, quota, limit):
    """200 reserve calls racing from two independent clients (two replicas)."""
    tenant = make_tenant(quota)
    admitted: list[str] = []
    denied: list[str] = []

    async with RedisStore(redis_url) as first, RedisStore(redis_url) as second:
        managers = [QuotaManager(first), QuotaManager(second)]
        await away_from_minute_edge(first)

        async def one(i: int) -> None:
            result = await managers[i % 2].reserve(tenant, f"req-{i}", 10, 20)
            if isinstance(result, Admitted):
                admitted.append(result.request_id)
            else:
                assert result.limit == limit
                denied.append(f"req-{i}")

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)

    assert len(admitted) == 37
    assert len(denied) == 163
    assert {int(r.split("-")[1]) % 2 for r in admitted} == {0, 1}  # both clients got some


async def test_admitted_says_what_is_left_of_the_minute(quotas: QuotaManager, store: RedisStore):
    await away_from_minute_edge(store)
    tenant = make_tenant(Quota(requests_per_minute=5, tokens_per_minute=1000))
    first = await quotas.reserve(tenant, "a", 100, 50)
    second = await quotas.reserve(tenant, "b", 10, 10)
    assert isinstance(first, Admitted) and isinstance(second, Admitted)
    assert first.limits == RateLimits(5, 4, first.limits.reset_requests_s, 1000, 850,  # type: ignore[union-attr]
                                      first.limits.reset_tokens_s)  # type: ignore[union-attr]
    limits = second.limits
    assert limits is not None and (limits.remaining_requests, limits.remaining_tokens) == (3, 830)
    assert 59 < limits.reset_requests_s <= 60 and 0 < limits.reset_tokens_s <= 60  # type: ignore[operator]
    only_tpm = await quotas.reserve(make_tenant(Quota(tokens_per_minute=100), "solo"), "c", 1, 1)
    assert only_tpm.limits.limit_requests is None and only_tpm.limits.remaining_tokens == 98  # type: ignore[union-attr]
    unlimited = await quotas.reserve(make_tenant(Quota(max_concurrent=3), "free"), "d", 1, 1)
    assert unlimited.limits is None  # type: ignore[union-attr]


async def test_denied_says_where_the_minute_stands(quotas: QuotaManager, store: RedisStore):
    """A refusal carries the per-minute limits as they stand (a 429's x-ratelimit headers,
    as OpenAI sends them), whichever limit refused, and counts nothing."""
    await away_from_minute_edge(store)
    tenant = make_tenant(Quota(requests_per_minute=2, tokens_per_minute=100, max_concurrent=5))
    assert isinstance(await quotas.reserve(tenant, "a", 30, 10), Admitted)
    too_big = await quotas.reserve(tenant, "b", 100, 10)  # over tokens_per_minute: can never pass
    assert isinstance(too_big, Denied) and too_big.retry_after_s is None
    assert too_big.limits == RateLimits(2, 1, too_big.limits.reset_requests_s, 100, 60,  # type: ignore[union-attr]
                                        too_big.limits.reset_tokens_s)  # type: ignore[union-attr]
    assert isinstance(await quotas.reserve(tenant, "c", 1, 1), Admitted)
    rpm = await quotas.reserve(tenant, "d", 1, 1)
    assert isinstance(rpm, Denied) and rpm.limit == "requests_per_minute"
    assert (rpm.limits.remaining_requests, rpm.limits.remaining_tokens) == (0, 58)  # type: ignore[union-attr]
    assert 58 < rpm.limits.reset_requests_s <= 60  # type: ignore[union-attr,operator]
    busy = await quotas.reserve(make_tenant(Quota(max_concurrent=0, requests_per_minute=9), "z"), "e", 1, 1)
    assert isinstance(busy, Denied) and busy.limits.remaining_requests == 9  # type: ignore[union-attr]


async def test_a_retry_after_the_requests_per_minute_wait_is_not_refused_by_the_tokens_per_minute(
        store: RedisStore, quotas: QuotaManager):
    """Both per-minute limits refuse: Retry-After is the later of their waits (the audit:
    it named the request window's, 30 s, and the retry then was refused for the token
    window's next 10 s)."""
    await away_from_minute_edge(store)
    tenant = make_tenant(Quota(requests_per_minute=2, tokens_per_minute=100), "both")
    now_ms = int((await store.client.time()).timestamp() * 1000)
    # a request 50 s ago (in this minute or the last one): the request window frees in 10 s
    await store.client.zadd(quotas._base("both") + "rpm", {"earlier": now_ms - 50_000})
    assert isinstance(await quotas.reserve(tenant, "a", 10, 80), Admitted)
    denied = await quotas.reserve(tenant, "b", 10, 10)
    assert isinstance(denied, Denied) and denied.limit == "requests_per_minute"
    token_window_left = 60 - now_ms / 1000 % 60
    assert denied.retry_after_s == pytest.approx(max(10.0, token_window_left), abs=1.0)
    # a request that fits the token window is told the request window's wait alone
    fits = await quotas.reserve(tenant, "c", 5, 5)
    assert isinstance(fits, Denied) and fits.retry_after_s == pytest.approx(10.0, abs=1.0)
