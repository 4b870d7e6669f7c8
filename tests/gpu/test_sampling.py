"""Sampling parameters validation and the batched sampler, on hand-made logits."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from gpu.sampling import (
    Sampler,
    SamplerOutput,
    SamplingParams,
    SamplingParamsError,
    SeqSamplingState,
    chosen_first_among_ties,
    make_states,
    processed_probs,
)

V = 50


def state(params: SamplingParams, prompt=(1, 2, 3), output=(), eos=(0,), child=0) -> SeqSamplingState:
    s = SeqSamplingState.create(params, list(prompt), eos, child_index=child)
    s.output_token_ids.extend(output)
    return s


def random_logits(rows: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


# ------------------------------------------------------------------ SamplingParams
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop": ("",)}, "stop"),
        ({"stop": tuple(str(i) for i in range(17))}, "stop"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": -5}, "seed"),
        ({"n": "2"}, "n"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_invalid_params_raise_naming_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_valid_params_and_normalization():
    p = SamplingParams(stop="\n", stop_token_ids=[5], top_k=-1, temperature=0, max_tokens=None)
    assert p.stop == ("\n",)
    assert p.stop_token_ids == (5,)
    assert p.greedy
    assert not SamplingParams().greedy
    assert SamplingParams(top_k=1).greedy


def test_params_roundtrip_through_msgpack_and_validate_on_decode():
    p = SamplingParams(n=2, seed=7, stop=("a", "bc"), logprobs=3, temperature=0.5)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p
    with pytest.raises(msgspec.ValidationError, match="top_p"):
        msgspec.json.decode(b'{"top_p": 0}', type=SamplingParams)


# ------------------------------------------------------------------------ sampler
def test_greedy_is_argmax():
    logits = random_logits(6)
    out = Sampler(seed=0).sample(logits, [state(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_top_k_keeps_only_k_best():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    probs = processed_probs(logits, [SamplingParams(top_k=2)])
    assert (probs[0, [1, 3]] > 0).all()
    assert (probs[0, [0, 2, 4]] == 0).all()
    expected = torch.softmax(torch.tensor([5.0, 4.0]), dim=0)
    torch.testing.assert_close(probs[0, [1, 3]], expected)


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = p.log()
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7 → keep the first two.
    probs = processed_probs(logits, [SamplingParams(top_p=0.7)])
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # A p below the top token's mass still keeps the top token.
    probs = processed_probs(logits, [SamplingParams(top_p=0.1)])
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_min_p_drops_tokens_below_fraction_of_best():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    probs = processed_probs(p.log(), [SamplingParams(min_p=0.35)])  # floor = 0.175
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    probs = processed_probs(logits, [SamplingParams(temperature=0.5)])
    torch.testing.assert_close(probs, torch.softmax(logits / 0.5, dim=-1))


def test_truncations_are_per_row():
    logits = random_logits(3)
    params = [SamplingParams(top_k=3), SamplingParams(), SamplingParams(top_p=0.5)]
    probs = processed_probs(logits.clone(), params)
    assert int((probs[0] > 0).sum()) == 3
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], dim=-1))
    alone = processed_probs(logits[2:].clone(), params[2:])
    torch.testing.assert_close(probs[2:], alone)


def test_sampled_tokens_stay_inside_the_truncated_set():
    logits = random_logits(1, seed=3)
    top3 = set(logits[0].topk(3).indices.tolist())
    sampler = Sampler(seed=1)
    for _ in range(200):
        tok = sampler.sample(logits, [state(SamplingParams(top_k=3))]).token_ids[0]
        assert tok in top3


def test_sampling_frequencies_match_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 4000
    logits = probs.log().expand(n, 3).contiguous()
    out = Sampler(seed=123).sample(logits, [state(SamplingParams(), eos=()) for _ in range(n)])
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=3).float() / n
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


@pytest.mark.parametrize("extra", [{}, {"top_k": 5}, {"seed": 5}])
def test_zero_probability_tokens_are_never_drawn_and_the_rest_keep_their_odds(extra):
    """Masked tokens (probability exactly 0) inside and at the end of the row are never
    drawn by the inverse-CDF draw, over the full vocabulary, over top-k candidates, and
    from a seeded row's own stream."""
    probs = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.3, 0.0])
    n = 3000
    logits = probs.log().expand(n, 6).contiguous()  # log 0 = -inf
    if "seed" in extra:  # one seeded row, drawn n times from its own generator
        st = state(SamplingParams(**extra), eos=())
        sampler = Sampler(seed=7)
        tokens = [sampler.sample(logits[:1], [st]).token_ids[0] for _ in range(n)]
    else:
        tokens = Sampler(seed=7).sample(logits, [state(SamplingParams(**extra), eos=()) for _ in range(n)]).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=6).float() / n
    assert freq[1] == freq[3] == freq[5] == 0
    torch.testing.assert_close(freq, probs, atol=0.035, rtol=0)


def test_penalties_match_direct_formula():
    logits = random_logits(1, seed=5)
    prompt, output = [1, 2, 3, 3], [3, 4, 4, 4, 7]
    params = SamplingParams(
        temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.25
    )
    expected = logits[0].clone()
    for t in set(prompt) | set(output):
        expected[t] = expected[t] / 1.3 if expected[t] > 0 else expected[t] * 1.3
    for t in set(output):
        expected[t] -= 0.4 * output.count(t) + 0.25
    from gpu.sampling import apply_penalties

    got = apply_penalties(logits.clone(), [state(params, prompt, output)])
    torch.testing.assert_close(got[0], expected)


def test_penalties_change_the_greedy_choice_and_skip_neutral_rows():
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0], [0.0, 2.0, 1.9, -1.0]])
    penal = SamplingParams(temperature=0.0, presence_penalty=0.5)
    plain = SamplingParams(temperature=0.0)
    out = Sampler().sample(logits, [state(penal, output=[1]), state(plain, output=[1])])
    assert out.token_ids == [2, 1]


def test_logit_bias_bans_and_forces_tokens_per_row_and_leaves_logprobs_raw():
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0]] * 3)
    ban = SamplingParams(temperature=0.0, logit_bias={1: -100.0}, logprobs=0)
    force = SamplingParams(temperature=0.0, logit_bias={3: 100.0})
    plain = SamplingParams(temperature=0.0)
    out = Sampler().sample(logits, [state(ban), state(force), state(plain)])
    assert out.token_ids == [2, 3, 1]
    assert out.logprobs[0] == pytest.approx(float(logits[0].log_softmax(-1)[2]))  # raw, not biased
    sampled = SamplingParams(temperature=1.0, seed=3, logit_bias={3: 100.0})
    assert {Sampler().sample(logits[:1], [state(sampled, child=i)]).token_ids[0] for i in range(8)} == {3}


def test_logit_bias_is_one_sorted_form_and_is_validated():
    a = SamplingParams(logit_bias={7: 1.0, 3: -2.0})
    assert a.logit_bias == ((3, -2.0), (7, 1.0)) == SamplingParams(logit_bias=[(7, 1.0), (3, -2.0)]).logit_bias
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(a), type=SamplingParams) == a
    for bad, match in [({1: 101.0}, r"\[-100.0, 100.0\]"), ({-1: 1.0}, ">= 0"), ({"x": 1.0}, "integer"),
                       ([(1, 1.0), (1, 2.0)], "listed twice"), ({i: 0.0 for i in range(2000)}, "at most 1024")]:
        with pytest.raises(SamplingParamsError, match=match):
            SamplingParams(logit_bias=bad)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[9.0, 1.0, 8.0, 0.0]])  # eos = 0, stop id = 2
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(2,))
    s = state(params, eos=(0,), output=[3])
    assert Sampler().sample(logits, [s]).token_ids == [1]
    s.output_token_ids.append(1)
    assert Sampler().sample(logits, [s]).token_ids == [0]


def test_ignore_eos_does_not_mask_eos():
    logits = torch.tensor([[9.0, 1.0, 8.0, 0.0]])
    params = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True, stop_token_ids=(2,))
    assert Sampler().sample(logits, [state(params, eos=(0,))]).token_ids == [0]
    params = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert Sampler().sample(logits, [state(params, eos=(0,))]).token_ids == [0]


def test_logprobs_are_raw_log_softmax_with_top_alternatives():
    logits = random_logits(3, seed=9)
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0),
        SamplingParams(temperature=0.7, top_k=5, logprobs=0, seed=1),
        SamplingParams(temperature=0.0),
    ]
    out = Sampler().sample(logits, [state(p, prompt=[int(logits[0].argmax())]) for p in params])
    ref = torch.log_softmax(logits, dim=-1)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-6)
    top_vals, top_ids = ref[0].topk(3)
    assert [t for t, _ in out.top_logprobs[0]] == top_ids.tolist()
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(top_vals.tolist(), abs=1e-6)
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []
    # The penalty moved row 0 off the raw argmax, but its logprob is still the raw one.
    assert out.token_ids[0] != int(logits[0].argmax())


def test_the_sampled_token_comes_first_among_its_ties_in_top_logprobs():
    """Exact ties (common in bfloat16): the sampled token is listed before the alternatives
    as likely as it, as OpenAI lists it; topk's own order among ties put it second."""
    logits = torch.zeros(6, V)  # every token ties with every other
    params = [SamplingParams(temperature=1.0, logprobs=3, seed=s) for s in range(6)]
    out = Sampler().sample(logits, [state(p) for p in params])
    assert len(set(out.token_ids)) > 1
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
        assert top[0] == (tok, lp) and len(top) == 3 and len({t for t, _ in top}) == 3
    # the pure rule: a tie cut off by k takes the last tied place; no tie, nothing moves
    top = [(1, -0.5), (2, -1.0), (3, -1.0)]
    assert chosen_first_among_ties(top, 4, -1.0) == [(1, -0.5), (4, -1.0), (2, -1.0)]
    assert chosen_first_among_ties(top, 3, -1.0) == [(1, -0.5), (3, -1.0), (2, -1.0)]
    assert chosen_first_among_ties(top, 9, -2.0) == top
    assert chosen_first_among_ties(top, 1, -0.5) == top


def _run_steps(rows: list[SeqSamplingState], steps: int, target: int, seed: int) -> list[int]:
    """Sample `steps` times; each row's logits depend only on its own history."""
    sampler = Sampler(seed=seed)
    for _ in range(steps):
        logits = torch.stack([
            random_logits(
                1, seed=1000 + len(s.output_token_ids) * 7 + sum(s.output_token_ids), vocab=3000
            )[0] / 2
            for s in rows
        ])
        out: SamplerOutput = sampler.sample(logits, rows)
        for s, t in zip(rows, out.token_ids, strict=True):
            s.output_token_ids.append(t)
    return rows[target].output_token_ids


def test_seeded_request_is_identical_alone_and_in_any_batch():
    seeded = SamplingParams(seed=42, temperature=0.9, top_p=0.95, top_k=30)
    alone = _run_steps([state(seeded)], steps=40, target=0, seed=0)
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(seed=7, temperature=1.3, top_k=2000),  # widens the candidate set
        SamplingParams(temperature=0.0),
        SamplingParams(min_p=0.1, frequency_penalty=0.5),
    ]
    batch = [state(others[0]), state(others[1]), state(seeded), state(others[2]), state(others[3])]
    in_batch = _run_steps(batch, steps=40, target=2, seed=99)
    assert alone == in_batch
    assert len(set(alone)) > 5  # really random, not degenerate


def test_unseeded_requests_differ_and_seeded_children_are_distinct_but_reproducible():
    params = SamplingParams(n=4, seed=11, temperature=1.0)
    first = make_states(params, [1, 2], (0,))
    second = make_states(params, [1, 2], (0,))
    logits = random_logits(1, seed=4).expand(4, V).contiguous()
    a = [Sampler().sample(logits, first).token_ids for _ in range(20)]
    b = [Sampler().sample(logits, second).token_ids for _ in range(20)]
    assert a == b
    per_child = list(zip(*a, strict=True))
    assert len(set(per_child)) == 4  # the children's streams differ

    unseeded = make_states(SamplingParams(n=4), [1], ())
    assert all(s.generator is None for s in unseeded)
    out = [Sampler().sample(logits, unseeded).token_ids for _ in range(10)]
    assert len({tuple(col) for col in zip(*out, strict=True)}) > 1


def test_engine_generator_makes_unseeded_rows_reproducible():
    logits = random_logits(3, seed=2)
    rows = [state(SamplingParams()) for _ in range(3)]
    a = Sampler().sample(logits, rows, generator=torch.Generator().manual_seed(5)).token_ids
    b = Sampler().sample(logits, rows, generator=torch.Generator().manual_seed(5)).token_ids
    assert a == b


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="logits"):
        Sampler().sample(random_logits(2), [state(SamplingParams())])


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Straightforward one-row HF-order warpers, by full sort (the spec the sampler must meet)."""
    x = logits / p.temperature
    order = x.argsort(descending=True)
    keep = torch.zeros_like(x, dtype=torch.bool)
    k = p.top_k if p.top_k > 0 else x.numel()
    keep[order[:k]] = True
    x = x.masked_fill(~keep, -math.inf)
    probs = x.softmax(-1)
    if p.top_p < 1.0:
        sp = probs[order]
        cut = int(((sp.cumsum(0) - sp) <= p.top_p).sum())  # tokens before the mass reaches p
        keep2 = torch.zeros_like(keep)
        keep2[order[: max(cut, 1)]] = True
        probs = probs.masked_fill(~keep2, 0.0)
        probs = probs / probs.sum()
    if p.min_p > 0:
        probs = probs.masked_fill(probs < probs.max() * p.min_p, 0.0)
        probs = probs / probs.sum()
    return probs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.3, temperature=0.7),
        SamplingParams(top_k=40, top_p=0.8),
        SamplingParams(top_k=1500),
        SamplingParams(top_p=0.95, min_p=0.05),
        SamplingParams(top_p=0.999, temperature=3.0),  # nucleus wider than the candidates
    ],
)
def test_processed_probs_match_reference_on_a_real_sized_vocab(params):
    logits = random_logits(4, seed=21, vocab=8000)
    got = processed_probs(logits.clone(), [params] * 4)
    for i in range(4):
        want = reference_probs(logits[i], params)
        assert torch.equal(got[i] > 0, want > 0)
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=1e-4)


def test_flat_distribution_top_p_falls_back_to_full_sort():
    logits = torch.zeros(1, 5000)
    logits[0, :10] = 0.001  # a few slightly better tokens, then a flat tail
    probs = processed_probs(logits, [SamplingParams(top_p=0.5)])
    assert int((probs > 0).sum()) == 2500


def test_compact_sampling_follows_the_truncated_distribution():
    logits = random_logits(1, seed=8, vocab=2000) / 3
    params = SamplingParams(top_p=0.6, min_p=0.02)
    want = processed_probs(logits.clone(), [params])[0]
    n = 4000
    out = Sampler(seed=3).sample(logits.expand(n, -1).contiguous(), [state(params) for _ in range(n)])
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=2000).float() / n
    assert set(torch.tensor(out.token_ids).tolist()) <= set(want.nonzero().flatten().tolist())
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)


def test_sample_does_not_modify_the_input_logits():
    logits = random_logits(2, seed=1)
    before = logits.clone()
    params = SamplingParams(repetition_penalty=1.5, min_tokens=3, presence_penalty=1.0, top_p=0.5)
    Sampler().sample(logits, [state(params, output=[4, 5]), state(params)])
    assert torch.equal(logits, before)
