"""`lmgate bench NAME`: every benchmark module in ops/ is reachable, and flags pass through."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from gateway.cli import main
from ops.cli import BENCHES


def test_every_benchmark_module_is_listed_and_has_a_main():
    modules = {p.stem for p in (Path(__file__).parents[2] / "ops").glob("bench_*.py")}
    assert {m.removeprefix("ops.") for m, _ in BENCHES.values()} == modules
    for module, _ in BENCHES.values():
        assert callable(importlib.import_module(module).main)


def test_the_flags_after_the_name_reach_the_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "scoring", "--help"])
    assert exit_.value.code == 0
    assert "multiple-choice loglikelihood" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in BENCHES)
