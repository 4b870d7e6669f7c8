"""The pure parts of admission: the context-length 400's words."""

from __future__ import annotations

from actors.admission import context_message, prompt_over


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
