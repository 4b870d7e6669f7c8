"""Dataset sampling: lengths honoured, JSONL parsing, the workload fixture, tenants by weight, sweep seeds."""

from __future__ import annotations

import collections
import json
import math

import pytest

from ops.loadgen.backends import SendOptions, completion_body, endpoint_of
from ops.loadgen.dataset import (
    RANDOM_TOKEN_LOW,
    ChatPrompt,
    JsonlSpec,
    LengthRange,
    RandomSpec,
    Tenant,
    WorkloadSpec,
    build_warmups,
    build_workload,
    sweep_seed,
)


def test_random_lengths_stay_in_range_and_cover_it() -> None:
    spec = RandomSpec(LengthRange(32, 512), LengthRange(16, 256), vocab_size=1000)
    reqs = build_workload(spec, 400, math.inf, 1.0, seed=0)
    ins = [r.prompt_len for r in reqs]
    outs = [r.output_len for r in reqs]
    assert all(len(r.prompt) == r.prompt_len for r in reqs)
    assert 32 <= min(ins) < 60 and 480 < max(ins) <= 512
    assert 16 <= min(outs) < 30 and 240 < max(outs) <= 256
    assert all(RANDOM_TOKEN_LOW <= t < 1000 for r in reqs for t in r.prompt)


def test_range_ratio_like_vllm() -> None:
    assert LengthRange.around(100, 0.5) == LengthRange(50, 150)
    assert LengthRange.around(100, 0.0) == LengthRange(100, 100)
    with pytest.raises(ValueError):
        LengthRange.around(100, 1.0)
    with pytest.raises(ValueError):
        LengthRange(10, 5)


def test_jsonl_prompts_and_output_lengths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "hello there", "output_len": 5}, {"prompt": [101, 102, 103]}, {}]
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n")
    reqs = build_workload(JsonlSpec(str(path), default_output_len=9), 2, 1.0, 1.0, seed=0)
    got = sorted((r.prompt, r.output_len) for r in reqs if isinstance(r.prompt, tuple))
    assert got == [((101, 102, 103), 9)]
    assert [(r.prompt, r.output_len) for r in reqs if isinstance(r.prompt, str)] == [("hello there", 5)]
    # more requests than lines: sampled with replacement
    assert len(build_workload(JsonlSpec(str(path)), 7, 1.0, 1.0, seed=0)) == 7
    path.write_text(json.dumps(lines[2]) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        JsonlSpec(str(path)).load()


def test_tenants_drawn_by_weight() -> None:
    tenants = [Tenant.parse("k-a:1", 0), Tenant.parse("k-b:3:2", 1)]
    assert tenants[1] == Tenant("k-b", 3.0, 2, "tenant1")
    reqs = build_workload(RandomSpec(LengthRange(1, 2), LengthRange(1, 2)), 4000, 1.0, 1.0, 0, tenants)
    counts = collections.Counter(r.tenant.api_key for r in reqs if r.tenant)
    assert counts["k-b"] / 4000 == pytest.approx(0.75, abs=0.03)
    for bad in ("nokey", ":1", "k:0", "k:1:x:y"):
        with pytest.raises(ValueError):
            Tenant.parse(bad, 0)


def test_warmups_never_repeat_measured_prompts_and_sweep_seeds_differ() -> None:
    spec = RandomSpec(LengthRange(8, 8), LengthRange(2, 2))
    measured = {r.prompt for r in build_workload(spec, 20, 1.0, 1.0, seed=5)}
    assert not measured & {r.prompt for r in build_warmups(spec, 5, seed=5)}
    assert sweep_seed(5, 0) == 5
    assert len({sweep_seed(5, i) for i in range(4)}) == 4
    assert sweep_seed(5, 2) == sweep_seed(5, 2)


def test_workload_measures_held_out_chats_and_warms_up_on_the_training_half() -> None:
    from ops.workload.fixture import load_fixture, split_fixture

    train, test = split_fixture(load_fixture())
    spec = WorkloadSpec(distinct=True)  # for a client that lets the server's response cache answer
    measured = build_workload(spec, 40, 2.0, 1.0, seed=3)
    warm = build_warmups(spec, 30, seed=3)
    def conv(rows):  # type: ignore[no-untyped-def]
        return {json.dumps(r.messages) for r in rows}

    def sent(reqs):  # type: ignore[no-untyped-def]
        assert all(isinstance(r.prompt, ChatPrompt) for r in reqs)
        return {json.dumps(r.prompt.messages) for r in reqs}

    assert sent(measured) <= conv(test) - conv(train)
    assert sent(warm) <= conv(train)
    # distinct conversations, none a warm-up could have put in a response cache
    every = build_workload(spec, 338, 2.0, 1.0, seed=3) + build_warmups(spec, 378, seed=3)
    assert len({json.dumps(r.prompt.messages) for r in every}) == 338 + 378
    r0 = measured[0]
    f0 = next(r for r in test if json.dumps(r.messages) == json.dumps(r0.prompt.messages))
    assert (r0.prompt.app, r0.prompt.user, r0.prompt_len) == (f0.app, f0.user, f0.prompt_tokens)
    assert {r.output_len for r in measured} == {f0.max_tokens}  # the fixture's cap: lengths end at EOS
    assert build_workload(spec, 40, 2.0, 1.0, seed=3) == measured
    body = completion_body(r0, "m", SendOptions(), stream=True)
    assert body["messages"] == list(r0.prompt.messages) and "prompt" not in body
    assert (body["metadata"], body["user"], body["max_tokens"]) == ({"app": f0.app}, f0.user, f0.max_tokens)
    assert endpoint_of(r0) == "chat.completions"
    assert build_workload(WorkloadSpec(max_tokens=7), 2, 1.0, 1.0, seed=0)[0].output_len == 7
    with pytest.raises(ValueError, match="held-out half holds 338"):
        build_workload(spec, 339, 1.0, 1.0, seed=0)


def test_workload_bypassing_the_cache_measures_the_whole_held_out_half() -> None:
    from ops.workload.fixture import load_fixture, split_fixture

    train, test = split_fixture(load_fixture())
    spec = WorkloadSpec()
    measured = build_workload(spec, len(test), 2.0, 1.0, seed=3)
    warm = build_warmups(spec, len(train), seed=3)
    key = lambda r: (json.dumps(r.prompt.messages), r.prompt.app, r.prompt.user)  # noqa: E731
    assert sorted(map(key, measured)) == sorted((json.dumps(r.messages), r.app, r.user) for r in test)
    assert sorted(map(key, warm)) == sorted((json.dumps(r.messages), r.app, r.user) for r in train)
    # the mix of applications is the workload's: the distinct half has no Q&A at all
    apps = {r.prompt.app for r in build_workload(spec, 100, 2.0, 1.0, seed=3)}
    assert "qa" in apps and "story" in apps
    assert "qa" not in {r.prompt.app for r in build_workload(WorkloadSpec(distinct=True), 338, 2.0, 1.0, seed=3)}
    with pytest.raises(ValueError, match=f"held-out half holds {len(test)}"):
        build_workload(spec, len(test) + 1, 1.0, 1.0, seed=0)


def test_split_fixture_is_seeded_halves_in_fixture_order() -> None:
    from ops.workload.fixture import load_fixture, split_fixture

    fx = load_fixture()
    train, test = split_fixture(fx, 0)
    assert len(train) == len(test) == len(fx) // 2
    assert not {r.id for r in train} & {r.id for r in test}
    pos = {r.id: i for i, r in enumerate(fx)}
    assert [pos[r.id] for r in test] == sorted(pos[r.id] for r in test)
    assert split_fixture(fx, 0) == (train, test) and split_fixture(fx, 1) != (train, test)
