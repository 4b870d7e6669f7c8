"""Beam search through the whole stack: the official openai package (`best_of` and
`extra_body`), plain HTTP, SSE, the response cache, usage, and the 400s."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
import torch
import trio

from clients import LmgateClient
from gateway.config import GatewayConfig
from gpu.config import CacheConfig, EngineConfig
from gpu.engine import Engine, generate
from gpu.sampling import SamplingParams
from tests.conftest import serve_real

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]

PROMPT = "Write a haiku about the sea."


async def test_beam_search_is_served_like_the_engine_runs_it(nursery: trio.Nursery, tmp_path,  # type: ignore[no-untyped-def]
                                                             redis_url: str) -> None:
    torch.set_num_threads(2)
    config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm",
                           shutdown_grace_seconds=1, dtype="float32", kv_cache_mb=64, max_num_seqs=16)
    urls, key, stop = await serve_real(nursery, config)

    engine = Engine(EngineConfig(dtype="float32", cache=CacheConfig(cache_bytes=32 * 1024**2)))
    prompt_ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True))
    decoded = engine.counters["generated_tokens"]
    [want] = generate(engine, [prompt_ids], SamplingParams(use_beam_search=True, n=2, best_of=4, max_tokens=24))
    decoded = engine.counters["generated_tokens"] - decoded  # every beam's tokens, not only the 2 returned
    narrow_decoded = engine.counters["generated_tokens"]
    generate(engine, [prompt_ids], SamplingParams(use_beam_search=True, n=2, best_of=4, max_tokens=12))
    narrow_decoded = engine.counters["generated_tokens"] - narrow_decoded
    [best] = generate(engine, [prompt_ids], SamplingParams(use_beam_search=True, best_of=3, max_tokens=24))
    del engine

    sdk = openai.OpenAI(base_url=urls[0] + "/v1", api_key=key, max_retries=0)
    model = (await trio.to_thread.run_sync(sdk.models.list)).data[0].id

    def sdk_chat():  # the 2 best of 4 beams
        return sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, n=2,
            extra_body={"use_beam_search": True, "best_of": 4})

    reply = await trio.to_thread.run_sync(sdk_chat)
    assert [c.message.content for c in reply.choices] == [c.text for c in want]
    assert [c.finish_reason for c in reply.choices] == [c.finish_reason for c in want]
    # billed as OpenAI bills best_of: every token the 4 beams decoded
    assert reply.usage.completion_tokens == decoded > sum(len(c.token_ids) for c in want)

    def sdk_completion():  # completions takes `best_of` as an OpenAI parameter
        return sdk.completions.create(model=model, prompt=PROMPT, max_tokens=8, best_of=2,
                                      extra_body={"use_beam_search": True, "early_stopping": True})

    completion = await trio.to_thread.run_sync(sdk_completion)
    assert len(completion.choices) == 1 and completion.choices[0].text

    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
                "use_beam_search": True, "best_of": 3}
        first = await http.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text
        assert first.json()["choices"][0]["message"]["content"] == best[0].text
        # deterministic, so a repeat is answered from the response cache
        again = await http.post("/v1/chat/completions", json=body)
        assert again.json()["choices"][0]["message"]["content"] == best[0].text
        metrics = (await http.get("/metrics")).text
        assert re.search(r'lmgate_response_cache_lookups_total\{result="hit"\} 1\.0', metrics), metrics

        for bad, param in [({"top_p": 0.5}, "top_p"), ({"best_of": 1, "n": 2}, "best_of"),
                           ({"early_stopping": "sometimes"}, "early_stopping"), ({"logprobs": True,
                                                                                   "top_logprobs": 2}, "top_logprobs")]:
            r = await http.post("/v1/chat/completions", json={**body, **bad})
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["param"] == param
        r = await http.post("/v1/chat/completions", json={**body, "best_of": 17})  # --max-num-seqs 16
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
        assert "17 beams; this server runs at most 16 sequences" in r.json()["error"]["message"]

        # a tenant's quota holds max_tokens x best_of for a beam search, and is charged what the beams ran
        admin = {"Authorization": "Bearer adm"}
        await http.post("/admin/tenants", headers=admin, json={
            "id": "beams", "name": "beams", "quota": {"tokens_per_minute": len(prompt_ids) + 4 * 12 + 8}})
        tkey = (await http.post("/admin/tenants/beams/keys", headers=admin, json={})).json()["key"]
        theirs = {"Authorization": f"Bearer {tkey}", "Cache-Control": "no-cache"}
        prompt = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24}
        wide = await http.post("/v1/chat/completions", headers=theirs,
                               json={**prompt, "n": 2, "use_beam_search": True, "best_of": 4})
        assert wide.status_code == 429, wide.text  # the prompt and 4 beams x 24 tokens cannot fit its minute
        assert "tokens_per_minute" in wide.json()["error"]["message"]
        narrow = await http.post("/v1/chat/completions", headers=theirs,
                                 json={**prompt, "max_tokens": 12, "n": 2, "use_beam_search": True, "best_of": 4})
        assert narrow.status_code == 200, narrow.text
        billed = narrow.json()["usage"]
        assert billed["completion_tokens"] == narrow_decoded
        usage = (await http.get("/admin/tenants/beams/usage", headers=admin)).json()["data"]
        assert [(u["prompt_tokens"], u["completion_tokens"]) for u in usage] == [
            (billed["prompt_tokens"], billed["completion_tokens"])]

    async with LmgateClient(urls[0], key) as client:
        # a stream carries each beam's whole text at the end (no prefix is final before)
        async with client.chat_stream([{"role": "user", "content": PROMPT}], max_tokens=24, use_beam_search=True,
                                       best_of=3, cache_control="no-cache") as stream:
            deltas = [d.text async for d in stream]
        assert "".join(deltas) == best[0].text
        assert len([d for d in deltas if d]) == 1
    stop.set()
