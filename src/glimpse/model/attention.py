"""Causal grouped-query attention of NemotronH. No RoPE: position comes only from the Mamba layers."""

from __future__ import annotations

import torch
from torch import nn

from glimpse.config import NemotronHConfig
from glimpse.distributed.group import SINGLE, TPGroup
from glimpse.kernels.attention import paged_attention, write_kv
from glimpse.model.batch import CacheTensors, ForwardBatch
from glimpse.model.parallel import Split, cols, kv_head_range, linear_splits, rows


class Attention(nn.Module):
    def __init__(self, config: NemotronHConfig, attention_index: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.attention_index = attention_index  # which slice of the KV pools this layer owns
        self.tp = tp  # this rank holds query heads heads·rank.., and the KV heads they read
        self.total_heads, self.total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.heads = config.num_attention_heads // tp.size
        self.kv_start, self.kv_heads = kv_head_range(config.num_key_value_heads, tp.rank, tp.size)
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, cache: CacheTensors) -> torch.Tensor:
        T = hidden.shape[0]
        q = self.q_proj(hidden).view(T, self.heads, self.head_dim)
        k = self.k_proj(hidden).view(T, self.kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(T, self.kv_heads, self.head_dim)
        key_cache = cache.key_cache[self.attention_index]
        value_cache = cache.value_cache[self.attention_index]
        write_kv(k, v, key_cache, value_cache, batch.slot_mapping(cache.block_size))
        out = paged_attention(
            q,
            key_cache,
            value_cache,
            batch.block_tables,
            batch.query_lens,
            batch.context_lens,
            self.scale,
            k,
            v,
            batch.seq_lens_t,
            None if batch.is_decode else batch.prefill_tensors(),
        )
        return self.tp.all_reduce(self.o_proj(out.reshape(T, self.heads * self.head_dim)))

    def tp_splits(self) -> dict[str, Split]:
        d, r, bias = self.head_dim, self.tp.rank, self.o_proj.bias is not None
        q = rows(r * self.heads * d, self.heads * d, self.total_heads * d)
        kv = rows(self.kv_start * d, self.kv_heads * d, self.total_kv_heads * d)
        o = cols(r * self.heads * d, self.heads * d, self.total_heads * d)
        return (
            linear_splits("q_proj", q, r, bias) | linear_splits("k_proj", kv, r, bias)
            | linear_splits("v_proj", kv, r, bias) | linear_splits("o_proj", o, r, bias)
        )  # fmt: skip
