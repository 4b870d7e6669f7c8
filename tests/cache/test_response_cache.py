"""ResponseCache: keyed by every parameter, scoped per tenant or shared, TTL, size limit."""

from __future__ import annotations

import msgspec
import pytest
import trio

from cache.response_cache import (
    CachedCompletion,
    CachedUsage,
    ResponseCache,
    response_key,
)
from cache.store import RedisStore
from cache.tenants import Tenant


class Params(msgspec.Struct, frozen=True, kw_only=True):
    """Stands in for the engine's SamplingParams (same kinds of fields)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_tokens: int | None = 16
    ignore_eos: bool = False


CHANGED = {
    "temperature": 0.5, "top_k": 40, "top_p": 0.9, "seed": 7, "stop": ("\n",),
    "max_tokens": 17, "ignore_eos": True,
}

ALICE = Tenant(id="alice", name="Alice")
BOB = Tenant(id="bob", name="Bob")
SHARED_1 = Tenant(id="s1", name="S1", shared_cache_pool=True)
SHARED_2 = Tenant(id="s2", name="S2", shared_cache_pool=True)

COMPLETION = CachedCompletion(
    text="Paris is the capital.",
    token_ids=[11, 12, 13, 14],
    finish_reason="stop",
    usage=CachedUsage(prompt_tokens=3, completion_tokens=4),
    deltas=["Paris", " is the", " capital", "."],
)
PROMPT = [1, 2, 3]


@pytest.fixture
async def cache(store: RedisStore) -> ResponseCache:
    return ResponseCache(store)


def test_every_parameter_is_in_the_key():
    assert set(CHANGED) == set(Params.__struct_fields__)  # the test covers every field
    base = response_key("m", PROMPT, Params())
    assert base == response_key("m", list(PROMPT), Params())  # deterministic
    variants = {base, response_key("m2", PROMPT, Params()), response_key("m", [1, 2, 4], Params())}
    for field, value in CHANGED.items():
        variants.add(response_key("m", PROMPT, msgspec.structs.replace(Params(), **{field: value})))
    assert len(variants) == 3 + len(CHANGED)
    # mapping params: key order does not matter, values do
    assert response_key("m", PROMPT, {"a": 1, "b": 2}) == response_key("m", PROMPT, {"b": 2, "a": 1})
    assert response_key("m", PROMPT, {"a": 1}) != response_key("m", PROMPT, {"a": 2})


async def test_hit_after_put_and_miss_on_any_change(cache: ResponseCache):
    params = Params(seed=1)
    assert await cache.get(ALICE, "m", PROMPT, params) is None
    assert await cache.put(ALICE, "m", PROMPT, params, COMPLETION)
    hit = await cache.get(ALICE, "m", PROMPT, params)
    assert hit == COMPLETION
    assert "".join(hit.deltas) == hit.text  # replayable as a stream
    for field, value in CHANGED.items():
        changed = msgspec.structs.replace(params, **{field: value})
        assert changed != params
        assert await cache.get(ALICE, "m", PROMPT, changed) is None, field
    assert await cache.get(ALICE, "other-model", PROMPT, params) is None
    assert await cache.get(ALICE, "m", PROMPT + [4], params) is None
    assert cache.stats.hits == 1
    assert cache.stats.misses == 1 + len(CHANGED) + 2
    assert cache.stats.stores == 1


async def test_private_scope_and_shared_pool(cache: ResponseCache):
    params = Params()
    await cache.put(ALICE, "m", PROMPT, params, COMPLETION)
    assert await cache.get(BOB, "m", PROMPT, params) is None
    assert await cache.get(SHARED_1, "m", PROMPT, params) is None  # private stays private

    shared_answer = msgspec.structs.replace(COMPLETION, text="shared")
    await cache.put(SHARED_1, "m", PROMPT, params, shared_answer)
    assert await cache.get(SHARED_2, "m", PROMPT, params) == shared_answer
    assert await cache.get(ALICE, "m", PROMPT, params) == COMPLETION
    assert await cache.get(BOB, "m", PROMPT, params) is None


async def test_a_tenant_named_shared_and_a_re_created_tenant_stay_out(cache: ResponseCache):
    params = Params()
    await cache.put(SHARED_1, "m", PROMPT, params, COMPLETION)
    named_shared = Tenant(id="shared", name="not in the pool")  # the pool's own scope name
    assert await cache.get(named_shared, "m", PROMPT, params) is None
    await cache.put(named_shared, "m", PROMPT, params, msgspec.structs.replace(COMPLETION, text="private"))
    assert await cache.get(SHARED_2, "m", PROMPT, params) == COMPLETION

    old = Tenant(id="carol", name="Carol", created_at=1000.0)
    await cache.put(old, "m", PROMPT, params, COMPLETION)
    assert await cache.get(old, "m", PROMPT, params) == COMPLETION
    # the id deleted and created again is another customer: it does not get the old answers
    assert await cache.get(Tenant(id="carol", name="Carol", created_at=2000.0), "m", PROMPT, params) is None


async def test_logprobs_round_trip(cache: ResponseCache):
    with_lp = msgspec.structs.replace(
        COMPLETION, logprobs=[-0.1, -0.2, -0.3, -0.4], tokens=["Paris", " is", " the", " capital."],
        top_logprobs=[[(11, -0.1, "Paris"), (9, -2.5, "Rome")]] * 4)
    await cache.put(ALICE, "m", PROMPT, Params(), with_lp)
    assert await cache.get(ALICE, "m", PROMPT, Params()) == with_lp


async def test_entries_expire(store: RedisStore):
    cache = ResponseCache(store, ttl_s=0.2)
    await cache.put(ALICE, "m", PROMPT, Params(), COMPLETION)
    assert await cache.get(ALICE, "m", PROMPT, Params()) == COMPLETION
    await trio.sleep(0.3)
    assert await cache.get(ALICE, "m", PROMPT, Params()) is None


async def test_entries_above_the_size_limit_are_not_stored(store: RedisStore):
    cache = ResponseCache(store, max_entry_bytes=200)
    assert await cache.put(ALICE, "m", PROMPT, Params(), COMPLETION)
    big = msgspec.structs.replace(COMPLETION, text="x" * 500)
    assert not await cache.put(ALICE, "m", PROMPT, Params(seed=2), big)
    assert await cache.get(ALICE, "m", PROMPT, Params(seed=2)) is None
    assert cache.stats.skipped_too_large == 1 and cache.stats.stores == 1


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        ResponseCache(None, ttl_s=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ResponseCache(None, max_entry_bytes=0)  # type: ignore[arg-type]
