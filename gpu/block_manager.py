"""Paged KV-cache block allocator with prefix reuse and copy-on-write.

The KV cache is `num_blocks` fixed-size blocks of `block_size` token slots. Each
sequence owns a *block table*: position `p` lives in block `table[p // block_size]`
at offset `p % block_size` (see `gpu.attention` for the tensor layout)::

    seq A tokens: [t0 .. t15 | t16 .. t31 | t32 t33 _ _ ...]
    table A:      [    7     |     2      |       9       ]
    seq B (fork): [    7     |     2      |       9       ]   refcounts 2, 2, 2
    B writes t34: [    7     |     2      |      11       ]   copy 9 -> 11 first

Prefix reuse (nano-vllm / vLLM style): when a block is *full and computed* its
hash is set, once, to `hash((parent_hash, tuple(block_token_ids)))`, so one hash
names the whole prefix up to and including that block. A later sequence with the
same prefix finds the blocks by hash and then compares the stored token ids too, so
a hash collision can never hand out wrong KV data.

Namespaces: the same tokens can have different KV entries — a LoRA adapter changes the
K and V projections. A sequence's chain starts from its namespace's root
(`root_hash(namespace)`; None, the base model's, roots at None), and a block keeps its
namespace beside its tokens, so a prefix is only ever reused within one namespace.

Free blocks live in two O(1) structures:

* `_free`: blocks with no valid hash (never computed, or their hash was dropped);
* `_cached`: blocks with refcount 0 that still hold a registered hash, in LRU order
  (an `OrderedDict`, i.e. a doubly linked list: a prefix hit revives a block from
  the *middle* in O(1), eviction pops the least-recently-freed one).

New blocks come from `_free` first and only then evict from `_cached`, so cached
prefixes live as long as memory allows. A sequence's blocks are freed tail first,
so its last blocks are evicted before its first ones and the reusable prefix
stays as long as possible.

Pure Python, no torch: the scheduler and its tests use it without a model.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass, field


class OutOfBlocks(RuntimeError):
    """Raised by `prepare_write` when the copies it needs exceed the free blocks."""


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once, when the block is full and computed
    token_ids: tuple[int, ...] = ()  # the tokens whose KV it holds, kept with the hash
    namespace: str | None = None  # whose KV (a LoRA adapter's name; None: the base model)

    def reset(self) -> None:
        self.hash = None
        self.token_ids = ()
        self.namespace = None


@dataclass
class _SeqState:
    table: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chain hashes of its first full blocks


def chain_hash(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Hash of a full block, chained to the hash of the block before it."""
    return hash((parent_hash, tuple(token_ids)))


def root_hash(namespace: str | None) -> int | None:
    """The parent hash of a sequence's first block in `namespace` (None for None)."""
    return None if namespace is None else hash(("namespace", namespace))


class BlockManager:
    """Allocates KV blocks to sequences (by any hashable id).

    Contracts:
    * `allocate` and `prepare_write` are all-or-nothing: on failure nothing changed.
    * A block is shared (refcount > 1) only through `fork` or a prefix hit; it is
      never written while shared: callers call `prepare_write(seq, start, end)`
      before writing positions `[start, end)` and apply the returned copies.
    * `free` gives every block back; full committed blocks stay reusable by prefix
      until evicted.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._hash_to_block: dict[int, int] = {}
        self._seqs: dict[Hashable, _SeqState] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free counts as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def has_seq(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: Hashable) -> list[int]:
        """A copy of the sequence's block table (empty for an unknown sequence)."""
        state = self._seqs.get(seq_id)
        return list(state.table) if state else []

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_freed_by(self, seq_ids: Iterable[Hashable], keep: Collection[int] = ()) -> int:
        """Blocks freeing all of `seq_ids` would make allocatable: those no other sequence
        holds (a prefix shared with one outside them stays taken), but for `keep` (blocks a
        caller is about to take itself: its prefix hits)."""
        refs = Counter(b for s in seq_ids if (state := self._seqs.get(s)) for b in state.table)
        return sum(1 for b, n in refs.items() if n == self._blocks[b].ref_count and b not in keep)

    def match_prefix(self, token_ids: Sequence[int], namespace: str | None = None) -> tuple[list[int], int]:
        """Longest cached run of *full* blocks that prefixes `token_ids`, within `namespace`.

        Returns (block ids, number of tokens they cover). Takes no references: pass
        the blocks to `allocate(..., prefix_blocks=...)` before anything else
        allocates. Callers that need at least one token left to compute pass
        `token_ids[:-1]`.
        """
        if not self.enable_prefix_caching:
            return [], 0
        hits: list[int] = []
        parent = root_hash(namespace)
        bs = self.block_size
        for i in range(len(token_ids) // bs):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            parent = chain_hash(parent, chunk)
            block_id = self._hash_to_block.get(parent)
            if block_id is None:
                break
            block = self._blocks[block_id]
            if block.token_ids != chunk or block.namespace != namespace:
                break
            hits.append(block_id)
        return hits, len(hits) * bs

    def blocks_needed(
        self, seq_id: Hashable, start: int, end: int, prefix_blocks: Sequence[int] = ()
    ) -> int:
        """Free blocks taken by `allocate(seq_id, end, prefix_blocks)` followed by
        `prepare_write(seq_id, start, end)`: new table entries, copies of shared
        blocks in the write range, and revived cached prefix blocks."""
        state = self._seqs.get(seq_id)
        table = state.table if state else list(prefix_blocks)
        grow = max(0, self.blocks_for(end) - len(table))
        revive = 0 if state else sum(1 for b in prefix_blocks if self._blocks[b].ref_count == 0)
        return grow + revive + len(self._shared_in_range(table, start, end))

    def can_allocate(
        self, seq_id: Hashable, num_tokens: int, prefix_blocks: Sequence[int] = ()
    ) -> bool:
        return (
            self.blocks_needed(seq_id, num_tokens, num_tokens, prefix_blocks)
            <= self.num_free_blocks
        )

    # ---------------------------------------------------------------- mutations
    def allocate(
        self, seq_id: Hashable, num_tokens: int, prefix_blocks: Sequence[int] = ()
    ) -> bool:
        """Make the sequence's table cover positions `[0, num_tokens)`.

        `prefix_blocks` (from `match_prefix`) may only be given on the first
        allocation of a sequence; they become the head of its table (refcount+1,
        revived from the cache if free). Returns False, changing nothing, when the
        free blocks do not suffice. Never shrinks a table.
        """
        state = self._seqs.get(seq_id)
        if state is not None and prefix_blocks:
            raise ValueError(f"prefix_blocks given for {seq_id!r}, which already has blocks")
        for b in prefix_blocks:
            if self._blocks[b].hash is None:
                raise ValueError(f"prefix block {b} holds no cached prefix")
        if not self.can_allocate(seq_id, num_tokens, prefix_blocks):
            return False
        if state is None:
            state = self._seqs[seq_id] = _SeqState()
            for b in prefix_blocks:
                self._take(b)
                state.table.append(b)
                state.hashes.append(self._blocks[b].hash)  # type: ignore[arg-type]
        while len(state.table) < self.blocks_for(num_tokens):
            state.table.append(self._pop_free())
        return True

    def prepare_write(self, seq_id: Hashable, start: int, end: int) -> list[tuple[int, int]]:
        """Give the sequence private copies of shared blocks covering `[start, end)`.

        Returns the `(src, dst)` pairs whose KV data the caller must copy before
        writing. The table must already cover `end` (see `allocate`). Raises
        `OutOfBlocks` (changing nothing) when there are too few free blocks.
        """
        state = self._require(seq_id)
        if self.blocks_for(end) > len(state.table):
            raise ValueError(
                f"{seq_id!r}: table covers {len(state.table)} blocks, write ends at {end}"
            )
        shared = self._shared_in_range(state.table, start, end)
        if len(shared) > self.num_free_blocks:
            raise OutOfBlocks(
                f"{seq_id!r} needs {len(shared)} copy-on-write blocks, {self.num_free_blocks} free"
            )
        copies = []
        for i in shared:
            src = state.table[i]
            dst = self._pop_free()
            self._blocks[src].ref_count -= 1  # still >= 1: another table holds it
            state.table[i] = dst
            copies.append((src, dst))
        return copies

    def commit(self, seq_id: Hashable, token_ids: Sequence[int], num_computed_tokens: int,
               namespace: str | None = None) -> None:
        """Register the hashes of the sequence's blocks that are now full and computed,
        in `namespace` (the one its prefix hits were matched in).

        `token_ids` are the sequence's tokens (at least `num_computed_tokens` of
        them). If another block already caches the same prefix, this block keeps
        serving its sequence but is not registered (the first one stays the hit).
        """
        if not self.enable_prefix_caching:
            return
        state = self._require(seq_id)
        if num_computed_tokens > len(token_ids):
            raise ValueError(
                f"{num_computed_tokens} computed tokens but only {len(token_ids)} token ids"
            )
        bs = self.block_size
        num_full = min(num_computed_tokens // bs, len(state.table))
        for i in range(len(state.hashes), num_full):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(state.hashes[-1] if state.hashes else root_hash(namespace), chunk)
            state.hashes.append(h)
            block = self._blocks[state.table[i]]
            if block.hash is not None:
                continue  # shared from a fork or a prefix hit: already registered
            block.hash, block.token_ids, block.namespace = h, chunk, namespace
            self._hash_to_block.setdefault(h, block.block_id)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares every block of the parent (refcount+1, no copy yet)."""
        parent = self._require(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already has blocks")
        for b in parent.table:
            self._blocks[b].ref_count += 1
        self._seqs[child_id] = _SeqState(list(parent.table), list(parent.hashes))

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence's blocks, tail first; unknown ids are a no-op."""
        state = self._seqs.pop(seq_id, None)
        if state is None:
            return
        for b in reversed(state.table):
            block = self._blocks[b]
            block.ref_count -= 1
            if block.ref_count:
                continue
            if block.hash is not None and self._hash_to_block.get(block.hash) == b:
                self._cached[b] = None  # most recently used end
            else:
                block.reset()
                self._free.append(b)

    # ----------------------------------------------------------------- internals
    def _require(self, seq_id: Hashable) -> _SeqState:
        state = self._seqs.get(seq_id)
        if state is None:
            raise KeyError(f"sequence {seq_id!r} has no blocks")
        return state

    def _shared_in_range(self, table: Sequence[int], start: int, end: int) -> list[int]:
        """Indices of table entries touched by positions [start, end) held by others too."""
        if end <= start:
            return []
        first, last = start // self.block_size, min(self.blocks_for(end), len(table))
        return [i for i in range(first, last) if self._blocks[table[i]].ref_count > 1]

    def reset_prefix_cache(self) -> int:
        """Forget every cached block no sequence holds (vLLM's `reset_prefix_cache`):
        they return to the free list without their hashes. Blocks in use keep theirs.
        Returns how many blocks were dropped. Benchmarks call it between runs that
        replay the same prompts, so a later run does not get prefills for free."""
        dropped = 0
        while self._cached:
            block_id, _ = self._cached.popitem(last=False)
            block = self._blocks[block_id]
            del self._hash_to_block[block.hash]  # type: ignore[arg-type]
            block.reset()
            self._free.append(block_id)
            dropped += 1
        return dropped

    def reset_block_order(self) -> None:
        """Hand free blocks out in address order again, as a fresh pool does. Only while
        no sequence holds blocks (raises otherwise); drops the prefix cache first.

        Blocks come back in the order sequences free them, so after a while tables
        spread over the whole cache, and decode attention over scattered blocks runs
        measurably slower on a CPU (docs/benchmarking.md, "Huge pages and block order").
        Benchmarks call this before each run so every run starts from the same layout."""
        if self._seqs:
            raise RuntimeError(f"{len(self._seqs)} sequences hold blocks: reset the order only when idle")
        self.reset_prefix_cache()
        self._free = deque(sorted(self._free))

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._cached[block_id]  # O(1) revival from the middle of the LRU list
        block.ref_count += 1

    def _pop_free(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached.popitem(last=False)  # evict least recently freed
            block = self._blocks[block_id]
            del self._hash_to_block[block.hash]  # type: ignore[arg-type]
            block.reset()
        self._blocks[block_id].ref_count = 1
        return block_id

    # ------------------------------------------------------------------- checks
    def check_invariants(self) -> None:
        """Raise `RuntimeError` on any inconsistency: refcounts equal the number of
        tables holding each block, every free block is in exactly one free structure,
        and the hash map and the cached blocks agree (for tests)."""
        refs = [0] * self.num_blocks
        for state in self._seqs.values():
            for b in state.table:
                refs[b] += 1
            if len(state.hashes) > len(state.table):
                raise RuntimeError("a sequence has more block hashes than blocks")
        free, cached = set(self._free), set(self._cached)
        if len(free) != len(self._free) or free & cached:
            raise RuntimeError("a block is twice in the free structures")
        for block in self._blocks:
            b = block.block_id
            if block.ref_count != refs[b]:
                raise RuntimeError(
                    f"block {b}: refcount {block.ref_count}, held by {refs[b]} tables"
                )
            if (block.ref_count == 0) != (b in free or b in cached):
                raise RuntimeError(
                    f"block {b}: refcount {block.ref_count} but free={b in free} cached={b in cached}"
                )
            if b in free and block.hash is not None:
                raise RuntimeError(f"free block {b} still has a hash")
            if b in cached and self._hash_to_block.get(block.hash) != b:  # type: ignore[arg-type]
                raise RuntimeError(f"cached block {b} is not reachable by its hash")
            if block.hash is not None and len(block.token_ids) != self.block_size:
                raise RuntimeError(f"hashed block {b} stores {len(block.token_ids)} token ids")
        for h, b in self._hash_to_block.items():
            if self._blocks[b].hash != h:
                raise RuntimeError(
                    f"hash map points {h} at block {b} with hash {self._blocks[b].hash}"
                )
