"""`lmgate predictor train/show/export/import` against the shipped workload, the real
MiniLM embedder and a real private redis-server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
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


GOOD = json.loads(FIXTURE.read_text().splitlines()[0])


@pytest.mark.parametrize(("change", "why"), [
    ({"messages": "hello"}, "Expected `array`, got `str` - at `$.messages`"),
    ({"messages": [{"role": "user", "content": 5}]}, "Expected `str | array | null`, got `int` - at `$.messages[0].content`"),
    ({"tenant": 5}, "Expected `str`, got `int` - at `$.tenant`"),
    ({"output_tokens": -5}, "output_tokens must be in 0..16777216, got -5"),
    ({"prompt_tokens": -3}, "prompt_tokens must be in 0..16777216, got -3"),
    ({"max_tokens": 0}, "max_tokens must be in 1..16777216, got 0"),
    ({"output_tokens": 10**30}, "output_tokens must be in 0..16777216, got 1000000000000000000000000000000"),
    ({"output_tokens": 10, "max_tokens": 5}, "output_tokens (10) is above max_tokens (5)"),
    ({"output_tokens": 1.5}, "Expected `int`, got `float` - at `$.output_tokens`"),
])
def test_train_names_the_line_and_field_a_log_gets_wrong_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, why: str) -> None:
    """These were tracebacks (some after the whole embedding pass), or, for negative counts,
    a seed file written with exit 0 that nothing could then load (NaN features)."""
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, **change}) + "\n")
    code, out, err = run(capsys, "train", "--requests", str(log), "-o", str(tmp_path / "p.npz"))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"{log}: not a request log: line 3: {why}" in err  # the file's line (after a blank one)
    assert not (tmp_path / "p.npz").exists()


@pytest.mark.slow
def test_train_reads_content_parts_and_messages_without_content(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """OpenAI's content parts, an assistant's null content and a log without a system
    prompt: the instruction embedded is the first system and first user message, as the
    server embeds them (`actors.predictor.instruction_of`)."""
    from ops.workload.fixture import load_fixture

    lines = [{**GOOD, "id": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                                          {"type": "text", "text": "there"}]},
                                             {"role": "assistant", "content": None}]},
             {**GOOD, "id": "b", "messages": [{"role": "user", "content": "q"}, {"role": "assistant"},
                                             {"role": "system", "content": "late"}]}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [r.instruction for r in load_fixture(log)] == ["hi\nthere", "late\nq"]
    code, _, err = run(capsys, "train", "--requests", str(log), "-o", str(tmp_path / "p.npz"))
    assert code == 0, err
    assert LengthPredictor.from_bytes((tmp_path / "p.npz").read_bytes()).num_samples == 2


@pytest.mark.parametrize("tenant", ["", "no such/tenant", "..", "x" * 65])
def test_train_refuses_a_tenant_no_tenant_could_be(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   tenant: str) -> None:
    code, _, err = run(capsys, "train", "--tenant", tenant, "-o", str(tmp_path / "p.npz"))
    assert code == 2 and "is not a tenant id" in err
    log = tmp_path / "log.jsonl"  # the log's own tenant too, unless --tenant replaces it
    log.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "w9", "tenant": tenant}) + "\n")
    code, _, err = run(capsys, "train", "--requests", str(log), "-o", str(tmp_path / "p.npz"))
    assert code == 2 and f"request 'w9': tenant {tenant!r} is not a tenant id" in err


def test_held_out_needs_two_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One request held out printed NaN (not JSON) and wrote an untrained seed, with exit 0."""
    log = tmp_path / "one.jsonl"
    log.write_text(json.dumps(GOOD) + "\n")
    code, _, err = run(capsys, "train", "--requests", str(log), "--held-out", "-o", str(tmp_path / "p.npz"))
    assert code == 2 and "needs at least 2" in err and not (tmp_path / "p.npz").exists()


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


def test_a_database_redis_does_not_have_is_one_line(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "show", "--redis-url", redis_url.rsplit("/", 1)[0] + "/99")
    assert code == 1 and "Redis refused the database number of --redis-url" in err and "Traceback" not in err


def test_a_predictor_key_of_another_type_is_one_line(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A hash where the predictor's bytes belong was coredis' WrongTypeError: a traceback
    from `show`, and from `lmgate serve`, which now says it in one line as for bad bytes."""
    import trio

    from actors.predictor import PredictorBlobError, PredictorService
    from cache.store import RedisStore

    async def plant_and_load() -> None:
        async with RedisStore(redis_url) as store:
            await store.client.hset(store.key(PredictorService(store=store).key), {"a": "b"})
            with pytest.raises(PredictorBlobError, match="another type"):
                await PredictorService(store=store).load_or_seed(None)

    trio.run(plant_and_load)
    code, _, err = run(capsys, "show", "--redis-url", redis_url)
    assert code == 1 and err.count("\n") == 1 and "not a length-predictor blob (Redis holds another type" in err


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
    assert code == 2 and "--redis-url must start with redis://, rediss:// or unix://" in err and "Traceback" not in err
    for url in ("redis://:::", "redis://127.0.0.1:1/abc"):  # an AssertionError in coredis; database 0
        code, _, err = run(capsys, "show", "--redis-url", url)
        assert code == 2 and err.count("\n") == 1 and err.startswith("lmgate predictor show: --redis-url"), err
    for argv in (["export", "--redis-url", "redis://127.0.0.1:1/0"], ["train"]):
        code, _, err = run(capsys, *argv, "-o", str(tmp_path / "missing" / "x.npz"))
        assert code == 2 and f"no such folder: {tmp_path / 'missing'}" in err, err
        code, _, err = run(capsys, *argv, "-o", str(tmp_path))
        assert code == 2 and "is a folder" in err, err


def _predictor_file(tmp_path: Path, name: str, change=None, compressed: bool = False,
                    whole_rows: bool = False) -> Path:
    """A small predictor file (no embedder: random unit embeddings), its arrays changed by
    `change` (a variant a file might hold), saved compressed or as `to_bytes` writes it;
    `whole_rows`: in the layout before the eighteenth session (feature rows `x`, not
    head + embedding)."""
    import io

    from actors.predictor import RequestFeatures

    rng = np.random.default_rng(1)
    p = LengthPredictor()
    for i in range(30):
        e = rng.normal(size=384).astype(np.float32)
        p.observe(RequestFeatures("dev", f"app-{i % 3}", f"user-{i % 4}", 20 + i, 512, e / np.linalg.norm(e)), 40 + i)
    p.fit()
    with np.load(io.BytesIO(p.to_bytes())) as z:
        arrays = {k: z[k] for k in z.files}
    if whole_rows:
        del arrays["head"], arrays["emb"]
        arrays["x"] = p.snapshot()[0]
    if change is not None:
        change(arrays)
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    path = tmp_path / f"{name}.npz"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("variant", ["compressed", "whole rows"])
def test_import_stores_a_valid_file_that_is_not_byte_for_byte_what_a_server_writes(
        variant: str, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Import re-packs the file (as a server saves it): it compared Redis with the file itself,
    and reported "unreachable: the predictor was not stored" (exit 1) for one Redis held."""
    import coredis

    path = (_predictor_file(tmp_path, "c", compressed=True) if variant == "compressed"
            else _predictor_file(tmp_path, "x", whole_rows=True))
    summary = LengthPredictor.from_bytes(path.read_bytes()).summary()
    code, out, err = run(capsys, "import", str(path), "--redis-url", redis_url)
    assert code == 0, err
    assert json.loads(out)["predictor"] == summary
    code, out, _ = run(capsys, "show", "--redis-url", redis_url)
    assert code == 0 and json.loads(out) == summary

    async def stored() -> bytes:
        async with coredis.Redis.from_url(redis_url) as client:
            return await client.get("lmgate:predictor:length")

    import trio

    assert trio.run(stored) == LengthPredictor.from_bytes(path.read_bytes()).to_bytes()  # the canonical layout


def test_import_reports_a_read_back_mismatch_as_such_not_as_unreachable(
        redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer between the write and the read-back: Redis was reachable all along."""
    from actors.predictor import PredictorService

    path = _predictor_file(tmp_path, "p")
    other = _predictor_file(tmp_path, "other", lambda a: a.update(y=a["y"] + 0.5)).read_bytes()
    real_replace = PredictorService.replace

    async def replace_then_another_writer(self: PredictorService, blob: bytes) -> bool:
        saved = await real_replace(self, blob)
        with self.store.guard():
            await self.store.client.set(self.store.key(self.key), other)
        return saved

    monkeypatch.setattr(PredictorService, "replace", replace_then_another_writer)
    code, _, err = run(capsys, "import", str(path), "--redis-url", redis_url)
    assert code == 1 and "holds another predictor than the one just written" in err
    assert "unreachable" not in err and "not stored" not in err


MALFORMED_FILES = {  # each ended in a traceback (AttributeError, OverflowError)
    "meta_intkey": (lambda a: a.update(meta=np.frombuffer(repr({"lengths_keys": [1], "users_keys": []}).encode(),
                                                          dtype=np.uint8)),
                    "meta['lengths_keys'] is not a list of strings"),
    "model_n_inf": (lambda a: a.update(model=np.array([1.0, np.inf])), "'model' array holds NaN or infinity"),
}


@pytest.mark.parametrize("name", list(MALFORMED_FILES))
def test_show_import_and_a_seed_refuse_a_malformed_predictor_in_one_line(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.config import ConfigError, check_predictor_seed

    change, message = MALFORMED_FILES[name]
    path = _predictor_file(tmp_path, name, change)
    for argv in (["show", str(path)], ["import", str(path), "--redis-url", "redis://127.0.0.1:1/0"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err == f"lmgate predictor {argv[0]}: {path}: the blob's {message}\n"  # before Redis
    with pytest.raises(ConfigError, match="predictor_seed: .*" + re.escape(message)):  # lmgate serve --predictor-seed
        check_predictor_seed(str(path), "magnus")
