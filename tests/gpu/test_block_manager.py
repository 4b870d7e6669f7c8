"""BlockManager: unit cases plus a hypothesis state machine.

The state machine keeps a shadow KV cache (block id -> token per slot): writers
write their tokens into the slots their block tables point at, after applying the
copy-on-write pairs. Every sequence must read back exactly its own tokens, which
fails if a shared block is ever written, a copy is missing, or a prefix hit hands
out blocks holding other tokens.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from gpu.block_manager import BlockManager, OutOfBlocks

BS = 4


def test_allocate_covers_positions_and_free_returns_everything():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.allocate("a", 9)
    assert len(bm.block_table("a")) == 3
    assert bm.num_free_blocks == 5
    assert bm.allocate("a", 12)  # still 3 blocks
    assert len(bm.block_table("a")) == 3
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_invariants()


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS)
    assert bm.allocate("a", 8)
    assert not bm.allocate("b", 12)
    assert bm.block_table("b") == [] and bm.num_free_blocks == 2
    assert not bm.allocate("a", 17)
    assert len(bm.block_table("a")) == 2
    bm.check_invariants()


def test_prefix_hit_after_free_and_eviction_lru_tail_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    tokens = list(range(12))
    bm.allocate("a", 12)
    bm.commit("a", tokens, 12)
    table = bm.block_table("a")
    bm.free("a")
    assert bm.match_prefix(tokens) == (table, 12)
    assert bm.match_prefix(tokens[:11]) == (table[:2], 8)  # only full blocks
    # one uncached block is left; the next allocation evicts the cached TAIL first
    assert bm.allocate("b", 8)
    assert bm.match_prefix(tokens) == (table[:2], 8)
    bm.check_invariants()


def test_reset_prefix_cache_drops_only_unheld_blocks():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = list(range(8)), list(range(100, 108))
    for sid, toks in (("a", a), ("b", b)):
        bm.allocate(sid, 8)
        bm.commit(sid, toks, 8)
    held = bm.block_table("b")
    bm.free("a")
    assert bm.match_prefix(a)[1] == 8
    assert bm.reset_prefix_cache() == 2  # a's two cached blocks
    assert bm.match_prefix(a) == ([], 0)
    assert bm.num_free_blocks == 4
    bm.free("b")  # b was held during the reset: its blocks kept their hashes
    assert bm.match_prefix(b) == (held, 8)
    bm.check_invariants()


def test_reset_block_order_hands_blocks_out_in_address_order_again_when_idle():
    bm = BlockManager(num_blocks=6, block_size=BS)
    for sid in ("a", "b", "c"):
        bm.allocate(sid, 8)
        bm.commit(sid, [hash(sid) % 1000 + k for k in range(8)], 8)
    assert bm.block_table("a") == [0, 1]
    for sid in ("c", "a", "b"):  # freed out of order, tail first: the pool is shuffled
        bm.free(sid)
    bm.allocate("x", 8)
    assert bm.block_table("x") != [0, 1]
    with pytest.raises(RuntimeError, match="idle"):
        bm.reset_block_order()
    bm.free("x")
    bm.reset_block_order()
    bm.allocate("y", 24)
    assert bm.block_table("y") == [0, 1, 2, 3, 4, 5]
    assert bm.match_prefix([hash("a") % 1000 + k for k in range(8)]) == ([], 0)  # the prefix cache went too
    bm.check_invariants()


def test_prefix_hit_verifies_token_ids_and_revives_from_middle():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    bm.allocate("a", 8)
    bm.commit("a", a, 8)
    bm.free("a")
    hits, n = bm.match_prefix([1, 2, 3, 4, 9, 9, 9, 9])
    assert n == 4 and hits == bm.match_prefix(a)[0][:1]
    free_before = bm.num_free_blocks
    assert bm.allocate("b", 6, prefix_blocks=hits)
    assert bm.block_table("b")[0] == hits[0]
    assert bm.num_free_blocks == free_before - 2  # revived one + one new
    bm.check_invariants()


def test_fork_then_write_copies_shared_block_once():
    bm = BlockManager(num_blocks=8, block_size=BS)
    bm.allocate("p", 6)
    bm.fork("p", "c")
    assert bm.block_table("c") == bm.block_table("p")
    assert bm.blocks_needed("p", 6, 7) == 1
    copies = bm.prepare_write("p", 6, 7)
    src = bm.block_table("c")[1]
    assert copies == [(src, bm.block_table("p")[1])] and copies[0][0] != copies[0][1]
    assert bm.prepare_write("c", 6, 7) == []  # no longer shared
    assert bm.block_table("c")[0] == bm.block_table("p")[0]  # full block stays shared
    bm.check_invariants()


def test_blocks_freed_by_a_set_of_sequences_are_those_no_other_holds():
    bm = BlockManager(num_blocks=8, block_size=BS)
    bm.allocate("p", 6)
    assert bm.num_freed_by(["p"]) == 2
    bm.fork("p", "c")
    assert bm.num_freed_by(["p"]) == bm.num_freed_by(["c"]) == 0  # each shares both with the other
    assert bm.num_freed_by(["p", "c"]) == 2
    bm.prepare_write("c", 6, 7)  # the child's partial block is its own copy now
    assert bm.num_freed_by(["c"]) == bm.num_freed_by(["p"]) == 1
    assert bm.num_freed_by(["p", "c"], keep=bm.block_table("p")[:1]) == 2  # (one of 3 kept)
    before = bm.num_free_blocks
    bm.free("c")
    assert bm.num_free_blocks == before + 1
    assert bm.num_freed_by(["p", "nobody"]) == 2 and bm.num_freed_by([]) == 0


def test_prepare_write_out_of_blocks_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=BS)
    bm.allocate("p", 8)
    bm.fork("p", "c")
    with pytest.raises(OutOfBlocks):
        bm.prepare_write("p", 0, 8)
    assert bm.block_table("p") == bm.block_table("c")
    bm.check_invariants()


def test_duplicate_content_is_not_registered_twice():
    bm = BlockManager(num_blocks=6, block_size=BS)
    t = [5, 6, 7, 8]
    for sid in ("a", "b"):
        bm.allocate(sid, 4)
        bm.commit(sid, t, 4)
    hits, _ = bm.match_prefix(t)
    assert hits == bm.block_table("a")
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 6
    bm.check_invariants()


def test_hash_collision_is_caught_by_token_check(monkeypatch):
    import gpu.block_manager as block_manager

    # every block hash collides: only the stored token ids tell blocks apart
    monkeypatch.setattr(block_manager, "chain_hash", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=4, block_size=BS)
    bm.allocate("a", 4)
    bm.commit("a", [1, 2, 3, 4], 4)
    assert bm.match_prefix([9, 9, 9, 9]) == ([], 0)
    assert bm.match_prefix([1, 2, 3, 4]) == (bm.block_table("a"), 4)


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    bm.allocate("a", 8)
    bm.commit("a", list(range(8)), 8)
    bm.free("a")
    assert bm.match_prefix(list(range(8))) == ([], 0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    bm = BlockManager(4, BS)
    with pytest.raises(KeyError):
        bm.prepare_write("nope", 0, 1)
    bm.allocate("a", 4)
    with pytest.raises(ValueError):
        bm.prepare_write("a", 0, 5)  # table does not cover the write
    with pytest.raises(ValueError):
        bm.allocate("b", 4, prefix_blocks=[bm.block_table("a")[0]])  # not a cached block


# ---------------------------------------------------------------- state machine
# A few base prompts over a tiny alphabet so prefixes are often shared.
BASES = [[1] * 12, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 9, 9, 9, 9, 2, 2]]


class BlockManagerMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=16, block_size=BS)
        self.tokens: dict[int, list[int]] = {}  # the sequence's tokens
        self.written: dict[int, int] = {}  # positions [0, written) hold KV
        self.kv: dict[int, list[int | None]] = {}  # shadow cache
        self.next_id = 0

    def _write(self, sid: int, end: int) -> None:
        """Extend sequence `sid`'s computed KV to `end` (table already covers it)."""
        start = self.written[sid]
        copies = self.bm.prepare_write(sid, start, end)
        event(f"copy-on-write pairs: {len(copies)}")
        for src, dst in copies:
            self.kv[dst] = list(self.kv.get(src, [None] * BS))
        table = self.bm.block_table(sid)
        others = {b for o in self.tokens if o != sid for b in self.bm.block_table(o)}
        for p in range(start, end):
            block = table[p // BS]
            assert block not in others, "wrote into a shared block"
            self.kv.setdefault(block, [None] * BS)[p % BS] = self.tokens[sid][p]
        self.written[sid] = end
        self.bm.commit(sid, self.tokens[sid], end)

    @rule(
        target=seqs,
        base=st.sampled_from(BASES),
        suffix=st.lists(st.integers(1, 3), max_size=6),
        frac=st.floats(0, 1),
    )
    def new_seq(self, base, suffix, frac):
        tokens = base + suffix
        hits, cached = self.bm.match_prefix(tokens[:-1])
        for i, b in enumerate(hits):
            assert self.kv[b] == tokens[i * BS : (i + 1) * BS], "prefix hit with other tokens"
        event(f"prefix hit blocks: {len(hits)}")
        end = cached + 1 + int(frac * (len(tokens) - cached - 1))
        sid, self.next_id = self.next_id, self.next_id + 1
        free = self.bm.num_free_blocks
        if not self.bm.allocate(sid, end, prefix_blocks=hits):
            assert self.bm.num_free_blocks == free and self.bm.block_table(sid) == []
            event("allocate refused")
            return multiple()  # no sequence was created
        self.tokens[sid], self.written[sid] = tokens, cached
        self._try_write(sid, end)
        return sid

    def _try_write(self, sid: int, end: int) -> bool:
        start = self.written[sid]
        if self.bm.blocks_needed(sid, start, end) > self.bm.num_free_blocks:
            return False
        self._write(sid, end)
        return True

    @rule(sid=seqs, new=st.lists(st.integers(1, 3), max_size=5))
    def extend(self, sid, new):
        if sid not in self.tokens:
            return
        self.tokens[sid] = self.tokens[sid] + new
        end = len(self.tokens[sid])
        if not self.bm.allocate(sid, end):
            return
        self._try_write(sid, end)

    @rule(target=seqs, sid=seqs)
    def fork(self, sid):
        if sid not in self.tokens:
            return sid
        child, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(sid, child)
        self.tokens[child] = list(self.tokens[sid])
        self.written[child] = self.written[sid]
        return child

    @rule(sid=consumes(seqs))
    def free(self, sid):
        if sid in self.tokens:
            del self.tokens[sid], self.written[sid]
        self.bm.free(sid)

    @invariant()
    def consistent(self):
        self.bm.check_invariants()
        for sid, tokens in self.tokens.items():
            table = self.bm.block_table(sid)
            read = [self.kv[table[p // BS]][p % BS] for p in range(self.written[sid])]
            assert read == tokens[: self.written[sid]]

    def teardown(self):
        for sid in list(self.tokens):
            self.bm.free(sid)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks, "leaked blocks"


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_manager_state_machine = BlockManagerMachine.TestCase
