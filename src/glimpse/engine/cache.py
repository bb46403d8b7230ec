"""Memory for sequences: attention K/V in fixed-size blocks, Mamba states in per-sequence slots.

State pools are allocated uninitialised (a slot is zeroed when a sequence starts in it); KV pools are
zeroed once, because batched decode attention reads whole blocks past a sequence's end (masked, but a
NaN in never-written memory would still poison the weighted sum)."""

from __future__ import annotations

import torch

from glimpse.config import NemotronHConfig
from glimpse.engine.prefix_cache import PrefixCache
from glimpse.model.batch import CacheTensors


def allocate_cache_tensors(
    config: NemotronHConfig,
    num_slots: int,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    ssm_dtype: torch.dtype,
    device: torch.device | str,
) -> CacheTensors:
    m, a = config.num_mamba_layers, config.num_attention_layers
    return CacheTensors(
        conv_state=torch.empty(
            m, num_slots, config.conv_kernel - 1, config.mamba_conv_dim, dtype=dtype, device=device
        ),
        ssm_state=torch.empty(
            m,
            num_slots,
            config.mamba_num_heads,
            config.mamba_head_dim,
            config.ssm_state_size,
            dtype=ssm_dtype,
            device=device,
        ),
        key_cache=torch.zeros(
            a, num_blocks, block_size, config.num_key_value_heads, config.head_dim, dtype=dtype, device=device
        ),
        value_cache=torch.zeros(
            a, num_blocks, block_size, config.num_key_value_heads, config.head_dim, dtype=dtype, device=device
        ),
    )


def state_bytes_per_sequence(config: NemotronHConfig, dtype: torch.dtype, ssm_dtype: torch.dtype) -> int:
    """Bytes of Mamba conv + SSM state one sequence holds across all Mamba layers."""
    conv = (config.conv_kernel - 1) * config.mamba_conv_dim * dtype.itemsize
    ssm = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * ssm_dtype.itemsize
    return config.num_mamba_layers * (conv + ssm)


def kv_bytes_per_token(config: NemotronHConfig, dtype: torch.dtype) -> int:
    return config.num_attention_layers * 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize


class SlotPool:
    """Mamba state slots: one per running sequence, handed out and taken back whole."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} freed twice"
        self._free.append(slot)


class BlockPool:
    """Attention KV blocks with reference counts (a cached prefix block may serve several sequences)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_count = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self.ref_count[b] = 1
        return blocks

    def retain(self, block: int) -> None:
        self.ref_count[block] += 1

    def release(self, blocks: list[int]) -> list[int]:
        """Drop one reference to each block; returns the blocks nobody holds any more."""
        dropped = []
        for b in blocks:
            assert self.ref_count[b] > 0, f"block {b} released twice"
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                dropped.append(b)
        return dropped

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class CacheManager:
    """Gives sequences the memory they need (KV blocks, a state slot) and takes it back.

    With a prefix cache, blocks nobody holds keep their contents while they can (evicted least recently
    used first when memory is short), and idle state slots hold Mamba snapshots at chosen boundaries:
    running sequences always win a slot from a snapshot.
    """

    def __init__(
        self, blocks: BlockPool, slots: SlotPool, prefix: PrefixCache | None = None, copy_state=None
    ) -> None:
        self.blocks = blocks
        self.slots = slots
        self.prefix = prefix
        self._copy_state = copy_state  # (src_slot, dst_slot) -> None, copies every Mamba layer's state

    # Blocks ---------------------------------------------------------------------------------------------
    def _take_blocks(self, n: int) -> list[int] | None:
        while self.blocks.num_free < n and self.prefix is not None and self.prefix.evictable:
            block, orphan_slot = self.prefix.evict_block()
            self.blocks.give_back([block])
            if orphan_slot is not None:
                self.slots.free(orphan_slot)
        return self.blocks.allocate(n)

    def _release_blocks(self, blocks: list[int]) -> None:
        for b in self.blocks.release(blocks):
            if self.prefix is not None and self.prefix.keeps(b):
                self.prefix.make_evictable(b)
            else:
                self.blocks.give_back([b])

    def grow(self, seq, num_tokens: int) -> bool:
        """Make room for the sequence's first `num_tokens` tokens; False when memory is short."""
        need = self.blocks.blocks_needed(num_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        new = self._take_blocks(need)
        if new is None:
            return False
        seq.block_ids.extend(new)
        return True

    # Slots ----------------------------------------------------------------------------------------------
    def _take_slot(self) -> int | None:
        slot = self.slots.allocate()
        if slot is None and self.prefix is not None and self.prefix.snapshots:
            slot = self.prefix.evict_snapshot()
        return slot

    def admit(self, seq) -> bool:
        """Give a waiting sequence a state slot and, on a prefix hit, the cached blocks and state."""
        slot = self._take_slot()
        if slot is None:
            return False
        seq.slot = slot
        if self.prefix is not None:
            hit = self.prefix.match(seq, self.blocks)
            if hit:
                blocks, snapshot = hit
                seq.block_ids = list(blocks)
                self._copy_state(snapshot, slot)
                seq.num_computed_tokens = len(blocks) * self.blocks.block_size
                seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed_tokens)
        return True

    def free(self, seq) -> None:
        if seq.block_ids:
            self._release_blocks(seq.block_ids)
            seq.block_ids = []
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None

    def on_computed(self, seq) -> None:
        """After a step: remember the sequence's newly completed blocks and, at a chosen boundary, its state."""
        if self.prefix is None:
            return
        self.prefix.register_blocks(seq, self.blocks.block_size)
        if seq.num_computed_tokens in seq.snapshot_points:
            slot = self.slots.allocate()
            if slot is None and self.prefix.snapshots:
                slot = self.prefix.evict_snapshot()
            if slot is not None:
                self._copy_state(seq.slot, slot)
                if not self.prefix.add_snapshot(seq, self.blocks.block_size, slot):
                    self.slots.free(slot)

    def all_free(self) -> bool:
        """No block and no slot is held by a sequence (the prefix cache may keep evictable ones)."""
        held_slots = (
            self.slots.num_slots - self.slots.num_free - (len(self.prefix.snapshots) if self.prefix else 0)
        )
        return all(c == 0 for c in self.blocks.ref_count) and held_slots == 0
