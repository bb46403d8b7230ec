"""Memory for sequences: attention K/V in fixed-size blocks, Mamba states in per-sequence slots.

Pools are allocated uninitialised: KV beyond a sequence's length is never read, and a state slot is
zeroed when a sequence starts in it."""

from __future__ import annotations

import torch

from glimpse.config import NemotronHConfig
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
        key_cache=torch.empty(
            a, num_blocks, block_size, config.num_key_value_heads, config.head_dim, dtype=dtype, device=device
        ),
        value_cache=torch.empty(
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
    """Gives sequences the memory they need (KV blocks, a state slot) and takes it back."""

    def __init__(self, blocks: BlockPool, slots: SlotPool) -> None:
        self.blocks = blocks
        self.slots = slots

    def can_admit(self) -> bool:
        return self.slots.num_free > 0

    def grow(self, seq, num_tokens: int) -> bool:
        """Make room for the sequence's first `num_tokens` tokens; False when memory is short."""
        need = self.blocks.blocks_needed(num_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        new = self.blocks.allocate(need)
        if new is None:
            return False
        seq.block_ids.extend(new)
        return True

    def admit(self, seq) -> bool:
        slot = self.slots.allocate()
        if slot is None:
            return False
        seq.slot = slot
        return True

    def free(self, seq) -> None:
        if seq.block_ids:
            self.blocks.give_back(self.blocks.release(seq.block_ids))
            seq.block_ids = []
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None

    def all_free(self) -> bool:
        return self.blocks.num_free == self.blocks.num_blocks and self.slots.num_free == self.slots.num_slots
