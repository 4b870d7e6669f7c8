"""GET /openapi.json: the public and admin APIs, schemas generated from the msgspec Structs.

Request bodies come from the same Structs the routes decode with, so the document
cannot drift from what the server accepts. Responses are described loosely
(OpenAI's shapes are documented in docs/api.md).
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from cache.quotas import Quota
from cache.tenants import ApiKeyInfo, Tenant
from gateway.routes_admin import KeyCreate, QuotaBody, TenantCreate, TenantUpdate
from gateway.routes_embeddings import EmbeddingRequest
from gateway.routes_openai import COMPLETIONS_MAX_TOKENS, ChatRequest, CompletionRequest
from gateway.routes_responses import ResponsesRequest
from gateway.routes_scoring import RERANK_ROUTES, SCORE_ROUTES, RerankRequest, ScoreRequest
from gateway.routes_tokenizer import DetokenizeRequest, TokenizeRequest

_SCHEMA_TYPES = (CompletionRequest, ChatRequest, ResponsesRequest, EmbeddingRequest, ScoreRequest, RerankRequest,
                 TokenizeRequest, DetokenizeRequest, TenantCreate, TenantUpdate, KeyCreate, QuotaBody, Quota, Tenant, ApiKeyInfo)

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": "error", "content": {"application/json": {"schema": _ref("Error")}}} for s in statuses
    }


def _ok(description: str, content_type: str = "application/json") -> dict[str, Any]:
    return {"description": description, "content": {content_type: {"schema": {"type": "object"}}}}


def _op(summary: str, *, body: str | None = None, ok: str = "200", admin: bool = False, errors: tuple[int, ...] = ()) -> dict[str, Any]:
    statuses = set(errors or ((403, 503) if admin else (400, 401)))
    if body:  # (every body: 413 over the cap, 415 for a Content-Encoding not served)
        statuses |= {400, 413, 415}
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"adminKey": []}] if admin else [{"apiKey": []}],
        "responses": {ok: _ok(summary), **_errors(*sorted(statuses))},
    }
    if admin:
        op["tags"] = ["admin"]
    if body:
        op["requestBody"] = _json_body(body)
    return op


@functools.cache
def openapi_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_SCHEMA_TYPES, ref_template="#/components/schemas/{name}")
    components["Error"] = _ERROR
    # absent is not null there (null: up to the context length), which msgspec cannot say
    components["CompletionRequest"]["properties"]["max_tokens"]["default"] = COMPLETIONS_MAX_TOKENS
    # one Struct decodes both, but creating a response needs its model (counting its tokens does not)
    components["ResponsesCreateRequest"] = {"allOf": [_ref("ResponsesRequest"), {"required": ["model"]}]}
    gen_errors = (400, 401, 404, 413, 429, 503, 504)  # 504: Cache-Control only-if-cached, not cached
    streaming = {
        "description": "JSON response, or with stream=true an SSE stream of chunks ending with `data: [DONE]`",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}},
    }
    completions = _op("Create a completion", body="CompletionRequest", errors=gen_errors)
    completions["responses"]["200"] = streaming
    chat = _op("Create a chat completion", body="ChatRequest", errors=gen_errors)
    chat["responses"]["200"] = streaming
    headers = [
        {"name": "X-Lmgate-App", "in": "header", "schema": {"type": "string"},
         "description": "application tag for the length predictor (as metadata.app)"},
        {"name": "Cache-Control", "in": "header", "schema": {"type": "string"},
         "description": "response cache: no-cache (or max-age=0) generates afresh, no-store does not store "
                        "the answer, max-age=N / min-fresh=N bound the stored answer's age, only-if-cached "
                        "answers from the cache or with a 504 not_cached"},
    ]
    responses = _op("Create a response (OpenAI's Responses API)", body="ResponsesCreateRequest", errors=gen_errors)
    responses["responses"]["200"] = {
        "description": "the Response object, or with stream=true an SSE stream of named events (`event: <type>`) "
                       "ending with response.completed, response.incomplete or response.failed",
        "content": streaming["content"],
    }
    completions["parameters"] = chat["parameters"] = responses["parameters"] = headers
    response_id = [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    public_path = {"security": []}
    paths: dict[str, Any] = {
        "/v1/completions": {"post": completions},
        "/v1/chat/completions": {"post": chat},
        "/v1/models": {"get": _op("List served models")},
        "/v1/models/{model}": {"get": {**_op("One served model", errors=(401, 404)), "parameters": [
            {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]}},
        "/v1/responses": {"post": responses},
        "/v1/responses/input_tokens": {"post": _op("Count the input tokens of a response request",
                                                    body="ResponsesRequest", errors=(400, 401, 404, 503))},
        "/v1/responses/{response_id}": {
            "get": {**_op("A stored response, or one running as it stands; with stream=true, a background "
                          "response's events after starting_after", errors=(400, 401, 404, 503)), "parameters": [
                *response_id,
                {"name": "stream", "in": "query", "schema": {"type": "boolean"}},
                {"name": "starting_after", "in": "query", "schema": {"type": "integer", "minimum": 0}}]},
            "delete": {**_op("Delete a stored response (a running background one is cancelled)",
                             errors=(401, 404, 503)), "parameters": response_id},
        },
        "/v1/responses/{response_id}/cancel": {"post": {
            **_op("Cancel a background response", errors=(400, 401, 404, 503)), "parameters": response_id}},
        "/v1/responses/{response_id}/input_items": {"get": {
            **_op("A stored response's input items", errors=(400, 401, 404, 503)), "parameters": [
                *response_id,
                {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                {"name": "after", "in": "query", "schema": {"type": "string"}}]}},
        "/v1/embeddings": {"post": _op("Embed texts or token ids with the embedding model", body="EmbeddingRequest",
                                       errors=(400, 401, 404, 429, 503))},
        **{path: {"post": _op("Cosine similarities of text pairs with the embedding model (vLLM's)",
                              body="ScoreRequest", errors=(400, 401, 404, 429, 503))} for path in SCORE_ROUTES},
        **{path: {"post": _op("Documents ranked by cosine similarity to a query with the embedding model (vLLM's)",
                              body="RerankRequest", errors=(400, 401, 404, 429, 503))} for path in RERANK_ROUTES},
        "/tokenize": {"post": _op("Token ids of a prompt or of chat messages (vLLM's)", body="TokenizeRequest",
                                  errors=(400, 401, 404, 429, 501))},
        "/detokenize": {"post": _op("Text of token ids (vLLM's)", body="DetokenizeRequest", errors=(400, 401, 404, 429, 501))},
        "/tokenizer_info": {"get": _op("The tokenizer's config: bos/eos tokens, chat template (vLLM's)")},
        "/v1/ws": {"get": {**_op("WebSocket token streaming (see docs/websocket.md)", ok="101"), "responses": {
            "101": {"description": "switching protocols"}, **_errors(400, 401)}}},  # 400: not a WebSocket upgrade
        "/openapi.json": {"get": {"summary": "This document", "security": [],
                                  "responses": {"200": _ok("the OpenAPI document")}}},
        "/healthz": {"get": {**_op("Process is up"), **public_path}},
        "/readyz": {"get": {**_op("Runtime ready (503 if not); lists degraded parts", errors=(503,)), **public_path}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": _ok("metrics", "text/plain")}}},
        "/admin/tenants": {
            "get": {**_op("List tenants by id, a page at a time (has_more: ask again after last_id)", admin=True,
                          errors=(400, 403, 503)), "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                             "default": 100}},
                {"name": "after", "in": "query", "schema": {"type": "string"}}]},
            "post": _op("Create a tenant", body="TenantCreate", ok="201", admin=True, errors=(400, 403, 409, 503)),
        },
        "/admin/tenants/{tenant_id}": {
            "get": _op("Read a tenant and its keys", admin=True, errors=(403, 404, 503)),
            "patch": _op("Update a tenant (a JSON merge patch)", body="TenantUpdate", admin=True,
                         errors=(400, 403, 404, 503)),
            "delete": _op("Delete a tenant and its keys", admin=True, errors=(403, 404, 503)),
        },
        "/admin/tenants/{tenant_id}/quota": {"put": _op("Set the quota", body="QuotaBody", admin=True,
                                                        errors=(400, 403, 404, 503))},
        "/admin/tenants/{tenant_id}/keys": {
            "get": _op("List keys", admin=True, errors=(403, 404, 503)),
            "post": _op("Create a key (plaintext returned once)", body="KeyCreate", ok="201", admin=True,
                        errors=(400, 403, 404, 503)),
        },
        "/admin/keys/{key_id}": {"delete": _op("Revoke a key", admin=True, errors=(403, 404, 503))},
        "/admin/predictor": {
            "get": _op("The length predictor: its kind and what it has learned", admin=True, errors=(403,)),
            "put": {**_op("Serve from an uploaded Magnus predictor (`lmgate predictor train/export` file)",
                          admin=True, errors=(400, 403, 409, 413, 415)),
                    "requestBody": {"required": True, "content": {"application/octet-stream": {
                        "schema": {"type": "string", "format": "binary"}}}}},
        },
        "/admin/predictor/export": {"get": {
            **_op("The Magnus predictor as a file", admin=True, errors=(403, 409)),
            "responses": {"200": _ok("the predictor file", "application/octet-stream"), **_errors(403, 409)}}},
        "/admin/tenants/{tenant_id}/usage": {
            "get": {
                **_op("Usage per UTC day and model", admin=True, errors=(400, 403, 404, 503)),
                "parameters": [
                    {"name": "from", "in": "query", "schema": {"type": "string", "format": "date"}},
                    {"name": "to", "in": "query", "schema": {"type": "string", "format": "date"}},
                ],
            }
        },
    }
    for path, item in paths.items():
        if "{tenant_id}" in path or "{key_id}" in path:
            name = "tenant_id" if "{tenant_id}" in path else "key_id"
            for op in item.values():
                op.setdefault("parameters", []).append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
    return {
        "openapi": "3.1.0",
        "info": {"title": "lmgate", "version": "0.1.0", "description": "OpenAI-compatible LLM gateway with tenants and quotas"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "tenant API key (lmg-...)"},
                "adminKey": {"type": "http", "scheme": "bearer", "description": "the gateway's admin key"},
            },
        },
    }
