"""POST /v1/score and /v1/rerank: pairing, texts and ranking (pure), then the whole server
with the real embedding model over real sockets: scores equal the cosine similarity of
/v1/embeddings' vectors, rankings put the relevant document first, errors name the field
and the document at fault, and tenants, quotas and usage apply as to embeddings."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from clients import BadRequest, LmgateClient
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.routes_embeddings import MAX_INPUTS
from gateway.routes_scoring import (
    Distinct,
    cosine,
    document_cut,
    rerank_order,
    score_pairs,
    score_texts,
)
from tests.conftest import serve_real

MODEL = "all-MiniLM-L6-v2"


# ---------------------------------------------------------------- pure pieces


def test_pairs_are_one_to_one_one_to_many_or_pairwise():
    assert score_pairs(1, 1, "text_1", "text_2") == [(0, 0)]
    assert score_pairs(1, 3, "text_1", "text_2") == [(0, 0), (0, 1), (0, 2)]
    assert score_pairs(3, 3, "text_1", "text_2") == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ApiError) as e:
        score_pairs(2, 3, "text_1", "text_2")
    assert (e.value.status, e.value.param) == (400, "text_2") and "holds 2 texts and text_2 3" in str(e.value)
    with pytest.raises(ApiError):
        score_pairs(3, 1, "queries", "documents")  # N:1 is not one of vLLM's pairings


def test_texts_forms_and_refusals():
    assert score_texts("a", "query") == ["a"]
    assert score_texts(["a", "b"], "text_1") == ["a", "b"]
    assert score_texts(["a", {"text": "b"}], "documents", documents=True) == ["a", "b"]  # Cohere's, Jina's form
    for value, documents, says in [
        ("", False, "holds an empty text"),
        (["a", ""], False, "empty text (item 1)"),
        ([], False, "must not be empty"),
        ([{"text": "b"}], False, "must be a string or a list of them (item 0 is not)"),
        ([{"title": "b"}], True, "an object with a text string"),
        ([{"text": 3}], True, "an object with a text string"),
        (["a"] * (MAX_INPUTS + 1), False, f"holds {MAX_INPUTS + 1} texts; {MAX_INPUTS} at most"),
    ]:
        with pytest.raises(ApiError) as e:
            score_texts(value, "documents", documents=documents)
        assert (e.value.status, e.value.param) == (400, "documents") and says in str(e.value), (value, str(e.value))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["text", "x"]), inner, max_size=2),
    max_leaves=8)


@given(value=json_values, documents=st.booleans())
def test_any_json_is_texts_or_a_400_naming_the_field(value, documents):  # type: ignore[no-untyped-def]
    try:
        texts = score_texts(value, "documents", documents=documents)
    except ApiError as e:
        assert (e.status, e.param) == (400, "documents")
    else:
        assert texts and all(isinstance(t, str) and t for t in texts)


def test_distinct_texts_are_embedded_once_and_named_by_their_first_place():
    d = Distinct()
    assert d.add(["q"], "query", listed=False) == [0]
    assert d.add(["x", "q", "y", "x"], "documents", listed=True) == [1, 0, 2, 1]
    assert d.texts == ["q", "x", "y"]
    assert d.labels == ["query", "documents[0]", "documents[2]"]


def test_a_text_under_two_cuts_is_two_inputs():
    d = Distinct()
    assert d.add(["q"], "query", listed=False, cut=None) == [0]
    assert d.add(["q", "x", "q"], "documents", listed=True, cut=16) == [1, 2, 1]
    assert (d.texts, d.cuts) == (["q", "q", "x"], [None, 16, 16])


def test_max_tokens_per_doc_is_a_cut_within_the_models_range():
    class Runtime:
        embedding_max_tokens, embedding_min_tokens = 256, 3

    assert document_cut(None, None, Runtime) is None and document_cut(None, 40, Runtime) == 40
    assert document_cut(4096, None, Runtime) == 256  # Cohere's default asks for more than the model takes
    assert document_cut(16, None, Runtime) == 16 and document_cut(16, 8, Runtime) == 8
    with pytest.raises(ApiError) as info:
        document_cut(2, None, Runtime)
    assert info.value.param == "max_tokens_per_doc" and "at least 3" in info.value.message


def test_cosine_and_ranking():
    v = np.array([[1, 0], [0, 2], [3, 3], [0, 0]], dtype=np.float32)
    got = cosine(v, [0, 0, 0, 1, 3], [0, 1, 2, 2, 0])
    assert np.allclose(got, [1, 0, 2 ** -0.5, 2 ** -0.5, 0])  # unnormalized rows; a zero vector scores 0
    assert rerank_order([0.1, 0.9, 0.5, 0.9], 0) == [1, 3, 2, 0]  # ties keep the documents' order
    assert rerank_order([0.1, 0.9, 0.5], 2) == [1, 2]
    assert rerank_order([0.1, 0.9], 5) == [1, 0]


# ---------------------------------------------------------------- served


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
async def test_score_and_rerank_served(nursery: trio.Nursery, tmp_path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    urls, key, stop = await serve_real(nursery, GatewayConfig(
        port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm", shutdown_grace_seconds=1,
        dtype="float32", kv_cache_mb=64, max_model_len=1024))
    base = urls[0]
    admin = {"Authorization": "Bearer adm"}
    query = "Where do llamas live?"
    docs = ["The giant panda is a bear species endemic to China.",
            "The llama is a domesticated South American camelid, used as a pack animal in the Andes.",
            "Interest rates rose again this year."]

    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        emb = (await http.post("/v1/embeddings", json={"model": MODEL, "input": [query, *docs],
                                                       "encoding_format": "float"})).json()
        v = np.array([d["embedding"] for d in emb["data"]], dtype=np.float64)
        expect = [float(v[0] @ v[i] / np.linalg.norm(v[0]) / np.linalg.norm(v[i])) for i in (1, 2, 3)]

        # 1:N, under both of vLLM's names for the fields and both paths; model defaults
        for path, body in [("/v1/score", {"text_1": query, "text_2": docs}),
                           ("/score", {"model": MODEL, "queries": query, "documents": docs})]:
            r = await http.post(path, json=body)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["object"] == "list" and got["model"] == MODEL and got["id"].startswith("score-")
            assert [(d["index"], d["object"]) for d in got["data"]] == [(0, "score"), (1, "score"), (2, "score")]
            assert np.allclose([d["score"] for d in got["data"]], expect, atol=1e-5)
            assert got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] == emb["usage"]["prompt_tokens"]
            assert got["usage"]["completion_tokens"] == 0
        # N:N pairs them in order; a text repeated is embedded once. Another batch of texts
        # is another padded shape, which moves a float32 score by up to ~5e-5 (AMX Xeon)
        r = (await http.post("/v1/score", json={"text_1": [query, query], "text_2": [docs[1], docs[2]]})).json()
        assert np.allclose([d["score"] for d in r["data"]], [expect[1], expect[2]], atol=2e-4)
        one = (await http.post("/v1/embeddings", json={"model": MODEL, "input": [query, docs[1], docs[2]]})).json()
        assert r["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
        same = (await http.post("/v1/score", json={"text_1": "a cat", "text_2": "a cat"})).json()
        assert same["data"][0]["score"] == pytest.approx(1.0, abs=1e-5)

        # rerank: best first, on each of vLLM's paths
        for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
            r = await http.post(path, json={"model": MODEL, "query": query, "documents": docs})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["id"].startswith("rerank-") and got["model"] == MODEL
            assert [x["index"] for x in got["results"]] == [1, 0, 2]
            assert [x["document"]["text"] for x in got["results"]] == [docs[1], docs[0], docs[2]]
            assert np.allclose([x["relevance_score"] for x in got["results"]], [expect[1], expect[0], expect[2]],
                               atol=1e-5)
            assert got["usage"] == {"prompt_tokens": emb["usage"]["prompt_tokens"],
                                    "total_tokens": emb["usage"]["prompt_tokens"]}
        top = (await http.post("/v1/rerank", json={"query": query, "documents": [{"text": d} for d in docs],
                                                   "top_n": 1, "return_documents": False})).json()
        assert top["results"] == [{"index": 1, "relevance_score": pytest.approx(expect[1], abs=1e-5)}]

        # a document too long is named; truncate_prompt_tokens cuts it
        long = "word " * 300
        r = await http.post("/v1/rerank", json={"query": query, "documents": ["short", long]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "documents"
        assert r.json()["error"]["message"].startswith("documents[1] has 302 tokens; 256 is the most")
        r = await http.post("/v1/score", json={"text_1": long, "text_2": "x"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("text_1 has 302 tokens")
        cut = (await http.post("/v1/rerank", json={"query": query, "documents": ["short", long],
                                                   "truncate_prompt_tokens": -1})).json()
        assert [x["index"] for x in cut["results"]] and len(cut["results"]) == 2
        # Cohere's max_tokens_per_doc cuts the documents, not the query: the same scores as
        # truncate_prompt_tokens when the query is shorter than the cut
        r = await http.post("/v1/rerank", json={"query": long, "documents": [long], "max_tokens_per_doc": 16})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("query has 302 tokens")
        by_doc = (await http.post("/v2/rerank", json={"query": query, "documents": ["short", long, query],
                                                      "max_tokens_per_doc": 16})).json()
        by_all = (await http.post("/v2/rerank", json={"query": query, "documents": ["short", long, query],
                                                      "truncate_prompt_tokens": 16})).json()
        assert [x["index"] for x in by_doc["results"]] == [x["index"] for x in by_all["results"]]
        assert np.allclose([x["relevance_score"] for x in by_doc["results"]],
                           [x["relevance_score"] for x in by_all["results"]], atol=2e-4)  # batches of 4 and 3
        # the query as a document, which the cut leaves whole, is the same tokens: embedded
        # and charged once (3 for "short", 16 for the cut long one, the query's own tokens)
        n_query = (await http.post("/v1/embeddings", json={"model": MODEL, "input": query})).json()["usage"][
            "prompt_tokens"]
        assert by_doc["usage"]["prompt_tokens"] == 3 + 16 + n_query
        assert next(x for x in by_doc["results"] if x["index"] == 2)["relevance_score"] > 0.99999

        # bad requests are OpenAI-style 4xx naming the field
        for path, body, status, param in [
            ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, 400, "text_2"),
            ("/v1/score", {"text_1": "a"}, 400, "text_2"),
            ("/v1/score", {}, 400, "text_1"),
            ("/v1/score", {"text_1": "a", "text_2": "b", "queries": "a", "documents": "b"}, 400, "queries"),
            ("/v1/score", {"text_1": "a", "documents": "b"}, 400, "documents"),
            ("/v1/score", {"text_1": 3, "text_2": "b"}, 400, "text_1"),
            ("/v1/score", {"text_1": "a", "text_2": []}, 400, "text_2"),
            ("/v1/rerank", {"query": "a", "documents": ["b", ""]}, 400, "documents"),
            ("/v1/rerank", {"query": ["a"], "documents": ["b"]}, 400, "query"),
            ("/v1/rerank", {"documents": ["b"]}, 400, "query"),
            ("/v1/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, 400, "top_n"),
            ("/v1/rerank", {"query": "a", "documents": ["b"], "truncate_prompt_tokens": 0}, 400,
             "truncate_prompt_tokens"),
            ("/v1/rerank", {"query": "a", "documents": ["b"], "max_tokens_per_doc": 2}, 400, "max_tokens_per_doc"),
            ("/v1/rerank", {"query": "a", "documents": ["b"], "max_tokens_per_doc": "x"}, 400,
             "max_tokens_per_doc"),
            ("/v1/rerank", {"query": "a", "documents": ["b"], "model": "SmolLM2-135M-Instruct"}, 400, "model"),
            ("/v1/rerank", {"query": "a", "documents": ["b"], "model": "bge-reranker-base"}, 404, "model"),
        ]:
            r = await http.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            assert r.json()["error"]["param"] == param, (path, body, r.text)
        assert (await http.post("/v1/rerank", json={"query": "a", "documents": ["b"]},
                                headers={"Authorization": "Bearer nope"})).status_code == 401

        # a tenant: its model list, its quota, its usage under the embedding model's name
        counted = (await http.post("/v1/embeddings", json={"model": MODEL, "input": [query, *docs[:2], long[:200]],
                                                           "encoding_format": "float"})).json()["usage"]
        first = (await http.post("/v1/embeddings", json={"model": MODEL, "input": [query, *docs[:2]]})).json()
        used_first = first["usage"]["prompt_tokens"]
        second = counted["prompt_tokens"] - used_first + (await http.post("/v1/embeddings", json={
            "model": MODEL, "input": query})).json()["usage"]["prompt_tokens"]  # the query and the long text
        limit = used_first + second  # room for the long text once, not twice
        await http.post("/admin/tenants", headers=admin, json={
            "id": "rr", "name": "rr", "models": [MODEL], "quota": {"tokens_per_minute": limit}})
        tkey = (await http.post("/admin/tenants/rr/keys", headers=admin, json={})).json()["key"]
        theirs = {"Authorization": f"Bearer {tkey}"}
        ok = await http.post("/v1/rerank", headers=theirs, json={"query": query, "documents": docs[:2]})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["prompt_tokens"] == used_first
        assert ok.headers["x-ratelimit-remaining-tokens"] == str(limit - used_first)
        twice = await http.post("/v1/score", headers=theirs, json={"text_1": query, "text_2": [long[:200]] * 2})
        assert twice.status_code == 200, twice.text  # the same text twice is embedded (and charged) once
        assert twice.json()["usage"]["prompt_tokens"] == second
        over = await http.post("/v1/score", headers=theirs, json={"text_1": "a", "text_2": "b"})
        assert over.status_code == 429 and "tokens_per_minute" in over.json()["error"]["message"]
        await http.post("/admin/tenants", headers=admin, json={"id": "gen", "name": "gen",
                                                               "models": ["SmolLM2-135M-Instruct"]})
        gkey = (await http.post("/admin/tenants/gen/keys", headers=admin, json={})).json()["key"]
        r = await http.post("/v1/rerank", headers={"Authorization": f"Bearer {gkey}"},
                            json={"query": "a", "documents": ["b"]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"  # not in its list
        usage = (await http.get("/admin/tenants/rr/usage", headers=admin)).json()["data"]
        assert [(u["model"], u["requests"], u["completion_tokens"]) for u in usage] == [(MODEL, 2, 0)]

        # the Python client
        async with LmgateClient(base, key) as client:
            scores = await client.score(query, docs)
            ranking = await client.rerank(query, docs, top_n=2)
            with pytest.raises(BadRequest, match="top_n"):
                await client.rerank(query, docs, top_n=-1)
        assert np.allclose(scores.scores, expect, atol=1e-5) and scores.model == MODEL
        assert [(x.index, x.text) for x in ranking.results] == [(1, docs[1]), (0, docs[0])]
        assert ranking.prompt_tokens == emb["usage"]["prompt_tokens"]

        metrics = (await http.get("/metrics")).text
        assert 'lmgate_embedding_inputs_total{tenant="rr"} 5.0' in metrics  # 3, then 2 distinct
    stop.set()

