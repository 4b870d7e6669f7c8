"""The official `openai` package against the gateway: completions, chat, streaming, errors.

The synchronous client runs in a worker thread (trio.to_thread), the way a user's
script would talk to the server from another process.
"""

from __future__ import annotations

import openai
import pytest
import trio

from tests.gateway.conftest import MODEL, Gateway, word


def sdk(gateway: Gateway, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=key or gateway.api_key, max_retries=0)


async def test_completions_and_chat(gateway: Gateway) -> None:
    client = sdk(gateway)

    def run() -> tuple[object, object]:
        comp = client.completions.create(model=MODEL, prompt="a b", max_tokens=2)
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3, n=2
        )
        return comp, chat

    comp, chat = await trio.to_thread.run_sync(run)
    assert comp.choices[0].text == word(0, 0) + word(0, 1)  # type: ignore[attr-defined]
    assert comp.usage.total_tokens == 4  # type: ignore[attr-defined]
    assert [c.message.content for c in chat.choices] == [  # type: ignore[attr-defined]
        word(0, 0) + word(0, 1) + word(0, 2),
        word(1, 0) + word(1, 1) + word(1, 2),
    ]
    assert chat.choices[0].finish_reason == "length"  # type: ignore[attr-defined]


async def test_chat_streaming_with_usage(gateway: Gateway) -> None:
    client = sdk(gateway)

    def run() -> list[object]:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        return list(stream)

    chunks = await trio.to_thread.run_sync(run)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # type: ignore[attr-defined]
    assert text == word(0, 0) + word(0, 1) + word(0, 2)
    assert chunks[-1].usage.completion_tokens == 3  # type: ignore[attr-defined]


async def test_completion_streaming(gateway: Gateway) -> None:
    client = sdk(gateway)

    def run() -> str:
        return "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True))

    assert await trio.to_thread.run_sync(run) == word(0, 0) + word(0, 1)


async def test_sdk_error_types(gateway: Gateway) -> None:
    def bad_key() -> None:
        sdk(gateway, "lmg-nope").models.list()

    def bad_model() -> None:
        sdk(gateway).completions.create(model="gpt-9", prompt="x")

    def bad_param() -> None:
        sdk(gateway).completions.create(model=MODEL, prompt="x", temperature=7000)

    with pytest.raises(openai.AuthenticationError):
        await trio.to_thread.run_sync(bad_key)
    with pytest.raises(openai.NotFoundError):
        await trio.to_thread.run_sync(bad_model)
    with pytest.raises(openai.BadRequestError) as info:
        await trio.to_thread.run_sync(bad_param)
    assert info.value.param == "temperature"  # type: ignore[attr-defined]


async def test_the_sdk_does_not_retry_a_spent_quota_but_retries_a_rate_limit(gateway: Gateway) -> None:
    """A spent daily budget is OpenAI's `insufficient_quota` with `x-should-retry: false`:
    the SDK (which retries every other 429) stops at once, instead of retrying a refusal
    that lasts until midnight. A per-minute limit is still retried."""
    from actors.messages import Rejected

    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=2)
    client = client.with_options(timeout=10)

    def create() -> None:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)

    gateway.runtime.reject = Rejected("", 429, "insufficient_quota", "quota daily_token_budget: spent", retry_after=0.01)
    calls = len(gateway.runtime.calls)
    with pytest.raises(openai.RateLimitError) as info:
        await trio.to_thread.run_sync(create)
    assert info.value.code == "insufficient_quota" and info.value.type == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert len(gateway.runtime.calls) == calls + 1
    gateway.runtime.reject = Rejected("", 429, "rate_limit_exceeded", "quota tokens_per_minute: used", retry_after=0.01)
    with pytest.raises(openai.RateLimitError) as info:
        await trio.to_thread.run_sync(create)
    assert "x-should-retry" not in info.value.response.headers
    assert len(gateway.runtime.calls) == calls + 1 + 3  # the first try and two retries
