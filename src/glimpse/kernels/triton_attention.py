"""Triton paged attention for decode: one new query token per sequence, keys and values read from the
block pool exactly once, only up to each sequence's length (the torch path gathers every sequence to the
longest one). Safe inside a CUDA graph: lengths come from a device tensor, no host synchronisation.

One program per (sequence, KV head) serves the whole group of query heads sharing that KV head (GQA):
it walks the sequence's blocks with an online softmax. Set GLIMPSE_TRITON=0 to use the torch path.
"""

from __future__ import annotations

import torch

from glimpse.kernels._triton import ENABLED, HAS_TRITON, tl, triton  # noqa: F401


def available(t: torch.Tensor, block_size: int = 16) -> bool:
    """CUDA, Triton, and shapes the kernel takes: tensor-core dots need blocks and head dims of 16+, powers of 2."""
    head_dim = t.shape[-1]
    shapes_ok = all(n >= 16 and n & (n - 1) == 0 for n in (block_size, head_dim))
    return ENABLED and HAS_TRITON and t.is_cuda and shapes_ok


if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr,
        scale,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_oh,
        stride_tb,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(lens_ptr + seq)
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        offs = tl.arange(0, BLOCK_SIZE)
        row_ok = rows < GROUP
        q_heads = kv_head * GROUP + rows
        q = tl.load(
            q_ptr + seq * stride_qb + q_heads[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        num_blocks = tl.cdiv(length, BLOCK_SIZE)
        for n in range(0, num_blocks):
            block = tl.load(tables_ptr + seq * stride_tb + n).to(tl.int64)
            pos = n * BLOCK_SIZE + offs
            valid = pos < length
            k = tl.load(k_ptr + block * stride_kb + offs[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
                        mask=valid[:, None], other=0.0)  # fmt: skip
            v = tl.load(v_ptr + block * stride_vb + offs[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
                        mask=valid[:, None], other=0.0)  # fmt: skip
            s = (
                tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            )  # [GROUP_PAD, BLOCK_SIZE]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l_sum = l_sum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m = m_new
        out = acc / l_sum[:, None]
        tl.store(out_ptr + seq * stride_ob + q_heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D]
    key_cache: torch.Tensor,  # [blocks, block_size, KVH, D]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] block ids
    lengths: torch.Tensor,  # [B] int: keys per sequence, the new token included
    scale: float,
) -> torch.Tensor:
    B, H, D = query.shape
    kv_heads = key_cache.shape[2]
    group = H // kv_heads
    out = torch.empty_like(query)
    tables = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    _paged_decode_kernel[(B, kv_heads)](
        query, key_cache, value_cache, out, tables, lengths.to(torch.int32),
        scale,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        out.stride(0), out.stride(1),
        tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_SIZE=key_cache.shape[1],
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # fp32 stays exact; bf16 ignores it
    )  # fmt: skip
    return out
