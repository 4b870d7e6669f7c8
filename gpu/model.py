"""Llama decoder over a paged KV cache (torch; CPU or any torch device).

One forward call runs one engine step: a flat batch of tokens from many
sequences, decodes first then prefill chunks (layout in `gpu.attention`).
Per layer::

    x ─ RMSNorm ─ qkv_proj ─┬ q ─ RoPE ─┐
                            ├ k ─ RoPE ─┼ write_kv → cache ─ decode(q[:nd]) ┐
                            └ v ────────┘                 └ prefill(q[nd:]) ┴ cat ─ o_proj ─ + x
    h ─ RMSNorm ─ gate_up_proj ─ silu(gate) * up ─ down_proj ─ + h

Q/K/V and gate/up projections are fused (weights stacked row-wise at load) so a
layer runs four matmuls instead of seven. On CPU every projection and the LM head
also keep a copy pre-packed for oneDNN (`PackedWeight`), used from 4 rows up in fp32
(always in bf16): MKL re-packs the weight on every small-batch call, which made
decode steps of 4-64 sequences spend up to 2x longer in GEMMs than needed.
The elementwise work between the matmuls runs as fused CPU kernels
(`gpu.layer_ops`): residual add + RMSNorm in one pass (vLLM's fused_add_rms_norm;
each layer hands its MLP output and the residual stream to the next layer's norm),
RoPE of q and k in place in the QKV output, SiLU(gate)·up in one pass.
Nothing here enters inference mode:
call sites wrap calls in `torch.inference_mode()`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import time
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401 — imported here, not under the first Engine (see below)
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from gpu import layer_ops
from gpu.attention import AttentionBackend, AttentionMetadata
from gpu.config import ModelConfig
from gpu.loader import Checkpoint
from gpu.lora import LoraBatch
from gpu.quantization import (
    Int8Weight,
    QuantizationUnavailable,
    int8_rows_variant_reason,
    smoothing_factors,
)

log = logging.getLogger(__name__)

# Why torch._dynamo is imported above: torch imports it lazily, on the first call of a
# dynamo-disabled op — here `skip_init`'s `normal_` in the first `LlamaModel`. During that
# import `torch.fx.wrap` keeps the importing module's frame, and a frame keeps its callers
# (`f_back`): the process's first Engine, with its weights and KV cache (1.5 GiB by
# default), was never freed. Seen as a 2 GB engine that outlived `del` in every test
# process and every benchmark that builds engines one after another.

# Smallest batch (rows) for which the pre-packed oneDNN weight beats a plain fp32 GEMM,
# where the CPU's BLAS has a good GEMV. Measured on an Intel core (2 threads): at 1-3
# rows MKL's GEMV path reads the weight once and wins (9.3 vs 11.3 ms for a whole decode
# step's projections at 1 row); from 4 rows on MKL's sgemm re-packs the whole weight on
# every call (the 113 MB LM head at 8 rows: 11.3 ms vs 3.9 ms at 1 row) and the
# pre-packed weight is 1.3-2x faster. On an AMD Zen 4 core MKL's GEMV is itself ~2x
# slower than the packed kernel (LM head at 1 row: 9.7 vs 4.1 ms), so the choice is
# measured once per process (`fp32_packed_min_rows`). bf16 is always faster packed.
PACKED_MIN_ROWS_FP32 = 4


@functools.cache
def fp32_packed_min_rows() -> int:
    """Rows from which fp32 projections use the packed weight: 1 when the packed kernel
    beats the plain GEMM at a single row on this CPU, else `PACKED_MIN_ROWS_FP32`.

    Timed once per process on a (3072, 576) weight — the shape of SmolLM2's fused
    gate/up projection — best of 3 rounds of 20 calls each (a few ms); the packed path
    must win by 10% to switch, so a near-tie keeps the BLAS GEMV.
    """
    if not onednn_packing_available("cpu", torch.float32):
        return PACKED_MIN_ROWS_FP32
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3072, 576, generator=g)
    x = torch.randn(1, 576, generator=g)
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    plain = best(lambda: F.linear(x, weight))
    onednn = best(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    rows = 1 if onednn < 0.9 * plain else PACKED_MIN_ROWS_FP32
    log.info("fp32 projections: packed %.1f us vs plain %.1f us at 1 row -> packed from %d rows",
             onednn / 20 * 1e6, plain / 20 * 1e6, rows)
    return rows


def onednn_packing_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True when weights for `device`/`dtype` can be pre-packed for oneDNN's linear kernel."""
    return (
        torch.device(device).type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and _onednn_packs_on_this_cpu(dtype)
    )


@functools.cache
def _onednn_packs_on_this_cpu(dtype: torch.dtype) -> bool:
    """Pack and run a tiny weight once per dtype: the ops exist in every CPU build, but
    oneDNN's bf16 packing refuses CPUs without avx512bw/vl/dq or avx_ne_convert (an AVX2-only
    Zen 1 raised "bf16 path needs the cpu support ..." from every model load in bf16)."""
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 16)
            torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), packed, None, "none", [], "")
    except RuntimeError as e:
        log.info("oneDNN cannot pre-pack %s weights on this CPU (%s): plain GEMMs", dtype, e)
        return False
    return True


class PackedWeight:
    """A (out, in) weight plus, on CPU, a copy pre-packed in oneDNN's blocked layout.

    `linear(x)` is `F.linear(x, weight)` computed by whichever kernel is faster for
    x's row count: the packed oneDNN kernel for bf16 and for fp32 from
    `fp32_packed_min_rows()` rows (4, or 1 where the BLAS GEMV is slow), else the plain
    GEMM. Both accumulate in fp32; results agree to float rounding (~1e-6 relative),
    like any two GEMM blockings. The packed copy costs the weight's size again in
    memory (fp32 keeps both, for small steps).

    `pack()` must be called again after the weight's values change (the model does
    so at the end of every state-dict load).

    Batch invariance (`pack(batch_invariant=True)`): a GEMM library picks its kernel and
    blocking by the row count, so a row's result can depend on how many other rows share
    the call. On an AMX Xeon, oneDNN's bf16 kernel gives every row the bits it gets alone
    up to 32 rows and different bits from 33 on (measured on all five SmolLM2 shapes). In
    this mode one kernel serves every row count, and calls are cut into tiles of
    `row_tile` rows — the largest tile `invariant_row_tile` verifies on this device —
    so each row comes out as it would alone, whatever else the step holds. A row alone is
    computed as one row of a two-row call: on a Zen 4 oneDNN's bf16 kernel gives a single
    row other bits than any call of 2 or more (0.02% of the outputs of the 576x1536
    projection) and the same bits to every call of 2 to 64.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.packed: torch.Tensor | None = None
        self.min_rows = 0 if weight.dtype == torch.bfloat16 else PACKED_MIN_ROWS_FP32
        self.row_tile = 0  # 0: one call whatever the rows; > 0: batch-invariant tiles of this many rows

    def pack(self, *, batch_invariant: bool = False) -> None:
        self.row_tile = 0
        if not onednn_packing_available(self.weight.device, self.weight.dtype):
            self.packed = None
        else:
            if self.weight.dtype == torch.float32:
                # in batch-invariant mode one kernel for every row count: the packed one
                self.min_rows = 1 if batch_invariant else fp32_packed_min_rows()
            with torch.no_grad():
                # the batch-size hint picks the blocking; 16 was best for 4-512 rows measured
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16)
        if batch_invariant:
            self.row_tile = invariant_row_tile(self)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2 and x.shape[0] >= self.min_rows and x.dtype == self.weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")
        return F.linear(x, self.weight)

    def _call_invariant(self, x: torch.Tensor) -> torch.Tensor:
        """`_call`, with a single row computed as the first of two (see the class docstring)."""
        if x.dim() == 2 and x.shape[0] == 1:
            return self._call(x.expand(2, -1))[:1]
        return self._call(x)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        tile = self.row_tile
        if not tile:
            return self._call(x)
        if x.dim() == 2 and x.shape[0] > tile:
            return torch.cat([self._call_invariant(x[start:start + tile]) for start in range(0, x.shape[0], tile)])
        return self._call_invariant(x)


# Row tiles `invariant_row_tile` tries, largest first; 1 (a call per row) is invariant by
# construction. Larger tiles are cheaper: on an AMX Xeon, 96 requests at 32 running
# sequences took 1.07x the untiled time with tiles of 32, 1.19x at 64 sequences.
INVARIANT_TILE_CANDIDATES = (32, 16, 8, 4, 2, 1)


def invariant_row_tile(kernel: PackedWeight) -> int:
    """The largest tile t of `INVARIANT_TILE_CANDIDATES` for which every call of 1..t rows
    gives each row the exact bits that row gets alone, checked on random rows through
    `kernel`'s own kernels (untiled). Cached per weight shape, dtype, device and kernel path:
    the kernel choice depends on those, not on the weight's values."""
    w = kernel.weight
    key = (tuple(w.shape), w.dtype, str(w.device), kernel.packed is not None, kernel.min_rows)
    if key not in _TILE_CACHE:
        # a kernel path that differs shows in few outputs (bf16 rounding hides most): every
        # row of 64 is compared, in calls of m rows each, for every m up to the tile
        rows = 2 * max(INVARIANT_TILE_CANDIDATES)
        x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)

        def tiled(m: int) -> torch.Tensor:
            return torch.cat([kernel._call_invariant(x[s:s + m]) for s in range(0, rows, m)])

        with torch.no_grad():
            alone = tiled(1)
            _TILE_CACHE[key] = next(t for t in INVARIANT_TILE_CANDIDATES
                                    if all(torch.equal(tiled(m), alone) for m in range(2, t + 1)))
        log.info("batch-invariant GEMMs: the %s %s weight in tiles of %d rows", "x".join(map(str, w.shape)),
                 str(w.dtype).removeprefix("torch."), _TILE_CACHE[key])
    return _TILE_CACHE[key]


_TILE_CACHE: dict[tuple, int] = {}


class Linear(nn.Module):
    """Bias-free, frozen projection `x Wᵀ` over a `PackedWeight`.

    The weight is uninitialised: it always comes from a checkpoint, and random init of
    135M parameters would cost seconds at every start.

    `name` is the module's path in the model (``layers.3.mlp.down_proj``), set by
    `LlamaModel`: LoRA adapters key their updates by it (`gpu.lora.LoraBatch`).
    `input_scale` is the SmoothQuant σ this projection's input has been divided by, and
    `output_scale` what each of its output rows has been divided by (it produces the next
    projection's smoothed input), both by `LlamaModel.smooth_`; None where nothing was.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self._kernel: PackedWeight | Int8Weight = PackedWeight(self.weight)
        self.name = ""
        self.input_scale: torch.Tensor | None = None
        self.output_scale: torch.Tensor | None = None

    def pack(self, *, batch_invariant: bool = False) -> None:
        if isinstance(self._kernel, Int8Weight):
            raise RuntimeError("an int8 projection has no float weight to pack: load the checkpoint again")
        self._kernel.pack(batch_invariant=batch_invariant)

    def quantize_int8_(self) -> None:
        """From now on run as an int8 GEMM (`gpu.quantization.Int8Weight`); the float
        weight is freed (one way: a float model is built from the checkpoint again)."""
        self._kernel = Int8Weight(self.weight)
        self.weight = nn.Parameter(self.weight.new_empty(0, self.weight.shape[1]), requires_grad=False)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        out = self._kernel.linear(x)
        return out if lora is None else lora.apply_(self.name, x, out)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the HF reference (`gpu.layer_ops`).

    `forward(x)` returns the normed x; `forward(x, residual)` first adds x to the
    residual stream (in place where the fused kernel runs) and returns
    (normed sum, new residual), as vLLM's fused_add_rms_norm does.
    """

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return layer_ops.rms_norm(x, self.weight, self.eps)
        return layer_ops.add_rms_norm(x, residual, self.weight, self.eps)


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
        self.head_dim = head_dim
        self.max_positions = max_positions

    def lookup(self, positions: torch.Tensor) -> RopeBatch:
        """The rotation of one step's tokens (T,): built once per step, shared by every layer."""
        return RopeBatch(self, positions)

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each x (T, n_heads, hd) rotated by its token's position (T,) (new tensors)."""
        batch = self.lookup(positions)
        out = []
        for x in xs:
            rows = x.reshape(x.shape[0], -1).clone()
            batch.rotate_(rows, x.shape[1])
            out.append(rows.view(x.shape))
        return tuple(out)


class RopeBatch:
    """RoPE for the T tokens of one step; `rotate_(x, heads)` rotates x (T, ≥ heads·hd)'s
    first `heads` heads in place — the fused CPU kernel, or the torch reference (whose
    per-token cos/sin rows are gathered once, on first use, for all layers)."""

    def __init__(self, rope: RotaryEmbedding, positions: torch.Tensor) -> None:
        self.rope = rope
        self.positions = positions
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    def rotate_(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        hd = self.rope.head_dim
        if layer_ops.rotary_fused(x, self.positions):
            return layer_ops.rotary_(x, self.rope.cos, self.rope.sin, self.positions, heads, hd)
        if self._gathered is None:
            self._gathered = (self.rope.cos[self.positions].unsqueeze(1), self.rope.sin[self.positions].unsqueeze(1))
        part = x[:, : heads * hd].view(x.shape[0], heads, hd)
        part.copy_(layer_ops.rotary_reference(part, *self._gathered))
        return x


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.scale = config.head_dim**-0.5
        h = config.hidden_size
        self.qkv_proj = Linear(h, config.q_size + 2 * config.kv_size, dtype, device)
        self.o_proj = Linear(config.q_size, h, dtype, device)

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        rope: RopeBatch,  # RotaryEmbedding.lookup(positions)
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        T = x.shape[0]
        qkv = self.qkv_proj(x, lora)  # (T, q_size + 2 kv_size), a fresh tensor: rotated in place
        # q and k heads are adjacent in the fused projection: rotate them in one pass
        rope.rotate_(qkv, cfg.num_heads + cfg.num_kv_heads)
        q = qkv[:, : cfg.q_size].view(T, cfg.num_heads, cfg.head_dim)  # row-strided views of qkv
        k = qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].view(T, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(T, cfg.num_kv_heads, cfg.head_dim)
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
        return self.o_proj(out.reshape(T, cfg.q_size), lora)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(h, 2 * i, dtype, device)
        self.down_proj = Linear(i, h, dtype, device)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        return self.down_proj(layer_ops.silu_mul(self.gate_up_proj(x, lora)), lora)  # (T, 2·inter) → (T, inter)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(config, backend, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeBatch, kv_cache, meta,
        lora: LoraBatch | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the caller adds the
        two (fused into the next norm), so each residual add is one pass with a norm."""
        if residual is None:  # first layer: the embeddings are the residual stream
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta, lora)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, lora), residual


class LlamaModel(nn.Module):
    """The decoder stack plus the LM head (tied to the embeddings when the config says so)."""

    def __init__(
        self, config: ModelConfig, attn_backend: AttentionBackend, dtype: torch.dtype, device: torch.device | str,
        *, batch_invariant: bool = False,
    ) -> None:
        """`batch_invariant`: every projection and the LM head compute a token's row with
        the bits it gets alone, whatever else the step holds (`PackedWeight`); costs
        throughput where the GEMM library would pick a faster kernel for more rows."""
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.batch_invariant = batch_invariant
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
        self._lm_head = PackedWeight(self.lm_head_weight)
        for name, m in self.named_modules():
            if isinstance(m, Linear):
                m.name = name
        if self.device.type == "cpu":
            # build (or load the cached build of) the fused kernels now: a lazy build would
            # stall the first request's step for the compile (tens of seconds on 2 cores)
            layer_ops.fused_available()

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, attn_backend: AttentionBackend, dtype: torch.dtype, device: torch.device | str,
        *, batch_invariant: bool = False,
    ) -> LlamaModel:
        """Build the model and copy the checkpoint in, fusing QKV and gate/up."""
        model = cls(ckpt.config, attn_backend, dtype, device, batch_invariant=batch_invariant)
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
        self.pack_weights()

    @property
    def quantization(self) -> str:
        """"int8" once `quantize_int8_` ran, else "none"."""
        return "int8" if isinstance(self._lm_head, Int8Weight) else "none"

    def smoothing_scales(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """By projection name, (what its input is divided by, what its output rows are
        divided by) since `smooth_`; empty before. A LoRA adapter's A columns are
        multiplied by the first and its B rows divided by the second
        (`gpu.lora.load_adapter`), so its update is the one it was trained to make."""
        return {m.name: (m.input_scale, m.output_scale) for m in self.modules()
                if isinstance(m, Linear) and (m.input_scale is not None or m.output_scale is not None)}

    @torch.no_grad()
    def smooth_(self, input_absmax: dict[str, torch.Tensor], alpha: float | None = None, *,
                repack: bool = True) -> None:
        """Fold SmoothQuant's per-channel factors into the float weights; the model
        computes the same function (up to rounding), with inputs to every projection and
        to the LM head whose channels have more even ranges (`gpu.quantization`).

        `input_absmax`: for each projection, by module name (``layers.3.mlp.down_proj``)
        and ``lm_head``, the largest |input| per channel seen by this model
        (`gpu.runner.ModelRunner.input_absmax`). Each factor σ (`smoothing_factors`)
        divides the weights that produce the projection's input and multiplies the
        projection's columns: the input RMSNorm weight for QKV, the post-attention one for
        gate/up, the final norm for the LM head (which then gets its own weight when tied:
        the embeddings keep theirs), the V rows for O (one σ per KV channel, the largest
        over the query heads sharing it), the up rows for down. `repack=False` leaves the
        float kernels stale (for a caller that replaces them next, as `quantize_int8_`)."""
        if self.quantization != "none":
            raise RuntimeError("the model is already quantized")
        cfg = self.config
        kw = {} if alpha is None else {"alpha": alpha}

        def sigma(name: str, weight: torch.Tensor) -> torch.Tensor:
            return smoothing_factors(input_absmax[name].to(weight.device), weight, **kw)

        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            s = sigma(p + "self_attn.qkv_proj", attn.qkv_proj.weight)
            _fold(layer.input_layernorm.weight, attn.qkv_proj.weight, s)
            _scale_input(attn.qkv_proj, s)
            s = sigma(p + "mlp.gate_up_proj", mlp.gate_up_proj.weight)
            _fold(layer.post_attention_layernorm.weight, mlp.gate_up_proj.weight, s)
            _scale_input(mlp.gate_up_proj, s)
            s = sigma(p + "mlp.down_proj", mlp.down_proj.weight)
            _fold(mlp.gate_up_proj.weight[cfg.intermediate_size:], mlp.down_proj.weight, s)
            _scale_input(mlp.down_proj, s)
            _scale_output(mlp.gate_up_proj, s, start=cfg.intermediate_size)
            # O reads num_heads·head_dim channels; head h's come from KV head h // group
            group = cfg.num_heads // cfg.num_kv_heads
            s = sigma(p + "self_attn.o_proj", attn.o_proj.weight).view(cfg.num_kv_heads, group, cfg.head_dim).amax(1)
            expanded = s[:, None, :].expand(-1, group, -1).reshape(-1)
            _fold(attn.qkv_proj.weight[cfg.q_size + cfg.kv_size:], attn.o_proj.weight, s.reshape(-1), expanded)
            _scale_input(attn.o_proj, expanded)
            _scale_output(attn.qkv_proj, s.reshape(-1), start=cfg.q_size + cfg.kv_size)
        s = sigma("lm_head", self.lm_head_weight)
        self.norm.weight.div_(s.to(self.norm.weight.dtype))
        self.lm_head_weight = nn.Parameter((self.lm_head_weight.float() * s).to(self.dtype), requires_grad=False)
        if repack:
            self.pack_weights()

    @torch.no_grad()
    def quantize_int8_(self, input_absmax: dict[str, torch.Tensor], alpha: float | None = None) -> None:
        """`smooth_`, then every projection and the LM head become int8 GEMMs
        (`gpu.quantization.Int8Weight`). One way: the float projection weights are freed
        (a float model is built from the checkpoint again)."""
        self.smooth_(input_absmax, alpha, repack=False)  # the float kernels are replaced below
        for m in self.modules():
            if isinstance(m, Linear):
                m.quantize_int8_()
        self._lm_head = Int8Weight(self.lm_head_weight)
        self.lm_head_weight = nn.Parameter(self.lm_head_weight.new_empty(0, self.config.hidden_size),
                                           requires_grad=False)
        if self.batch_invariant:  # each weight shape once (the layers share theirs)
            kernels = [m._kernel for m in self.modules() if isinstance(m, Linear)] + [self._lm_head]
            shapes = {(k.out_features, k.in_features): k for k in kernels}
            for kernel in shapes.values():
                if (why := int8_rows_variant_reason(kernel)) is not None:
                    raise QuantizationUnavailable(f"int8 quantization is not batch-invariant on this CPU: {why}")

    def pack_weights(self) -> None:
        """(Re)build the CPU pre-packed copies of every projection and the LM head
        (`PackedWeight`); call after changing weights outside `load_hf_state_dict`."""
        if self.quantization != "none":
            raise RuntimeError("an int8 model has no float weights to pack: load the checkpoint again")
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack(batch_invariant=self.batch_invariant)
        self._lm_head = PackedWeight(self.lm_head_weight)
        self._lm_head.pack(batch_invariant=self.batch_invariant)

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (T, hidden); keys/values of the T tokens land in the cache.
        `lora`: which rows run which LoRA adapter (`gpu.lora.LoraBatch`), None for none."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(self.layers)} layers")
        x = self.embed_tokens(input_ids)  # (T, hidden), a fresh tensor (the residual stream)
        rope = self.rope.lookup(positions)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, kv_cache, meta, lora)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) final hidden states → (N, vocab) float32 logits."""
        return self._lm_head.linear(hidden).float()


def _scale_input(linear: Linear, sigma: torch.Tensor) -> None:
    """Record that `linear`'s input is now divided by σ (compounds a previous smoothing)."""
    sigma = sigma.detach().float().cpu()
    linear.input_scale = sigma if linear.input_scale is None else linear.input_scale * sigma


def _scale_output(linear: Linear, sigma: torch.Tensor, *, start: int) -> None:
    """Record that `linear`'s output rows from `start` on are now divided by σ."""
    scale = torch.ones(linear.weight.shape[0]) if linear.output_scale is None else linear.output_scale
    scale[start:start + sigma.numel()] *= sigma.detach().float().cpu()
    linear.output_scale = scale


def _fold(producer: torch.Tensor, consumer: torch.Tensor, sigma: torch.Tensor,
          consumer_sigma: torch.Tensor | None = None) -> None:
    """producer's rows (or elements, for a norm weight) ÷ σ and consumer's columns × σ
    (`consumer_sigma` when the consumer reads a producer channel more than once), in place,
    computed in float32 and rounded once: the composition is unchanged in real arithmetic."""
    div = sigma if producer.dim() == 1 else sigma[:, None]
    producer.copy_(producer.float() / div)
    consumer.copy_(consumer.float() * (sigma if consumer_sigma is None else consumer_sigma))


def allocate_kv_caches(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str,
    *, huge_pages: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed paged KV cache, one (k_cache, v_cache) pair per layer.

    One allocation of (layers, 2, num_blocks, block_size, kv_heads, head_dim);
    each cache is a contiguous view (num_blocks, block_size, kv_heads, head_dim).
    `huge_pages`: on a CPU, back it with 2 MiB pages where Linux allows (`advise_huge_pages`).
    """
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
    storage = torch.empty(
        config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype=dtype, device=device
    )
    if huge_pages:
        advise_huge_pages(storage)  # before the first touch: zeroing faults the pages in
    storage.zero_()
    return [(storage[i, 0], storage[i, 1]) for i in range(config.num_layers)]


HUGE_PAGE_BYTES = 2 * 1024**2
_MADV_HUGEPAGE = 14  # <linux/mman.h>


def advise_huge_pages(t: torch.Tensor) -> int:
    """Ask Linux to back a CPU tensor's memory with 2 MiB transparent huge pages
    (`madvise(MADV_HUGEPAGE)` over the 2 MiB-aligned part of it); returns the bytes
    advised, 0 where it does not apply (not CPU, not Linux, smaller than a huge page, or
    the kernel refused). Call before the memory is first touched.

    Why: a long-running engine's block tables scatter over the whole KV cache (freed
    blocks come back in any order), and a decode step's attention then touches every
    live block across the 1.5 GiB — on 4 KiB pages, far beyond what the TLB covers.
    Measured on a 2-core Zen 4 in bf16 (`python -m ops.bench_kv_pages`: 200 fixture
    requests at once, 128 sequences on 1.5 GiB): on a reused block pool 924-929 tok/s
    with 4 KiB pages, 983-993 with huge pages (1.065-1.069x); on a fresh pool 1.003x
    (docs/benchmarking.md, "Huge pages and block order").
    Debian's default THP mode is "madvise", so without this call there are none.
    """
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return 0
    ptr, n = t.data_ptr(), t.numel() * t.element_size()
    start = -(-ptr // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (ptr + n) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if end <= start:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(start, end - start, _MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
        return 0
    return end - start


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim(0)`); True if any were.

    Loading a model frees large temporaries — the dequantized checkpoint, the fused
    projections' sources and, with `--quantization int8`, the float weights — that glibc
    keeps mapped in its arenas: measured right after an engine start (bundled model, 2
    threads), 185-270 MB of a float engine's resident memory and ~700 MB of an int8 one's
    were free heap (float32 1.64 → 1.46 GB, int8 1.34 → 0.66 GB). Off glibc: no-op."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:  # not glibc (musl has no malloc_trim)
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return bool(trim(0))


def _smaps() -> list[tuple[int, int, dict[str, str]]]:
    """(start, end, fields) of every mapping in /proc/self/smaps ([] off Linux)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return []
    out: list[tuple[int, int, dict[str, str]]] = []
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):  # a mapping's header: start-end perms ...
            lo, hi = (int(x, 16) for x in head.split("-"))
            out.append((lo, hi, {}))
        elif out:
            key, _, value = line.partition(":")
            out[-1][2][key] = value.strip()
    return out


def mapping_fields(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the memory mapping holding `addr` ({} off Linux or
    where no mapping holds it), e.g. "AnonHugePages" ("1572864 kB"), "THPeligible" ("1")."""
    return next((f for lo, hi, f in _smaps() if lo <= addr < hi), {})


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of the mappings under `t`'s memory that sit on transparent huge pages (0 off
    Linux). madvise splits a mapping at the advised range, so this sums every piece."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return sum(int(f.get("AnonHugePages", "0 kB").split()[0]) * 1024
               for a, b, f in _smaps() if a < hi and lo < b)
