"""The parts of admission that stand alone: the context-length 400's words, the tenants'
turns at the tokenizer thread."""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from actors.admission import TenantTurns, context_message, fresh_enough, prompt_over


def test_a_prompt_that_fills_the_window_is_told_what_it_asked_for_in_all() -> None:
    """A prompt of exactly the window leaves no room: the message counts the max_tokens the
    client sent (it said 1 whatever was asked), or the one token a completion needs."""
    assert prompt_over(1024, 1024, "prompt", 24) == "you requested 1048 tokens (1024 in the prompt, 24 in the completion)"
    assert prompt_over(1024, 1024, "messages", None) == \
        "you requested 1025 tokens (1024 in the messages, 1 in the completion)"
    assert prompt_over(1024, 1030, "prompt", 24) == "your prompt resulted in 1030 tokens"
    assert context_message(1024, prompt_over(1024, 1030, "prompt"), "prompt") == (
        "This model's maximum context length is 1024 tokens. However, your prompt resulted in 1030 tokens. "
        "Please reduce the length of the prompt.")


async def test_a_tenants_long_text_waits_behind_one_call_of_each_other_tenant() -> None:
    """Long texts are tokenized one at a time: a tenant that sends many at once no longer
    queues them all ahead of another tenant's (the route costs no quota)."""
    order: list[str] = []

    def work(name: str) -> Callable[[], str]:
        def run() -> str:
            time.sleep(0.02)
            order.append(name)
            return name
        return run

    turns, limiter = TenantTurns(), trio.CapacityLimiter(1)
    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(turns.run, "heavy", work(f"heavy{i}"), limiter)
        await trio.sleep(0.005)
        assert await turns.run("light", work("light"), limiter) == "light"
    assert order.index("light") <= 2 and len(order) == 7, order
    assert turns.waiting() == 0  # no lock kept for a tenant with no call


def test_an_answers_age_is_compared_in_the_whole_seconds_its_age_header_shows() -> None:
    """A client that saw `Age: 8` and asks `max-age=8` is answered from the cache (the
    audit: 8.7 s compared as such missed)."""
    assert fresh_enough(8.7, 3600, 8, None) and not fresh_enough(9.0, 3600, 8, None)
    assert fresh_enough(10.9, 60, None, 50) and not fresh_enough(11.0, 60, None, 50)
    assert fresh_enough(None, 60, None, None) and not fresh_enough(None, 60, 5, None)
