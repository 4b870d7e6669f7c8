"""vLLM's score and rerank APIs, served by the embedding model (a bi-encoder: the score of
two texts is the cosine similarity of their vectors, as vLLM scores with an embedding
model)::

    POST /v1/score, /score    {model?, text_1, text_2 | queries, documents, truncate_prompt_tokens?}
        -> {id, object: "list", created, model, data: [{index, object: "score", score}],
            usage: {prompt_tokens, total_tokens, completion_tokens: 0}}
    POST /v1/rerank, /rerank, /v2/rerank
                              {model?, query, documents, top_n?=0, return_documents?=true,
                               truncate_prompt_tokens?, max_tokens_per_doc?}
        -> {id, model, usage: {prompt_tokens, total_tokens},
            results: [{index, document: {text}, relevance_score}]}   (best first)

Score pairs texts 1:1, 1:N (the one first text against each second one) or N:N (pairwise);
other lengths are a 400. Rerank scores the query against each document and returns them
best first, the `top_n` best (0, the default: all). A document is a string or an object
with a `text` string (Cohere's and Jina's form). `model` defaults to the embedding model;
the chat model is a 400 (it is no scorer). Each distinct text is embedded once, and
`usage` counts the tokens embedded. Everything else is `/v1/embeddings`' (`EmbedCall`):
the key, the tenant's models and quotas, `truncate_prompt_tokens`, the usage record under
the embedding model's name, the compute thread's turns. Rerank also takes Cohere's
`max_tokens_per_doc`, a cut of the documents alone (`document_cut`).
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from quart import Blueprint, Response, g, has_request_context, request

from actors.messages import EmbedCall, Rejected
from gateway.errors import ApiError, decode_json
from gateway.routes_embeddings import MAX_INPUTS, check_embedding_model, check_truncate
from gateway.routes_openai import rejected_error

if TYPE_CHECKING:
    from actors.messages import TenantContext
    from gateway.app import GatewayState

UNSET = msgspec.UNSET
Texts = str | list[str] | msgspec.UnsetType


class ScoreRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Body of POST /v1/score: `text_1` and `text_2` (vLLM's first names), or `queries`
    and `documents` (its later ones)."""

    model: str | None = None
    text_1: Texts = UNSET
    text_2: Texts = UNSET
    queries: Texts = UNSET
    documents: Texts = UNSET
    truncate_prompt_tokens: int | None = None
    user: str | None = None


class RerankRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Body of POST /v1/rerank (and /rerank, /v2/rerank)."""

    query: str
    documents: str | list[str | dict[str, Any]]
    model: str | None = None
    top_n: int = 0
    return_documents: bool = True
    truncate_prompt_tokens: int | None = None
    max_tokens_per_doc: int | None = None  # Cohere's: cut each document (not the query) to this many tokens
    user: str | None = None


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param} {message}", code="invalid_value", param=param)


def score_texts(value: Any, param: str, *, documents: bool = False) -> list[str]:
    """A score or rerank field as texts (pure): a string, or a non-empty list of strings
    (with `documents`, also objects with a `text` string); an ApiError 400 naming `param`
    otherwise, or for an empty text, or for more than MAX_INPUTS."""
    if value is UNSET:
        raise ApiError(400, f"{param} is required", code="missing_required_parameter", param=param)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _bad(param, "must not be empty")
    if len(items) > MAX_INPUTS:
        raise _bad(param, f"holds {len(items)} texts; {MAX_INPUTS} at most")
    out = []
    for i, item in enumerate(items):
        if documents and isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            kind = "a string or an object with a text string" if documents else "a string"
            raise _bad(param, f"must be {kind} or a list of them" + (f" (item {i} is not)" if isinstance(value, list)
                                                                    else ""))
        if not item:
            raise _bad(param, "holds an empty text" + (f" (item {i})" if isinstance(value, list) else ""))
        out.append(item)
    return out


def score_pairs(n_first: int, n_second: int, first: str, second: str) -> list[tuple[int, int]]:
    """(first index, second index) of each score, in the answer's order (pure): 1:1, 1:N
    (the one first text against each second one) or N:N (pairwise), as vLLM pairs them."""
    if n_first == 1:
        return [(0, j) for j in range(n_second)]
    if n_first == n_second:
        return [(i, i) for i in range(n_first)]
    raise ApiError(400, f"{first} holds {n_first} texts and {second} {n_second}: score pairs them 1:1, 1:N or "
                   "N:N", code="invalid_value", param=second)


class Distinct:
    """Texts to embed, each distinct one (with its cut) once, with what an error calls it
    (its first place: `query`, `documents[2]`) and its cut (tokens, None: none)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.labels: list[str] = []
        self.cuts: list[int | None] = []
        self._row: dict[tuple[str, int | None], int] = {}

    def add(self, texts: list[str], param: str, *, listed: bool, cut: int | None = None) -> list[int]:
        """The row of each text (`listed`: the field was a list, so labels carry the index)."""
        rows = []
        for i, text in enumerate(texts):
            row = self._row.get((text, cut))
            if row is None:
                row = self._row[(text, cut)] = len(self.texts)
                self.texts.append(text)
                self.labels.append(f"{param}[{i}]" if listed else param)
                self.cuts.append(cut)
            rows.append(row)
        return rows


def document_cut(max_tokens_per_doc: int | None, truncate: int | None, runtime: Any) -> int | None:
    """The cut of each rerank document: Cohere's `max_tokens_per_doc` (at most the
    embedding model's most; a 400 below the fewest a cut may leave), the stricter of it and
    `truncate_prompt_tokens` when both are given, else `truncate_prompt_tokens`' (pure)."""
    if max_tokens_per_doc is None:
        return truncate
    most = getattr(runtime, "embedding_max_tokens", None)
    fewest = getattr(runtime, "embedding_min_tokens", None) or 1
    if max_tokens_per_doc < fewest:
        raise _bad("max_tokens_per_doc", f"must be at least {fewest} for this embedding model (its special tokens "
                                         "and one of text)")
    cut = min(max_tokens_per_doc, most) if most is not None else max_tokens_per_doc
    return cut if truncate is None else min(cut, truncate)


def cosine(vectors: np.ndarray, a: list[int], b: list[int]) -> list[float]:
    """Cosine similarity of rows a[k] and b[k] (pure; a zero vector scores 0)."""
    va, vb = vectors[a].astype(np.float64), vectors[b].astype(np.float64)
    norms = np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1)
    dots = np.einsum("ij,ij->i", va, vb)
    return [float(d / n) if n > 0 else 0.0 for d, n in zip(dots, norms, strict=True)]


def rerank_order(scores: list[float], top_n: int) -> list[int]:
    """Document indices best first, the `top_n` best (0: all); ties keep the documents'
    order (pure)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top_n] if top_n > 0 else order


def scoring_blueprint(state: GatewayState) -> Blueprint:
    bp = Blueprint("scoring", __name__)

    async def embed(tenant: TenantContext, model: str, distinct: Distinct, truncate: int | list[int | None] | None,
                    prefix: str) -> tuple[np.ndarray, int]:
        call = EmbedCall(f"{prefix}-{uuid.uuid4().hex}", tenant, model, texts=distinct.texts,
                         truncate=truncate, labels=distinct.labels)
        reply = await state.runtime.embed(call)
        if isinstance(reply, Rejected):
            raise rejected_error(reply)
        if reply.rate_limits is not None and has_request_context():
            g.rate_limits = reply.rate_limits
        return reply.vectors, reply.prompt_tokens

    async def admit(kind: type[ScoreRequest] | type[RerankRequest]) -> tuple[Any, TenantContext, str, int | None]:
        """The body, its tenant, its model and its cut (401, 400s, 404 as /v1/embeddings)."""
        tenant = await state.authenticate(request.headers.get("Authorization"))
        req = decode_json(await request.get_data(cache=False), kind)
        model = check_embedding_model(state, req.model, tenant, serves="scores")
        return req, tenant, model, check_truncate(state, req.truncate_prompt_tokens)

    async def score() -> Any:
        req, tenant, model, truncate = await admit(ScoreRequest)
        if req.text_1 is not UNSET or req.text_2 is not UNSET:
            if req.queries is not UNSET or req.documents is not UNSET:
                raise ApiError(400, "send text_1 and text_2, or queries and documents, not a mix of them",
                               code="invalid_value", param="queries" if req.queries is not UNSET else "documents")
            first, second = "text_1", "text_2"
            one, two = req.text_1, req.text_2
        elif req.queries is not UNSET or req.documents is not UNSET:
            first, second = "queries", "documents"
            one, two = req.queries, req.documents
        else:
            raise ApiError(400, "text_1 and text_2 (or queries and documents) are required",
                           code="missing_required_parameter", param="text_1")
        texts_1, texts_2 = score_texts(one, first), score_texts(two, second)
        pairs = score_pairs(len(texts_1), len(texts_2), first, second)
        distinct = Distinct()
        rows_1 = distinct.add(texts_1, first, listed=isinstance(one, list))
        rows_2 = distinct.add(texts_2, second, listed=isinstance(two, list))
        vectors, tokens = await embed(tenant, model, distinct, truncate, "score")
        scores = cosine(vectors, [rows_1[i] for i, _ in pairs], [rows_2[j] for _, j in pairs])
        body = {
            "id": "score-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()),
            "model": getattr(state.runtime, "embedding_model_name", None) or model,
            "data": [{"index": k, "object": "score", "score": s} for k, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }
        return Response(msgspec.json.encode(body), content_type="application/json")

    async def rerank() -> Any:
        req, tenant, model, truncate = await admit(RerankRequest)
        if req.top_n < 0:
            raise ApiError(400, "top_n must be 0 (every document) or more", code="invalid_value", param="top_n")
        query = score_texts(req.query, "query")
        documents = score_texts(req.documents, "documents", documents=True)
        doc_cut = document_cut(req.max_tokens_per_doc, truncate, state.runtime)
        distinct = Distinct()
        (q,) = distinct.add(query, "query", listed=False, cut=truncate)
        rows = distinct.add(documents, "documents", listed=isinstance(req.documents, list), cut=doc_cut)
        cuts = distinct.cuts if doc_cut != truncate else truncate
        vectors, tokens = await embed(tenant, model, distinct, cuts, "rerank")
        scores = cosine(vectors, [q] * len(rows), rows)
        results = []
        for i in rerank_order(scores, req.top_n):
            one: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if req.return_documents:
                one["document"] = {"text": documents[i]}
            results.append(one)
        body = {"id": "rerank-" + uuid.uuid4().hex, "model": getattr(state.runtime, "embedding_model_name", None) or model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results}
        return Response(msgspec.json.encode(body), content_type="application/json")

    for path in SCORE_ROUTES:
        bp.add_url_rule(path, f"score{path.replace('/', '_')}", score, methods=["POST"])
    for path in RERANK_ROUTES:
        bp.add_url_rule(path, f"rerank{path.replace('/', '_')}", rerank, methods=["POST"])
    return bp


SCORE_ROUTES = ("/v1/score", "/score")  # vLLM serves both
RERANK_ROUTES = ("/v1/rerank", "/rerank", "/v2/rerank")  # vLLM's (Jina's, Cohere's v1 and v2 paths)

__all__ = ["RERANK_ROUTES", "SCORE_ROUTES", "RerankRequest", "ScoreRequest", "cosine", "rerank_order",
           "score_pairs", "score_texts", "scoring_blueprint"]
