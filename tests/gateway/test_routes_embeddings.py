"""POST /v1/embeddings: the request's `input` forms and the answer's encodings (pure), then
the whole server with the real models over real sockets, as the openai SDK calls it (its
default base64 encoding, decoded by the SDK), with tenants, quotas and usage through the
admin API."""

from __future__ import annotations

import base64

import httpx
import msgspec
import numpy as np
import openai
import pytest
import trio

from clients import LmgateClient
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.routes_embeddings import MAX_INPUTS, embedding_body, embedding_inputs
from tests.conftest import serve_real

MODEL = "all-MiniLM-L6-v2"


# ---------------------------------------------------------------- pure pieces


def test_input_forms():
    assert embedding_inputs("hello") == (["hello"], None)
    assert embedding_inputs(["a", "b"]) == (["a", "b"], None)
    assert embedding_inputs([101, 7592, 102]) == (None, [[101, 7592, 102]])
    assert embedding_inputs([[101, 102], [101, 7592, 102]]) == (None, [[101, 102], [101, 7592, 102]])


@pytest.mark.parametrize(("value", "says"), [
    ("", "input 0 is an empty string"),
    (["a", ""], "input 1 is an empty string"),
    ([], "must not be empty"),
    (["a", 1], "not a mix"),
    ([[1, 2], "a"], "not a mix"),
    ([True, False], "not a mix"),  # JSON booleans are not token ids
    ([[1.5]], "not a mix"),
    ({"text": "a"}, "must be a string"),
    (None, "must be a string"),
    (["a"] * (MAX_INPUTS + 1), f"holds {MAX_INPUTS + 1} inputs; {MAX_INPUTS} at most"),
])
def test_bad_inputs_are_400s_naming_input(value, says):
    with pytest.raises(ApiError) as e:
        embedding_inputs(value)
    assert (e.value.status, e.value.param) == (400, "input") and says in str(e.value)


def test_answer_in_floats_and_in_base64():
    vectors = np.array([[0.5, -0.25, 1e-8], [1.0, 0.0, -1.0]], dtype=np.float32)
    plain = msgspec.json.decode(embedding_body(vectors, model=MODEL, prompt_tokens=7, encoding_format="float"))
    assert plain["object"] == "list" and plain["model"] == MODEL
    assert plain["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in plain["data"]] == [0, 1] and {d["object"] for d in plain["data"]} == {"embedding"}
    assert np.array_equal(np.array([d["embedding"] for d in plain["data"]], dtype=np.float32), vectors)
    packed = msgspec.json.decode(embedding_body(vectors, model=MODEL, prompt_tokens=7, encoding_format="base64"))
    got = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]]
    assert np.array_equal(np.stack(got), vectors)  # bit for bit: little-endian float32, as OpenAI's


# ---------------------------------------------------------------- served


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
async def test_embeddings_served(nursery: trio.Nursery, tmp_path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    urls, key, stop = await serve_real(nursery, GatewayConfig(
        port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm", shutdown_grace_seconds=1,
        dtype="float32", kv_cache_mb=64, max_model_len=1024))
    base = urls[0]
    sdk = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
    admin = {"Authorization": "Bearer adm"}
    texts = ["The cat sat on the mat.", "A kitten was lying on the rug.", "Interest rates rose again this year."]

    # the SDK asks for base64 and decodes it; floats asked for explicitly are the same vectors
    packed = await trio.to_thread.run_sync(lambda: sdk.embeddings.create(model=MODEL, input=texts))
    floats = await trio.to_thread.run_sync(lambda: sdk.embeddings.create(model=MODEL, input=texts,
                                                                         encoding_format="float"))
    v = np.array([d.embedding for d in packed.data])
    assert v.shape == (3, 384) and packed.model == MODEL
    assert np.array_equal(v, np.array([d.embedding for d in floats.data]))
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > 0.5 > 0.1 > v[0] @ v[2]  # the cats agree; the rates do not
    assert packed.usage.prompt_tokens == packed.usage.total_tokens > 3 * 2

    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        async def post(body):  # type: ignore[no-untyped-def]
            return await http.post("/v1/embeddings", json=body)

        # one text, and the same as token ids (the embedding model's vocabulary)
        one = (await post({"model": MODEL, "input": texts[0]})).json()
        ids = [101, 1996, 4937, 2938, 2006, 1996, 13523, 1012, 102]  # MiniLM's ids of texts[0]
        by_ids = (await post({"model": MODEL, "input": ids})).json()
        assert one["usage"]["prompt_tokens"] == by_ids["usage"]["prompt_tokens"] == len(ids)
        assert np.allclose(one["data"][0]["embedding"], by_ids["data"][0]["embedding"], atol=1e-6)
        assert np.allclose(one["data"][0]["embedding"], v[0], atol=1e-5)  # alone or in a batch
        # the model's Hugging Face id names it too
        assert (await post({"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "x"})).status_code == 200

        # too long: a 400 naming the input, unless truncate_prompt_tokens cuts it
        long = "word " * 300
        r = await post({"model": MODEL, "input": ["short", long]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        assert "input 1 has 302 tokens; 256 is the most" in r.json()["error"]["message"]
        cut = (await post({"model": MODEL, "input": long, "truncate_prompt_tokens": -1})).json()
        assert cut["usage"]["prompt_tokens"] == 256
        assert (await post({"model": MODEL, "input": long, "truncate_prompt_tokens": 8})).json()[
            "usage"]["prompt_tokens"] == 8

        # bad requests are OpenAI-style 4xx
        for body, status, param in [
            ({"model": MODEL, "input": ""}, 400, "input"),
            ({"model": MODEL, "input": [[101, 40000]]}, 400, "input"),
            ({"model": MODEL, "input": "x", "dimensions": 128}, 400, "dimensions"),
            ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
            ({"model": MODEL, "input": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
            ({"model": MODEL, "input": long, "truncate_prompt_tokens": 1}, 400, "truncate_prompt_tokens"),
            ({"model": MODEL, "input": long, "truncate_prompt_tokens": 300}, 400, "truncate_prompt_tokens"),
            # another tokenizer's ids (langchain's default sends OpenAI's): no [CLS] ... [SEP]
            ({"model": MODEL, "input": [[791, 8415, 7731, 389, 279, 5634, 13]]}, 400, "input"),
            ({"model": "SmolLM2-135M-Instruct", "input": "x"}, 400, "model"),
            ({"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
            ({"input": "x"}, 400, "model"),
        ]:
            r = await post(body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.text)
        assert (await post({"model": MODEL, "input": "x", "dimensions": 384})).status_code == 200

        # the embedding model is listed, and generates nothing
        models = (await http.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct", MODEL]
        assert models[1]["max_model_len"] == 256 and "parent" not in models[1]
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user",
                                                                                        "content": "hi"}]})
        assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
        assert (await http.post("/tokenize", json={"model": MODEL, "prompt": "hi"})).status_code == 400

        # a tenant: its model list, its quota, its usage under the embedding model's name
        await http.post("/admin/tenants", headers=admin, json={
            "id": "emb", "name": "emb", "models": [MODEL], "quota": {"tokens_per_minute": 60}})
        tkey = (await http.post("/admin/tenants/emb/keys", headers=admin, json={})).json()["key"]
        theirs = {"Authorization": f"Bearer {tkey}"}
        ok = await http.post("/v1/embeddings", headers=theirs, json={"model": MODEL, "input": texts})
        assert ok.status_code == 200
        used = ok.json()["usage"]["prompt_tokens"]
        assert ok.headers["x-ratelimit-limit-tokens"] == "60"
        assert ok.headers["x-ratelimit-remaining-tokens"] == str(60 - used)
        over = await http.post("/v1/embeddings", headers=theirs, json={"model": MODEL, "input": [long[:200]] * 2})
        assert over.status_code == 429 and "tokens_per_minute" in over.json()["error"]["message"]
        assert over.headers["x-ratelimit-remaining-tokens"] == str(60 - used)  # a 429 says where it stands
        gen = await http.post("/v1/completions", headers=theirs, json={"model": "SmolLM2-135M-Instruct",
                                                                       "prompt": "hi", "max_tokens": 2})
        assert gen.status_code == 404  # not in its list
        assert [m["id"] for m in (await http.get("/v1/models", headers=theirs)).json()["data"]] == [MODEL]
        # a tenant's list may name the model by either of its names
        await http.post("/admin/tenants", headers=admin, json={
            "id": "hf", "name": "hf", "models": ["sentence-transformers/all-MiniLM-L6-v2"]})
        hkey = (await http.post("/admin/tenants/hf/keys", headers=admin, json={})).json()["key"]
        hf = {"Authorization": f"Bearer {hkey}"}
        assert [m["id"] for m in (await http.get("/v1/models", headers=hf)).json()["data"]] == [MODEL]
        assert (await http.post("/v1/embeddings", headers=hf, json={"model": MODEL, "input": "x"})).status_code == 200
        usage = (await http.get("/admin/tenants/emb/usage", headers=admin)).json()["data"]
        assert [(u["model"], u["requests"], u["prompt_tokens"], u["completion_tokens"]) for u in usage] == [
            (MODEL, 1, used, 0)]

        # the Python client: base64 on the wire, floats out
        async with LmgateClient(base, key) as client:
            got = await client.embed(texts)
        assert got.model == MODEL and got.prompt_tokens == packed.usage.prompt_tokens
        assert np.array_equal(np.array(got.vectors), v)

        metrics = (await http.get("/metrics")).text
        assert 'lmgate_embedding_inputs_total{tenant="emb"} 3.0' in metrics
        assert "lmgate_embedding_compute_seconds_total" in metrics
    stop.set()


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
async def test_no_embedding_model(nursery: trio.Nursery, tmp_path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    urls, key, stop = await serve_real(nursery, GatewayConfig(
        port=0, data_dir=str(tmp_path), redis_url=redis_url, shutdown_grace_seconds=1, dtype="float32",
        kv_cache_mb=64, max_model_len=1024, embedding_model="none"))
    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {key}"}) as http:
        assert [m["id"] for m in (await http.get("/v1/models")).json()["data"]] == ["SmolLM2-135M-Instruct"]
        r = await http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await http.post("/v1/embeddings", json={"model": "SmolLM2-135M-Instruct", "input": "x"})
        assert r.status_code == 400 and "no embedding model" in r.json()["error"]["message"]
        # nor scores (gateway.routes_scoring): no model named is a 400, the embedding model's name a 404
        r = await http.post("/v1/rerank", json={"query": "a", "documents": ["b"]})
        assert r.status_code == 400 and "no embedding model" in r.json()["error"]["message"]
        r = await http.post("/v1/score", json={"model": MODEL, "text_1": "a", "text_2": "b"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    stop.set()
