"""StepScheduler driven by hand-made "model outputs" (no model).

`ShadowEngine` plays the engine: it applies the plan's copies, writes each new
token into a shadow KV cache at the slots the plan's block tables name, and then
reads the whole context of every scheduled sequence back. Any stale block table,
missing copy, shared block written, or wrong prefix hit shows up as a mismatch.
"""

from __future__ import annotations

import random

import pytest

from actors.step_scheduler import RequestRejected, SchedRequest, StepPlan, StepScheduler
from gpu.block_manager import BlockManager
from gpu.config import SchedulerConfig

BS = 4


def make_scheduler(num_blocks=64, *, prefix=True, **cfg) -> StepScheduler:
    return StepScheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, BS, prefix))


def request(rid: str, prompt, max_tokens=4, priority=0) -> SchedRequest:
    prompt = list(range(100, 100 + prompt)) if isinstance(prompt, int) else list(prompt)
    return SchedRequest(rid, prompt, max_tokens, priority=priority)


def token_for(rid: str, index: int) -> int:
    """The "model output": deterministic per request and output index."""
    return sum(map(ord, rid)) * 7 + index


class ShadowEngine:
    def __init__(self, sched: StepScheduler):
        self.sched = sched
        self.kv: dict[int, list[int | None]] = {}
        self.plans: list[StepPlan] = []

    def step(self) -> StepPlan:
        sched = self.sched
        plan = sched.schedule()
        self.plans.append(plan)
        for src, dst in plan.copies:
            self.kv[dst] = list(self.kv.get(src, [None] * BS))
        for seq in plan.seqs:
            for i, tok in enumerate(seq.token_ids):
                p = seq.start_pos + i
                self.kv.setdefault(seq.block_table[p // BS], [None] * BS)[p % BS] = tok
        for seq in plan.seqs:  # after all writes: nobody overwrote anybody's context
            req = sched.get(seq.request_id)
            end = seq.start_pos + len(seq.token_ids)
            context = [self.kv[seq.block_table[p // BS]][p % BS] for p in range(end)]
            assert context == req.all_token_ids[:end], f"{seq.request_id}: wrong KV context"
            assert seq.sample == (end == req.num_tokens)
        sampled = {
            s.request_id: token_for(s.request_id, len(sched.get(s.request_id).output_token_ids))
            for s in plan.seqs
            if s.sample
        }
        sched.update(plan, sampled)
        return plan

    def finish_done(self) -> dict[str, SchedRequest]:
        """Finish the requests of the last step that reached max_tokens."""
        done = {}
        for seq in self.plans[-1].seqs:
            req = self.sched.get(seq.request_id)
            if req is not None and len(req.output_token_ids) == req.max_tokens:
                done[seq.request_id] = req
                self.sched.finish(seq.request_id)
        return done


def chunk_lens(plan: StepPlan) -> dict[str, int]:
    return {s.request_id: len(s.token_ids) for s in plan.seqs}


def finish_order(eng: ShadowEngine) -> list[str]:
    """Step until every request is done; the order they finished in (the first first, the
    rest sorted), after checking every KV block came back."""
    order: list[str] = []
    while eng.sched.has_unfinished:
        eng.step()
        order += list(eng.finish_done())
    assert eng.sched.kv_usage == 0.0
    return order[:1] + sorted(order[1:])


# ------------------------------------------------------------------ basic steps
def test_chunked_prefill_splits_prompt_under_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add(request("a", 20, max_tokens=2))
    eng = ShadowEngine(sched)
    plans = [eng.step() for _ in range(3)]
    assert [chunk_lens(p) for p in plans] == [{"a": 8}, {"a": 8}, {"a": 4}]
    assert [p.seqs[0].start_pos for p in plans] == [0, 8, 16]
    assert [p.seqs[0].sample for p in plans] == [False, False, True]
    assert len(sched.get("a").output_token_ids) == 1
    assert chunk_lens(eng.step()) == {"a": 1}  # then decode


def test_a_prompt_row_with_logprobs_costs_twice_a_plain_one_of_the_steps_budget():
    """A prefill step with prompt logprobs took 1.4 s against 0.8 s without (vocabulary-wide
    logits per row), and every other stream waited as long (an audit): such rows count as
    `PROMPT_LOGPROB_ROW_COST` tokens of the budget; the rest of the step fills as before."""
    from actors.step_scheduler import PROMPT_LOGPROB_ROW_COST

    assert PROMPT_LOGPROB_ROW_COST == 2
    sched = make_scheduler(max_num_batched_tokens=16)
    scored = request("s", 20, max_tokens=1)
    scored.prompt_logprobs = 1
    sched.add(scored)
    sched.add(request("p", range(300, 320), max_tokens=2))  # (another prompt: no prefix hits)
    eng = ShadowEngine(sched)
    # 8 rows with targets are the whole budget; the last chunk's 3 such rows and its final
    # row (no next prompt token to score) cost 7, and the plain prompt takes the other 9
    assert [chunk_lens(eng.step()) for _ in range(3)] == [{"s": 8}, {"s": 8}, {"s": 4, "p": 9}]
    plain = make_scheduler(max_num_batched_tokens=16)
    plain.add(request("s", 20, max_tokens=1))
    assert chunk_lens(ShadowEngine(plain).step()) == {"s": 16}


def test_output_tokens_counts_what_a_held_request_generated_and_none_for_others():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add(request("a", 6, max_tokens=4))
    eng = ShadowEngine(sched)
    assert sched.output_tokens("a") == 0
    eng.step()
    eng.step()
    assert sched.output_tokens("a") == 2 == len(sched.get("a").output_token_ids)
    assert sched.output_tokens("nobody") is None


def test_long_prefill_threshold_caps_chunks():
    sched = make_scheduler(max_num_batched_tokens=32, long_prefill_token_threshold=5)
    sched.add(request("a", 12))
    eng = ShadowEngine(sched)
    assert [chunk_lens(eng.step())["a"] for _ in range(3)] == [5, 5, 2]


def test_a_one_token_prompt_chunk_is_no_decode():
    """`ScheduledSeq.decode` (what the engine counts as decode tokens in
    lmgate_step_tokens_total): a chunk feeding the token sampled last, not a prompt chunk of
    one token (with a threshold of 1 every prompt token was counted as a decode)."""
    sched = make_scheduler(max_num_batched_tokens=32, long_prefill_token_threshold=1)
    sched.add(request("a", 3, max_tokens=3))
    eng = ShadowEngine(sched)
    kinds = [[s.decode for s in eng.step().seqs] for _ in range(4)]
    assert kinds == [[False], [False], [False], [True]]  # three prompt tokens, then the first decode


def test_decodes_run_alongside_prefill_and_come_first():
    sched = make_scheduler(max_num_batched_tokens=10)
    eng = ShadowEngine(sched)
    sched.add(request("a", 3, max_tokens=10))
    eng.step()  # a prefilled, sampled its first token
    sched.add(request("b", 30))
    plan = eng.step()
    assert [(s.request_id, len(s.token_ids)) for s in plan.seqs] == [("a", 1), ("b", 9)]
    assert plan.num_tokens == 10
    assert [(s.request_id, len(s.token_ids)) for s in eng.step().seqs] == [("a", 1), ("b", 9)]


def test_seq_cap_limits_running_requests():
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add(request(rid, 3))
    plan = ShadowEngine(sched).step()
    assert set(chunk_lens(plan)) == {"a", "b"}
    assert (sched.num_running, sched.num_waiting) == (2, 1)


def test_priority_then_fcfs_admission():
    sched = make_scheduler(max_num_seqs=2)
    sched.add(request("low", 3, priority=5))
    sched.add(request("hi1", 3, priority=0))
    sched.add(request("hi2", 3, priority=0))
    assert set(chunk_lens(sched.schedule())) == {"hi1", "hi2"}


# ---------------------------------------------------------------- prefix reuse
def test_prefix_hit_skips_computed_full_blocks():
    sched = make_scheduler()
    eng = ShadowEngine(sched)
    prompt = list(range(1, 13))  # 3 full blocks
    sched.add(request("a", prompt, max_tokens=1))
    eng.step()
    sched.finish("a")
    sched.add(request("b", prompt + [50, 51], max_tokens=1))
    plan = eng.step()  # shadow check proves the reused blocks hold b's tokens
    assert (plan.seqs[0].start_pos, len(plan.seqs[0].token_ids)) == (12, 2)
    sched.finish("b")
    sched.add(request("c", prompt, max_tokens=1))  # identical prompt: keep one token to compute
    plan = eng.step()
    assert (plan.seqs[0].start_pos, len(plan.seqs[0].token_ids)) == (8, 4)


def test_no_prefix_hit_when_caching_disabled():
    sched = make_scheduler(prefix=False)
    eng = ShadowEngine(sched)
    sched.add(request("a", 12, max_tokens=1))
    eng.step()
    sched.finish("a")
    sched.add(request("b", 12, max_tokens=1))
    assert eng.step().seqs[0].start_pos == 0


def test_capped_chunks_admit_only_prompts_that_fit_whole():
    """Chunks capped by a threshold leave budget to admit more prompts, but a prompt is
    admitted only if all of it fits beside what the running ones still need: before,
    each got its first chunk's blocks, and the newest were preempted part-way through
    their prefill and fed again from the start."""
    # 20 blocks of 4 tokens; each prompt of 30 needs 8 blocks, 9 with its outputs
    sched = make_scheduler(num_blocks=20, max_num_batched_tokens=32, long_prefill_token_threshold=4)
    eng = ShadowEngine(sched)
    for rid in "abcde":
        sched.add(request(rid, [ord(rid)] * 30, max_tokens=4))
    fed = preempted = 0
    while sched.has_unfinished:
        plan = eng.step()
        preempted += len(plan.preempted)
        fed += plan.num_tokens
        assert len(plan.seqs) <= 2  # a third prompt of 8 blocks never fits beside two
        eng.finish_done()
    assert preempted == 0
    assert fed == 5 * (30 + 4 - 1)  # every prompt fed once, then its decodes
    assert sched.kv_usage == 0.0


def test_a_request_of_higher_priority_is_admitted_on_the_blocks_of_lower_ones():
    """What the running requests after a waiting one hold counts as room for it (it would
    preempt them): a high-priority prompt that does not fit beside a low-priority request's
    blocks is admitted, and preempts it, instead of waiting for it to end."""
    sched = make_scheduler(num_blocks=20, max_num_batched_tokens=32, long_prefill_token_threshold=4)
    eng = ShadowEngine(sched)
    sched.add(request("low", 8, max_tokens=60, priority=5))  # 17 blocks by its end
    for _ in range(45):
        eng.step()
    assert sched.get("low").num_computed_tokens > 44  # 12 blocks held, 8 free
    sched.add(request("high", [3] * 40, max_tokens=2, priority=0))  # 10 blocks
    order, preempted = [], []
    while sched.has_unfinished:
        plan = eng.step()
        preempted += plan.preempted
        order += list(eng.finish_done())
    assert order == ["high", "low"] and "low" in preempted


@pytest.mark.parametrize("num_blocks", [20, 23, 26])
def test_a_prefix_hit_on_a_lower_requests_blocks_is_no_room_to_preempt_for(num_blocks):
    """Blocks a waiting request hits in the prefix cache, held only by a running request of
    lower priority, free nothing when that one is preempted: counted as room, the request
    was admitted, and preempted part-way through its prefill."""
    sched = make_scheduler(num_blocks=num_blocks, max_num_batched_tokens=32, long_prefill_token_threshold=4)
    eng = ShadowEngine(sched)
    shared = [7] * 24
    sched.add(request("low", shared + [8], max_tokens=40, priority=5))
    while sched.get("low").num_computed_tokens < 25:
        eng.step()
    sched.add(request("early", [9] * 48, max_tokens=1, priority=0))  # (no decode to grow into)
    for _ in range(3):
        eng.step()
    sched.add(request("high", shared + [6] * 32, max_tokens=1, priority=0))
    preempted = []
    while sched.has_unfinished:
        preempted += eng.step().preempted
        eng.finish_done()
    assert "high" not in preempted and "early" not in preempted


@pytest.mark.parametrize("threshold", [0, 4])
def test_a_higher_priority_request_that_does_not_fit_preempts_lower_ones_at_once(threshold):
    """Its first chunk not fitting in the free blocks (an uncapped prompt), a waiting request
    of higher priority waited for the lower ones to finish; they are preempted for it now
    (latest first, only as many as it needs), and finish after it."""
    sched = make_scheduler(num_blocks=10, max_num_batched_tokens=32, long_prefill_token_threshold=threshold)
    eng = ShadowEngine(sched)
    sched.add(request("low_a", 8, max_tokens=12, priority=5))  # 5 blocks by its end
    sched.add(request("low_b", [4] * 8, max_tokens=12, priority=5))
    while sched.bm.num_free_blocks > 2:
        eng.step()
    sched.add(request("high", [3] * 12, max_tokens=2, priority=0))  # 4 blocks
    plan = eng.step()
    assert plan.preempted == ("low_b",) and "high" in chunk_lens(plan)
    assert finish_order(eng) == ["high", "low_a", "low_b"]


@pytest.mark.parametrize("num_blocks, high", [(9, 4), (8, 16)])
def test_a_higher_priority_head_is_admitted_before_lower_ones_take_its_blocks(num_blocks, high):
    """Scheduled before the head of the queue was admitted, running requests of lower
    priority took the blocks it fitted in (9 blocks: their decodes) or that preempting one
    of them had freed for it (8), and it was admitted a step later: now in the step it fits
    (a lower one is preempted for the other's decode instead)."""
    sched = make_scheduler(num_blocks=num_blocks, max_num_batched_tokens=32)
    eng = ShadowEngine(sched)
    sched.add(request("low_a", 8, max_tokens=20, priority=5))
    sched.add(request("low_b", [4] * 8, max_tokens=20, priority=5))
    for _ in range(9):
        eng.step()
    assert sched.bm.num_free_blocks <= 1 and not eng.finish_done()
    sched.add(request("high", [3] * high, max_tokens=2, priority=0))
    plan = eng.step()
    assert plan.preempted[0] == "low_b" and "high" in chunk_lens(plan)
    assert finish_order(eng) == ["high", "low_a", "low_b"]


def test_no_request_is_preempted_for_a_higher_one_that_would_not_fit_anyway():
    sched = make_scheduler(num_blocks=10, max_num_batched_tokens=32)
    eng = ShadowEngine(sched)
    sched.add(request("first", 8, max_tokens=12, priority=0))  # before the newcomer: not preemptible
    sched.add(request("low", [4] * 8, max_tokens=12, priority=5))
    while sched.bm.num_free_blocks > 2:
        eng.step()
    sched.add(request("high", [3] * 28, max_tokens=2, priority=1))  # 8 blocks beside first's: never
    assert not eng.step().preempted
    assert "high" not in chunk_lens(eng.step())


# ------------------------------------------------------------------ preemption
def test_preemption_frees_latest_request_and_both_complete():
    # 4 blocks of 4 tokens; each request needs up to 3 blocks (6 prompt + 6 output - 1)
    sched = make_scheduler(num_blocks=4)
    eng = ShadowEngine(sched)
    sched.add(request("a", 6, max_tokens=6))
    sched.add(request("b", [7] * 6, max_tokens=6))
    preempted = []
    for _ in range(100):
        if not sched.has_unfinished:
            break
        plan = eng.step()
        preempted += plan.preempted
        for rid in plan.preempted:
            assert rid not in chunk_lens(plan)
            assert sched.get(rid).num_computed_tokens == 0
        eng.finish_done()
    assert not sched.has_unfinished
    assert preempted and preempted[0] == "b"
    assert sched.kv_usage == 0.0


def test_preemption_picks_lowest_priority_even_if_older():
    sched = make_scheduler(num_blocks=4)
    eng = ShadowEngine(sched)
    sched.add(request("lo", 6, max_tokens=6, priority=5))
    sched.add(request("hi", [7] * 6, max_tokens=6, priority=0))
    preempted = []
    while sched.has_unfinished:
        preempted += eng.step().preempted
        eng.finish_done()
    assert preempted and set(preempted) == {"lo"}


def test_preempted_request_keeps_outputs_and_recomputes_them():
    sched = make_scheduler(num_blocks=3)
    eng = ShadowEngine(sched)
    sched.add(request("a", 4, max_tokens=5))
    sched.add(request("b", [9] * 4, max_tokens=5))
    while True:
        plan = eng.step()
        if plan.preempted:
            break
    (victim,) = plan.preempted
    req = sched.get(victim)
    outputs = list(req.output_token_ids)
    assert outputs and req.num_computed_tokens == 0
    while sched.get(victim).num_computed_tokens == 0:
        eng.step()
        eng.finish_done()
    # recomputation fed prompt + kept outputs (the shadow engine checked the KV)
    assert sched.get(victim).output_token_ids[: len(outputs)] == outputs


# ------------------------------------------------------------ abort / reject
def test_abort_frees_blocks_at_once():
    sched = make_scheduler(num_blocks=8)
    eng = ShadowEngine(sched)
    sched.add(request("a", 10))
    sched.add(request("w", 3))
    eng.step()
    assert sched.kv_usage > 0
    assert sched.abort("a") and sched.abort("w")
    assert sched.kv_usage == 0.0 and not sched.has_unfinished
    assert not sched.abort("a")


def test_abort_between_schedule_and_update_is_tolerated():
    sched = make_scheduler()
    sched.add(request("a", 3))
    plan = sched.schedule()
    sched.abort("a")
    sched.update(plan, {"a": 1})
    assert sched.get("a") is None


def test_plan_applied_twice_is_an_error():
    sched = make_scheduler()
    sched.add(request("a", 3))
    plan = sched.schedule()
    sched.update(plan, {"a": 1})
    with pytest.raises(ValueError, match="applied twice"):
        sched.update(plan, {"a": 1})


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "match"),
    [(100, 30, "max_model_len"), (60, 10, "KV blocks"), (0, 3, "empty"), (3, 0, "max_tokens")],
)
def test_impossible_requests_are_rejected(prompt, max_tokens, match):
    sched = make_scheduler(num_blocks=16, max_model_len=128)  # cache holds 64 tokens
    with pytest.raises(RequestRejected, match=match):
        sched.add(request("x", prompt, max_tokens))
    assert not sched.has_unfinished


def test_request_with_all_outputs_already_is_rejected():
    sched = make_scheduler()
    with pytest.raises(RequestRejected, match="already has"):
        sched.add(SchedRequest("x", [1, 2], 2, [3, 4]))


def test_request_that_exactly_fits_the_cache_is_accepted_and_completes():
    sched = make_scheduler(num_blocks=4)
    sched.add(request("x", 10, max_tokens=7))  # 16 positions stored
    eng = ShadowEngine(sched)
    while sched.has_unfinished:
        eng.step()
        eng.finish_done()


# ------------------------------------------------------------------------ fork
def test_fork_shares_blocks_and_copies_on_write():
    sched = make_scheduler()
    eng = ShadowEngine(sched)
    sched.add(request("p", 6, max_tokens=5))
    eng.step()  # prefill; block 1 holds positions 4, 5 and is partly empty
    parent = sched.get("p")
    child = SchedRequest("c", list(parent.prompt_token_ids), 5, [parent.output_token_ids[0] + 1])
    sched.fork("p", child)
    assert child.num_computed_tokens == 6
    plan = eng.step()  # both decode position 6 into the shared block -> one copy
    assert chunk_lens(plan) == {"p": 1, "c": 1}
    assert len(plan.copies) == 1
    tables = {s.request_id: s.block_table for s in plan.seqs}
    assert tables["p"][0] == tables["c"][0] and tables["p"][1] != tables["c"][1]
    assert plan.copies[0][1] in (tables["p"][1], tables["c"][1])


def test_fork_rejects_child_that_does_not_extend_parent():
    sched = make_scheduler()
    eng = ShadowEngine(sched)
    sched.add(request("p", 6))
    eng.step()
    with pytest.raises(ValueError, match="extend"):
        sched.fork("p", SchedRequest("c", [1, 2, 3, 4, 5, 6, 7], 4))


# ---------------------------------------------------------- random workloads
def _fork_or_abort_sometimes(rng, sched, plan, initial: dict[str, list[int]], tag: int) -> None:
    """Fork a request that just sampled (n > 1 sampling) or abort one at random."""
    r = rng.random()
    if r < 0.05:
        candidates = [s.request_id for s in plan.seqs if s.sample and sched.get(s.request_id)]
        if candidates:
            parent = sched.get(rng.choice(candidates))
            rid = f"{parent.request_id}+{tag}"
            outputs = parent.output_token_ids[:-1] + [rng.randrange(50)]
            sched.fork(
                parent.request_id,
                SchedRequest(rid, list(parent.prompt_token_ids), parent.max_tokens, outputs),
            )
            initial[rid] = list(outputs)
    elif r < 0.08 and initial:
        rid = rng.choice(sorted(initial))
        if sched.abort(rid):
            del initial[rid]


@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_complete_without_leaks(seed):
    rng = random.Random(seed)
    budget, max_seqs = rng.choice([4, 8, 16, 64]), rng.choice([1, 2, 4, 8])
    sched = make_scheduler(
        num_blocks=rng.choice([6, 10, 24]),
        prefix=rng.random() < 0.8,
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
        long_prefill_token_threshold=rng.choice([0, 0, 3]),
        max_model_len=64,
    )
    eng = ShadowEngine(sched)
    bases = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    initial: dict[str, list[int]] = {}  # request id -> its output tokens when added
    finished: dict[str, SchedRequest] = {}
    to_add = 20 + rng.randrange(20)
    preemptions = 0
    for step in range(5000):
        if to_add and rng.random() < 0.5:
            to_add -= 1
            prompt = rng.choice(bases)[: rng.randrange(1, 13)] + [
                rng.randrange(50)
            ] * rng.randrange(4)
            req = request(
                f"r{step}", prompt, max_tokens=rng.randrange(1, 12), priority=rng.randrange(3)
            )
            try:
                sched.add(req)
            except RequestRejected:
                continue
            initial[req.request_id] = []
        if not sched.has_unfinished:
            if not to_add:
                break
            continue
        plan = eng.step()
        preemptions += len(plan.preempted)
        assert plan.seqs, "a step with unfinished requests scheduled nothing"
        assert plan.num_tokens <= budget and len(plan.seqs) <= max_seqs
        assert len({s.request_id for s in plan.seqs}) == len(plan.seqs)
        lens = [len(s.token_ids) for s in plan.seqs]
        assert lens == sorted(lens, key=lambda n: n != 1)  # decodes first
        for s in plan.seqs:
            assert s.start_pos + len(s.token_ids) <= 64  # never beyond max_model_len
        finished.update(eng.finish_done())
        _fork_or_abort_sometimes(rng, sched, plan, initial, tag=step)
    else:
        pytest.fail("workload did not complete")
    assert finished.keys() == initial.keys()
    for rid, req in finished.items():
        first = initial[rid]
        assert req.output_token_ids == first + [
            token_for(rid, i) for i in range(len(first), req.max_tokens)
        ]
    assert sched.kv_usage == 0.0
    assert sched.bm.num_free_blocks == sched.bm.num_blocks
    sched.bm.check_invariants()


# ------------------------------------------------------- held requests (beam search)
def test_held_request_keeps_its_blocks_and_runs_again_after_append():
    sched = make_scheduler()
    sched.add(request("b", 6, max_tokens=5))
    plan = sched.schedule()
    sched.update(plan, {}, held=["b"])  # the engine decides b's token later
    req = sched.get("b")
    assert req.output_token_ids == [] and req.num_computed_tokens == 6
    blocks = sched.bm.block_table("b")
    assert sched.schedule().seqs == ()  # held: not scheduled, blocks kept
    assert sched.bm.block_table("b") == blocks
    sched.append("b", 7)
    plan = sched.schedule()
    assert [(s.request_id, s.token_ids, s.start_pos) for s in plan.seqs] == [("b", (7,), 6)]
    with pytest.raises(ValueError, match="not waiting for a token"):
        sched.append("b", 8)  # it has a token to run


def test_held_beams_release_seats_to_a_waiting_sibling_instead_of_deadlocking():
    """Two seats, both held (beam a0, and x of another family), a0's sibling waiting: the
    held request that sorts after the waiting head gives way; a0, before it, keeps its KV."""
    sched = make_scheduler(max_num_seqs=2)
    sched.add(request("a0", 6, max_tokens=4))
    sched.add(request("x", 6, max_tokens=4))
    plan = sched.schedule()
    sched.update(plan, {"x": 1}, held=["a0"])
    # a0's sibling forks while both seats are taken: it waits, sorted right after a0
    a0 = sched.get("a0")
    sched.fork("a0", SchedRequest("a0#1", list(a0.prompt_token_ids), 4, [5]))
    sched.add(request("y", 6, max_tokens=4))  # arrives after the fork, sorts after a0#1
    assert [r.request_id for r in sched._waiting] == ["a0#1", "y"]
    # x holds its token too now (say it is a beam of another family): nothing runs
    plan = sched.schedule()
    assert chunk_lens(plan) == {"x": 1}
    sched.update(plan, {}, held=["x"])
    plan = sched.schedule()  # a0 (before the head) stays; x (after it) gives way
    assert plan.preempted == ("x",)
    assert list(chunk_lens(plan)) == ["a0#1"]
    assert sched.get("a0").num_computed_tokens == 6  # the earlier held beam kept its KV


def test_release_of_held_requests_never_readmits_the_released_one_first():
    sched = make_scheduler(max_num_seqs=1)
    sched.add(request("a", 6, max_tokens=4))
    sched.update(sched.schedule(), {}, held=["a"])
    sched.add(request("b", 6, max_tokens=4))
    plan = sched.schedule()  # b sorts after a: a is not released for it (a would come back first)
    assert plan.seqs == () and plan.preempted == ()
    sched.append("a", 3)
    assert chunk_lens(sched.schedule()) == {"a": 1}


def test_waiting_work_counts_each_waiting_sequence_by_the_tokens_it_has_left():
    """The overload estimate's view of the engine's queue (`Runtime.estimated_wait_s`): a
    waiting sequence is the share of a typical sequence's tokens it has left to write, at
    most one, so the many short choices of one `n` request are not many requests' work."""
    sched = make_scheduler(256, max_num_seqs=1)
    sched.add(request("long", [1, 2], max_tokens=500))
    for i in range(8):
        sched.add(request(f"short{i}", [1, 2], max_tokens=8))
    sched.schedule()  # "long" runs; the rest wait
    assert sched.num_waiting == 8
    assert sched.waiting_work(160) == pytest.approx(8 * 8 / 160)
    assert sched.waiting_work(4) == 8  # each at most one
    assert sched.waiting_work(0) == 8
    # in requests: the choices of one request count once, at the largest share among them
    assert sched.waiting_work(4, owner=lambda sid: "one") == 1
    assert sched.waiting_work(160, owner=lambda sid: sid[:-1]) == pytest.approx(8 / 160)


def test_the_scheduler_says_whether_requests_wait_for_blocks_or_for_the_budget():
    """What the overload estimate reads: requests waiting because the KV cache is full run
    no sooner for free seats; those waiting for the step's token budget do."""
    sched = make_scheduler(num_blocks=64, max_num_batched_tokens=8)
    for i in range(3):
        sched.add(request(f"b{i}", 8, max_tokens=2))
    sched.schedule()  # one prompt's 8 tokens spend the budget: the others wait for it
    assert sched.num_waiting == 2 and not sched.waits_for_blocks
    tight = make_scheduler(num_blocks=4, max_num_batched_tokens=64)
    for i in range(2):
        tight.add(request(f"k{i}", 12, max_tokens=2))
    tight.schedule()  # 3 blocks each: the second does not fit
    assert tight.num_waiting == 1 and tight.waits_for_blocks
    # prompts longer than the budget: a step whose budget goes to a running prompt's chunk
    # never looks at the head, which still waits for blocks (2 of the 10 fit the cache)
    long = make_scheduler(num_blocks=12, max_num_batched_tokens=8, max_num_seqs=64)
    for i in range(10):
        long.add(request(f"p{i}", [1000 * (i + 1) + j for j in range(20)], max_tokens=4))
    eng = ShadowEngine(long)
    for _ in range(30):
        eng.step()
        eng.finish_done()
        assert long.waits_for_blocks == (long.num_waiting > 0)
