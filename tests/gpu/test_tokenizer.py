"""The GGUF-built tokenizer against transformers' tokenizer for the same file.

Reference: `AutoTokenizer.from_pretrained(dir, gguf_file=...)` (transformers' own GGUF
conversion). It differs from SmolLM2's original `tokenizer.json` in one place, the
digit pre-split (see gpu/tokenizer.py); the tests pin both facts.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from gpu.loader import bundled_gguf_path
from gpu.tokenizer import (
    ChatTemplateError,
    Tokenizer,
    TokenizerError,
    TokenizerSpec,
    load_tokenizer,
    tokenizer_from_gguf_metadata,
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand \r\n windows",
    "naïve café résumé Ελληνικά русский",
    "日本語のテキスト、中文文本，한국어",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "Numbers 12345 and 3.14159 and -42, 1e10",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <filename>x.py<file_sep>",
    "don't won't I'll we've they're it's",
    "URL https://example.com/a?b=c&d=e#frag",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "",
]

# Where SmolLM2's own digit split gives different ids than transformers' GGUF loader.
DIVERGENT = ["a  1", "x\n\n  2024"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(bundled_gguf_path())


@pytest.fixture(scope="module")
def hf():
    """transformers' tokenizer of the GGUF (its own conversion; `ops.hf_reference` keeps it)."""
    pytest.importorskip("transformers")
    from ops.hf_reference import load_tokenizer as load_hf_tokenizer

    return load_hf_tokenizer()


# ------------------------------------------------------------------ own behaviour
def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.id_to_token(1) == "<|im_start|>"
    assert tok.eos_token_ids == (2, 0)  # <|im_end|>, then <|endoftext|>
    assert tok.id_to_token(2) == "<|im_end|>"
    assert tok.all_special_ids == tuple(range(17))


def test_special_tokens_are_single_tokens_and_skippable(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_no_bos_added_like_hf_smollm2(tok):
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")


@pytest.mark.parametrize("text", TEXTS + DIVERGENT)
def test_roundtrip(tok, text):
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_digits_are_split_like_smollm2(tok):
    ids = tok.encode("a  1")
    assert [tok.id_to_token(i) for i in ids] == ["a", "ĠĠ", "1"]


def test_chat_template_renders_chatml(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.render_and_encode([{"role": "user", "content": "Hi"}])
    assert ids == tok.encode(text) and ids[0] == 1


def test_chat_template_raise_exception_and_missing_template(tok):
    failing = Tokenizer(tok.backend, TokenizerSpec(1, 2, "{{ raise_exception('no ' + messages[0]['role']) }}"))
    with pytest.raises(ChatTemplateError, match="no user"):
        failing.apply_chat_template([{"role": "user", "content": "x"}])
    bare = Tokenizer(tok.backend, TokenizerSpec(1, 2, None))
    with pytest.raises(ChatTemplateError):
        bare.apply_chat_template([])


def test_continue_final_message_leaves_the_last_message_open(tok):
    """A prefilled answer: the chat ends inside the last message, its whitespace kept, so
    the model continues it; a template that trims the message is cut after the trimmed text."""
    chat = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Sure, it is "}]
    text = tok.apply_chat_template(chat, add_generation_prompt=False, continue_final_message=True)
    assert text == tok.apply_chat_template(chat[:1]) + "Sure, it is "
    assert tok.render_and_encode(chat, False, True) == tok.encode(text)
    for prefill in (">", "<", "im_end", "end", "|"):  # text the end-of-turn marker also holds: cut after the message
        assert tok.apply_chat_template([*chat[:1], {"role": "assistant", "content": prefill}], add_generation_prompt=False,
                                       continue_final_message=True) == tok.apply_chat_template(chat[:1]) + prefill
    trimming = Tokenizer(tok.backend, TokenizerSpec(1, 2, "{% for m in messages %}[{{ m['content'] | trim }}]{% endfor %}"))
    assert trimming.apply_chat_template(chat, add_generation_prompt=False,
                                        continue_final_message=True) == "[Capital of France?][Sure, it is"
    for bad, match in (([*chat[:1], {"role": "assistant", "content": "  "}], "text to continue"), ([], "text")):
        with pytest.raises(ChatTemplateError, match=match):
            tok.apply_chat_template(bad, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="cannot both"):
        tok.apply_chat_template(chat, continue_final_message=True)
    # an earlier message that holds the marker the cut looks for does not move the cut into it
    marker = "\x00lmgate-final-message\x00"  # (what `apply_chat_template` marks the final message with)
    marked = [{"role": "user", "content": f"{marker} Paris is nice"}, {"role": "assistant", "content": "Paris"}]
    assert tok.apply_chat_template(marked, add_generation_prompt=False, continue_final_message=True) == (
        tok.apply_chat_template(marked[:1]) + "Paris")
    hidden = Tokenizer(tok.backend, TokenizerSpec(1, 2, "{% for m in messages %}{{ m['role'] }};{% endfor %}"))
    with pytest.raises(ChatTemplateError, match="does not write the final message"):
        hidden.apply_chat_template(chat, add_generation_prompt=False, continue_final_message=True)


def test_hf_folder_roundtrip(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.to_hf_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok.to_hf_tokenizer_config()))
    again = load_tokenizer(tmp_path)
    for text in TEXTS + DIVERGENT:
        assert again.encode(text) == tok.encode(text)
    assert again.eos_token_ids == tok.eos_token_ids
    assert again.bos_token_id == tok.bos_token_id
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert again.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_encode_within_stops_at_a_prefix_too_long_and_else_encodes_it_all(tok):
    """A text far over the limit is told from a prefix (cost bounded by the limit, not the
    text); one that fits, or is just over, comes back whole, as `encode` gives it."""
    assert tok.encode_within("1" * 300_000, 1000, first_chars=4096) is None  # one token a digit
    fits = "hello world " * 20_000  # 240,000 characters, past every prefix step
    assert tok.encode_within(fits, 50_000, first_chars=4096) == tok.encode(fits)
    # a long text is encoded in a batch of one (which lets the GIL go): the same ids as the plain call
    assert tok.encode(fits) == tok.backend.encode(fits, add_special_tokens=False).ids
    just_over = tok.encode_within("hello world " * 600, 1000, first_chars=4096)
    assert just_over == tok.encode("hello world " * 600) and len(just_over) > 1000  # the caller counts it


def test_fingerprint_tells_tokenizers_and_templates_apart(tok, tmp_path):
    """The prompt cache keys renderings by it: the same tokenizer and template (saved and
    loaded again) agree; another template over the same vocabulary does not."""
    (tmp_path / "tokenizer.json").write_text(tok.to_hf_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok.to_hf_tokenizer_config()))
    assert load_tokenizer(tmp_path).fingerprint == tok.fingerprint
    other = Tokenizer(tok.backend, TokenizerSpec(tok.bos_token_id, tok.eos_token_ids[0], "{{ messages[0]['content'] }}"))
    assert other.fingerprint != tok.fingerprint


def test_generation_config_eos_list_is_honoured(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.to_hf_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok.to_hf_tokenizer_config()))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert set(load_tokenizer(tmp_path).eos_token_ids) == {0, 2}


def test_bad_source(tmp_path):
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path / "nothing-here")
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path)


# ----------------------------------------------------- against transformers (slow)
@pytest.mark.slow
def test_encode_matches_transformers(tok, hf):
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf.encode(text), text


@pytest.mark.slow
def test_divergence_from_transformers_is_only_the_digit_split(tok, hf):
    """transformers ignores tokenizer.ggml.pre="smollm"; with the digit split it agrees."""
    for text in DIVERGENT:
        assert tok.encode(text) != hf.encode(text, add_special_tokens=False), text
    fixed = HFTokenizer.from_str(hf.backend_tokenizer.to_str())  # a copy: hf is shared
    fixed.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), fixed.pre_tokenizer]
    )
    for text in TEXTS + DIVERGENT:
        assert tok.encode(text) == fixed.encode(text, add_special_tokens=False).ids, text


@pytest.mark.slow
def test_decode_matches_transformers(tok, hf):
    for text in TEXTS:
        ids = tok.encode(text)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    odd = [1, 216, 7906, 240, 2, 0, 5, 33, 178]  # specials and a split emoji
    for skip in (True, False):
        assert tok.decode(odd, skip_special_tokens=skip) == hf.decode(odd, skip_special_tokens=skip)


@pytest.mark.slow
def test_special_ids_match_transformers(tok, hf):
    assert tok.bos_token_id == hf.bos_token_id
    assert hf.eos_token_id in tok.eos_token_ids
    assert set(hf.all_special_ids) <= set(tok.all_special_ids)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke 😀"},
        {"role": "assistant", "content": "Why did the chicken…"},
        {"role": "user", "content": "日本語で"},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, add_generation_prompt):
    for msgs in CONVERSATIONS:
        ours = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        theirs = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == theirs
        assert tok.render_and_encode(msgs, add_generation_prompt) == hf.encode(
            theirs, add_special_tokens=False
        )


@pytest.mark.slow
def test_continue_final_message_matches_transformers(tok, hf):
    for msgs in CONVERSATIONS:
        for prefill in ("The answer", "Sure, ", "  spaced  ", "日本"):
            chat = [*msgs, {"role": "assistant", "content": prefill}]
            theirs = hf.apply_chat_template(chat, tokenize=False, continue_final_message=True)
            assert tok.apply_chat_template(chat, add_generation_prompt=False, continue_final_message=True) == theirs


@pytest.mark.slow
def test_written_tokenizer_json_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_text(tok.to_hf_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok.to_hf_tokenizer_config()))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS + DIVERGENT:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(CONVERSATIONS[1])
    )


@pytest.fixture(scope="module")
def gguf_metadata(tok) -> dict:
    """The bundled file's tokenizer metadata, rebuilt from the tokenizer (no second GGUF read)."""
    model = json.loads(tok.to_hf_tokenizer_json())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3 if i in tok.all_special_ids else 1 for i in range(len(tokens))],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": tok.chat_template,
    }


def test_metadata_rebuild_is_identical(tok, gguf_metadata):
    again = tokenizer_from_gguf_metadata(gguf_metadata)
    for text in TEXTS + DIVERGENT:
        assert again.encode(text) == tok.encode(text)
    assert again.eos_token_ids == (2, 0)


def test_add_bos_token_from_metadata_is_honoured(gguf_metadata):
    with_bos = tokenizer_from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode("hi", add_special_tokens=True) == [1, *with_bos.encode("hi")]


def test_unsupported_metadata_is_rejected(gguf_metadata):
    with pytest.raises(TokenizerError, match="pre"):
        tokenizer_from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(TokenizerError, match="model"):
        tokenizer_from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.model": "llama"})
    missing = {k: v for k, v in gguf_metadata.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(TokenizerError, match="merges"):
        tokenizer_from_gguf_metadata(missing)


def test_end_of_turn_token_counts_only_when_the_template_uses_it(gguf_metadata):
    base = tokenizer_from_gguf_metadata(
        {**gguf_metadata, "tokenizer.ggml.eos_token_id": 0, "tokenizer.chat_template": None}
    )
    assert base.eos_token_ids == (0,)  # no template: <|im_end|> is not an end of turn
    chat = tokenizer_from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.eos_token_id": 0})
    assert chat.eos_token_ids == (0, 2)  # plus the template's <|im_end|>


def test_token_bytes_are_exact_where_a_token_alone_decodes_to_u_fffd(tok):
    text = "日本語 🙂 héllo <|im_end|>"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == text
    partial = [i for i in ids if "\ufffd" in tok.decode([i], skip_special_tokens=False)]
    assert partial  # the emoji and CJK characters span tokens
    for i in partial:  # one piece of a UTF-8 character, not the replacement character's bytes
        assert tok.token_bytes(i) != "\ufffd".encode()
    assert tok.token_bytes(tok.token_to_id("<|im_end|>")) == b"<|im_end|>"
