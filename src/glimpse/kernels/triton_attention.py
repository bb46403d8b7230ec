"""Triton paged attention for decode: one new query token per sequence, keys and values read from the
block pool exactly once, only up to each sequence's length (the torch path gathers every sequence to the
longest one). Safe inside a CUDA graph: lengths come from a device tensor, no host synchronisation.

Every program serves the whole group of query heads sharing one KV head (GQA) and walks keys with an
online softmax. Two paths:

- single pass (`_paged_decode_kernel`): one program per (sequence, KV head) walks all of the sequence's
  blocks. Enough when B * kv_heads already fills the GPU.
- split KV ("flash decoding", `_paged_decode_split_kernel` + `_paged_decode_reduce_kernel`): at small
  batches one program per (sequence, KV head) leaves most SMs idle and walks a long context serially, so
  the sequence is cut into NUM_SPLITS contiguous ranges of key tiles, one program each; each writes an
  unnormalised partial (acc, running max, running sum) in fp32, and a second kernel merges the splits.
  The ranges are cut in the kernel from the device length (so they follow the real length), while
  NUM_SPLITS itself comes from host-known shapes only (batch, KV heads, table width), so a captured CUDA
  graph stays valid for any lengths it is replayed with. See `choose_num_splits`.

`glimpse.kernels.attention` decides when it runs (and holds the torch path).
"""

from __future__ import annotations

import functools

import torch

from glimpse.kernels.backend import HAS_TRITON, INTERPRET, tl, triton

if HAS_TRITON:

    @triton.jit
    def _softmax_step(q, k, v, valid, m, l_sum, acc, scale, PRECISION: tl.constexpr, INTERP: tl.constexpr):
        """One online-softmax step of a group of query rows over a tile of keys (masked ones excluded);
        `valid` holds at least one key, so the new max is finite."""
        if INTERP:  # this Triton's interpreter computes bf16 dots wrongly (numpy on the raw bits): fp32
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [GROUP_PAD, keys]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        return m_new, l_sum, acc

    @triton.jit
    def _block_step(
        n, q, m, l_sum, acc, k_ptr, v_ptr, table_ptr, length, kv_head, offs, dims, scale,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """Cache block n of the sequence (table_ptr: its table row)."""
        block = tl.load(table_ptr + n).to(tl.int64)
        pos = n * BLOCK_SIZE + offs
        valid = pos < length
        k = tl.load(k_ptr + block * stride_kb + offs[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
                    mask=valid[:, None], other=0.0)  # fmt: skip
        v = tl.load(v_ptr + block * stride_vb + offs[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
                    mask=valid[:, None], other=0.0)  # fmt: skip
        return _softmax_step(q, k, v, valid, m, l_sum, acc, scale, PRECISION, INTERP)

    @triton.jit
    def _tile_step(
        t, q, m, l_sum, acc, k_ptr, v_ptr, table_ptr, length, kv_head, offs, dims, scale,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """Key tile t (keys t * BLOCK_N ...): a tile may span several cache blocks, so each key looks up
        its own block in the table row, and all of the tile's loads go out at once."""
        pos = t * offs.shape[0] + offs
        valid = pos < length
        block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                    + dims[None, :], mask=valid[:, None], other=0.0)  # fmt: skip
        v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                    + dims[None, :], mask=valid[:, None], other=0.0)  # fmt: skip
        return _softmax_step(q, k, v, valid, m, l_sum, acc, scale, PRECISION, INTERP)

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
        PRECISION: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """Single pass: one (sequence, KV head) walks all of the sequence's blocks."""
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
        table = tables_ptr + seq * stride_tb
        if INTERP:  # the interpreter can't take a runtime `range` bound
            n = 0
            while n < num_blocks:
                m, l_sum, acc = _block_step(
                    n, q, m, l_sum, acc, k_ptr, v_ptr, table, length, kv_head, offs, dims, scale,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, PRECISION, INTERP,
                )  # fmt: skip
                n += 1
        else:
            for n in range(0, num_blocks):
                m, l_sum, acc = _block_step(
                    n, q, m, l_sum, acc, k_ptr, v_ptr, table, length, kv_head, offs, dims, scale,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, PRECISION, INTERP,
                )  # fmt: skip
        out = acc / l_sum[:, None]
        tl.store(out_ptr + seq * stride_ob + q_heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip

    @triton.jit
    def _paged_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr,
        acc_ptr, max_ptr, sum_ptr,
        scale,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_tb,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh,
        NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, KV head, split): the split's contiguous range of BLOCK_N-key tiles, out of the
        cdiv(length, BLOCK_N) tiles of the sequence, cut evenly over NUM_SPLITS. Writes the unnormalised
        partial: acc = sum p v, max m, sum l = sum p with p = exp(s - m); an empty range writes the neutral
        partial (acc 0, m -inf, l 0)."""
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lens_ptr + seq)
        num_tiles = tl.cdiv(length, BLOCK_N)
        per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = split * per_split
        tile_hi = tl.minimum(tile_lo + per_split, num_tiles)
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        offs = tl.arange(0, BLOCK_N)
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
        table = tables_ptr + seq * stride_tb
        if INTERP:
            t = tile_lo
            while t < tile_hi:
                m, l_sum, acc = _tile_step(
                    t, q, m, l_sum, acc, k_ptr, v_ptr, table, length, kv_head, offs, dims, scale,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, PRECISION, INTERP,
                )  # fmt: skip
                t += 1
        else:
            for t in range(tile_lo, tile_hi):
                m, l_sum, acc = _tile_step(
                    t, q, m, l_sum, acc, k_ptr, v_ptr, table, length, kv_head, offs, dims, scale,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, PRECISION, INTERP,
                )  # fmt: skip
        part = seq * stride_mb + q_heads * stride_mh + split
        tl.store(max_ptr + part, m, mask=row_ok)
        tl.store(sum_ptr + part, l_sum, mask=row_ok)
        tl.store(acc_ptr + seq * stride_ab + q_heads[:, None] * stride_ah + split * stride_as + dims[None, :],
                 acc, mask=row_ok[:, None])  # fmt: skip

    @triton.jit
    def _paged_decode_reduce_kernel(
        acc_ptr, max_ptr, sum_ptr, out_ptr,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh,
        stride_ob, stride_oh,
        NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, query head): out = sum_i w_i acc_i / sum_i w_i l_i with w_i = exp(m_i - max m).
        Empty splits (m -inf, l 0, acc 0) weigh 0; a sequence with no keys at all gets zeros."""
        seq = tl.program_id(0)
        head = tl.program_id(1)
        splits = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, HEAD_DIM)
        ok = splits < NUM_SPLITS
        part = seq * stride_mb + head * stride_mh + splits
        m = tl.load(max_ptr + part, mask=ok, other=float("-inf"))
        l_sum = tl.load(sum_ptr + part, mask=ok, other=0.0)
        m_all = tl.max(m, 0)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # all empty: keep exp() finite (it gives 0)
        w = tl.exp(m - m_all)
        total = tl.sum(l_sum * w, 0)
        acc = tl.load(acc_ptr + seq * stride_ab + head * stride_ah + splits[:, None] * stride_as + dims[None, :],
                      mask=ok[:, None], other=0.0)  # fmt: skip
        out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


TARGET_WAVES = 2  # the split path aims for this many programs per SM
MAX_SPLITS = 64


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # Triton's interpreter on CPU: pretend an H100, so the tests take the same paths


def tile_tokens(dtype: torch.dtype, head_dim: int) -> int:
    """Keys per step of the split kernel: 64 while a K tile row is at most 256 bytes (bf16 x 128), else 32."""
    return 64 if head_dim * dtype.itemsize <= 256 else 32


def choose_num_splits(
    batch: int, kv_heads: int, table_width: int, block_size: int, block_n: int, sms: int
) -> int:
    """Splits per (sequence, KV head), from host-known shapes only (a captured graph keeps them).

    1 (the single-pass kernel) once batch * kv_heads programs reach TARGET_WAVES per SM; else enough
    splits for that many programs, but no more than the tiles of a full table (so at full width every
    split has at least one tile of `block_n` keys) and MAX_SPLITS. The kernel cuts the real length into
    that many ranges, so a shorter sequence leaves its last splits empty (cheap: they store neutral
    partials)."""
    programs = batch * kv_heads
    target = TARGET_WAVES * sms
    if programs >= target:
        return 1
    max_tiles = -(-table_width * block_size // block_n)
    splits = min(-(-target // programs), max_tiles, MAX_SPLITS)
    return splits if splits >= 2 else 1


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D]
    key_cache: torch.Tensor,  # [blocks, block_size, KVH, D]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] block ids
    lengths: torch.Tensor,  # [B] int: keys per sequence, the new token included
    scale: float,
    *,
    num_splits: int | None = None,  # None: choose_num_splits; 1: single pass; n >= 2: split into n
    block_n: int | None = None,  # keys per step of the split kernel (default tile_tokens)
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    B, H, D = query.shape
    kv_heads = key_cache.shape[2]
    block_size = key_cache.shape[1]
    group = H // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    precision = "ieee" if query.dtype == torch.float32 else "tf32"  # fp32 stays exact; bf16 ignores it
    out = torch.empty_like(query)
    # int32 and int64 tables are read as they are (no conversion kernel); other dtypes converted
    tables = (
        block_tables if block_tables.dtype in (torch.int32, torch.int64) else block_tables.to(torch.int32)
    )
    if tables.shape[1] > 1 and tables.stride(1) != 1:
        tables = tables.contiguous()
    lens = lengths if lengths.dtype == torch.int32 else lengths.to(torch.int32)
    if block_n is None:
        block_n = tile_tokens(query.dtype, D)
    if B == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(
            B, kv_heads, tables.shape[1], block_size, block_n, _sm_count(query.device)
        )
    if num_splits <= 1:
        _paged_decode_kernel[(B, kv_heads)](
            query, key_cache, value_cache, out, tables, lens,
            scale,
            query.stride(0), query.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            out.stride(0), out.stride(1),
            tables.stride(0),
            GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=D, BLOCK_SIZE=block_size,
            PRECISION=precision, INTERP=INTERPRET,
        )  # fmt: skip
        return out
    acc = torch.empty(B, H, num_splits, D, device=query.device, dtype=torch.float32)
    m = torch.empty(B, H, num_splits, device=query.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    _paged_decode_split_kernel[(B, kv_heads, num_splits)](
        query, key_cache, value_cache, tables, lens,
        acc, m, l_sum,
        scale,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        m.stride(0), m.stride(1),
        NUM_SPLITS=num_splits, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=D,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PRECISION=precision, INTERP=INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    _paged_decode_reduce_kernel[(B, H)](
        acc, m, l_sum, out,
        acc.stride(0), acc.stride(1), acc.stride(2),
        m.stride(0), m.stride(1),
        out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=D,
    )  # fmt: skip
    return out
