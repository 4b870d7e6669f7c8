"""Structured outputs benchmark: what a JSON schema costs per token, and what it buys.

    python -m ops.bench_structured [--quick] [--requests 16] [--max-tokens 160] [--json PATH]

Workload: chat requests asking the model to describe a subject as JSON (a book, a city, a
person, ...), every one under one schema (`SCHEMA`: a bounded title, a year, up to three
tags from a list, a bounded summary), sampled at temperature 0.7 with a seed each, all
added to the engine at once (one continuous batch), float32.

Modes (each repeat runs them in a rotated order):
- `constrained`: the schema as `SamplingParams.guided` (`gpu.structured`).
- `free`: the same requests and seeds without it, each forced to the length its
  constrained twin produced (`max_tokens` = that length, `ignore_eos`): the same tokens
  through the same steps, so the difference is the grammar's work (masks computed by
  llguidance, unpacked and applied to the logits, the matcher advanced per token).
- `auto_text`: as `free`, under chat tool calling's `tool_choice: "auto"` grammar
  (`gateway.tools`, two tools) — what auto mode costs a request that has tools and answers
  in text: the grammar runs at every step though the text is free until a `<tool_call>`.

Reported: wall time per mode; `constrained_vs_free_time` and `auto_text_vs_free_time`
(medians over repeats, lower is better; 1.0 would be free); `grammar_share_of_constrained` (the share of the constrained
run spent in the sampler's grammar step, timed around `gpu.sampling.apply_grammars`);
`valid_constrained` (outputs that parse and validate against the schema, and end with
"stop" before `max_tokens`); and `valid_unconstrained` — the same prompts run
unconstrained with the model's own EOS, the share of their outputs that parse and
validate: what the constraint buys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ops.cli import bench_prog, output_file, positive_int

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 0, "maximum": 2100},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["old", "new", "famous", "large", "small",
                                                                        "european", "american", "asian"]},
                 "maxItems": 3},
        "summary": {"type": "string", "maxLength": 120},
    },
    "required": ["title", "year", "tags", "summary"],
    "additionalProperties": False,
}
# two tools for the auto_text mode (the prompts do not mention them)
AUTO_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
                  "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
              {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {
                  "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
SUBJECTS = ["a famous book", "a European city", "a scientist", "a river", "a painting", "a mountain",
            "an old bridge", "a musical instrument", "a programming language", "a famous ship", "a planet",
            "a cathedral", "an Asian country", "a composer", "a novel about the sea", "a large desert"]


def prompts_for(tok, num: int) -> list[list[int]]:
    out = []
    for i in range(num):
        text = (f"Describe {SUBJECTS[i % len(SUBJECTS)]} as a JSON object with the keys title, year, tags "
                f"(a list) and summary.")
        out.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)))
    return out


def is_valid(text: str) -> bool:
    """The text parses as JSON and satisfies `SCHEMA` (a minimal validator: no extra dependency)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    props = SCHEMA["properties"]
    if not isinstance(obj, dict) or set(obj) != set(props):
        return False
    tags = obj["tags"]
    return (isinstance(obj["title"], str) and len(obj["title"]) <= 40
            and isinstance(obj["year"], int) and not isinstance(obj["year"], bool) and 0 <= obj["year"] <= 2100
            and isinstance(tags, list) and len(tags) <= 3 and all(t in props["tags"]["items"]["enum"] for t in tags)
            and isinstance(obj["summary"], str) and len(obj["summary"]) <= 120)


def run(engine, prompts: list[list[int]], params: list) -> tuple[float, list[list[int]], list[str], list[str]]:
    """Wall time, and each request's tokens, text and finish reason (one continuous batch)."""
    tokens: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    finish: dict[str, str] = {}
    t0 = time.perf_counter()
    for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"s{i}", ids, p)
        tokens[f"s{i}"], texts[f"s{i}"] = [], ""
    while engine.has_unfinished():
        for d in engine.step():
            tokens[d.request_id].extend(d.token_ids)
            texts[d.request_id] += d.text
            if d.finish_reason:
                finish[d.request_id] = d.finish_reason
    wall = time.perf_counter() - t0
    ids = [f"s{i}" for i in range(len(prompts))]
    return wall, [tokens[r] for r in ids], [texts[r] for r in ids], [finish[r] for r in ids]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=bench_prog("ops.bench_structured"), description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 requests, 1 repeat")
    ap.add_argument("--requests", type=positive_int, help="requests in the batch (default 16; --quick 8)")
    ap.add_argument("--max-tokens", type=int, default=160, help="max_tokens of every request (default %(default)s)")
    ap.add_argument("--repeats", type=positive_int, help="rounds of the three modes, order rotated (default 3; --quick 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    ap.add_argument("--json", type=output_file, metavar="PATH", help="write the report as JSON")
    args = ap.parse_args(argv)
    num = args.requests or (8 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    from gateway.tools import tool_calling
    from gpu import sampling
    from gpu.config import CacheConfig, EngineConfig
    from gpu.engine import Engine
    from gpu.sampling import SamplingParams
    from gpu.structured import GuidedDecoding

    engine = Engine(EngineConfig(dtype="float32", num_threads=args.threads,
                                 cache=CacheConfig(cache_bytes=256 * 1024**2, enable_prefix_caching=False)))
    prompts = prompts_for(engine.tokenizer, num)
    guided = GuidedDecoding("json", json.dumps(SCHEMA))
    constrained = [SamplingParams(temperature=0.7, seed=i, max_tokens=args.max_tokens, guided=guided)
                   for i in range(num)]

    grammar_s = [0.0]
    apply_grammars = sampling.apply_grammars

    def timed(*a, **kw):  # the sampler's grammar step, timed (the sampler calls it by module name)
        t = time.perf_counter()
        try:
            return apply_grammars(*a, **kw)
        finally:
            grammar_s[0] += time.perf_counter() - t

    sampling.apply_grammars = timed
    # warm-up outside the timings (also compiles the schema and builds llguidance's tokenizer)
    run(engine, prompts[:2], constrained[:2])
    _, _, free_texts, _ = run(engine, prompts, [SamplingParams(temperature=0.7, seed=i, max_tokens=args.max_tokens)
                                                for i in range(num)])
    valid_unconstrained = sum(map(is_valid, free_texts)) / num

    auto = tool_calling(AUTO_TOOLS, "auto", None).guided()
    times: dict[str, list[float]] = {"constrained": [], "free": [], "auto_text": []}
    auto_calls = 0  # auto_text rows that wrote a call (and so ended early): none expected
    shares: list[float] = []
    lengths: list[int] | None = None
    valid = []
    for r in range(repeats):
        order = ["constrained", "free", "auto_text"]
        for mode in order[r % 3:] + order[:r % 3]:
            if mode == "constrained":  # (first in round 1: the free runs take its lengths)
                grammar_s[0] = 0.0
                wall, toks, texts, finish = run(engine, prompts, constrained)
                shares.append(grammar_s[0] / wall)
                lengths = lengths or [len(t) for t in toks]
                valid.append(sum(is_valid(t) and f == "stop" for t, f in zip(texts, finish, strict=True)) / num)
            else:
                guide = auto if mode == "auto_text" else None
                forced = [SamplingParams(temperature=0.7, seed=i, max_tokens=n, ignore_eos=True, guided=guide)
                          for i, n in enumerate(lengths)]
                wall, toks, texts, _ = run(engine, prompts, forced)
                if mode == "auto_text":
                    auto_calls += sum("<tool_call>" in t for t in texts)
                else:
                    assert [len(t) for t in toks] == lengths
            times[mode].append(wall)
            print(f"repeat {r + 1}/{repeats} {mode:12s} {wall:7.2f} s", file=sys.stderr)
    sampling.apply_grammars = apply_grammars

    ratio = statistics.median(a / b for a, b in zip(times["constrained"], times["free"], strict=True))
    auto_ratio = statistics.median(a / b for a, b in zip(times["auto_text"], times["free"], strict=True))
    report = {
        "config": {"requests": num, "max_tokens": args.max_tokens, "repeats": repeats, "threads": args.threads,
                   "dtype": "float32", "temperature": 0.7},
        "time_s": times,
        "output_tokens": sum(lengths or []),
        "constrained_vs_free_time": ratio,
        "auto_text_vs_free_time": auto_ratio,
        "auto_text_calls": auto_calls,
        "grammar_share_of_constrained": statistics.median(shares),
        "valid_constrained": min(valid),
        "valid_unconstrained": valid_unconstrained,
    }
    print(f"structured outputs: {num} requests in one batch, one JSON schema, float32, {args.threads} threads, "
          f"{report['output_tokens']} tokens a run")
    print(f"{'mode':12s} {'median s':>9s}")
    for m in times:
        print(f"{m:12s} {statistics.median(times[m]):9.2f}")
    print(f"constrained ÷ free time        {ratio:.3f}")
    print(f"auto tools text ÷ free time    {auto_ratio:.3f}  ({auto_calls} rows wrote a call)")
    print(f"grammar step share             {report['grammar_share_of_constrained']:.3f}")
    print(f"valid JSON per schema          {report['valid_constrained']:.0%} constrained, "
          f"{valid_unconstrained:.0%} unconstrained")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
