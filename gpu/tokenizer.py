"""Tokenizer: text ⇄ token ids and the chat template, from a GGUF or a Hugging Face folder.

A GGUF carries no `tokenizer.json`: its vocabulary, merges, token types, special
ids and chat template live in metadata under llama.cpp's key names. `load_tokenizer`
rebuilds a Hugging Face `tokenizers.Tokenizer` from them, so encoding and decoding
run in the same Rust code every other serving stack uses, and `to_hf_tokenizer_json`
can write the result out next to a converted checkpoint.

Choices, and why:

* Pre-tokenizer. `tokenizer.ggml.pre` names how text is split before BPE. For
  "smollm" (and the StarCoder family it comes from) digits are split one by one
  before the GPT-2 regex — the same as SmolLM2's own `tokenizer.json`
  (`Digits(individual_digits=True)` + `ByteLevel`) and llama.cpp's "smollm" split.
  transformers' GGUF loader ignores this name and uses the plain GPT-2 split; the two
  agree on everything except runs of 2+ spaces directly before a digit ("a  1": the
  original gives `ĠĠ`,`1`, transformers `Ġ`,`Ġ`,`1`). We follow the model's own
  tokenizer, which is what it was trained on.
* Special tokens. Tokens of type CONTROL become special added tokens, so
  `<|im_start|>` in text is one token (as in transformers and llama.cpp);
  USER_DEFINED tokens become plain added tokens.
* BOS. `tokenizer.ggml.add_bos_token` is honoured: SmolLM2 says False, and Hugging
  Face's SmolLM2 does not add BOS either (the chat template starts with
  `<|im_start|>`), so `encode(..., add_special_tokens=True)` adds nothing for it.
* End of generation. `eos_token_ids` holds the file's eos id, the end-of-turn token
  the chat template closes turns with (`<|im_end|>` for ChatML) and the
  end-of-document token. For SmolLM2 the GGUF's eos is 2 = `<|im_end|>` (bos 1 =
  `<|im_start|>`, 0 = `<|endoftext|>`), which matches the Hugging Face generation
  config (eos 2); the set is `(2, 0)`, the same as `gpu.loader` puts in ModelConfig.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp token types (gguf.TokenType): only these two change how text is split.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Tokens that chat templates use to close a turn, and tokens that end a document.
# Same policy as `gpu.loader.resolve_eos_token_ids` (ModelConfig.eos_token_ids).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_END_OF_DOCUMENT_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` values whose split is GPT-2's regex preceded by one-digit splits.
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"})
_PLAIN_GPT2 = frozenset({"gpt2", "default", "gpt-2"})
_LLAMA3 = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3"})


class TokenizerError(ValueError):
    """The tokenizer source is missing, malformed or of an unsupported kind."""


class ChatTemplateError(ValueError):
    """The chat template is missing or raised (`raise_exception`) while rendering."""


# texts this long are encoded without holding the GIL (`Tokenizer.encode`), so that one
# tokenized in a worker thread does not stop the event loop (it stopped it for its whole length)
GIL_FREE_CHARS = 4096
# tokens a prefix cut mid-word may take beyond the whole text's (`Tokenizer.encode_within`)
PREFIX_MARGIN_TOKENS = 64
_PROBE = "\x00lmgate-final-message\x00"  # stands for the final message's text (`apply_chat_template`)


def open_final_message(rendered: str, final: str, start: int = -1) -> str:
    """`rendered` (a chat rendered without a generation prompt) cut right after the text of
    its final message, `final`, so the model continues that message instead of reading it
    as ended: whatever the template writes after it (end of turn, newlines) goes. A template
    may trim the message's surrounding whitespace; then the cut follows the trimmed text.
    `start`: where the message's text begins in `rendered`, if known (else the last place
    the text occurs is taken). ChatTemplateError if the final message is blank or the
    template does not write it."""
    core = final.strip()
    if not core:
        raise ChatTemplateError("continue_final_message needs a final message with text to continue")
    at = rendered.find(core, start) if start >= 0 else rendered.rfind(core)
    if at < 0:
        raise ChatTemplateError("continue_final_message: the chat template does not write the final message as given")
    kept = final.lstrip()  # the message's trailing whitespace stays if the template kept it
    return rendered[:at + len(kept)] if rendered.startswith(kept, at) else rendered[:at + len(core)]


@dataclass(frozen=True)
class TokenizerSpec:
    """What a tokenizer needs besides its `tokenizers.Tokenizer`: the special ids and template."""

    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None
    add_bos_token: bool = False
    extra_eos_token_ids: tuple[int, ...] = ()  # e.g. generation_config.json's eos list


class Tokenizer:
    """Encode, decode and render chat prompts for one model.

    Thread-safe for concurrent `encode`/`decode` (the Rust tokenizer is); the object
    itself is immutable after construction.
    """

    def __init__(self, backend: HFTokenizer, spec: TokenizerSpec) -> None:
        self._backend = backend
        self._spec = spec
        self._template = _compile_chat_template(spec.chat_template) if spec.chat_template else None
        self._token_bytes: dict[int, bytes] = {}  # `token_bytes`'

    # ------------------------------------------------------------------ basics
    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (do not mutate it)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._spec.bos_token_id

    @property
    def chat_template(self) -> str | None:
        return self._spec.chat_template

    @property
    def template_reads_clock(self) -> bool:
        """Whether the chat template calls `strftime_now` (Llama 3's "Today Date"): the same
        messages then render differently as time passes, so no rendering may be kept."""
        return "strftime_now" in (self.chat_template or "")

    @cached_property
    def all_special_ids(self) -> tuple[int, ...]:
        """Ids of every special added token, sorted."""
        specials = self._backend.get_added_tokens_decoder()
        return tuple(sorted(i for i, tok in specials.items() if tok.special))

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation, declared ones first.

        The declared eos (plus generation_config's list), the end-of-turn token the chat
        template writes (`<|im_end|>`), and the end-of-document token (`<|endoftext|>`)
        when the vocabulary has them as special tokens: a model that emits either has
        finished, and continuing produces garbage (llama.cpp stops on both too). For
        SmolLM2 this is (2, 0); HF's generation config lists only 2.
        """
        ids: list[int] = []
        for tid in (self._spec.eos_token_id, *self._spec.extra_eos_token_ids):
            if tid is not None and tid not in ids:
                ids.append(tid)
        template = self._spec.chat_template or ""
        special = set(self.all_special_ids)
        wanted = [t for t in _END_OF_TURN_TOKENS if t in template] + list(_END_OF_DOCUMENT_TOKENS)
        for token in wanted:
            tid = self._backend.token_to_id(token)
            if tid is not None and tid in special and tid not in ids:
                ids.append(tid)
        return tuple(ids)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary spelling of `token_id` (byte-level alphabet, e.g. `Ġhello`)."""
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise KeyError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for (what OpenAI's logprobs `bytes` lists): exact
        for byte-level BPE (GPT-2's alphabet mapped back) and for `<0xNN>` byte-fallback
        tokens, where decoding the token alone would give U+FFFD for part of a UTF-8
        character; a special token's own spelling; otherwise the token decoded alone.
        Remembered (at most the vocabulary): logprobs ask for it per token and alternative."""
        known = self._token_bytes.get(token_id)
        if known is None:
            known = self._token_bytes[token_id] = self._spell_bytes(token_id)
        return known

    def _spell_bytes(self, token_id: int) -> bytes:
        token = self.id_to_token(token_id)
        if token_id in self.all_special_ids:
            return token.encode()
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        if isinstance(self._backend.decoder, decoders.ByteLevel):
            table = _byte_decoder()
            if all(c in table for c in token):
                return bytes(table[c] for c in token)
        return self.decode([token_id], skip_special_tokens=False).encode()

    # ------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text are always recognized.

        `add_special_tokens=True` adds what the model's post-processor adds (BOS when the
        source asks for it; nothing for SmolLM2).
        """
        if len(text) >= GIL_FREE_CHARS:  # `encode` holds the GIL throughout; `encode_batch` lets it go
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_within(self, text: str, limit: int, *, first_chars: int = 65_536) -> list[int] | None:
        """`encode(text)`, or None as soon as a prefix of it is more than `limit` tokens
        (plus a margin for the word the cut splits; a whole text just over `limit` comes
        back encoded, for the caller to refuse with its count): a text far too long costs about as
        much as one that fits, not its whole length (a megabyte of digits took two
        seconds). Prefixes grow fourfold from `first_chars`, so a text that fits costs at
        most a third more."""
        n = first_chars
        while n < len(text):
            if len(self.encode(text[:n])) > limit + PREFIX_MARGIN_TOKENS:
                return None
            n *= 4
        return self.encode(text)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        encs = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Bytes that do not form complete UTF-8 characters come out as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------- chat template
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` with the model's chat template, as transformers does.

        Same environment as transformers (sandboxed, `trim_blocks`, `lstrip_blocks`,
        `loopcontrols`, `raise_exception`, `strftime_now`, a non-escaping `tojson`) and the
        same variables (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, ...).
        `continue_final_message` leaves the last message open (`open_final_message`), so the
        model continues it (a prefilled answer); it excludes `add_generation_prompt`.
        Raises ChatTemplateError when there is no template, the template raises, or the
        final message cannot be left open.
        """
        if self._template is None:
            raise ChatTemplateError("this tokenizer has no chat template")
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set")
        variables = dict(self._special_token_strings())
        variables.update(template_kwargs)
        try:
            text = self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        if continue_final_message:
            final = messages[-1].get("content") if messages else None
            # where the final message's text begins: rendered again with a marker for it, so
            # a prefill that also occurs in the template's end of turn (">", "im_end") is
            # found as written, not inside the end-of-turn text after it
            probe = [*map(dict, messages[:-1]), {**messages[-1], "content": _PROBE}] if messages else []
            try:
                # the last occurrence: the final message is rendered last (an earlier message may hold the marker)
                start = self._template.render(messages=probe, add_generation_prompt=False, **variables).rfind(_PROBE)
            except jinja2.TemplateError:
                start = -1
            return open_final_message(text, final if isinstance(final, str) else "", start=start)
        return text

    def render_and_encode(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """Prompt ids for `messages`. The template writes its own special tokens, so none are added."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message)
        return self.encode(text, add_special_tokens=False)

    @cached_property
    def fingerprint(self) -> str:
        """What tells this tokenizer and chat template from another's: a hash of both (a
        cache of rendered prompts keys by it, so that a server whose model name is another
        server's, but not its tokenizer or template, never reads the other's token ids)."""
        digest = hashlib.sha256(self.to_hf_tokenizer_json().encode())
        digest.update(b"\0" + (self.chat_template or "").encode())
        digest.update(b"\0" + repr(self.to_hf_tokenizer_config()).encode())
        return digest.hexdigest()[:16]

    # ----------------------------------------------------------- serialization
    def to_hf_tokenizer_json(self) -> str:
        """The tokenizer as a Hugging Face `tokenizer.json` document."""
        return self._backend.to_str()

    def to_hf_tokenizer_config(self) -> dict[str, Any]:
        """A minimal `tokenizer_config.json` for the same tokenizer (template, bos/eos, add_bos)."""
        names = self._special_token_strings()
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": names.get("bos_token"),
            "eos_token": names.get("eos_token"),
            "add_bos_token": self._spec.add_bos_token,
            "chat_template": self._spec.chat_template,
            "clean_up_tokenization_spaces": False,
        }

    def _special_token_strings(self) -> dict[str, str]:
        out = {}
        for name, tid in (("bos_token", self._spec.bos_token_id), ("eos_token", self._spec.eos_token_id)):
            if tid is not None:
                tok = self._backend.id_to_token(tid)
                if tok is not None:
                    out[name] = tok
        return out


# ---------------------------------------------------------------- chat template
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character → byte (the inverse of `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in an environment equivalent to transformers' one."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which would change prompts.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:  # (at load: the tokenizer is unusable, not a request)
        raise TokenizerError(f"chat template does not compile: {exc}") from exc


# ---------------------------------------------------------------------- loading
def load_tokenizer(source: str | Path | Any) -> Tokenizer:
    """A Tokenizer from a `.gguf` file, a folder holding `tokenizer.json`, or a checkpoint.

    `source` may be:
    * a path to a `.gguf` file (its `tokenizer.*` metadata, read by `gpu.gguf_file`);
    * a folder with `tokenizer.json`, plus optionally `tokenizer_config.json` (chat
      template, bos/eos, add_bos_token) and `generation_config.json` (eos ids); a folder
      without `tokenizer.json` but with exactly one `.gguf` is read from that file;
    * a bundled model name understood by `gpu.loader.resolve_source` ("smollm2");
    * a `gpu.loader.Checkpoint` (anything with `tokenizer_metadata` / `tokenizer_dir`),
      which avoids reading the GGUF a second time.
    """
    if hasattr(source, "tokenizer_metadata") or hasattr(source, "tokenizer_dir"):
        meta = getattr(source, "tokenizer_metadata", None)
        folder = getattr(source, "tokenizer_dir", None)
        if meta:
            return tokenizer_from_gguf_metadata(meta)
        if folder is not None:
            return _from_hf_folder(Path(folder))
        raise TokenizerError(f"checkpoint {getattr(source, 'source', source)!r} carries no tokenizer")
    path = Path(source)
    if not path.exists() and isinstance(source, str):
        from gpu.loader import BUNDLED_ALIASES, resolve_source

        if source.lower() in BUNDLED_ALIASES:
            path = resolve_source(source)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_hf_folder(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_gguf(ggufs[0])
        raise TokenizerError(
            f"{path} holds no tokenizer.json and {len(ggufs)} .gguf files (need exactly one)"
        )
    raise TokenizerError(f"{path} is neither a .gguf file nor a folder with tokenizer.json")


def _from_gguf(path: Path) -> Tokenizer:
    from gpu.gguf_file import GgufError, GgufFile

    try:
        fields = GgufFile.open(path).fields
    except GgufError as e:
        raise TokenizerError(str(e)) from None
    return tokenizer_from_gguf_metadata({k: v for k, v in fields.items() if k.startswith("tokenizer.")})


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """A Tokenizer from a GGUF's `tokenizer.*` key/values (full key names, plain values)."""
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise TokenizerError(f"GGUF metadata lacks {key}")
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise TokenizerError(
            f"tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r}; "
            "only byte-level BPE ('gpt2') is supported"
        )
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    bos = _optional_int(meta.get("tokenizer.ggml.bos_token_id"))
    backend = build_byte_level_bpe(
        tokens=[str(t) for t in meta["tokenizer.ggml.tokens"]],
        merges=[str(m) for m in meta["tokenizer.ggml.merges"]],
        token_types=meta.get("tokenizer.ggml.token_type"),
        pre=str(meta.get("tokenizer.ggml.pre", "default")),
        bos_token_id=bos,
        add_bos_token=add_bos,
    )
    spec = TokenizerSpec(
        bos_token_id=bos,
        eos_token_id=_optional_int(meta.get("tokenizer.ggml.eos_token_id")),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=add_bos,
    )
    return Tokenizer(backend, spec)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def build_byte_level_bpe(
    *,
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int] | None,
    pre: str,
    bos_token_id: int | None = None,
    add_bos_token: bool = False,
) -> HFTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from llama.cpp-style vocabulary metadata.

    `tokens[i]` is spelled in GPT-2's byte alphabet and has id i; `merges` are
    "left right" strings in rank order; `pre` is `tokenizer.ggml.pre`.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError("GGUF vocabulary has duplicate tokens")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise TokenizerError(f"malformed merge {m!r}")
        pairs.append((left, right))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer_for(pre)
    backend.decoder = decoders.ByteLevel()
    if add_bos_token and bos_token_id is not None:
        bos = tokens[bos_token_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_token_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(token_types) if token_types is not None else []
    control = [tokens[i] for i, t in enumerate(types) if t == _TOKEN_TYPE_CONTROL]
    user = [tokens[i] for i, t in enumerate(types) if t == _TOKEN_TYPE_USER_DEFINED]
    # Added tokens keep their existing ids because they are already in the vocabulary.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise TokenizerError("added tokens changed the vocabulary size; a control token is not in the vocab")
    return backend


def _pre_tokenizer_for(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _PLAIN_GPT2:
        return byte_level
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise TokenizerError(f"unsupported tokenizer.ggml.pre {pre!r}")


def _from_hf_folder(folder: Path) -> Tokenizer:
    try:
        backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises a bare Exception ("Model missing")
        raise TokenizerError(f"{folder / 'tokenizer.json'}: not a usable tokenizer ({e})") from None
    config = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")

    def token_id(entry: Any) -> int | None:
        # tokenizer_config writes a token as a string or as an AddedToken dict.
        if isinstance(entry, dict):
            entry = entry.get("content")
        if not isinstance(entry, str):
            return None
        return backend.token_to_id(entry)

    bos = token_id(config.get("bos_token"))
    eos = token_id(config.get("eos_token"))
    gen_eos = generation.get("eos_token_id")
    gen_eos_ids = tuple(gen_eos) if isinstance(gen_eos, list) else (gen_eos,) if isinstance(gen_eos, int) else ()
    if eos is None and gen_eos_ids:
        eos = gen_eos_ids[0]
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = by_name.get("default")
    chat_file = folder / "chat_template.jinja"
    if template is None and chat_file.is_file():
        try:
            template = chat_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{chat_file}: unreadable ({e})") from None
    spec = TokenizerSpec(
        bos_token_id=bos,
        eos_token_id=eos,
        chat_template=template,
        add_bos_token=bool(config.get("add_bos_token", False)),
        extra_eos_token_ids=tuple(int(i) for i in gen_eos_ids),
    )
    return Tokenizer(backend, spec)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    return data
