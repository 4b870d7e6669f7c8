"""vLLM's tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info) over real sockets,
with the bundled model's tokenizer, as lm-evaluation-harness's remote tokenizer calls them."""

from __future__ import annotations

import httpx
import pytest
import trio

from gpu.loader import bundled_gguf_path
from gpu.tokenizer import load_tokenizer
from tests.gateway.conftest import MODEL, Gateway


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(bundled_gguf_path())


@pytest.fixture
def client_of(gateway: Gateway, tokenizer):
    gateway.runtime.tokenizer = tokenizer  # the fake runtime has none of its own

    def make(**headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=gateway.base_url, headers={**gateway.headers, **headers})

    return make


async def test_tokenize_and_detokenize_round_trip(client_of, tokenizer) -> None:
    async with client_of() as client:
        r = await client.post("/tokenize", json={"prompt": "Hello world, héllo!", "add_special_tokens": False})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tokenizer.encode("Hello world, héllo!")
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 2048
        assert body["token_strs"] is None
        r = await client.post("/detokenize", json={"tokens": body["tokens"], "model": MODEL})
        assert r.json() == {"prompt": "Hello world, héllo!"}
        r = await client.post("/tokenize", json={"prompt": "Hi there", "return_token_strs": True})
        assert r.json()["token_strs"] == ["Hi", "Ġthere"]


async def test_tokenize_messages_with_the_chat_template(client_of, tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    async with client_of() as client:
        r = await client.post("/tokenize", json={"messages": messages})
    assert r.json()["tokens"] == tokenizer.render_and_encode(messages)


async def test_tokenize_counts_the_tools_a_chat_request_adds(client_of, tokenizer) -> None:
    """With tool calling, chat completions describe the tools in the system message:
    /tokenize renders the same messages, so a client can size its context."""
    from gateway.routes_openai import chat_messages
    from gateway.tools import tool_calling

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    async with client_of() as client:
        r = await client.post("/tokenize", json={"messages": history, "tools": tools, "tool_choice": "required"})
        plain = await client.post("/tokenize", json={"messages": history})
        orphan = await client.post("/tokenize", json={"messages": [{"role": "tool", "tool_call_id": "x",
                                                                     "content": "sunny"}]})
        auto = await client.post("/tokenize", json={"messages": history, "tools": tools})
        prompt_tools = await client.post("/tokenize", json={"prompt": "hi", "tools": tools})
        before_the_tool = await client.post("/tokenize", json={"messages": history[:2]})  # its call not run yet
        unanswered = await client.post("/tokenize", json={"messages": history[:2] + history[:1]})
        continued = await client.post("/tokenize", json={"messages": history[:1] + [{"role": "assistant", "content": "It"}],
                                                         "tools": tools, "add_generation_prompt": False,
                                                         "continue_final_message": True})
    import msgspec

    from gateway.routes_openai import ChatMessageIn

    msgs = chat_messages(msgspec.convert(history, list[ChatMessageIn]), tool_calling(tools, "required", None))
    assert r.json()["tokens"] == tokenizer.render_and_encode([{"role": m.role, "content": m.content} for m in msgs])
    assert r.json()["count"] > plain.json()["count"]
    assert "get_weather" in tokenizer.decode(r.json()["tokens"])
    assert orphan.status_code == 400 and orphan.json()["error"]["param"] == "messages"  # as on chat completions
    # a history may end on calls not run yet (vLLM's /tokenize counts it); not go on past them
    assert before_the_tool.status_code == 200 and before_the_tool.json()["count"] < plain.json()["count"]
    assert unanswered.status_code == 400 and "did not have response messages: c1" in unanswered.text
    assert prompt_tools.status_code == 400 and prompt_tools.json()["error"]["param"] == "tools"  # as on completions
    assert continued.status_code == 400 and continued.json()["error"]["param"] == "continue_final_message"  # as chat
    # auto (the default with tools) reads the history in SmolLM2's format: the call between
    # markers, the tool's answer a user turn inside <tool_response>
    auto_text = tokenizer.decode(auto.json()["tokens"])
    assert auto.status_code == 200 and '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>' \
        in auto_text and "user\n<tool_response>\nsunny\n</tool_response>" in auto_text


async def test_tokenizer_info_is_what_a_remote_tokenizer_needs(client_of, tokenizer) -> None:
    async with client_of() as client:
        info = (await client.get("/tokenizer_info")).json()
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>"
    assert info["chat_template"] == tokenizer.chat_template
    assert info["model_max_length"] == 2048 and info["vocab_size"] == tokenizer.vocab_size


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "prompt"),
    ("/tokenize", {"prompt": 3}, 400, None),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {}, 400, None),
])
async def test_bad_input_is_an_openai_error(client_of, path: str, body: dict, status: int, param: str | None) -> None:
    async with client_of() as client:
        r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert r.json()["error"]["param"] == param


async def test_they_need_an_api_key(client_of) -> None:
    async with client_of(Authorization="Bearer wrong") as client:
        for r in [await client.post("/tokenize", json={"prompt": "x"}), await client.get("/tokenizer_info"),
                  await client.post("/detokenize", json={"tokens": [1]})]:
            assert r.status_code == 401



class _WhereDecoded:
    """The tokenizer, noting for each decode whether it ran on the event loop."""

    def __init__(self, inner) -> None:
        self.inner, self.on_loop = inner, []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def decode(self, *args, **kwargs):
        try:
            trio.lowlevel.current_task()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        return self.inner.decode(*args, **kwargs)


async def test_a_long_list_of_ids_is_decoded_off_the_event_loop(gateway: Gateway, tokenizer) -> None:
    """0.7 MB of ids decode to 4.5 MB of text in a quarter of a second: /detokenize held the
    event loop (every stream) that long, where /tokenize moves long bodies to a thread."""
    gateway.runtime.tokenizer = recording = _WhereDecoded(tokenizer)
    ids = tokenizer.encode("Hello world, héllo!")
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=gateway.headers) as client:
        short = await client.post("/detokenize", json={"tokens": ids})
        long = await client.post("/detokenize", json={"tokens": ids * 1500})
    assert short.json() == {"prompt": "Hello world, héllo!"}
    assert long.status_code == 200 and long.json()["prompt"] == "Hello world, héllo!" * 1500
    assert recording.on_loop == [True, False]
