"""A multi-application workload whose output lengths follow the input (Magnus-style).

Six applications, each a system prompt plus a user turn built from templates with
varied inputs, several users per application. Users differ in style (one asks for
brevity, another for detail), so a user's history carries information the
application alone does not — the "user-level semantics" of Magnus.

Everything is generated from a seeded `random.Random`: `build_requests(n, seed)`
returns the same list every time. No downloads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# ---------------------------------------------------------------- word pools
_SUBJECTS = [
    "The old farmer", "My neighbour", "The young engineer", "A small child", "The teacher",
    "Our manager", "The doctor", "A tired traveller", "The city council", "My grandmother",
    "The new student", "A local baker", "The pilot", "Their lawyer", "The museum guide",
]
_VERBS = [
    "carried", "painted", "discovered", "repaired", "described", "sold", "borrowed",
    "explained", "ordered", "cleaned", "photographed", "moved", "lost", "found", "built",
]
_OBJECTS = [
    "a wooden chair", "the broken bicycle", "an old map", "three baskets of apples",
    "the quarterly report", "a blue umbrella", "the kitchen window", "a letter from Spain",
    "the garden fence", "a heavy suitcase", "the train schedule", "a new computer",
]
_TAILS = [
    "before the rain started", "after lunch", "in the middle of the night", "near the station",
    "with great care", "for the first time", "without telling anyone", "during the festival",
    "at the end of the week", "because nobody else would", "", "", "",
]
_ERRORS = [("was", "were"), ("has", "have"), ("their", "there"), ("its", "it's"),
           ("went", "goed"), ("children", "childs"), ("a", "an"), ("than", "then")]
_LANGS = ["French", "Spanish", "German", "Italian", "Portuguese"]
_TOPICS = [
    "a lighthouse keeper", "a lost robot", "two rival bakers", "a dragon who is afraid of fire",
    "a girl who can talk to birds", "a detective on a train", "a village without clocks",
    "an astronaut who misses home", "a cat that runs a library", "a forgotten violin",
]
_QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?", "What gas do plants absorb?",
    "How many days are in a leap year?", "What is the chemical symbol for gold?",
    "Which ocean is the largest?", "What is the square root of 81?",
    "What language is spoken in Brazil?", "How many continents are there?",
    "What is the freezing point of water in Fahrenheit?", "Who painted the Mona Lisa?",
]
_FUNC_NAMES = ["total", "average", "count_words", "clean", "merge", "score", "parse_line", "scale"]
_STATEMENTS = [
    "result = []", "for x in items:", "    if x > limit:", "        result.append(x * 2)",
    "    else:", "        result.append(x)", "total = sum(result)", "name = name.strip().lower()",
    "parts = line.split(',')", "value = int(parts[0]) + offset", "if not items:",
    "    return 0", "while n > 0:", "    n = n // 2", "    steps += 1", "data = sorted(data)",
    "mapping = {k: v for k, v in pairs}", "text = ' '.join(words)",
]


def _sentence(rng: random.Random) -> str:
    tail = rng.choice(_TAILS)
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return (s + (" " + tail if tail else "")) + "."


def _paragraph(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(lo, hi)))


def _with_errors(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    for _ in range(max(1, len(words) // 8)):
        good, bad = rng.choice(_ERRORS)
        i = rng.randrange(len(words))
        words[i] = bad if words[i] == good else words[i]
        if rng.random() < 0.3:
            words[i] = words[i] + words[i][-1:]  # a doubled letter
    return " ".join(words)


def _code(rng: random.Random) -> str:
    name = rng.choice(_FUNC_NAMES)
    lines = [f"def {name}(items, limit, name, line, n, pairs, words, offset, data):", "    steps = 0"]
    for _ in range(rng.randint(2, 12)):
        lines.append("    " + rng.choice(_STATEMENTS))
    lines.append("    return result" if rng.random() < 0.5 else "    return steps")
    return "\n".join(lines)


# -------------------------------------------------------------- applications
@dataclass(frozen=True)
class App:
    name: str
    tenant: str
    system: str
    users: tuple[tuple[str, str], ...]  # (user id, style suffix appended to the user turn)


APPS: tuple[App, ...] = (
    App("translation", "acme", "You are a professional translator. Reply with the translation only.",
        (("tr-ana", ""), ("tr-bob", ""), ("tr-chen", " Keep it literal."))),
    App("grammar", "acme", "You correct grammar and spelling. Reply with the corrected text only.",
        (("gr-dia", ""), ("gr-eli", " Then explain each correction."), ("gr-fay", ""))),
    App("summarization", "globex", "You summarize texts for busy readers.",
        (("su-gus", " Use one short sentence."), ("su-hal", " Use three bullet points."),
         ("su-ivy", " Be thorough and cover every event."))),
    App("code_translation", "globex", "You translate Python code to JavaScript. Reply with code only.",
        (("co-jon", ""), ("co-kim", " Add a comment to every line."))),
    App("qa", "initech", "You answer questions in a few words.",
        (("qa-lee", ""), ("qa-mia", " Explain why in detail."), ("qa-ned", ""))),
    App("story", "initech", "You are a creative writer.",
        (("st-oli", ""), ("st-pam", ""))),
)


def _user_turn(app: str, rng: random.Random) -> str:
    if app == "translation":
        return f"Translate into {rng.choice(_LANGS)}:\n{_paragraph(rng, 1, 4)}"
    if app == "grammar":
        return f"Correct this text:\n{_with_errors(rng, _paragraph(rng, 1, 6))}"
    if app == "summarization":
        return f"Summarize the following text.\n{_paragraph(rng, 4, 12)}"
    if app == "code_translation":
        return f"Translate to JavaScript:\n```python\n{_code(rng)}\n```"
    if app == "qa":
        return rng.choice(_QUESTIONS)
    if app == "story":
        n = rng.choice([2, 3, 5, 8, 12])
        return f"Write a story about {rng.choice(_TOPICS)} in {n} sentences."
    raise ValueError(f"unknown application {app!r}")


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of the workload (without its measured output length)."""

    id: str
    app: str
    tenant: str
    user: str
    messages: tuple[dict, ...]  # chat messages: system, user

    @property
    def instruction(self) -> str:
        """System prompt and first user turn: what the predictor embeds."""
        return "\n".join(m["content"] for m in self.messages[:2])


def build_requests(n: int, seed: int = 0) -> list[WorkloadRequest]:
    """`n` requests, applications and users drawn uniformly; deterministic in `seed`."""
    if n <= 0:
        raise ValueError("n must be positive")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        app = rng.choice(APPS)
        user, style = rng.choice(app.users)
        msgs = ({"role": "system", "content": app.system},
                {"role": "user", "content": _user_turn(app.name, rng) + style})
        out.append(WorkloadRequest(f"w{i:04d}", app.name, app.tenant, user, msgs))
    return out
