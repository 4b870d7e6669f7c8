"""Load the shipped workload fixture (`requests.jsonl`, written by `ops.workload.generate`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

FIXTURE = Path(__file__).with_name("requests.jsonl")


MAX_COUNT = 1 << 24  # tokens: more than any context window (a larger count is not a request's)


class FixtureError(ValueError):
    """A line of a request log that is not a finished request (its line number and why)."""


@dataclass(frozen=True)
class FixtureRequest:
    id: str
    app: str
    tenant: str
    user: str
    messages: tuple[dict, ...]
    prompt_tokens: int
    output_tokens: int  # the model's own length (greedy, EOS or max_tokens)
    finish_reason: str
    max_tokens: int  # the cap ops.workload.generate ran with ("length" = it ran into this)

    @property
    def instruction(self) -> str:
        """The first system message and the first user message (what the predictor embeds,
        as the server's `actors.predictor.instruction_of` takes them)."""
        first = {}
        for m in self.messages:
            first.setdefault(m["role"], m["content"])
        return "\n".join(first[role] for role in ("system", "user") if role in first)


class _Part(msgspec.Struct):
    type: str
    text: str = ""


class _Message(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None


class _Line(msgspec.Struct):  # other keys are ignored
    id: str
    app: str
    tenant: str
    user: str
    messages: list[_Message]
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    max_tokens: int


def _text(content: str | list[_Part] | None) -> str:
    """A message's text: OpenAI's content parts joined by newlines, as the server joins
    them; no content (an assistant's tool call) is no text."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(p.text for p in content if p.type == "text")


def parse_line(line: str | bytes) -> FixtureRequest:
    """One line of a request log; `FixtureError` (msgspec's path to the bad field, or the
    count that cannot be) if it is not a finished request."""
    try:
        d = msgspec.json.decode(line, type=_Line)
    except msgspec.ValidationError as e:
        raise FixtureError(str(e)) from None
    except msgspec.DecodeError as e:
        raise FixtureError(f"not JSON ({e})") from None
    for name, least in (("prompt_tokens", 0), ("output_tokens", 0), ("max_tokens", 1)):
        if not least <= getattr(d, name) <= MAX_COUNT:
            raise FixtureError(f"{name} must be in {least}..{MAX_COUNT}, got {getattr(d, name)}")
    if d.output_tokens > d.max_tokens:
        raise FixtureError(f"output_tokens ({d.output_tokens}) is above max_tokens ({d.max_tokens}): "
                           "a request writes at most its max_tokens")
    messages = tuple({"role": m.role, "content": _text(m.content)} for m in d.messages)
    return FixtureRequest(d.id, d.app, d.tenant, d.user, messages, d.prompt_tokens, d.output_tokens,
                          d.finish_reason, d.max_tokens)


def load_fixture(path: Path = FIXTURE) -> list[FixtureRequest]:
    """The requests of a JSONL log, in order (blank lines skipped). Raises `FileNotFoundError`,
    or `FixtureError` naming the line and field that is not a finished request."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `python -m ops.workload.generate`")
    out = []
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse_line(line))
            except FixtureError as e:
                raise FixtureError(f"line {number}: {e}") from None
    return out


def split_fixture(fixture: Sequence[FixtureRequest], seed: int = 0) -> tuple[list[FixtureRequest], list[FixtureRequest]]:
    """(training half, held-out half), each in fixture order: a seeded shuffle of the
    indices, first half trains. `ops.bench_sched` trains its predictor on the first and
    measures on the second; `ops.bench_serve --dataset workload` warms up on the first."""
    order = list(range(len(fixture)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return [fixture[k] for k in sorted(order[:half])], [fixture[k] for k in sorted(order[half:])]
