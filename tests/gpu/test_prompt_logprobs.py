"""Prompt logprobs (`SamplingParams.prompt_logprobs`) and prefill-only requests (max_tokens 0)
against Hugging Face transformers: the logprob of every prompt token given the ones before
it, and the top alternatives there, whatever the chunking, batching, prefix cache and
preemption do."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gpu.config import CacheConfig, EngineConfig, SchedulerConfig
from gpu.engine import Engine, RequestRejected, generate
from gpu.sampling import SamplingParams, SamplingParamsError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny afternoon in the small village by the river, "
    "and the children were playing near the old stone bridge while their parents talked about the harvest, "
    "the weather, and the long winter that everyone expected to come.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
]
K = 3


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def reference(hf_reference, prompts):
    """Per prompt: (logprob of token i given tokens < i, top-K ids there, the bounds of the
    token's rank there given a 2e-4 tolerance on every logprob) for i >= 1."""
    out = []
    with torch.inference_mode():
        for ids in prompts:
            lp = hf_reference(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
            chosen = lp.gather(1, torch.tensor(ids[1:])[:, None]).flatten()
            lowest = (lp > chosen[:, None] + 2e-4).sum(1) + 1
            highest = (lp >= chosen[:, None] - 2e-4).sum(1)
            out.append((chosen, lp.topk(K, dim=-1), (lowest, highest)))
    return out


def make_engine(ckpt, tokenizer, cache: CacheConfig | None = None, **sched) -> Engine:
    cfg = EngineConfig(dtype="float32", cache=cache or CacheConfig(cache_bytes=64 * 1024**2),
                       scheduler=replace(SchedulerConfig(), **sched))
    return Engine(cfg, checkpoint=ckpt, tokenizer=tokenizer)


def scoring(max_tokens: int = 0, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=K, **kw)


def check(got, ref, ids) -> None:
    chosen, (top_vals, top_ids), (lowest, highest) = ref
    assert len(got) == len(ids)
    assert got[0] == (None, (), None)
    lps = torch.tensor([lp for lp, *_ in got[1:]])
    torch.testing.assert_close(lps, chosen, atol=2e-4, rtol=0)
    ranks = torch.tensor([rank for *_, rank in got[1:]])
    assert bool(((lowest <= ranks) & (ranks <= highest)).all()), (ranks, lowest, highest)
    assert int(lowest.max()) > K  # some prompt token lies outside the top K: its rank is counted
    for i, (_, top, _) in enumerate(got[1:]):
        assert len(top) == K
        assert [t for t, _ in top] == top_ids[i].tolist() or torch.allclose(  # a near-tie may swap
            torch.tensor([v for _, v in top]), top_vals[i], atol=2e-4)
        torch.testing.assert_close(torch.tensor([v for _, v in top]), top_vals[i], atol=2e-4, rtol=0)


def test_prompt_logprobs_match_transformers_in_a_chunked_batch_with_prefix_hits_around(
        ckpt, tokenizer, prompts, reference):
    engine = make_engine(ckpt, tokenizer, max_num_batched_tokens=16)  # every prompt is chunked
    generate(engine, prompts, SamplingParams(temperature=0.0, max_tokens=2))  # their blocks are now cached
    hits = engine.counters["prefix_hit_tokens"]
    outs = generate(engine, prompts, [scoring(), scoring(max_tokens=3), scoring()])
    # a scoring request takes no prefix hits: every position must run
    assert engine.counters["prefix_hit_tokens"] == hits
    for [o], ids, ref in zip(outs, prompts, reference, strict=True):
        check(o.prompt_logprobs, ref, ids)
    assert [o.token_ids for [o] in outs] == [[], outs[1][0].token_ids, []]
    assert len(outs[1][0].token_ids) == 3
    assert [o.finish_reason for [o] in outs] == ["length"] * 3
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_generation_after_prompt_logprobs_is_unchanged(ckpt, tokenizer, prompts):
    engine = make_engine(ckpt, tokenizer)
    plain = generate(engine, prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    scored = generate(engine, prompts, scoring(max_tokens=8, ignore_eos=True, n=2))
    for [p], choices in zip(plain, scored, strict=True):
        assert [c.token_ids for c in choices] == [p.token_ids, p.token_ids]  # greedy: n copies
        assert choices[0].prompt_logprobs == choices[1].prompt_logprobs is not None


def test_prefill_only_with_n_choices_returns_n_empty_choices(ckpt, tokenizer, prompts, reference):
    engine = make_engine(ckpt, tokenizer)
    [choices] = generate(engine, prompts[:1], scoring(n=3))
    assert [(c.index, c.token_ids, c.text, c.finish_reason) for c in choices] == [
        (i, [], "", "length") for i in range(3)]
    for c in choices:
        check(c.prompt_logprobs, reference[0], prompts[0])
    # and without prompt logprobs: a pure prefill (it warms the prefix cache)
    [[warm]] = generate(engine, prompts[1:2], SamplingParams(max_tokens=0))
    assert warm.token_ids == [] and warm.prompt_logprobs is None and warm.finish_reason == "length"
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_preempted_scoring_requests_still_match(ckpt, tokenizer, prompts, reference):
    per_block = CacheConfig(block_size=16).bytes_per_block(ckpt.config, 4)
    blocks = (max(map(len, prompts)) + 40) // 16 + 2  # about one request at a time
    engine = make_engine(ckpt, tokenizer, cache=CacheConfig(block_size=16, cache_bytes=per_block * blocks),
                         max_num_batched_tokens=8)
    outs = generate(engine, prompts, scoring(max_tokens=40, ignore_eos=True))
    assert engine.counters["preemptions"] > 0
    for [o], ids, ref in zip(outs, prompts, reference, strict=True):
        check(o.prompt_logprobs, ref, ids)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_a_prompt_only_scored_may_fill_the_context_window(ckpt, tokenizer, prompts, reference):
    """lm-evaluation-harness cuts contexts to exactly the window: with max_tokens 0 nothing
    is generated, so a prompt of max_model_len tokens fits; generating still needs room."""
    ids = prompts[0]
    engine = make_engine(ckpt, tokenizer, max_model_len=len(ids), max_num_batched_tokens=16)
    [[o]] = generate(engine, [ids], scoring())
    check(o.prompt_logprobs, reference[0], ids)
    [[warm]] = generate(engine, [ids], SamplingParams(max_tokens=0))
    assert warm.token_ids == [] and warm.finish_reason == "length"
    for params in (SamplingParams(max_tokens=1), scoring(max_tokens=1), SamplingParams()):
        with pytest.raises(RequestRejected, match="context window"):
            engine.add_request("gen", ids, params)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_one_token_prompt_has_nothing_to_score(ckpt, tokenizer):
    engine = make_engine(ckpt, tokenizer)
    [[o]] = generate(engine, [[1]], scoring())
    assert o.prompt_logprobs == [(None, (), None)] and o.token_ids == []


def test_prompt_logprobs_params_are_validated():
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(prompt_logprobs=21)
    assert e.value.field == "prompt_logprobs"
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(max_tokens=-1)
    assert e.value.field == "max_tokens"
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(use_beam_search=True, max_tokens=0, temperature=0.0)
    assert e.value.field == "max_tokens"


def test_beam_search_returns_the_prompt_logprobs_with_every_hypothesis(ckpt, tokenizer, prompts, reference):
    engine = make_engine(ckpt, tokenizer)
    [hyps] = generate(engine, prompts[1:2], SamplingParams(use_beam_search=True, n=2, best_of=3, max_tokens=4,
                                                           prompt_logprobs=K))
    assert len(hyps) == 2
    for h in hyps:
        check(h.prompt_logprobs, reference[1], prompts[1])
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_scoring_requests_sharing_a_context_take_its_blocks_from_the_caches(ckpt, tokenizer, prompts, reference):
    """The second request with the same long prefix takes all but one of its blocks as
    prefix hits, their logprobs from the prompt-logprob cache, and matches transformers."""
    engine = make_engine(ckpt, tokenizer)
    bs = engine.block_manager.block_size
    ids = prompts[0]
    assert len(ids) >= 2 * bs
    [[first]] = generate(engine, [ids], scoring())
    assert len(engine.prompt_lp_cache) == len(ids) // bs
    hits = engine.counters["prefix_hit_tokens"]
    fed = engine.counters["prefill_tokens_fed"]
    [[second]] = generate(engine, [ids], scoring())
    assert engine.counters["prefix_hit_tokens"] - hits == (len(ids) // bs - 1) * bs
    assert engine.counters["prefill_tokens_fed"] - fed == len(ids) - (len(ids) // bs - 1) * bs
    assert second.prompt_logprobs == first.prompt_logprobs
    check(second.prompt_logprobs, reference[0], ids)
    # more alternatives than cached: the cache cannot answer, every position runs again
    fed = engine.counters["prefill_tokens_fed"]
    [[wider]] = generate(engine, [ids], SamplingParams(max_tokens=0, prompt_logprobs=K + 2))
    assert engine.counters["prefill_tokens_fed"] - fed == len(ids)
    assert [lp for lp, *_ in wider.prompt_logprobs] == pytest.approx([lp for lp, *_ in first.prompt_logprobs])
    assert [rank for *_, rank in wider.prompt_logprobs] == [rank for *_, rank in first.prompt_logprobs]
    # an answer after a shared context (lm-evaluation-harness's multiple choice): only the
    # answer and one block of the context run
    context = ids[: 2 * bs + 3]
    generate(engine, [context + tokenizer.encode(" first answer")], scoring())
    fed = engine.counters["prefill_tokens_fed"]
    answer = tokenizer.encode(" another answer entirely")
    [[o]] = generate(engine, [context + answer], scoring())
    assert engine.counters["prefill_tokens_fed"] - fed == len(context) + len(answer) - bs
    got = [lp for lp, *_ in o.prompt_logprobs[: len(context)]]
    assert got == pytest.approx([lp for lp, *_ in first.prompt_logprobs[: len(context)]], abs=1e-4)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_the_prompt_logprob_cache_is_keyed_by_prefix_namespace_and_alternatives():
    from gpu.prompt_logprobs import PromptLogprobCache

    cache = PromptLogprobCache(block_size=2, max_blocks=3)
    toks = [5, 6, 7, 8, 9]
    entries = [(None, (), None), (-1.0, ((6, -1.0), (1, -2.0)), 1), (-2.0, ((7, -2.0), (2, -3.0)), 1),
               (-3.0, ((1, -1.5), (8, -3.0)), 2), (-4.0, ((9, -4.0), (3, -5.0)), 1)]
    cache.store(toks, None, 2, entries)
    assert len(cache) == 2  # full blocks only
    # tops cut to the k asked for; the rank is the token's whatever k is
    assert cache.lookup(toks, None, 1) == [(lp, top[:1], rank) for lp, top, rank in entries[:4]]
    assert cache.lookup(toks, None, 3) == []  # stored with 2 alternatives
    assert cache.lookup(toks, "adapter@1", 1) == []  # another namespace's logprobs differ
    assert cache.lookup([5, 6, 0, 8], None, 2) == entries[:2]  # only the leading run that matches
    cache.store([1, 2, 3, 4, 5, 6], None, 1, [(None, (), None)] + [(-1.0, (), 1)] * 5)
    assert len(cache) == 3  # bounded: the least recently used block went


def test_scoring_requests_sent_together_wait_for_the_one_that_computes_their_shared_context(
        ckpt, tokenizer, prompts):
    """lm-evaluation-harness's multiple choice in one batch: the answers after the first
    are held back until the first has its context's logprobs, then take it from the caches."""
    engine = make_engine(ckpt, tokenizer)
    bs = engine.block_manager.block_size
    context = prompts[0][: 3 * bs + 5]
    answers = [tokenizer.encode(a) for a in (" yes", " no, not at all", " maybe", " certainly")]
    batch = [context + a for a in answers]
    cold = make_engine(ckpt, tokenizer, cache=CacheConfig(cache_bytes=64 * 1024**2, enable_prefix_caching=False))
    alone = [generate(cold, [p], scoring())[0][0] for p in batch[:2]]  # every position computed
    del cold
    fed = engine.counters["prefill_tokens_fed"]
    outs = generate(engine, batch, scoring())
    # the first runs all of it; each other one its answer and the last shared block
    assert engine.counters["prefill_tokens_fed"] - fed == len(batch[0]) + sum(
        len(p) - 2 * bs for p in batch[1:])
    for [o], ref in zip(outs[:2], alone, strict=True):
        assert [lp for lp, *_ in o.prompt_logprobs] == pytest.approx([lp for lp, *_ in ref.prompt_logprobs], abs=1e-4)
    assert not engine._staged and not engine._scoring_blocks
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_aborting_the_request_others_wait_on_schedules_them(ckpt, tokenizer, prompts):
    engine = make_engine(ckpt, tokenizer)
    bs = engine.block_manager.block_size
    context = prompts[0][: 3 * bs]
    engine.add_request("first", context + [11], scoring())
    engine.add_request("second", context + [12], scoring())
    assert engine.scheduler.get("second") is None  # held back behind "first"
    engine.abort("first")
    assert engine.scheduler.get("second") is not None
    engine.add_request("third", context + [13], scoring())  # stages on "second" now
    engine.abort("third")  # a held-back request aborts cleanly
    out = []
    while engine.has_unfinished():
        out += engine.step()
    assert [d.request_id for d in out] == ["second"]
    assert not engine._staged and not engine._scoring_blocks
    assert engine.block_manager.num_free_blocks == engine.num_blocks
