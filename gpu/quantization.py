"""Post-training int8 quantization of the projections and the LM head (W8A8, CPU).

`--quantization int8` (`EngineConfig.quantization`) runs every projection and the LM
head as an int8 × int8 GEMM accumulated in int32:

- weights, once at load, per output channel and symmetric (zero point 0):
  ``W_int8 = round(W / s_o)`` with ``s_o = max|W_o| / 127`` (`quantize_per_channel`);
- activations, at every call, per token and symmetric, from the token's own range:
  ``X_int8 = round(X / S_t)`` with ``S_t = max|X_t| / 127`` — seed 002's
  ``round(X/S) + Z`` with Z = 0 ("dynamic": the scale is not calibrated but measured
  on the data it quantizes). A token's scale never depends on the other tokens of its
  step, so a request's numbers do not depend on who shares its batch through the
  quantization itself (the GEMM kernel may still block rows differently);
- the int32 product is rescaled to float by ``S_t · s_o``.

Activations of a Llama have a few channels far larger than the rest (they come from the
RMSNorm weights and persist across tokens); quantized as they are, those channels set
S_t and crush every other channel to a few levels. SmoothQuant's remedy (Xiao et al.,
2023) is applied at load: per input channel j of each projection,
``σ_j = max|X_j|^α / max|W_j|^(1-α)`` (α = `SMOOTH_ALPHA`), the activation is divided by
σ and the weight's column multiplied by it — an exact identity in real arithmetic,
folded into the weights that produce the activation (the RMSNorm weight before QKV,
gate/up and the LM head; the V rows before O; the up rows before down), so it costs
nothing per step. ``max|X_j|`` is measured once per start, by a prefill of
`CALIBRATION_CHATS` through the float model (`gpu.runner.ModelRunner`).

The GEMM is oneDNN's (`torch.ops.onednn.qlinear_pointwise`, the kernel torch's own x86
int8 inference path lowers to), on a weight pre-packed once. Embeddings, norms,
attention and the KV cache stay in the model's dtype; the LM head gets its own int8
copy when it is tied to the embeddings (the embeddings stay float).

What it costs and buys, measured by `python -m ops.bench_dtype --quantization int8`
(docs/benchmarking.md, "int8"): next-token distributions move ~15x further from
float32's than bf16's do, and generation is faster than float32 where bf16 is not native.
CPU only. Batch-invariant by construction where it runs: a token's scale is its own, the
int32 sums of int8 products are exact in any blocking (the probe refuses CPUs whose kernel
saturates), and the rescale is per element; `--batch-invariant` checks it at start
(`int8_rows_variant_reason`) and gives the attention its invariant kernel. Without it,
an int8 model's answers move at near-ties under preemption and prefix hits more often than
float32's (a recomputed prompt goes through the prefill attention kernel, not the decode
one, and per-token int8 rounding can turn the last-bit difference into a step).

Why not other int8 schemes: measured on an AMX Xeon (2 threads), torch's dynamic
quantized Linear (per-tensor activation scales) moved the model ~4x further than
per-token scales (KL 0.158 against 0.036 nats, before smoothing); weight-only int8
(`torch._weight_int8pack_mm`) and `torch._int_mm` were slower than the bf16 GEMM from
8 rows on.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import torch

from gpu import layer_ops

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8")
INT8_MAX = 127  # symmetric: [-127, 127], so -W quantizes to -W_int8 exactly
QUANTIZE_ROWS = 4096  # weight rows quantized at a time (`quantize_per_channel`)

# SmoothQuant's migration strength. Teacher-forced KL(float32 ‖ int8) on 16 held-out
# fixture prompts (890 positions, AMX Xeon): 0.036 nats unsmoothed; α 0.3: 0.024,
# 0.4: 0.019, 0.5: 0.015, 0.6: 0.021, 0.8: 0.041. Weight-only int8 alone gives 0.004.
SMOOTH_ALPHA = 0.5

# What the float model prefills once per start to measure each projection's largest
# input per channel (`SmoothQuant`). Short chats of the kinds a gateway serves — the
# channels that matter are the model's systematic outliers, which any text shows.
CALIBRATION_CHATS: tuple[tuple[dict, ...], ...] = (
    ({"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Translate to French: The weather is lovely today, so we are going to walk "
                                 "along the river and have lunch in the old town."}),
    ({"role": "user", "content": "Fix the grammar: me and him goes to the store yesterday and buyed three apple."},),
    ({"role": "system", "content": "Summarize the text in two sentences."},
     {"role": "user", "content": "The city council met on Tuesday to discuss the new bicycle lanes. Residents "
                                 "spoke for and against the plan, citing safety, parking and the cost of "
                                 "construction. The council will vote next month after a traffic study."}),
    ({"role": "user", "content": "Rewrite this Python function in JavaScript:\n\ndef total(xs):\n    s = 0\n"
                                 "    for x in xs:\n        if x > 0:\n            s += x * 2\n    return s\n"},),
    ({"role": "user", "content": "What is the capital of Australia, and why is it not Sydney?"},),
    ({"role": "system", "content": "You write short stories for children."},
     {"role": "user", "content": "Write a story about a small robot who learns to paint the sea."},
     {"role": "assistant", "content": "Once upon a time, in a workshop by the harbour, there lived a little "
                                      "robot named Pip. Every morning Pip watched the waves"},
     {"role": "user", "content": "Go on, and give it a happy ending. Numbers: 3.14, 2048, 1e-5; symbols: {}[]<>#@%."}),
)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight → (int8 values, float32 scale per output row), symmetric:
    ``weight ≈ values · scale[:, None]`` with |error| ≤ scale/2 per element. An all-zero
    row gets scale 1 (its values are 0 whatever the scale)."""
    out, cols = weight.shape
    values = torch.empty(out, cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out, dtype=torch.float32, device=weight.device)
    # in row chunks: float temporaries of the whole LM head (113 MB each in float32) would
    # raise the start's peak memory above the float engine's
    for start in range(0, out, QUANTIZE_ROWS):
        w = weight.detach()[start:start + QUANTIZE_ROWS].float()
        s = w.abs().amax(dim=1) / INT8_MAX
        s = torch.where(s > 0, s, torch.ones_like(s))
        values[start:start + QUANTIZE_ROWS] = torch.round(w / s[:, None]).clamp_(-INT8_MAX, INT8_MAX)
        scale[start:start + QUANTIZE_ROWS] = s
    return values, scale


def dequantize_per_channel(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_per_channel` (float32)."""
    return values.float() * scale[:, None]


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel σ for a projection `weight` (out, in) whose input's
    largest magnitudes per channel are `act_absmax` (in,): σ_j = a_j^α / w_j^(1-α), with
    w_j = max over rows of |W[:, j]|. Dividing the input by σ and multiplying W's columns
    by it leaves the product unchanged while evening out the channels' ranges. Channels
    never seen active (a_j = 0) or all-zero weight columns get σ = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.float()
    w = weight.detach().abs().amax(dim=0).float()
    sigma = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(sigma) & (sigma > 0)
    return torch.where(ok, sigma, torch.ones_like(sigma))


class QuantizationUnavailable(RuntimeError):
    """The quantization asked for cannot run on this CPU or torch build (the message says why)."""


# An int8 GEMM slower than this many float32 GEMMs of the same shape is not oneDNN's JIT
# kernel but its reference loop (seen when its instruction set is capped: 50 ms for one
# row of SmoothLM2's gate/up against 0.4 ms in float32; signed activations without AMX:
# ~1000x): refused rather than served. A JIT kernel measures 0.1-0.5x; on a busy 2-core
# machine one round of timings once read 45x, so the best of `PROBE_ROUNDS` rounds counts.
MAX_SLOWDOWN = 10.0
PROBE_ROUNDS = 3


def int8_unavailable_reason(threads: int = 0) -> str | None:
    """None when oneDNN's int8 linear runs here correctly and at JIT speed, else why not.

    Checked once per process on a small weight, so that a CPU oneDNN has no fast or no
    correct int8 kernel for is refused at start, not found out on the first request. Both
    have been seen: on a CPU without VNNI (oneDNN's instruction set capped to AVX2 or to
    AVX-512 without VNNI) its u8 × s8 product comes out wrong (int16 saturation in
    vpmaddubsw: max error ~9 where int8 rounding gives ~0.1), and signed (s8) activations
    ran a reference loop ~1000x slower than float32 on every CPU without AMX (there the
    timing takes seconds: the product timed is 64 x 1024 x 1024). `threads` (> 0): timed with that
    many torch threads, as the engine will run (`--threads`), not torch's default. Probed
    once per process: the engine's own weights ask again, and a second probe was a second
    chance for a busy machine to refuse what the first passed."""
    if threads > 0 and _probe_int8.cache_info().currsize == 0:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return _probe_int8()
        finally:
            torch.set_num_threads(before)
    return _probe_int8()


@functools.cache
def _probe_int8() -> str | None:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return "this torch build has no oneDNN int8 linear"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g)
    x = torch.randn(16, 256, generator=g)
    try:
        kernel = Int8Weight(w, _checked=True)
        err = (kernel.linear(x) - x @ w.T).abs().max().item()
    except RuntimeError as e:
        return f"oneDNN's int8 linear fails on this CPU ({e})"
    if not err < 1.0:  # int8 rounding of N(0, 1) data over 256 channels: ~0.1
        return f"oneDNN's int8 linear gives wrong results on this CPU (max error {err:.3g})"
    # timed on a product big enough that the per-call work around the GEMM (quantizing x,
    # rescaling the result: tens of µs) does not decide the ratio: on the 16 x 256 x 256
    # one above it did, and a busy machine measured a working AMX kernel "4x slower"
    w = torch.randn(1024, 1024, generator=g)
    x = torch.randn(64, 1024, generator=g)
    kernel = Int8Weight(w, _checked=True)

    def best(fn) -> float:
        fn()  # the first call builds oneDNN's primitive
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    slowdown = math.inf
    for _ in range(PROBE_ROUNDS):  # (interleaved: a busy moment slows both sides of a round)
        slowdown = min(slowdown, best(lambda: kernel.linear(x)) / max(best(lambda: x @ w.T), 1e-7))
        if slowdown <= MAX_SLOWDOWN:
            break
    if slowdown > MAX_SLOWDOWN:
        return f"oneDNN has no fast int8 kernel for this CPU ({slowdown:.0f}x slower than float32)"
    return None


def int8_rows_variant_reason(kernel: Int8Weight) -> str | None:
    """None when `kernel` gives each row the bits it gets alone whatever the row count
    (1 to 80 rows, a decode step's sizes, and up to 320, a prefill chunk's), else why not:
    `--batch-invariant` with int8 rests on it, and the model checks each of its weight
    shapes at load. Exact int32 sums make it so on every CPU `int8_unavailable_reason`
    passes; checked, not assumed."""
    g = torch.Generator().manual_seed(1)
    # (a chunk of 320 rows, or fewer for a wide weight: the LM head's would be 60 MB of output)
    chunk = max(96, min(320, (16 << 20) // (4 * kernel.out_features)))
    x = torch.randn(chunk, kernel.in_features, generator=g) * torch.rand(chunk, 1, generator=g) * 8
    alone = torch.cat([kernel.linear(x[i:i + 1]) for i in range(80)])
    for rows in (2, 7, 16, 33, 80):
        together = torch.cat([kernel.linear(x[i:min(i + rows, 80)]) for i in range(0, 80, rows)])
        if not torch.equal(together, alone):
            return (f"oneDNN's int8 linear ({kernel.out_features} x {kernel.in_features}) computes a row "
                    f"differently in a step of {rows} rows than alone")
    if not torch.equal(kernel.linear(x)[:80], alone):
        return (f"oneDNN's int8 linear ({kernel.out_features} x {kernel.in_features}) computes a row "
                f"differently in a step of {len(x)} rows than alone")
    return None


class Int8Weight:
    """A (out, in) float weight quantized per output channel and pre-packed for oneDNN,
    with the interface of `gpu.model.PackedWeight`: `linear(x)` ≈ ``F.linear(x, weight)``
    in x's dtype, x quantized per token at each call (module docstring).

    Only the int8 copy is kept: the float weight it was built from may be freed."""

    def __init__(self, weight: torch.Tensor, *, _checked: bool = False) -> None:
        if weight.device.type != "cpu":
            raise ValueError(f"int8 quantization runs on the CPU only, not on {weight.device}")
        if not _checked and (why := int8_unavailable_reason()) is not None:
            raise QuantizationUnavailable(f"int8 quantization is not available: {why}")
        values, self.scale = quantize_per_channel(weight)
        self.out_features, self.in_features = values.shape
        self.zero_points = torch.zeros(self.out_features, dtype=torch.int32)
        self.packed = torch.ops.onednn.qlinear_prepack(values, None)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] == 0:
            return x.new_empty(*shape[:-1], self.out_features)
        xq, xs = layer_ops.quantize_rows_int8(x2)  # per token, one fused pass on the CPU
        # as unsigned with zero point 128 (x + 128 is x's bits with the top one flipped): oneDNN
        # has a JIT u8 x s8 kernel on every VNNI CPU, but runs signed activations through its
        # reference loop without AMX (1160 ms against 0.23 ms for 64 x 1024 x 1024 on a
        # Zen 4/5, the same results to the bit), which refused int8 on the CPUs it is for
        xu = xq.view(torch.uint8).bitwise_xor_(0x80)
        y = torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, self.packed, self.scale, self.zero_points, None,
                                               1.0, 0, torch.float32, "none", [], "")
        return layer_ops.scale_rows(y, xs, x.dtype).reshape(*shape[:-1], self.out_features)


def calibration_prompts(tokenizer) -> list[list[int]]:
    """`CALIBRATION_CHATS` rendered with the model's chat template (as served) and tokenized;
    for a model whose template refuses a chat (none at all, or no system role: Gemma's),
    without its system message, else as plain text. Such a model is served (its clients
    send raw prompts, or chats it takes): its int8 start failed with a traceback."""
    from gpu.tokenizer import ChatTemplateError

    def rendered(chat: tuple[dict, ...]) -> list[int]:
        for messages in (list(chat), [m for m in chat if m["role"] != "system"]):
            try:
                return tokenizer.render_and_encode(messages)
            except ChatTemplateError:
                continue
        return tokenizer.encode("\n\n".join(m["content"] for m in chat))

    return [rendered(chat) for chat in CALIBRATION_CHATS]

