"""`lmgate chat`: an interactive chat on the terminal, streaming each answer.

Reads a line, sends the conversation so far, prints the answer as it streams
(over SSE, or over the WebSocket with ``--ws``), and keeps the history. Commands:
``/reset`` forgets the history, ``/quit`` (or end of input) leaves. Ctrl-C while an
answer streams stops it (the server aborts the request) and returns to the prompt;
Ctrl-C at the prompt leaves (exit status 130). With ``--once`` a failed request's error goes to stderr and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, TextIO

import anyio

from clients.client import LmgateClient
from clients.errors import AuthError, LmgateError

ReadLine = Callable[[], Awaitable[str | None]]


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("LMGATE_URL", "http://127.0.0.1:8000"),
                        help="gateway base URL (env LMGATE_URL; default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=os.environ.get("LMGATE_API_KEY"),
                        help="tenant API key (env LMGATE_API_KEY)")
    parser.add_argument("--model", default=None, help="model id (default: the first one the server lists)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length limit (default 256)")
    # light sampling by default: the server's (OpenAI's) temperature 1.0 makes a small model
    # ramble (SmolLM2's model card suggests 0.2 and top_p 0.9 for its instruct models)
    parser.add_argument("--temperature", type=float, default=0.2,
                        help="sampling temperature (default 0.2; 0 = greedy)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; 1 = off)")
    parser.add_argument("--ws", action="store_true", help="stream over the WebSocket instead of SSE")
    parser.add_argument("--once", metavar="PROMPT", default=None, help="ask one question, print the answer, exit")


async def stdin_reader() -> str | None:
    """One line from the terminal (None at end of input), read in a worker thread."""

    def read() -> str | None:
        try:
            return input("you> ")
        except EOFError:
            return None

    return await anyio.to_thread.run_sync(read, abandon_on_cancel=True)


async def answer(client: LmgateClient, session: Any, messages: list[dict[str, str]], params: dict[str, Any], out: TextIO) -> str:
    """Stream one answer to `out`; returns its text."""
    stream = session.chat_stream(messages, **params) if session is not None else client.chat_stream(messages, **params)
    parts: list[str] = []
    async with stream:
        async for delta in stream:
            if delta.index == 0 and delta.text:
                parts.append(delta.text)
                out.write(delta.text)
                out.flush()
    out.write("\n")
    return "".join(parts)


async def chat_loop(
    client: LmgateClient,
    read_line: ReadLine,
    out: TextIO,
    *,
    system: str | None = None,
    params: dict[str, Any] | None = None,
    use_ws: bool = False,
    err: TextIO | None = None,
) -> int:
    """The conversation loop (I/O injected so it can be tested without a terminal). A turn
    that fails prints `[error …]` to `err` (default: `out`, inline in the conversation)
    and the conversation goes on; returns how many turns failed."""
    failed = 0
    params = params or {}
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    async def turns(ws: _Session | None) -> None:
        while True:
            line = await read_line()
            if line is None or line.strip() == "/quit":
                return
            if line.strip() == "/reset":
                del history[1 if system else 0:]
                out.write("(history cleared)\n")
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            try:
                text = await answer(client, await ws.get() if ws is not None else None, history, params, out)
            except KeyboardInterrupt:
                out.write("\n(stopped)\n")
                history.pop()
                continue
            except AuthError:
                raise
            except LmgateError as error:
                nonlocal failed
                failed += 1
                status = f" {error.status}" if error.status else ""  # (0: no answer came: a connection failure)
                (err or out).write(f"\n[error{status}: {error.message}]\n")
                history.pop()  # (a socket it closed, or that never came, is opened again by `get`)
                continue
            history.append({"role": "assistant", "content": text})

    if use_ws:
        ws = _Session(client)
        try:
            await turns(ws)
        finally:
            await ws.drop()
    else:
        await turns(None)
    return failed


class _Session:
    """The WebSocket session of a chat, opened at the first turn and again at a turn that
    finds it closed or never opened (a server restarted: every later turn failed, before)."""

    def __init__(self, client: LmgateClient) -> None:
        self.client = client
        self._stack: AsyncExitStack | None = None
        self._session: Any = None

    async def get(self) -> Any:
        if self._session is not None and self._session.closed:  # (dropped while the user typed)
            await self.drop()
        if self._session is None:
            stack = AsyncExitStack()
            self._session = await stack.enter_async_context(self.client.ws())
            self._stack = stack
        return self._session

    async def drop(self) -> None:
        stack, self._stack, self._session = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(LmgateError):
                await stack.aclose()


def run_chat(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if not args.api_key:
        print("lmgate chat: an API key is required (--api-key or LMGATE_API_KEY)", file=sys.stderr)
        return 2
    if args.once is not None and not args.once.strip():
        print("lmgate chat: --once needs a prompt (it is empty)", file=sys.stderr)
        return 2
    params: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    once_done = False

    async def once_reader() -> str | None:
        nonlocal once_done
        if once_done:
            return None
        once_done = True
        return args.once

    async def main() -> int:
        async with LmgateClient(args.url, args.api_key, model=args.model) as client:
            if args.once is not None:  # a script's call: its error on stderr, and a failing exit status
                return await chat_loop(client, once_reader, out, system=args.system, params=params,
                                       use_ws=args.ws, err=sys.stderr)
            return await chat_loop(client, stdin_reader, out, system=args.system, params=params, use_ws=args.ws)

    try:
        failed = anyio.run(main, backend="trio")
    except AuthError as error:
        print(f"lmgate chat: {error.message}", file=sys.stderr)
        return 1
    except LmgateError as error:
        print(f"lmgate chat: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 1 if failed and args.once is not None else 0
