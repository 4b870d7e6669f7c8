"""`lmgate bench NAME`: every benchmark module in ops/ is reachable, and flags pass through."""

from __future__ import annotations

import importlib
import threading
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


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_every_benchmarks_usage_names_the_command_as_typed(capsys, name, monkeypatch):
    """`lmgate bench NAME --help` says `lmgate bench NAME`; `python -m ops.bench_NAME`
    says that (four benchmarks' usage named the module whichever was typed)."""
    with pytest.raises(SystemExit):
        main(["bench", name, "--help"])
    assert capsys.readouterr().out.startswith(f"usage: lmgate bench {name} ")
    module = importlib.import_module(BENCHES[name][0])
    monkeypatch.setattr("sys.argv", [module.__file__])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m {BENCHES[name][0]} ")


@pytest.mark.parametrize("bench, flag", [("beam", "--beams"), ("load", "--repeats"), ("kernels", "--iters"),
                                         ("scoring", "--questions"), ("structured", "--requests"),
                                         ("sched", "--real-requests"), ("lora", "--requests")])
def test_a_count_below_one_is_a_usage_error_naming_the_command(capsys, bench, flag):
    """Refused before anything runs (some took minutes, then a traceback), in the usage of
    the command as typed."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", bench, flag, "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"lmgate bench {bench}: error: argument {flag}: must be at least 1" in err


def test_bench_serve_says_in_one_line_what_it_cannot_reach_or_write(capsys, tmp_path):
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--disable-tqdm"]) == 2
    assert capsys.readouterr().err.strip().startswith("lmgate bench serve: cannot reach http://127.0.0.1:9")
    assert main(["bench", "serve", "--num-prompts", "1", "--save-result", str(tmp_path / "no" / "x.json")]) == 2
    assert "--save-result" in capsys.readouterr().err  # before any request
    assert main(["bench", "serve", "--dataset", "jsonl", "--dataset-path", str(tmp_path / "none.jsonl"),
                 "--num-prompts", "1"]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_bench_serve_says_in_one_line_that_the_server_refused_its_key_or_is_not_there(capsys):
    """Both backends: a refused key was a traceback ending in "(pass --model)", and the
    WebSocket backend's unreachable server a 90-line exception group."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuses(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = b'{"error": {"message": "invalid API key", "code": "invalid_api_key"}}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for backend in ("openai", "lmgate-ws"):
            assert main(["bench", "serve", "--base-url", url, "--backend", backend, "--api-key", "wrong",
                         "--num-prompts", "1", "--disable-tqdm"]) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and f"{url} refused the API key (401)" in err, err
    finally:
        server.shutdown()
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--backend", "lmgate-ws", "--num-prompts", "1",
                 "--disable-tqdm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lmgate bench serve: cannot reach http://127.0.0.1:9"), err
    assert main(["bench", "serve", "--request-rate", "abc", "--num-prompts", "1"]) == 2
    assert "--request-rate expects numbers" in capsys.readouterr().err


@pytest.mark.parametrize("bench", ["kernels", "engine", "sched", "lora"])
def test_a_json_path_that_cannot_be_written_is_refused_before_the_run(capsys, bench, tmp_path):
    """It was found when the report was written, after a run of minutes, as a traceback."""
    for bad in ("/proc/lmgate-no-such/k.json", str(tmp_path)):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", bench, "--json", bad])
        assert exit_.value.code == 2 and "argument --json" in capsys.readouterr().err
    made = tmp_path / "new" / "folder" / "r.json"
    from ops.cli import output_file

    assert output_file(str(made)) == made and made.parent.is_dir()
