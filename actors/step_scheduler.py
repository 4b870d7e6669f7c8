"""The step scheduler: packs one engine step over the paged KV cache.

Pure, synchronous mechanism (no model, no trio): the engine loop is

    plan = sched.schedule()           # who runs, with how many tokens
    sampled = run_model(plan)         # the engine: copies, forward pass, sampling
    sched.update(plan, sampled)       # advance state, commit full blocks to the prefix cache
    ... sched.finish(rid) for every request the engine decides is done

One data model covers prefill, chunked prefill, prefix hits, decode and
recomputation after preemption (vLLM v1): every request has `num_tokens`
(prompt + outputs so far) and `num_computed_tokens` (how many of them have KV in
the cache). A step gives each scheduled request the next `n` uncomputed tokens::

    all_token_ids:  [p p p p p p p p p p | o o o]
                     ^ computed ^   ^ chunk this step ^
                     0          num_computed_tokens   num_tokens

A chunk that reaches `num_tokens` samples a token (`sample=True`); a decode is
just a chunk of one token.

Policy of one step (`schedule`):
0. If the head of the queue has a higher priority than running requests and does
   not fit (blocks, as in 2, or a seat), those of lower priority are preempted,
   latest first, until it does -- if preempting them all would do.
1. Running requests, in (priority, arrival) order, each get their remaining
   tokens capped by the budget (and by `long_prefill_token_threshold` for
   prompts). If their blocks do not fit, the running request with the *largest*
   (priority, arrival) key is preempted -- possibly the one being scheduled --
   until they fit. Preempted requests lose their blocks and `num_computed_tokens`
   and go back to waiting with their outputs kept (recomputed later).
2. Only if no running request was preempted in 1, waiting requests are admitted in
   (priority, arrival) order while the budget, `max_num_seqs` and free blocks allow
   -- blocks for the request's whole prompt (and kept outputs), though it gets only
   its first chunk's now, on top of what the running requests before it still need
   for theirs (blocks only those of lower priority hold count as room: its later
   chunks would preempt them); a cached prefix counts as computed (at least one token is always
   left so that logits exist).

The request with the smallest key is never preempted for another one, and a
request admitted by `add` fits the whole cache alone, so the head of the line
always progresses: no deadlock, no livelock.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from gpu.block_manager import BlockManager
from gpu.config import SchedulerConfig


def prefix_namespace(adapter: str | None, cache_salt: str | None) -> str | None:
    """The prefix cache's namespace of a request's blocks: its adapter (whose KV entries
    differ from the base model's) and its salt (`SchedRequest.cache_salt`)."""
    return adapter if cache_salt is None else f"{adapter or ''}\x1f{cache_salt}"


@dataclass
class SchedRequest:
    """Mutable per-request state owned by the scheduler."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int  # max output tokens
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    priority: int = 0  # lower runs first; ties FCFS by add order
    # LoRA adapter key (`gpu.lora.LoraAdapter.key`; None: the base model); also the prefix
    # cache's namespace, since an adapter's KV entries differ from the base model's
    adapter: str | None = None
    # k: the engine wants the logprobs of this request's prompt tokens (and k alternatives):
    # its prompt chunks say so (`ScheduledSeq.logprob_targets`). The engine clears it once it
    # has them all.
    prompt_logprobs: int | None = None
    # at most this many blocks of prefix-cache hits (None: as many as match). The engine caps
    # a request that needs prompt logprobs: a hit's positions never run (gpu.prompt_logprobs)
    max_prefix_blocks: int | None = None
    # who may share this request's cached prefix blocks (None: every request without a salt,
    # as vLLM's `cache_salt`): the gateway salts by tenant, so a hit (`cached_tokens`, or the
    # time it saves) never tells one tenant what another one's prompt was
    cache_salt: str | None = None

    @property
    def namespace(self) -> str | None:
        return prefix_namespace(self.adapter, self.cache_salt)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass(frozen=True)
class ScheduledSeq:
    request_id: str
    token_ids: tuple[int, ...]  # the new tokens fed this step
    start_pos: int  # position of token_ids[0] (== num_computed_tokens before the step)
    block_table: tuple[int, ...]
    sample: bool  # this chunk reaches the last known token: a token is sampled for it
    adapter: str | None = None  # LoRA adapter key (None: the base model)
    # prompt logprobs (`SchedRequest.prompt_logprobs`): the prompt token that follows each of
    # the chunk's first len(logprob_targets) positions, whose logprobs (and k alternatives,
    # k = `prompt_logprobs`) the runner computes
    logprob_targets: tuple[int, ...] = ()
    prompt_logprobs: int = 0
    # feeds the token sampled last (not a prompt's, nor a preempted request's recompute, even
    # as a chunk of one token: `--long-prefill-token-threshold 1`, a prefix hit short of one)
    decode: bool = False


@dataclass(frozen=True)
class StepPlan:
    seqs: tuple[ScheduledSeq, ...]  # decodes (exactly 1 token) first, then prefill chunks
    preempted: tuple[str, ...]  # moved back to waiting this step (blocks freed; recomputed later)
    # (src_block, dst_block) copy-on-write pairs; apply in order (or as one
    # gather-then-scatter) BEFORE running the step
    copies: tuple[tuple[int, int], ...]
    num_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class RequestRejected(ValueError):
    """The request can never run: too long for the model or for the whole KV cache."""


class StepScheduler:
    """Continuous batching with chunked prefill, prefix reuse and preemption.

    Requests are `SchedRequest`s the caller hands over with `add`/`fork`; the
    scheduler mutates them (`num_computed_tokens`, `output_token_ids`) and the
    caller may read them through `get`. Block ids used for the block manager are
    the request ids.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self._requests: dict[str, SchedRequest] = {}
        # (root arrival, own arrival): a forked child sorts right after its parent's family,
        # so the beams (or samples) of one request stay together in every ordering
        self._arrival: dict[str, tuple[int, int]] = {}
        self._counter = itertools.count()
        self._waiting: list[SchedRequest] = []  # sorted by _key
        self._running: list[SchedRequest] = []  # admission order
        # whether the latest step left requests waiting for KV blocks (its head did not fit,
        # or a running request was preempted for blocks) — not for the step's token budget
        # or a seat: the overload estimate counts as many seats as run then (set once a
        # step: the event loop reads it while the compute thread schedules)
        self.waits_for_blocks = False

    # ----------------------------------------------------------------- queries
    def get(self, request_id: str) -> SchedRequest | None:
        return self._requests.get(request_id)

    def output_tokens(self, request_id: str) -> int | None:
        """Output tokens generated so far by a request this scheduler holds (running or
        waiting, preempted included), None if it holds none: `EngineView.output_tokens`.
        A read of a list's length: safe from another thread between or during steps."""
        req = self._requests.get(request_id)
        return None if req is None else len(req.output_token_ids)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def waiting_work(self, typical_tokens: float, owner: Callable[[str], str] | None = None) -> float:
        """The waiting sequences' work in typical sequences (`typical_tokens` written each):
        each counts the share of them it has left to write, at most one. `owner` (sequence
        id -> its request's): in typical requests instead, each request its largest share."""
        typical = max(1.0, typical_tokens)
        shares = ((r.request_id, min(1.0, max(1, r.max_tokens - len(r.output_token_ids)) / typical))
                  for r in self._waiting)
        if owner is None:
            return sum(share for _, share in shares)
        per_request: dict[str, float] = {}
        for sid, share in shares:
            rid = owner(sid)
            per_request[rid] = max(per_request.get(rid, 0.0), share)
        return sum(per_request.values())

    @property
    def num_running(self) -> int:
        return len(self._running)

    def running_ids(self) -> list[str]:
        """The running sequences' ids (a choice or a beam is one; `Engine.owner_of` names
        its request, a forked beam's too)."""
        return [r.request_id for r in self._running]

    @property
    def kv_usage(self) -> float:
        return self.bm.usage

    # ------------------------------------------------------------- life cycle
    def add(self, req: SchedRequest) -> None:
        """Queue a new request; raises RequestRejected if it could never run."""
        if req.request_id in self._requests:
            raise ValueError(f"request {req.request_id!r} is already scheduled")
        if req.num_computed_tokens != 0:
            raise ValueError(f"request {req.request_id!r}: num_computed_tokens must start at 0")
        self._check_fits(req)
        self._enqueue(req, self._waiting)

    def check(self, req: SchedRequest) -> None:
        """Raise RequestRejected if `req` could never run (what `add` checks), without adding it."""
        self._check_fits(req)

    def fork(self, parent_id: str, child: SchedRequest) -> None:
        """Add `child`, whose tokens extend the parent's computed ones (n > 1 sampling).

        The child holds the parent's tokens so far, or the parent's computed tokens
        followed by its own sampled token (the engine samples n tokens from the
        same logits and forks n-1 children after `update`).
        A running parent shares its blocks with the child (copy-on-write), and the
        child runs alongside it; when the running set is full or the parent is
        waiting, the child waits and recomputes (prefix hits make that cheap).
        """
        parent = self._requests.get(parent_id)
        if parent is None:
            raise KeyError(f"unknown parent request {parent_id!r}")
        if child.request_id in self._requests:
            raise ValueError(f"request {child.request_id!r} is already scheduled")
        shared = parent.num_computed_tokens
        if (
            child.num_tokens <= shared
            or child.all_token_ids[:shared] != parent.all_token_ids[:shared]
        ):
            raise ValueError(
                f"child {child.request_id!r} must extend the parent's {shared} computed tokens"
            )
        self._check_fits(child)
        self._arrival[child.request_id] = (self._arrival[parent_id][0], next(self._counter))
        running = parent in self._running and len(self._running) < self.config.max_num_seqs
        if running:
            self.bm.fork(parent_id, child.request_id)
            child.num_computed_tokens = parent.num_computed_tokens
        else:
            child.num_computed_tokens = 0
        self._enqueue(child, self._running if running else self._waiting)

    def append(self, request_id: str, token_id: int) -> None:
        """Give a held request (see `update`) its next token: it is scheduled again."""
        req = self._requests.get(request_id)
        if req is None:
            raise KeyError(f"unknown request {request_id!r}")
        if req.num_computed_tokens != req.num_tokens and req in self._running:
            raise ValueError(f"request {request_id!r} is not waiting for a token")
        if len(req.output_token_ids) >= req.max_tokens:
            raise ValueError(f"request {request_id!r} already has max_tokens outputs")
        req.output_token_ids.append(token_id)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks at once; False if unknown."""
        if request_id not in self._requests:
            return False
        self._remove(request_id)
        return True

    def finish(self, request_id: str) -> None:
        """Normal completion: free the blocks (full ones stay cached for prefix reuse)."""
        if request_id not in self._requests:
            raise KeyError(f"unknown request {request_id!r}")
        self._remove(request_id)

    # ------------------------------------------------------------------- step
    def schedule(self) -> StepPlan:
        """Pack the next step; see the module docstring for the policy."""
        step = _StepBuilder(self.config.max_num_batched_tokens)
        self._make_room_for_head(step)
        made_room = len(step.preempted)
        # the head of the queue is admitted before the running requests of a lower priority
        # are scheduled: after them, their decodes and prefill chunks took the blocks (and
        # the budget) it fitted in or that preemptions freed for it, and it was admitted a
        # step or more later. (Within one priority, running requests go first: FCFS.)
        head = self._waiting[0].priority if self._waiting else None
        for req in sorted(self._running, key=self._key):
            if step.budget == 0:
                break
            if head is not None and req.priority > head:
                self._admit_waiting(step, before=self._key(req))
                head = None
                if step.budget == 0:
                    break
            if req.request_id in step.preempted or not self._wants_tokens(req):
                continue
            self._schedule_running(req, step)
        if len(step.preempted) == made_room:
            self._admit_waiting(step)
            if not step.chunks:
                self._release_held(step)
        if not step.waits_for_blocks and self._waiting:
            # the head fitted, or was not looked at (the budget went to running requests'
            # chunks): requests behind it may still not fit
            step.waits_for_blocks = self._waiting_lack_blocks()
        self.waits_for_blocks = step.waits_for_blocks  # (once: another thread reads it)
        return step.build(self.bm)

    def update(self, plan: StepPlan, sampled: Mapping[str, int], held: Collection[str] = ()) -> None:
        """Apply the results of a step run by the engine.

        Every scheduled request advances by its chunk; those with `sample=True`
        get `sampled[request_id]` appended — except those in `held`, whose next token
        the engine decides later (a beam, chosen once every beam of its request has
        run): a held request keeps its blocks but is not scheduled until `append` gives
        it a token (or `fork`/`finish`/`abort` replace it). Requests aborted/finished
        since the plan was made are skipped.
        """
        for seq in plan.seqs:
            req = self._requests.get(seq.request_id)
            if req is None:
                continue
            if req.num_computed_tokens != seq.start_pos:
                raise ValueError(
                    f"{seq.request_id!r}: plan starts at {seq.start_pos} but "
                    f"{req.num_computed_tokens} tokens are computed (plan applied twice?)"
                )
            req.num_computed_tokens += len(seq.token_ids)
            if seq.sample and seq.request_id not in held:
                if seq.request_id not in sampled:
                    raise KeyError(f"no sampled token for {seq.request_id!r}")
                req.output_token_ids.append(sampled[seq.request_id])
            if _full_blocks_grew(self.bm.block_size, seq.start_pos, req.num_computed_tokens):
                self.bm.commit(seq.request_id, req.all_token_ids, req.num_computed_tokens, namespace=req.namespace)

    # -------------------------------------------------------------- internals
    def _key(self, req: SchedRequest) -> tuple[int, tuple[int, int]]:
        return (req.priority, self._arrival[req.request_id])

    def _enqueue(self, req: SchedRequest, queue: list[SchedRequest]) -> None:
        self._requests[req.request_id] = req
        if req.request_id not in self._arrival:
            order = next(self._counter)
            self._arrival[req.request_id] = (order, order)
        if queue is self._waiting:
            bisect.insort(queue, req, key=self._key)
        else:
            queue.append(req)

    def _remove(self, request_id: str) -> None:
        req = self._requests.pop(request_id)
        del self._arrival[request_id]
        queue = self._running if req in self._running else self._waiting
        queue.remove(req)
        self.bm.free(request_id)

    def _check_fits(self, req: SchedRequest) -> None:
        total = len(req.prompt_token_ids) + req.max_tokens
        if not req.prompt_token_ids:
            raise RequestRejected(f"request {req.request_id!r} has an empty prompt")
        if req.max_tokens < 1:
            raise RequestRejected(f"request {req.request_id!r}: max_tokens must be >= 1")
        if len(req.output_token_ids) >= req.max_tokens:
            raise RequestRejected(f"request {req.request_id!r} already has max_tokens outputs")
        # the last sampled token is never fed back, so its position is never computed and its
        # KV never stored: a prefill-only request (the engine schedules it as one token's) may
        # fill the window; the engine holds generating requests to prompt + max_tokens <= it
        if total - 1 > self.config.max_model_len:
            raise RequestRejected(
                f"request {req.request_id!r}: prompt ({len(req.prompt_token_ids)}) + max_tokens "
                f"({req.max_tokens}) exceeds max_model_len ({self.config.max_model_len})"
            )
        needed = self.bm.blocks_for(total - 1)
        if needed > self.bm.num_blocks:
            raise RequestRejected(
                f"request {req.request_id!r} needs {needed} KV blocks, the cache has {self.bm.num_blocks}"
            )

    def _wants_tokens(self, req: SchedRequest) -> bool:
        # The engine finishes requests; this guard only keeps a request that was
        # not finished from running past max_tokens (and so past max_model_len).
        return (
            len(req.output_token_ids) < req.max_tokens and req.num_computed_tokens < req.num_tokens
        )

    def _chunk_len(self, req: SchedRequest, start: int, budget: int) -> int:
        """A chunk's tokens: within the step's budget, a prompt row whose logprobs are asked
        for counting as `PROMPT_LOGPROB_ROW_COST` (`_cost`)."""
        n = min(req.num_tokens - start, budget)
        threshold = self.config.long_prefill_token_threshold
        n = min(n, threshold) if threshold > 0 else n
        if _logprob_rows(req, start, start + n):
            n = max(1, min(n, budget // PROMPT_LOGPROB_ROW_COST))
        return n

    def _schedule_running(self, req: SchedRequest, step: _StepBuilder) -> None:
        start = req.num_computed_tokens
        end = start + self._chunk_len(req, start, step.budget)
        while self.bm.blocks_needed(req.request_id, start, end) > self.bm.num_free_blocks:
            step.waits_for_blocks = True
            victim = max(self._running, key=self._key)
            self._preempt(victim)
            step.preempted.append(victim.request_id)
            if victim is req:
                return
        self.bm.allocate(req.request_id, end)
        step.copies += self.bm.prepare_write(req.request_id, start, end)
        step.add(req, start, end)

    def _admit_waiting(self, step: _StepBuilder, before: tuple[int, tuple[int, int]] | None = None) -> None:
        """Admit waiting requests in (priority, arrival) order while they fit (`before`:
        only those whose key sorts before it)."""
        # A request is admitted only if all of its tokens fit, not just its first chunk:
        # beside what the running requests before it in (priority, arrival) order still need
        # for the tokens they already have (a prompt's chunks to come, a decode not scheduled
        # this step), in the free blocks and those only running requests of lower priority
        # hold (its later chunks preempt them; its own prefix hits among them free nothing).
        # Otherwise, with chunks capped (by the budget or `long_prefill_token_threshold`),
        # prompts were admitted that could not all be prefilled, and the newest were
        # preempted part-way and prefilled again from the start (twice the prefill,
        # measured; docs/scheduling.md).
        owed_by: list[tuple[tuple[int, tuple[int, int]], int]] | None = None
        while self._waiting and step.budget > 0 and len(self._running) < self.config.max_num_seqs:
            if owed_by is None:  # (once a step, and only when someone may be admitted)
                owed_by = self._owed_by()
            req = self._waiting[0]
            if before is not None and self._key(req) >= before:
                return
            hits, num_cached = self._prefix_hits(req)
            wanted = self._blocks_wanted(req, hits, num_cached, owed_by)
            if wanted > self.bm.num_free_blocks and wanted > self.bm.num_free_blocks + self._room_of_lower(req, hits):
                step.waits_for_blocks = True
                return  # head-of-line waits: strict (priority, arrival) order
            end = num_cached + self._chunk_len(req, num_cached, step.budget)
            if not self.bm.allocate(req.request_id, end, prefix_blocks=hits):
                step.waits_for_blocks = True
                return
            self._waiting.pop(0)
            self._running.append(req)
            req.num_computed_tokens = num_cached
            owed_by.append((self._key(req), self.bm.blocks_needed(req.request_id, end, req.num_tokens)))
            step.add(req, num_cached, end)

    def _waiting_lack_blocks(self) -> bool:
        """Whether the waiting requests would not all fit beside what the running ones
        still need, each counted whole (prefix hits not looked for: cheap, and at worst it
        says a request waits for blocks that a hit would have spared it)."""
        room = self.bm.num_free_blocks - sum(needs for _, needs in self._owed_by())
        for req in self._waiting:
            room -= self.bm.blocks_for(req.num_tokens)
            if room < 0:
                return True
        return False

    def _owed_by(self) -> list[tuple[tuple[int, tuple[int, int]], int]]:
        """Each running request's key and the blocks it still needs for the tokens it has."""
        return [(self._key(r), self.bm.blocks_needed(r.request_id, r.num_computed_tokens, r.num_tokens))
                for r in self._running]

    def _blocks_wanted(self, req: SchedRequest, hits: list[int], num_cached: int,
                       owed_by: list[tuple[tuple[int, tuple[int, int]], int]]) -> int:
        """Blocks for all of a waiting request's tokens (from its prefix hits on), on top of
        what the running requests before it still need (`owed_by`)."""
        key = self._key(req)
        return (sum(needs for k, needs in owed_by if k < key)
                + self.bm.blocks_needed(req.request_id, num_cached, req.num_tokens, prefix_blocks=hits))

    def _room_of_lower(self, req: SchedRequest, hits: list[int]) -> int:
        """Blocks preempting every running request of lower priority than `req` would free
        for it (not those others share, nor its own prefix hits)."""
        lower = [r.request_id for r in self._running if r.priority > req.priority]
        return self.bm.num_freed_by(lower, keep=set(hits)) if lower else 0

    def _prefix_hits(self, req: SchedRequest) -> tuple[list[int], int]:
        """The cached blocks `req` would start from, and the tokens they cover."""
        hits, num_cached = self.bm.match_prefix(req.all_token_ids[:-1], namespace=req.namespace)
        if req.max_prefix_blocks is not None and len(hits) > req.max_prefix_blocks:
            hits = hits[: req.max_prefix_blocks]
            num_cached = len(hits) * self.bm.block_size
        return hits, num_cached

    def _make_room_for_head(self, step: _StepBuilder) -> None:
        """The head of the queue has a higher priority than running requests but does
        not fit — its blocks beside what the running ones before it still need, or a seat
        under `max_num_seqs`: preempt the running ones after it, latest first, until it
        does (vLLM's priority preemption). Only if preempting all of them would make room:
        else nobody is preempted for nothing. Before the running requests are scheduled, so
        no victim has a chunk in the step; without it a high-priority request waited for
        lower ones to finish whenever its first chunk did not fit in the free blocks (an
        uncapped prompt: 5 s against 0.3 s idle, measured by an audit)."""
        if not self._waiting or not self._running:
            return
        head = self._waiting[0]
        lower = sorted((r for r in self._running if r.priority > head.priority), key=self._key)
        if not lower:
            return
        hits, num_cached = self._prefix_hits(head)
        owed_by = self._owed_by()  # (those before the head: no victim among them)

        def short() -> tuple[bool, int]:  # (no seat, blocks missing)
            missing = self._blocks_wanted(head, hits, num_cached, owed_by) - self.bm.num_free_blocks
            return len(self._running) >= self.config.max_num_seqs, missing

        no_seat, missing = short()
        if not no_seat and missing <= 0:
            return
        step.waits_for_blocks = missing > 0
        if missing > self._room_of_lower(head, hits):
            return
        while lower and (no_seat or missing > 0):
            victim = lower.pop()
            self._preempt(victim)
            step.preempted.append(victim.request_id)
            no_seat, missing = short()

    def _release_held(self, step: _StepBuilder) -> None:
        """Nothing runs, yet requests wait: the running ones are all held (waiting for
        `append`), and they hold the blocks or the seats the head of the queue needs —
        typically beams whose sibling was preempted. Preempt held requests, latest
        (priority, arrival) first, until the head is admitted: without this, held beams
        and their waiting siblings would wait for each other forever.

        Only requests that sort after the head are released (one before it would be
        admitted again at once, and released again: a livelock). That suffices: forked
        beams sort with their parent, so a held request before the head belongs to the
        head's own beam family, and the engine only accepts a beam family that fits the
        cache and `max_num_seqs` together."""
        if not self._waiting:
            return
        head = self._key(self._waiting[0])
        held = sorted((r for r in self._running if not self._wants_tokens(r) and self._key(r) > head), key=self._key)
        while held and not step.chunks:
            victim = held.pop()
            self._preempt(victim)
            step.preempted.append(victim.request_id)
            self._admit_waiting(step)

    def _preempt(self, req: SchedRequest) -> None:
        self._running.remove(req)
        self.bm.free(req.request_id)
        req.num_computed_tokens = 0
        bisect.insort(self._waiting, req, key=self._key)


@dataclass
class _StepBuilder:
    """Accumulates one step while `schedule` runs."""

    budget: int
    chunks: list[tuple[SchedRequest, int, int]] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    waits_for_blocks: bool = False  # (`StepScheduler.waits_for_blocks`, for this step)

    def add(self, req: SchedRequest, start: int, end: int) -> None:
        self.chunks.append((req, start, end))
        self.budget = max(0, self.budget - _cost(req, start, end))

    def build(self, bm: BlockManager) -> StepPlan:
        # Block tables are read only now, after every preemption and copy of the step.
        seqs = [
            ScheduledSeq(
                request_id=req.request_id,
                token_ids=_token_slice(req, start, end),
                start_pos=start,
                block_table=tuple(bm.block_table(req.request_id)),
                sample=end == req.num_tokens,
                adapter=req.adapter,
                decode=end - start == 1 and end == req.num_tokens and bool(req.output_token_ids),
                **_prompt_logprob_fields(req, start, end),
            )
            for req, start, end in self.chunks
        ]
        seqs.sort(key=lambda s: len(s.token_ids) != 1)  # stable: decodes first
        return StepPlan(
            seqs=tuple(seqs),
            preempted=tuple(self.preempted),
            copies=tuple(self.copies),
            num_tokens=sum(len(s.token_ids) for s in seqs),
        )


def _token_slice(req: SchedRequest, start: int, end: int) -> tuple[int, ...]:
    """`tuple(req.all_token_ids[start:end])` without concatenating the whole list."""
    n = len(req.prompt_token_ids)
    if start >= n:
        return tuple(req.output_token_ids[start - n : end - n])
    return tuple(req.prompt_token_ids[start:end]) + tuple(req.output_token_ids[: max(0, end - n)])


# what a prompt row whose logprobs the engine computes costs of a step's token budget: a
# vocabulary-wide logits row, its top k and the token's rank beside the row's forward pass
# (an audit: a 512-token prefill step took 1.4 s with them, 0.8 s without — every other
# stream waited as long)
PROMPT_LOGPROB_ROW_COST = 2


def _logprob_rows(req: SchedRequest, start: int, end: int) -> int:
    """The chunk's rows with a prompt-logprob target (`_prompt_logprob_fields`)."""
    if req.prompt_logprobs is None:
        return 0
    return max(0, min(end, len(req.prompt_token_ids) - 1) - start)


def _cost(req: SchedRequest, start: int, end: int) -> int:
    """A chunk's share of the step's token budget."""
    return end - start + (PROMPT_LOGPROB_ROW_COST - 1) * _logprob_rows(req, start, end)


def _prompt_logprob_fields(req: SchedRequest, start: int, end: int) -> dict:
    """The chunk's `logprob_targets` / `prompt_logprobs` (none past the prompt's end)."""
    if req.prompt_logprobs is None or start >= len(req.prompt_token_ids) - 1:
        return {}
    targets = tuple(req.prompt_token_ids[start + 1 : min(end + 1, len(req.prompt_token_ids))])
    return {"logprob_targets": targets, "prompt_logprobs": req.prompt_logprobs}


def _full_blocks_grew(block_size: int, before: int, after: int) -> bool:
    return after // block_size > before // block_size
