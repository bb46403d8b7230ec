"""What one forward step computes, and the cache tensors it reads and writes.

A step is a packed run of tokens from several sequences (no padding): sequence s contributes
`query_lens[s]` new tokens on top of `context_lens[s]` tokens already in its caches. The scheduler
decides the split; the model only follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheTensors:
    """Per-layer state pools. Mamba layers index `state_slots`; attention layers index KV blocks.

    conv_state: [mamba_layers, slots, conv_kernel - 1, conv_dim]
    ssm_state:  [mamba_layers, slots, heads, head_dim, state]
    key_cache / value_cache: [attention_layers, blocks, block_size, kv_heads, head_dim]
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.key_cache.shape[2]


@dataclass
class ForwardBatch:
    query_lens: list[int]
    context_lens: list[int]
    state_slots: torch.Tensor  # int64 [S]: each sequence's Mamba state slot
    block_tables: torch.Tensor  # int64 [S, max_blocks]: each sequence's KV blocks
    # Device-side copies a CUDA graph replays from (filled by the graph runner); derived otherwise.
    seq_lens_t: torch.Tensor | None = None  # int32 [S]: context + new tokens
    slot_mapping_t: torch.Tensor | None = None  # int64 [T]

    # Host copy of state_slots (the runner has it); without it, read back once on first use.
    state_slots_list: list[int] | None = None
    block_tables_cpu: torch.Tensor | None = None  # host copy of block_tables, for slot_mapping

    def __post_init__(self) -> None:
        device = self.state_slots.device
        self.num_seqs = len(self.query_lens)
        cu = [0]
        for n in self.query_lens:
            cu.append(cu[-1] + n)
        # Host lists for the kernels' launch plans: reading device tensors back would stall the GPU queue.
        self.cu_query_lens_list = cu
        self.num_tokens = cu[-1]
        # A pure decode step (one new token each) takes the vectorised recurrent path.
        self.is_decode = all(n == 1 for n in self.query_lens)
        self.has_initial_state = [c > 0 for c in self.context_lens]
        self.cu_query_lens = torch.tensor(cu, dtype=torch.int64).to(device)
        self._slot_mapping: torch.Tensor | None = self.slot_mapping_t
        self._prefill_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if self.seq_lens_t is None:
            lens = [c + n for c, n in zip(self.context_lens, self.query_lens)]
            self.seq_lens_t = torch.tensor(lens, dtype=torch.int32).to(device)

    @property
    def slots_list(self) -> list[int]:
        if self.state_slots_list is None:
            self.state_slots_list = self.state_slots.tolist()
        return self.state_slots_list

    def prefill_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cu_query_lens int32 [S+1], has_initial_state bool [S], context_lens int32 [S]) on the device,
        made in one copy per step and shared by every layer."""
        if self._prefill_tensors is None:
            host = torch.tensor(
                [*self.cu_query_lens_list, *map(int, self.has_initial_state), *self.context_lens], dtype=torch.int32
            )
            device = self.state_slots.device
            dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
            n, s = self.num_seqs + 1, self.num_seqs
            self._prefill_tensors = (dev[:n], dev[n : n + s].bool(), dev[n + s :])
        return self._prefill_tensors

    def slot_mapping(self, block_size: int) -> torch.Tensor:
        """Flat KV cache position (block * block_size + offset) of every new token, int64 [T]."""
        if self._slot_mapping is None:
            tables = self.block_tables_cpu if self.block_tables_cpu is not None else self.block_tables.cpu()
            out = []
            for s, (ctx, n) in enumerate(zip(self.context_lens, self.query_lens)):
                pos = torch.arange(ctx, ctx + n)
                out.append(tables[s, pos // block_size] * block_size + pos % block_size)
            self._slot_mapping = torch.cat(out).to(self.block_tables.device)
        return self._slot_mapping

    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last new token in the packed run (where its next token is predicted)."""
        return self.cu_query_lens[1:] - 1
