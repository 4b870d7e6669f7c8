"""Load the shipped workload fixture (`requests.jsonl`, written by `ops.workload.generate`)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FIXTURE = Path(__file__).with_name("requests.jsonl")


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
        """System prompt + first user turn (what the predictor embeds)."""
        return "\n".join(m["content"] for m in self.messages[:2])


def load_fixture(path: Path = FIXTURE) -> list[FixtureRequest]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `python -m ops.workload.generate`")
    out = []
    with path.open() as f:
        for line in f:
            d = json.loads(line)
            out.append(FixtureRequest(d["id"], d["app"], d["tenant"], d["user"], tuple(d["messages"]),
                                      int(d["prompt_tokens"]), int(d["output_tokens"]), d["finish_reason"],
                                      int(d["max_tokens"])))
    return out


def split_fixture(fixture: Sequence[FixtureRequest], seed: int = 0) -> tuple[list[FixtureRequest], list[FixtureRequest]]:
    """(training half, held-out half), each in fixture order: a seeded shuffle of the
    indices, first half trains. `ops.bench_sched` trains its predictor on the first and
    measures on the second; `ops.bench_serve --dataset workload` warms up on the first."""
    order = list(range(len(fixture)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return [fixture[k] for k in sorted(order[:half])], [fixture[k] for k in sorted(order[half:])]
