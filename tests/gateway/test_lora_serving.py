"""LoRA adapters through the whole stack: `lmgate serve` settings, `/v1/models`, a request
naming an adapter as its `model` over HTTP, SSE and the WebSocket, the response cache and
usage kept apart per adapter, and the refusals (unknown model, unservable adapter)."""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch
import trio

from clients import LmgateClient
from gateway.config import ConfigError, GatewayConfig
from gpu.loader import load_checkpoint
from gpu.tokenizer import load_tokenizer
from tests.conftest import serve_real

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]

QUESTION = "What is the capital of France?"


async def test_adapters_are_served_by_name_beside_the_base_model(nursery: trio.Nursery, tmp_path, redis_url: str,
                                                                 lora_reference, caplog) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    adapters = tmp_path / "adapters"  # --lora-dir: "two", and a broken one; "one" is configured by path
    shutil.copytree(lora_reference.paths["two"], adapters / "two")
    (adapters / "broken").mkdir()
    (adapters / "broken" / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "use_dora": true}')
    config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm",
                           shutdown_grace_seconds=1, dtype="float32", kv_cache_mb=64,
                           lora_modules=f"one={lora_reference.paths['one']}", lora_dir=str(adapters))
    urls, key, stop = await serve_real(nursery, config)
    tokenizer = load_tokenizer(load_checkpoint("smollm2", torch.float32))
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                         add_generation_prompt=True))

    def reference(adapter: str | None) -> str:
        return tokenizer.decode(lora_reference.greedy(ids, adapter, 12), skip_special_tokens=True)

    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        models = (await http.get("/v1/models")).json()["data"]
        base = models[0]["id"]
        # "broken" is not listed (its configuration asks for DoRA); a request naming it gets why
        assert [(m["id"], m.get("parent")) for m in models] == [(base, None), ("one", base), ("two", base),
                                                                  ("all-MiniLM-L6-v2", None)]  # embeddings

        async def ask(model: str) -> dict:
            r = await http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12,
                "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()

        # the base model first: its greedy answer is stored in the response cache, and must not
        # come back for the same prompt and parameters asked of an adapter
        assert (await ask(base))["choices"][0]["message"]["content"] == reference(None)
        for name in ("one", "two"):
            reply = await ask(name)
            assert reply["model"] == name
            assert reply["choices"][0]["message"]["content"] == reference(name) != reference(None)

        async with LmgateClient(urls[0], key) as client:
            async with client.chat_stream([{"role": "user", "content": QUESTION}], model="two", max_tokens=12,
                                          temperature=0, cache_control="no-cache") as stream:
                assert "".join([d.text async for d in stream]) == reference("two")
            async with client.ws() as session, session.chat_stream(
                    [{"role": "user", "content": QUESTION}], model="one", max_tokens=12, temperature=0,
                    cache_control="no-cache") as ws_stream:
                assert "".join([d.text async for d in ws_stream]) == reference("one")

        r = await http.post("/v1/chat/completions", json={"model": "three", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "'one'" in r.json()["error"]["message"]
        r = await http.post("/v1/completions", json={"model": "broken", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "model" and "DoRA" in error["message"] and str(tmp_path) not in error["message"]
        # the server log has the file and why, once a minute (any tenant may name it at its request rate)
        assert (await http.post("/v1/completions", json={"model": "broken", "prompt": "hi"})).status_code == 400
        said = [r.getMessage() for r in caplog.records if "cannot be served" in r.getMessage()]
        assert len(said) == 1 and str(tmp_path) in said[0], said

        async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": "Bearer adm"}) as admin:
            usage = (await admin.get("/admin/tenants/dev/usage")).json()["data"]
        by_model = {row["model"]: row for row in usage}
        assert {base, "one", "two"} <= set(by_model)  # usage is kept per adapter

        status = (await http.get("/readyz")).json()
        assert status["kv_usage"] == 0.0
        metrics = (await http.get("/metrics")).text
        assert 'lmgate_lora_adapter_loads_total{kind="load"} 2.0' in metrics
        assert "lmgate_lora_adapters_loaded 2.0" in metrics
    stop.set()


async def test_an_adapter_replaced_while_a_request_waits_is_cached_as_the_version_it_ran(  # type: ignore[no-untyped-def]
        nursery: trio.Nursery, tmp_path, redis_url: str, lora_reference) -> None:
    """A request waits in the queue; its adapter's files are replaced meanwhile: it runs the
    new files (what the engine reads when it takes the request) and its answer is cached as
    the new version's. It was cached under the version admission saw, so once the old files
    were back (a rollback, or another replica still on them) the old version's requests got
    the new version's answer from the cache."""
    torch.set_num_threads(2)
    adapters = tmp_path / "adapters"
    shutil.copytree(lora_reference.paths["one"], adapters / "swp")
    config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm",
                           shutdown_grace_seconds=1, dtype="float32", kv_cache_mb=64, max_num_seqs=1,
                           lora_dir=str(adapters), embedding_model="none")
    urls, key, stop = await serve_real(nursery, config)
    tokenizer = load_tokenizer(load_checkpoint("smollm2", torch.float32))
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                         add_generation_prompt=True))

    def reference(adapter: str) -> str:
        return tokenizer.decode(lora_reference.greedy(ids, adapter, 12), skip_special_tokens=True)

    def swap_to(name: str) -> None:
        for f in lora_reference.paths[name].iterdir():
            shutil.copyfile(f, adapters / "swp" / f.name)

    body = {"model": "swp", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, "temperature": 0}
    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        queued: dict[str, str] = {}

        async def ask_queued() -> None:
            r = await http.post("/v1/chat/completions", json=body)
            queued["text"] = r.json()["choices"][0]["message"]["content"]

        async with http.stream("POST", "/v1/completions", json={  # holds the one engine slot
                "model": "SmolLM2-135M-Instruct", "prompt": "Once", "max_tokens": 500, "ignore_eos": True,
                "stream": True}) as long:
            assert long.status_code == 200
            chunks = long.aiter_bytes()  # (kept: dropped, it would close the stream)
            await chunks.__anext__()
            async with trio.open_nursery() as waiting:
                waiting.start_soon(ask_queued)
                with trio.fail_after(60):  # admitted (its adapter read), waiting for the slot
                    while "lmgate_num_requests_waiting 1.0" not in (await http.get("/metrics")).text:
                        await trio.sleep(0.05)
                swap_to("two")  # while it waits
                await long.aclose()  # the slot frees: it runs
        assert queued["text"] == reference("two") != reference("one")
        swap_to("one")  # rolled back: the cache must not answer with "two"'s text
        r = await http.post("/v1/chat/completions", json=body)
        assert r.json()["choices"][0]["message"]["content"] == reference("one")
    stop.set()


async def test_max_loras_caps_the_adapters_in_the_engine_at_once(nursery: trio.Nursery, tmp_path, redis_url: str,
                                                                lora_reference) -> None:  # type: ignore[no-untyped-def]
    """vLLM's max_loras: at 1, a request of a second adapter waits (counted as waiting)
    until the first adapter's request is done, while a base-model request runs beside it;
    a waiting request cancelled by its client ends where it stands. (Every running
    request's adapter was in memory, whatever max_loras said.)"""
    torch.set_num_threads(2)
    config = GatewayConfig(port=0, data_dir=str(tmp_path), redis_url=redis_url, admin_key="adm",
                           shutdown_grace_seconds=1, dtype="float32", kv_cache_mb=64, max_loras=1,
                           max_num_seqs=3,  # "one" runs, two "two" wait: their slots stay open to the base model
                           lora_modules=f"one={lora_reference.paths['one']},two={lora_reference.paths['two']}")
    urls, key, stop = await serve_real(nursery, config)
    ended: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
        base = (await http.get("/v1/models")).json()["data"][0]["id"]

        async def ask(name: str, model: str, tokens: int) -> None:
            r = await http.post("/v1/completions", json={
                "model": model, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True}, headers={"Cache-Control": "no-store, no-cache"})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens, r.text
            ended[name] = trio.current_time()

        first = trio.Event()

        async def long_one() -> None:
            async with http.stream("POST", "/v1/completions", json={
                    "model": "one", "prompt": "Once upon a time", "max_tokens": 96, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        first.set()
            ended["one"] = trio.current_time()

        base_done = trio.Event()

        async def cancelled_two() -> None:
            async with trio.open_nursery() as inner:  # gone while it waits (once the base request is done)

                async def cancel_then() -> None:
                    await base_done.wait()
                    inner.cancel_scope.cancel()

                inner.start_soon(cancel_then)
                await http.post("/v1/completions", json={"model": "two", "prompt": "Hi", "max_tokens": 50})
                raise AssertionError("it ran before it was cancelled")

        async def ask_base() -> None:
            await ask("base", base, 2)
            base_done.set()

        async with trio.open_nursery() as requests:
            requests.start_soon(long_one)
            await first.wait()
            requests.start_soon(cancelled_two)
            requests.start_soon(ask, "two", "two", 2)
            with trio.fail_after(60):
                while "lmgate_num_requests_waiting 2.0" not in (await http.get("/metrics")).text:
                    await trio.sleep(0.05)  # the two "two" requests wait
            requests.start_soon(ask_base)  # and a base-model request after them does not
        assert ended["base"] < ended["one"] < ended["two"], ended
        metrics = (await http.get("/metrics")).text
        assert "lmgate_num_requests_waiting 0.0" in metrics and "lmgate_num_requests_running 0.0" in metrics
        async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": "Bearer adm"}) as admin:
            usage = {row["model"]: row for row in (await admin.get("/admin/tenants/dev/usage")).json()["data"]}
        assert usage["two"]["requests"] == 1  # the cancelled one never ran
    stop.set()


def test_lora_settings_are_checked_before_the_server_starts(lora_reference, tmp_path) -> None:
    one = lora_reference.paths["one"]
    config = GatewayConfig(lora_modules=f" one={one} , two={lora_reference.paths['two']}")
    assert config.lora_module_pairs == (("one", str(one)), ("two", str(lora_reference.paths["two"])))
    for bad, message in [("one", "not NAME=PATH"), (f"../x={one}", "adapter name"),
                         (f"one={one},one={one}", "unique"), (f"one={tmp_path}", "no adapter_config.json")]:
        with pytest.raises(ConfigError, match=message):
            GatewayConfig(lora_modules=bad)
    with pytest.raises(ConfigError, match="not a folder"):
        GatewayConfig(lora_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not batch-invariant"):
        GatewayConfig(lora_dir=str(tmp_path), batch_invariant=True)
    with pytest.raises(ConfigError, match="at least 1"):
        GatewayConfig(max_loras=0)
