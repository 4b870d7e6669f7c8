"""Async Python client for lmgate (anyio + httpx: runs under trio and asyncio).

::

    async with LmgateClient("http://127.0.0.1:8000", api_key) as client:
        answer = await client.chat([{"role": "user", "content": "Hi"}], max_tokens=32)
        async with client.chat_stream([{"role": "user", "content": "Hi"}]) as stream:
            async for delta in stream:          # Delta(index, text, finish_reason)
                print(delta.text, end="")
        print(stream.usage)
        async with client.ws() as session:      # several requests on one WebSocket
            ...
        first = await client.respond("Hi", instructions="Be brief.")   # the Responses API
        again = await client.respond("And?", previous_response_id=first.id)
        async with client.respond_stream("Hi") as events:
            async for event in events:          # {"type": "response.output_text.delta", ...}
                ...
        print(events.response.text)
        vectors = (await client.embed(["first text", "second text"])).vectors   # /v1/embeddings
        ranked = (await client.rerank("a query", ["doc one", "doc two"])).results  # best first

Cancellation: leaving a stream early (``break`` inside ``async with``, an
exception, a cancel scope) closes the HTTP connection, and the gateway aborts the
request; on the WebSocket it sends a ``cancel`` frame. Prefer the ``async with``
form: a bare ``async for`` over a stream also works, but then the connection is
only closed when the stream object is garbage-collected.

Retries (opt-in, ``retry=RetryPolicy(...)``): 429 and 503 replies and connection
failures are retried with exponential backoff, waiting at least the server's
``Retry-After``; a 429 without Retry-After (cannot succeed) is not retried. A POST
(every generation, embedding, score) is retried after a connection failure only if it
cannot have reached the server (connect error or timeout, pool timeout): once sent, a
broken connection or a read timeout (`TimedOut`) may leave it running, and billed, on
the server, so sending it again could generate it twice. Streams are retried only
before their first byte. A Retry-After beyond `RetryPolicy.max_retry_after` is raised,
not waited for. A WebSocket stream refused before its first token (429, 503) is sent
again on its session, under a new id; a dropped socket is not reconnected.

Every failure is a `clients.errors.LmgateError`: httpx's own exceptions are mapped
(`request_error`), and a request that cannot be sent at all (a malformed base URL, an
API key that is not printable ASCII) is `InvalidRequest`.

A stream object is one request: once finished or closed, iterating it again yields
nothing, and entering it again (``async with``) raises `InvalidRequest`.
"""

from __future__ import annotations

import base64
import json
import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import anyio
import httpx
import msgspec

from clients.errors import (
    ConnectionFailed,
    InvalidRequest,
    LmgateError,
    Overloaded,
    RateLimited,
    TimedOut,
    error_for,
    status_of_type,
)

T = TypeVar("T")


# ---------------------------------------------------------------- results


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None  # {"cached_tokens": n}

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the server did not compute (prefix-cache hits, or a cached answer)."""
        return (self.prompt_tokens_details or {}).get("cached_tokens", 0)


class Choice(msgspec.Struct, frozen=True):
    index: int
    text: str
    finish_reason: str | None
    # as the server sent it: completions' {"tokens", "token_logprobs", "top_logprobs",
    # "text_offset"} (with `echo`, the prompt's tokens first), chat's {"content": [...]}
    logprobs: dict[str, Any] | None = None
    # chat with tools: OpenAI's [{"id", "type": "function", "function": {"name", "arguments"}}]
    # (`text` is then empty; the arguments are a JSON string)
    tool_calls: list[dict[str, Any]] | None = None


class Completion(msgspec.Struct, frozen=True):
    """A finished (non-streamed) completion or chat completion."""

    id: str
    model: str
    choices: list[Choice]
    usage: Usage

    @property
    def text(self) -> str:
        return self.choices[0].text


class Delta(msgspec.Struct, frozen=True):
    """New text of one choice; the last delta of a choice carries its finish_reason."""

    index: int
    text: str
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # WebSocket only
    # chat with tools: a choice's calls, whole (the stream's pieces joined), just before its finish
    tool_calls: list[dict[str, Any]] | None = None


class Response(msgspec.Struct, frozen=True):
    """A Responses API response (`LmgateClient.respond`): `raw` is the object as sent."""

    raw: dict[str, Any]

    @property
    def id(self) -> str:
        return self.raw["id"]

    @property
    def status(self) -> str:
        """completed, incomplete (cut at max_output_tokens) or failed; a background
        response is queued, then in_progress, until it ends (or is cancelled)."""
        return self.raw["status"]

    @property
    def text(self) -> str:
        """The output text of its message items."""
        return "".join(part.get("text", "") for item in self.raw.get("output", []) if item.get("type") == "message"
                       for part in item.get("content", []) if part.get("type") == "output_text")

    @property
    def function_calls(self) -> list[dict[str, Any]]:
        """Its function_call items (`call_id`, `name`, `arguments` as a JSON string)."""
        return [item for item in self.raw.get("output", []) if item.get("type") == "function_call"]

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.raw.get("usage")


class Embeddings(msgspec.Struct, frozen=True):
    """`/v1/embeddings`' answer (`LmgateClient.embed`): one vector per input, in order."""

    vectors: list[list[float]]
    model: str
    prompt_tokens: int


def embeddings_from(body: dict[str, Any]) -> Embeddings:
    """The answer's vectors, from floats or from base64 (little-endian float32)."""
    vectors = []
    for item in sorted(body["data"], key=lambda d: d["index"]):
        e = item["embedding"]
        if isinstance(e, str):
            raw = base64.b64decode(e)
            e = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        vectors.append(e)
    return Embeddings(vectors, body["model"], body["usage"]["prompt_tokens"])


class Scores(msgspec.Struct, frozen=True):
    """`/v1/score`'s answer (`LmgateClient.score`): one cosine similarity per pair."""

    scores: list[float]
    model: str
    prompt_tokens: int


class Ranked(msgspec.Struct, frozen=True):
    """One document of a ranking: its index in the request, its relevance score, its text
    (None when asked without `return_documents`)."""

    index: int
    score: float
    text: str | None = None


class Ranking(msgspec.Struct, frozen=True):
    """`/v1/rerank`'s answer (`LmgateClient.rerank`): documents best first."""

    results: list[Ranked]
    model: str
    prompt_tokens: int


def scores_from(body: dict[str, Any]) -> Scores:
    data = sorted(body["data"], key=lambda d: d["index"])
    return Scores([d["score"] for d in data], body["model"], body["usage"]["prompt_tokens"])


def ranking_from(body: dict[str, Any]) -> Ranking:
    results = [Ranked(r["index"], r["relevance_score"], (r.get("document") or {}).get("text"))
               for r in body["results"]]
    return Ranking(results, body["model"], body["usage"]["prompt_tokens"])


# ---------------------------------------------------------------- retry


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: attempt k (0-based) waits min(max_delay, base_delay * 2**k)
    with ±`jitter` spread, and never less than the server's Retry-After. A Retry-After
    longer than `max_retry_after` is not waited for: the error is raised at once with its
    `retry_after` (a daily budget spent says "after midnight UTC", hours away)."""

    max_attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 20.0
    jitter: float = 0.1
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.max_delay, self.base_delay * 2**attempt)
        backoff *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(backoff, retry_after or 0.0)

    def retries(self, error: LmgateError, attempt: int) -> bool:
        """Whether attempt `attempt` (0-based), which failed with `error`, is tried again."""
        return (attempt + 1 < self.max_attempts and self.retryable(error)
                and (error.retry_after or 0.0) <= self.max_retry_after)

    @staticmethod
    def retryable(error: LmgateError) -> bool:
        """429 with a Retry-After, 503, and a connection failure its raiser marked
        ``retryable`` (one that cannot run the request twice: see `ConnectionFailed`); never
        an answer whose ``x-should-retry: false`` says waiting cannot help (a spent daily
        budget's 429 carries a Retry-After to the next UTC day, and that header)."""
        if error.should_retry is False:
            return False
        if isinstance(error, RateLimited):
            return error.retry_after is not None
        if isinstance(error, ConnectionFailed):
            return error.retryable
        return isinstance(error, Overloaded)


NO_RETRY = RetryPolicy(max_attempts=1)


async def with_retry(policy: RetryPolicy, attempt_fn: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(policy.max_attempts):
        try:
            return await attempt_fn()
        except LmgateError as error:
            if not policy.retries(error, attempt):
                raise
            await anyio.sleep(policy.delay(attempt, error.retry_after))
    raise AssertionError("unreachable")  # the loop returns or raises


# ---------------------------------------------------------------- parsing


def usage_from(raw: Any) -> Usage | None:
    return msgspec.convert(raw, Usage) if raw else None


def completion_from(body: dict[str, Any]) -> Completion:
    choices = []
    for c in body["choices"]:
        text = c["message"]["content"] if "message" in c else c["text"]
        calls = c["message"].get("tool_calls") if "message" in c else None
        choices.append(Choice(c["index"], text or "", c.get("finish_reason"), c.get("logprobs"), calls))
    return Completion(body["id"], body["model"], choices, msgspec.convert(body["usage"], Usage))


def join_call_pieces(calls: dict[int, dict[str, Any]], pieces: list[dict[str, Any]]) -> None:
    """Add a chunk's tool-call pieces to `calls` (by call index): a call's first piece
    brings its id, type and name, every piece more of its arguments."""
    for piece in pieces:
        call = calls.setdefault(piece["index"], {"index": piece["index"], "id": None, "type": "function",
                                                 "function": {"name": None, "arguments": ""}})
        fn = piece.get("function") or {}
        for key in ("id", "type"):
            if piece.get(key):
                call[key] = piece[key]
        if fn.get("name"):
            call["function"]["name"] = fn["name"]
        call["function"]["arguments"] += fn.get("arguments") or ""


def deltas_from_chunk(chunk: dict[str, Any]) -> list[Delta]:
    out = []
    for c in chunk.get("choices") or []:
        delta = c.get("delta") or {}
        text = delta.get("content") if "delta" in c else c.get("text")
        out.append(Delta(c["index"], text or "", c.get("finish_reason"), tool_calls=delta.get("tool_calls")))
    return out


async def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    raw = await response.aread()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    raise error_for(response.status_code, body, response.headers)


# ---------------------------------------------------------------- sending

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

# httpx's exceptions for a request that never left the client: resending is safe
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# ... and for one it cannot build or send at all: resending cannot help
_UNSENDABLE = (httpx.InvalidURL, httpx.UnsupportedProtocol, httpx.LocalProtocolError, UnicodeEncodeError)
# every exception `request_error` maps (others are bugs, and propagate as they are)
SEND_ERRORS = (httpx.RequestError, httpx.InvalidURL, UnicodeEncodeError)


def describe(exc: BaseException) -> str:
    """`exc`'s class name and text; never empty (httpx's timeouts often have no text)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def request_error(exc: BaseException, what: str, *, idempotent: bool) -> LmgateError:
    """The `clients.errors` error for `exc`, one of `SEND_ERRORS` that httpx raised while
    sending `what` ("POST /v1/completions") or reading its answer.

    A request httpx cannot send is `InvalidRequest`. A connection failure is
    `ConnectionFailed` (a read or write timeout: `TimedOut`), ``retryable`` if the request
    cannot have reached the server or is `idempotent`: a POST whose connection broke
    after it was sent may be generating, and billed, already."""
    if isinstance(exc, _UNSENDABLE):
        return InvalidRequest(f"{what}: cannot be sent: {describe(exc)}")
    if isinstance(exc, _NOT_SENT):
        return ConnectionFailed(f"{what}: {describe(exc)}")
    if isinstance(exc, httpx.TimeoutException):  # a read or write one: the request (partly) left
        return TimedOut(f"{what}: timed out waiting for the server ({describe(exc)})", retryable=idempotent)
    return ConnectionFailed(f"{what}: {describe(exc)}", retryable=idempotent)


def checked_headers(headers: dict[str, str]) -> dict[str, str]:
    """`headers`, if every value can travel in HTTP (printable ASCII); else
    `InvalidRequest`, naming the header but not its value (it may be the API key):
    httpx would raise UnicodeEncodeError for a non-ASCII value, and h11 an error quoting
    the whole value for a control character (a newline pasted with the key)."""
    for name, value in headers.items():
        if not all(" " <= c <= "~" or c == "\t" for c in value):
            which = " (the API key)" if name.lower() == "authorization" else ""
            raise InvalidRequest(f"the {name} header{which} holds characters HTTP cannot carry: use printable ASCII")
    return headers


def path_segment(value: str) -> str:
    """`value` (a tenant, key or response id) escaped as one URL path segment, so that it
    cannot reach another route: "?", "#", "%" and the like are percent-escaped, and "."
    or ".." (which httpx would resolve as dot segments, climbing up the path) are sent
    as %2E. An empty id, or one holding "/", is `InvalidRequest`: no such id exists,
    and the gateway routes on the unescaped path, where %2F is a separator again
    ("t1/keys" would read tenant t1's keys)."""
    if not value or "/" in value:
        raise InvalidRequest(f"{value!r} is no id: ids are not empty and hold no '/'")
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def _json_of(response: httpx.Response, what: str) -> Any:
    """The JSON of a successful answer; LmgateError (with its status) if it is none, as
    from something else than lmgate at the base URL, or a redirect."""
    try:
        return response.json()
    except ValueError as exc:
        raise LmgateError(f"{what}: the answer (HTTP {response.status_code}) is not JSON",
                          status=response.status_code) from exc


class JsonApi:
    """What `LmgateClient` and `AdminClient` share: an httpx client (closed by `aclose`
    only if made here), the Bearer header, and one JSON request with retries whose
    every failure is a `clients.errors.LmgateError`."""

    def __init__(self, base_url: str, key: str, *, timeout: httpx.Timeout | float,
                 retry: RetryPolicy | None, http: httpx.AsyncClient | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or NO_RETRY
        self._owns_http = http is None
        self.http = http or httpx.AsyncClient(timeout=timeout)
        self.headers = {"Authorization": f"Bearer {key}"}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    def _check_open(self) -> None:
        """ConnectionFailed, not retryable, once the httpx client is closed (httpx would
        raise a bare RuntimeError): a closed client stays closed."""
        if self.http.is_closed:
            raise ConnectionFailed("the client is closed", retryable=False)

    async def _request_json(self, method: str, path: str, body: Any = None, *,
                            params: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Any:
        """`method` `path` (under the base URL) with a JSON `body`, retried by the policy;
        the answer's JSON, or the typed error of a refusal or failure."""
        headers = checked_headers(headers or self.headers)
        what = f"{method} {path}"

        async def once() -> Any:
            self._check_open()
            try:
                response = await self.http.request(method, self.base_url + path, json=body, params=params,
                                                   headers=headers)
            except SEND_ERRORS as exc:
                raise request_error(exc, what, idempotent=method in IDEMPOTENT_METHODS) from exc
            await _raise_for_status(response)
            return _json_of(response, what)

        return await with_retry(self.retry, once)


# ---------------------------------------------------------------- streams


async def _nothing() -> AsyncIterator[Any]:
    """An iterator that ends at once: what a finished or closed stream yields."""
    return
    yield  # makes this an async generator


class TokenStream:
    """Deltas of one streamed request over SSE. Use as ``async with`` (closes the
    connection → the server aborts the request) or plain ``async for``.
    ``usage`` is set once the server sent it (stream_options.include_usage).

    One object is one request: once it ended or was closed, iterating it again yields
    nothing (its answer was consumed), and entering it again raises `InvalidRequest`
    (it cannot be sent again: make a new stream)."""

    def __init__(self, open_response: Callable[[AsyncExitStack], Awaitable[httpx.Response]]) -> None:
        self._open_response = open_response
        self._stack = AsyncExitStack()
        self._response: httpx.Response | None = None
        self._closed = False
        self.usage: Usage | None = None
        self.id: str | None = None
        self._calls: dict[int, dict[int, dict[str, Any]]] = {}  # per choice: its tool calls so far

    async def __aenter__(self) -> Self:
        if self._closed:
            raise InvalidRequest("this stream was used already: a stream is one request, start a new one")
        await self._ensure_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (the server aborts the request if it still runs); idempotent."""
        self._closed = True
        await self._stack.aclose()

    async def _ensure_open(self) -> httpx.Response:
        if self._response is None:
            self._response = await self._open_response(self._stack)
        return self._response

    def __aiter__(self) -> AsyncIterator[Delta]:
        return _nothing() if self._closed else self._iterate()

    async def _iterate(self) -> AsyncIterator[Delta]:
        try:
            response = await self._ensure_open()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = event_of(data)
                if "error" in chunk:
                    raise error_for(status_of_type(chunk["error"].get("type")), chunk,
                                    retry_after=chunk.get("retry_after"))
                self.id = chunk.get("id", self.id)
                if chunk.get("usage"):
                    self.usage = usage_from(chunk["usage"])
                for delta in deltas_from_chunk(chunk):
                    if delta.tool_calls:  # a call's pieces (streamed as written): joined here
                        join_call_pieces(self._calls.setdefault(delta.index, {}), delta.tool_calls)
                        if not delta.text and delta.finish_reason is None:
                            continue
                        delta = msgspec.structs.replace(delta, tool_calls=None)
                    if delta.finish_reason is not None and delta.index in self._calls:
                        calls = self._calls.pop(delta.index)
                        yield Delta(delta.index, "", None, tool_calls=[calls[k] for k in sorted(calls)])
                    yield delta
            raise ended_early("data: [DONE]")
        except httpx.RequestError as exc:
            raise request_error(exc, "stream broken", idempotent=False) from exc
        finally:
            await self.aclose()


def event_of(data: str) -> dict[str, Any]:
    """One SSE `data:` line's JSON object; `ConnectionFailed` for one that is not (what
    sent it is no lmgate, or cut the line: a proxy's page, a stream spliced mid-way)."""
    try:
        event = json.loads(data)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise ConnectionFailed(f"stream broken: an event is not a JSON object: {data[:100]!r}", retryable=False)
    return event


def ended_early(last: str) -> ConnectionFailed:
    """The error of a stream whose body ended cleanly before its last event (`last`): what
    was read is not the whole answer. lmgate ends every stream with it, or with an error
    event; a proxy that times out upstream, or a close-delimited body cut, ends it so."""
    return ConnectionFailed(f"stream broken: it ended before its last event ({last}); what was read may be cut",
                            retryable=False)


# The HTTP status a `response.failed` event's error code stands for (the status the same
# failure has before a stream starts): a shutdown, or a queue that failed, is retryable (a
# 503, `ServiceUnavailable`); a constraint the output broke is the request's (400).
FAILED_STATUS = {"shutting_down": 503, "queue_error": 503, "invalid_value": 400, "invalid_request_error": 400}


class ResponseStream(TokenStream):
    """The events of one streamed Responses request (dicts, each with its `type` and
    `sequence_number`), up to the last (`response.completed`, `.incomplete`,
    `.cancelled`); `response` holds the whole Response then. A `response.failed` event
    raises (ServerError), as does an `error` event (NotFound: the response was deleted while
    followed; Overloaded: the store could not be read). Closing it early aborts the request, as `TokenStream`, unless it
    is a background response's (`background=True`): that one runs on, and
    `LmgateClient.resume_stream` reads on from the last event read."""

    def __init__(self, open_response: Callable[[AsyncExitStack], Awaitable[httpx.Response]], *,
                 resumed_ended: Callable[[], Awaitable[Response | None]] | None = None) -> None:
        super().__init__(open_response)
        self.response: Response | None = None
        # a resumed stream: the response if it has ended (a stream resumed after its last event is empty)
        self._resumed_ended = resumed_ended

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        return _nothing() if self._closed else self._events()

    def _failed(self, response: dict[str, Any]) -> LmgateError:
        """The error of a failed response (`FAILED_STATUS`)."""
        error = response.get("error") or {}
        status = FAILED_STATUS.get(error.get("code"), 500)
        failed = error_for(status, {"error": {"message": error.get("message", "the response failed"),
                                              "code": error.get("code")}},
                           retry_after=1.0 if status == 503 else None)
        if self._resumed_ended is not None:  # (resuming it again reads the same end: create anew)
            failed.should_retry = False
        return failed

    def _ended_with(self, response: dict[str, Any]) -> None:
        self.response = Response(response)
        if response.get("usage"):
            u = response["usage"]
            self.usage = Usage(u["input_tokens"], u["output_tokens"], u["total_tokens"], u.get("input_tokens_details"))

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        read = False  # an event passed on
        try:
            response = await self._ensure_open()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = event_of(line[5:].strip())
                if "error" in event and "type" not in event:  # an error before the response started
                    raise error_for(status_of_type(event["error"].get("type")), event)
                if "response" in event:
                    self.id = event["response"].get("id", self.id)
                if event.get("type") == "error":  # a followed stream cut: the response deleted, the store down
                    status = {"not_found": 404, "store_unavailable": 503}.get(event.get("code"), 500)
                    raise error_for(status, {"error": {"message": event.get("message", "the stream failed"),
                                                       "code": event.get("code"), "param": event.get("param")}},
                                    retry_after=1.0 if status == 503 else None)
                if event.get("type") == "response.failed":
                    raise self._failed(event["response"])
                read = True
                yield event
                if event.get("type") in ("response.completed", "response.incomplete", "response.cancelled"):
                    self._ended_with(event["response"])
                    return
            # (resumed at or after its last event, the server sends nothing: the response
            # is read instead; a stream cut after some of its events is a cut, ended or not)
            ended = await self._resumed_ended() if self._resumed_ended is not None and not read else None
            if ended is None:
                raise ended_early("response.completed, .incomplete, .cancelled or .failed")
            if ended.status == "failed":
                raise self._failed(ended.raw)
            self._ended_with(ended.raw)
        except httpx.RequestError as exc:
            raise request_error(exc, "stream broken", idempotent=False) from exc
        finally:
            await self.aclose()


# ---------------------------------------------------------------- client


class LmgateClient(JsonApi):
    """Client of the public API. `model=None` uses the first model the server lists.
    `timeout`: seconds to wait for each read or write (a whole non-streamed answer, or
    the next piece of an SSE stream; `TimedOut` past it); connecting may take 10 s. A
    WebSocket session pings the server instead (`clients.ws.ping_settings`)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        model: str | None = None,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout=httpx.Timeout(timeout, connect=10.0), retry=retry, http=http)
        self.api_key = api_key
        self.model = model

    # -- plumbing

    def _headers(self, cache_control: str | None) -> dict[str, str]:
        return {**self.headers, "Cache-Control": cache_control} if cache_control else self.headers

    async def _open_stream(self, stack: AsyncExitStack, path: str, body: dict[str, Any] | None,
                           cache_control: str | None = None, *, method: str = "POST") -> httpx.Response:
        """Send a streaming request (retried until the first byte, as `_request_json`
        retries one); the response is closed by `stack`."""
        headers = checked_headers(self._headers(cache_control))

        async def once() -> httpx.Response:
            self._check_open()
            attempt = AsyncExitStack()
            try:
                request = self.http.build_request(method, self.base_url + path, json=body, headers=headers)
                response = await self.http.send(request, stream=True)
                attempt.push_async_callback(response.aclose)
                await _raise_for_status(response)
            except SEND_ERRORS as exc:
                await attempt.aclose()
                raise request_error(exc, f"{method} {path}", idempotent=method == "GET") from exc
            except BaseException:
                await attempt.aclose()
                raise
            stack.push_async_exit(attempt)
            return response

        return await with_retry(self.retry, once)

    async def _model(self) -> str:
        if self.model is None:
            models = await self.models()
            if not models:
                raise LmgateError("the server lists no models")
            self.model = models[0]
        return self.model

    async def _body(self, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
        body = {"model": params.pop("model", None) or await self._model(), **fields}
        body.update({k: v for k, v in params.items() if v is not None})
        return body

    # -- API

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request_json("GET", "/v1/models"))["data"]]

    async def completions(self, prompt: str | list[int] | list[str] | list[list[int]], *,
                          cache_control: str | None = None, **params: Any) -> Completion:
        """POST /v1/completions. `params` are OpenAI/lmgate body fields (max_tokens, temperature, ...).
        A list of prompts is a batch: choice `i * n + j` is the j-th of prompt i.
        `cache_control` is sent as the Cache-Control header: "no-cache" asks for a fresh
        answer, "no-store" keeps it out of the response cache, "only-if-cached" takes a stored
        answer or raises `NotCached` (docs/api.md, "Response cache"). So in every
        generating method (chat, the streams, respond), and on the WebSocket; embed,
        score and rerank, whose answers are never cached, refuse it (TypeError)."""
        body = await self._body(params, prompt=prompt)
        return completion_from(await self._request_json("POST", "/v1/completions", body,
                                                        headers=self._headers(cache_control)))

    async def chat(self, messages: list[dict[str, Any]], *, cache_control: str | None = None,
                   **params: Any) -> Completion:
        body = await self._body(params, messages=messages)
        return completion_from(await self._request_json("POST", "/v1/chat/completions", body,
                                                        headers=self._headers(cache_control)))

    def completions_stream(self, prompt: str | list[int] | list[str] | list[list[int]], *,
                           cache_control: str | None = None, **params: Any) -> TokenStream:
        return self._lazy_stream("/v1/completions", params, cache_control, prompt=prompt)

    def chat_stream(self, messages: list[dict[str, Any]], *, cache_control: str | None = None,
                    **params: Any) -> TokenStream:
        return self._lazy_stream("/v1/chat/completions", params, cache_control, messages=messages)

    def _lazy_stream(self, path: str, params: dict[str, Any], cache_control: str | None, **fields: Any) -> TokenStream:
        params = {**params, "stream": True}
        params.setdefault("stream_options", {"include_usage": True})

        async def open_response(stack: AsyncExitStack) -> httpx.Response:
            return await self._open_stream(stack, path, await self._body(dict(params), **fields), cache_control)

        return TokenStream(open_response)

    async def respond(self, input: str | list[dict[str, Any]] | None = None, *,  # noqa: A002 - the API's name
                      cache_control: str | None = None, **params: Any) -> Response:
        """POST /v1/responses (the Responses API). `input`: a string or items; `params`:
        its other fields (instructions, previous_response_id, max_output_tokens, tools,
        text, store, truncation, ...; docs/api.md)."""
        body = await self._body(params, **({"input": input} if input is not None else {}))
        return Response(await self._request_json("POST", "/v1/responses", body, headers=self._headers(cache_control)))

    def respond_stream(self, input: str | list[dict[str, Any]] | None = None, *,  # noqa: A002
                       cache_control: str | None = None, **params: Any) -> ResponseStream:
        """POST /v1/responses with `stream`: its events, as `ResponseStream`."""
        params = {**params, "stream": True}
        fields = {"input": input} if input is not None else {}

        async def open_response(stack: AsyncExitStack) -> httpx.Response:
            return await self._open_stream(stack, "/v1/responses", await self._body(dict(params), **fields),
                                           cache_control)

        return ResponseStream(open_response)

    async def embed(self, input: str | list[str] | list[int] | list[list[int]], *,  # noqa: A002 - the API's name
                    model: str = "all-MiniLM-L6-v2", **params: Any) -> Embeddings:
        """POST /v1/embeddings: one vector per input (a string, strings, or the embedding
        model's token ids). `model`: the server's embedding model (the bundled one by
        default); `params`: other fields (truncate_prompt_tokens, user). Vectors travel as
        base64, as the openai SDK asks for them."""
        _refuse_cache_control("embed", params)
        body = {"model": model, "input": input, "encoding_format": "base64",
                **{k: v for k, v in params.items() if v is not None}}
        return embeddings_from(await self._request_json("POST", "/v1/embeddings", body))

    async def score(self, text_1: str | list[str], text_2: str | list[str], *, model: str | None = None,
                    **params: Any) -> Scores:
        """POST /v1/score: the cosine similarity of each pair, with the server's embedding
        model (`model` None: its own). Pairs 1:1, 1:N (the first text against each second
        one) or N:N; `params`: other fields (truncate_prompt_tokens, user)."""
        _refuse_cache_control("score", params)
        body = {"text_1": text_1, "text_2": text_2, "model": model, **params}
        return scores_from(await self._request_json("POST", "/v1/score",
                                                    {k: v for k, v in body.items() if v is not None}))

    async def rerank(self, query: str, documents: list[str], *, top_n: int = 0, model: str | None = None,
                     **params: Any) -> Ranking:
        """POST /v1/rerank: `documents` ranked by their cosine similarity to `query`, best
        first, the `top_n` best (0: all); `params`: other fields (return_documents,
        truncate_prompt_tokens, user)."""
        _refuse_cache_control("rerank", params)
        body = {"query": query, "documents": documents, "top_n": top_n, "model": model, **params}
        return ranking_from(await self._request_json("POST", "/v1/rerank",
                                                      {k: v for k, v in body.items() if v is not None}))

    async def get_response(self, response_id: str) -> Response:
        """A stored response, or one still running, as it stands (NotFound once deleted,
        expired, or another tenant's)."""
        return Response(await self._request_json("GET", f"/v1/responses/{path_segment(response_id)}"))

    async def cancel_response(self, response_id: str) -> Response:
        """Cancel a background response (`respond(..., background=True)`): it ends
        `cancelled`; one that has ended comes back as it ended. BadRequest for a response
        that is not background."""
        return Response(await self._request_json("POST", f"/v1/responses/{path_segment(response_id)}/cancel", {}))

    def resume_stream(self, response_id: str, *, starting_after: int | None = None) -> ResponseStream:
        """The events of a background response after the one numbered `starting_after`
        (every one without), as they come: a stream that broke resumes here. Closing it
        does not end the response."""
        query = "?stream=true" + (f"&starting_after={int(starting_after)}" if starting_after is not None else "")
        path = f"/v1/responses/{path_segment(response_id)}{query}"

        async def open_response(stack: AsyncExitStack) -> httpx.Response:
            return await self._open_stream(stack, path, None, method="GET")

        async def resumed_ended() -> Response | None:
            found = await self.get_response(response_id)
            return found if found.status in ("completed", "incomplete", "cancelled", "failed") else None

        return ResponseStream(open_response, resumed_ended=resumed_ended)

    async def delete_response(self, response_id: str) -> None:
        await self._request_json("DELETE", f"/v1/responses/{path_segment(response_id)}")

    async def list_input_items(self, response_id: str, *, order: str = "desc", limit: int = 20,
                               after: str | None = None, before: str | None = None) -> dict[str, Any]:
        """One page of a stored response's own input items (`data`, `first_id`, `last_id`,
        `has_more`): newest first unless `order="asc"`, `limit` (1-100) after the item id
        `after`, or the page just `before` one."""
        params = {"order": order, "limit": str(limit)}
        params.update({k: v for k, v in (("after", after), ("before", before)) if v is not None})
        return await self._request_json("GET", f"/v1/responses/{path_segment(response_id)}/input_items",
                                        params=params)

    def ws(self) -> Any:
        """A WebSocket session multiplexing requests (see clients.ws.WsSession)."""
        from clients.ws import WsSession

        return WsSession(self)


def _refuse_cache_control(method: str, params: dict[str, Any]) -> None:
    """TypeError for a `cache_control` given to `method`: the server never caches
    embeddings, scores or rankings, and passed on it would land in the JSON body, where it
    means nothing (the generating methods take it as a parameter, sent as a header)."""
    if "cache_control" in params:
        raise TypeError(f"{method}() got an unexpected keyword argument 'cache_control' "
                        "(its answers are never cached)")
