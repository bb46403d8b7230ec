"""The scheduler on its own (no model, no engine): the token budget, chunked prompts, admission, preemption,
and memory handed back after every way a sequence can end."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from glimpse.engine.cache import BlockPool, CacheManager, SlotPool
from glimpse.engine.prefix_cache import PrefixCache, prompt_block_hashes, snapshot_points
from glimpse.engine.request import Request, Sequence, SequenceStatus
from glimpse.engine.scheduler import Scheduler
from glimpse.sampling_params import SamplingParams

BLOCK = 4
SAMPLED = 7  # the token every completed chunk "samples"

_ids = itertools.count()


def make_scheduler(
    num_blocks: int = 64,
    num_slots: int = 8,
    budget: int = 64,
    max_num_seqs: int = 8,
    prefix: bool = False,
    copies: list[tuple[int, int]] | None = None,
) -> Scheduler:
    """A scheduler over fresh pools; Mamba state copies (src_slot, dst_slot) are recorded in `copies`."""
    record = [] if copies is None else copies
    cache = CacheManager(
        BlockPool(num_blocks, BLOCK),
        SlotPool(num_slots),
        PrefixCache() if prefix else None,
        lambda src, dst: record.append((src, dst)),
    )
    return Scheduler(cache, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)


def add_request(
    sched: Scheduler,
    prompt: list[int] | int,
    max_tokens: int = 16,
    n: int = 1,
    points: set[int] | None = None,
) -> list[Sequence]:
    """Queue a request as the engine does: block hashes and snapshot points when prefix caching is on."""
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else list(prompt)
    i = next(_ids)
    req = Request(f"r{i}", None, tokens, SamplingParams(max_tokens=max_tokens), arrival=i)
    if sched.cache.prefix is not None:
        req.block_hashes = prompt_block_hashes(tokens, [], BLOCK)
        points = snapshot_points(len(tokens), [], BLOCK) if points is None else points
    for k in range(n):
        seq = Sequence(next(_ids), req, k, snapshot_points=set(points or ()))
        req.sequences.append(seq)
        sched.add(seq)
    return req.sequences


@dataclass
class Step:
    """What one step scheduled, as it was before the step ran (a chunk's start moves as tokens are computed)."""

    chunks: list[tuple[Sequence, int, int, bool]]  # (sequence, start, num_tokens, completes)
    preempted: list[Sequence]

    @property
    def sizes(self) -> list[tuple[Sequence, int]]:
        return [(seq, n) for seq, _, n, _ in self.chunks]


def step(sched: Scheduler) -> Step:
    """Schedule, then do the engine's bookkeeping of a forward pass: count the computed tokens, let the
    cache record them, sample a token for each chunk that completes its sequence, finish at max_tokens."""
    out = sched.schedule()
    assert 0 < out.num_tokens <= sched.max_num_batched_tokens or not out.chunks
    done = Step([(c.seq, c.start, c.num_tokens, c.completes) for c in out.chunks], list(out.preempted))
    for seq, _, n, completes in done.chunks:
        seq.num_computed_tokens += n
        sched.cache.on_computed(seq)
        if completes:
            seq.output_token_ids.append(SAMPLED)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                sched.finish(seq)
    assert_consistent(sched)
    return done


def assert_consistent(sched: Scheduler) -> None:
    """Every block and slot is in exactly one place: held by running sequences (counted by reference),
    kept by the prefix cache, or free."""
    cache = sched.cache
    blocks, slots, prefix = cache.blocks, cache.slots, cache.prefix
    for seq in sched.waiting:
        assert seq.status == SequenceStatus.WAITING and not seq.block_ids and seq.slot is None
    holders = Counter(b for seq in sched.running for b in seq.block_ids)
    assert blocks.ref_count == [holders[b] for b in range(blocks.num_blocks)]
    evictable = set(prefix.evictable) if prefix else set()
    assert not evictable & set(holders)
    assert blocks.num_free + len(evictable) + len(holders) == blocks.num_blocks
    running_slots = [seq.slot for seq in sched.running]
    snapshot_slots = list(prefix.snapshots.values()) if prefix else []
    assert None not in running_slots
    assert len(set(running_slots + snapshot_slots)) == len(running_slots) + len(snapshot_slots)
    assert slots.num_free + len(running_slots) + len(snapshot_slots) == slots.num_slots
    for seq in sched.running:
        assert seq.status == SequenceStatus.RUNNING
        assert len(seq.block_ids) >= blocks.blocks_needed(seq.num_computed_tokens)
    assert len(sched.running) <= sched.max_num_seqs


def assert_all_free(sched: Scheduler) -> None:
    cache = sched.cache
    prefix = cache.prefix
    assert cache.all_free()
    assert cache.blocks.num_free + (len(prefix.evictable) if prefix else 0) == cache.blocks.num_blocks
    assert cache.slots.num_free + (len(prefix.snapshots) if prefix else 0) == cache.slots.num_slots


# The token budget -------------------------------------------------------------------------------------------
def test_decodes_go_first_then_waiting_prompts_take_what_the_budget_leaves():
    sched = make_scheduler(budget=8)
    a, b = add_request(sched, 3) + add_request(sched, 3)
    assert step(sched).sizes == [(a, 3), (b, 3)]  # both prompts fit: prefill together
    (c,) = add_request(sched, 20)
    out = step(sched)
    assert out.sizes == [(a, 1), (b, 1), (c, 6)]
    assert [(start, completes) for _, start, _, completes in out.chunks] == [(3, True), (3, True), (0, False)]


def test_a_long_prompt_is_chunked_across_steps_then_decodes_one_token_a_step():
    sched = make_scheduler(budget=8)
    (a,) = add_request(sched, 20, max_tokens=3)
    chunks = [step(sched).chunks[0][1:] for _ in range(5)]
    assert chunks == [
        (0, 8, False),
        (8, 8, False),
        (16, 4, True),  # the rest of the prompt; the first token is sampled
        (20, 1, True),
        (21, 1, True),  # max_tokens=3 reached: finished
    ]
    assert a.output_token_ids == [SAMPLED] * 3 and a.is_finished and not sched.has_work


def test_waiting_prompts_share_the_budget_in_arrival_order():
    sched = make_scheduler(budget=10)
    a, b = add_request(sched, 6) + add_request(sched, 6)
    assert step(sched).sizes == [(a, 6), (b, 4)]
    assert step(sched).sizes == [(a, 1), (b, 2)]  # running first: a decodes, b finishes its prompt


def test_running_prompts_can_use_the_whole_budget_and_keep_new_ones_waiting():
    sched = make_scheduler(budget=8)
    (a,) = add_request(sched, 30)
    step(sched)
    (b,) = add_request(sched, 2)
    assert step(sched).sizes == [(a, 8)]
    assert list(sched.waiting) == [b] and b.slot is None and sched.cache.slots.num_free == 7


def test_max_num_seqs_caps_the_running_sequences():
    sched = make_scheduler(max_num_seqs=2)
    a, b, c = add_request(sched, 2, max_tokens=2) + add_request(sched, 2) + add_request(sched, 2)
    assert step(sched).sizes == [(a, 2), (b, 2)]
    assert list(sched.waiting) == [c]
    assert step(sched).sizes == [(a, 1), (b, 1)]  # a is finished by this step (max_tokens=2)
    assert step(sched).sizes == [(b, 1), (c, 2)]


def test_no_free_slot_no_admission():
    sched = make_scheduler(num_slots=1)
    a, b = add_request(sched, 2) + add_request(sched, 2)
    assert step(sched).sizes == [(a, 2)]
    assert list(sched.waiting) == [b]


def test_a_waiting_sequence_that_does_not_fit_holds_back_those_behind_it_and_keeps_nothing():
    sched = make_scheduler(num_blocks=4, budget=64)
    (a,) = add_request(sched, 6)  # 2 of the 4 blocks, with room for 2 more tokens
    step(sched)
    big, small = add_request(sched, 12) + add_request(sched, 2)  # big needs 3 blocks, small 1
    assert step(sched).sizes == [(a, 1)]
    assert list(sched.waiting) == [big, small]  # first come, first served: small does not overtake
    assert big.slot is None and not big.block_ids and sched.cache.slots.num_free == 7
    assert sched.cache.blocks.num_free == 2


def test_a_prompt_chunk_ends_at_each_snapshot_point():
    sched = make_scheduler(budget=64)
    (a,) = add_request(sched, 30, points={8, 20, 30})
    chunks = [step(sched).chunks[0][1:3] for _ in range(3)]
    assert chunks == [(0, 8), (8, 12), (20, 10)]  # a point at the prompt's end splits nothing


# Preemption -------------------------------------------------------------------------------------------------
def test_memory_short_preempts_the_newest_running_sequence_and_frees_its_memory():
    sched = make_scheduler(num_blocks=6, num_slots=4)
    a, b, c = add_request(sched, 8) + add_request(sched, 8) + add_request(sched, 8)  # 2 blocks each
    step(sched)
    c_slot = c.slot
    out = step(sched)  # each now needs a third block for its 9th token; only c's two can be had
    assert out.preempted == [c]
    assert out.sizes == [(a, 1), (b, 1)]
    assert len(a.block_ids) == len(b.block_ids) == 3
    assert c.status == SequenceStatus.WAITING and list(sched.waiting) == [c]
    assert c.num_computed_tokens == 0 and not c.block_ids and c.slot is None
    assert sched.cache.slots.num_free == 2 and c_slot not in (a.slot, b.slot)
    assert c.num_preemptions == 1 and sched.num_preemptions == 1


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_newest():
    sched = make_scheduler(num_blocks=4)
    a, b = add_request(sched, 6) + add_request(sched, 8)  # 2 blocks each; a has room for 2 more tokens
    step(sched)
    out = step(sched)
    assert out.sizes == [(a, 1)] and out.preempted == [b]
    assert list(sched.running) == [a] and list(sched.waiting) == [b]
    assert sched.cache.blocks.num_free == 2


def test_a_step_that_preempted_admits_nobody_even_with_room_left():
    sched = make_scheduler(num_blocks=4, budget=6)
    a, b = add_request(sched, 4) + add_request(sched, 8)
    for _ in range(3):  # b's prompt comes in chunks beside a's decodes: 2 blocks each at the end
        step(sched)
    assert len(a.block_ids) == len(b.block_ids) == 2 and b.output_token_ids == [SAMPLED]
    out = step(sched)  # b needs a third block and is the newest: it preempts itself
    assert out.preempted == [b] and out.sizes == [(a, 1)]
    # b's first 5 tokens (2 blocks) would fit the budget and memory left, yet it waits for the next step.
    assert list(sched.waiting) == [b] and sched.cache.blocks.num_free == 2
    assert step(sched).sizes == [(a, 1), (b, 5)]


def test_a_preempted_sequence_is_readmitted_first_and_recomputes_its_prompt_and_outputs():
    sched = make_scheduler(num_blocks=4, num_slots=4)
    a, b = add_request(sched, 4, max_tokens=2) + add_request(sched, 8, max_tokens=3)
    step(sched)  # a: 1 block, b: 2 blocks; both sample a token
    (c,) = add_request(sched, 2)
    out = step(sched)  # a needs a 2nd block: the last free one. b needs a 3rd: none left, it preempts itself
    assert out.preempted == [b] and out.sizes == [(a, 1)]  # nobody is admitted in a step that preempted
    assert list(sched.waiting) == [b, c]  # the preempted sequence goes back to the front of the line
    assert a.is_finished  # max_tokens=2: its memory is back
    out = step(sched)
    assert out.sizes == [(b, 9), (c, 2)]  # b recomputes its 8 prompt tokens and the token it sampled
    assert out.chunks[0][3] and b.output_token_ids == [SAMPLED, SAMPLED]


def test_a_preempted_sequence_caches_the_blocks_it_recomputes():
    sched = make_scheduler(num_blocks=6, num_slots=2, prefix=True)  # no slot to spare for a snapshot
    a, b = add_request(sched, 10) + add_request(sched, list(range(50, 60)))  # 3 blocks each in the end
    for _ in range(4):
        step(sched)
    out = step(sched)  # a needs a 4th block: b is preempted; its 2 full blocks stay cached, evictable
    assert out.preempted == [b] and len(sched.cache.prefix.evictable) == 2
    out = step(sched)  # no snapshot to resume from: b recomputes into the blocks it evicts
    assert out.sizes == [(a, 1), (b, 8)] and b.num_cached_tokens == 0
    assert not sched.cache.prefix.evictable
    assert all(sched.cache.prefix.keeps(block) for block in b.block_ids[:2])


# Ending ----------------------------------------------------------------------------------------------------
def test_finish_frees_a_running_sequence_and_drops_a_waiting_one():
    sched = make_scheduler(num_slots=1)
    a, b = add_request(sched, 10) + add_request(sched, 10)
    step(sched)
    sched.finish(b)  # waiting: never held anything
    assert b.is_finished and not sched.waiting
    sched.finish(a)  # running, decoding
    assert a.is_finished and not sched.running and not sched.has_work
    assert a.slot is None and not a.block_ids
    assert_all_free(sched)


def test_aborts_in_every_state_leave_every_block_and_slot_free():
    copies: list[tuple[int, int]] = []
    sched = make_scheduler(num_blocks=12, num_slots=6, budget=12, max_num_seqs=2, prefix=True, copies=copies)
    shared = list(range(100, 116))
    (done,) = add_request(sched, shared + [1], max_tokens=1)
    step(sched)
    done_slot = done.slot
    while not done.is_finished:  # its prompt is cached and its state snapshotted at 16 tokens
        step(sched)
    (snapshot,) = sched.cache.prefix.snapshots.values()
    assert copies == [(done_slot, snapshot)]
    hit, decoding = add_request(sched, shared + [2] * 9) + add_request(sched, 3)
    (waiting,) = add_request(sched, 40)
    out = step(sched)
    assert out.sizes == [(hit, 8), (decoding, 3)]  # hit resumes at 16 and stops at its snapshot point
    assert hit.num_cached_tokens == 16 and hit.is_prefilling and decoding.output_token_ids == [SAMPLED]
    assert copies[1] == (snapshot, hit.slot)
    assert list(sched.waiting) == [waiting]
    for seq in (hit, decoding, waiting):
        sched.finish(seq)
    assert_all_free(sched)


@pytest.mark.parametrize("prefix", [False, True], ids=["plain", "prefix_cache"])
@pytest.mark.parametrize("seed", range(4))
def test_a_random_workload_with_aborts_and_preemptions_leaks_nothing(seed, prefix):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=14, num_slots=5, budget=16, max_num_seqs=4, prefix=prefix)
    # Prompts are one of three heads plus a tail (prefix hits); sequences end by max_tokens or by an abort.
    heads = [[rng.randrange(1, 50) for _ in range(rng.randint(4, 20))] for _ in range(3)]
    seqs: list[Sequence] = []
    for _ in range(400):
        if len(seqs) < 40 and rng.random() < 0.5:
            prompt = rng.choice(heads) + [rng.randrange(1, 50) for _ in range(rng.randint(1, 20))]
            seqs += add_request(sched, prompt, max_tokens=rng.randint(1, 8), n=rng.choice([1, 1, 2]))
        live = [s for s in seqs if not s.is_finished]
        if live and rng.random() < 0.05:
            sched.finish(rng.choice(live))  # an abort, in whatever state the sequence is
            assert_consistent(sched)
        step(sched)
        if len(seqs) >= 40 and not sched.has_work:
            break
    assert not sched.has_work and all(s.is_finished for s in seqs)
    assert sched.num_preemptions > 0  # memory for 56 tokens, prompts up to 40: the workload preempts
    assert not prefix or sched.cache.prefix.hit_tokens > 0  # and shares prompt heads
    assert_all_free(sched)
