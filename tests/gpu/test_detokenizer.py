"""Incremental detokenization and stop strings, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu.detokenizer import IncrementalDetokenizer, StopChecker
from gpu.loader import bundled_gguf_path
from gpu.tokenizer import Tokenizer, load_tokenizer

SPLIT_TEXTS = [
    "emoji 😀👍🏽🇫🇷 and a family 👨‍👩‍👧 end",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "naïve café — “quotes” … ½ ∑ ∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "plain ascii with code: for i in range(10): print(i)",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(bundled_gguf_path())


def stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.push(t) for t in ids]
    tail = detok.finish()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


# --------------------------------------------------------------------- detokenizer
@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_incremental_text_equals_full_decode(tok, text):
    ids = tok.encode(text)
    deltas, tail = stream(tok, ids)
    assert "".join(deltas) == text and tail == ""
    # No delta ever carries a half character.
    assert all("\ufffd" not in d for d in deltas)


def test_split_emoji_is_held_back_until_complete(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji is split over byte tokens in this vocabulary
    deltas, _ = stream(tok, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "😀"


def test_random_token_sequences_match_full_decode(tok):
    rng = random.Random(1234)
    pieces = [tok.encode(t) for t in SPLIT_TEXTS]
    pool = sorted({i for p in pieces for i in p})
    for _ in range(150):
        ids: list[int] = []
        while len(ids) < 40:
            r = rng.random()
            if r < 0.4:
                p = rng.choice(pieces)
                start = rng.randrange(len(p))
                ids.extend(p[start:start + rng.randint(1, 6)])
            elif r < 0.8:
                ids.append(rng.choice(pool))
            elif r < 0.95:
                ids.append(rng.randrange(tok.vocab_size))
            else:
                ids.append(rng.randrange(17))  # a special token
        for skip in (True, False):
            deltas, tail = stream(tok, ids, skip)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens_follow_skip_flag(tok):
    ids = tok.encode("hi<|im_end|>")
    assert "".join(stream(tok, ids, skip=True)[0]) == "hi"
    assert "".join(stream(tok, ids, skip=False)[0]) == "hi<|im_end|>"


def test_decode_window_stays_small(tok):
    """Per-token work is bounded: the decoder never sees more than a few tokens."""

    class CountingDecoder:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = CountingDecoder()
    detok = IncrementalDetokenizer(counting)
    ids = tok.encode(" ".join(SPLIT_TEXTS) * 20)
    out = "".join(detok.push(t) for t in ids)
    assert out == tok.decode(ids)
    assert counting.longest <= 8


# ------------------------------------------------------------------- stop strings
def run_stop(chunks, stop, include=False):
    checker = StopChecker(stop, include)
    emitted = []
    for c in chunks:
        emit, stopped, matched = checker.push(c)
        emitted.append(emit)
        if stopped:
            return emitted, matched
    emitted.append(checker.flush())
    return emitted, None


def expected_output(text: str, stop: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    best = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return text[: i + len(s) if include else i], s


def test_stop_string_spanning_chunks_is_cut_and_never_leaks():
    emitted, matched = run_stop(["Hello wo", "rld! ST", "OP here"], ("STOP",))
    assert matched == "STOP"
    assert "".join(emitted) == "Hello world! "
    assert emitted[1] == "rld! "  # "ST" was held back, not sent


def test_include_stop_str_in_output():
    emitted, matched = run_stop(["a<", "/end>b"], ("</end>",), include=True)
    assert matched == "</end>" and "".join(emitted) == "a</end>"


def test_held_back_prefix_is_released_when_it_does_not_complete():
    emitted, matched = run_stop(["x S", "TOP", "!"], ("STOPPED",))
    assert matched is None and "".join(emitted) == "x STOP!"
    assert emitted[0] == "x " and emitted[1] == ""


def test_first_completed_stop_wins_regardless_of_chunking():
    text = "the answer is abcdef"
    stops = ("cdef", "bc", "answer is abx")
    for cut in range(len(text) + 1):
        emitted, matched = run_stop([text[:cut], text[cut:]], stops)
        assert matched == "bc" and "".join(emitted) == "the answer is a"


def test_stop_strings_on_real_token_streams_never_leak(tok):
    rng = random.Random(7)
    texts = [
        "First line.\nSecond line.\n\nThird 😀 line with END marker END here",
        "User: hi\nAssistant: hello\nUser: bye",
        "日本語のテキスト、中文文本，한국어 텍스트 and more",
    ]
    for text in texts:
        ids = tok.encode(text)
        for _ in range(20):
            a, b = sorted(rng.sample(range(len(text) + 1), 2))
            if a == b:
                continue
            stop = (text[a:b], "\n\n", "zzz")
            include = rng.random() < 0.5
            want, want_match = expected_output(text, stop, include)
            detok = IncrementalDetokenizer(tok)
            checker = StopChecker(stop, include)
            sent = ""
            matched = None
            for t in ids:
                emit, stopped, matched = checker.push(detok.push(t))
                sent += emit
                assert want.startswith(sent), (stop, sent)  # never ahead of the true output
                if stopped:
                    break
            else:
                sent += checker.push(detok.finish())[0] + checker.flush()
            assert sent == want and matched == want_match


def test_push_after_stop_is_an_error():
    checker = StopChecker(("x",))
    assert checker.push("ax") == ("a", True, "x")
    assert checker.stopped
    with pytest.raises(RuntimeError):
        checker.push("more")


def test_no_stop_strings_passes_text_through():
    checker = StopChecker(())
    assert checker.push("abc") == ("abc", False, None)
    assert checker.flush() == ""


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc\n", max_size=40),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
    include=st.booleans(),
)
def test_stop_checker_property(text, stops, cuts, include):
    """Any chunking: output is the text cut at the first completed stop, never ahead of it."""
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    want, want_match = expected_output(text, tuple(stops), include)
    emitted, matched = run_stop(chunks, tuple(stops), include)
    sent = ""
    for e in emitted:
        sent += e
        assert want.startswith(sent)
    assert sent == want and matched == want_match


def test_an_unarmed_stop_checker_passes_text_through():
    from gpu.detokenizer import StopChecker

    sc = StopChecker(["."])
    assert sc.push("Paris.", armed=False) == ("Paris.", False, None)
    assert sc.push(" It is", armed=True) == (" It is", False, None)
    assert sc.push(" big. And", armed=True) == (" big", True, ".")
