"""int8 quantization (`gpu.quantization`): the arithmetic, the fused kernels against their
torch references, the int8 GEMM, SmoothQuant's folding, and the quantized engine."""

from __future__ import annotations

import pytest
import torch

from gpu import layer_ops
from gpu.config import EngineConfig
from gpu.quantization import (
    Int8Weight,
    calibration_prompts,
    dequantize_per_channel,
    int8_unavailable_reason,
    quantize_per_channel,
    smoothing_factors,
)

needs_int8 = pytest.mark.skipif(int8_unavailable_reason() is not None, reason="no oneDNN int8 linear on this CPU / torch build")
needs_fused = pytest.mark.skipif(not layer_ops.fused_available(), reason="the CPU layer-ops extension did not build")


def test_weights_round_trip_within_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 40, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different ranges
    w[5] = 0.0
    values, scale = quantize_per_channel(w)
    assert values.dtype == torch.int8 and scale.shape == (64,)
    assert values.abs().max() <= 127 and scale[5] == 1.0 and not values[5].any()
    err = (dequantize_per_channel(values, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (values.abs().amax(1)[torch.arange(64) != 5] == 127).all()  # each row uses its whole range
    assert torch.equal(quantize_per_channel(-w)[0], -values)  # symmetric: no zero point


def _rows(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 70, generator=g) * torch.logspace(-4, 3, 9)[:, None]
    x[2] = 0.0  # a zero row
    x[3, :4] = torch.tensor([127.0, 0.5, -0.5, 1.5])  # ties at .5 after scaling: half to even
    return x.to(dtype)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_per_token_quantization_is_bit_identical_to_its_reference(dtype):
    wide = _rows(dtype).repeat(1, 2)
    for x in (_rows(dtype), wide[:, :70]):  # contiguous and row-strided inputs
        q, s = layer_ops.quantize_rows_int8(x)
        rq, rs = layer_ops.quantize_rows_int8_reference(x)
        assert q.dtype == torch.int8 and s.shape == (9, 1)
        assert torch.equal(q, rq) and torch.equal(s, rs)
    assert not q[2].any() and q[3, :4].tolist() == [127, 0, 0, 2]


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_row_rescale_is_bit_identical_to_its_reference(dtype):
    g = torch.Generator().manual_seed(2)
    y = torch.randn(7, 33, generator=g) * 1e3
    s = torch.rand(7, 1, generator=g)
    out = layer_ops.scale_rows(y, s, dtype)
    assert out.dtype == dtype and torch.equal(out, (y * s).to(dtype))


def test_smoothing_factors_balance_activation_and_weight_ranges():
    act = torch.tensor([8.0, 1.0, 0.0, 4.0])
    w = torch.tensor([[0.5, 1.0, 1.0, 0.0], [-2.0, 0.25, 3.0, 0.0]])  # column maxima 2, 1, 3, 0
    sigma = smoothing_factors(act, w, alpha=0.5)
    assert torch.allclose(sigma[:2], torch.tensor([(8 / 2) ** 0.5, 1.0]))
    assert sigma[2] == 1.0 and sigma[3] == 1.0  # never active, or an all-zero column: left alone
    # after smoothing, the channel's activation and weight maxima are equal (α = 0.5)
    assert torch.allclose(act[:2] / sigma[:2], w.abs().amax(0)[:2] * sigma[:2])
    assert torch.equal(smoothing_factors(act, w, alpha=0.0)[:2], 1 / w.abs().amax(0)[:2])
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(act, w, alpha=1.5)


@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_int8_linear_tracks_the_float_product(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 128, generator=g) * 0.05
    x = torch.randn(rows, 128, generator=g).to(dtype)
    y = Int8Weight(w.to(dtype)).linear(x)
    ref = x.float() @ w.to(dtype).float().T
    assert y.dtype == dtype and y.shape == (rows, 96)
    assert (y.float() - ref).norm() / ref.norm() < 0.03  # two 8-bit roundings: ~1% here


@needs_int8
def test_int8_linear_quantizes_each_token_by_its_own_range():
    """A token's result does not depend on the other tokens of the call: its scale is its
    own, and the int8 products accumulate exactly in int32 whatever the blocking."""
    g = torch.Generator().manual_seed(3)
    kernel = Int8Weight(torch.randn(200, 64, generator=g))
    x = torch.randn(40, 64, generator=g)
    alone = torch.cat([kernel.linear(x[i:i + 1]) for i in range(40)])
    x_loud = x.clone()
    x_loud[1:] *= 1000  # every other token a thousand times larger
    assert torch.equal(kernel.linear(x), alone)
    assert torch.equal(kernel.linear(x_loud)[0], alone[0])


@needs_int8
def test_int8_linear_keeps_leading_dims_and_handles_no_rows():
    kernel = Int8Weight(torch.randn(12, 8))
    assert kernel.linear(torch.randn(2, 3, 8)).shape == (2, 3, 12)
    empty = kernel.linear(torch.empty(0, 8, dtype=torch.bfloat16))
    assert empty.shape == (0, 12) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"quantization": "int4"}, "quantization must be none or int8"),
    ({"quantization": "int8", "device": "cuda"}, "CPU only"),
])
def test_engine_config_refuses_what_int8_cannot_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


# ------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from gpu.loader import load_checkpoint
    from gpu.tokenizer import load_tokenizer

    return load_tokenizer(load_checkpoint(str(smollm2_path), torch.float32))


def _runner(smollm2_path, quantization="none", tokenizer=None, dtype=torch.float32):
    from gpu.loader import load_checkpoint
    from gpu.runner import ModelRunner

    calibration = calibration_prompts(tokenizer) if quantization != "none" else ()
    return ModelRunner(load_checkpoint(str(smollm2_path), dtype), num_blocks=64, block_size=16, dtype=dtype,
                       quantization=quantization, calibration=calibration)


def _texts(tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt, continuation) pairs cut from chats that are not the calibration's."""
    chats = [
        [{"role": "user", "content": "Explain why the sky is blue in three sentences."},
         {"role": "assistant", "content": "Sunlight is scattered by the molecules of the air, and blue light, "
                                          "with its shorter wavelength, is scattered much more than red."}],
        [{"role": "user", "content": "List three uses of a paperclip."},
         {"role": "assistant", "content": "1. Holding papers together. 2. Resetting a device through a pinhole. "
                                          "3. A makeshift hook for hanging a small ornament."}],
        [{"role": "system", "content": "Answer in German."},
         {"role": "user", "content": "Where is the train station?"},
         {"role": "assistant", "content": "Der Bahnhof ist in der Nähe des Marktplatzes, gleich hinter der Kirche."}],
    ]
    out = []
    for chat in chats:
        ids = tokenizer.render_and_encode(chat)
        cut = len(tokenizer.render_and_encode(chat[:-1]))
        out.append((ids[:cut], ids[cut:]))
    return out


@pytest.mark.slow
def test_smoothing_alone_leaves_the_float_model_unchanged(smollm2_path, tokenizer):
    from ops.bench_dtype import teacher_forced_logits

    runner = _runner(smollm2_path)
    seqs = _texts(tokenizer)
    before = teacher_forced_logits(runner, seqs)
    runner.model.smooth_(runner.input_absmax(calibration_prompts(tokenizer)))
    after = teacher_forced_logits(runner, seqs)
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max() < 2e-3 * a.abs().max()  # float32 rounding of rescaled weights
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.slow
@needs_int8
def test_int8_model_stays_close_to_float32(smollm2_path, tokenizer):
    """Teacher-forced on text outside the calibration set: next-token distributions within
    a small KL of float32's and mostly the same top token (ops.bench_dtype measures
    0.013 nats and 96% on 48 fixture prompts; unsmoothed per-tensor int8 gave 0.16, 82%)."""
    from ops.bench_dtype import kl_and_top1, pooled, teacher_forced_logits

    seqs = _texts(tokenizer)
    ref = teacher_forced_logits(_runner(smollm2_path), seqs)
    runner = _runner(smollm2_path, "int8", tokenizer)
    assert runner.model.quantization == "int8"
    got = teacher_forced_logits(runner, seqs)
    kl, agree = pooled([kl_and_top1(a, b) for a, b in zip(ref, got, strict=True)])
    assert kl.mean() < 0.05 and agree.float().mean() > 0.85
    # the float projection weights are gone: only their int8 copies remain
    from gpu.model import Linear

    assert all(m.weight.numel() == 0 for m in runner.model.modules() if isinstance(m, Linear))


@pytest.mark.slow
@needs_int8
def test_int8_engine_answers_and_frees_its_blocks(smollm2_path):
    from gpu.config import CacheConfig
    from gpu.engine import Engine, generate
    from gpu.sampling import SamplingParams

    engine = Engine(EngineConfig(dtype="float32", quantization="int8", num_threads=2,
                                 cache=CacheConfig(cache_bytes=64 * 1024**2)))
    tok = engine.tokenizer
    # a raw prompt: the chat question's first token is a near-tie ("The" 0.152, "L" 0.140 in
    # float32) that any rounding of the model may flip
    prompts = [tok.encode("The capital of France is")] + [
        tok.render_and_encode([{"role": "user", "content": q}]) for q in ("Count from one to five.", "Say hello.")]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    first = generate(engine, prompts, params)
    assert "Paris" in tok.decode(list(first[0][0].token_ids))
    assert all(len(c[0].token_ids) > 0 for c in first)
    # another batch order: rows never mix (each token's activations are quantized alone, the
    # GEMM is exact), so the answers agree, but for a near-tie the float parts' last bits
    # (attention over another batch) can tip once rounded to int8 (as --batch-invariant's
    # attention would not: below). On a Zen 5 "Say hello." parted at its 19th token.
    again = generate(engine, prompts[::-1], params)[::-1]
    assert all(list(a[0].token_ids[:8]) == list(b[0].token_ids[:8]) for a, b in zip(again, first, strict=True))
    assert engine.block_manager.num_free_blocks == engine.num_blocks


@needs_int8
def test_int8_rows_are_invariant_here_and_a_variant_kernel_is_refused(monkeypatch):
    """`--batch-invariant` with int8 rests on each row getting its bits alone whatever the
    step's row count (exact int32 sums); the start-up check says so, and refuses a kernel
    whose rows depend on their neighbours."""
    from gpu import quantization

    for shape in ((960, 576), (576, 1536), (3072, 576)):  # SmolLM2's qkv, down, gate/up
        assert quantization.int8_rows_variant_reason(Int8Weight(torch.randn(*shape))) is None
    kernel = Int8Weight(torch.randn(64, 96))
    real = quantization.Int8Weight.linear
    monkeypatch.setattr(quantization.Int8Weight, "linear", lambda self, x: real(self, x) * (1 + 1e-3 * (len(x) > 1)))
    assert "(64 x 96) computes a row differently in a step of 2 rows" in quantization.int8_rows_variant_reason(kernel)
    monkeypatch.setattr(quantization.Int8Weight, "linear", lambda self, x: real(self, x) * (1 + 1e-3 * (len(x) > 80)))
    assert "in a step of 320 rows" in quantization.int8_rows_variant_reason(kernel)


@pytest.mark.slow
@needs_int8
def test_int8_batch_invariant_engine_gives_a_request_the_same_tokens_whatever_the_load(smollm2_path):
    """int8 with `batch_invariant=True`: a greedy request gets the tokens it gets alone in a
    batch, under chunked prefill and after preemptions (without the invariant attention, a
    recomputed prompt tipped near-ties once rounded to int8: an audit saw 0 of 6 answers
    kept under a small cache)."""
    from dataclasses import replace

    from gpu.config import CacheConfig, SchedulerConfig
    from gpu.engine import Engine, generate
    from gpu.sampling import SamplingParams

    def engine(cache_mb: float = 64, **sched) -> Engine:
        return Engine(EngineConfig(dtype="float32", quantization="int8", batch_invariant=True, num_threads=2,
                                   cache=CacheConfig(cache_bytes=int(cache_mb * 1024**2), enable_prefix_caching=False),
                                   scheduler=replace(SchedulerConfig(), **sched)))

    first = engine()
    tok = first.tokenizer
    questions = ("Say hello.", "Count from one to five.", "Name three colours.", "What is rain?",
                 "Write a haiku about the sea.", "Why do cats purr?", "Describe a bicycle.", "What is 7 times 8?")
    prompts = [tok.render_and_encode([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = [generate(first, [p], params)[0][0].token_ids for p in prompts[:3]]
    batched = generate(first, prompts, params)
    # room for about three requests at a time: the rest are preempted and recomputed
    per_block = CacheConfig().bytes_per_block(first.runner.model.config, 4)
    small = engine(cache_mb=per_block * 3 * -(-(max(map(len, prompts)) + 40) // 16) / 1024**2,
                   max_num_batched_tokens=37, long_prefill_token_threshold=16)
    squeezed = generate(small, prompts, params)
    assert small.counters["preemptions"] > 0
    for k, ids in enumerate(alone):
        assert list(batched[k][0].token_ids) == list(ids)
        assert list(squeezed[k][0].token_ids) == list(ids)
    assert small.block_manager.num_free_blocks == small.num_blocks


def test_an_int8_kernel_that_is_wrong_or_slow_is_refused(monkeypatch):
    """The start-up probe refuses oneDNN int8 kernels that compute wrong results or run as
    a reference loop (both seen with oneDNN's instruction set capped), with the reason."""
    from gpu import quantization

    probe = quantization._probe_int8.__wrapped__
    if probe() is not None:
        pytest.skip(f"int8 unavailable here: {probe()}")
    real = quantization.Int8Weight.linear
    monkeypatch.setattr(quantization.Int8Weight, "linear", lambda self, x: real(self, x) * 1.5)
    assert "wrong results" in probe()

    def slow(self, x):  # (a reference loop: 100-1000x a float32 GEMM of 0.2-2 ms)
        import time

        time.sleep(0.2)
        return real(self, x)

    monkeypatch.setattr(quantization.Int8Weight, "linear", slow)
    monkeypatch.setattr(quantization, "PROBE_ROUNDS", 1)  # (each round sleeps 1.2 s)
    assert "no fast int8 kernel" in probe()
    monkeypatch.setattr(quantization, "int8_unavailable_reason", lambda threads=0: "no int8 here")
    with pytest.raises(quantization.QuantizationUnavailable, match="no int8 here"):
        Int8Weight(torch.randn(4, 4))


class _Template:
    """A tokenizer whose chat template refuses chats: `refuses` "system" (Gemma's) or "all"
    (a model with no chat template)."""

    def __init__(self, refuses: str) -> None:
        self.refuses = refuses

    def render_and_encode(self, messages):
        from gpu.tokenizer import ChatTemplateError

        if self.refuses == "all" or any(m["role"] == "system" for m in messages):
            raise ChatTemplateError("System role not supported")
        return [len(m["content"]) for m in messages]

    def encode(self, text):
        return [-len(text)]


def test_calibration_takes_a_model_whose_template_refuses_its_chats():
    """Calibration rendered chats with a system message through the model's template: a
    model without one (or refusing the system role) failed its int8 start with a traceback."""
    from gpu.quantization import CALIBRATION_CHATS, calibration_prompts

    gemma = calibration_prompts(_Template("system"))
    assert gemma == [[len(m["content"]) for m in chat if m["role"] != "system"] for chat in CALIBRATION_CHATS]
    plain = calibration_prompts(_Template("all"))
    assert plain == [[-len("\n\n".join(m["content"] for m in chat))] for chat in CALIBRATION_CHATS]
