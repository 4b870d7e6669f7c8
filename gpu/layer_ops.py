"""Per-layer elementwise ops of the decoder, fused on the CPU.

A decode step of a small model runs ~300 elementwise torch kernels (RMSNorm, the
residual adds, RoPE, SiLU·up); on two cores they were ~1/6 of an fp32 step and more
of a bf16 one — each reads and writes the whole activation and pays a dispatch. The
C++ kernels in `gpu/kernels/cpu/layer_ops.cpp` do each group in one pass over a row.

Every op has a torch reference here (used on other devices, for other dtypes, and
when the extension cannot be built); the fused kernels follow the reference's order
of roundings, so results agree up to float32 summation order in the norms' reductions:

    add_rms_norm(x, residual, w, eps) -> (rms_norm(residual + x) * w, residual + x)
    rms_norm(x, w, eps)               -> rms_norm(x) * w
    silu_mul(gate_up)                 -> silu(gate_up[:, :I]) * gate_up[:, I:]
    rotary_(x, cos, sin, positions, heads, head_dim)   in place, "rotate half" RoPE
    argmax(x)                         -> torch.argmax(x, dim=-1)  (greedy sampling's)
    quantize_rows_int8(x)             -> (round(x / s), s), s = max|x_row| / 127 per row (int8 GEMM inputs)
    scale_rows(y, s, dtype)           -> (y * s).to(dtype), s per row                  (int8 GEMM outputs)
    lora_rows_(out, x, segment, a, bt, span)   in place: out[t] += x[t] a[s]ᵀ bt[s], s = segment[t] ≥ 0 (LoRA)

RMSNorm is computed in float32 like the HF reference: for bfloat16 the normalised row
is rounded to bfloat16 before the weight multiplies it (HF's order).
`add_rms_norm` updates `residual` in place when the fused kernel runs (callers must
own it and use the returned tensor either way).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from gpu.kernels.build import load_cpu_extension

log = logging.getLogger(__name__)

_FUSED_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _module():
    # no FMA contraction: a * c - b * s must round like torch's separate multiplies
    return load_cpu_extension("layer_ops.cpp", ("-ffp-contract=off",))


@functools.cache
def _lora_module():
    # its own build: FMA contraction and 512-bit vectors, which layer_ops.cpp must not have
    return load_cpu_extension("lora_ops.cpp", ("-ffp-contract=fast", "-mprefer-vector-width=512"))


@functools.cache
def lora_kernel_available() -> bool:
    """True when `gpu/kernels/cpu/lora_ops.cpp` builds and loads here (tried once)."""
    if not fused_available():
        return False
    try:
        _lora_module()
    except Exception as e:  # noqa: BLE001 — as fused_available
        log.warning("LoRA row kernel unavailable (%s: %s); using torch ops", type(e).__name__, e)
        return False
    return True


@functools.cache
def fused_available() -> bool:
    """True when the C++ kernels build and load here (tried once per process)."""
    try:
        _module()
    except Exception as e:  # noqa: BLE001 — no compiler / headers: fall back, but say why
        log.warning("fused CPU layer ops unavailable (%s: %s); using torch ops", type(e).__name__, e)
        return False
    return True


def _fused(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _FUSED_DTYPES and t.dim() == 2 and fused_available()


# --------------------------------------------------------------- torch references
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused op
        return F.rms_norm(x, weight.shape, weight, eps)
    # normalise in float32 (one fused op), scale in the model dtype: HF's order of roundings
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, hd) rotated by per-token cos/sin (T, 1, hd/2), computed in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# ----------------------------------------------------------------------- the ops
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x) * weight over the last dim of a (rows, hidden) x."""
    if _fused(x) and weight.dtype == x.dtype:
        return _module().rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x) * weight, residual + x) — vLLM's fused_add_rms_norm.

    The sum is rounded to the dtype before it is normalised (it is the residual stream
    the next layer adds to). On the fused path `residual` is updated in place."""
    if _fused(residual) and x.dtype == residual.dtype == weight.dtype and residual.is_contiguous():
        out = _module().add_rms_norm_(x, residual, weight, eps)
        return out, residual
    residual = residual + x
    return rms_norm_reference(residual, weight, eps), residual


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a (rows, 2 * inter) fused gate/up projection."""
    if _fused(gate_up):
        return _module().silu_mul(gate_up)
    return silu_mul_reference(gate_up)


def rotary_fused(x: torch.Tensor, positions: torch.Tensor) -> bool:
    """Whether `rotary_(x, ...)` runs the fused kernel (else the caller may prefer to
    reuse gathered cos/sin rows across layers with `rotary_reference`)."""
    return _fused(x) and x.stride(1) == 1 and positions.dtype == torch.int64 and positions.device.type == "cpu"


def rotary_(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, heads: int, head_dim: int
) -> torch.Tensor:
    """Rotate, in place, the first `heads` head_dim-wide heads of every row of x (rows, ≥ heads·hd).

    `cos`/`sin` are (max_positions, hd/2) float32 tables, `positions` (rows,) int64.
    Rows may be strided (a slice of a fused QKV output); returns x."""
    if rotary_fused(x, positions):
        _module().rotary_(x, cos, sin, positions, heads, head_dim)
        return x
    rows = x.shape[0]
    part = x[:, : heads * head_dim].view(rows, heads, head_dim)
    part.copy_(rotary_reference(part, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)))
    return x


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) of a (rows, n) x, int64: the first of equal maxima, a NaN
    counting as the maximum. Greedy sampling's reduction over the vocabulary: the fused
    kernel reads each row once, vectorized (torch's took ~4 ms for 64 rows of a 49k
    vocabulary on 2 cores, a few % of a decode step)."""
    if _fused(x) and x.stride(1) == 1 and x.shape[1] > 0:
        return _module().argmax(x)
    return x.argmax(dim=-1)


def quantize_rows_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12) / 127
    return torch.round(xf / scale).to(torch.int8), scale


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) x → (int8 values, float32 scales (rows, 1)): each row symmetric by its own
    largest magnitude, s = max|x_row| / 127 (at least 1e-12), values = round(x / s) half to
    even — `gpu.quantization`'s per-token activation quantization, in one pass."""
    if _fused(x) and x.stride(1) == 1 and x.shape[0] > 0:
        return tuple(_module().quantize_rows_int8(x))
    return quantize_rows_int8_reference(x)


def scale_rows(y: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(y * scale).to(dtype) for a float32 (rows, n) y and (rows, 1) float32 scales: an int8
    GEMM's output rescaled by its rows' activation scales, in one pass."""
    if (dtype in _FUSED_DTYPES and y.device.type == "cpu" and y.dtype == torch.float32 and y.dim() == 2
            and y.is_contiguous() and scale.dtype == torch.float32 and scale.is_contiguous()
            and scale.numel() == y.shape[0] and fused_available()):
        return _module().scale_rows(y, scale, dtype)
    return (y * scale).to(dtype)


def lora_rows_reference(out: torch.Tensor, x: torch.Tensor, segment: torch.Tensor,
                        a: list[torch.Tensor], bt: list[torch.Tensor], span: list[torch.Tensor]) -> torch.Tensor:
    for s, (a_s, bt_s) in enumerate(zip(a, bt, strict=True)):
        rows = (segment == s).nonzero().squeeze(1)
        if rows.numel() and a_s.shape[0]:
            delta = (x.index_select(0, rows).float() @ a_s.t()) @ bt_s
            out.index_copy_(0, rows, (out.index_select(0, rows).float() + delta).to(out.dtype))
    return out


def lora_rows_(out: torch.Tensor, x: torch.Tensor, segment: torch.Tensor,
               a: list[torch.Tensor], bt: list[torch.Tensor], span: list[torch.Tensor]) -> torch.Tensor:
    """In place, for every row t with s = segment[t] ≥ 0 (int32, -1: no adapter):
    out[t] += (x[t] a[s]ᵀ) bt[s], with a[s] (R, in) and bt[s] (R, out) float32 (R may be 0),
    computed in float32 and rounded to out's dtype once. `span[s]` (R, 2) int64: row r of
    bt[s] is zero outside columns [span[r, 0], span[r, 1]) (the kernel reads only those). The LoRA update of small row
    groups (`gpu.lora.LoraBatch`): per row, where two GEMMs per adapter would each pay a
    GEMM call's fixed cost. Returns out."""
    if (_fused(out) and _fused(x) and x.dtype == out.dtype and x.stride(1) == 1 and out.stride(1) == 1
            and lora_kernel_available()):
        _lora_module().lora_rows_(out, x, segment, a, bt, span)
        return out
    return lora_rows_reference(out, x, segment, a, bt, span)
