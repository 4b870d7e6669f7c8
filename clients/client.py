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
``Retry-After``; a 429 without Retry-After (cannot succeed) is not retried.
Streams are retried only before their first byte.
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
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import httpx
import msgspec

from clients.errors import (
    ConnectionFailed,
    LmgateError,
    Overloaded,
    RateLimited,
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
        """completed, incomplete (cut at max_output_tokens) or failed."""
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
    with ±`jitter` spread, and never less than the server's Retry-After."""

    max_attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 20.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.max_delay, self.base_delay * 2**attempt)
        backoff *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(backoff, retry_after or 0.0)

    @staticmethod
    def retryable(error: LmgateError) -> bool:
        if isinstance(error, RateLimited):
            return error.retry_after is not None
        return isinstance(error, Overloaded | ConnectionFailed)


NO_RETRY = RetryPolicy(max_attempts=1)


async def with_retry(policy: RetryPolicy, attempt_fn: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(policy.max_attempts):
        try:
            return await attempt_fn()
        except LmgateError as error:
            if attempt + 1 >= policy.max_attempts or not policy.retryable(error):
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


# ---------------------------------------------------------------- streams


class TokenStream:
    """Deltas of one streamed request over SSE. Use as ``async with`` (closes the
    connection → the server aborts the request) or plain ``async for``.
    ``usage`` is set once the server sent it (stream_options.include_usage)."""

    def __init__(self, open_response: Callable[[AsyncExitStack], Awaitable[httpx.Response]]) -> None:
        self._open_response = open_response
        self._stack = AsyncExitStack()
        self._response: httpx.Response | None = None
        self.usage: Usage | None = None
        self.id: str | None = None
        self._calls: dict[int, dict[int, dict[str, Any]]] = {}  # per choice: its tool calls so far

    async def __aenter__(self) -> TokenStream:
        await self._ensure_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._stack.aclose()

    async def _ensure_open(self) -> httpx.Response:
        if self._response is None:
            self._response = await self._open_response(self._stack)
        return self._response

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Delta]:
        try:
            response = await self._ensure_open()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise error_for(status_of_type(chunk["error"].get("type")), chunk)
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
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"stream broken: {exc}") from exc
        finally:
            await self.aclose()


class ResponseStream(TokenStream):
    """The events of one streamed Responses request (dicts, each with its `type`), up to
    the last (`response.completed`, `.incomplete`); `response` holds the whole Response
    then. A `response.failed` event raises (ServerError). Closing it early aborts the
    request, as `TokenStream`."""

    def __init__(self, open_response: Callable[[AsyncExitStack], Awaitable[httpx.Response]]) -> None:
        super().__init__(open_response)
        self.response: Response | None = None

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        try:
            response = await self._ensure_open()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:].strip())
                if "error" in event and "type" not in event:  # an error before the response started
                    raise error_for(status_of_type(event["error"].get("type")), event)
                if "response" in event:
                    self.id = event["response"].get("id", self.id)
                if event.get("type") == "response.failed":
                    error = event["response"].get("error") or {}
                    raise error_for(500, {"error": {"message": error.get("message", "the response failed"),
                                                    "type": "server_error", "code": error.get("code")}})
                yield event
                if event.get("type") in ("response.completed", "response.incomplete"):
                    self.response = Response(event["response"])
                    if event["response"].get("usage"):
                        u = event["response"]["usage"]
                        self.usage = Usage(u["input_tokens"], u["output_tokens"], u["total_tokens"],
                                           u.get("input_tokens_details"))
                    return
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"stream broken: {exc}") from exc
        finally:
            await self.aclose()


# ---------------------------------------------------------------- client


class LmgateClient:
    """Client of the public API. `model=None` uses the first model the server lists."""

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
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.retry = retry or NO_RETRY
        self._owns_http = http is None
        self.http = http or httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0))
        self.headers = {"Authorization": f"Bearer {api_key}"}

    async def __aenter__(self) -> LmgateClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    # -- plumbing

    def _headers(self, cache_control: str | None) -> dict[str, str]:
        return {**self.headers, "Cache-Control": cache_control} if cache_control else self.headers

    def _check_open(self) -> None:
        if self.http.is_closed:  # httpx would raise a bare RuntimeError
            raise ConnectionFailed("the client is closed")

    async def _request_json(self, method: str, path: str, body: Any = None, cache_control: str | None = None) -> Any:
        headers = self._headers(cache_control)

        async def once() -> Any:
            try:
                response = await self.http.request(method, self.base_url + path, json=body, headers=headers)
            except httpx.TransportError as exc:
                raise ConnectionFailed(f"{method} {path}: {exc}") from exc
            await _raise_for_status(response)
            return response.json()

        self._check_open()  # not retried: a closed client stays closed
        return await with_retry(self.retry, once)

    async def _open_stream(self, stack: AsyncExitStack, path: str, body: dict[str, Any],
                           cache_control: str | None = None) -> httpx.Response:
        """POST a streaming request (retried until the first byte); the response is
        closed by `stack`."""
        headers = self._headers(cache_control)

        async def once() -> httpx.Response:
            attempt = AsyncExitStack()
            try:
                request = self.http.build_request("POST", self.base_url + path, json=body, headers=headers)
                response = await self.http.send(request, stream=True)
                attempt.push_async_callback(response.aclose)
                await _raise_for_status(response)
            except httpx.TransportError as exc:
                await attempt.aclose()
                raise ConnectionFailed(f"POST {path}: {exc}") from exc
            except BaseException:
                await attempt.aclose()
                raise
            stack.push_async_exit(attempt)
            return response

        self._check_open()  # not retried: a closed client stays closed
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
        answer, "no-store" keeps it out of the response cache (docs/api.md). So in every
        method here, and on the WebSocket."""
        body = await self._body(params, prompt=prompt)
        return completion_from(await self._request_json("POST", "/v1/completions", body, cache_control))

    async def chat(self, messages: list[dict[str, Any]], *, cache_control: str | None = None,
                   **params: Any) -> Completion:
        body = await self._body(params, messages=messages)
        return completion_from(await self._request_json("POST", "/v1/chat/completions", body, cache_control))

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
        return Response(await self._request_json("POST", "/v1/responses", body, cache_control))

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
        body = {"model": model, "input": input, "encoding_format": "base64",
                **{k: v for k, v in params.items() if v is not None}}
        return embeddings_from(await self._request_json("POST", "/v1/embeddings", body))

    async def score(self, text_1: str | list[str], text_2: str | list[str], *, model: str | None = None,
                    **params: Any) -> Scores:
        """POST /v1/score: the cosine similarity of each pair, with the server's embedding
        model (`model` None: its own). Pairs 1:1, 1:N (the first text against each second
        one) or N:N; `params`: other fields (truncate_prompt_tokens, user)."""
        body = {"text_1": text_1, "text_2": text_2, "model": model, **params}
        return scores_from(await self._request_json("POST", "/v1/score",
                                                    {k: v for k, v in body.items() if v is not None}))

    async def rerank(self, query: str, documents: list[str], *, top_n: int = 0, model: str | None = None,
                     **params: Any) -> Ranking:
        """POST /v1/rerank: `documents` ranked by their cosine similarity to `query`, best
        first, the `top_n` best (0: all); `params`: other fields (return_documents,
        truncate_prompt_tokens, user)."""
        body = {"query": query, "documents": documents, "top_n": top_n, "model": model, **params}
        return ranking_from(await self._request_json("POST", "/v1/rerank",
                                                      {k: v for k, v in body.items() if v is not None}))

    async def get_response(self, response_id: str) -> Response:
        """A stored response (NotFound once deleted, expired, or another tenant's)."""
        return Response(await self._request_json("GET", f"/v1/responses/{quote(response_id, safe='')}"))

    async def delete_response(self, response_id: str) -> None:
        await self._request_json("DELETE", f"/v1/responses/{quote(response_id, safe='')}")

    def ws(self) -> Any:
        """A WebSocket session multiplexing requests (see clients.ws.WsSession)."""
        from clients.ws import WsSession

        return WsSession(self)
