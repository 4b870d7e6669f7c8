"""Paged attention in plain torch: the CPU engine's backend (works on any torch device).

Decode gathers every sequence's blocks with ONE `index_select` over the block
axis of the cache (block granularity, not token granularity), giving a padded
(B, max_blocks * block_size, nkv, hd) view; positions at or past a sequence's
context length are masked out. GQA needs no copies of K/V: the query is viewed
as (B, nkv, group, hd), i.e. the `group` query heads that share a KV head become
SDPA's "query length" axis, so each KV head is read once by its whole group::

    q (B, nh, hd) ──view──▶ (B, nkv, group, hd)      "heads" = nkv, "queries" = group
    k gathered               (B, nkv, L, hd)          (transposed view, no copy)
    mask                     (B, 1, 1, L)             True where position < context_len

`scaled_dot_product_attention` with a boolean mask measured faster than
matmul + softmax on 2 CPU cores for B = 1..64, ctx = 16..1024 (nh 9, nkv 3,
hd 64), in fp32 and bf16; its CPU kernel accumulates bf16 in fp32.

Prefill loops over sequences (a step holds few prefills, each with many tokens):
gather the context, then causal SDPA with the query offset — query token j of
a chunk of length Q with context C sits at position C - Q + j. When C == Q (no
cached prefix) the mask is SDPA's own `is_causal`.

Requirement on the caller: every cache slot holds a finite value (allocate the
caches with `torch.zeros`). Masked positions get weight 0, and 0 * NaN is NaN;
the CUDA kernels never read past a context, this backend reads whole blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim), "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("KV caches must be contiguous (they are written through flat views)")


def _gather_blocks(
    cache: torch.Tensor,  # (num_blocks, bs, nkv, hd)
    block_tables: torch.Tensor,  # (B, nb) any int dtype
) -> torch.Tensor:  # (B, nb * bs, nkv, hd)
    batch, num_blocks = block_tables.shape
    _, block_size, nkv, hd = cache.shape
    flat_ids = block_tables.reshape(-1).to(torch.long)
    return cache.index_select(0, flat_ids).view(batch, num_blocks * block_size, nkv, hd)


def _blocks_needed(context_len: int, block_size: int, table_width: int) -> int:
    needed = -(-context_len // block_size)
    if needed > table_width:
        raise ValueError(
            f"context of {context_len} tokens needs {needed} blocks but block tables "
            f"have {table_width} columns"
        )
    return needed


def _check_decode(query, k_cache, v_cache, block_tables, max_context_len: int) -> int:
    """Validate decode inputs shared by the CPU backends; returns the blocks to read."""
    _check_cache(k_cache, v_cache)
    num_heads, nkv = query.shape[1], k_cache.shape[2]
    if num_heads % nkv:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {nkv}")
    return _blocks_needed(max_context_len, k_cache.shape[1], block_tables.shape[1])


def _check_prefill(
    query, k_cache, v_cache, query_start_loc, context_lens, block_tables
) -> tuple[list[int], list[int]]:
    """Validate prefill inputs shared by the CPU backends; returns (starts, context lens)
    as lists: sequence s owns query rows starts[s]:starts[s+1], the last of its context."""
    _check_cache(k_cache, v_cache)
    num_heads, nkv = query.shape[1], k_cache.shape[2]
    if num_heads % nkv:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {nkv}")
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    if len(starts) != len(lens) + 1 or starts[0] != 0 or starts[-1] != query.shape[0]:
        raise ValueError(
            f"query_start_loc {starts} does not partition {query.shape[0]} query tokens "
            f"into {len(lens)} sequences"
        )
    for s, n_ctx in enumerate(lens):
        n_q = starts[s + 1] - starts[s]
        if n_q < 0 or n_q > n_ctx:
            raise ValueError(f"sequence {s}: {n_q} query tokens but context of {n_ctx}")
    _blocks_needed(max(lens, default=0), k_cache.shape[1], block_tables.shape[1])
    return starts, lens


class TorchAttentionBackend:
    """`AttentionBackend` in torch ops; see the module docstring for the strategy."""

    name = "torch"

    def write_kv(
        self,
        key: torch.Tensor,  # (T, nkv, hd)
        value: torch.Tensor,  # (T, nkv, hd)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # (T,) int64, negative = skip
    ) -> None:
        """Scatter by slot: the caches are viewed as (num_blocks * bs, nkv, hd) rows."""
        _check_cache(k_cache, v_cache)
        if key.shape != value.shape or key.shape[1:] != k_cache.shape[2:]:
            raise ValueError(
                f"key/value {tuple(key.shape)}/{tuple(value.shape)} do not match cache "
                f"heads x head_dim {tuple(k_cache.shape[2:])}"
            )
        if slot_mapping.shape != (key.shape[0],):
            raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} != ({key.shape[0]},)")
        slots = slot_mapping.to(torch.long)
        keep = slots >= 0
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
        k_rows = k_cache.view(-1, *k_cache.shape[2:])  # (num_slots, nkv, hd)
        v_rows = v_cache.view(-1, *v_cache.shape[2:])
        k_rows.index_copy_(0, slots, key.to(k_cache.dtype))
        v_rows.index_copy_(0, slots, value.to(v_cache.dtype))

    def decode(
        self,
        query: torch.Tensor,  # (B, nh, hd)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # (B, max_blocks) int32
        context_lens: torch.Tensor,  # (B,) int32
        max_context_len: int,
        scale: float,
    ) -> torch.Tensor:  # (B, nh, hd)
        nb = _check_decode(query, k_cache, v_cache, block_tables, max_context_len)
        if query.shape[0] == 0:
            return query.new_empty(query.shape)
        batch, num_heads, head_dim = query.shape
        _, block_size, nkv, _ = k_cache.shape
        tables = block_tables[:, :nb]
        keys = _gather_blocks(k_cache, tables).transpose(1, 2)  # (B, nkv, L, hd)
        values = _gather_blocks(v_cache, tables).transpose(1, 2)  # (B, nkv, L, hd)
        positions = torch.arange(nb * block_size, device=query.device)  # (L,)
        visible = positions[None, :] < context_lens.to(query.device)[:, None]  # (B, L)
        q = query.reshape(batch, nkv, num_heads // nkv, head_dim)  # (B, nkv, group, hd)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=visible[:, None, None, :], scale=scale
        )  # (B, nkv, group, hd)
        return out.reshape(batch, num_heads, head_dim)

    def prefill(
        self,
        query: torch.Tensor,  # (T, nh, hd)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        query_start_loc: torch.Tensor,  # (S + 1,) int32
        context_lens: torch.Tensor,  # (S,) int32
        block_tables: torch.Tensor,  # (S, max_blocks) int32
        max_query_len: int,
        max_context_len: int,
        scale: float,
    ) -> torch.Tensor:  # (T, nh, hd)
        starts, lens = _check_prefill(query, k_cache, v_cache, query_start_loc, context_lens, block_tables)
        block_size = k_cache.shape[1]
        out = torch.empty_like(query)
        for s, n_ctx in enumerate(lens):
            start, end = starts[s], starts[s + 1]
            n_q = end - start
            if n_q == 0:
                continue
            nb = _blocks_needed(n_ctx, block_size, block_tables.shape[1])
            table = block_tables[s : s + 1, :nb]
            keys = _gather_blocks(k_cache, table)[0, :n_ctx].transpose(0, 1)  # (nkv, C, hd)
            values = _gather_blocks(v_cache, table)[0, :n_ctx].transpose(0, 1)  # (nkv, C, hd)
            # 4-D (1, heads, len, hd) inputs: with a batch dim SDPA takes its fused
            # flash kernel on the CPU; 3-D inputs fall back to the math path (≈4× slower)
            q = query[start:end].transpose(0, 1)[None]  # (1, nh, Q, hd)
            keys, values = keys[None], values[None]  # (1, nkv, C, hd)
            if n_q == n_ctx:
                o = F.scaled_dot_product_attention(
                    q, keys, values, is_causal=True, scale=scale, enable_gqa=True
                )
            else:
                q_pos = torch.arange(n_ctx - n_q, n_ctx, device=query.device)  # (Q,)
                k_pos = torch.arange(n_ctx, device=query.device)  # (C,)
                mask = k_pos[None, :] <= q_pos[:, None]  # (Q, C)
                o = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
                )
            out[start:end] = o[0].transpose(0, 1)  # (Q, nh, hd)
        return out

    def copy_blocks(self, caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        """All sources are read before any destination is written (a snapshot)."""
        if src.shape != dst.shape:
            raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ")
        if src.numel() == 0:
            return
        for cache in caches:
            s = src.to(cache.device, torch.long)
            d = dst.to(cache.device, torch.long)
            cache.index_copy_(0, d, cache.index_select(0, s))

    def swap_blocks(
        self,
        src_cache: torch.Tensor,
        dst_cache: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
    ) -> None:
        if src.shape != dst.shape:
            raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ")
        if src_cache.shape[1:] != dst_cache.shape[1:] or src_cache.dtype != dst_cache.dtype:
            raise ValueError(
                f"caches differ in block shape or dtype: {tuple(src_cache.shape)} "
                f"{src_cache.dtype} vs {tuple(dst_cache.shape)} {dst_cache.dtype}"
            )
        if src.numel() == 0:
            return
        blocks = src_cache.index_select(0, src.to(src_cache.device, torch.long))
        dst_cache.index_copy_(0, dst.to(dst_cache.device, torch.long), blocks.to(dst_cache.device))
