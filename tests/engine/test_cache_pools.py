"""The memory pools and the prefix cache on their own: slots and blocks handed out once, reference counts,
block hashes and snapshot points, hits from snapshots, and least-recently-used eviction."""

from __future__ import annotations

import itertools

import pytest

from glimpse.engine.cache import BlockPool, CacheManager, SlotPool
from glimpse.engine.prefix_cache import (
    MIN_MEDIA_TOKENS_FOR_SNAPSHOT,
    PrefixCache,
    prompt_block_hashes,
    snapshot_points,
)
from glimpse.engine.request import MediaSpan, Request, Sequence
from glimpse.sampling_params import SamplingParams

BS = 4
_ids = itertools.count()


def span(start: int, length: int, content_hash: str) -> MediaSpan:
    return MediaSpan(start=start, embeddings=None, length=length, content_hash=content_hash)


def make_seq(tokens: list[int]) -> Sequence:
    """A sequence set up as the engine sets it up with prefix caching on."""
    i = next(_ids)
    req = Request(f"r{i}", None, list(tokens), SamplingParams(), arrival=i)
    req.block_hashes = prompt_block_hashes(req.prompt_token_ids, [], BS)
    seq = Sequence(i, req, 0, snapshot_points=snapshot_points(len(tokens), [], BS))
    req.sequences.append(seq)
    return seq


class Manager:
    """A CacheManager with a prefix cache and a state-copy callback that records its calls."""

    def __init__(self, num_blocks: int = 16, num_slots: int = 4) -> None:
        self.copies: list[tuple[int, int]] = []
        self.prefix = PrefixCache()
        self.cache = CacheManager(
            BlockPool(num_blocks, BS),
            SlotPool(num_slots),
            self.prefix,
            lambda s, d: self.copies.append((s, d)),
        )

    def compute(self, seq: Sequence, upto: int | None = None) -> None:
        """Compute the sequence's prompt up to `upto` tokens (all of it by default), a chunk per snapshot
        point, recording each chunk as the engine does."""
        end = seq.num_prompt_tokens if upto is None else upto
        for stop in sorted(p for p in seq.snapshot_points if seq.num_computed_tokens < p < end) + [end]:
            assert self.cache.grow(seq, stop)
            seq.num_computed_tokens = stop
            self.cache.on_computed(seq)

    def serve(self, tokens: list[int]) -> Sequence:
        """Admit, compute and free a sequence: its blocks and snapshot stay in the prefix cache."""
        seq = make_seq(tokens)
        assert self.cache.admit(seq)
        self.compute(seq)
        self.cache.free(seq)
        return seq

    @property
    def snapshot_slots(self) -> list[int]:
        return list(self.prefix.snapshots.values())


# Slots ------------------------------------------------------------------------------------------------------
def test_slot_pool_hands_out_each_slot_once_and_takes_it_back():
    pool = SlotPool(3)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.allocate() is None and pool.num_free == 0
    pool.free(1)
    assert pool.num_free == 1 and pool.allocate() == 1


def test_slot_pool_refuses_a_double_free():
    pool = SlotPool(2)
    pool.free(pool.allocate())
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free(0)


# Blocks -----------------------------------------------------------------------------------------------------
def test_blocks_needed_rounds_up_to_whole_blocks():
    pool = BlockPool(8, BS)
    assert [pool.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_block_allocation_is_all_or_nothing():
    pool = BlockPool(4, BS)
    blocks = pool.allocate(3)
    assert sorted(blocks) == [0, 1, 2] and [pool.ref_count[b] for b in blocks] == [1, 1, 1]
    assert pool.allocate(2) is None and pool.num_free == 1
    assert pool.allocate(1) == [3] and pool.num_free == 0


def test_a_block_is_dropped_when_its_last_reference_is_released():
    pool = BlockPool(4, BS)
    a, b = pool.allocate(2)
    pool.retain(a)  # a second sequence shares a
    assert pool.release([a, b]) == [b] and pool.ref_count[a] == 1
    assert pool.release([a]) == [a] and pool.ref_count[a] == 0
    with pytest.raises(AssertionError, match="released twice"):
        pool.release([a])
    assert pool.num_free == 2  # released blocks are not free until given back
    pool.give_back([a, b])
    assert pool.num_free == 4 and sorted(pool.allocate(4)) == [0, 1, 2, 3]


# The manager without a prefix cache --------------------------------------------------------------------------
def test_grow_takes_only_the_missing_blocks_and_nothing_when_short():
    cache = CacheManager(BlockPool(3, BS), SlotPool(1))
    seq = make_seq([1] * 5)
    assert cache.grow(seq, 5) and len(seq.block_ids) == 2
    assert cache.grow(seq, 8) and len(seq.block_ids) == 2
    assert not cache.grow(seq, 13)  # needs 2 more, 1 left
    assert len(seq.block_ids) == 2 and cache.blocks.num_free == 1


def test_admission_needs_a_slot_and_free_gives_everything_back():
    cache = CacheManager(BlockPool(4, BS), SlotPool(1))
    a, b = make_seq([1, 2, 3]), make_seq([1, 2, 3])
    assert cache.admit(a) and a.slot == 0
    assert not cache.admit(b) and b.slot is None
    cache.grow(a, 3)
    assert not cache.all_free()
    cache.free(a)
    assert a.slot is None and a.block_ids == []
    assert cache.all_free() and cache.blocks.num_free == 4 and cache.slots.num_free == 1


# Block hashes and snapshot points ---------------------------------------------------------------------------
def test_block_hashes_cover_full_blocks_and_chain_each_to_the_one_before():
    tokens = list(range(10))
    hashes = prompt_block_hashes(tokens, [], BS)
    assert len(hashes) == 2 and hashes == prompt_block_hashes(tokens[:8], [], BS)
    assert prompt_block_hashes(tokens[:6] + [99] + tokens[7:], [], BS)[0] == hashes[0]
    changed_first = prompt_block_hashes([99] + tokens[1:], [], BS)
    assert changed_first[0] != hashes[0] and changed_first[1] != hashes[1]  # same tokens, other prefix
    repeated = prompt_block_hashes([5, 6, 7, 8] * 2, [], BS)
    assert repeated[0] != repeated[1]  # the same tokens at another position are another block


def test_media_content_changes_the_hash_of_the_blocks_it_touches():
    placeholders = [9] * 16
    plain = prompt_block_hashes(placeholders, [], BS)
    cat = prompt_block_hashes(placeholders, [span(4, 6, "image:cat")], BS)  # tokens 4..9: blocks 1 and 2
    dog = prompt_block_hashes(placeholders, [span(4, 6, "image:dog")], BS)
    assert cat[0] == dog[0] == plain[0]  # a span starting at a block boundary leaves the block before alone
    assert all(c != d for c, d in zip(cat[1:], dog[1:]))
    assert cat[1:] != plain[1:]
    moved = prompt_block_hashes(placeholders, [span(5, 6, "image:cat")], BS)
    assert moved[1] != cat[1]  # where the media sits counts too
    assert prompt_block_hashes(placeholders, [span(4, 6, "image:cat")], BS) == cat


def test_snapshot_points_end_the_last_full_block_before_the_prompt_ends():
    assert snapshot_points(9, [], BS) == {8}
    assert snapshot_points(8, [], BS) == {4}  # a point leaves at least one prompt token to compute
    assert snapshot_points(5, [], BS) == {4}
    assert snapshot_points(4, [], BS) == set()


def test_snapshot_points_end_large_media_on_a_block_boundary():
    big = MIN_MEDIA_TOKENS_FOR_SNAPSHOT
    assert snapshot_points(100, [span(6, big, "image:a")], 16) == {64, 96}  # the image ends at 70
    assert snapshot_points(100, [span(6, big - 1, "image:a")], 16) == {96}  # too small to be worth a slot
    assert snapshot_points(80, [span(10, 70, "image:a")], 16) == {64}  # ends with the prompt


# The prefix cache through the manager ------------------------------------------------------------------------
PROMPT = list(range(100, 109))  # 9 tokens: 2 full blocks, a snapshot after 8


def test_a_finished_prompt_leaves_its_blocks_and_a_snapshot_for_the_next_one():
    m = Manager(num_blocks=8, num_slots=3)
    a = make_seq(PROMPT)
    assert m.cache.admit(a) and a.num_computed_tokens == 0 and m.copies == []  # nothing cached yet
    m.compute(a)
    assert m.copies == [(a.slot, m.snapshot_slots[0])]  # the state after 8 tokens, into a free slot
    first_two = a.block_ids[:2]
    m.cache.free(a)
    assert list(m.prefix.evictable) == first_two  # kept; the partial third block is free again
    assert m.cache.blocks.num_free == 6 and m.cache.all_free()

    b = make_seq(PROMPT[:8] + [1, 2, 3])
    assert m.cache.admit(b)
    assert b.block_ids == first_two and b.num_computed_tokens == b.num_cached_tokens == 8
    assert m.copies[-1] == (m.snapshot_slots[0], b.slot)  # the snapshot is copied into b's own slot
    assert [m.cache.blocks.ref_count[x] for x in first_two] == [1, 1] and not m.prefix.evictable
    assert (m.prefix.queries, m.prefix.query_tokens, m.prefix.hit_tokens) == (2, 9 + 11, 8)


def test_a_hit_always_leaves_a_token_to_compute():
    m = Manager()
    m.serve(PROMPT)
    same_blocks = make_seq(PROMPT[:8])  # its 2 blocks are cached and snapshotted, but that is all of it
    assert m.cache.admit(same_blocks) and same_blocks.num_computed_tokens == 0
    assert len(m.copies) == 1  # only the first sequence's snapshot


def test_cached_blocks_without_a_snapshot_give_no_hit_but_a_snapshot_point():
    m = Manager()
    a = m.serve(list(range(100, 113)))  # 13 tokens: a snapshot after 12 only
    b = make_seq(list(range(100, 108)) + [1, 2, 3, 4, 5])  # shares 8 tokens with it
    assert m.cache.admit(b) and b.num_computed_tokens == 0
    assert b.snapshot_points == {8, 12} and a.snapshot_points == {12}
    m.compute(b)  # its state after the shared 8 tokens is kept now: that head is evidently popular
    assert b.request.block_hashes[1] in m.prefix.snapshots
    c = make_seq(list(range(100, 108)) + [7, 7])
    assert m.cache.admit(c) and c.num_computed_tokens == 8


def test_shared_blocks_are_reference_counted():
    m = Manager()
    a = make_seq(PROMPT)
    m.cache.admit(a)
    m.compute(a)
    b = make_seq(PROMPT)
    m.cache.admit(b)
    shared = a.block_ids[:2]
    assert b.block_ids == shared and [m.cache.blocks.ref_count[x] for x in shared] == [2, 2]
    m.cache.free(a)
    assert [m.cache.blocks.ref_count[x] for x in shared] == [1, 1] and not m.prefix.evictable
    assert not m.cache.all_free()
    m.cache.free(b)
    assert list(m.prefix.evictable) == shared and m.cache.all_free()


def test_a_block_computed_twice_is_cached_once():
    m = Manager(num_blocks=8, num_slots=4)
    a, b = make_seq(PROMPT), make_seq(PROMPT)
    m.cache.admit(a)
    m.cache.admit(b)  # before a computed anything: no hit, b computes the same blocks again
    m.compute(a)
    m.compute(b)
    assert len(m.copies) == 2 and len(m.snapshot_slots) == 1  # b's duplicate snapshot slot went back
    cached = a.block_ids[:2]
    assert [m.prefix.block_by_hash[h] for h in a.request.block_hashes] == cached
    m.cache.free(a)
    m.cache.free(b)
    assert list(m.prefix.evictable) == cached  # b's copies of the same blocks are simply free
    assert m.cache.blocks.num_free == 6 and m.cache.slots.num_free == 3


def test_cached_blocks_are_evicted_least_recently_released_first():
    m = Manager(num_blocks=6, num_slots=4)
    a = m.serve(PROMPT)  # a0 a1 cached, a2 freed
    b = m.serve(list(range(200, 209)))  # b0 b1 cached
    a0, a1 = (
        m.prefix.block_by_hash[a.request.block_hashes[0]],
        m.prefix.block_by_hash[a.request.block_hashes[1]],
    )
    b0, b1 = (
        m.prefix.block_by_hash[b.request.block_hashes[0]],
        m.prefix.block_by_hash[b.request.block_hashes[1]],
    )
    assert list(m.prefix.evictable) == [a0, a1, b0, b1]
    m.serve(PROMPT)  # a hit: a's blocks are used again, so they are now the most recently released
    assert list(m.prefix.evictable) == [b0, b1, a0, a1]
    c = make_seq([7] * 12)
    assert m.cache.admit(c) and m.cache.grow(c, 12)  # 3 blocks, 2 free: b0 is evicted
    assert b0 in c.block_ids and not m.prefix.keeps(b0) and m.prefix.keeps(b1)
    assert list(m.prefix.evictable) == [b1, a0, a1]


def test_evicting_the_block_a_snapshot_ends_at_frees_the_snapshot():
    m = Manager(num_blocks=4, num_slots=3)
    a = m.serve(PROMPT)
    assert len(m.snapshot_slots) == 1 and m.cache.slots.num_free == 2
    b = make_seq([7] * 16)
    assert m.cache.admit(b) and m.cache.grow(b, 16)  # every block: a's two cached ones are evicted
    assert not m.prefix.evictable and not m.prefix.block_by_hash
    assert m.snapshot_slots == [] and m.cache.slots.num_free == 2  # a's snapshot is useless and gone
    m.cache.free(b)
    again = make_seq(a.prompt_token_ids)
    assert m.cache.admit(again) and again.num_computed_tokens == 0


def test_snapshots_are_evicted_least_recently_used_first_when_slots_run_short():
    m = Manager(num_blocks=16, num_slots=3)
    a = m.serve(PROMPT)
    m.serve(list(range(200, 209)))
    slot_a, slot_b = m.snapshot_slots
    m.serve(PROMPT)  # a hit on a's snapshot: it is the most recently used now
    assert m.snapshot_slots == [slot_b, slot_a]
    c, d = make_seq([7] * 3), make_seq([8] * 3)
    assert m.cache.admit(c)  # the free slot
    assert m.cache.admit(d) and d.slot == slot_b  # running sequences win a slot from the oldest snapshot
    assert m.snapshot_slots == [slot_a]
    e = make_seq([9] * 3)
    assert m.cache.admit(e) and e.slot == slot_a and not m.prefix.snapshots
    assert not m.cache.admit(make_seq([6] * 3))  # no slot and no snapshot left
    for seq in (c, d, e):
        m.cache.free(seq)
    again = make_seq(a.prompt_token_ids)
    assert m.cache.admit(again) and again.num_computed_tokens == 0  # blocks alone do not resume Mamba


def test_a_new_snapshot_replaces_the_least_recently_used_one_when_no_slot_is_free():
    m = Manager(num_blocks=16, num_slots=3)
    a, b = m.serve(PROMPT), m.serve(list(range(200, 209)))
    c = make_seq(list(range(300, 309)))
    assert m.cache.admit(c)  # the last free slot
    m.compute(c)
    hashes = [seq.request.block_hashes[1] for seq in (b, c)]  # each snapshot follows its 2nd block
    assert list(m.prefix.snapshots) == hashes and a.request.block_hashes[1] not in m.prefix.snapshots


def test_no_snapshot_when_every_slot_is_running():
    m = Manager(num_blocks=16, num_slots=2)
    a, b = make_seq(PROMPT), make_seq([7] * 3)
    m.cache.admit(a)
    m.cache.admit(b)
    m.compute(a)  # at 8 tokens no slot is free and no snapshot can be given up
    assert m.copies == [] and not m.prefix.snapshots
    assert len(m.prefix.block_by_hash) == 2  # its blocks are cached all the same
