"""Sentence embeddings (all-MiniLM-L6-v2, bundled): what the Magnus predictor reads, and
what /v1/embeddings serves through the runtime (`EmbeddingService`: quota, batches on the
compute thread between engine steps, accounting), with the real model and a real Redis."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import trio

from actors.embeddings import (
    EmbeddingConfig,
    EmbeddingInputError,
    Pooling,
    SentenceEmbedder,
    distinct_rows,
    plan_batches,
)
from actors.messages import Accepted, ChatMessage, EmbedCall, Embedded, Finished, Rejected
from actors.runtime import Runtime, RuntimeConfig
from cache.quotas import Quota, QuotaManager
from gpu.engine import resolve_dtype
from tests.actors.test_runtime import (
    MODEL,
    call,
    collect,
    make_engine,
    tenant,
    usage_rows,
    wait_until,
)

slow = pytest.mark.slow

TEXTS = [
    "You are a translator.\nTranslate into French: the cat sat on the mat.",
    "You are a translator.\nTranslate into Spanish: my neighbour sold a bicycle.",
    "You are a creative writer.\nWrite a story about a dragon in 8 sentences.",
    "You fix grammar.\nCorrect this: she go to school every days and dont like it.",
    "You write code.\nTranslate this Python to JavaScript: def add(a, b): return a + b",
]


@pytest.fixture(scope="module")
def float32() -> SentenceEmbedder:
    return SentenceEmbedder(dtype="float32")


@slow
def test_minilm_embeddings_group_instructions_by_application(float32):
    v = float32.embed(TEXTS[:3])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]


@slow
def test_bfloat16_encoder_gives_float32_vectors_of_the_same_direction(float32):
    bf16 = SentenceEmbedder(dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    a, b = float32.embed(TEXTS), bf16.embed(TEXTS)
    assert b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = (a * b).sum(1)
    assert cos.min() > 0.999, cos  # measured ≥ 0.9999 over the workload's 716 instructions


@slow
def test_each_text_takes_its_own_cut_and_errors_name_its_place(float32):
    long = "word " * 300
    ids = float32.tokenize_each(["a b", long, long], [None, 16, 5])
    assert [len(one) for one in ids] == [4, 16, 5]
    assert ids[1][-1] == ids[2][-1] == ids[0][-1]  # the closing special token kept
    with pytest.raises(EmbeddingInputError) as info:
        float32.tokenize_each(["a", "b", long], [8, 8, None])
    assert info.value.index == 2 and info.value.detail.startswith(" has 302 tokens")


@slow
def test_auto_follows_the_engines_cpu_rule():
    emb = SentenceEmbedder()  # dtype="auto", what the server loads
    assert emb.dtype == resolve_dtype("auto", "cpu")
    assert next(emb.model.parameters()).dtype == emb.dtype


def test_an_unknown_dtype_is_refused_before_loading():
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        SentenceEmbedder(dtype="float16")


# ---------------------------------------------------------------- pure pieces


def test_batches_go_shortest_first_within_the_token_budget():
    lengths = [10, 200, 3, 50, 50, 7]
    batches = plan_batches(lengths, token_budget=120, max_inputs=4)
    assert sorted(i for b in batches for i in b) == list(range(6))  # every input once
    assert batches == [[2, 5, 0], [3, 4], [1]]  # padded 30, 100, and 200 alone (over the budget)
    for b in batches[:-1]:
        assert max(lengths[i] for i in b) * len(b) <= 120
    assert plan_batches([5] * 10, token_budget=10**6, max_inputs=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan_batches([], token_budget=10) == []


def test_the_same_tokens_are_one_row_to_embed():
    rows, place = distinct_rows([[1, 5, 2], [1, 6, 2], [1, 5, 2], [1, 2], [1, 6, 2]])
    assert rows == [[1, 5, 2], [1, 6, 2], [1, 2]] and place == [0, 1, 0, 2, 1]
    assert distinct_rows([]) == ([], [])


def test_pooling_is_read_from_a_sentence_transformers_folder(tmp_path):
    assert Pooling.of_folder(str(tmp_path)) == Pooling("mean", True)  # a folder that says nothing
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "pool", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert Pooling.of_folder(str(tmp_path)) == Pooling("cls", False)  # no Normalize module
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    with pytest.raises(ValueError, match="not supported"):
        Pooling.of_folder(str(tmp_path))


def test_embedding_config_names():
    bundled = EmbeddingConfig()
    assert bundled.served_name == "all-MiniLM-L6-v2" and bundled.path is None
    assert bundled.aliases == {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}  # not "bundled"
    local = EmbeddingConfig(model="/models/bge-small-en")
    assert local.served_name == "bge-small-en" and local.aliases == {"bge-small-en", "/models/bge-small-en"}
    with pytest.raises(ValueError):
        EmbeddingConfig(batch_tokens=0)


# ---------------------------------------------------------------- the encoder, API path


@slow
def test_token_ids_give_the_vectors_of_their_text(float32):
    ids = float32.tokenize(TEXTS)
    assert all(one[0] == float32.tokenizer.cls_token_id and one[-1] == float32.tokenizer.sep_token_id for one in ids)
    by_ids = float32.encode_ids(ids)
    assert np.allclose(by_ids, float32.embed(TEXTS), atol=1e-6)
    # padding in a batch does not change a vector (the mask keeps it out of attention and pooling)
    alone = float32.encode_ids([ids[0]])
    assert np.allclose(alone[0], by_ids[0], atol=1e-5)


@slow
def test_a_text_too_long_is_refused_unless_truncated(float32):
    long = "word " * 400
    with pytest.raises(EmbeddingInputError, match="has 402 tokens; 256 is the most") as e:
        float32.tokenize(["short", long])
    assert e.value.index == 1
    [cut] = float32.tokenize([long], truncate=10)
    assert len(cut) == 10 and cut[-1] == float32.tokenizer.sep_token_id  # the closing token kept
    assert len(float32.tokenize([long], truncate=256)[0]) == 256


@slow
def test_token_id_inputs_are_checked(float32):
    with pytest.raises(EmbeddingInputError, match=r"input 1: token id 30522 is not in \[0, 30522\)"):
        float32.check_ids([[101, 7592, 102], [30522]])
    with pytest.raises(EmbeddingInputError, match="input 0 is empty"):
        float32.check_ids([[]])
    with pytest.raises(EmbeddingInputError, match="input 1 holds no token between its special tokens"):
        float32.check_ids([[101, 7592, 102], [101, 102]])  # the ids of "", which /v1/embeddings refuses
    long = [101, *[100] * 298, 102]
    with pytest.raises(EmbeddingInputError, match="has 300 tokens"):
        float32.check_ids([long])
    assert float32.check_ids([long], truncate=5) == [[101, 100, 100, 100, 102]]  # the closing [SEP] kept
    # ids as another tokenizer writes them (langchain sends OpenAI's tiktoken ids): refused,
    # not embedded as unrelated words; the message says what to do
    assert (float32.prefix, float32.suffix) == ([101], [102])
    with pytest.raises(EmbeddingInputError, match=r"must start with \[101\] and end with \[102\].*"
                                                  r"check_embedding_ctx_length=False"):
        float32.check_ids([[101, 7592, 102], [791, 8415, 7731, 389, 279, 5634, 13]])


@slow
def test_a_cut_must_leave_room_for_the_special_tokens_and_some_text(float32):
    long = "word " * 400
    for bad in (1, 2, 257):
        with pytest.raises(ValueError, match=r"truncate_prompt_tokens must be -1 or in \[3, 256\]"):
            float32.tokenize([long], truncate=bad)
        with pytest.raises(ValueError):
            float32.check_ids([[101, 7592, 102]], truncate=bad)
    assert float32.tokenize([long], truncate=3) == [[101, 2773, 102]]


# ---------------------------------------------------------------- through the runtime


@pytest.fixture
async def services(store):
    return {"quotas": QuotaManager(store), "store": store}


async def embedding_runtime(nursery, ckpt, tokenizer, services, **emb) -> Runtime:
    rt = Runtime(RuntimeConfig(embeddings=EmbeddingConfig(**emb)), make_engine(ckpt, tokenizer), **services)
    await nursery.start(rt.run)
    return rt


def embed_call(t, texts=None, token_ids=None, model="all-MiniLM-L6-v2", **kw) -> EmbedCall:
    import uuid

    return EmbedCall("embd-" + uuid.uuid4().hex, t, model, texts=texts, token_ids=token_ids, **kw)


@slow
async def test_embeddings_through_the_runtime_are_charged_and_counted(nursery, ckpt, tokenizer, services):
    rt = await embedding_runtime(nursery, ckpt, tokenizer, services)
    assert rt.served_models() == [MODEL, "all-MiniLM-L6-v2"] and rt.serves("sentence-transformers/all-MiniLM-L6-v2")
    t = tenant(Quota(requests_per_minute=100, max_concurrent=1))
    out = await rt.embed(embed_call(t, TEXTS))
    assert isinstance(out, Embedded) and out.vectors.shape == (5, 384)
    ids = rt.embeddings.embedder.tokenize(TEXTS)
    assert out.prompt_tokens == sum(map(len, ids))
    assert np.allclose(out.vectors, rt.embeddings.embedder.encode_ids(ids), atol=1e-5)
    assert out.rate_limits is not None and out.rate_limits.remaining_requests == 99
    # settled before the answer: the one concurrency slot is free for the next request at once
    assert await services["quotas"].running("acme") == 0
    again = await rt.embed(embed_call(t, token_ids=ids[:2]))
    assert isinstance(again, Embedded) and np.allclose(again.vectors, out.vectors[:2], atol=1e-5)
    rows = await usage_rows(services["quotas"], "acme")
    assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("all-MiniLM-L6-v2", 2, out.prompt_tokens + len(ids[0]) + len(ids[1]), 0)]
    assert rt.metrics.embedding_inputs.labels("acme")._value.get() == 7
    assert rt.metrics.requests.labels("acme", "ok")._value.get() == 2
    assert rt.metrics.embedding_compute._value.get() > 0
    # an input repeated is embedded and charged once, and answered in its place
    twice = await rt.embed(embed_call(t, [TEXTS[1], TEXTS[0], TEXTS[1]]))
    assert isinstance(twice, Embedded) and twice.vectors.shape == (3, 384)
    assert twice.prompt_tokens == len(ids[0]) + len(ids[1])
    assert np.allclose(twice.vectors, out.vectors[[1, 0, 1]], atol=1e-5)


@slow
async def test_embedding_refusals(nursery, ckpt, tokenizer, services):
    rt = await embedding_runtime(nursery, ckpt, tokenizer, services)
    t = tenant(Quota(tokens_per_minute=50))
    too_many = await rt.embed(embed_call(t, [f"sentence {i} of some length, to count tokens" for i in range(5)]))
    assert isinstance(too_many, Rejected) and too_many.status == 429 and "tokens_per_minute" in too_many.message
    long = await rt.embed(embed_call(t, ["short", "word " * 300]))
    assert isinstance(long, Rejected) and (long.status, long.param) == (400, "input") and "input 1 " in long.message
    wrong = await rt.embed(embed_call(t, ["x"], model=MODEL))
    assert isinstance(wrong, Rejected) and wrong.status == 400 and "does not serve embeddings" in wrong.message
    # and the embedding model generates nothing
    gen = await rt.submit(call(t, prompt="hello", model="all-MiniLM-L6-v2", max_tokens=4))
    assert isinstance(gen, Rejected) and (gen.status, gen.param) == (400, "model")
    assert "embedding model" in gen.message
    assert await services["quotas"].running("acme") == 0
    assert not await usage_rows(services["quotas"], "acme")  # nothing ran, nothing charged
    # an input refused once tokenized counts one request a minute (as OpenAI counts it)
    once = tenant(Quota(requests_per_minute=1), id="once")
    long = await rt.embed(embed_call(once, ["word " * 300]))
    assert isinstance(long, Rejected) and long.status == 400
    after = await rt.embed(embed_call(once, ["short"]))
    assert isinstance(after, Rejected) and after.status == 429 and "requests_per_minute" in after.message


@slow
async def test_a_cancelled_embedding_is_charged_for_the_batches_it_ran(nursery, ckpt, tokenizer, services):
    rt = await embedding_runtime(nursery, ckpt, tokenizer, services, batch_tokens=64)
    t = tenant(Quota(requests_per_minute=100))
    texts = [f"sentence {i} is long enough to take some time to embed here" for i in range(400)]
    with trio.move_on_after(30) as scope:
        async with trio.open_nursery() as inner:
            inner.start_soon(rt.embed, embed_call(t, texts))
            await wait_until(lambda: rt.metrics.embedding_compute._value.get() > 0)
            inner.cancel_scope.cancel()
    assert not scope.cancelled_caught
    await wait_until(lambda: rt.accounting.settled >= 1)
    [row] = await usage_rows(services["quotas"], "acme")
    total = sum(map(len, rt.embeddings.embedder.tokenize(texts)))
    assert row.requests == 1 and 0 < row.prompt_tokens < total
    assert rt.metrics.requests.labels("acme", "cancelled")._value.get() == 1
    assert await services["quotas"].running("acme") == 0 and rt.embeddings.in_flight == 0


@slow
async def test_a_shutdown_ends_a_long_embedding_with_a_503_and_charges_what_ran(nursery, ckpt, tokenizer, services):
    """`Runtime.end_streams` at the end of the grace period: an embedding request stops
    after its current batch and answers 503 `shutting_down` (it was left running, and the
    server then cut its connection without an answer)."""
    rt = await embedding_runtime(nursery, ckpt, tokenizer, services, batch_tokens=64)
    t = tenant(Quota(requests_per_minute=100))
    texts = [f"sentence {i} is long enough to take some time to embed here" for i in range(400)]
    got: list[object] = []

    async def embed() -> None:
        got.append(await rt.embed(embed_call(t, texts)))

    nursery.start_soon(embed)
    await wait_until(lambda: rt.metrics.embedding_compute._value.get() > 0)
    assert rt.end_streams("server shutting down") == 1
    await wait_until(lambda: bool(got))
    [out] = got
    assert isinstance(out, Rejected) and (out.status, out.code, out.retry_after) == (503, "shutting_down", 1.0)
    await wait_until(lambda: rt.accounting.settled >= 1)
    [row] = await usage_rows(services["quotas"], "acme")
    assert row.requests == 1 and 0 < row.prompt_tokens < sum(map(len, rt.embeddings.embedder.tokenize(texts)))
    assert await services["quotas"].running("acme") == 0 and rt.embeddings.in_flight == 0
    assert rt.end_streams("again") == 0


@slow
async def test_generation_goes_on_between_the_batches_of_a_long_embedding(nursery, ckpt, tokenizer, services):
    rt = await embedding_runtime(nursery, ckpt, tokenizer, services, batch_tokens=256)
    t = tenant()
    texts = [f"document {i}: " + "lorem ipsum dolor sit amet " * 8 for i in range(300)]
    done: dict[str, float] = {}

    async def embed() -> None:
        out = await rt.embed(embed_call(t, texts))
        assert isinstance(out, Embedded)
        done["embed"] = trio.current_time()

    async def generate() -> None:
        acc = await rt.submit(call(t, messages=[ChatMessage("user", "Count to ten.")], max_tokens=12,
                                   ignore_eos=True))
        assert isinstance(acc, Accepted)
        _, deltas, last = await collect(acc)
        assert isinstance(last, Finished) and last.usage.completion_tokens == 12
        done["generate"] = trio.current_time()

    async with trio.open_nursery() as inner:
        inner.start_soon(embed)
        await wait_until(lambda: rt.metrics.embedding_compute._value.get() > 0)
        inner.start_soon(generate)
    # the generation, started after the embedding, did not wait for all of its batches
    assert done["generate"] < done["embed"]


@slow
async def test_many_embedding_requests_queue_one_batch_at_a_time(nursery, ckpt, tokenizer, services):
    """Between two engine steps runs one embedding batch, however many requests embed: the
    compute thread serves jobs in order, and with a batch of every request queued a step
    waited behind all of them."""
    rt = await embedding_runtime(nursery, ckpt, tokenizer, services, batch_tokens=64)
    order: list[str] = []  # what the compute thread ran, in order
    encode, step = rt.embeddings.embedder.encode_ids, rt.engine.step

    def encode_logged(rows):  # type: ignore[no-untyped-def]
        order.append("e")
        return encode(rows)

    def step_logged():  # type: ignore[no-untyped-def]
        order.append("s")
        return step()

    rt.embeddings.embedder.encode_ids = encode_logged
    rt.engine.step = step_logged
    t = tenant()
    texts = [f"sentence number {i} of a request that takes many batches" for i in range(120)]
    generated: dict[str, int] = {}

    async def generate() -> None:
        acc = await rt.submit(call(t, prompt="Once upon a time", max_tokens=16, ignore_eos=True))
        assert isinstance(acc, Accepted)
        _, _, last = await collect(acc)
        generated["tokens"] = last.usage.completion_tokens

    async with trio.open_nursery() as inner:
        for _ in range(6):
            inner.start_soon(rt.embed, embed_call(t, texts))
        await wait_until(lambda: order.count("e") >= 6)
        inner.start_soon(generate)
    assert generated["tokens"] == 16
    during = "".join(order)[order.index("s"):len(order) - order[::-1].index("s")]
    assert during.count("s") >= 16 and max(map(len, during.split("s"))) <= 2, during


@slow
async def test_embedding_requests_beyond_the_cap_are_refused_with_a_retry(nursery, ckpt, tokenizer, services):
    rt = await embedding_runtime(nursery, ckpt, tokenizer, services, max_in_flight=1, batch_tokens=64)
    t = tenant()
    texts = [f"sentence number {i} of a long request" for i in range(300)]
    async with trio.open_nursery() as inner:
        inner.start_soon(rt.embed, embed_call(t, texts))
        await wait_until(lambda: rt.embeddings.in_flight == 1)
        busy = await rt.embed(embed_call(t, ["x"]))
        assert isinstance(busy, Rejected) and busy.status == 503 and busy.retry_after == 1.0
    assert isinstance(await rt.embed(embed_call(t, ["x"])), Embedded)


@slow
async def test_an_embedding_computing_past_the_reservation_ttl_keeps_its_slot(nursery, ckpt, tokenizer, services,
                                                                              monkeypatch):
    """Embedding reservations were never extended: one computing past the minute lost its
    `max_concurrent` slot (a second request got in) and its tokens went back."""
    from cache.quotas import QuotaManager

    quotas = QuotaManager(services["store"], reservation_ttl_s=0.6)  # extended every 0.2 s
    rt = Runtime(RuntimeConfig(embeddings=EmbeddingConfig()), make_engine(ckpt, tokenizer),
                 **{**services, "quotas": quotas})
    await nursery.start(rt.run)
    slow_encode = rt.embeddings._encode

    def encode(rows):  # (a long batch: on the compute thread)
        import time

        time.sleep(1.5)
        return slow_encode(rows)

    monkeypatch.setattr(rt.embeddings, "_encode", encode)
    t = tenant(Quota(max_concurrent=1))
    got: list[object] = []

    async def embed() -> None:
        got.append(await rt.embed(embed_call(t, ["a long batch"])))

    nursery.start_soon(embed)
    await wait_until(lambda: rt.embeddings.holding != {})
    await trio.sleep(1.0)  # over the TTL: extended meanwhile
    assert await quotas.running("acme") == 1
    await wait_until(lambda: bool(got))
    assert not isinstance(got[0], Rejected) and rt.embeddings.holding == {}
    await wait_until(lambda: rt.accounting.settled >= 1)
    assert await quotas.running("acme") == 0
