"""The Quart-Trio application: wiring of routes, auth, errors, health and metrics.

`create_app(runtime, store, config)` builds one app around explicitly injected
parts (no module globals): the actor runtime (`Runtime` below), the Redis-backed
stores (`GatewayStores`: tenants/keys, quotas/usage, the Redis handle for health)
and the frozen `GatewayConfig`. Everything a route needs hangs off one
`GatewayState`, passed to each blueprint factory.

Routes::

    POST /v1/completions, /v1/chat/completions   JSON or SSE (routes_openai)
    POST /v1/responses ...                       OpenAI's Responses API (routes_responses)
    POST /v1/embeddings                          the embedding model's vectors (routes_embeddings)
    POST /v1/score, /v1/rerank (+ vLLM's aliases)  its cosine similarities (routes_scoring)
    GET/POST /tokenizer_info /tokenize /detokenize   (routes_tokenizer)
    GET  /v1/models, /v1/models/<id>
    WS   /v1/ws                                  multiplexed token streaming (ws)
    *    /admin/...                              tenants, keys, quotas, usage (routes_admin)
    GET  /healthz /readyz /metrics /openapi.json
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import uuid
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import prometheus_client
import trio
from quart import Response, g, has_request_context, has_websocket_context, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers import TrioRequest

from actors.admission import TenantTurns, unknown_model_message
from actors.messages import Accepted, GenerateCall, Rejected, TenantContext
from actors.metrics import LATENCY_BUCKETS, UNAUTHENTICATED, Metrics, forget_label, label_values
from cache.quotas import QuotaManager, RateLimits
from cache.store import CacheUnavailable, RedisStore
from cache.tenants import Tenant, TenantRegistry, is_admin_key, may_use
from gateway.config import GatewayConfig
from gateway.cors import CorsPolicy
from gateway.errors import ApiError, install_error_handlers, log_failure
from gateway.responses_live import LiveResponses


class Runtime(Protocol):
    """What the gateway needs from the actor runtime (implemented in actors.runtime)."""

    model_name: str
    max_model_len: int
    registry: prometheus_client.CollectorRegistry
    metrics: Metrics  # its `render` formats /metrics (registry: its registry)

    # `sink`: an unbounded channel the request's events go to instead of `Accepted.events`
    # (None then); several requests of one API request share it (batched prompts)
    async def submit(self, call: GenerateCall, sink: Any = None) -> Accepted | Rejected: ...

    def served_models(self) -> list[str]: ...  # model_name, then LoRA adapters

    def serves(self, model: str) -> bool: ...  # a `model` a request may name

    # also read, where present: `embedding_model_name`, `embedding_aliases`, `embedding_dim`,
    # `embedding_max_tokens` and `embed(EmbedCall)` (actors.embeddings: /v1/embeddings), `tokenizer` (gpu.tokenizer.Tokenizer: logprobs' bytes,
    # completions' echo of token ids), `length_service` (actors.predictor.PredictorService, or
    # None when the Magnus predictor is not in use), for /admin/predictor

    def status(self) -> dict[str, Any]: ...

    # a request the gateway refused before admission (`lmgate_rejections_total`)
    def count_rejection(self, tenant_id: str, status: int, reason: str) -> None: ...

    # tenants were deleted: their series and fairness counters go
    def forget_tenants(self, tenant_ids: Collection[str]) -> None: ...


@dataclass(frozen=True)
class GatewayStores:
    """The Redis-backed parts the gateway uses directly (auth and the admin API)."""

    redis: RedisStore
    tenants: TenantRegistry
    quotas: QuotaManager


def tenant_context(tenant: Tenant) -> TenantContext:
    return TenantContext.from_tenant(tenant)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def request_id_of(header: str | None) -> str:
    """The id an HTTP request is known by (its `X-Request-Id` answer header, and the logs
    of its failure): the caller's own `X-Request-Id` when it sent a sane one (1-128 of
    letters, digits and `._:/+=-`: a proxy's or tracer's id then follows the request
    through), else a new `req_<hex>`."""
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header
    return "req_" + uuid.uuid4().hex


def _duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: "20ms", "1s", "6m0s"."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_limit_headers(limits: RateLimits) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the tenant's per-minute limits (only those set)."""
    out: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        limit = getattr(limits, f"limit_{kind}")
        if limit is None:
            continue
        out[f"x-ratelimit-limit-{kind}"] = str(limit)
        out[f"x-ratelimit-remaining-{kind}"] = str(getattr(limits, f"remaining_{kind}"))
        out[f"x-ratelimit-reset-{kind}"] = _duration(getattr(limits, f"reset_{kind}_s"))
    return out


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_one_authorization(headers: Any) -> None:
    """ApiError 400 for a request with more than one Authorization header. RFC 9110 allows
    one; with two, lmgate read the first while a proxy in front may check or rewrite the
    last, and the two would disagree on who is calling."""
    found = len(headers.getlist("Authorization"))
    if found > 1:
        raise ApiError(400, f"a request carries one Authorization header, this one {found}",
                       code="invalid_value")


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The `method` label: a method the API knows, else "other". The HTTP parser accepts any
    token as a method, and a label taken from the client would let anyone, without a key,
    add a series per request (404s and 405s are counted too)."""
    return method if method in HTTP_METHODS else "other"


@dataclass
class HttpMetrics:
    """Gateway-side metrics, registered on the runtime's registry (one app per registry)."""

    requests: prometheus_client.Counter
    latency: prometheus_client.Histogram
    ws_connections: prometheus_client.Gauge
    background_responses: prometheus_client.Gauge

    def forget_tenants(self, tenant_ids: Collection[str]) -> None:
        """Deleted tenants' series go (`actors.metrics.forget_label`)."""
        forget_label(vars(self).values(), "tenant", set(tenant_ids))

    def tenants(self) -> set[str]:
        """The tenants that have series (and `-`: requests answered before a key was read)."""
        return label_values(vars(self).values(), "tenant")

    @classmethod
    def register(cls, registry: prometheus_client.CollectorRegistry) -> HttpMetrics:
        return cls(
            requests=prometheus_client.Counter(
                "lmgate_http_requests",
                "HTTP requests by route, method, status and tenant",
                ["route", "method", "status", "tenant"],
                registry=registry,
            ),
            latency=prometheus_client.Histogram(
                "lmgate_http_request_duration_seconds",
                "Time to response headers by route (for streams: until the stream starts, not its end)",
                ["route"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            ws_connections=prometheus_client.Gauge(
                "lmgate_ws_connections", "Open WebSocket connections", registry=registry
            ),
            background_responses=prometheus_client.Gauge(
                "lmgate_background_responses", "Background responses (Responses API) running on this server",
                registry=registry,
            ),
        )


def accepts_gzip(header: str | None) -> bool:
    """Whether an Accept-Encoding header takes gzip: named, else `*`, with a q-value above
    0 (`gzip;q=0` refuses it, whatever `*` says)."""
    qs: dict[str, float] = {}
    for part in (header or "").split(","):
        name, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            key, _, value = p.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        qs.setdefault(name.lower(), q)
    return qs.get("gzip", qs.get("*", 0.0)) > 0


class RecentKeys:
    """Keys that authenticated recently, used only while Redis is unreachable.

    Degraded mode: when the key store cannot be asked, a key that Redis accepted
    within `max_age_s` keeps working (its tenant as last seen), so an outage does
    not log out every active client; unknown keys get 503. A revocation is not seen
    until Redis answers again: one made during the outage, or in the `max_age_s` before
    it through another replica (this one remembers the key as it last saw it). Entries are keyed by
    SHA-256 of the key, never the plaintext; the table is bounded (oldest evicted).
    """

    def __init__(self, max_age_s: float = 300.0, max_entries: int = 10_000) -> None:
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[Tenant, float, float]] = {}  # tenant, seen, expires (monotonic)

    @staticmethod
    def _digest(api_key: str) -> bytes:
        return hashlib.sha256(api_key.encode()).digest()

    def put(self, api_key: str, tenant: Tenant, now: float, expires_in: float | None = None) -> None:
        """Remember `api_key`'s tenant at `now` (monotonic); `expires_in`: seconds until the
        key expires, after which it is not remembered either."""
        digest = self._digest(api_key)
        self._entries.pop(digest, None)
        self._entries[digest] = (tenant, now, math.inf if expires_in is None else now + expires_in)
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]

    def forget(self, api_key: str) -> None:
        self._entries.pop(self._digest(api_key), None)

    def get(self, api_key: str, now: float) -> Tenant | None:
        entry = self._entries.get(self._digest(api_key))
        if entry is None or now - entry[1] > self.max_age_s or now >= entry[2]:
            return None
        return entry[0]


# POST routes refused with 503 `shutting_down` once the server drains (`GatewayState.draining`)
DRAINED_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/score",
                  "/score", "/v1/rerank", "/rerank", "/v2/rerank")


@dataclass
class GatewayState:
    """Everything a route needs, passed explicitly to each blueprint."""

    runtime: Runtime
    stores: GatewayStores
    config: GatewayConfig
    metrics: HttpMetrics
    started: int = field(default_factory=lambda: int(time.time()))
    recent_keys: RecentKeys = field(default_factory=lambda: RecentKeys())
    # per tenant: batches submit one at a time (`routes_openai.submit_all`)
    batch_locks: dict[str, trio.Lock] = field(default_factory=dict)
    # set when a graceful shutdown starts (`gateway.server.serve_app`): /readyz is 503, new
    # work is refused with 503 `shutting_down`, answers close their connections, and
    # WebSockets close once their streams are done
    draining: trio.Event = field(default_factory=trio.Event)
    # Responses API runs on this server: read while they run, background mode
    live_responses: LiveResponses = field(default_factory=LiveResponses)
    # /metrics: one scrape formatted at a time, in a thread of its own limiter (not the one
    # request paths share), and one formatted body shared by the scrapes that waited for it
    scrape_lock: trio.Lock = field(default_factory=trio.Lock)
    scrape_threads: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))
    # non-streamed answers with logprobs are built and encoded in a worker thread, one at a time
    # (`gateway.routes_openai.collect`)
    answer_threads: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))
    answer_turns: TenantTurns = field(default_factory=TenantTurns)
    last_scrape: tuple[float, bool, bytes] | None = None  # (monotonic time, gzipped, body)

    def forget_tenants(self, tenant_ids: Collection[str]) -> None:
        """Deleted tenants: this process's series (the runtime's and the gateway's) and
        fairness counters of them go."""
        self.runtime.forget_tenants(tenant_ids)
        self.metrics.forget_tenants(tenant_ids)

    async def authenticate_key(self, api_key: str | None) -> TenantContext:
        """Tenant of an API key, or ApiError 401 (503 if Redis cannot be asked)."""
        if not api_key:
            raise ApiError(401, "missing API key (Authorization: Bearer <key>)", code="missing_api_key")
        try:
            if not self.stores.redis.reachable():  # (failed to answer within the last second)
                raise CacheUnavailable("Redis was unreachable a moment ago: skipped")
            found = await self.stores.tenants.lookup_key(api_key)
        except CacheUnavailable as exc:
            tenant = self.recent_keys.get(api_key, time.monotonic())
            if tenant is None:
                raise ApiError(503, "authentication store unavailable", code="auth_unavailable", retry_after=1) from exc
        else:
            if found is None:
                self.recent_keys.forget(api_key)
                raise ApiError(401, "invalid API key", code="invalid_api_key")
            tenant = found.tenant
            expires_in = None if found.expires_at is None else found.expires_at - time.time()
            self.recent_keys.put(api_key, tenant, time.monotonic(), expires_in)
        if has_request_context() or has_websocket_context():
            g.tenant_id = tenant.id  # metrics label
        return tenant_context(tenant)

    async def authenticate(self, authorization: str | None) -> TenantContext:
        if authorization is not None and bearer(authorization) is None:
            raise ApiError(401, "Authorization header must be 'Bearer <key>'", code="invalid_api_key")
        return await self.authenticate_key(bearer(authorization))

    def require_admin(self, authorization: str | None) -> None:
        if not self.config.admin_key:
            raise ApiError(403, "the admin API is disabled (no admin key configured)", code="admin_disabled")
        if not is_admin_key(bearer(authorization), self.config.admin_key):
            raise ApiError(403, "admin key required", code="forbidden")

    def check_model(self, model: str, tenant: TenantContext) -> None:
        """404 unless `model` is the served model, one of its aliases, or a LoRA adapter this
        server has (whether it loads is admission's to say: `actors.admission`), and the
        tenant may use it (`Tenant.models`: a model it may not use is, to it, one that does
        not exist, as OpenAI answers; the message names only what it may use)."""
        if not self.runtime.serves(model) or not self.may_use(tenant, model):
            served = self.models_for(tenant)  # (only here: listing adapters may read their folder)
            message = (unknown_model_message(model, served) if served
                       else f"model {model[:100]!r} does not exist or this key may not use it")
            raise ApiError(404, message, code="model_not_found", param="model")

    def check_generation_model(self, model: str, tenant: TenantContext) -> None:
        """`check_model`, and a 400 for the embedding model (it serves /v1/embeddings only)."""
        self.check_model(model, tenant)
        if model in getattr(self.runtime, "embedding_aliases", ()):
            raise ApiError(400, f"model {model[:100]!r} is an embedding model: it serves /v1/embeddings only",
                           code="invalid_value", param="model")

    def base_names(self) -> frozenset[str]:
        """The names the base model is served under: its id and its aliases (the `--model`
        it was started with); every other served name is a LoRA adapter."""
        return frozenset(getattr(self.runtime, "model_aliases", ())) | {self.runtime.model_name}

    def may_use(self, tenant: TenantContext, model: str) -> bool:
        """Whether the tenant's `models` allow `model`: an adapter by its own name only; the
        base model by its id or any of its aliases (a list naming "smollm2" allows the model
        served under that alias, whichever name the request uses), and so the embedding
        model."""
        if tenant.models is None:
            return True
        base = self.base_names()
        embedding = frozenset(getattr(self.runtime, "embedding_aliases", ()))
        names = base if model in base else embedding if model in embedding else {model}
        return any(may_use(tenant.models, name) for name in names)

    def models_for(self, tenant: TenantContext) -> list[str]:
        """The served models this tenant may use, as /v1/models lists them."""
        return [m for m in self.runtime.served_models() if self.may_use(tenant, m)]


PREDICTOR_UPLOAD = ("PUT", "/admin/predictor")
MAX_PREDICTOR_BYTES = 64 * 1024 * 1024  # a full predictor (4096 samples x 774 features) is ~25 MB


def request_class_for(config: GatewayConfig) -> type[TrioRequest]:
    """The app's request class: bodies capped at `max_body_bytes`, except a predictor upload.

    Quart fixes a request's body cap when it builds the request, before any route or
    hook runs, so a route cannot raise its own. One route needs more: `PUT
    /admin/predictor` takes a saved predictor (a few MB: its training samples). The cap
    is lifted to `MAX_PREDICTOR_BYTES` for exactly that route and only when the request
    carries the admin key, so no one else can make the server buffer more than
    `max_body_bytes`.
    """

    class GatewayRequest(TrioRequest):
        def __init__(self, method: str, scheme: str, path: str, query_string: bytes, headers: Any,
                     *args: Any, max_content_length: int | None = None, **kwargs: Any) -> None:
            if ((method, path) == PREDICTOR_UPLOAD and config.admin_key
                    and is_admin_key(bearer(headers.get("Authorization")), config.admin_key)):
                max_content_length = max(max_content_length or 0, MAX_PREDICTOR_BYTES)
            super().__init__(method, scheme, path, query_string, headers, *args,
                             max_content_length=max_content_length, **kwargs)
            # Quart's `max_content_length` falls back to the app's MAX_CONTENT_LENGTH, not this
            # body's limit: the 413 message and the decoded-size cap (`get_data`) read this one
            self.max_content_length = max_content_length

        async def get_data(self, cache: bool = True, as_text: bool = False,
                           parse_form_data: bool = False) -> str | bytes:
            """The body, decoded from its `Content-Encoding` (`decoded_body`)."""
            raw = await super().get_data(cache=cache, as_text=False, parse_form_data=parse_form_data)
            encoding = self.headers.get("Content-Encoding")
            if encoding and isinstance(raw, bytes):
                raw = decoded_body(raw, encoding, self.max_content_length or config.max_body_bytes)
            return raw.decode() if as_text else raw

    return GatewayRequest


_DECODERS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # zlib wbits: gzip header, zlib header


def decoded_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """A request body under its `Content-Encoding` (RFC 9110 §8.4: codings listed in the
    order applied): gzip and deflate are decoded, identity kept, anything else is a 415.
    The decoded body has the same cap as a plain one (413 beyond it: a body of a few KB
    can inflate to gigabytes, so decoding stops at the cap), and a body that is not what
    its coding says is a 400."""
    for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        wbits = _DECODERS.get(coding)
        if wbits is None:
            raise ApiError(415, f"Content-Encoding {coding[:50]!r} is not supported (gzip, deflate or identity)",
                           code="unsupported_encoding")
        raw = _inflated(raw, coding, wbits, limit)
    return raw


_FEED_BYTES = 4096  # input fed to zlib at a time: what a gzip member's end leaves over is copied


def _inflated(raw: bytes, coding: str, wbits: int, limit: int) -> bytes:
    """`raw` decoded: gzip member after member (RFC 1952), deflate one stream; 413 past
    `limit` bytes out, 400 for what is not `coding`. Linear in the body: the input is fed
    a few KB at a time through a memoryview and the output joined once (fed whole, each of
    49,000 empty members of a 1 MB body copied the rest of it: 1.6 s on the event loop)."""
    view, at, size = memoryview(raw), 0, 0
    out: list[bytes] = []
    while True:
        decoder = zlib.decompressobj(wbits)
        while not decoder.eof:
            if at >= len(raw):
                raise ApiError(400, f"the body is not valid {coding} data: it ends early", code="invalid_encoding")
            chunk = view[at:at + _FEED_BYTES]
            at += len(chunk)
            try:
                piece = decoder.decompress(chunk, limit + 1 - size)
            except zlib.error as exc:
                raise ApiError(400, f"the body is not valid {coding} data: {exc}", code="invalid_encoding") from exc
            out.append(piece)
            size += len(piece)
            if size > limit or decoder.unconsumed_tail:
                raise ApiError(413, f"the decoded body is larger than {limit} bytes", code="request_too_large")
        at -= len(decoder.unused_data)
        if at >= len(raw):
            return b"".join(out)
        if wbits != 31:
            raise ApiError(400, f"the body is not valid {coding} data: bytes after its end", code="invalid_encoding")


async def close_after_refused_body(response: Response) -> Response:
    """An error answer to a request that carries a body ends the connection (`Connection: close`).

    The answer may go out before the body has arrived (403 from the admin check, 413 over
    the cap, 401 before a large chat body is read). Hypercorn then closes the connection,
    since the request never finished, but without saying so: a keep-alive client sent its
    next request on that socket and got "Server disconnected" or hung until its timeout
    (4 runs in 6 of the test in tests/gateway/test_routes_openai.py, before). Saying so
    makes the client open a new connection; the cost is one handshake after an error.

    A request with both `Content-Length` and `Transfer-Encoding` ends it too, whatever the
    answer (RFC 9112 §6.3): a proxy in front that framed it by its `Content-Length` reads
    the rest of its chunked body as a next request (request smuggling).
    """
    framed_twice = "Content-Length" in request.headers and "Transfer-Encoding" in request.headers
    if framed_twice or (response.status_code >= 400
                        and (request.content_length or request.headers.get("Transfer-Encoding"))):
        response.headers["Connection"] = "close"
    return response


def _route_label() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


class HttpConnection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, which also tells the streamed bodies a route made
    (`gateway.routes_openai.stream_body`) that the exchange is over, read or not:
    `abandon()` on each (`gateway.routes_openai.SseBody`: it aborts its request unless it
    ended).

    Why: a client gone just after its request (a couple of milliseconds) cancels the
    handler after the route returned its streaming Response but before Quart entered the
    body (`async with response.response`), so the body's `aclose` never ran; its request
    generated on, holding KV blocks, until garbage collection happened to free the body
    (seconds, or the whole answer)."""

    async def handle_request(self, nursery: trio.Nursery, request: Any, send: Any) -> None:  # type: ignore[override]
        try:
            await super().handle_request(nursery, request, send)
        finally:
            for body in getattr(request, "lmgate_bodies", ()):
                body.abandon()


def create_app(runtime: Runtime, store: GatewayStores, config: GatewayConfig) -> QuartTrio:
    """Build the gateway app. `store` must be opened (inside `async with RedisStore`)."""
    from gateway.openapi import openapi_document
    from gateway.routes_admin import admin_blueprint
    from gateway.routes_embeddings import embeddings_blueprint
    from gateway.routes_openai import openai_blueprint
    from gateway.routes_responses import responses_blueprint
    from gateway.routes_scoring import RERANK_ROUTES, SCORE_ROUTES, scoring_blueprint
    from gateway.routes_tokenizer import tokenizer_blueprint
    from gateway.ws import ws_blueprint

    app = QuartTrio("lmgate")
    # "/v1//models" is a 404 error JSON, as any unknown path: Werkzeug's default answered it
    # with a 308 HTML redirect to the merged path (and "/a/..%2F/b" with one to "/a/../b",
    # which a client resolves to another route)
    app.url_map.merge_slashes = False
    app.asgi_http_class = HttpConnection
    # keys keep their order (Flask's provider sorts them): logprobs' top_logprobs dicts are
    # best first, as streamed (msgspec) and as OpenAI sends them
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.request_class = request_class_for(config)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # streams set it per response too
    # background responses (`gateway.responses_live`) run in the app's nursery: at a shutdown
    # the runtime ends them at the grace period's end, and they then store how they ended
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = config.shutdown_grace_seconds + 5
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    state = GatewayState(runtime, store, config, HttpMetrics.register(runtime.registry))
    state.metrics.background_responses.set_function(state.live_responses.running)
    app.extensions["lmgate"] = state
    install_error_handlers(app)

    @app.before_request
    async def _start_clock() -> None:
        g.started = time.perf_counter()
        g.request_id = request_id_of(request.headers.get("X-Request-Id"))

    @app.before_request
    async def _one_authorization() -> None:
        check_one_authorization(request.headers)

    @app.before_request
    async def _refuse_new_work_while_draining() -> None:
        """Shutting down: a generation or embedding request that still arrives (pipelined,
        or racing the close of its idle connection) is sent elsewhere at once rather than
        cut at the grace's end."""
        if state.draining.is_set() and request.method == "POST" and request.path in DRAINED_ROUTES:
            raise ApiError(503, "server shutting down: send this request to another server", code="shutting_down",
                           retry_after=1)

    @app.after_request
    async def _close_while_draining(response: Response) -> Response:
        if state.draining.is_set():  # the client's next request opens a connection (to another server)
            response.headers["Connection"] = "close"
        return response

    @app.after_request
    async def _request_id(response: Response) -> Response:
        response.headers["X-Request-Id"] = getattr(g, "request_id", None) or request_id_of(None)
        return response

    # the routes of the requests `lmgate_requests_total` counts: their refusals before
    # admission (a bad body, an unknown model) go into `lmgate_rejections_total` with admission's
    refusable = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                           *SCORE_ROUTES, *RERANK_ROUTES})

    @app.after_request
    async def _count(response: Response) -> Response:
        route = _route_label()
        tenant = getattr(g, "tenant_id", UNAUTHENTICATED)
        state.metrics.requests.labels(route, method_label(request.method), str(response.status_code), tenant).inc()
        error = getattr(g, "api_error", None)
        if (error is not None and tenant != UNAUTHENTICATED and request.method == "POST" and route in refusable
                and error.refused_before_admission):
            runtime.count_rejection(tenant, error.status, error.code or "error")
        started = getattr(g, "started", None)
        if started is not None:
            state.metrics.latency.labels(route).observe(time.perf_counter() - started)
        if error is not None:
            log_failure(request.method, request.path, getattr(g, "request_id", "-"), tenant, error,
                        getattr(g, "answer_id", None))
        return response

    app.after_request(close_after_refused_body)
    cors = CorsPolicy.parse(config.allowed_origins)

    @app.after_request
    async def _rate_limits(response: Response) -> Response:
        limits = getattr(g, "rate_limits", None)
        if limits is not None:
            response.headers.update(rate_limit_headers(limits))
        age = getattr(g, "cache_age_s", None)  # an answer from the response cache (`note_accepted`)
        if age is not None and response.status_code < 300:
            response.headers["Age"] = str(int(age))
        return response

    @app.after_request
    async def _cors(response: Response) -> Response:
        preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        response.headers.update(cors.headers(request.path, request.headers.get("Origin"),
                                             request.headers.get("Access-Control-Request-Headers"), preflight))
        return response

    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Any:
        status = dict(runtime.status())
        degraded = list(status.get("degraded", []))
        # (not asked while its watcher knows it is down: a stalled Redis held this probe 2 s,
        # past a readiness probe's timeout, and every replica sharing it left the Service)
        if store.redis.known_unreachable() or not await store.redis.ping():
            degraded.append("redis_unavailable")
        if store.tenants.lost_data:  # (every key answers 401 until tenants are created or restored)
            degraded.append("redis_lost_data")
        if not store.redis.room_for_optional():  # (the caches and stored Responses are not written)
            degraded.append("redis_near_maxmemory")
        if state.draining.is_set():
            degraded.append("shutting_down")
        status["degraded"] = degraded
        ready = bool(status.get("ready", False)) and not state.draining.is_set()
        status["ready"] = ready
        status["status"] = "ready" if ready else "not_ready"
        return status, (200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text; with `metrics_key` set, only for `Bearer <metrics_key>` (or the
        admin key): the metrics name every tenant and its counts."""
        if config.metrics_key:
            presented = bearer(request.headers.get("Authorization"))
            if not (is_admin_key(presented, config.metrics_key) or is_admin_key(presented, config.admin_key)):
                raise ApiError(401, "the metrics need the metrics key (Authorization: Bearer <key>)",
                               code="invalid_api_key")
        compress = accepts_gzip(request.headers.get("Accept-Encoding"))  # (Prometheus asks)
        asked = time.monotonic()
        async with state.scrape_lock:
            last = state.last_scrape
            if last is not None and last[0] >= asked and last[1] == compress:
                body = last[2]  # formatted since this scrape came: theirs will do
            else:
                with runtime.metrics.tenant_queue.frozen():  # (what only the event loop may read, read here)
                    started = time.monotonic()
                    body = await trio.to_thread.run_sync(runtime.metrics.render, compress,
                                                         limiter=state.scrape_threads)
                state.last_scrape = (started, compress, body)
        headers = {"Vary": "Accept-Encoding"}
        if compress:
            headers["Content-Encoding"] = "gzip"
        return Response(body, content_type=prometheus_client.CONTENT_TYPE_LATEST, headers=headers)

    @app.get("/openapi.json")
    async def openapi() -> Any:
        return openapi_document()

    app.register_blueprint(openai_blueprint(state))
    app.register_blueprint(responses_blueprint(state))
    app.register_blueprint(tokenizer_blueprint(state))
    app.register_blueprint(embeddings_blueprint(state))
    app.register_blueprint(scoring_blueprint(state))
    app.register_blueprint(admin_blueprint(state))
    app.register_blueprint(ws_blueprint(state))
    return app
