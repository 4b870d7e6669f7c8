"""The `lmgate` command line: `generate`'s engine flags map onto `EngineConfig`, and every
way `serve` or `generate` can fail to start is one line on stderr with a non-zero status,
never a traceback."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gateway.cli import build_parser, engine_config_from_args, main, startup_failure
from gpu.config import CacheConfig, SchedulerConfig


@pytest.fixture(autouse=True)
def no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LMGATE_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


def one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"lmgate {command}")]
    assert len(lines) == 1, err
    return lines[0]


def quick(tmp_path: Path) -> list[str]:
    """Flags that make a `serve` which wrongly passes its checks fail fast at Redis (instead of
    loading the model and serving until killed); the flags under test come after and win."""
    return ["--port", "0", "--data-dir", str(tmp_path), "--redis-url", "redis://127.0.0.1:1/0"]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_generate_takes_the_engine_defaults_and_its_flags_override_them():
    cfg = engine_config_from_args(build_parser().parse_args(["generate", "hi"]))
    assert (cfg.cache.cache_bytes, cfg.scheduler.max_num_seqs) == (CacheConfig().cache_bytes,
                                                                   SchedulerConfig().max_num_seqs)
    assert cfg.cache.huge_pages and cfg.cache.enable_prefix_caching and not cfg.batch_invariant
    cfg = engine_config_from_args(build_parser().parse_args(
        ["generate", "--kv-cache-mb", "64", "--max-num-seqs", "8", "--no-kv-huge-pages", "--no-prefix-caching", "hi"]))
    assert (cfg.cache.cache_bytes, cfg.scheduler.max_num_seqs) == (64 * 1024**2, 8)
    assert not cfg.cache.huge_pages and not cfg.cache.enable_prefix_caching
    assert engine_config_from_args(build_parser().parse_args(["generate", "--batch-invariant", "hi"])).batch_invariant
    assert engine_config_from_args(build_parser().parse_args(["generate", "--quantization", "int8", "hi"])).quantization == "int8"
    assert cfg.model_cache_dir == ""
    assert engine_config_from_args(build_parser().parse_args(
        ["generate", "--model-cache-dir", "/var/cache/lmgate", "hi"])).model_cache_dir == "/var/cache/lmgate"


@pytest.mark.slow
def test_convert_writes_the_lmg_format_and_generate_runs_it(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    from gpu.fastload import is_lmg_folder
    from gpu.loader import load_checkpoint

    dst = tmp_path / "lmg"
    assert main(["convert", "smollm2", str(dst), "--dtype", "bfloat16", "--format", "lmg", "--quiet"]) == 0
    assert is_lmg_folder(dst) and not (dst / "model.safetensors").exists()
    assert main(["generate", "--model", str(dst), "--dtype", "bfloat16", "--kv-cache-mb", "16", "--max-tokens", "8",
                 "--beam-width", "2", "--json", "What is the capital of France?"]) == 0
    assert '"finish_reason"' in capsys.readouterr().out
    # the folder holds a checkpoint now: refused without --overwrite, its lmg files left as they were
    data_mtime = (dst / "model.lmg").stat().st_mtime_ns
    assert main(["convert", "smollm2", str(dst), "--quiet"]) == 2
    assert one_line_error(capsys, "convert").endswith(
        "already holds a checkpoint (model.lmg, model.lmg.index.json); --overwrite replaces it")
    assert (dst / "model.lmg").stat().st_mtime_ns == data_mtime
    # replaced by safetensors: the lmg files go (a loader would read their stale bfloat16 weights first)
    assert main(["convert", "smollm2", str(dst), "--overwrite", "--quiet"]) == 0
    assert not (dst / "model.lmg").exists() and not (dst / "model.lmg.index.json").exists()
    assert sorted(p.name for p in dst.iterdir() if not p.name.startswith("tokenizer")) == ["config.json",
                                                                                           "model.safetensors"]
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "F32"
    assert load_checkpoint(str(dst), torch.float32).config.vocab_size == 49152
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse refuses a format that is not a choice
        main(["convert", "smollm2", str(tmp_path / "x"), "--format", "gguf"])
    assert e.value.code == 2 and "invalid choice: 'gguf'" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--kv-cache-mb", "0"], "--kv-cache-mb must be positive, got 0"),
    (["--max-model-len", "-1"], "--max-model-len must be positive"),
    (["--threads", "-2"], "--threads must be >= 0"),
    (["--device", "bogus"], "device must be cpu, cuda or cuda:N"),
    (["--file", "/nonexistent/prompts.txt"], "cannot read /nonexistent/prompts.txt"),
    (["--lora", "/nonexistent/adapter", "--batch-invariant"], "LoRA adapters are not batch-invariant"),
    (["--regex", "a+", "--choice", "b"], "give at most one of --json-schema"),
    (["--json-schema", "@/nonexistent/schema.json"], "cannot read /nonexistent/schema.json"),
    (["--json-schema", "{oops"], "not valid JSON"),
    (["--choice", ""], "choices must not be empty strings"),
    (["--regex", "a+", "--beam-width", "2"], "not supported with beam search"),
])
def test_generate_reports_bad_flags_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                flags: list[str], message: str) -> None:
    # a missing model: a flag wrongly accepted fails fast instead of loading and generating
    assert main(["generate", "--model", str(tmp_path / "missing.gguf"), *flags, "hi"]) == 2
    assert message in one_line_error(capsys, "generate")


@pytest.mark.slow
def test_generate_constrains_the_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import re

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                                  "required": ["city"], "additionalProperties": False}))
    common = ["generate", "--dtype", "float32", "--kv-cache-mb", "16", "--max-tokens", "40", "--json"]
    assert main([*common, "-n", "2", "--temperature", "1.0", "--seed", "3", "--regex", "[0-9]{3}-[0-9]{2}",
                 "Give me a code."]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(re.fullmatch("[0-9]{3}-[0-9]{2}", x["text"]) for x in lines), lines
    assert main([*common, "--json-schema", f"@{schema}", "Name a city in Italy."]) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["finish_reason"] == "stop" and set(json.loads(line["text"])) == {"city"}
    assert main([*common, "--regex", "(unclosed", "hi"]) == 2  # compiles only against the model's tokenizer
    assert "unclosed group" in one_line_error(capsys, "generate")
    assert main([*common, "--regex", "(a{1000}){1000}", "hi", "there"]) == 2  # compiles, then breaks on its first token
    assert "prompt 1: the output constraint failed" in one_line_error(capsys, "generate")


def test_generate_reports_a_missing_model_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["generate", "--model", str(tmp_path / "missing.gguf"), "hi"]) == 2
    assert "missing.gguf' is neither" in one_line_error(capsys, "generate")


@pytest.mark.parametrize(("flags", "message"), [
    (["--log-level", "bogus"], "log level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'bogus'"),
    (["--redis-url", "notaurl"], "redis_url must start with redis://, rediss:// or unix://"),
    (["--device", "bogus"], "device must be cpu, cuda or cuda:N"),
    (["--port", "8080.7"], "setting 'port' (flag --port): expected an integer"),
    (["--keep-alive-seconds", "-5"], "keep_alive_seconds must be a finite number >= 0"),
    (["--config", "/nonexistent.toml"], "config file /nonexistent.toml: No such file or directory"),
    (["--lora-modules", "support=/nonexistent/adapter"], "support=/nonexistent/adapter: no adapter_config.json"),
    (["--lora-modules", "support"], "'support' is not NAME=PATH"),
    (["--max-loras", "0"], "max_loras and max_lora_rank must be at least 1"),
    # tracebacks before (an AssertionError in coredis, an OverflowError in listen(), torch's
    # allocator), or accepted: the database silently 0, any body buffered
    (["--redis-url", "redis://:::"], "redis_url 'redis://:::': Port could not be cast"),
    (["--redis-url", "redis://127.0.0.1:1/abc"], "the path is the database number"),
    (["--listen-backlog", "99999999999999"], "listen_backlog must be at most 65535"),
    (["--max-body-bytes", "100000000000000"], "max_body_bytes must be at most 1073741824"),
    (["--kv-cache-mb", str(2**40)], f"kv_cache_mb {2**40} MiB does not fit in"),
    (["--log-level", "loud"], "got 'loud'"),
    (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:0: Cannot assign requested address (see --host)"),
])
def test_serve_reports_bad_settings_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                flags: list[str], message: str) -> None:
    assert main(["serve", *quick(tmp_path), *flags]) == 2
    assert message in one_line_error(capsys, "serve")


def test_a_cuda_device_this_torch_cannot_use_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """It was torch's AssertionError traceback from inside the engine's start."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    assert main(["generate", "--device", "cuda", "hi"]) == 2
    assert "this torch has no usable CUDA" in one_line_error(capsys, "generate")
    assert main(["serve", *quick(tmp_path), "--device", "cuda:1"]) == 2
    assert "this torch has no usable CUDA" in one_line_error(capsys, "serve")


def test_convert_onto_a_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert main(["convert", "smollm2", str(taken), "--quiet"]) == 2
    assert "is a file, not a folder" in one_line_error(capsys, "convert") and taken.read_text() == "mine"


def test_a_failed_convert_leaves_no_empty_folder_behind(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    broken = tiny_lmg_folder(tmp_path / "broken")
    (broken / "model.lmg").write_bytes(b"\0" * 64)  # truncated
    assert main(["convert", str(broken), str(tmp_path / "out"), "--quiet"]) == 2
    assert "lmgate convert:" in one_line_error(capsys, "convert") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"port = \n", b"\xff\xfe", b"port = 9999\n[gateway]\nmax_waiting = 5\n"])
def test_serve_reports_a_bad_config_file_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, content: bytes) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    monkeypatch.setenv("LMGATE_CONFIG", str(path))
    assert main(["serve", *quick(tmp_path)]) == 2
    assert str(path) in one_line_error(capsys, "serve")


def test_serve_reports_a_taken_port_before_anything_starts(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          taken_port: int) -> None:
    # an unreachable Redis and a missing model: the port is checked before either is tried
    assert main(["serve", "--port", str(taken_port), "--data-dir", str(tmp_path), "--redis-url",
                 "redis://127.0.0.1:1/0", "--model", str(tmp_path / "missing.gguf")]) == 1
    line = one_line_error(capsys, "serve")
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in line
    assert not (tmp_path / "server_secret").exists()


def test_serve_reports_an_unreachable_redis_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # without a dev tenant to create as well (the deploy files' way): the server secret could
    # not be checked against the keys, and a server that started anyway never checked it
    for dev_tenant in ([], ["--no-dev-tenant"]):
        assert main(["serve", *quick(tmp_path), *dev_tenant]) == 1
        assert "Redis at redis://127.0.0.1:1/0 unreachable" in one_line_error(capsys, "serve")
    assert "serving without it" not in caplog.text  # (it said so, then stopped)


def test_serve_reports_a_missing_model_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   redis_url: str) -> None:
    assert main(["serve", "--port", "0", "--data-dir", str(tmp_path), "--redis-url", redis_url, "--no-dev-tenant",
                 "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "cannot load the model: model" in one_line_error(capsys, "serve")
    # said before anything starts: no private redis-server was started under the data dir
    assert main(["serve", "--port", "0", "--data-dir", str(tmp_path / "fresh"), "--model",
                 str(tmp_path / "missing.gguf")]) == 2
    assert "cannot load the model: model" in one_line_error(capsys, "serve")
    assert not (tmp_path / "fresh" / "redis").exists()
    # so is a path that holds no model (a folder without config.json): before, it started the
    # private Redis and created the dev tenant, whose once-shown key went with the failed run
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--port", "0", "--data-dir", str(tmp_path / "fresh"), "--model",
                 str(tmp_path / "empty")]) == 2
    assert "expected a .gguf file or a folder with config.json" in one_line_error(capsys, "serve")
    assert not (tmp_path / "fresh" / "redis").exists()


def test_a_port_taken_after_the_check_is_unwrapped_from_the_nursery_groups(taken_port: int) -> None:
    """Hypercorn's bind failure arrives as an OSError nested in trio nursery groups."""
    from gateway.config import GatewayConfig
    from gateway.server import serve_app

    async def app(scope, receive, send):  # lifespan only: the bind fails before any request
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    config = GatewayConfig(port=taken_port)
    with pytest.raises(BaseExceptionGroup) as info:
        trio.run(serve_app, app, config)
    assert startup_failure(info.value, config) == (
        1, f"cannot listen on 127.0.0.1:{taken_port}: address already in use")


def test_unknown_failures_are_not_disguised_as_start_up_errors(tmp_path: Path) -> None:
    from cache.store import CacheUnavailable
    from gateway.config import GatewayConfig

    config = GatewayConfig(host="h", port=1, data_dir=str(tmp_path / "data"))
    assert startup_failure(OSError(errno.EACCES, "denied"), config) is None
    assert startup_failure(PermissionError(errno.EACCES, "denied", str(tmp_path / "elsewhere")), config) is None
    assert startup_failure(RuntimeError("a bug"), config) is None
    assert startup_failure(ExceptionGroup("g", [CacheUnavailable("x"), KeyError("bug")]), config) is None
    assert startup_failure(ExceptionGroup("g", [ExceptionGroup("h", [CacheUnavailable("Redis at u unreachable")])]),
                           config) == (1, "Redis at u unreachable (is Redis running? see --redis-url)")


def test_serve_help_documents_the_server_secret(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "LMGATE_SECRET" in out and "Every gateway sharing a Redis must use the same one" in out
    assert "delete the key lmgate:secret_check in Redis" in out
    assert "DEBUG, INFO, WARNING, ERROR or CRITICAL" in out
    assert "--log-level from LMGATE_LOG_LEVEL" in out and "log_level in the settings file" in out


def test_a_secret_mismatch_is_one_line_with_status_2() -> None:
    from cache.tenants import SecretMismatch
    from gateway.config import GatewayConfig

    group = BaseExceptionGroup("nursery", [SecretMismatch("issued under another server secret")])
    assert startup_failure(group, GatewayConfig()) == (2, "issued under another server secret")


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_int8_on_a_cpu_without_a_usable_int8_kernel_is_refused_in_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    import gpu.engine
    import gpu.quantization

    monkeypatch.setattr(gpu.quantization, "int8_unavailable_reason", lambda threads=0: "no int8 here")
    monkeypatch.setattr(gpu.engine, "Engine", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    flags = quick(tmp_path) if command == "serve" else ["--kv-cache-mb", "16", "hi"]
    assert main([command, "--quantization", "int8", *flags]) == 1
    assert one_line_error(capsys, command).endswith("int8 quantization is not available: no int8 here")


def tiny_lmg_folder(path: Path, *, tokenizer: bool = False) -> Path:
    """A random 1-layer Llama in the lmg format (no tokenizer files)."""
    import json

    import torch

    from gpu.config import ModelConfig
    from gpu.convert import hf_config_dict
    from gpu.fastload import write_lmg
    from gpu.loader import expected_shapes

    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, eos_token_ids=(0,))
    write_lmg({name: torch.randn(shape) for name, shape in expected_shapes(config).items()}, path)
    (path / "config.json").write_text(json.dumps(hf_config_dict(config, "float32")))
    return path


def test_broken_model_folders_are_one_line_errors_not_tracebacks(capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    from gateway.config import GatewayConfig
    from gpu.fastload import INDEX_FILE
    from gpu.tokenizer import TokenizerError

    no_tokenizer = tiny_lmg_folder(tmp_path / "no-tokenizer")
    assert main(["generate", "--model", str(no_tokenizer), "--dtype", "float32", "hi"]) == 2
    assert "carries no tokenizer" in one_line_error(capsys, "generate")
    assert startup_failure(TokenizerError("no tokenizer"), GatewayConfig()) == (
        2, "cannot load the model: no tokenizer")

    bad_config = tiny_lmg_folder(tmp_path / "bad-config")
    (bad_config / "config.json").write_text('{"hidden_size": 100}')
    assert main(["generate", "--model", str(bad_config), "hi"]) == 2
    assert "not a usable Llama config (missing 'num_attention_heads')" in one_line_error(capsys, "generate")
    (bad_config / "config.json").write_text('[1, 2]')
    assert main(["generate", "--model", str(bad_config), "hi"]) == 2
    assert "not a JSON object" in one_line_error(capsys, "generate")

    no_index = tiny_lmg_folder(tmp_path / "no-index")
    (no_index / INDEX_FILE).unlink()
    assert main(["generate", "--model", str(no_index), "hi"]) == 2
    assert "model.lmg without its index model.lmg.index.json" in one_line_error(capsys, "generate")


def test_generate_refuses_a_kv_cache_larger_than_the_ram(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["generate", "--model", str(tmp_path / "missing.gguf"), "--kv-cache-mb", str(2**40), "hi"]) == 2
    assert "does not fit in this machine's RAM" in one_line_error(capsys, "generate")


@pytest.mark.parametrize("env", [{"LMGATE_LOG_LEVEL": "loud"}, {"LMGATE_SECRET": "short"},
                                 {"LMGATE_LISTEN_BACKLOG": "99999999999999"}])
def test_serve_reports_bad_settings_from_the_environment_in_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", *quick(tmp_path)]) == 2
    one_line_error(capsys, "serve")


def test_serve_takes_the_log_level_from_the_environment_and_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.server
    from gateway.config import config_from_args

    levels = []  # the level run_serve configures logging with
    monkeypatch.setattr(gateway.server, "run_serve", lambda args: levels.append(config_from_args(args).log_level) or 0)
    config = tmp_path / "c.toml"
    config.write_text('log_level = "ERROR"\n')
    assert main(["serve", *quick(tmp_path)]) == 0
    assert main(["serve", *quick(tmp_path), "--config", str(config)]) == 0
    monkeypatch.setenv("LMGATE_LOG_LEVEL", "debug")
    assert main(["serve", *quick(tmp_path), "--config", str(config)]) == 0
    assert main(["serve", *quick(tmp_path), "--log-level", "WARNING"]) == 0
    assert levels == ["INFO", "ERROR", "debug", "WARNING"]


def test_serve_warns_of_an_lmgate_variable_it_does_not_read(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"LMGATE_MAXNUMSEQS": "1", "LMGATE_SECRET": "s" * 32, "LMGATE_URL": "http://x",
                        "LMGATE_API_KEY": "k", "LMGATE_HF_CACHE": "/tmp"}.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", *quick(tmp_path)]) == 1  # a warning: it starts (and finds no Redis)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["lmgate serve: warning: LMGATE_MAXNUMSEQS is not a variable lmgate reads (ignored); "
                        "did you mean LMGATE_MAX_NUM_SEQS?"]


def test_serve_reports_a_data_dir_it_cannot_use_in_one_line(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["serve", *quick(tmp_path), "--data-dir", str(afile)]) == 2
    assert "exists and is not a folder" in one_line_error(capsys, "serve")
    # a folder that cannot be created although its parent is one: found when the server starts
    assert main(["serve", *quick(tmp_path), "--data-dir", "/proc/lmgate-no-such-dir"]) == 2
    assert "cannot use the data dir /proc/lmgate-no-such-dir: " in one_line_error(capsys, "serve")
    # nor can a folder above it, which making it makes
    assert main(["serve", *quick(tmp_path), "--data-dir", "/proc/lmgate-no-such-dir/data"]) == 2
    assert ("cannot use the data dir /proc/lmgate-no-such-dir/data: " in one_line_error(capsys, "serve"))


def test_serve_reports_a_short_secret_file_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "server_secret").write_text("short")
    assert main(["serve", *quick(tmp_path)]) == 2
    assert "the server secret must be at least 16 bytes, got 5" in one_line_error(capsys, "serve")


def test_serve_reports_a_database_redis_refuses_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                           redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/99"  # a well-formed URL, beyond the server's 16 databases
    assert main(["serve", "--port", "0", "--data-dir", str(tmp_path), "--redis-url", url]) == 1
    assert "Redis refused the database number of --redis-url: DB index is out of range" in one_line_error(
        capsys, "serve")


def test_start_up_failures_found_while_starting_are_one_line(tmp_path: Path) -> None:
    import coredis.exceptions

    from actors.predictor import PredictorBlobError
    from cache.tenants import SecretTooShort
    from gateway.config import GatewayConfig

    config = GatewayConfig(port=8000, data_dir=str(tmp_path / "data"))
    nursery = BaseExceptionGroup
    status, message = startup_failure(nursery("n", [PredictorBlobError("not an .npz archive")]), config)
    assert status == 2 and message.startswith("cannot load the Magnus length predictor (the one Redis holds, else "
                                              "--predictor-seed): not an .npz archive; replace")
    assert startup_failure(nursery("n", [SecretTooShort("too short")]), config) == (2, "too short")
    assert startup_failure(nursery("n", [coredis.exceptions.ResponseError("DB index is out of range")]),
                           config)[0] == 1
    assert startup_failure(coredis.exceptions.AuthenticationFailureError("WRONGPASS"), config)[0] == 1
    assert startup_failure(coredis.exceptions.ResponseError("ERR a bug in a script"), config) is None
    assert startup_failure(socket.gaierror(socket.EAI_NONAME, "Name or service not known"), config) == (
        2, "cannot listen on 127.0.0.1:8000: Name or service not known (see --host)")
    assert startup_failure(socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), config) is None
    assert startup_failure(FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "data")), config) == (
        2, f"cannot use the data dir {tmp_path / 'data'}: File exists: {tmp_path / 'data'}")
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 104857599836160 bytes.")
    status, message = startup_failure(nursery("n", [nursery("m", [oom])]), config)
    assert status == 1 and message.startswith("out of memory (see --kv-cache-mb): [enforce fail")


def test_lmgate_help_does_not_load_the_engine() -> None:
    """`lmgate --help` answers at once: building the parser imports neither torch nor the server."""
    import subprocess
    import sys

    code = ("import sys, gateway.cli; gateway.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'gateway.server') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_generate_refuses_a_count_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--max-tokens", "0", "hi"])
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


class _Served:
    """`lmgate serve` in a child process, its stderr read line by line on a thread."""

    def __init__(self, *flags: str) -> None:
        import queue
        import subprocess
        import sys
        import threading

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # as started from a terminal, even when the suite runs under nohup (lmgate leaves an
        # ignored SIGHUP ignored)
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", *flags], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err: list[str] = []

        def read() -> None:
            for line in self.proc.stderr:  # type: ignore[union-attr]
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=read, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 300.0) -> str:
        import time

        deadline = time.monotonic() + timeout
        while (line := self.lines.get(timeout=max(0.1, deadline - time.monotonic()))) is not None:
            self.err.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} never came: {''.join(self.err)}")

    def finish(self, timeout: float = 120.0) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=10)) is not None:
            self.err.append(line)
        return rc, "".join(self.err)


@pytest.mark.slow
def test_stop_signals_end_lmgate_serve_cleanly(tmp_path: Path, redis_url: str) -> None:
    """Ctrl-C while the model loads: one line and status 130, no traceback. Serving: a
    first stop signal (SIGHUP: the terminal closed; it killed lmgate mid-stream) starts the
    graceful stop, a second (SIGTERM) ends the streams at once with their error event (not
    a cut, and not the 600 s grace), and lmgate exits 0."""
    import time

    import httpx

    from gateway.sse import parse_events

    flags = ["--port", "0", "--data-dir", str(tmp_path), "--redis-url", redis_url, "--threads", "1",
             "--admin-key", "adm", "--embedding-model", "none", "--kv-cache-mb", "256", "--dtype", "float32"]
    loading = _Served(*flags)
    loading.wait_for("engine")  # (a line the model's loading logs)
    loading.proc.send_signal(signal.SIGINT)
    rc, err = loading.finish()
    assert rc == 130 and "lmgate serve: interrupted" in err and "Traceback" not in err, err

    served = _Served(*flags, "--shutdown-grace-seconds", "600")
    url = served.wait_for("Running on").split("Running on ")[1].split()[0]
    with httpx.Client(base_url=url, timeout=60) as client:
        admin = {"Authorization": "Bearer adm"}
        client.post("/admin/tenants", json={"id": "sig", "name": "Sig"}, headers=admin).raise_for_status()
        key = client.post("/admin/tenants/sig/keys", json={"name": "k"}, headers=admin).json()["key"]
        text, signalled = "", None
        with client.stream("POST", "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "SmolLM2-135M-Instruct", "prompt": "Once", "max_tokens": 4000,
                                 "ignore_eos": True, "stream": True}) as r:
            for chunk in r.iter_text():
                text += chunk
                if signalled is None:
                    served.proc.send_signal(signal.SIGHUP)
                    signalled = time.monotonic()
                    time.sleep(0.5)
                    served.proc.send_signal(signal.SIGTERM)
    events = parse_events(text)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down", events[-2:]
    assert time.monotonic() - signalled < 60
    rc, err = served.finish()
    assert rc == 0 and "Traceback" not in err, err
    assert "received SIGHUP: graceful shutdown" in err and "received SIGTERM again: ending every request now" in err


def test_what_redis_refused_at_start_is_named_not_asked_if_it_runs() -> None:
    """Credentials refused, or a TLS handshake failed, under the store's CacheUnavailable:
    the one line names it (a review: "is Redis running?" for a certificate not trusted)."""
    import ssl

    import coredis.exceptions

    from cache.store import CacheUnavailable
    from gateway.config import GatewayConfig

    def wrapped(cause: BaseException) -> BaseExceptionGroup:
        try:
            raise CacheUnavailable("Redis at redis://:***@h/0 refuses this client's credentials") from cause
        except CacheUnavailable as exc:
            return BaseExceptionGroup("nursery", [exc])

    code, line = startup_failure(wrapped(coredis.exceptions.AuthenticationFailureError("WRONGPASS invalid")),
                                 GatewayConfig())
    assert code == 1 and line.startswith("Redis refused the credentials of --redis-url")
    code, line = startup_failure(wrapped(coredis.exceptions.AuthenticationRequiredError("NOAUTH required")),
                                 GatewayConfig())
    assert code == 1 and line.startswith("Redis requires a password: give it in --redis-url")
    code, line = startup_failure(wrapped(coredis.exceptions.AuthorizationError("NOPERM no keys")), GatewayConfig())
    assert code == 1 and line.startswith("Redis denies the --redis-url user a command or key lmgate needs")
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message = "self-signed certificate in certificate chain"
    try:
        try:
            raise untrusted
        except ssl.SSLError as e:
            raise coredis.exceptions.ConnectionError("Unable to establish a connection") from e
    except coredis.exceptions.ConnectionError as conn:
        code, line = startup_failure(wrapped(conn), GatewayConfig())
    assert code == 1 and "TLS: self-signed certificate in certificate chain" in line
