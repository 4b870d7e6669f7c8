"""Server-sent events in OpenAI's streaming format.

Each event is one ``data:`` line holding a JSON chunk and a blank line; the stream
ends with ``data: [DONE]``. Nothing else (no ``event:``/``id:`` fields) because
OpenAI clients parse exactly this, apart from the comment line `PING` that a silent
stream sends now and then (`GatewayConfig.sse_ping_seconds`), which SSE parsers skip.
The Responses API's stream is the exception: each event is named (``event: <type>``)
and there is no ``[DONE]`` (`named_event`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

DONE = b"data: [DONE]\n\n"
# a comment line: SSE parsers skip it (OpenAI's SDKs included); it keeps an idle stream's
# connection from a proxy's read timeout (nginx's proxy_read_timeout is 60 s by default)
PING = b": ping\n\n"


@dataclass(frozen=True)
class Idle:
    """What an event source yields when it had nothing for a stream's ping interval
    (`GatewayConfig.sse_ping_seconds`): the stream sends `PING`, so that a proxy's read
    timeout does not cut a request that waits in the queue or runs a beam search (whose
    answer comes at its end)."""


IDLE = Idle()

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell proxies (nginx) not to buffer the stream
}


def event(payload: Any) -> bytes:
    """One SSE event from a JSON-encodable value (msgspec Structs included)."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def named_event(name: str, payload: Any) -> bytes:
    """One SSE event with an ``event:`` name (the Responses API's stream)."""
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(payload) + b"\n\n"


def parse_events(text: str) -> list[str]:
    """Split an SSE body into its ``data`` payloads (for tests and the client)."""
    out = []
    for block in text.split("\n\n"):
        data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out
