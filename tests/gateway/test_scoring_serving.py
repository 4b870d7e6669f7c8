"""Scoring text through the whole stack, as lm-evaluation-harness's `local-completions`
does it: the server's tokenizer (/tokenizer_info, /tokenize), then a batch of token-id
prompts with `echo`, `logprobs` 1 and `max_tokens` 1, each prompt token's logprob as the
engine computes it; `max_tokens` 0 scores without generating; SSE streams the same."""

from __future__ import annotations

import functools
import itertools
import json
import re
from operator import itemgetter

import httpx
import openai
import pytest
import torch
import trio

from gateway.config import GatewayConfig
from gateway.sse import parse_events
from gpu.config import CacheConfig, EngineConfig
from gpu.engine import Engine, generate
from gpu.sampling import SamplingParams
from tests.conftest import serve_real

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]

CONTEXTS = ["Question: What is the capital of France?\nAnswer:", "The sun rises in the"]
CONTINUATIONS = [[" Paris", " London"], [" east", " west"]]


def lm_eval_parse(response: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-evaluation-harness's `LocalCompletionsAPI.parse_logprobs`: the continuation's
    summed logprob (the last, generated token excluded) and whether it is the greedy one."""
    res = []
    for choice, ctxlen in zip(sorted(response["choices"], key=itemgetter("index")), ctxlens, strict=True):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops, strict=True))))
    return res


async def test_scoring_like_lm_evaluation_harness(nursery: trio.Nursery, tmp_path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    urls, key, stop = await serve_real(nursery, GatewayConfig(
        port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm", shutdown_grace_seconds=1,
        dtype="float32", kv_cache_mb=64))

    engine = Engine(EngineConfig(dtype="float32", cache=CacheConfig(cache_bytes=32 * 1024**2)))
    tok = engine.tokenizer
    requests = [(tok.encode(c), tok.encode(c + x)) for c, xs in zip(CONTEXTS, CONTINUATIONS, strict=True) for x in xs]
    prompts = [whole for _, whole in requests]
    ctxlens = [len(ctx) for ctx, _ in requests]
    for ctx, whole in requests:
        assert whole[: len(ctx)] == ctx  # the continuation starts a new token here
    want = generate(engine, prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    texts = [tok.decode(p, skip_special_tokens=False) for p in prompts]
    del engine

    sdk = openai.OpenAI(base_url=urls[0] + "/v1", api_key=key, max_retries=0)
    model = (await trio.to_thread.run_sync(sdk.models.list)).data[0].id

    def score():  # lm-evaluation-harness's loglikelihood payload
        return sdk.completions.create(model=model, prompt=prompts, temperature=0, max_tokens=1, logprobs=1,
                                      seed=1234, echo=True)

    reply = (await trio.to_thread.run_sync(score)).model_dump()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    for choice, [ref], text, ids in zip(reply["choices"], want, texts, prompts, strict=True):
        lp = choice["logprobs"]
        assert choice["text"] == text + ref.text
        assert len(lp["tokens"]) == len(ids) + 1  # the prompt's tokens, then the generated one
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:-1] == pytest.approx([x for x, *_ in ref.prompt_logprobs[1:]], abs=1e-3)
        assert [next(iter(t)) for t in lp["top_logprobs"][1:-1]] == [
            tok.decode([top[0][0]], skip_special_tokens=False) for _, top, _ in ref.prompt_logprobs[1:]]
        assert lp["text_offset"][0] == 0 and lp["text_offset"][-1] == len(text)
    assert reply["usage"]["prompt_tokens"] == sum(map(len, prompts))
    assert reply["usage"]["completion_tokens"] == 4
    scores = lm_eval_parse(reply, ctxlens)
    ref_scores = [sum(x for x, *_ in ref.prompt_logprobs[c:]) for [ref], c in zip(want, ctxlens, strict=True)]
    assert [s for s, _ in scores] == pytest.approx(ref_scores, abs=1e-3)
    assert scores[0][0] > scores[1][0]  # Paris is likelier than London
    assert scores[2][0] > scores[3][0]  # and the east than the west

    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        # the harness's remote tokenizer: /tokenizer_info, then /tokenize for the token ids it sends
        info = (await http.get("/tokenizer_info")).json()
        assert info["eos_token"] and info["chat_template"]
        r = await http.post("/tokenize", json={"prompt": CONTEXTS[0] + CONTINUATIONS[0][0], "add_special_tokens": False})
        assert r.json()["tokens"] == prompts[0]
        # max_tokens 0: the prompts alone, scored; nothing generated or billed as completion
        r = await http.post("/v1/completions", json={"model": model, "prompt": prompts[:2], "max_tokens": 0,
                                                     "echo": True, "logprobs": 0})
        assert r.status_code == 200, r.text
        zero = r.json()
        assert [c["text"] for c in zero["choices"]] == texts[:2]
        assert zero["usage"]["completion_tokens"] == 0
        for choice, full in zip(zero["choices"], reply["choices"][:2], strict=True):
            assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
                full["logprobs"]["token_logprobs"][1:-1], abs=1e-3)
            assert choice["logprobs"]["top_logprobs"][1:] == [{}] * (len(choice["logprobs"]["tokens"]) - 1)
        # streamed: the echoed prompt and its logprobs come in each choice's first chunk
        r = await http.post("/v1/completions", json={"model": model, "prompt": prompts[2:], "max_tokens": 1,
                                                     "echo": True, "logprobs": 1, "stream": True, "temperature": 0})
        chunks = [json.loads(p) for p in parse_events(r.text)[:-1]]
        streamed: dict[int, list] = {}
        for chunk in chunks:
            for c in chunk["choices"]:
                if c["logprobs"] is not None:
                    streamed.setdefault(c["index"], []).extend(c["logprobs"]["token_logprobs"])
        assert [streamed[i][1:] for i in (0, 1)] == [pytest.approx(c["logprobs"]["token_logprobs"][1:], abs=1e-3)
                                                     for c in reply["choices"][2:]]
        # a scoring request is never answered from the response cache (it keeps no prompt logprobs)
        metrics = (await http.get("/metrics")).text
        assert not re.search(r'lmgate_response_cache_lookups_total\{result="hit"\} [1-9]', metrics)
        assert re.search(r'lmgate_requests_total\{outcome="ok",tenant="dev"\} 8\.0', metrics), metrics

        # vLLM's prompt_logprobs: per prompt token its logprob, rank and the k likeliest there
        r = await http.post("/v1/completions", json={"model": model, "prompt": prompts[:2], "max_tokens": 0,
                                                     "echo": True, "logprobs": 3})
        assert "prompt_logprobs" not in r.json()["choices"][0]  # only when asked for
        r = await http.post("/v1/completions", json={"model": model, "prompt": prompts[0], "max_tokens": 0,
                                                     "prompt_logprobs": 0, "echo": True, "logprobs": 3})
        assert all(len(e) == 1 for e in r.json()["choices"][0]["prompt_logprobs"][1:])  # its own k, not echo's
        r = await http.post("/v1/completions", json={"model": model, "prompt": prompts[:2], "max_tokens": 0,
                                                     "prompt_logprobs": 2, "echo": True, "logprobs": 1})
        assert r.status_code == 200, r.text
        for choice, ids, [ref] in zip(r.json()["choices"], prompts[:2], want[:2], strict=True):
            assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"][1:])  # echo: its own k
            got = choice["prompt_logprobs"]
            assert len(got) == len(ids) and got[0] is None
            for i, (entry, (ref_lp, _, ref_rank)) in enumerate(zip(got[1:], ref.prompt_logprobs[1:], strict=True)):
                mine = entry[str(ids[i + 1])]
                assert mine["logprob"] == pytest.approx(ref_lp, abs=1e-3)
                assert mine["decoded_token"] == tok.decode([ids[i + 1]], skip_special_tokens=False)
                assert abs(mine["rank"] - ref_rank) <= 2  # another batch: the deep tail's near-ties may swap
                others = [v["rank"] for k, v in entry.items() if k != str(ids[i + 1])]
                assert sorted(others if len(entry) == 3 else [*others, mine["rank"]]) == [1, 2]  # the top 2
                by_rank = [v["logprob"] for v in sorted(entry.values(), key=itemgetter("rank"))]
                assert all(a >= b - 1e-6 for a, b in itertools.pairwise(by_rank))
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                "prompt_logprobs": 0}
        r = await http.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] and body["prompt_logprobs"][0] is None
        assert all(len(e) == 1 and next(iter(e.values()))["rank"] >= 1 for e in body["prompt_logprobs"][1:])
        assert "prompt_logprobs" not in body["choices"][0]
        r = await http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1, "echo": True,
                                                     "prompt_logprobs": 1})
        assert r.json()["choices"][0]["logprobs"] is None  # echo without logprobs: the text alone
        # a token that is part of a character decodes as vLLM's tokenizer.decode([id]) does
        ids = tok.encode("日本語のテキスト")
        r = await http.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 0,
                                                     "prompt_logprobs": 0})
        decoded = [next(iter(e.values()))["decoded_token"] for e in r.json()["choices"][0]["prompt_logprobs"][1:]]
        assert decoded == [tok.decode([i], skip_special_tokens=False) for i in ids[1:]]
        assert any("\ufffd" in d for d in decoded)
        for bad in ({**chat, "stream": True}, {**chat, "prompt_logprobs": 21}, {**chat, "prompt_logprobs": -1}):
            r = await http.post("/v1/chat/completions", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text

        # quotas: a batch is k requests. One refused mid-way aborts the accepted ones, and the
        # refusal goes out with their slots free again; one that could never fit is a 400
        async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": "Bearer adm"}) as admin:
            r = await admin.put("/admin/tenants/dev/quota", json={"max_concurrent": 3})
            assert r.status_code == 200, r.text
        long = {"model": model, "prompt": "Count to a thousand:", "max_tokens": 300, "ignore_eos": True}
        async with trio.open_nursery() as inner:
            inner.start_soon(functools.partial(http.post, "/v1/completions", json=long))
            await trio.sleep(1.0)  # it holds one of the 3 slots
            r = await http.post("/v1/completions", json={"model": model, "prompt": prompts[:3], "max_tokens": 1})
            assert r.status_code == 429, r.text  # the third prompt found no slot
            r = await http.post("/v1/completions", json={"model": model, "prompt": prompts[:2], "max_tokens": 1})
            assert r.status_code == 200, r.text  # the two aborted ones' slots were free again
            r = await http.post("/v1/completions", json={"model": model, "prompt": prompts, "max_tokens": 1})
            assert r.status_code == 400 and "at most 3" in r.json()["error"]["message"]
            inner.cancel_scope.cancel()
    stop.set()
