"""Structured outputs: sampling constrained to a JSON schema, a regex, a choice or a grammar.

A request's `SamplingParams.guided` (a `GuidedDecoding`) names what its text must match.
llguidance (the Rust grammar engine vLLM and SGLang also offer as a backend) compiles it
against the tokenizer's vocabulary into a matcher. At every step the matcher gives the
tokens that keep the text a prefix of some match (a bitmask, one bit per token id); the
sampler sets every other logit to -inf before it samples (`apply_bitmask`), and the
engine advances the matcher by the token it kept. When the matcher says the text is
complete (`is_stopped`: nothing may follow but end of sequence), the engine ends the
choice with `finish_reason` "stop" at once, without a step for the EOS token.

What each kind takes (`GuidedDecoding.spec`):
- "json": a JSON schema, as JSON text (OpenAI's `response_format` json_schema, vLLM's
  `guided_json`). Between JSON tokens a model may write up to 24 whitespace characters
  (`DEFAULT_JSON_WHITESPACE`), so it can pretty-print as it was trained to but cannot
  run on in blank lines; `whitespace` "" allows none (vLLM's `disable_any_whitespace`),
  another pattern replaces the default (vLLM's `whitespace_pattern`). A schema's own
  `x-guidance` options override the default, not a request's `whitespace`. `oneOf` is
  read as `anyOf` (`JSON_DEFAULTS`: pydantic's discriminated unions, whose branches
  exclude each other anyway).
- "json_object": any JSON object (`response_format: {"type": "json_object"}`); spec empty.
- "regex": a regular expression the whole text must match (Rust `regex` syntax).
- "choice": a JSON list of strings; the text is exactly one of them.
- "grammar": a Lark grammar (llguidance's dialect) or a GBNF one (llama.cpp's).

Why these choices:
- The grammar is compiled once per distinct spec and kept in an LRU of prototype matchers
  (`GrammarCompiler`); each sequence gets a `deep_copy` (cheap: the compiled grammar is
  shared). Admission compiles a request's grammar off the event loop, so a bad spec is a
  400 before the request queues, and the engine's copy is a cache hit on its compute thread.
- The masks of a step's constrained rows are computed together by llguidance's executor
  (its own threads, without the GIL), then unpacked and applied as one tensor op.
- If the request's own bans (EOS or stop ids below `min_tokens`) leave a row no allowed
  token, the grammar wins: the row is sampled from its raw logits under the grammar alone.
- Logprobs stay those of the raw model distribution (`gpu.sampling`), as vLLM reports them.
- Beam search is not combined with a grammar (refused in `gpu.sampling`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import torch

log = logging.getLogger(__name__)

GuidedKind = Literal["json", "json_object", "regex", "choice", "grammar"]
GUIDED_KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 65_536  # a schema, regex or grammar; longer is refused (400)
MAX_CHOICES = 1024
MAX_WHITESPACE_PATTERN_CHARS = 256
# whitespace allowed between JSON tokens: enough for a newline and the indentation of a
# pretty-printed document, not for a small model's run of blank lines (llguidance's own
# default is unbounded)
DEFAULT_JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,24}"
DEFAULT_CACHE_SIZE = 128  # compiled grammars kept (LRU)
# JSON schema options by default: `oneOf` read as `anyOf` (pydantic's discriminated unions
# write oneOf, which llguidance cannot enforce exactly; their branches exclude each other)
JSON_DEFAULTS: dict[str, Any] = {"whitespace_pattern": DEFAULT_JSON_WHITESPACE, "coerce_one_of": True}
_POSITION = re.compile(r"^at \d+\(\d+\): ")


_OPENING_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties",
               "propertyNames", "unevaluatedItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")


def closed_objects(schema: Any) -> Any:
    """`schema` with every object that declares its `properties` closed to others
    (`additionalProperties: false`), unless it says otherwise itself (additionalProperties,
    patternProperties, unevaluatedProperties) or combines with others (`allOf`, whose
    branches would each forbid the others' properties). An object without `properties`
    (a free-form map) stays open. By JSON Schema's letter an object that does not say is
    open, but a tool's parameters or a `response_format` name the keys wanted: a small
    model left free writes keys it invents until max_tokens (xgrammar, vLLM's default
    backend, closes them the same way by default). Pure: returns a new schema."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed_objects(s) for name, s in value.items()}
        elif key in _SCHEMA_ONE or (key in _SCHEMA_LISTS and isinstance(value, list)):
            out[key] = closed_objects(value)
        else:  # (allOf's branches are left as they are)
            out[key] = value
    kind = out.get("type", "object")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind)
    if is_object and isinstance(out.get("properties"), dict) and "allOf" not in out \
            and not any(k in out for k in _OPENING_KEYS):
        out["additionalProperties"] = False
    return out


class GuidedDecoding(msgspec.Struct, frozen=True):
    """What a request's text must match: `kind` and its `spec` (see the module docstring).

    Frozen and hashable: it is part of `SamplingParams` (and so of the response cache's
    key) and the key of the compiled-grammar LRU."""

    kind: GuidedKind
    spec: str = ""
    # JSON kinds: the whitespace allowed between tokens, a regex; "" none; None the default
    whitespace: str | None = None
    # what the spec is called in error messages, when the request did not write it itself
    # (tool calling's grammar: "schema of the tools"); None: the kind's name
    label: str | None = None
    # stop strings and stop tokens may end the text anywhere (tool calling's "auto": its
    # free text may end anywhere, and a call a stop cuts is dropped); else a stop is refused,
    # as it would break the constraint
    stoppable: bool = False


class GuidedDecodingError(ValueError):
    """The spec does not compile (a bad schema, regex or grammar), or it matches no text at
    all. The message says why, without naming the request field (the caller knows it)."""


def check_shape(guided: GuidedDecoding) -> str | None:
    """What is wrong with `guided` before compiling it (None: nothing); pure, no tokenizer."""
    if guided.kind not in GUIDED_KINDS:
        return f"kind must be one of {', '.join(GUIDED_KINDS)}, got {guided.kind!r}"
    if not isinstance(guided.spec, str):
        return "spec must be a string"
    if len(guided.spec) > MAX_SPEC_CHARS:
        return f"the {guided.label or _NAMES.get(guided.kind, 'spec')} is longer than {MAX_SPEC_CHARS} characters"
    if guided.whitespace is not None:
        if guided.kind not in ("json", "json_object"):
            return "a whitespace pattern applies to JSON constraints only"
        if not isinstance(guided.whitespace, str) or len(guided.whitespace) > MAX_WHITESPACE_PATTERN_CHARS:
            return f"the whitespace pattern must be a string of at most {MAX_WHITESPACE_PATTERN_CHARS} characters"
    if guided.kind == "json_object":
        return None if not guided.spec else "json_object takes no spec"
    if not guided.spec.strip():
        return f"the {guided.kind} spec is empty"
    if guided.kind == "choice":
        try:
            choices = json.loads(guided.spec)
        except (ValueError, RecursionError):
            return "choice spec must be a JSON list of strings"
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            return "choice must be a non-empty list of strings"
        if len(choices) > MAX_CHOICES:
            return f"at most {MAX_CHOICES} choices, got {len(choices)}"
        if any(not c for c in choices):
            return "choices must not be empty strings"
    if guided.kind == "json":
        try:
            schema = json.loads(guided.spec)
        except ValueError as e:
            return f"the JSON schema is not valid JSON: {e}"
        except RecursionError:
            return "the JSON schema is nested too deeply"
        if not isinstance(schema, dict | bool):
            return "a JSON schema must be an object (or true)"
    return None


def to_grammar(guided: GuidedDecoding) -> str:
    """llguidance's grammar text for `guided` (`GuidedDecodingError` for a spec that cannot be
    turned into one; whether the grammar itself is sound is the compiler's to say)."""
    import llguidance

    problem = check_shape(guided)
    if problem is not None:
        raise GuidedDecodingError(problem)
    try:
        if guided.kind in ("json", "json_object"):
            schema = guided.spec if guided.kind == "json" else '{"type": "object"}'
            if schema.strip() in ("true", "false"):  # boolean schemas: any JSON value, or none
                if schema.strip() == "false":
                    raise GuidedDecodingError("the JSON schema false matches no value")
                schema = "{}"
            if guided.whitespace is None:
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
            options = {"whitespace_pattern": guided.whitespace} if guided.whitespace else {"whitespace_flexible": False}
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"coerce_one_of": True}, overrides=options)
        if guided.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(guided.spec)
        if guided.kind == "choice":
            return llguidance.grammar_from("choice", guided.spec)
        return llguidance.grammar_from("grammar", guided.spec)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise GuidedDecodingError(first_line(str(e))) from e


_NAMES = {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex", "choice": "choice",
          "grammar": "grammar"}


def first_line(message: str, limit: int = 600) -> str:
    """llguidance's multi-line error text as one line of at most `limit` characters (without
    the parser state it dumps after the message)."""
    message = message.split("<state>", 1)[0]
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GrammarCompiler:
    """Compiles `GuidedDecoding` specs against one tokenizer and hands out matchers.

    Thread-safe (admission compiles from a worker thread, the engine copies on its compute
    thread). The llguidance tokenizer (~0.4 s to build for a 49k vocabulary) is built on
    first use, so a server that never sees a constrained request never pays for it.
    `vocab_size` is the width of the model's logits (it may exceed the tokenizer's)."""

    def __init__(self, tokenizer: Any, vocab_size: int, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._specials: tuple[str, ...] | None = None  # the texts of the tokenizer's special tokens
        self._protos: OrderedDict[GuidedDecoding, Any] = OrderedDict()
        self.compiled = 0  # grammars compiled (cache misses); read by tests

    def _tok(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance

            self._ll_tokenizer = llguidance.LLTokenizer(
                self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                eos_token=list(self._tokenizer.eos_token_ids))
        return self._ll_tokenizer

    def _special_texts(self) -> tuple[str, ...]:
        if self._specials is None:
            added = self._tokenizer.backend.get_added_tokens_decoder()
            self._specials = tuple(sorted({t.content for t in added.values() if t.special and t.content}))
        return self._specials

    def _check_choices(self, guided: GuidedDecoding) -> None:
        """`GuidedDecodingError` for a choice that spells a special token (`<|im_end|>`):
        llguidance matches it neither as the token nor as plain text (the first step that
        must write it fails the request), so it is refused before the request queues."""
        specials = self._special_texts()
        for i, choice in enumerate(json.loads(guided.spec)):
            found = next((t for t in specials if t in choice), None)
            if found is not None:
                raise GuidedDecodingError(f"choice {i} spells the special token {found!r}, which a "
                                          "constrained output cannot contain")

    def is_compiled(self, guided: GuidedDecoding) -> bool:
        """True when `guided` is in the cache (`check` and `matcher` will not compile)."""
        with self._lock:
            return guided in self._protos

    def check(self, guided: GuidedDecoding) -> None:
        """Compile `guided` (or find it compiled); `GuidedDecodingError` says why it cannot be."""
        self.prototype(guided)

    def matcher(self, guided: GuidedDecoding) -> Any:
        """A fresh `llguidance.LLMatcher` for one sequence, at the start of the text."""
        return self.prototype(guided).deep_copy()

    def prototype(self, guided: GuidedDecoding) -> Any:
        """The compiled matcher of `guided`, at the start of the text: never advance it, hand
        each sequence its `deep_copy()`. Compiles on a cache miss (`GuidedDecodingError`)."""
        import llguidance

        with self._lock:
            proto = self._protos.get(guided)
            if proto is not None:
                self._protos.move_to_end(guided)
                return proto
            if self._ll_tokenizer is None:
                self._tok()
        if guided.kind == "choice":
            self._check_choices(guided)
        # compiled outside the lock: a large schema compiling for admission (seconds, in a
        # worker thread) must not hold up the engine's copies of cached ones
        grammar = to_grammar(guided)
        proto = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        name = guided.label or _NAMES[guided.kind]
        if proto.is_error():
            error = proto.get_error()
            if guided.label is not None:  # the grammar is ours: the cause alone, not where in our text
                error = _POSITION.sub("", error.strip().splitlines()[0])
            raise GuidedDecodingError(f"the {name} does not compile: {first_line(error)}")
        # a grammar no text satisfies (`a: a "x"`) starts with nothing allowed and not accepting
        first = fill_bitmask([proto], self.vocab_size)
        if proto.is_error() or (not bool(first.any()) and not proto.is_accepting()):
            raise GuidedDecodingError(f"the {name} matches no text")
        with self._lock:
            self.compiled += 1
            self._protos[guided] = proto
            while len(self._protos) > self._cache_size:
                self._protos.popitem(last=False)
        return proto


_executor: Any = None
_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def fill_bitmask(matchers: Sequence[Any], vocab_size: int) -> torch.Tensor:
    """The allowed-token bitmask (R, ceil(vocab_size / 32)) int32 of each matcher's next
    token, bit j of word w allowing token 32w + j. Several are computed in llguidance's own
    threads, without the GIL."""
    global _executor
    import llguidance

    words = (vocab_size + 31) // 32
    mask = torch.zeros((len(matchers), words), dtype=torch.int32)
    if len(matchers) == 1:
        matchers[0].unsafe_compute_mask_ptr(mask.data_ptr(), words * 4)
        return mask
    if _executor is None:
        _executor = llguidance.LLExecutor(num_threads=2)
    _executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], mask.data_ptr(), words * 4,
                                      len(matchers))
    return mask


def allowed_tokens(bitmask: torch.Tensor, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (R, vocab): the bitmask (R, W) int32 unpacked, token t allowed where bit t is set
    (ids past the bitmask's 32·W are not allowed)."""
    device = torch.device(device)
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS.setdefault(device, torch.arange(32, dtype=torch.int32, device=device))
    bits = (bitmask.to(device).unsqueeze(-1) >> shifts) & 1  # (R, W, 32)
    flat = bits.flatten(1).bool()  # (R, 32·W)
    if flat.shape[1] >= vocab:
        return flat[:, :vocab]
    pad = torch.zeros((flat.shape[0], vocab - flat.shape[1]), dtype=torch.bool, device=device)
    return torch.cat([flat, pad], dim=1)


def apply_bitmask(logits: torch.Tensor, allowed: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Set the logits (R, V) of tokens not `allowed` (R, V) to -inf, in place, and return them.

    A row whose every allowed token was already -inf (the request's own bans took them all)
    is taken from `fallback` (R, V) (the raw logits) under the mask instead: the grammar wins.
    A row the mask allows nothing in (a matcher in its error state) is left as it was."""
    none_allowed = ~allowed.any(dim=1)
    if bool(none_allowed.any()):
        allowed = allowed.clone()
        allowed[none_allowed] = True
    logits.masked_fill_(~allowed, float("-inf"))
    if fallback is not None:
        dead = torch.isneginf(logits).all(dim=1)
        if bool(dead.any()):
            logits[dead] = fallback[dead].masked_fill(~allowed[dead], float("-inf"))
    return logits
