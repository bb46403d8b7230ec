"""Prefix caching for a hybrid model: attention blocks by content, Mamba states at chosen boundaries.

A full block of tokens is identified by a chained hash of its tokens, the hash before it, and the content
hashes of any media in it (the placeholder tokens of two images are the same; their pixels are not).
Attention K/V can resume at any cached block boundary, but a Mamba layer carries the whole prefix in one
state, so a prefix is only reusable up to a boundary where a state snapshot was kept. Snapshots cost a
whole state slot each (about 142 MiB at 12B in fp32), so they are kept sparsely, where reuse is likely:
at the end of a prompt's last full block (the same prompt, or the next turn of a chat) and at the block
boundary ending large media (the same document or video with a new question); and where a new prompt is
seen to share more cached blocks with earlier ones than any snapshot covers (a common system prompt), the
new prompt snapshots that boundary, so later ones resume there.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

MIN_MEDIA_TOKENS_FOR_SNAPSHOT = 64
MAX_MEDIA_SNAPSHOTS = 2


def prompt_block_hashes(token_ids: list[int], media_spans, block_size: int) -> list[bytes]:
    """Chained hashes of the prompt's full blocks."""
    out: list[bytes] = []
    prev = b""
    for i in range(len(token_ids) // block_size):
        lo, hi = i * block_size, (i + 1) * block_size
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(array("q", token_ids[lo:hi]).tobytes())
        for span in media_spans:
            if span.start < hi and span.end > lo:
                h.update(f"|{span.content_hash}:{span.start}:{span.length}".encode())
        prev = h.digest()
        out.append(prev)
    return out


def _media_item(span) -> str:
    """Which media item a span belongs to: a video's frames are one span each but one item."""
    key = span.content_hash or ""
    return ":".join(key.split(":")[:2]) if key.startswith("video:") else key


def snapshot_points(num_prompt_tokens: int, media_spans, block_size: int) -> set[int]:
    """Token counts after which the Mamba state is worth keeping (block boundaries before the prompt's end):
    the prompt's last full block, and the end of each of the last MAX_MEDIA_SNAPSHOTS media items (a video
    counts once, after its last frame). Each point ends a prompt chunk, so they are kept few: a point per
    video frame made a 32-frame prompt take 32 engine steps."""
    points = set()
    last = (num_prompt_tokens - 1) // block_size * block_size
    if last > 0:
        points.add(last)
    ends: dict[str, int] = {}  # item -> end of its last span, in prompt order
    sizes: dict[str, int] = {}
    for span in media_spans:
        item = _media_item(span)
        ends[item] = max(ends.get(item, 0), span.end)
        sizes[item] = sizes.get(item, 0) + span.length
        first = ends.pop(item)  # re-insert: dict order follows each item's last span
        ends[item] = first
    big = [end for item, end in ends.items() if sizes[item] >= MIN_MEDIA_TOKENS_FOR_SNAPSHOT]
    for end in big[-MAX_MEDIA_SNAPSHOTS:]:
        b = end // block_size * block_size
        if 0 < b < num_prompt_tokens:
            points.add(b)
    return points


class PrefixCache:
    def __init__(self) -> None:
        self.block_by_hash: dict[bytes, int] = {}
        self.hash_of_block: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()  # block hash -> state slot, oldest first
        self.queries = 0
        self.query_tokens = 0
        self.hit_tokens = 0

    # Blocks ---------------------------------------------------------------------------------------------
    def keeps(self, block: int) -> bool:
        return block in self.hash_of_block

    def make_evictable(self, block: int) -> None:
        self.evictable[block] = None

    def evict_block(self) -> tuple[int, int | None]:
        """Forget the least recently released block; returns it and the slot of a snapshot that ended at
        it (useless now: a match needs every block of the prefix), if any."""
        block, _ = self.evictable.popitem(last=False)
        h = self.hash_of_block.pop(block)
        del self.block_by_hash[h]
        return block, self.snapshots.pop(h, None)

    def register_blocks(self, seq, block_size: int) -> None:
        hashes = seq.request.block_hashes
        full = min(seq.num_computed_tokens // block_size, len(hashes))
        for i in range(seq.num_registered_blocks, full):
            h, b = hashes[i], seq.block_ids[i]
            if h not in self.block_by_hash and b not in self.hash_of_block:
                self.block_by_hash[h] = b
                self.hash_of_block[b] = h
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    # Snapshots ------------------------------------------------------------------------------------------
    def add_snapshot(self, seq, block_size: int, slot: int) -> bool:
        h = seq.request.block_hashes[seq.num_computed_tokens // block_size - 1]
        if h in self.snapshots:
            self.snapshots.move_to_end(h)
            return False
        self.snapshots[h] = slot
        return True

    def evict_snapshot(self) -> int:
        _, slot = self.snapshots.popitem(last=False)
        return slot

    # Lookup ---------------------------------------------------------------------------------------------
    def match(self, seq, blocks) -> tuple[list[int], int] | None:
        """The longest cached prefix that ends at a snapshot and leaves at least one token to compute (and
        every position whose logits the prompt logprobs still need): (its blocks, retained for the sequence;
        the snapshot's slot), or None."""
        hashes = seq.request.block_hashes
        self.queries += 1
        self.query_tokens += seq.num_prompt_tokens
        best = shared = 0
        limit = seq.max_cached_tokens
        for j, h in enumerate(hashes, start=1):
            if h not in self.block_by_hash:
                break
            shared = j
            if h in self.snapshots and j * blocks.block_size <= limit:
                best = j
        if shared > best and shared * blocks.block_size < seq.num_tokens:
            # This prompt shares more with an earlier one than any snapshot covers (a common system prompt
            # or document with a new question): reuse is evidently likely there, so snapshot it this time.
            seq.snapshot_points = seq.snapshot_points | {shared * blocks.block_size}
        if best == 0:
            return None
        ids = [self.block_by_hash[h] for h in hashes[:best]]
        for b in ids:
            if blocks.ref_count[b] == 0:
                self.evictable.pop(b, None)
            blocks.retain(b)
        snapshot = self.snapshots[hashes[best - 1]]
        self.snapshots.move_to_end(hashes[best - 1])
        self.hit_tokens += best * blocks.block_size
        return ids, snapshot

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
