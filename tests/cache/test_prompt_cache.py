"""PromptCache: rendered chat prompt + token ids round trip, canonical keys, TTL."""

from __future__ import annotations

import pytest
import trio

from cache.prompt_cache import PromptCache, RenderedPrompt, pack_ids, prompt_key, unpack_ids
from cache.store import RedisStore

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France? ünïcode ✓"},
]
RENDERED = RenderedPrompt(
    "<|im_start|>system\nBe brief.<|im_end|>\n...", [1, 9690, 198, 49151, 70000, 0]
)


@pytest.fixture
async def cache(store: RedisStore) -> PromptCache:
    return PromptCache(store)


async def test_round_trip(cache: PromptCache):
    assert await cache.get("s", "m", MESSAGES) is None
    await cache.put("s", "m", MESSAGES, True, RENDERED)
    assert await cache.get("s", "m", MESSAGES, True) == RENDERED


async def test_key_is_canonical_and_complete(cache: PromptCache):
    await cache.put("s", "m", MESSAGES, True, RENDERED)
    reordered = [{"content": m["content"], "role": m["role"]} for m in MESSAGES]
    assert await cache.get("s", "m", reordered, True) == RENDERED  # key order does not matter
    assert await cache.get("s", "m", MESSAGES, False) is None
    assert await cache.get("s", "m2", MESSAGES, True) is None
    assert await cache.get("s", "m", MESSAGES[:1], True) is None
    edited = [MESSAGES[0], {"role": "user", "content": "Capital of Spain?"}]
    assert await cache.get("s", "m", edited, True) is None
    assert prompt_key("m", MESSAGES, True) != prompt_key("m", MESSAGES, False)
    # a chat whose last message is left open (continue_final_message) is another prompt
    assert prompt_key("m", MESSAGES, False, True) != prompt_key("m", MESSAGES, False)
    await cache.put("s", "m", MESSAGES, False, RENDERED, True)
    assert await cache.get("s", "m", MESSAGES, False) is None
    assert await cache.get("s", "m", MESSAGES, False, True) == RENDERED


async def test_entries_expire(store: RedisStore):
    cache = PromptCache(store, ttl_s=0.2)
    await cache.put("s", "m", MESSAGES, True, RENDERED)
    await trio.sleep(0.3)
    assert await cache.get("s", "m", MESSAGES, True) is None


def test_token_packing():
    ids = [0, 1, 65535, 65536, 2**32 - 1]
    assert unpack_ids(pack_ids(ids)) == ids
    assert len(pack_ids(ids)) == 4 * len(ids)
    assert unpack_ids(pack_ids([])) == []
    with pytest.raises(ValueError):
        pack_ids([-1])
    with pytest.raises(ValueError):
        pack_ids([2**32])
