"""The fused CPU layer ops (gpu/layer_ops.py) against their torch references.

Each public op is checked on float32 and bfloat16 (the dtypes the C++ kernels take)
against `*_reference` run on independent copies of the inputs, and on float16/float64
(which must fall back to the reference). The kernels follow the reference's order of
roundings, so only the norms' float32 reductions and SiLU's exp may differ, by about
an ulp; residual sums and RoPE must match exactly. Checks of the kernels' own errors
and in-place updates skip when the extension did not build (`fused_available()`).
"""

from __future__ import annotations

import pytest
import torch

from gpu import layer_ops
from gpu.model import RotaryEmbedding

EPS = 1e-5
HIDDEN = 576
HEAD_DIM = 64
MAX_POS = 4096
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["f32", "bf16"]
# (rtol, atol) where only the norm's reduction order or SiLU's exp may differ: float32 a
# few float32 ulps; bfloat16 one bfloat16 ulp (2**-7 relative at the bottom of a binade)
# bf16: 2 ulps. The fused reduction sums in another order than torch's (8-wide on AVX2,
# 16-wide on AVX-512), which may flip the bf16 rounding of the normalised value; the weight
# multiply rounds again, so one flip can reach 2 ulps of the output (seen on a Zen 1 CPU:
# 3 of 172,800 elements, relative 0.0095 > 2**-7)
NORM_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-6, 1e-6)}
# atol 1e-30: silu(x) for x <= -88 is ~4e-37 in the kernel (exp clamped), -0 in torch
SILU_TOL = {torch.float32: (1e-6, 1e-30), torch.bfloat16: (2**-7, 1e-30)}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _needs_fused() -> None:
    if not layer_ops.fused_available():
        pytest.skip("fused CPU kernels did not build here (torch fallback only)")


def rope_tables(head_dim: int = HEAD_DIM, max_positions: int = MAX_POS, theta: float = 10000.0):
    """(P, hd/2) float32 cos/sin tables, built as gpu.model.RotaryEmbedding builds them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def _rows(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random rows whose magnitudes span 1e-2..1e2 (the norm must be per row)."""
    scale = 10 ** (torch.rand(rows, 1, generator=gen) * 4 - 2)
    return (torch.randn(rows, cols, generator=gen) * scale).to(dtype)


def _weight(dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (1 + 0.2 * torch.randn(HIDDEN, generator=gen)).to(dtype)


# ------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 3, 17, 300])
def test_add_rms_norm_matches_reference(dtype, rows):
    """(rms_norm(residual + x) * w, residual + x): the sum exact, the norm within tolerance;
    an all-zero sum row normalises to zeros (eps), and the fused path updates residual in place."""
    gen = _gen(rows)
    x = _rows(rows, HIDDEN, dtype, gen)
    residual = _rows(rows, HIDDEN, dtype, gen)
    if rows > 1:
        x[1] = -residual[1]  # residual + x == 0 exactly in this row
    w = _weight(dtype, gen)
    x0 = x.clone()
    expected_sum = residual.clone() + x0
    expected = layer_ops.rms_norm_reference(expected_sum, w, EPS)

    out, new_residual = layer_ops.add_rms_norm(x, residual, w, EPS)

    assert torch.equal(new_residual, expected_sum)
    rtol, atol = NORM_TOL[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    assert torch.equal(x, x0)
    if rows > 1:
        assert not out[1].any()
    if layer_ops.fused_available():
        assert new_residual is residual
        assert torch.equal(residual, expected_sum)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "row-strided"])
def test_rms_norm_matches_reference(dtype, strided):
    """rms_norm(x) * w, also of a row-strided slice big[:, :576] (read, not modified)."""
    gen = _gen(1)
    rows = 33
    big = _rows(rows, 1000 if strided else HIDDEN, dtype, gen)
    x = big[:, :HIDDEN]
    assert x.is_contiguous() is not strided
    w = _weight(dtype, gen)
    big0 = big.clone()
    expected = layer_ops.rms_norm_reference(big0[:, :HIDDEN].contiguous(), w, EPS)

    out = layer_ops.rms_norm(x, w, EPS)

    rtol, atol = NORM_TOL[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    assert torch.equal(big, big0)


# ------------------------------------------------------------------ SiLU · up


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("magnitude", [4.0, 100.0])
def test_silu_mul_matches_reference(dtype, magnitude):
    """silu(gate) * up, for gates where exp is ordinary and where it over/underflows (|x| <= 100)."""
    gen = _gen(2)
    gate = (torch.rand(40, 1536, generator=gen) * 2 - 1) * magnitude
    up = torch.randn(40, 1536, generator=gen)
    gate_up = torch.cat([gate, up], dim=1).to(dtype)
    expected = layer_ops.silu_mul_reference(gate_up.clone())

    out = layer_ops.silu_mul(gate_up)

    assert out.shape == (40, 1536)
    assert torch.isfinite(out).all()
    rtol, atol = SILU_TOL[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_silu_mul_saturates(dtype):
    """silu(100) * 1 is exactly 100 and silu(-100) * 1 is (minus) zero, not NaN or inf."""
    out = layer_ops.silu_mul(torch.tensor([[100.0, -100.0, 1.0, 1.0]], dtype=dtype))
    assert out[0, 0].item() == 100.0
    assert -1e-30 < out[0, 1].item() <= 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_silu_mul_propagates_nan(dtype):
    """A NaN in gate or in up makes that output element NaN and no other."""
    gen = _gen(3)
    gate_up = torch.randn(5, 2 * 8, generator=gen).to(dtype)
    gate_up[1, 3] = float("nan")  # gate
    gate_up[4, 8 + 6] = float("nan")  # up
    expected = layer_ops.silu_mul_reference(gate_up.clone())

    out = layer_ops.silu_mul(gate_up)

    nan = torch.zeros(5, 8, dtype=torch.bool)
    nan[1, 3] = nan[4, 6] = True
    assert torch.equal(out.isnan(), nan)
    rtol, atol = SILU_TOL[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol, equal_nan=True)


def test_silu_mul_rejects_odd_width():
    """The fused kernel refuses a gate/up row that cannot be split in two."""
    _needs_fused()
    with pytest.raises((RuntimeError, ValueError)):
        layer_ops.silu_mul(torch.randn(3, 5))


# ------------------------------------------------------------------------ RoPE


def _qkv(rows: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, 1152, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 37])
def test_rotary_in_place_on_strided_rows(dtype, rows):
    """rotary_ on x = qkv[:, :960] (stride 1152) rotates heads 0..11 exactly as the reference
    does at arbitrary positions and leaves the remaining columns untouched."""
    gen = _gen(4 + rows)
    cos, sin = rope_tables()
    qkv = _qkv(rows, dtype, gen)
    x = qkv[:, :960]
    positions = torch.randint(0, MAX_POS, (rows,), generator=gen)
    if rows > 2:
        positions[:3] = torch.tensor([MAX_POS - 1, 0, MAX_POS - 1])
    qkv0 = qkv.clone()
    heads = 12
    expected = layer_ops.rotary_reference(
        qkv0[:, : heads * HEAD_DIM].reshape(rows, heads, HEAD_DIM),
        cos[positions].unsqueeze(1),
        sin[positions].unsqueeze(1),
    )
    assert layer_ops.rotary_fused(x, positions) == layer_ops.fused_available()

    ret = layer_ops.rotary_(x, cos, sin, positions, heads, HEAD_DIM)

    assert ret is x
    # same float32 roundings as the reference (no FMA contraction): exact
    torch.testing.assert_close(
        qkv[:, : heads * HEAD_DIM].reshape(rows, heads, HEAD_DIM), expected, rtol=0, atol=0
    )
    assert torch.equal(qkv[:, heads * HEAD_DIM :], qkv0[:, heads * HEAD_DIM :])
    assert not torch.equal(qkv, qkv0)


@pytest.mark.parametrize("bad", [MAX_POS, -1])
def test_rotary_rejects_positions_outside_table(bad):
    """A position outside [0, len(cos)) raises on the fused path, before anything is rotated."""
    _needs_fused()
    cos, sin = rope_tables()
    qkv = _qkv(4, torch.float32, _gen(5))
    qkv0 = qkv.clone()
    positions = torch.tensor([0, 5, bad, 7])
    with pytest.raises((RuntimeError, ValueError)):
        layer_ops.rotary_(qkv[:, :960], cos, sin, positions, 12, HEAD_DIM)
    assert torch.equal(qkv, qkv0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_embedding_forward_matches_reference(dtype):
    """RotaryEmbedding.forward(positions, q, k) returns q and k rotated (new tensors, inputs
    unchanged), equal to rotary_reference with independently built tables."""
    gen = _gen(6)
    rows = 21
    cos, sin = rope_tables()
    rope = RotaryEmbedding(HEAD_DIM, MAX_POS, 10000.0, "cpu")
    q = torch.randn(rows, 9, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(rows, 3, HEAD_DIM, generator=gen).to(dtype)
    positions = torch.randint(0, MAX_POS, (rows,), generator=gen)
    q0, k0 = q.clone(), k.clone()
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    q_rot, k_rot = rope(positions, q, k)

    torch.testing.assert_close(q_rot, layer_ops.rotary_reference(q0, c, s), rtol=0, atol=0)
    torch.testing.assert_close(k_rot, layer_ops.rotary_reference(k0, c, s), rtol=0, atol=0)
    assert torch.equal(q, q0) and torch.equal(k, k0)


# -------------------------------------------------------------------- argmax


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_argmax_matches_torch(dtype):
    """torch.argmax's answer on every kind of row: random logits (a 49k vocabulary, and
    widths off the vector size), ties (the first wins), the maximum at either end, all
    -inf, +inf, NaN (the first NaN wins even over +inf), and strided rows."""
    _needs_fused()
    gen = _gen(11)
    vocab = 49152
    x = (torch.randn(20, vocab, generator=gen) * 5).to(dtype)
    x[1, 7] = x[1, 40000] = 100.0  # a tie: the first
    x[2, 0] = 100.0
    x[3, -1] = 100.0
    x[4] = float("-inf")
    x[5, 123] = float("inf")
    x[6, 300] = float("nan")
    x[6, 10] = float("inf")
    x[7, 9] = x[7, 5000] = float("nan")
    x[8] = 0.0
    x[8, 17] = -0.0  # -0 == 0: still the first index
    x[9] = x[9].to(torch.float32).round().to(dtype)  # many ties at the maximum
    expected = x.argmax(dim=-1)
    assert layer_ops.argmax(x).tolist() == expected.tolist()
    for cols in (1, 15, 17, 33, 1000):
        y = x[:, :cols]  # strided rows (stride vocab, width cols)
        assert layer_ops.argmax(y).tolist() == y.argmax(dim=-1).tolist(), cols
    assert layer_ops.argmax(x[:0]).shape == (0,)


def test_argmax_kernel_rejects_what_it_cannot_take():
    """An empty row has no argmax (torch raises too); integer and column-strided inputs
    take torch's own argmax."""
    _needs_fused()
    with pytest.raises(RuntimeError, match="at least one column"):
        layer_ops._module().argmax(torch.empty(3, 0))
    assert layer_ops.argmax(torch.tensor([[1, 5, 5, 2]])).tolist() == [1]  # int64: torch's own
    t = torch.randn(4, 6, generator=_gen(12)).t()  # column-strided: torch's own
    assert layer_ops.argmax(t).tolist() == t.argmax(dim=-1).tolist()


# ------------------------------------------------------------------- LoRA rows


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lora_rows_matches_reference(dtype):
    """Rows of three adapters (one with rank 0: not on this projection; one whose rank rows
    each write a part of the output, as a fused QKV's do) and base rows (-1), on row-strided
    x and out, more rows than a tile: the kernel adds what the float32 reference adds,
    rounding the sum to the dtype once; base rows are untouched."""
    if not layer_ops.lora_kernel_available():
        pytest.skip("the LoRA row kernel did not build here (torch fallback only)")
    gen = _gen(13)
    n_in, n_out, rows = 200, 300, 23
    a = [torch.randn(r, n_in, generator=gen) * 0.1 for r in (4, 0, 9)]
    bt = [torch.randn(r, n_out, generator=gen) * 0.1 for r in (4, 0, 9)]
    span = [torch.tensor([[0, n_out]] * 4), torch.empty(0, 2, dtype=torch.int64),
            torch.tensor([[0, 100]] * 3 + [[100, 260]] * 3 + [[260, 300]] * 3)]
    for b, sp in zip(bt, span, strict=True):
        for r, (lo, hi) in enumerate(sp.tolist()):
            b[r, :lo] = 0
            b[r, hi:] = 0
    segment = torch.randint(-1, 3, (rows,), generator=gen, dtype=torch.int32)
    x = torch.randn(rows, 2 * n_in, generator=gen).to(dtype)[:, :n_in]
    out = torch.randn(rows, n_out + 5, generator=gen).to(dtype)[:, :n_out]
    want = layer_ops.lora_rows_reference(out.clone(), x, segment, a, bt, span)
    before = out.clone()
    layer_ops.lora_rows_(out, x, segment, a, bt, span)
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (2**-7, 1e-6)
    torch.testing.assert_close(out, want, rtol=tol[0], atol=tol[1])
    untouched = (segment == -1) | (segment == 1)
    assert untouched.any() and torch.equal(out[untouched], before[untouched])


def test_lora_rows_kernel_rejects_what_it_cannot_take():
    _needs_fused()
    if not layer_ops.lora_kernel_available():
        pytest.skip("the LoRA row kernel did not build here")
    x, out = torch.randn(3, 8), torch.zeros(3, 4)
    a, bt, span = [torch.randn(2, 8)], [torch.randn(2, 4)], [torch.tensor([[0, 4], [0, 4]])]
    seg = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="not -1 or a segment index"):
        layer_ops._lora_module().lora_rows_(out, x, torch.tensor([0, 1, -1], dtype=torch.int32), a, bt, span)
    with pytest.raises(RuntimeError, match="do not fit"):
        layer_ops._lora_module().lora_rows_(out, x, seg, [torch.randn(2, 7)], bt, span)
    with pytest.raises(RuntimeError, match="int32"):
        layer_ops._lora_module().lora_rows_(out, x, seg.long(), a, bt, span)
    with pytest.raises(RuntimeError, match="not a column range"):
        layer_ops._lora_module().lora_rows_(out, x, seg, a, bt, [torch.tensor([[0, 4], [2, 5]])])


# -------------------------------------------------------------------- fallback


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["f16", "f64"])
def test_other_dtypes_fall_back_to_reference(dtype):
    """float16/float64 (not taken by the kernels) still give every op's reference result."""
    gen = _gen(7)
    rows = 9
    x = _rows(rows, HIDDEN, torch.float32, gen).to(dtype)
    residual = _rows(rows, HIDDEN, torch.float32, gen).to(dtype)
    w = _weight(dtype, gen)
    gate_up = (torch.randn(rows, 2 * 256, generator=gen) * 4).to(dtype)
    cos, sin = rope_tables()
    qkv = _qkv(rows, dtype, gen)
    positions = torch.randint(0, MAX_POS, (rows,), generator=gen)
    x0, residual0, qkv0 = x.clone(), residual.clone(), qkv.clone()

    torch.testing.assert_close(
        layer_ops.rms_norm(x, w, EPS), layer_ops.rms_norm_reference(x0, w, EPS)
    )
    out, new_residual = layer_ops.add_rms_norm(x, residual, w, EPS)
    torch.testing.assert_close(new_residual, residual0 + x0)
    torch.testing.assert_close(out, layer_ops.rms_norm_reference(residual0 + x0, w, EPS))
    torch.testing.assert_close(
        layer_ops.silu_mul(gate_up), layer_ops.silu_mul_reference(gate_up.clone())
    )
    layer_ops.rotary_(qkv[:, :960], cos, sin, positions, 12, HEAD_DIM)
    expected = layer_ops.rotary_reference(
        qkv0[:, :768].reshape(rows, 12, HEAD_DIM),
        cos[positions].unsqueeze(1),
        sin[positions].unsqueeze(1),
    )
    torch.testing.assert_close(qkv[:, :768].reshape(rows, 12, HEAD_DIM), expected)
    assert torch.equal(qkv[:, 768:], qkv0[:, 768:])
