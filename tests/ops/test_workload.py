"""The multi-application workload: deterministic templates and the shipped fixture."""

from __future__ import annotations

import numpy as np
import pytest

from ops.workload.fixture import FIXTURE, load_fixture
from ops.workload.templates import APPS, build_requests


def test_templates_are_deterministic_and_cover_every_app_and_user():
    a, b = build_requests(300, seed=3), build_requests(300, seed=3)
    assert a == b
    assert build_requests(50, seed=4) != build_requests(50, seed=3)
    apps = {r.app for r in a}
    assert apps == {app.name for app in APPS}
    for app in APPS:
        users = {r.user for r in a if r.app == app.name}
        assert users == {u for u, _ in app.users}


def test_instruction_is_system_plus_first_user_turn():
    r = build_requests(1)[0]
    assert r.instruction.startswith(r.messages[0]["content"])
    assert r.messages[1]["content"] in r.instruction


def test_inputs_vary_in_length_within_an_application():
    reqs = build_requests(200)
    for app in ("translation", "grammar", "summarization", "code_translation"):
        lens = [len(r.messages[1]["content"]) for r in reqs if r.app == app]
        assert max(lens) > 2 * min(lens), app


def test_build_requests_rejects_a_bad_size():
    with pytest.raises(ValueError):
        build_requests(0)


@pytest.mark.skipif(not FIXTURE.exists(), reason="fixture not generated")
def test_shipped_fixture_is_the_templates_run_through_the_model():
    from ops.bench_sched import BenchConfig

    fx = load_fixture()
    # the benchmark runs the held-out half: it must hold the long run's requests
    assert len(fx) - len(fx) // 2 >= BenchConfig(quick=False).real_requests
    built = {r.id: r for r in build_requests(len(fx))}
    for r in fx:
        assert tuple(r.messages) == built[r.id].messages  # regenerable from the templates
        assert 1 <= r.output_tokens <= r.max_tokens
        if r.finish_reason == "length":
            assert r.output_tokens == r.max_tokens
        assert r.finish_reason in ("stop", "length")
        assert r.prompt_tokens > 0
    # lengths depend on the application: the per-app medians are not all alike
    medians = {app: np.median([r.output_tokens for r in fx if r.app == app]) for app in {r.app for r in fx}}
    assert max(medians.values()) > 2 * min(medians.values())
    assert {r.finish_reason for r in fx} == {"stop", "length"}


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
def test_generate_writes_a_fixture_in_the_dtype_asked_for(tmp_path):
    """`ops.workload.generate --dtype bfloat16 --batch-invariant`: a log of the bundled model's
    own lengths that `load_fixture` reads, the first requests of a longer run having the
    lengths of a shorter one (each request's length is the one it gets alone)."""
    from ops.workload.generate import main

    short, longer = tmp_path / "three.jsonl", tmp_path / "seven.jsonl"
    main(["--n", "3", "--max-tokens", "24", "--dtype", "bfloat16", "--batch-invariant", "--out", str(short)])
    main(["--n", "7", "--max-tokens", "24", "--dtype", "bfloat16", "--batch-invariant", "--out", str(longer)])
    a, b = load_fixture(short), load_fixture(longer)
    assert len(a) == 3 and len(b) == 7
    assert all(1 <= r.output_tokens <= 24 and r.max_tokens == 24 for r in b)
    assert [(r.id, r.prompt_tokens, r.output_tokens, r.finish_reason) for r in a] == [
        (r.id, r.prompt_tokens, r.output_tokens, r.finish_reason) for r in b[:3]]
