"""Structured outputs (gpu/structured.py): the bitmask contract against llguidance's own
matcher, the compiler's cache and errors, and the engine's constrained generation —
every kind, sampled and greedy, n > 1, under preemption — checked by what the text is
(a schema validator, a regex, the list of choices), never by fixed strings."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import pytest
import torch

from gpu.config import CacheConfig, EngineConfig, SchedulerConfig
from gpu.engine import Engine, generate
from gpu.sampling import SamplingParams, SamplingParamsError
from gpu.structured import (
    GrammarCompiler,
    GuidedDecoding,
    GuidedDecodingError,
    allowed_tokens,
    apply_bitmask,
    check_shape,
    fill_bitmask,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
PHONE = r"[0-9]{3}-[0-9]{4}"


# ------------------------------------------------------------------ pure pieces
def test_allowed_tokens_unpacks_bit_j_of_word_w_as_token_32w_plus_j() -> None:
    mask = torch.zeros((2, 3), dtype=torch.int32)
    mask[0, 0] = 1 << 5  # token 5
    mask[0, 2] = -(2**31)  # bit 31 of word 2: token 95 (the sign bit)
    mask[1, 1] = 0b11  # tokens 32, 33
    allowed = allowed_tokens(mask, 90)  # a vocabulary narrower than the mask: token 95 falls off
    assert allowed.shape == (2, 90)
    assert allowed[0].nonzero().flatten().tolist() == [5]
    assert allowed[1].nonzero().flatten().tolist() == [32, 33]
    wide = allowed_tokens(mask, 100)  # wider: ids past the mask are never allowed
    assert wide[0].nonzero().flatten().tolist() == [5, 95]


def test_apply_bitmask_masks_and_lets_the_grammar_win_over_bans() -> None:
    raw = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    x = raw.clone()
    x[1, 2] = float("-inf")  # the request banned token 2 (say, EOS below min_tokens)
    allowed = torch.tensor([[True, False, True, False], [False, False, True, False], [False] * 4])
    out = apply_bitmask(x, allowed, raw)
    assert out[0].tolist() == [1.0, float("-inf"), 3.0, float("-inf")]
    assert out[1].tolist() == [float("-inf"), float("-inf"), 3.0, float("-inf")]  # ban overruled
    assert out[2].tolist() == [0.0] * 4  # nothing allowed (a failed matcher): left alone


@pytest.mark.parametrize(("guided", "problem"), [
    (GuidedDecoding("json", ""), "empty"),
    (GuidedDecoding("json", "{"), "not valid JSON"),
    (GuidedDecoding("json", "[1]"), "must be an object"),
    (GuidedDecoding("json_object", "{}"), "takes no spec"),
    (GuidedDecoding("choice", "[]"), "non-empty list"),
    (GuidedDecoding("choice", '["a", 1]'), "non-empty list"),
    (GuidedDecoding("choice", '["a", ""]'), "empty strings"),
    (GuidedDecoding("regex", "x" * 70_000), "longer than"),
    (GuidedDecoding("json", "[" * 20_000 + "]" * 20_000), "nested too deeply"),  # not a RecursionError
    (GuidedDecoding("regex", "a+", whitespace=""), "JSON constraints only"),
])
def test_check_shape_names_the_problem(guided: GuidedDecoding, problem: str) -> None:
    assert problem in (check_shape(guided) or "")
    with pytest.raises(SamplingParamsError, match=re.escape(problem)) as info:
        SamplingParams(guided=guided)
    assert info.value.field == "guided"


def test_beam_search_refuses_a_grammar() -> None:
    with pytest.raises(SamplingParamsError, match="beam search"):
        SamplingParams(use_beam_search=True, n=2, temperature=0, guided=GuidedDecoding("regex", "a+"))


def test_stops_are_refused_beside_a_constraint() -> None:
    """A stop string or id would end the text where the constraint does not: never a "stop"
    whose text breaks it."""
    for field, value in (("stop", ("-",)), ("stop_token_ids", (5,))):
        with pytest.raises(SamplingParamsError, match="constraint decides") as info:
            SamplingParams(guided=GuidedDecoding("regex", "[0-9]+-[0-9]+"), **{field: value})
        assert info.value.field == field


def test_params_with_a_grammar_round_trip_through_msgspec() -> None:
    import msgspec

    p = SamplingParams(temperature=0, guided=GuidedDecoding("choice", '["a", "b"]'))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, tokenizer.vocab_size, cache_size=2)


def test_compiler_masks_agree_with_text_the_grammar_accepts(compiler: GrammarCompiler, tokenizer) -> None:
    """Walk a valid text token by token: each next token is allowed by the mask before it,
    one batched fill gives the same masks as one at a time, and the matcher ends stopped."""
    guided = GuidedDecoding("json", json.dumps(PERSON))
    text = '{"name": "Ann", "age": 31, "city": "Rome"}'
    ids = tokenizer.encode(text)
    m, twin = compiler.matcher(guided), compiler.matcher(guided)
    twin.consume_tokens(ids[:3])
    for i, t in enumerate(ids):
        both = fill_bitmask([m, twin], tokenizer.vocab_size)
        alone = fill_bitmask([m], tokenizer.vocab_size)
        assert torch.equal(both[0], alone[0])
        allowed = allowed_tokens(alone, tokenizer.vocab_size)[0]
        assert allowed[t], (i, tokenizer.decode([t]))
        assert allowed.sum() < tokenizer.vocab_size
        assert m.consume_token(t)
    assert m.is_stopped() and not m.is_error()


def test_one_of_is_read_as_any_of(compiler: GrammarCompiler, tokenizer) -> None:
    """pydantic's discriminated unions write oneOf (branches told apart by a const)."""
    cat = {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
           "required": ["kind", "lives"], "additionalProperties": False}
    dog = {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
           "required": ["kind", "good"], "additionalProperties": False}
    guided = GuidedDecoding("json", json.dumps({"type": "object", "properties": {"pet": {"oneOf": [cat, dog]}},
                                                "required": ["pet"], "additionalProperties": False}))
    for text, ok in (('{"pet": {"kind": "dog", "good": true}}', True), ('{"pet": {"kind": "dog", "lives": 9}}', False)):
        m = compiler.matcher(guided)
        assert (all(m.consume_token(t) for t in tokenizer.encode(text)) and m.is_stopped()) is ok


def test_compiler_caches_and_evicts_and_explains(compiler: GrammarCompiler) -> None:
    a, b, c = (GuidedDecoding("regex", r) for r in ("a+", "b+", "c+"))
    before = compiler.compiled
    compiler.check(a)
    compiler.matcher(a)  # a hit: no compile
    assert compiler.compiled == before + 1 and compiler.is_compiled(a)
    compiler.check(b)
    compiler.check(c)  # cache_size 2: `a` is evicted
    assert not compiler.is_compiled(a) and compiler.is_compiled(c)
    with pytest.raises(GuidedDecodingError, match="unclosed group"):
        compiler.check(GuidedDecoding("regex", "(abc"))
    with pytest.raises(GuidedDecodingError, match="does not compile"):
        compiler.check(GuidedDecoding("grammar", "start: undefined_rule"))
    with pytest.raises(GuidedDecodingError):
        compiler.check(GuidedDecoding("json", '{"type": "no-such-type"}'))
    for nothing in ('start: a\na: a "x"', 'root ::= x\nx ::= x "y"'):  # Lark and GBNF: no finite sentence
        with pytest.raises(GuidedDecodingError, match="matches no text"):
            compiler.check(GuidedDecoding("grammar", nothing))
    compiler.check(GuidedDecoding("grammar", "start: "))  # the empty text: a match


def test_a_choice_spelling_a_special_token_is_refused(compiler: GrammarCompiler) -> None:
    """llguidance matches such a choice neither as the token nor as text (the step forced to
    write it fails), so it is refused up front; a choice near one (`<|im_end`) is text."""
    for choices in (["<|im_end|>"], ["yes", "a<|endoftext|>b"], ["<repo_name>"]):
        with pytest.raises(GuidedDecodingError, match="spells the special token"):
            compiler.check(GuidedDecoding("choice", json.dumps(choices)))
    compiler.check(GuidedDecoding("choice", json.dumps(["<|im_end", "im_end|>"])))


def test_boolean_json_schemas(compiler: GrammarCompiler, tokenizer) -> None:
    """`true` is any JSON value (llguidance refuses it as it stands), `false` none: a 400."""
    m = compiler.matcher(GuidedDecoding("json", "true"))
    assert m.consume_tokens(tokenizer.encode('[1, "a"]')) and m.is_accepting()
    with pytest.raises(GuidedDecodingError, match="matches no value"):
        compiler.check(GuidedDecoding("json", "false"))


def test_json_whitespace_is_bounded_by_default_and_can_be_removed(compiler: GrammarCompiler, tokenizer) -> None:
    def accepts(guided: GuidedDecoding, text: str) -> bool:
        m = compiler.matcher(guided)
        return m.consume_tokens(tokenizer.encode(text)) and m.is_accepting()

    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    pretty, compact, padded = '{\n    "a": 1\n}', '{"a":1}', "{" + "\n" * 40 + '"a": 1}'
    default = GuidedDecoding("json", schema)
    assert accepts(default, pretty) and accepts(default, compact) and not accepts(default, padded)
    tight = GuidedDecoding("json", schema, whitespace="")  # vLLM's disable_any_whitespace
    assert accepts(tight, compact) and not accepts(tight, pretty)
    spaces = GuidedDecoding("json", schema, whitespace="[ ]{0,2}")
    assert accepts(spaces, '{ "a": 1 }') and not accepts(spaces, pretty)


# ------------------------------------------------------------------ the engine


def make_engine(ckpt, tokenizer, cache_mb: int = 64, **sched) -> Engine:
    cfg = EngineConfig(dtype="float32", cache=CacheConfig(cache_bytes=cache_mb * 1024**2),
                       scheduler=replace(SchedulerConfig(), **sched))
    return Engine(cfg, checkpoint=ckpt, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def engine(ckpt, tokenizer) -> Engine:
    return make_engine(ckpt, tokenizer)


def chat(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
def test_every_kind_constrains_greedy_and_sampled_text(engine: Engine, tokenizer) -> None:
    prompt = chat(tokenizer, "Describe a person as JSON.")
    cases = [
        (GuidedDecoding("json", json.dumps(PERSON)), lambda t: jsonschema.validate(json.loads(t), PERSON)),
        (GuidedDecoding("json_object"), lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
        (GuidedDecoding("regex", PHONE), lambda t: re.fullmatch(PHONE, t) or pytest.fail(t)),
        (GuidedDecoding("choice", json.dumps(["yes", "no", "not sure"])),
         lambda t: t in ("yes", "no", "not sure") or pytest.fail(t)),
        (GuidedDecoding("grammar", 'start: "The answer is " NUM "."\nNUM: /[1-9][0-9]{0,2}/'),
         lambda t: re.fullmatch(r"The answer is [1-9][0-9]{0,2}\.", t) or pytest.fail(t)),
        (GuidedDecoding("grammar", 'root ::= "A" [0-9] [0-9] | "B"'),  # GBNF (llama.cpp)
         lambda t: re.fullmatch(r"A[0-9]{2}|B", t) or pytest.fail(t)),
    ]
    for guided, check in cases:
        greedy = SamplingParams(temperature=0, max_tokens=120, guided=guided)
        hot = SamplingParams(temperature=1.3, top_p=0.95, n=3, seed=7, max_tokens=120, guided=guided)
        outs = generate(engine, [prompt, prompt], [greedy, hot])
        for c in outs[0] + outs[1]:
            if guided.kind == "json_object" and c.finish_reason == "length":
                continue  # an unbounded object may outrun max_tokens (then it is a prefix)
            assert c.finish_reason == "stop", (guided, c.text)
            check(c.text)
            assert c.token_ids[-1] not in tokenizer.eos_token_ids  # ended by the grammar, not an EOS step
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.num_blocks


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
def test_constraint_survives_preemption_and_mixes_with_free_requests(ckpt, tokenizer) -> None:
    """A KV cache too small for everything at once: constrained sequences are preempted and
    recomputed, their matchers keep their place, and unconstrained neighbours are untouched."""
    eng = make_engine(ckpt, tokenizer, cache_mb=20, max_num_seqs=8)
    free = generate(make_engine(ckpt, tokenizer), ["Once upon a time"], SamplingParams(temperature=0, max_tokens=60))
    guided = GuidedDecoding("json", json.dumps({"type": "array", "items": PERSON, "minItems": 2, "maxItems": 2}))
    prompts = [chat(tokenizer, f"List two people from city number {i} as JSON.") for i in range(6)]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=160, guided=guided) for i in range(6)]
    outs = generate(eng, prompts + ["Once upon a time"], params + [SamplingParams(temperature=0, max_tokens=60)])
    assert eng.counters["preemptions"] > 0
    for [c] in outs[:-1]:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), {"type": "array", "items": PERSON, "minItems": 2, "maxItems": 2})
    assert outs[-1][0].text == free[0][0].text
    assert eng.block_manager.num_free_blocks == eng.num_blocks


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
def test_logprobs_stay_the_models_and_a_bad_spec_is_refused(engine: Engine, tokenizer) -> None:
    prompt = chat(tokenizer, "Is the sky blue?")
    [[c]] = generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=2,
                                                      guided=GuidedDecoding("choice", '["Absolutely", "No"]')))
    assert c.text in ("Absolutely", "No")
    assert all(lp <= 0 for lp in c.logprobs)
    with pytest.raises(SamplingParamsError, match="unclosed") as info:
        engine.add_request("bad", prompt, SamplingParams(guided=GuidedDecoding("regex", "(a")))
    assert info.value.field == "guided"
    assert not engine.has_unfinished()


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
def test_a_grammar_that_breaks_mid_way_fails_its_request_only(engine: Engine, tokenizer) -> None:
    """A regex that compiles, then passes llguidance's lexer limit on the first token: the
    choice ends with `error` and no text, never "stop" with unconstrained text; the request
    beside it, asking logprobs, finishes; the other gets no logprobs it did not ask for."""
    huge = GuidedDecoding("regex", "(a{1000}){1000}")
    engine.add_request("huge", "Some JSON:", SamplingParams(temperature=0, max_tokens=5, guided=huge))
    engine.add_request("plain", "Some JSON:", SamplingParams(temperature=0, max_tokens=5, logprobs=1))
    engine.add_request("quiet", "Some text:", SamplingParams(temperature=0, max_tokens=5))
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    [failed] = [d for d in deltas if d.request_id == "huge"]
    assert failed.finish_reason == "error" and failed.text == "" and failed.request_finished
    assert "too many expressions" in failed.error and "<state>" not in failed.error
    assert [d.finish_reason for d in deltas if d.request_id == "plain"][-1] == "length"
    assert all(d.logprobs is not None for d in deltas if d.request_id == "plain")
    assert all(d.logprobs is None and d.top_logprobs is None for d in deltas if d.request_id == "quiet")
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_closed_objects_closes_what_names_its_properties_and_nothing_else() -> None:
    from gpu.structured import closed_objects

    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"x": {"type": "integer"}}},
                       "free": {"type": "object"},  # a map: stays open
                       "open": {"type": "object", "properties": {}, "additionalProperties": True},
                       "list": {"type": "array", "items": {"properties": {"y": {}}}},
                       "either": {"anyOf": [{"type": "object", "properties": {"z": {}}}, {"type": "null"}]},
                       "both": {"allOf": [{"properties": {"p": {}}}, {"properties": {"q": {}}}]}},
        "$defs": {"D": {"type": "object", "properties": {"d": {}}}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    assert props["a"]["additionalProperties"] is False and "additionalProperties" not in props["free"]
    assert props["open"]["additionalProperties"] is True
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["either"]["anyOf"][0]["additionalProperties"] is False
    assert props["both"] == schema["properties"]["both"]  # allOf's branches combine: left open
    assert closed["$defs"]["D"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a new schema: the caller's is untouched
