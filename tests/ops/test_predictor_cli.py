"""`lmgate predictor train/show/export/import` against the shipped workload, the real
MiniLM embedder and a real private redis-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.predictor import LengthPredictor
from gateway.cli import main
from ops.workload.fixture import FIXTURE


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["predictor", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def small_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 80 requests of the shipped workload: a request log in its format."""
    path = tmp_path_factory.mktemp("log") / "requests.jsonl"
    path.write_text("".join(FIXTURE.read_text().splitlines(keepends=True)[:80]))
    return path


@pytest.fixture(scope="module")
def seed(small_log: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("seed") / "seed.npz"
    code = main(["predictor", "train", "--requests", str(small_log), "--tenant", "dev", "-o", str(out)])
    assert code == 0
    return out, LengthPredictor.from_bytes(out.read_bytes()).summary()


@pytest.mark.slow
def test_train_learns_the_log_under_the_tenant_it_will_serve(seed: tuple[Path, dict]) -> None:
    _, summary = seed
    assert summary["samples"] == 80 and summary["fitted"]
    assert summary["stopped"] + summary["runaways"] + summary["censored"] == 80
    assert summary["apps"] and all(k.startswith("dev/") for k in summary["apps"])  # relabelled by --tenant


@pytest.mark.slow
def test_train_held_out_reports_accuracy_against_the_per_app_mean(small_log: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "train", "--requests", str(small_log), "--held-out", "-o", str(tmp_path / "p.npz"))
    assert code == 0
    report = json.loads(out)
    held = report["held_out"]
    assert (held["train"], held["test"]) == (40, 40)
    assert 0 <= held["within_25pct"] <= 1 and held["mae"] > 0 and held["per_app_mean_mae"] > 0
    assert report["predictor"]["samples"] == 40  # what was written: the training half only
    assert LengthPredictor.from_bytes((tmp_path / "p.npz").read_bytes()).num_samples == 40


def test_train_refuses_a_log_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--requests", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "p"))
    assert code == 2 and "missing" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    code, _, err = run(capsys, "train", "--requests", str(bad), "-o", str(tmp_path / "p"))
    assert code == 2 and "not a request log" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run(capsys, "train", "--requests", str(empty), "-o", str(tmp_path / "p"))
    assert code == 2 and "holds no requests" in err
    assert not (tmp_path / "p").exists()


def test_show_refuses_what_is_not_a_predictor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    code, _, err = run(capsys, "show", str(junk))
    assert code == 2 and "not a length-predictor blob" in err
    code, _, err = run(capsys, "show", str(tmp_path / "nothing.npz"))
    assert code == 2 and "cannot read" in err
    code, _, err = run(capsys, "show")
    assert code == 2 and "one of them" in err


@pytest.mark.slow
def test_import_export_and_show_through_a_real_redis(seed: tuple[Path, dict], redis_url: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path, summary = seed
    code, _, err = run(capsys, "export", "--redis-url", redis_url, "-o", str(tmp_path / "none.npz"))
    assert code == 1 and "holds no predictor" in err

    code, out, _ = run(capsys, "import", str(path), "--redis-url", redis_url)
    assert code == 0 and json.loads(out)["predictor"] == summary
    code, out, _ = run(capsys, "show", "--redis-url", redis_url)
    assert code == 0 and json.loads(out) == summary

    code, _, err = run(capsys, "import", str(path), "--redis-url", redis_url)
    assert code == 1 and "--force" in err  # what a deployment learned is not overwritten by accident
    assert run(capsys, "import", str(path), "--redis-url", redis_url, "--force")[0] == 0

    code, out, _ = run(capsys, "export", "--redis-url", redis_url, "-o", str(tmp_path / "out.npz"))
    assert code == 0
    assert (tmp_path / "out.npz").read_bytes() == path.read_bytes()


def test_redis_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = run(capsys, "export", "--redis-url", f"redis://127.0.0.1:{port}/0", "-o", str(tmp_path / "x"))
    assert code == 1 and "unreachable" in err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    code, _, err = run(capsys, "import", str(junk), "--redis-url", f"redis://127.0.0.1:{port}/0")
    assert code == 2 and "not a length-predictor blob" in err  # checked before Redis is asked


def test_a_bad_redis_url_or_an_unwritable_output_is_one_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """They were coredis' AssertionError, and a FileNotFoundError after the whole training."""
    code, _, err = run(capsys, "show", "--redis-url", "notaurl")
    assert code == 2 and "--redis-url must be redis://, rediss:// or unix://" in err and "Traceback" not in err
    for argv in (["export", "--redis-url", "redis://127.0.0.1:1/0"], ["train"]):
        code, _, err = run(capsys, *argv, "-o", str(tmp_path / "missing" / "x.npz"))
        assert code == 2 and f"no such folder: {tmp_path / 'missing'}" in err, err
        code, _, err = run(capsys, *argv, "-o", str(tmp_path))
        assert code == 2 and "is a folder" in err, err
