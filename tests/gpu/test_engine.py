"""The engine against Hugging Face transformers: greedy output is token-identical.

Every scenario feeds the same prompt token ids to both and compares the greedy
continuations (EOS ignored, so lengths are fixed): alone, inside a continuous
batch with staggered arrivals and early finishers, with chunked prefill, with
prefix-cache hits, and after preemption + recompute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch

from gpu.config import CacheConfig, EngineConfig, SchedulerConfig
from gpu.engine import Engine, RequestRejected, cpu_has_native_bf16, generate, resolve_dtype
from gpu.loader import load_checkpoint
from gpu.sampling import SamplingParams, SamplingParamsError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]

NEW_TOKENS = 20
SYSTEM = "You are a meticulous assistant. Answer briefly and precisely, in plain English."
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain what a hash table is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Name a famous physicist and one discovery.",
    "Give me a synonym for 'happy'.",
    "Summarize the plot of Romeo and Juliet in two sentences, focusing on the feud between the families.",
]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            )
        )
        for q in QUESTIONS
    ]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation with transformers' own KV cache (the reference)."""
    out: list[int] = []
    with torch.inference_mode():
        res = model(torch.tensor([ids]), use_cache=True)
        past = res.past_key_values
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
    return out


@pytest.fixture(scope="module")
def expected(hf_reference, prompts) -> list[list[int]]:
    return [hf_greedy(hf_reference, p, NEW_TOKENS) for p in prompts]


def make_engine(ckpt, tokenizer, **sched) -> Engine:
    cache = sched.pop("cache", CacheConfig(cache_bytes=64 * 1024**2))
    cfg = EngineConfig(dtype="float32", cache=cache, scheduler=replace(SchedulerConfig(), **sched))
    return Engine(cfg, checkpoint=ckpt, tokenizer=tokenizer)


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def test_auto_dtype_is_bfloat16_where_the_hardware_has_native_bf16():
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("auto", "cpu", native_bf16=True) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", native_bf16=False) == torch.float32
    # a named dtype is taken as given, whatever the hardware
    assert resolve_dtype("float32", "cpu", native_bf16=True) == torch.float32
    assert resolve_dtype("bf16", "cpu", native_bf16=False) == torch.bfloat16
    assert resolve_dtype("fp16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")


def test_native_bf16_probe_agrees_with_the_cpu_flags():
    """The probe is torch's; the kernel's own view of the CPU is /proc/cpuinfo's flags."""
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split("\n\n", 1)[0].split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    expected = torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else torch.float32
    assert resolve_dtype("auto", "cpu") == expected


def test_greedy_alone_matches_transformers(ckpt, tokenizer, prompts, expected):
    engine = make_engine(ckpt, tokenizer)
    for p, want in zip(prompts, expected, strict=True):
        [[out]] = generate(engine, [p], greedy())
        assert out.token_ids == want
        assert out.finish_reason == "length"
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_continuous_batch_with_staggered_arrivals(ckpt, tokenizer, prompts, expected):
    """Requests join while others decode and leave at different lengths."""
    engine = make_engine(ckpt, tokenizer, max_num_batched_tokens=256)
    lengths = [NEW_TOKENS - (i % 4) * 4 for i in range(len(prompts))]
    got: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    max_running = 0
    while pending or engine.has_unfinished():
        if pending and step % 3 == 0:  # a new arrival every third step
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, greedy(lengths[i]))
        for d in engine.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
        max_running = max(max_running, engine.scheduler.num_running)
        step += 1
    assert max_running >= 3, "the batch never held several requests at once"
    for i in range(len(prompts)):
        assert got[f"r{i}"] == expected[i][: lengths[i]], f"request {i} diverged"
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_chunked_prefill(ckpt, tokenizer, prompts, expected):
    engine = make_engine(ckpt, tokenizer, max_num_batched_tokens=16)
    outs = generate(engine, prompts, greedy())
    for [o], want in zip(outs, expected, strict=True):
        assert o.token_ids == want
    # every prompt is longer than the budget, so each was split over several steps
    assert min(len(p) for p in prompts) > 16


def test_prefix_cache_hits(ckpt, tokenizer, prompts, expected):
    engine = make_engine(ckpt, tokenizer)
    generate(engine, prompts[:1], greedy())
    before = engine.counters["prefix_hit_tokens"]
    outs = generate(engine, prompts, greedy())
    hits = engine.counters["prefix_hit_tokens"] - before
    # the shared system prompt spans at least one full block for every later prompt
    assert hits >= engine.config.cache.block_size * len(prompts)
    for [o], want in zip(outs, expected, strict=True):
        assert o.token_ids == want


def test_each_request_says_how_many_prompt_tokens_came_from_the_prefix_cache(ckpt, tokenizer, prompts):
    """`StepDelta.cached_prompt_tokens`: the prompt tokens a request's first step found in
    the prefix cache (whole blocks), on every delta, for each of its `n` choices alike."""
    engine = make_engine(ckpt, tokenizer)

    def cached_of(rid: str, prompt, params) -> set[int]:
        engine.add_request(rid, prompt, params)
        seen = set()
        while engine.has_unfinished():
            seen |= {d.cached_prompt_tokens for d in engine.step() if d.request_id == rid}
        return seen

    assert cached_of("first", prompts[0], greedy()) == {0}
    [hit] = cached_of("again", prompts[1], SamplingParams(n=2, temperature=0.7, seed=1, max_tokens=NEW_TOKENS,
                                                          ignore_eos=True))
    bs = engine.config.cache.block_size
    assert hit >= bs and hit % bs == 0 and hit < len(prompts[1])
    before = engine.counters["prefix_hit_tokens"]
    assert cached_of("third", prompts[1], greedy()) == {engine.counters["prefix_hit_tokens"] - before}
    # a beam search too (it said 0 whatever the cache gave it)
    before = engine.counters["prefix_hit_tokens"]
    [beam_hit] = cached_of("beams", prompts[1], SamplingParams(use_beam_search=True, best_of=2, max_tokens=4))
    assert beam_hit == engine.counters["prefix_hit_tokens"] - before >= bs


def test_preemption_and_recompute(ckpt, tokenizer, prompts, expected):
    """A cache too small for all requests at once: some are preempted, none fails or diverges."""
    per_block = CacheConfig(block_size=16).bytes_per_block(ckpt.config, 4)
    need = max(len(p) for p in prompts) + NEW_TOKENS
    blocks = (need // 16 + 1) * 3  # room for about three requests
    engine = make_engine(ckpt, tokenizer, cache=CacheConfig(block_size=16, cache_bytes=per_block * blocks,
                                                            enable_prefix_caching=False))
    outs = generate(engine, prompts, greedy())
    assert engine.counters["preemptions"] > 0
    for [o], want in zip(outs, expected, strict=True):
        assert o.token_ids == want
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_abort_frees_blocks_at_once(ckpt, tokenizer, prompts):
    engine = make_engine(ckpt, tokenizer)
    engine.add_request("a", prompts[0], greedy())
    engine.add_request("b", prompts[1], greedy())
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.num_blocks
    assert engine.abort("a") and engine.abort("b")
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    assert not engine.has_unfinished()
    assert engine.step() == []


def test_a_request_whose_logits_are_not_finite_fails_alone(ckpt, tokenizer, prompts, expected):
    """Logits of NaN (a broken adapter, an overflow) sampled the last id of the vocabulary
    to the cap, answered as a success with NaN logprobs (an audit). Now that request's
    choice ends with "error" and a `fault`, its token unshown; the batch goes on."""
    engine = make_engine(ckpt, tokenizer)
    execute = engine.runner.execute
    calls = {"n": 0}

    def poisoned(plan, adapters):  # noqa: ANN001
        out = execute(plan, adapters)
        calls["n"] += 1
        if calls["n"] == 3:
            logits = out.logits.clone()
            for row, sid in enumerate(out.seq_ids):
                if engine.owner_of(sid) == "bad":
                    logits[row] = float("nan")
            out = dataclasses.replace(out, logits=logits)
        return out

    engine.runner.execute = poisoned
    engine.add_request("bad", prompts[0], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=1))
    engine.add_request("good", prompts[1], greedy())
    outs = deltas_until_done(engine)
    last = outs["bad"][-1]
    assert (last.finish_reason, last.fault, last.token_ids) == ("error", True, ())
    assert "not a number" in last.error and len(outs["bad"]) == 3
    assert all(lp == lp for d in outs["bad"] for lp in d.logprobs or ())  # (no NaN reached a delta)
    assert [t for d in outs["good"] for t in d.token_ids] == expected[1]
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def deltas_until_done(engine: Engine) -> dict[str, list]:
    """Step `engine` until nothing is left: each request's deltas, by request id."""
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for d in engine.step():
            outs.setdefault(d.request_id, []).append(d)
    return outs


def test_a_beam_search_or_scoring_request_whose_model_output_is_not_finite_fails_alone(
        ckpt, tokenizer, prompts, expected):
    """A beam search scored its beams from NaN logits and a scoring request answered NaN
    prompt logprobs (and cached them), both as successes (a review). Each fails alone."""
    engine = make_engine(ckpt, tokenizer)
    execute = engine.runner.execute

    def poisoned(plan, adapters):  # noqa: ANN001
        out = execute(plan, adapters)
        logits = out.logits.clone()
        for row, sid in enumerate(out.seq_ids):
            if engine.owner_of(sid) == "beams":
                logits[row] = float("nan")
        scored = {sid: dataclasses.replace(c, logprobs=[float("nan")] * len(c.logprobs))
                  if engine.owner_of(sid) == "score" else c for sid, c in out.prompt_logprobs.items()}
        return dataclasses.replace(out, logits=logits, prompt_logprobs=scored)

    engine.runner.execute = poisoned
    engine.add_request("beams", prompts[0], SamplingParams(use_beam_search=True, best_of=2, max_tokens=4))
    engine.add_request("score", prompts[2], SamplingParams(max_tokens=0, prompt_logprobs=1))
    engine.add_request("good", prompts[1], greedy())
    outs = deltas_until_done(engine)
    for rid in ("beams", "score"):
        [last] = outs[rid]
        assert (last.finish_reason, last.fault, last.request_finished) == ("error", True, True), rid
        assert "not a number" in last.error
    assert [t for d in outs["good"] for t in d.token_ids] == expected[1]
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    engine.runner.execute = execute  # nothing of it was kept: scored afresh, finite
    engine.add_request("score2", prompts[2], SamplingParams(max_tokens=0, prompt_logprobs=1))
    done = [d for _ in range(50) if engine.has_unfinished() for d in engine.step()]
    assert done[-1].finish_reason == "length" and not done[-1].fault
    assert all(lp is None or lp == lp for lp, _, _ in done[-1].prompt_logprobs)


def test_a_request_whose_output_cannot_be_processed_fails_alone(ckpt, tokenizer, prompts, expected):
    """Detokenizing (or a stop string, a matcher) raising for one request's token failed
    the whole step, every request in it (an audit); now that choice alone ends "error"."""
    engine = make_engine(ckpt, tokenizer)
    emit = engine._emit
    seen = {"bad": 0}

    def fragile(req, choice, tok, lp, top, fault=False):  # noqa: ANN001
        if req.request_id == "bad":
            seen["bad"] += 1
            if seen["bad"] == 2:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        return emit(req, choice, tok, lp, top, fault)

    engine._emit = fragile
    engine.add_request("bad", prompts[0], greedy())
    engine.add_request("good", prompts[1], greedy())
    outs = deltas_until_done(engine)
    last = outs["bad"][-1]
    assert (last.finish_reason, last.fault, last.request_finished) == ("error", True, True)
    assert "UnicodeDecodeError" in last.error and len(outs["bad"]) == 2
    assert [t for d in outs["good"] for t in d.token_ids] == expected[1]
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_request_that_can_never_fit_is_rejected(ckpt, tokenizer):
    engine = make_engine(ckpt, tokenizer, max_model_len=64)
    with pytest.raises(RequestRejected, match="context window"):
        engine.add_request("long", list(range(100)), greedy())
    with pytest.raises(RequestRejected, match="exceeds"):
        engine.add_request("long2", list(range(60)), greedy(10))
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(temperature=-1)
    assert e.value.field == "temperature"


def test_stop_string_and_eos(ckpt, tokenizer, prompts):
    engine = make_engine(ckpt, tokenizer)
    [[free]] = generate(engine, [prompts[0]], SamplingParams(temperature=0, max_tokens=40))
    assert free.finish_reason == "stop"  # "The capital of France is Paris." then <|im_end|>
    assert "Paris" in free.text and "<|im_end|>" not in free.text
    [[cut]] = generate(engine, [prompts[0]], SamplingParams(temperature=0, max_tokens=40, stop=("Paris",)))
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index("Paris")]


def test_a_stop_string_in_a_character_cut_short_at_max_tokens_ends_with_stop(ckpt, tokenizer):
    """At max_tokens, a character cut short is written as U+FFFD; a stop string matched in
    it cuts the text there, and the choice reports "stop" (it said "length", the text cut)."""
    engine = make_engine(ckpt, tokenizer)
    prompt = tokenizer.encode("List some emoji: \U0001F600")
    [[free]] = generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=24))
    cut = next(n for n in range(1, 25) if tokenizer.decode(free.token_ids[:n]).endswith("\ufffd"))
    [[plain]] = generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=cut))
    assert plain.finish_reason == "length" and plain.text.endswith("\ufffd")
    [[stopped]] = generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=cut, stop=("\ufffd",)))
    assert (stopped.finish_reason, stopped.text) == ("stop", plain.text[: plain.text.index("\ufffd")])


def test_seeded_sampling_is_batch_independent_and_n_choices(ckpt, tokenizer, prompts):
    engine = make_engine(ckpt, tokenizer)
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    [[alone]] = generate(engine, [prompts[2]], p)
    mixed = generate(engine, [prompts[0], prompts[2], prompts[5]],
                     [SamplingParams(temperature=1.0, max_tokens=8), p, greedy(5)])
    assert mixed[1][0].token_ids == alone.token_ids
    choices = generate(engine, [prompts[2]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10,
                                                             ignore_eos=True))[0]
    assert [c.index for c in choices] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 for c in choices)
    assert len({tuple(c.token_ids) for c in choices}) > 1
    again = generate(engine, [prompts[2]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10,
                                                           ignore_eos=True))[0]
    assert [c.token_ids for c in again] == [c.token_ids for c in choices]
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_n_choices_of_one_token_each(ckpt, tokenizer, prompts):
    # the forked choices end on their first token: they used to be refused by the step
    # scheduler ("already has max_tokens outputs"), which failed the whole step
    engine = make_engine(ckpt, tokenizer)
    out = generate(engine, [prompts[0], prompts[2]],
                   [greedy(6), SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=1)])
    assert len(out[0][0].token_ids) == 6
    assert [(c.index, len(c.token_ids), c.finish_reason) for c in out[1]] == [(i, 1, "length") for i in range(3)]
    assert engine.block_manager.num_free_blocks == engine.num_blocks and not engine.has_unfinished()


def test_forked_choices_and_beams_keep_their_requests_priority(ckpt, tokenizer, prompts):
    engine = make_engine(ckpt, tokenizer)
    engine.add_request("n", prompts[0], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4), priority=5)
    engine.add_request("b", prompts[1], SamplingParams(use_beam_search=True, n=3, max_tokens=4), priority=7)
    engine.step()  # both prefills: the n=3 request forks its choices, the beam search its beams
    seqs = {sid: engine.scheduler.get(sid) for sid in ("n#1", "n#2", "b#b1", "b#b2")}
    assert {sid: r.priority for sid, r in seqs.items() if r is not None} == {
        "n#1": 5, "n#2": 5, "b#b1": 7, "b#b2": 7}
    # and each names its request (the overload estimate's running requests: a review)
    assert {sid: engine.owner_of(sid) for sid in seqs} == {"n#1": "n", "n#2": "n", "b#b1": "b", "b#b2": "b"}
    while engine.has_unfinished():
        engine.step()


def test_min_tokens_holds_off_stop_strings_too(ckpt, tokenizer):
    engine = make_engine(ckpt, tokenizer)
    prompt = tokenizer.encode("The capital of France is")
    [[free]] = generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=30, stop=["."]))
    [[held]] = generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=30, stop=["."], min_tokens=10))
    assert free.finish_reason == "stop" and len(free.token_ids) < 10
    assert len(held.token_ids) >= 10
    [[plain]] = generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=len(held.token_ids)))
    assert held.token_ids == plain.token_ids[:len(held.token_ids)]  # greedy: the same text, only longer
    assert "." in held.text and plain.text.startswith(held.text)  # the early "." did not stop it


def test_logprobs(ckpt, tokenizer, prompts):
    engine = make_engine(ckpt, tokenizer)
    [[o]] = generate(engine, [prompts[0]], SamplingParams(temperature=0, max_tokens=4, logprobs=3))
    assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids)
    assert all(lp <= 0 for lp in o.logprobs)


def test_the_first_engine_of_a_process_is_freed_when_dropped():
    """A dropped Engine is freed by reference counting alone, the process's first included.

    Run in a fresh interpreter: what pinned it was torch's lazy import of torch._dynamo
    under the first model's construction (a kept frame whose callers held the engine), which
    happens once per process. Its weights and KV cache must not outlive it."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import gc, weakref
        gc.disable()  # no cycle collection: only reference counting may free it
        from gpu.config import CacheConfig, EngineConfig
        from gpu.engine import Engine
        engine = Engine(EngineConfig(dtype="float32", num_threads=1, cache=CacheConfig(cache_bytes=8 * 1024**2)))
        ref = weakref.ref(engine)
        del engine
        print("alive" if ref() is not None else "freed")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "freed", out.stderr[-2000:]


def test_batch_invariant_engine_gives_a_request_the_same_tokens_whatever_the_load(ckpt, tokenizer, prompts):
    """`batch_invariant=True`: a greedy and a seeded request get the tokens they get alone when
    36 requests share the steps (more than 32 rows a GEMM, where oneDNN's bf16 kernel on an
    AMX CPU changes), when a 37-token budget chunks the prompts (1-token chunks and prefix
    hits included), and when a small cache preempts and recomputes them."""
    dtype = "auto"  # bf16 where the CPU has it: the dtype whose kernels depend on the row count
    many = [p + tokenizer.encode(f" (variant {i})") for i in range(4) for p in prompts]  # 36 prompts
    params = [greedy(24)] * len(many)
    params[5] = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=24, ignore_eos=True)
    ckpt_dt = load_checkpoint("smollm2", resolve_dtype(dtype, "cpu"))

    def engine(**kw) -> Engine:
        cache = kw.pop("cache", CacheConfig(cache_bytes=64 * 1024**2))
        cfg = EngineConfig(dtype=dtype, batch_invariant=True, cache=cache,
                           scheduler=replace(SchedulerConfig(), **kw))
        return Engine(cfg, checkpoint=ckpt_dt, tokenizer=tokenizer)

    def run(eng: Engine, idx: list[int]) -> list[list[int]]:
        return [o.token_ids for [o] in generate(eng, [many[i] for i in idx], [params[i] for i in idx])]

    solo_engine = engine()
    watched = [0, 5, 8, 17, 35]
    alone = [run(solo_engine, [i])[0] for i in watched]
    everything = list(range(len(many)))
    batched = run(engine(), everything)
    chunked = run(engine(max_num_batched_tokens=37), everything)
    dtype_bytes = torch.tensor([], dtype=resolve_dtype(dtype, "cpu")).element_size()
    per_block = CacheConfig(block_size=16).bytes_per_block(ckpt.config, dtype_bytes)
    need = max(len(p) for p in many) + 24
    small = engine(cache=CacheConfig(block_size=16, cache_bytes=per_block * (need // 16 + 1) * 3,
                                     enable_prefix_caching=False))  # room for about three requests
    preempted = run(small, everything)
    assert small.counters["preemptions"] > 0
    assert small.block_manager.num_free_blocks == small.num_blocks
    for k, i in enumerate(watched):
        assert batched[i] == alone[k], f"request {i} changed in a batch of {len(many)}"
        assert chunked[i] == alone[k], f"request {i} changed under chunked prefill"
        assert preempted[i] == alone[k], f"request {i} changed after preemption"
    assert chunked == batched == preempted
