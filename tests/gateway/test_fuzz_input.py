"""No input makes the gateway answer 500: random bodies (the real field names, random
JSON values, random bytes) against both generation routes, the tokenizer's, the
embedding model's (score, rerank, embeddings) and the WebSocket.
Requests that pass validation are refused by the fake runtime with a 503, so only
the gateway's own parsing and mapping are under test.

Sync tests against the threaded gateway (hypothesis drives sync functions; the
server keeps running across examples).
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.messages import Rejected
from tests.gateway.conftest import MODEL, Served

FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
    "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "user", "stream",
    "stream_options", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "priority", "metadata",
    "stop_token_ids", "logit_bias", "suffix", "response_format", "tools", "functions", "tool_choice",
    "use_beam_search", "best_of", "length_penalty", "early_stopping", "echo", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "structured_outputs",
]
SCORING_FIELDS = ["model", "text_1", "text_2", "queries", "documents", "query", "top_n", "return_documents",
                  "truncate_prompt_tokens"]
TOKENIZER_FIELDS = ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                    "return_token_strs", "tokens"]
KEYS = st.sampled_from(["role", "content", "type", "text", "include_usage", "app"]) | st.text(max_size=5)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=8,
)
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8).map(
    lambda d: d if "model" in d else {"model": MODEL, **d}
)
raw_bodies = st.one_of(bodies.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64))

ALLOWED = {400, 404, 503}
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
REFUSE = Rejected("", 503, "overloaded", "fuzz", retry_after=1)


@FUZZ
@given(body=raw_bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_random_http_bodies_never_500(served: Served, body: bytes, path: str) -> None:
    served.runtime.reject = REFUSE
    headers = {"Authorization": f"Bearer {served.api_key}", "Content-Type": "application/json"}
    r = httpx.post(served.base_url + path, content=body, headers=headers)
    assert r.status_code in ALLOWED, (r.status_code, body, r.text)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@FUZZ
@given(body=st.dictionaries(st.sampled_from(SCORING_FIELDS), values, max_size=6),
       path=st.sampled_from(["/v1/score", "/v1/rerank", "/v1/embeddings"]))
def test_random_scoring_bodies_never_500(served: Served, body: dict, path: str) -> None:
    headers = {"Authorization": f"Bearer {served.api_key}", "Content-Type": "application/json"}
    r = httpx.post(served.base_url + path, content=json.dumps(body).encode(), headers=headers)
    assert r.status_code in {400, 404}, (r.status_code, body, r.text)  # the fake runtime has no embedding model
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@FUZZ
@given(body=st.dictionaries(st.sampled_from(TOKENIZER_FIELDS), values, max_size=5),
       path=st.sampled_from(["/tokenize", "/detokenize"]))
def test_random_tokenizer_bodies_never_500(served: Served, tokenizer, body: dict, path: str) -> None:
    served.runtime.tokenizer = tokenizer
    headers = {"Authorization": f"Bearer {served.api_key}", "Content-Type": "application/json"}
    r = httpx.post(served.base_url + path, content=json.dumps(body).encode(), headers=headers)
    assert r.status_code in {200, 400, 404}, (r.status_code, body, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def tokenizer():
    from gpu.loader import bundled_gguf_path
    from gpu.tokenizer import load_tokenizer

    return load_tokenizer(bundled_gguf_path())


frames = st.one_of(
    bodies.map(lambda b: {"type": "request", "id": "x", "endpoint": "completions", "body": b}),
    bodies.map(lambda b: {"type": "request", "id": "y", "endpoint": "chat.completions", "body": b}),
    st.dictionaries(st.sampled_from(["type", "id", "endpoint", "body", "api_key"]), values, max_size=4),
)


@FUZZ
@given(batch=st.lists(frames, min_size=1, max_size=5))
def test_random_ws_frames_get_error_frames_not_a_dead_socket(served: Served, batch: list[dict[str, object]]) -> None:
    from httpx_ws import connect_ws

    served.runtime.reject = REFUSE
    headers = {"Authorization": f"Bearer {served.api_key}"}
    with httpx.Client() as client, connect_ws(served.base_url.replace("http", "ws") + "/v1/ws", client, headers=headers) as ws:
        assert ws.receive_json()["type"] == "ready"
        for frame in batch:
            ws.send_json(frame)
            reply = ws.receive_json()
            assert reply["type"] == "error", reply
            assert reply["status"] in ALLOWED | {401, 409}, reply


def test_deeply_nested_bodies_are_400(served: Served) -> None:
    served.runtime.reject = REFUSE
    headers = {"Authorization": f"Bearer {served.api_key}", "Content-Type": "application/json"}
    for depth in (1000, 100_000):  # msgspec's decoder recurses per level: past ~1000 it hit the stack limit
        body = b'{"model": "%s", "prompt": "hi", "x": ' % MODEL.encode() + b"[" * depth + b"]" * depth + b"}"
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = httpx.post(served.base_url + path, content=body, headers=headers)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json"), (depth, path, r.text)
