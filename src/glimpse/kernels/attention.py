"""Attention over a paged KV cache (no position encoding in this model: causality is the only order).

K/V live in blocks of `block_size` tokens, [blocks, block_size, kv_heads, head_dim]; a sequence's
block table lists its blocks in order. On CUDA the decode step and prompt chunks run Triton kernels
(kernels/triton_attention.py, kernels/triton_prefill_attention.py) where `use_triton` allows; the torch
code below is the reference (CPU, GLIMPSE_TRITON=0, other shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glimpse.kernels import backend, triton_attention, triton_prefill_attention


def use_triton(query: torch.Tensor, block_size: int) -> bool:
    """Both paged attention kernels take these shapes: Triton usable on the query (see backend), and a cache
    block size and head dim that are powers of two of at least 16 (tensor-core dots)."""
    head_dim = query.shape[-1]
    shapes_ok = all(n >= 16 and n & (n - 1) == 0 for n in (block_size, head_dim))
    return backend.triton_usable(query) and shapes_ok


def write_kv(
    key: torch.Tensor,  # [T, KVH, D]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [blocks, block_size, KVH, D]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [T]: block * block_size + offset
) -> None:
    key_cache.view(-1, *key_cache.shape[2:])[slot_mapping] = key.to(key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slot_mapping] = value.to(value_cache.dtype)


def paged_attention(
    query: torch.Tensor,  # [T, H, D] packed new tokens
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks]
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    key: torch.Tensor | None = None,  # [T, KVH, D]: the new tokens' K/V (already written to the cache)
    value: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,  # int32 [S] on the device: context + new tokens
    prefill_tensors: tuple[torch.Tensor, ...] | None = None,  # ForwardBatch.prefill_tensors(), for Triton
) -> torch.Tensor:
    """Each new token attends to its sequence's cached tokens and the new ones up to itself."""
    if all(n == 1 for n in query_lens):
        if seq_lens is not None and use_triton(query, key_cache.shape[1]):
            return triton_attention.paged_decode_attention(
                query, key_cache, value_cache, block_tables, seq_lens, scale
            )
        return _decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale)
    block_size = key_cache.shape[1]
    # On the GPU every prompt chunk, fresh or continuing from cached KV (a later chunk of a long prompt, a
    # prefix-cache hit), goes through one Triton kernel over the paged cache for the whole batch. Not SDPA:
    # its fastest (cuDNN) kernel builds a plan for every new sequence length, 80 ms to 1 s on an H100 the
    # first time a length is seen, which a server pays on most prompts; FlashAttention-2 was slower than
    # the Triton kernel at 8k tokens (docs/PERFORMANCE.md).
    if prefill_tensors is not None and key_cache.dtype == query.dtype and use_triton(query, block_size):
        cu, _, ctx = prefill_tensors
        return triton_prefill_attention.paged_prefill_attention(
            query, key_cache, value_cache, block_tables, cu, ctx, max(query_lens), scale
        )
    out = torch.empty_like(query)
    start = 0
    for s, (n, ctx) in enumerate(zip(query_lens, context_lens)):
        q = query[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if ctx == 0 and key is not None:
            # a fresh prompt attends only to itself: plain causal attention (flash kernels apply)
            k = key[start : start + n]
            v = value[start : start + n]
            mask, causal = None, True
        else:
            total = ctx + n
            blocks = block_tables[s, : (total + block_size - 1) // block_size]
            k = key_cache[blocks].flatten(0, 1)[:total]  # [total, KVH, D]
            v = value_cache[blocks].flatten(0, 1)[:total]
            # query i sits at absolute position ctx + i and sees keys 0..ctx + i
            pos = torch.arange(total, device=q.device)
            mask, causal = pos[None, :] <= (ctx + torch.arange(n, device=q.device))[:, None], False
        o = F.scaled_dot_product_attention(
            q,
            k.transpose(0, 1).unsqueeze(0).to(q.dtype),
            v.transpose(0, 1).unsqueeze(0).to(q.dtype),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        out[start : start + n] = o[0].transpose(0, 1)
        start += n
    return out


def _decode_attention(
    query: torch.Tensor,  # [B, H, D]: one new token per sequence (its K/V already written)
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """All sequences at once: gather each one's blocks up to the longest, mask the tail."""
    block_size = key_cache.shape[1]
    lengths = torch.tensor(context_lens, device=query.device) + 1
    width = -(-int(lengths.max()) // block_size)
    blocks = block_tables[:, :width]
    k = key_cache[blocks].flatten(1, 2)  # [B, width * block_size, KVH, D]
    v = value_cache[blocks].flatten(1, 2)
    mask = torch.arange(k.shape[1], device=query.device)[None, :] < lengths[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),  # [B, H, 1, D]
        k.transpose(1, 2).to(query.dtype),
        v.transpose(1, 2).to(query.dtype),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)
