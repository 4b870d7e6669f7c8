"""Cache of rendered chat prompts: messages -> (chat-template text, token ids).

Rendering a chat template and tokenizing it costs a few ms of CPU per request;
agents resend the same long conversation prefix again and again. The key is::

    sha256(model \\0 canonical_json(messages) \\0 add_generation_prompt)

where canonical JSON sorts object keys (and struct fields), so two equal
conversations always hit the same entry. Token ids are stored packed as
little-endian uint32 (4 bytes per token instead of msgpack's up to 5 + framing).

``model`` should name the tokenizer and chat template too (e.g. include a
revision) when they can change under the same model name.

Redis key: ``{prefix}pc1:<scope>:<sha256 hex>``, TTL ``ttl_s``. The scope is the
response cache's (`cache.response_cache.scope_for`: the tenant, or the shared pool):
an entry holds only what the tokenizer computes from the messages, but whether it
exists shows, in the time a request takes to be refused or answered, whether someone
sent that exact conversation, and a tenant must not learn that about another.
An entry that does not decode is a miss (`RedisStore.get_value`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from cache.store import RedisStore

__all__ = ["PromptCache", "RenderedPrompt", "prompt_key"]

_TOKEN_DTYPE = np.dtype("<u4")


class RenderedPrompt(msgspec.Struct, frozen=True):
    text: str
    token_ids: list[int]


class _Stored(msgspec.Struct, frozen=True, array_like=True):
    text: str
    packed_ids: bytes


_decoder = msgspec.msgpack.Decoder(_Stored)


def prompt_key(model: str, messages: Sequence[Any], add_generation_prompt: bool,
               continue_final_message: bool = False) -> str:
    """sha256 hex of model + canonical messages JSON + how the chat ends: the
    add_generation_prompt flag, and a mark when the final message is left open (pure).

    ``messages`` may be dicts or msgspec Structs (anything msgspec encodes).
    """
    canonical = msgspec.json.encode(list(messages), order="sorted")
    parts = [model.encode(), canonical, b"1" if add_generation_prompt else b"0"]
    if continue_final_message:
        parts.append(b"open")
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


def pack_ids(token_ids: Sequence[int]) -> bytes:
    arr = np.asarray(token_ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(_TOKEN_DTYPE).max):
        raise ValueError("token ids must fit in uint32")
    return arr.astype(_TOKEN_DTYPE).tobytes()


def unpack_ids(packed: bytes) -> list[int]:
    return np.frombuffer(packed, dtype=_TOKEN_DTYPE).tolist()


class PromptCache:
    def __init__(self, store: RedisStore, *, ttl_s: float = 3600.0) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.store = store
        self.ttl_s = ttl_s

    async def get(
        self, scope: str, model: str, messages: Sequence[Any], add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> RenderedPrompt | None:
        """The rendering stored under `scope` for these messages, or None; CacheUnavailable
        when Redis is down (a miss to the caller)."""
        key = self.store.key("pc1", scope, prompt_key(model, messages, add_generation_prompt, continue_final_message))
        return await self.store.get_value(key, _decode)

    async def put(
        self, scope: str, model: str, messages: Sequence[Any], add_generation_prompt: bool,
        rendered: RenderedPrompt, continue_final_message: bool = False,
    ) -> None:
        key = self.store.key("pc1", scope, prompt_key(model, messages, add_generation_prompt, continue_final_message))
        value = msgspec.msgpack.encode(_Stored(rendered.text, pack_ids(rendered.token_ids)))
        await self.store.set_value(key, value, self.ttl_s)


def _decode(raw: bytes) -> RenderedPrompt:
    stored = _decoder.decode(raw)
    if len(stored.packed_ids) % _TOKEN_DTYPE.itemsize:
        raise ValueError(f"{len(stored.packed_ids)} bytes of token ids are not whole uint32s")
    return RenderedPrompt(stored.text, unpack_ids(stored.packed_ids))
