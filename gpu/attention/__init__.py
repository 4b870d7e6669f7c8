"""Paged attention: the contract every backend implements.

KV cache layout (one pair of tensors per layer)::

    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim)

    slot = block_id * block_size + offset      # where one token's K/V live

    block table of a sequence (int32):  [ 7 | 2 | 9 | ...]
        token position p lives at slot table[p // block_size] * block_size + p % block_size

One engine step packs the new tokens of every scheduled sequence into one flat
batch, **decodes first**, then prefills (chunks of prompts)::

    tokens:  [d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ]
              decodes    prefill 0     prefill 1
              (1 token   (query_len    (query_len 2)
               each)      4)

A "decode" is any sequence with exactly one new token; a "prefill" any sequence
with more. Both read keys/values **from the cache** after `write_kv` stored the
new ones, so a prefill chunk that continues a cached prefix (prefix-cache hit or
chunked prefill) needs nothing special: the query token at position `p` attends
to cache positions `0..p` (causal). Query token `j` of a prefill sequence with
`context_len` C and query length Q sits at position `C - Q + j`.

Backends:
- `gpu.attention.torch_backend.TorchAttentionBackend` — CPU (and any torch device).
- `gpu.attention.cpu_native.CpuNativeAttentionBackend` — the CPU default: decode by a
  C++ kernel reading the paged cache in place (falls back to torch if it cannot be built).
- `gpu.attention.cuda_backend` — CuPy raw kernels from `gpu/kernels/*.cu` (CUDA only).
Both are tested against the same reference in `tests/gpu/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every layer (built once by the model runner).

    Index tensors are int32 except `slot_mapping` (int64). The `*_list` fields
    are host copies for backends that loop on the CPU.
    """

    slot_mapping: torch.Tensor  # (num_tokens,) int64
    # decode part: sequences [0, num_decodes), tokens [0, num_decodes)
    num_decodes: int
    decode_block_tables: torch.Tensor  # (num_decodes, max_blocks) int32, padded with 0
    decode_context_lens: torch.Tensor  # (num_decodes,) int32, includes the new token
    decode_max_context_len: int
    # prefill part: tokens [num_decodes, num_tokens)
    num_prefills: int
    prefill_query_start_loc: torch.Tensor  # (num_prefills + 1,) int32, offsets inside the prefill slice
    prefill_context_lens: torch.Tensor  # (num_prefills,) int32: cached prefix + new tokens
    prefill_block_tables: torch.Tensor  # (num_prefills, max_blocks) int32, padded with 0
    prefill_max_query_len: int
    prefill_max_context_len: int
    prefill_query_lens_list: list[int]
    prefill_context_lens_list: list[int]
    decode_context_lens_list: list[int]

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


class AttentionBackend(Protocol):
    """Kernels over the paged KV cache. All tensors live on the backend's device."""

    name: str

    def write_kv(
        self,
        key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # (num_tokens,) int64; a negative slot means "skip"
    ) -> None:
        """Scatter new keys/values into their cache slots (in place)."""
        ...

    def decode(
        self,
        query: torch.Tensor,  # (num_decodes, num_heads, head_dim)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # (num_decodes, max_blocks) int32
        context_lens: torch.Tensor,  # (num_decodes,) int32
        max_context_len: int,
        scale: float,
    ) -> torch.Tensor:  # (num_decodes, num_heads, head_dim)
        """One query token per sequence attending to its whole context (GQA)."""
        ...

    def prefill(
        self,
        query: torch.Tensor,  # (num_prefill_tokens, num_heads, head_dim)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        query_start_loc: torch.Tensor,  # (num_prefills + 1,) int32
        context_lens: torch.Tensor,  # (num_prefills,) int32
        block_tables: torch.Tensor,  # (num_prefills, max_blocks) int32
        max_query_len: int,
        max_context_len: int,
        scale: float,
    ) -> torch.Tensor:  # (num_prefill_tokens, num_heads, head_dim)
        """Causal attention of packed variable-length query chunks over cached context."""
        ...

    def copy_blocks(
        self,
        caches: list[torch.Tensor],  # every k_cache and v_cache of every layer
        src: torch.Tensor,  # (n,) int64 block ids
        dst: torch.Tensor,  # (n,) int64 block ids
    ) -> None:
        """Copy-on-write: block src[i] → dst[i] in every cache tensor."""
        ...

    def swap_blocks(
        self,
        src_cache: torch.Tensor,
        dst_cache: torch.Tensor,
        src: torch.Tensor,  # (n,) int64 block ids in src_cache
        dst: torch.Tensor,  # (n,) int64 block ids in dst_cache
    ) -> None:
        """Move blocks between caches on different devices (device ↔ host)."""
        ...


@dataclass(frozen=True)
class AttentionShape:
    """What a backend must serve: the model's head size and GQA group (query heads per KV
    head), and the KV cache's block size."""

    head_dim: int
    group: int
    block_size: int


def get_backend(device: str, *, batch_invariant: bool = False, shape: AttentionShape | None = None
                ) -> AttentionBackend:
    """The fastest backend available for `device` ("cpu", "cuda", "cuda:1", ...);
    `batch_invariant` asks the CPU backend for one prefill path whatever the chunk size.
    On CUDA, a `shape` no kernel was built for (`gpu.kernels.build`) gets the torch
    backend, with a warning: the CUDA launchers refuse it at the first forward, which
    started a server that failed every request."""
    if device.startswith("cuda"):
        try:
            from gpu.attention.cuda_backend import (
                CudaAttentionBackend,
                cuda_backend_available,
                unbuilt,
            )
        except ImportError:  # cupy not installed
            pass
        else:
            if cuda_backend_available():
                why = unbuilt(shape) if shape is not None else None
                if why is None:
                    return CudaAttentionBackend()
                log.warning("the CUDA attention kernels were not built for this model: %s; serving with the "
                            "torch attention backend", why)
    if device == "cpu":
        from gpu.attention.cpu_native import CpuNativeAttentionBackend, cpu_native_available

        if cpu_native_available():
            return CpuNativeAttentionBackend(batch_invariant=batch_invariant)
    from gpu.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
