"""Naive paged attention: the ground truth every backend is tested against.

Deliberately slow and obvious: python loops over sequences, query tokens and
context positions; each key/value is fetched one position at a time through the
block table; scores, softmax and the weighted sum run in float64. Nothing here
is shared with the real backends, so a bug in their gather or masking cannot
hide in both places.

Functions take the same arguments as the `AttentionBackend` methods of the same
name (see `gpu.attention`) and return float64 tensors on the CPU.
"""

from __future__ import annotations

import torch


def slot_of(block_table: torch.Tensor, position: int, block_size: int) -> tuple[int, int]:
    """(block id, offset in block) of token `position` under one sequence's block table."""
    return int(block_table[position // block_size]), position % block_size


def gather_context(
    cache: torch.Tensor,  # (num_blocks, block_size, nkv, hd)
    block_table: torch.Tensor,  # (max_blocks,)
    context_len: int,
) -> torch.Tensor:  # (context_len, nkv, hd) float64
    """The first `context_len` cached tokens of one sequence, position by position."""
    block_size = cache.shape[1]
    rows = []
    for p in range(context_len):
        block, offset = slot_of(block_table, p, block_size)
        rows.append(cache[block, offset].to(torch.float64).cpu())
    return torch.stack(rows)


def attend_one(
    q: torch.Tensor,  # (nh, hd) float64
    keys: torch.Tensor,  # (n, nkv, hd) float64: the positions this query may see
    values: torch.Tensor,  # (n, nkv, hd) float64
    scale: float,
) -> torch.Tensor:  # (nh, hd) float64
    """Softmax attention of one query token; head h reads KV head h // (nh // nkv)."""
    num_heads, num_kv_heads = q.shape[0], keys.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for h in range(num_heads):
        kv = h // group
        scores = (keys[:, kv] @ q[h]) * scale  # (n,)
        weights = torch.exp(scores - scores.max())
        weights = weights / weights.sum()
        out[h] = weights @ values[:, kv]  # (hd,)
    return out


def write_kv(
    key: torch.Tensor,  # (T, nkv, hd)
    value: torch.Tensor,  # (T, nkv, hd)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # (T,) int64, negative = skip
) -> None:
    """Store token t at slot_mapping[t], one token at a time (in place)."""
    block_size = k_cache.shape[1]
    for t in range(key.shape[0]):
        slot = int(slot_mapping[t])
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = key[t]
        v_cache[slot // block_size, slot % block_size] = value[t]


def decode(
    query: torch.Tensor,  # (B, nh, hd)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks)
    context_lens: torch.Tensor,  # (B,)
    max_context_len: int,
    scale: float,
) -> torch.Tensor:  # (B, nh, hd) float64
    """Each sequence's single query token attends to its whole context."""
    del max_context_len  # only a hint for the real kernels
    out = torch.empty(query.shape, dtype=torch.float64)
    for b in range(query.shape[0]):
        n = int(context_lens[b])
        keys = gather_context(k_cache, block_tables[b], n)
        values = gather_context(v_cache, block_tables[b], n)
        out[b] = attend_one(query[b].to(torch.float64).cpu(), keys, values, scale)
    return out


def prefill(
    query: torch.Tensor,  # (T, nh, hd) packed query chunks
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # (S + 1,)
    context_lens: torch.Tensor,  # (S,)
    block_tables: torch.Tensor,  # (S, max_blocks)
    max_query_len: int,
    max_context_len: int,
    scale: float,
) -> torch.Tensor:  # (T, nh, hd) float64
    """Query token j of a chunk of length Q with context C sits at position C - Q + j
    and sees positions 0..C - Q + j."""
    del max_query_len, max_context_len
    out = torch.empty(query.shape, dtype=torch.float64)
    for s in range(context_lens.shape[0]):
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        n_ctx, n_q = int(context_lens[s]), end - start
        keys = gather_context(k_cache, block_tables[s], n_ctx)
        values = gather_context(v_cache, block_tables[s], n_ctx)
        for j in range(n_q):
            visible = n_ctx - n_q + j + 1
            q = query[start + j].to(torch.float64).cpu()
            out[start + j] = attend_one(q, keys[:visible], values[:visible], scale)
    return out


def copy_blocks(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """cache[dst[i]] = cache[src[i]] for every cache, pair by pair."""
    for cache in caches:
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            cache[d] = cache[s].clone()
