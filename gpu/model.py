"""Llama decoder over a paged KV cache (torch; CPU or any torch device).

One forward call runs one engine step: a flat batch of tokens from many
sequences, decodes first then prefill chunks (layout in `gpu.attention`).
Per layer::

    x ─ RMSNorm ─ qkv_proj ─┬ q ─ RoPE ─┐
                            ├ k ─ RoPE ─┼ write_kv → cache ─ decode(q[:nd]) ┐
                            └ v ────────┘                 └ prefill(q[nd:]) ┴ cat ─ o_proj ─ + x
    h ─ RMSNorm ─ gate_up_proj ─ silu(gate) * up ─ down_proj ─ + h

Q/K/V and gate/up projections are fused (weights stacked row-wise at load) so a
layer runs four matmuls instead of seven. Nothing here enters inference mode:
call sites wrap calls in `torch.inference_mode()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from gpu.attention import AttentionBackend, AttentionMetadata
from gpu.config import ModelConfig
from gpu.loader import Checkpoint


def _linear(in_features: int, out_features: int, dtype: torch.dtype, device) -> nn.Linear:
    """Bias-free, frozen, uninitialised Linear: weights always come from a checkpoint,
    and random init of 135M parameters would cost seconds at every start."""
    layer = skip_init(nn.Linear, in_features, out_features, bias=False, dtype=dtype, device=device)
    return layer.requires_grad_(False)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the HF reference."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op (a decode step runs 61 of these)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the HF "rotate half" layout, cos/sin cached for every position.

    Positions are looked up per token, so packed batches with arbitrary
    positions (chunked prefill, prefix hits, decodes) need nothing special.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, device: torch.device | str) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (P, hd/2)
        # kept in float32 (rotation is computed in float32 whatever the model dtype); (P, hd/2) each
        self.register_buffer("cos", freqs.cos().to(device), persistent=False)
        self.register_buffer("sin", freqs.sin().to(device), persistent=False)
        self.max_positions = max_positions

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of each token's position, (T, 1, hd/2) float32 each: once per step,
        shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate each x (T, n_heads, hd) by its token's position (T,)."""
        cos_sin = self.lookup(positions)
        return tuple(apply_rotary(cos_sin, x) for x in xs)


def apply_rotary(cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x (T, n_heads, hd) rotated "rotate half"-style, computed in float32."""
    cos, sin = cos_sin  # (T, 1, hd/2) each
    x1, x2 = x.float().chunk(2, dim=-1)  # (T, nh, hd/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.scale = config.head_dim**-0.5
        h = config.hidden_size
        self.qkv_proj = _linear(h, config.q_size + 2 * config.kv_size, dtype, device)
        self.o_proj = _linear(config.q_size, h, dtype, device)

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # RotaryEmbedding.lookup(positions)
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        cfg = self.config
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, q_size + 2 kv_size)
        # q and k heads are adjacent in the fused projection: rotate them in one pass
        qk = apply_rotary(cos_sin, qkv[:, : cfg.q_size + cfg.kv_size].view(T, cfg.num_heads + cfg.num_kv_heads,
                                                                              cfg.head_dim))  # (T, nh+nkv, hd)
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)  # (T, nh, hd), (T, nkv, hd)
        v = qkv[:, cfg.q_size + cfg.kv_size :].reshape(T, cfg.num_kv_heads, cfg.head_dim)  # (T, nkv, hd)
        k_cache, v_cache = kv_cache
        self.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)

        nd = meta.num_decodes
        parts = []
        if nd:
            parts.append(
                self.backend.decode(
                    q[:nd],
                    k_cache,
                    v_cache,
                    meta.decode_block_tables,
                    meta.decode_context_lens,
                    meta.decode_max_context_len,
                    self.scale,
                )
            )
        if meta.num_prefills:
            parts.append(
                self.backend.prefill(
                    q[nd:],
                    k_cache,
                    v_cache,
                    meta.prefill_query_start_loc,
                    meta.prefill_context_lens,
                    meta.prefill_block_tables,
                    meta.prefill_max_query_len,
                    meta.prefill_max_context_len,
                    self.scale,
                )
            )
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # (T, nh, hd)
        if out.shape[0] != T:
            raise ValueError(f"attention returned {out.shape[0]} rows for {T} tokens: metadata does not cover the batch")
        return self.o_proj(out.reshape(T, cfg.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = _linear(h, 2 * i, dtype, device)
        self.down_proj = _linear(i, h, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (T, inter) each
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(config, backend, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device)

    def forward(self, x, cos_sin, kv_cache, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack plus the LM head (tied to the embeddings when the config says so)."""

    def __init__(
        self, config: ModelConfig, attn_backend: AttentionBackend, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed_tokens = skip_init(nn.Embedding, config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.requires_grad_(False)
        self.rope = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, device
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, attn_backend, dtype, device) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        if config.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(
                torch.empty(config.vocab_size, config.hidden_size, dtype=dtype, device=device),
                requires_grad=False,
            )

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, attn_backend: AttentionBackend, dtype: torch.dtype, device: torch.device | str
    ) -> LlamaModel:
        """Build the model and copy the checkpoint in, fusing QKV and gate/up."""
        model = cls(ckpt.config, attn_backend, dtype, device)
        model.load_hf_state_dict(ckpt.state_dict)
        return model

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy weights named like HF's LlamaForCausalLM (see `gpu.loader`)."""

        def put(dst: torch.Tensor, *names: str) -> None:
            """Copy sd[names] stacked along dim 0 into dst (row slices: no temporary cat)."""
            rows = sum(sd[n].shape[0] for n in names)
            if rows != dst.shape[0] or any(sd[n].shape[1:] != dst.shape[1:] for n in names):
                shapes = [tuple(sd[n].shape) for n in names]
                raise ValueError(f"{names}: shapes {shapes} do not fit {tuple(dst.shape)}")
            start = 0
            for n in names:
                dst[start : start + sd[n].shape[0]].copy_(sd[n])
                start += sd[n].shape[0]

        put(self.embed_tokens.weight, "model.embed_tokens.weight")
        put(self.norm.weight, "model.norm.weight")
        if not self.config.tie_word_embeddings:
            put(self.lm_head_weight, "lm_head.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            put(layer.input_layernorm.weight, p + "input_layernorm.weight")
            put(layer.post_attention_layernorm.weight, p + "post_attention_layernorm.weight")
            attn = p + "self_attn."
            put(layer.self_attn.qkv_proj.weight, attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight")
            put(layer.self_attn.o_proj.weight, attn + "o_proj.weight")
            put(layer.mlp.gate_up_proj.weight, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            put(layer.mlp.down_proj.weight, p + "mlp.down_proj.weight")

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states (T, hidden); keys/values of the T tokens land in the cache."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(self.layers)} layers")
        x = self.embed_tokens(input_ids)  # (T, hidden)
        cos_sin = self.rope.lookup(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos_sin, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) final hidden states → (N, vocab) float32 logits."""
        return F.linear(hidden, self.lm_head_weight).float()


def allocate_kv_caches(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed paged KV cache, one (k_cache, v_cache) pair per layer.

    One allocation of (layers, 2, num_blocks, block_size, kv_heads, head_dim);
    each cache is a contiguous view (num_blocks, block_size, kv_heads, head_dim).
    """
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
    storage = torch.zeros(
        config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype=dtype, device=device
    )
    return [(storage[i, 0], storage[i, 1]) for i in range(config.num_layers)]
