"""A cache of prompt logprobs by prefix block, so scoring requests can take prefix hits.

A request asking for its prompt's logprobs (`SamplingParams.prompt_logprobs`) needs the
logits of every prompt position, so a KV prefix-cache hit, whose positions never run,
would leave holes. vLLM therefore runs such requests without the prefix cache. But the
logprobs of a prefix's tokens depend on that prefix alone, so they can be cached as the
KV entries are: per full block, by the block's chain hash (`gpu.block_manager.chain_hash`,
which names the whole prefix up to and including the block, in its namespace)::

    block b holds tokens [b*bs, (b+1)*bs): its entry is those tokens' logprobs, each given
    the tokens before it (token 0 has none), with the k most likely tokens at each

A later scoring request whose first m blocks have entries knows the logprobs of tokens
1 .. m*bs-1 without running them. It still has to run position m*bs-1 (whose logits give
token m*bs's logprob), so it may take at most m-1 blocks of KV prefix hits and recomputes
the last one: with lm-evaluation-harness's multiple-choice requests (the same k-shot
context before each answer), every answer after the first prefills its answer and one
block of context instead of the whole context.

Entries are model outputs, valid for the engine's life (same weights, dtype); the cache
is an LRU bounded by entries. An entry stored with k alternatives answers requests with
k or fewer. Pure Python, no torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from gpu.block_manager import chain_hash, root_hash

# a token's logprob, its position's top k, its rank there (`gpu.runner.PromptLogprobs`)
Entry = tuple[float | None, tuple[tuple[int, float], ...], int | None]


@dataclass(frozen=True)
class _Block:
    tokens: tuple[int, ...]  # compared on lookup: a hash collision never answers wrong logprobs
    k: int
    entries: tuple[Entry, ...]


class PromptLogprobCache:
    """Prompt logprobs of full blocks, keyed by chain hash (see the module docstring)."""

    def __init__(self, block_size: int, max_blocks: int) -> None:
        if block_size < 1 or max_blocks < 0:
            raise ValueError("block_size must be >= 1 and max_blocks >= 0")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self.hits = 0  # blocks answered from the cache (for tests and benchmarks)

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()

    def _hashes(self, token_ids: Sequence[int], namespace: str | None, blocks: int):
        parent = root_hash(namespace)
        bs = self.block_size
        for b in range(blocks):
            chunk = tuple(token_ids[b * bs : (b + 1) * bs])
            parent = chain_hash(parent, chunk)
            yield b, parent, chunk

    def block_hashes(self, token_ids: Sequence[int], namespace: str | None) -> list[int]:
        """The chain hash of each full block of `token_ids` (what entries are keyed by)."""
        return [h for _, h, _ in self._hashes(token_ids, namespace, len(token_ids) // self.block_size)]

    def lookup(self, token_ids: Sequence[int], namespace: str | None, k: int,
               hashes: Sequence[int] | None = None) -> list[Entry]:
        """The entries of tokens 0 .. m*bs-1 for the longest run of m leading full blocks
        cached with at least k alternatives (tops cut to k); [] when m is 0. `hashes`: the
        blocks' `block_hashes`, when the caller has them."""
        out: list[Entry] = []
        bs = self.block_size
        if hashes is None:
            hashes = self.block_hashes(token_ids, namespace)
        for b, h in enumerate(hashes):
            chunk = tuple(token_ids[b * bs : (b + 1) * bs])
            block = self._blocks.get(h)
            if block is None or block.tokens != chunk or block.k < k:
                break
            self._blocks.move_to_end(h)
            out += [(lp, top[:k], rank) for lp, top, rank in block.entries]
            self.hits += 1
        return out

    def store(self, token_ids: Sequence[int], namespace: str | None, k: int, entries: Sequence[Entry]) -> None:
        """Keep the entries (one per prompt token, as `lookup` returns them) of every full
        block of `token_ids`; a block already cached with more alternatives stays."""
        if self.max_blocks == 0:
            return
        bs = self.block_size
        for b, h, chunk in self._hashes(token_ids, namespace, len(token_ids) // bs):
            old = self._blocks.get(h)
            if old is not None and old.tokens == chunk and old.k >= k:
                self._blocks.move_to_end(h)
                continue
            self._blocks[h] = _Block(chunk, k, tuple(entries[b * bs : (b + 1) * bs]))
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)


__all__ = ["Entry", "PromptLogprobCache"]
