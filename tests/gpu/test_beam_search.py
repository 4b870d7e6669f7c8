"""Beam search: the selection rule on hand-made candidates, then the engine against
Hugging Face transformers' `generate(num_beams=k)` (fp32, token-identical), under
preemption and beside other requests, and its refusals."""

from __future__ import annotations

import math

import pytest
import torch

from gpu.beam_search import BeamConfig, BeamSearch, Continuation
from gpu.config import CacheConfig, EngineConfig, SchedulerConfig
from gpu.engine import Engine, RequestRejected, generate
from gpu.sampling import SamplingParams, SamplingParamsError

EOS = 0


def cands(*pairs: tuple[float, int]) -> tuple[list[float], list[int]]:
    return [math.log(p) for p, _ in pairs], [t for _, t in pairs]


# ------------------------------------------------------------------ the selection rule
def test_first_round_keeps_the_best_non_stop_candidates_and_finishes_a_top_ranked_eos():
    search = BeamSearch(BeamConfig(width=2, max_tokens=5, stop_token_ids=frozenset({EOS})))
    assert search.config.candidates_per_beam == 4
    nxt = search.advance([cands((0.5, 7), (0.3, EOS), (0.1, 8), (0.05, 9))])
    assert nxt == [Continuation(0, 7, math.log(0.5)), Continuation(0, 8, math.log(0.1))]
    assert [h.tokens for h in search.finished] == [(EOS,)]
    assert search.finished[0].score == pytest.approx(math.log(0.3))  # length 1: no normalization
    assert not search.done


def test_beams_rank_by_their_scores_and_report_the_model_s_logprobs():
    """With a logit_bias or a penalty the score is not the model's logprob: beams go by the
    score, tokens report the logprob (they reported the score: positive "logprobs")."""
    search = BeamSearch(BeamConfig(width=1, max_tokens=1, stop_token_ids=frozenset({EOS})))
    search.advance([([4.7, -0.4], [7, 8], [-0.3, -0.4])])  # token 7's score holds a +5 bias
    [best] = search.results(1)
    assert best.tokens == (7,) and best.logprobs == (-0.3,) and best.score == pytest.approx(4.7)


def test_an_eos_ranked_below_the_width_does_not_finish():
    search = BeamSearch(BeamConfig(width=1, max_tokens=5, stop_token_ids=frozenset({EOS})))
    search.advance([cands((0.6, 7), (0.4, EOS))])
    assert search.finished == [] and [b.tokens for b in search.running] == [[7]]


def test_length_penalty_normalizes_and_the_heuristic_ends_the_search():
    cfg = BeamConfig(width=1, max_tokens=10, stop_token_ids=frozenset({EOS}), length_penalty=1.0)
    search = BeamSearch(cfg)
    search.advance([cands((0.5, 7), (0.1, 8))])
    search.advance([cands((0.9, EOS), (0.05, 9))])  # [7, EOS] finishes: log(0.45) / 2
    assert search.finished[0].score == pytest.approx(math.log(0.45) / 2)
    assert search.finished[0].finish_reason == "stop"
    # the running beam [7, 9] scores log(0.025); over length 2 it cannot beat the hypothesis
    assert search.done and not search.improvable
    [best] = search.results(1)
    assert best.tokens == (7, EOS) and best.logprobs == pytest.approx((math.log(0.5), math.log(0.9)))


def test_early_stopping_true_ends_once_width_hypotheses_exist():
    cfg = BeamConfig(width=2, max_tokens=10, stop_token_ids=frozenset({EOS}), early_stopping=True,
                     length_penalty=-5.0)  # a penalty that would keep the heuristic going
    search = BeamSearch(cfg)
    search.advance([cands((0.5, 7), (0.4, 8), (0.05, 9), (0.05, 10))])
    assert not search.done
    search.advance([cands((0.9, EOS), (0.1, 11)), cands((0.9, EOS), (0.1, 12))])
    assert len(search.finished) == 2 and search.done


def test_max_tokens_finishes_the_best_width_candidates_as_length():
    search = BeamSearch(BeamConfig(width=2, max_tokens=1, stop_token_ids=frozenset({EOS})))
    nxt = search.advance([cands((0.5, 7), (0.3, 8), (0.1, 9), (0.1, 10))])
    assert nxt == [] and search.done
    assert [(h.tokens, h.finish_reason) for h in search.results(2)] == [((7,), "length"), ((8,), "length")]
    with pytest.raises(RuntimeError, match="over"):
        search.advance([cands((1.0, 7))])


def test_stop_strings_finish_through_the_callback_once_armed():
    cfg = BeamConfig(width=1, max_tokens=10, stop_token_ids=frozenset({EOS}), min_tokens=2)
    search = BeamSearch(cfg)
    hits = lambda parent, token: token == 8  # noqa: E731 - "token 8 completes a stop string"
    search.advance([cands((0.6, 8), (0.4, 7))], hits)  # length 1 < min_tokens: not armed, 8 runs
    assert [b.tokens for b in search.running] == [[8]]
    search.advance([cands((0.7, 8), (0.3, 7))], hits)
    assert search.finished[0].tokens == (8, 8) and search.finished[0].finish_reason == "stop"


def test_a_report_per_running_beam_is_required():
    search = BeamSearch(BeamConfig(width=2, max_tokens=5))
    search.advance([cands((0.5, 7), (0.5, 8), (0.0001, 9), (0.0001, 10))])
    with pytest.raises(ValueError, match="2 beams run, 1 reported"):
        search.advance([cands((1.0, 7))])


def test_candidates_are_log_probabilities_with_the_bans_and_the_logit_bias_applied():
    from gpu.beam_search import beam_candidates
    from gpu.sampling import SeqSamplingState

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    raw = logits.log_softmax(-1)[0]

    def top(**kw) -> tuple[list[float], list[int], list[float]]:
        params = SamplingParams(use_beam_search=True, **kw)
        return beam_candidates(logits, [SeqSamplingState(params, [5], [], None, (EOS,))], 2)[0]

    lps, ids, model = top()
    assert ids == [0, 1] and lps == pytest.approx([float(raw[0]), float(raw[1])]) == model
    assert top(min_tokens=1)[1] == [1, 2]  # EOS (0) masked, the rest not renormalized
    assert top(min_tokens=1)[0] == pytest.approx([float(raw[1]), float(raw[2])])
    assert top(logit_bias={3: 100.0})[1] == [3, 0]
    assert top(logit_bias={3: 100.0})[0][0] == pytest.approx(float(raw[3]) + 100.0)  # ranked by the score
    # ... but what the token reports is the model's logprob, as sampling's does (it was the score)
    assert top(logit_bias={3: 100.0})[2] == pytest.approx([float(raw[3]), float(raw[0])])


def test_params_refuse_what_beam_search_cannot_do():
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams(use_beam_search=True, top_p=0.9)
    with pytest.raises(SamplingParamsError, match="no top alternatives"):
        SamplingParams(use_beam_search=True, logprobs=2)
    with pytest.raises(SamplingParamsError, match="best_of"):
        SamplingParams(use_beam_search=True, n=3, best_of=2)
    with pytest.raises(SamplingParamsError, match="use_beam_search only"):
        SamplingParams(n=1, best_of=3)
    with pytest.raises(SamplingParamsError, match="early_stopping"):
        SamplingParams(use_beam_search=True, early_stopping="always")
    p = SamplingParams(use_beam_search=True, n=2, best_of=4, temperature=0.7, logprobs=0)
    assert p.beam_width == 4 and SamplingParams(n=3).beam_width == 0


# ----------------------------------------------------------------- the engine (model)
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors."]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]


def make_engine(ckpt, tokenizer, *, blocks: int | None = None, **sched) -> Engine:
    cache = CacheConfig(cache_bytes=64 * 1024**2)
    if blocks is not None:
        per_block = CacheConfig(block_size=16).bytes_per_block(ckpt.config, 4)
        cache = CacheConfig(block_size=16, cache_bytes=per_block * blocks, enable_prefix_caching=False)
    return Engine(EngineConfig(dtype="float32", cache=cache, scheduler=SchedulerConfig(**sched)),
                  checkpoint=ckpt, tokenizer=tokenizer)


def hf_beams(model, ids: list[int], eos: tuple[int, ...], k: int, max_tokens: int, **kw) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), num_beams=k, num_return_sequences=k, do_sample=False,
                             max_new_tokens=max_tokens, eos_token_id=list(eos), pad_token_id=eos[0], **kw)
    rows = []
    for row in out[:, len(ids):].tolist():  # finished rows are padded after their EOS
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


SETTINGS = [  # (beams, max_tokens, length_penalty, early_stopping): each of HF's stopping rules
    (4, 30, 1.0, False),
    (3, 20, 0.0, "never"),
    (2, 24, 2.0, True),
]


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
@pytest.mark.parametrize(("k", "max_tokens", "length_penalty", "early_stopping"), SETTINGS)
def test_beams_match_transformers_generate(hf_reference, ckpt, tokenizer, prompts, k, max_tokens, length_penalty,
                                           early_stopping):
    engine = make_engine(ckpt, tokenizer)
    params = SamplingParams(use_beam_search=True, n=k, max_tokens=max_tokens, length_penalty=length_penalty,
                            early_stopping=early_stopping, logprobs=0)
    outs = generate(engine, prompts, params)  # the prompts' beams run batched together
    eos = tuple(tokenizer.eos_token_ids)
    reasons = set()
    for ids, choices in zip(prompts, outs, strict=True):
        want = hf_beams(hf_reference, ids, eos, k, max_tokens, length_penalty=length_penalty,
                        early_stopping=early_stopping)
        assert [c.token_ids for c in choices] == want
        for c in choices:
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason == ("stop" if c.token_ids[-1] in eos else "length")
            reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}  # both endings are exercised
    assert engine.block_manager.num_free_blocks == engine.num_blocks


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
def test_beams_beside_other_requests_under_preemption_give_the_same_answers(ckpt, tokenizer, prompts):
    """A cache of 17 blocks and 6 seats for two 4-beam searches and a greedy request: beams are
    preempted and held while siblings recompute; the answers do not change, nothing leaks."""
    beam = SamplingParams(use_beam_search=True, n=2, best_of=4, max_tokens=24)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    params = [beam, greedy, beam]
    alone = [generate(make_engine(ckpt, tokenizer), [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    tight = make_engine(ckpt, tokenizer, blocks=17, max_num_seqs=6, max_num_batched_tokens=64)
    together = generate(tight, prompts, params)
    assert tight.counters["preemptions"] > 0
    assert [[c.token_ids for c in r] for r in together] == [[c.token_ids for c in r] for r in alone]
    assert [len(r) for r in together] == [2, 1, 2]
    assert tight.block_manager.num_free_blocks == tight.num_blocks


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
def test_stop_strings_min_tokens_abort_and_refusals(ckpt, tokenizer, prompts):
    engine = make_engine(ckpt, tokenizer, max_num_seqs=8)
    free = SamplingParams(use_beam_search=True, n=3, max_tokens=30)
    [choices] = generate(engine, [prompts[1]], free)
    word = choices[0].text.split()[2]  # a word the best beam says: a stop string now
    # length_penalty 0 ranks by summed logprob, so the short hypothesis the stop string ends
    # (the best beam's text, cut before the word) is among the answers
    [stopped] = generate(engine, [prompts[1]], SamplingParams(use_beam_search=True, n=3, max_tokens=30,
                                                                stop=(word,), length_penalty=0.0))
    assert all(word not in c.text for c in stopped)
    cut = choices[0].text[: choices[0].text.index(word)]
    assert any(c.finish_reason == "stop" and c.text == cut and c.token_ids[-1] not in tokenizer.eos_token_ids
               for c in stopped)
    [long] = generate(engine, [prompts[0]], SamplingParams(use_beam_search=True, n=2, max_tokens=30,
                                                             min_tokens=12))
    assert all(len(c.token_ids) >= 12 for c in long)

    # every token the beams decode is accounted: the returned ones, and the rest on the last delta
    before = engine.counters["generated_tokens"]
    engine.add_request("b", prompts[0], SamplingParams(use_beam_search=True, n=2, best_of=4, max_tokens=10))
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    assert [d.request_finished for d in deltas] == [False, True]
    assert deltas[0].unreturned_tokens == 0 and deltas[1].unreturned_tokens > 0
    assert sum(len(d.token_ids) + d.unreturned_tokens for d in deltas) == engine.counters["generated_tokens"] - before

    engine.add_request("a", prompts[2], SamplingParams(use_beam_search=True, n=4, max_tokens=30))
    for _ in range(4):
        assert engine.step() == []  # beams emit nothing until the search ends
    assert engine.decoded_tokens("a") == 1 + 3 * 4  # the prompt's step chose 4 beams; 3 steps of 4 followed
    assert engine.abort("a") and not engine.has_unfinished()
    assert engine.decoded_tokens("a") == 0
    assert engine.block_manager.num_free_blocks == engine.num_blocks

    with pytest.raises(RequestRejected, match="at most 8 sequences"):
        engine.add_request("wide", prompts[0], SamplingParams(use_beam_search=True, n=9, max_tokens=8))
    small = make_engine(ckpt, tokenizer, blocks=8)
    with pytest.raises(RequestRejected, match="KV blocks"):
        small.add_request("big", prompts[0], SamplingParams(use_beam_search=True, n=4, max_tokens=40))


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
@pytest.mark.parametrize("seed", [7, 2, 5])  # ten seeds passed when this was written
def test_random_mixes_of_beams_samples_and_aborts_finish_without_leaks(ckpt, tokenizer, prompts, seed):
    """Random beam settings beside sampled requests, on a cache small enough to preempt, with
    some requests aborted mid-way: every survivor returns its n answers within its limits, and
    every block comes back."""
    import random

    rng = random.Random(seed)
    engine = make_engine(ckpt, tokenizer, blocks=22, max_num_seqs=10, max_num_batched_tokens=48)
    expected: dict[str, SamplingParams] = {}
    for i in range(14):
        if rng.random() < 0.6:
            width = rng.randint(1, 5)
            max_tokens = rng.randint(1, 20)
            params = SamplingParams(
                use_beam_search=True, n=rng.randint(1, width), best_of=width, max_tokens=max_tokens,
                length_penalty=rng.choice([0.0, 1.0, 2.0, -1.0]), early_stopping=rng.choice([False, True, "never"]),
                min_tokens=min(max_tokens, rng.choice([0, 0, 3])), ignore_eos=rng.random() < 0.2,
                repetition_penalty=rng.choice([1.0, 1.3]), stop=rng.choice([(), (" the",), ("\n",)]), logprobs=0,
                logit_bias=rng.choice([{}, {13: -100.0}, {30: 5.0, 28: -3.0}]))
        else:
            params = SamplingParams(n=rng.randint(1, 3), temperature=0.8, seed=i, max_tokens=rng.randint(1, 20))
        expected[f"r{i}"] = params
        engine.add_request(f"r{i}", prompts[i % len(prompts)], params)
    answers: dict[str, dict[int, list[int]]] = {rid: {} for rid in expected}
    finished: set[str] = set()
    steps = 0
    while engine.has_unfinished():
        for d in engine.step():
            answers[d.request_id].setdefault(d.index, []).extend(d.token_ids)
            if d.request_finished:
                finished.add(d.request_id)
        steps += 1
        if steps % 9 == 0:  # abort a random live request now and then
            live = sorted(set(expected) - finished)
            victim = rng.choice(live) if live and rng.random() < 0.3 else None
            if victim is not None and engine.abort(victim):
                expected.pop(victim)
        assert steps < 5000
    assert engine.counters["preemptions"] > 0
    for rid, params in expected.items():
        assert rid in finished
        assert sorted(answers[rid]) == list(range(params.n))
        for tokens in answers[rid].values():
            assert 1 <= len(tokens) <= params.max_tokens
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_a_beam_s_stop_test_kept_round_to_round_reads_as_its_whole_text_does(tokenizer):
    """The stop-string test of a candidate is now its beam's kept state plus one token: it
    must agree with reading the beam's whole text again (`Engine._beam_text`), token by
    token, whatever the text (multi-byte characters, EOS, min_tokens, stop strings)."""
    import random
    import types

    from gpu.engine import Engine, _BeamStop

    rng = random.Random(3)
    ids = tokenizer.encode("Hello, world. The 🎉 party — naïve café! The end.\nThe other the.")
    eos = tuple(tokenizer.eos_token_ids)
    fake = types.SimpleNamespace(tokenizer=tokenizer, eos_token_ids=eos)
    for trial in range(40):
        tokens = [rng.choice(ids + [eos[0]]) for _ in range(rng.randint(1, 24))]
        p = SamplingParams(use_beam_search=True, best_of=2, max_tokens=32, min_tokens=rng.choice([0, 3]),
                           stop=rng.choice([(" the",), ("\n", "é"), (".",)]), ignore_eos=rng.random() < 0.3,
                           include_stop_str_in_output=rng.random() < 0.5)
        req = types.SimpleNamespace(params=p)
        state = _BeamStop.fresh(tokenizer, p)
        for n in range(1, len(tokens) + 1):
            state = state.extended(tokens[n - 1], p, eos)
            assert state.stopped() == Engine._beam_text(fake, req, tokens[:n])[1], (trial, n, tokens[:n], p.stop)
