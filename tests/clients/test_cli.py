"""`lmgate chat` helpers: the conversation loop and run_chat against a real gateway."""

from __future__ import annotations

import argparse
import io

import anyio
import pytest

from clients.cli import add_chat_arguments, chat_loop, run_chat
from clients.client import LmgateClient
from tests.clients.conftest import Served
from tests.gateway.conftest import word


def lines(*items: str):  # type: ignore[no-untyped-def]
    queue = list(items)

    async def read() -> str | None:
        return queue.pop(0) if queue else None

    return read


@pytest.mark.parametrize("use_ws", [False, True], ids=["sse", "ws"])
def test_chat_loop_streams_and_keeps_history(served: Served, use_ws: bool) -> None:
    out = io.StringIO()

    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key) as client:
            await chat_loop(client, lines("hello", "", "again", "/reset", "fresh", "/quit", "never"), out,
                            system="be brief", params={"max_tokens": 2}, use_ws=use_ws)

    anyio.run(scenario, backend="trio")
    answer = word(0, 0) + word(0, 1)
    assert out.getvalue().count(answer + "\n") == 3
    assert "(history cleared)" in out.getvalue()
    second, third = served.runtime.calls[1], served.runtime.calls[2]
    assert [m.role for m in second.messages] == ["system", "user", "assistant", "user"]
    assert second.messages[2].content == answer
    assert [m.content for m in third.messages] == ["be brief", "fresh"]
    assert len(served.runtime.calls) == 3


def test_chat_loop_reports_request_errors_and_continues(served: Served) -> None:
    out = io.StringIO()

    async def scenario() -> None:
        async with LmgateClient(served.base_url, served.api_key) as client:
            await chat_loop(client, lines("FAIL", "ok"), out, params={"max_tokens": 1})

    anyio.run(scenario, backend="trio")
    assert "[error" in out.getvalue()
    assert [m.content for m in served.runtime.calls[-1].messages] == ["ok"]


def test_run_chat_once_and_bad_key(served: Served) -> None:
    parser = argparse.ArgumentParser()
    add_chat_arguments(parser)
    out = io.StringIO()
    args = parser.parse_args(["--url", served.base_url, "--api-key", served.api_key, "--once", "hi", "--max-tokens", "1"])
    assert run_chat(args, out=out) == 0
    assert out.getvalue() == word(0, 0) + "\n"
    # light sampling by default (a 135M model rambles at OpenAI's 1.0); given, what was given
    assert (served.runtime.calls[-1].params.temperature, served.runtime.calls[-1].params.top_p) == (0.2, 0.9)
    greedy = parser.parse_args(["--url", served.base_url, "--api-key", served.api_key, "--once", "hi",
                                "--temperature", "0", "--top-p", "1"])
    assert run_chat(greedy, out=io.StringIO()) == 0
    assert (served.runtime.calls[-1].params.temperature, served.runtime.calls[-1].params.top_p) == (0.0, 1.0)
    bad = parser.parse_args(["--url", served.base_url, "--api-key", "lmg-wrong", "--once", "hi"])
    assert run_chat(bad, out=io.StringIO()) == 1
    missing = parser.parse_args(["--url", served.base_url, "--once", "hi"])
    missing.api_key = None
    assert run_chat(missing, out=io.StringIO()) == 2
    empty = parser.parse_args(["--url", served.base_url, "--api-key", served.api_key, "--once", " "])
    assert run_chat(empty, out=io.StringIO()) == 2  # not a silent success that asked nothing


@pytest.mark.parametrize("use_ws", [False, True], ids=["sse", "ws"])
def test_run_chat_once_that_fails_exits_1_with_the_error_on_stderr(served: Served, use_ws: bool,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A script checks the exit status: a failed `--once` request said 0, its error on stdout."""
    parser = argparse.ArgumentParser()
    add_chat_arguments(parser)
    out = io.StringIO()
    args = parser.parse_args(["--url", served.base_url, "--api-key", served.api_key, "--once", "hi",
                              "--model", "nope"] + (["--ws"] if use_ws else []))
    assert run_chat(args, out=out) == 1
    assert "[error 404" in capsys.readouterr().err and "[error" not in out.getvalue()



class _CuttingProxy:
    """A TCP proxy to the gateway whose `cut` drops every connection open through it."""

    def __init__(self, port: int) -> None:
        self.port, self.open = port, []

    async def handle(self, downstream: anyio.abc.SocketStream) -> None:
        async with downstream, await anyio.connect_tcp("127.0.0.1", self.port) as upstream:
            self.open.append((downstream, upstream))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, downstream, upstream)
                tg.start_soon(self._pump, upstream, downstream)

    async def _pump(self, source, sink) -> None:  # type: ignore[no-untyped-def]
        try:
            async for data in source:
                await sink.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            await sink.aclose()

    async def cut(self) -> None:
        for pair in self.open:
            for stream in pair:
                await stream.aclose()
        self.open.clear()


def test_chat_over_the_websocket_opens_a_new_session_after_the_connection_drops(served: Served) -> None:
    """A server restarted under `lmgate chat --ws` failed every later turn ("WebSocket
    closed"): a session found closed is opened again, so the turn after a drop is answered."""
    out, err = io.StringIO(), io.StringIO()
    proxy = _CuttingProxy(int(served.base_url.rsplit(":", 1)[1]))
    said = ["hello", "again", "third", "/quit"]

    async def read() -> str | None:
        if said[0] == "again":  # (dropped while the user typed)
            await proxy.cut()
            await anyio.sleep(0.3)
        return said.pop(0)

    async def scenario() -> int:
        async with anyio.create_task_group() as tg:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
            tg.start_soon(listener.serve, proxy.handle)
            url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
            async with LmgateClient(url, served.api_key) as client:
                failed = await chat_loop(client, read, out, params={"max_tokens": 1}, use_ws=True, err=err)
            tg.cancel_scope.cancel()
        return failed

    # the turn right after the drop is answered once the session saw it closed (0.3 s); on a
    # busy machine it may not have yet: that turn fails, and the next one opens a session
    failed = anyio.run(scenario, backend="trio")
    assert failed <= 1, err.getvalue()
    assert out.getvalue().count(word(0, 0) + "\n") == 3 - failed
    assert [m.content for m in served.runtime.calls[-1].messages][-1] == "third"
