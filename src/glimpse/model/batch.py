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

    def __post_init__(self) -> None:
        device = self.state_slots.device
        q = torch.tensor(self.query_lens, dtype=torch.int64)
        self.num_seqs = len(self.query_lens)
        self.num_tokens = int(q.sum())
        self.cu_query_lens = torch.zeros(self.num_seqs + 1, dtype=torch.int64)
        self.cu_query_lens[1:] = torch.cumsum(q, 0)
        # A pure decode step (one new token each) takes the vectorised recurrent path.
        self.is_decode = all(n == 1 for n in self.query_lens)
        self.has_initial_state = [c > 0 for c in self.context_lens]
        self.cu_query_lens = self.cu_query_lens.to(device)
        self._slot_mapping: torch.Tensor | None = self.slot_mapping_t
        if self.seq_lens_t is None:
            lens = [c + n for c, n in zip(self.context_lens, self.query_lens)]
            self.seq_lens_t = torch.tensor(lens, dtype=torch.int32).to(device)

    def slot_mapping(self, block_size: int) -> torch.Tensor:
        """Flat KV cache position (block * block_size + offset) of every new token, int64 [T]."""
        if self._slot_mapping is None:
            tables = self.block_tables.cpu()
            out = []
            for s, (ctx, n) in enumerate(zip(self.context_lens, self.query_lens)):
                pos = torch.arange(ctx, ctx + n)
                out.append(tables[s, pos // block_size] * block_size + pos % block_size)
            self._slot_mapping = torch.cat(out).to(self.block_tables.device)
        return self._slot_mapping

    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last new token in the packed run (where its next token is predicted)."""
        return self.cu_query_lens[1:] - 1
