"""Benchmark workloads: which prompts are sent, how many tokens each asks for, and
under which tenant.

Everything here is pure: `build_workload(spec, ...)` is a function of the seed
(and the JSONL file's contents), so arrival times, prompts, output lengths and
tenants are identical for two targets and for two runs with the same seed.

Random dataset (like vLLM's): prompt = random token ids drawn from
[`RANDOM_TOKEN_LOW`, vocab) — ids below hold SmolLM2's control tokens — lengths
uniform in [min, max]; `ignore_eos` makes the output length exact.
JSONL dataset: one object per line, ``{"prompt": "..." | [ids], "output_len": 128}``
(``output_len`` optional: falls back to the default). Lines are sampled with
replacement when more requests than lines are asked for.
Workload dataset: the shipped multi-application fixture (`ops.workload`, the one
`ops.bench_sched` runs) as chat requests tagged with their application and user,
capped at the fixture's `max_tokens` so each ends where the model emits EOS — what a
length predictor serves. Measured requests come from the fixture's held-out half,
warm-ups from its training half (the same split as `ops.bench_sched`), so a
server's online predictor learns from the warm-ups and is measured on requests it
has not seen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ops.loadgen.schedule import arrival_offsets

RANDOM_TOKEN_LOW = 100
DEFAULT_VOCAB = 49152  # SmolLM2

# independent random streams derived from one seed (changing one knob never shifts another)
_STREAM_ARRIVALS, _STREAM_PROMPTS, _STREAM_TENANTS, _STREAM_WARMUP = 1, 2, 3, 4


@dataclass(frozen=True)
class LengthRange:
    """Inclusive [low, high] token counts."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"length range must satisfy 1 <= low <= high, got [{self.low}, {self.high}]")

    @classmethod
    def around(cls, length: int, range_ratio: float) -> LengthRange:
        """vLLM's `--random-range-ratio`: uniform in [L*(1-r), L*(1+r)]."""
        if not 0 <= range_ratio < 1:
            raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
        return cls(max(1, math.floor(length * (1 - range_ratio))), max(1, math.ceil(length * (1 + range_ratio))))


@dataclass(frozen=True)
class Tenant:
    """One API key of a multi-tenant run: `weight` = share of the requests,
    `priority` (optional) is sent as the request's `priority` field."""

    api_key: str
    weight: float = 1.0
    priority: int | None = None
    label: str = ""

    @classmethod
    def parse(cls, text: str, index: int) -> Tenant:
        """`KEY:WEIGHT[:PRIORITY]` (the key itself must not contain ':')."""
        parts = text.split(":")
        if not 2 <= len(parts) <= 3 or not parts[0]:
            raise ValueError(f"--tenant expects KEY:WEIGHT[:PRIORITY], got {text!r}")
        weight = float(parts[1])
        if not weight > 0:
            raise ValueError(f"tenant weight must be > 0, got {parts[1]!r}")
        priority = int(parts[2]) if len(parts) == 3 else None
        return cls(parts[0], weight, priority, label=f"tenant{index}")


@dataclass(frozen=True)
class ChatPrompt:
    """A chat conversation (sent to /v1/chat/completions) with the request's
    application tag (`metadata.app`) and end user (`user`)."""

    messages: tuple[dict[str, str], ...]
    app: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload. `prompt` is token ids, text or a `ChatPrompt`;
    `prompt_len` is exact for ids and for the workload fixture's chats (their rendered
    length) and the dataset's estimate for text (the server's usage wins)."""

    index: int
    send_at: float  # seconds after the benchmark start
    prompt: str | tuple[int, ...] | ChatPrompt
    prompt_len: int
    output_len: int
    tenant: Tenant | None = None


@dataclass(frozen=True)
class RandomSpec:
    input_len: LengthRange
    output_len: LengthRange
    vocab_size: int = DEFAULT_VOCAB

    def sample(self, n: int, rng: np.random.Generator) -> list[tuple[tuple[int, ...], int, int]]:
        if self.vocab_size <= RANDOM_TOKEN_LOW:
            raise ValueError(f"vocab size must be > {RANDOM_TOKEN_LOW}, got {self.vocab_size}")
        ins = rng.integers(self.input_len.low, self.input_len.high + 1, n)
        outs = rng.integers(self.output_len.low, self.output_len.high + 1, n)
        return [
            (tuple(int(t) for t in rng.integers(RANDOM_TOKEN_LOW, self.vocab_size, int(k))), int(k), int(o))
            for k, o in zip(ins, outs, strict=True)
        ]


@dataclass(frozen=True)
class JsonlSpec:
    path: str
    default_output_len: int = 128

    def load(self) -> list[tuple[str | tuple[int, ...], int, int]]:
        rows = []
        for lineno, line in enumerate(Path(self.path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path}:{lineno}: not JSON: {exc}") from exc
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            if isinstance(prompt, str) and prompt:
                est = max(1, len(prompt) // 4)  # rough; the server's usage replaces it
                value: str | tuple[int, ...] = prompt
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                value, est = tuple(prompt), len(prompt)
            else:
                raise ValueError(f"{self.path}:{lineno}: 'prompt' must be a non-empty string or list of ints")
            out = obj.get("output_len", self.default_output_len)
            if not isinstance(out, int) or out < 1:
                raise ValueError(f"{self.path}:{lineno}: 'output_len' must be a positive integer")
            rows.append((value, est, out))
        if not rows:
            raise ValueError(f"{self.path}: no prompts")
        return rows

    def sample(self, n: int, rng: np.random.Generator) -> list[tuple[str | tuple[int, ...], int, int]]:
        rows = self.load()
        picks = rng.permutation(len(rows))[:n] if n <= len(rows) else rng.integers(0, len(rows), n)
        return [rows[int(i)] for i in picks]


def _distinct(rows: list, exclude: set[str]) -> list:
    """`rows` without repeated conversations or ones in `exclude` (first one kept)."""
    seen, out = set(exclude), []
    for r in rows:
        k = json.dumps(r.messages)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


@dataclass(frozen=True)
class WorkloadSpec:
    """The multi-application fixture: held-out requests measured, training ones as
    warm-ups, both drawn without replacement.

    The fixture repeats conversations (716 distinct of the shipped 960): short Q&A and
    story prompts come from few templates (qa: 27 distinct of 165, story: 47 of 153),
    asked by different users. A client that bypasses the server's response cache
    (`distinct=False`, bench_serve's default) measures the whole held-out half, as
    `ops.bench_sched` does (480 measured, 480 warm-ups). With `distinct=True` each half
    keeps one of each conversation, and the measured half drops those the training half
    has, so a response cache never answers a measured request (338 measured, 378
    warm-ups) — but that measured half holds no Q&A and 9 stories of the 72, so its
    length mix is not the workload's."""

    path: str | None = None  # None: the shipped ops/workload/requests.jsonl
    max_tokens: int | None = None  # None: the cap the fixture was generated with
    split_seed: int = 0  # ops.bench_sched's --seed: which half is held out
    distinct: bool = False  # True: no conversation twice, none measured that a warm-up has

    def _halves(self) -> tuple[list, list]:
        from ops.workload.fixture import FIXTURE, load_fixture, split_fixture

        train, test = split_fixture(load_fixture(Path(self.path) if self.path else FIXTURE), self.split_seed)
        if not self.distinct:
            return train, test
        train = _distinct(train, set())
        return train, _distinct(test, {json.dumps(r.messages) for r in train})

    def _rows(self, part: list, n: int, rng: np.random.Generator, what: str) -> list[tuple[ChatPrompt, int, int]]:
        if n > len(part):
            raise ValueError(f"the workload's {what} half holds {len(part)} requests, {n} asked for")
        cap = self.max_tokens or max(r.max_tokens for r in part)
        picks = rng.permutation(len(part))[:n]
        return [(ChatPrompt(tuple(dict(m) for m in part[int(i)].messages), part[int(i)].app, part[int(i)].user),
                 part[int(i)].prompt_tokens, cap) for i in picks]

    def sample(self, n: int, rng: np.random.Generator) -> list[tuple[ChatPrompt, int, int]]:
        return self._rows(self._halves()[1], n, rng, "held-out")

    def sample_warmups(self, n: int, rng: np.random.Generator) -> list[tuple[ChatPrompt, int, int]]:
        return self._rows(self._halves()[0], n, rng, "training")


DatasetSpec = RandomSpec | JsonlSpec | WorkloadSpec


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def assign_tenants(n: int, tenants: Sequence[Tenant], rng: np.random.Generator) -> list[Tenant | None]:
    if not tenants:
        return [None] * n
    weights = np.array([t.weight for t in tenants], dtype=float)
    picks = rng.choice(len(tenants), size=n, p=weights / weights.sum())
    return [tenants[int(i)] for i in picks]


def build_workload(
    spec: DatasetSpec,
    num_requests: int,
    rate: float,
    burstiness: float,
    seed: int,
    tenants: Sequence[Tenant] = (),
) -> list[BenchRequest]:
    """The benchmark's requests in send order — a pure function of the arguments."""
    times = arrival_offsets(num_requests, rate, burstiness, _rng(seed, _STREAM_ARRIVALS))
    rows = spec.sample(num_requests, _rng(seed, _STREAM_PROMPTS))
    who = assign_tenants(num_requests, tenants, _rng(seed, _STREAM_TENANTS))
    return [
        BenchRequest(i, float(t), p, plen, olen, tenant)
        for i, (t, (p, plen, olen), tenant) in enumerate(zip(times, rows, who, strict=True))
    ]


def build_warmups(spec: DatasetSpec, n: int, seed: int, tenants: Sequence[Tenant] = ()) -> list[BenchRequest]:
    """Warm-up requests: their own random stream, so they never repeat a measured
    prompt (a response cache must not turn the measured requests into hits); the
    workload's come from its training half."""
    rows = (spec.sample_warmups if isinstance(spec, WorkloadSpec) else spec.sample)(n, _rng(seed, _STREAM_WARMUP))
    who = assign_tenants(n, tenants, _rng(seed, _STREAM_WARMUP + 100))
    return [BenchRequest(-1 - i, 0.0, p, plen, olen, t) for i, ((p, plen, olen), t) in enumerate(zip(rows, who, strict=True))]


def sweep_seed(seed: int, rate_index: int) -> int:
    """Seed of the `rate_index`-th rate of a sweep: rate 0 uses `seed` itself; later
    rates get fresh prompts so a server's response cache cannot answer them from the
    previous rate's run. Still a pure function of (seed, index)."""
    return seed if rate_index == 0 else int(np.random.SeedSequence([seed, rate_index]).generate_state(1)[0])
