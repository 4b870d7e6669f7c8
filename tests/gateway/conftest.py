"""Gateway test harness: a fake runtime that follows the Runtime contract, a real
private Redis (the cache helper's fixtures), and the real app served by Hypercorn
on a free loopback port inside the test's trio run.

The fake runtime is the only stand-in: it is the thing *not* under test here
(the real one is exercised by the integration tests). It produces deterministic
words, records every call and every cancel, and can be told to reject.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import trio

from actors.messages import (
    Accepted,
    Failed,
    Finished,
    GenerateCall,
    PromptLogprob,
    Rejected,
    TokenDelta,
    TopLogprob,
    Usage,
)
from actors.metrics import Metrics
from cache.quotas import QuotaManager
from cache.store import RedisStore
from cache.tenants import TenantRegistry
from gateway.app import GatewayStores, create_app
from gateway.config import GatewayConfig
from gateway.server import serve_app
from tests.conftest import SECRET

MODEL = "fake-model"
ADMIN_KEY = "admin-secret-key"


def word(index: int, j: int) -> str:
    """The j-th piece of text the fake runtime produces for choice `index`."""
    return f" c{index}w{j}"


class FakeRuntime:
    """Runtime contract stand-in (model_name, max_model_len, submit, status, count_rejection, metrics, registry).

    Each accepted request streams `max_tokens` words per choice (``word(i, j)``),
    `delay` seconds apart, then Finished("length"). A prompt containing "FAIL"
    fails after one token ("GONE": a 503 shutting_down, as at a shutdown); "HANG" streams one token and then waits forever,
    "SILENT" waits forever before the first token (for disconnect tests), "CUT" closes the stream after
    one token without an end. `reject` (a Rejected template) refuses the next submits.
    """

    model_name = MODEL
    model_aliases = frozenset({MODEL, "fake-alias"})  # as a real one started with `--model fake-alias`
    max_model_len = 2048

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.metrics = Metrics()  # (as the real runtime's: its registry is the metrics')
        self.registry = self.metrics.registry
        self.calls: list[GenerateCall] = []
        self.cancelled: set[str] = set()
        self.refunded: set[str] = set()  # cancelled with their quota given back (`Accepted.refund`)
        self.finished: set[str] = set()
        self.cancel_events: dict[str, trio.Event] = {}
        self.reject: Rejected | None = None
        self.reject_after: int | None = None  # with `reject`: refuse only after this many calls
        self.ready = True
        self.delay = 0.0
        self.rate_limits: Any = None  # what each Accepted reports (cache.quotas.RateLimits)
        self.rejections: list[tuple[str, int, str]] = []  # what the gateway counted (`count_rejection`)

    def served_models(self) -> list[str]:
        return [MODEL]

    def serves(self, model: str) -> bool:
        return model in self.model_aliases

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready, "degraded": [], "queue_len": 0, "running": 0, "kv_usage": 0.0}

    def count_rejection(self, tenant_id: str, status: int, reason: str) -> None:
        self.rejections.append((tenant_id, status, reason))

    def forget_tenants(self, tenant_ids: Collection[str]) -> None:
        self.metrics.forget_tenants(tenant_ids)

    async def submit(self, call: GenerateCall, sink: trio.MemorySendChannel | None = None) -> Accepted | Rejected:
        self.calls.append(call)
        if self.reject is not None and (self.reject_after is None or len(self.calls) > self.reject_after):
            return msgspec.structs.replace(self.reject, request_id=call.request_id)
        send, receive = (sink.clone(), None) if sink is not None else trio.open_memory_channel[Any](16)
        self.cancel_events[call.request_id] = trio.Event()

        def cancel() -> None:
            self.cancelled.add(call.request_id)
            self.cancel_events[call.request_id].set()

        self.nursery.start_soon(self._produce, call, send)
        prompt = call.prompt or " ".join(m.content for m in call.messages or [])
        prompt_tokens = len(call.prompt_token_ids) if call.prompt_token_ids else len(prompt.split())
        return Accepted(call.request_id, prompt_tokens, receive, cancel, rate_limits=self.rate_limits,
                        refund=lambda: self.refunded.add(call.request_id))

    def prompt_logprobs(self, call: GenerateCall) -> list[PromptLogprob] | None:
        """With `prompt_logprobs` k: per prompt word (its id its index), logprob -1 - index
        (None for the first), k alternatives "alt0".."alt{k-1}"."""
        k = call.params.prompt_logprobs
        if k is None:
            return None
        words = self.prompt_text(call).split(" ") if call.prompt_token_ids is None else [
            f"<{t}>" for t in call.prompt_token_ids]
        return [PromptLogprob(i, w if i == 0 else " " + w, None if i == 0 else -1.0 - i,
                              [] if i == 0 else [TopLogprob(900 + a, -0.1 - a, f"alt{a}") for a in range(k)])
                for i, w in enumerate(words)]

    def prompt_text(self, call: GenerateCall) -> str:
        return call.prompt or " ".join(m.content for m in call.messages or [])

    async def _produce(self, call: GenerateCall, send: trio.MemorySendChannel[Any]) -> None:
        text = self.prompt_text(call)
        n = call.params.n
        max_tokens = call.params.max_tokens or 8
        prompt_tokens = len(call.prompt_token_ids) if call.prompt_token_ids else len(text.split())
        try:
            async with send:
                if "SILENT" in text:
                    await trio.sleep_forever()
                for j in range(max_tokens):
                    for i in range(n):
                        lp = [-0.5] if call.params.logprobs is not None else None
                        # best first, not in alphabetical order: a response must keep that order
                        top = ([[TopLogprob(1, -0.5, "zeta"), TopLogprob(2, -1.5, "alpha")][:call.params.logprobs]]
                               if call.params.logprobs else None)
                        await send.send(TokenDelta(call.request_id, i, word(i, j), [100 * i + j], logprobs=lp,
                                                   top_logprobs=top,
                                                   prompt_logprobs=self.prompt_logprobs(call) if j == 0 else None))
                    if "FAIL" in text:
                        await send.send(Failed(call.request_id, 500, "engine_error", "the engine failed"))
                        return
                    if "GONE" in text:  # as the runtime ends a stream at a shutdown's grace end
                        await send.send(Failed(call.request_id, 503, "shutting_down", "server shutting down"))
                        return
                    if "HANG" in text:
                        await trio.sleep_forever()
                    if "CUT" in text:  # the stream closed without an end: a runtime bug's shape
                        return
                    await trio.sleep(self.delay)
                usage = Usage(prompt_tokens, max_tokens * n)
                await send.send(Finished(call.request_id, ["length"] * n, usage))
                self.finished.add(call.request_id)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the gateway closed the channel: the request was aborted


@dataclass
class Gateway:
    base_url: str
    ws_url: str
    runtime: FakeRuntime
    stores: GatewayStores
    config: GatewayConfig
    api_key: str
    tenant_id: str = "t1"
    headers: dict[str, str] = field(default_factory=dict)


async def start_gateway(
    nursery: trio.Nursery, stores: GatewayStores, config: GatewayConfig
) -> tuple[str, FakeRuntime, trio.Event]:
    runtime = FakeRuntime(nursery)
    app = create_app(runtime, stores, config)
    runtime.gateway_state = app.extensions["lmgate"]  # (for tests of what the server runs beside the routes)
    stop = trio.Event()
    urls = await nursery.start(lambda task_status: serve_app(app, config, shutdown_trigger=stop.wait, task_status=task_status))
    return urls[0], runtime, stop


@pytest.fixture
def gateway_config() -> GatewayConfig:
    return GatewayConfig(
        host="127.0.0.1",
        port=0,
        admin_key=ADMIN_KEY,
        max_body_bytes=64 * 1024,
        max_ws_frame_bytes=16 * 1024,
        max_streams_per_socket=4,
        shutdown_grace_seconds=0.5,
    )


@pytest.fixture
async def stores(store: Any) -> GatewayStores:
    return GatewayStores(redis=store, tenants=TenantRegistry(store, SECRET), quotas=QuotaManager(store))


@pytest.fixture
async def gateway(nursery: trio.Nursery, stores: GatewayStores, gateway_config: GatewayConfig) -> AsyncIterator[Gateway]:
    await stores.tenants.create_tenant("t1", "tenant one")
    _, key = await stores.tenants.create_key("t1", "test")
    base_url, runtime, stop = await start_gateway(nursery, stores, gateway_config)
    gw = Gateway(
        base_url=base_url,
        ws_url=base_url.replace("http://", "ws://") + "/v1/ws",
        runtime=runtime,
        stores=stores,
        config=gateway_config,
        api_key=key,
        headers={"Authorization": f"Bearer {key}"},
    )
    yield gw
    stop.set()


# ---------------------------------------------------------------- served from a thread
# For sync tests (hypothesis, or clients driven by anyio.run under trio *and* asyncio):
# the gateway runs in a background thread with its own trio loop.


@dataclass
class Served:
    base_url: str
    api_key: str
    runtime: FakeRuntime
    admin_key: str = ADMIN_KEY

    def cancelled_ids(self) -> set[str]:
        return set(self.runtime.cancelled)


def _serve_in_thread(url: str, ready: queue.Queue[Any], stop_box: dict[str, Any]) -> None:
    async def main() -> None:
        config = GatewayConfig(port=0, admin_key=ADMIN_KEY, max_streams_per_socket=8, shutdown_grace_seconds=0.2)
        async with RedisStore(url) as redis, trio.open_nursery() as nursery:
            stores = GatewayStores(redis, TenantRegistry(redis, SECRET), QuotaManager(redis))
            await stores.tenants.create_tenant("t1", "tenant one")
            _, key = await stores.tenants.create_key("t1", "test")
            base_url, runtime, stop = await start_gateway(nursery, stores, config)
            stop_box["stop"] = stop
            stop_box["token"] = trio.lowlevel.current_trio_token()
            ready.put(Served(base_url, key, runtime))
            await stop.wait()
            nursery.cancel_scope.deadline = trio.current_time() + 2

    try:
        trio.run(main)
    except BaseException as exc:  # report start-up failures to the test thread
        ready.put(exc)
        raise


@pytest.fixture
def served(redis_url: str) -> Iterator[Served]:
    ready: queue.Queue[Any] = queue.Queue()
    stop_box: dict[str, Any] = {}
    thread = threading.Thread(target=_serve_in_thread, args=(redis_url, ready, stop_box), daemon=True)
    thread.start()
    item = ready.get(timeout=20)
    if isinstance(item, BaseException):
        raise item
    yield item
    trio.from_thread.run_sync(stop_box["stop"].set, trio_token=stop_box["token"])
    thread.join(timeout=10)

