"""Triton paged attention for prompt chunks that continue from cached K/V (chunked prefill, prefix-cache
hits): new tokens of several sequences, packed, attend causally to everything their sequence has in the
block pool, context and new tokens alike (the new tokens' K/V are written to the cache first).

Causality is lower-right aligned: new token i of sequence s sits at absolute position context_lens[s] + i
and sees keys 0..context_lens[s] + i. No position encoding (the model has none).

Flash-attention style. One program per (block of BLOCK_M new tokens, query head, sequence); it walks the
sequence's keys BLOCK_N at a time (BLOCK_N a multiple of the cache's block size), finding each key's
physical row through the block table, with an online softmax in fp32 and both products on tensor cores.
Key blocks wholly below the diagonal run without masks; only the last one or few that straddle it are
masked, and key blocks wholly above it are never visited. Keys at or past a sequence's length are never
loaded, so whatever sits there (stale data, NaN) cannot leak in.

Sequence boundaries and context lengths come from device tensors; the only host value is the longest
chunk, which sizes the grid (programs past their sequence's end exit at once). No host synchronisation.
`glimpse.kernels.attention` decides when it runs (the same shape rule as decode) and holds the torch path.
"""

from __future__ import annotations

import torch

from glimpse.kernels.backend import HAS_TRITON, tl, triton

LOG2E = 1.4426950408889634


if HAS_TRITON:

    @triton.jit
    def _attend_block(
        acc, m_i, l_i, q,
        k_ptr, v_ptr, table_row_ptr, kv_head,
        stride_ks, stride_kh, stride_kb, stride_vs, stride_vh, stride_vb,
        n_start, q_pos, total, qk_scale,
        MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """One BLOCK_N-key step of the online softmax. Unmasked steps read only keys every query row may
        see (all below its sequence's length); masked steps drop keys past the length and above the
        diagonal."""
        pos = n_start + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        if MASKED:
            in_seq = pos < total
            block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=in_seq, other=0).to(tl.int64)
        else:
            block = tl.load(table_row_ptr + pos // BLOCK_SIZE).to(tl.int64)
        offset = pos % BLOCK_SIZE
        k_rows = block * stride_kb + offset * stride_ks + kv_head * stride_kh
        v_rows = block * stride_vb + offset * stride_vs + kv_head * stride_vh
        if MASKED:
            k = tl.load(k_ptr + k_rows[:, None] + dims[None, :], mask=in_seq[:, None], other=0.0)
            v = tl.load(v_ptr + v_rows[:, None] + dims[None, :], mask=in_seq[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + k_rows[:, None] + dims[None, :])
            v = tl.load(v_ptr + v_rows[:, None] + dims[None, :])
        if INTERP:  # the interpreter's bf16 dots are wrong: the same products in fp32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32)
        s = s * qk_scale  # log2 units
        if MASKED:
            s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
        # every row has seen a visible key by its first masked step (see _prefill_kernel), so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if INTERP:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        acc = acc * alpha[:, None] + pv
        return acc, m_new, l_i

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, cu_ptr, ctx_ptr,
        qk_scale,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh,
        stride_tb,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        # longest query blocks (the last ones, most keys) first: better tail balance under causality
        m_block = tl.num_programs(0) - 1 - tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.program_id(2)
        q_start = tl.load(cu_ptr + seq).to(tl.int32)
        q_len = tl.load(cu_ptr + seq + 1).to(tl.int32) - q_start
        m_start = m_block * BLOCK_M
        if m_start >= q_len:
            return
        ctx = tl.load(ctx_ptr + seq).to(tl.int32)
        total = ctx + q_len
        kv_head = head // GROUP

        rows = m_start + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q_pos = ctx + rows  # absolute position; rows past the chunk compute garbage nobody stores
        dims = tl.arange(0, HEAD_DIM)
        tok = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + dims[None, :],
                    mask=row_ok[:, None], other=0.0)  # fmt: skip

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        table_row_ptr = tables_ptr + seq.to(tl.int64) * stride_tb

        # Keys 0..ctx + m_start are visible to every row of this block (and all lie inside the sequence):
        # whole BLOCK_N steps of them need no mask. Non-empty whenever the masked part's first key is past
        # ctx + m_start, so every row meets a visible key before or in its first masked step.
        full_end = ((ctx + m_start + 1) // BLOCK_N) * BLOCK_N
        # the last row of the block sees up to ctx + m_start + BLOCK_M - 1; nothing at or past `total`
        hi = tl.minimum(total, ctx + m_start + BLOCK_M)
        if INTERP:  # the interpreter can't take a runtime `range` bound
            n_start = 0
            while n_start < full_end:
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, k_ptr, v_ptr, table_row_ptr, kv_head,
                    stride_ks, stride_kh, stride_kb, stride_vs, stride_vh, stride_vb,
                    n_start, q_pos, total, qk_scale,
                    False, BLOCK_N, BLOCK_SIZE, HEAD_DIM, PRECISION, INTERP,
                )  # fmt: skip
                n_start += BLOCK_N
            while n_start < hi:
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, k_ptr, v_ptr, table_row_ptr, kv_head,
                    stride_ks, stride_kh, stride_kb, stride_vs, stride_vh, stride_vb,
                    n_start, q_pos, total, qk_scale,
                    True, BLOCK_N, BLOCK_SIZE, HEAD_DIM, PRECISION, INTERP,
                )  # fmt: skip
                n_start += BLOCK_N
        else:
            for n_start in range(0, full_end, BLOCK_N):
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, k_ptr, v_ptr, table_row_ptr, kv_head,
                    stride_ks, stride_kh, stride_kb, stride_vs, stride_vh, stride_vb,
                    n_start, q_pos, total, qk_scale,
                    False, BLOCK_N, BLOCK_SIZE, HEAD_DIM, PRECISION, INTERP,
                )  # fmt: skip
            for n_start in range(full_end, hi, BLOCK_N):
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, k_ptr, v_ptr, table_row_ptr, kv_head,
                    stride_ks, stride_kh, stride_kb, stride_vs, stride_vh, stride_vb,
                    n_start, q_pos, total, qk_scale,
                    True, BLOCK_N, BLOCK_SIZE, HEAD_DIM, PRECISION, INTERP,
                )  # fmt: skip

        out = acc / l_i[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


def default_config(max_query_len: int, head_dim: int, dtype: torch.dtype, block_size: int) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages for the launch. Short chunks get small query blocks so
    padding rows stay few. bf16 at head_dim 128 from the H100 sweep of 2026-11-25 (8,192-token chunk, 40/8
    heads): 128 x 128, 8 warps, 3 stages ran 5.0 ms over 8k of context and 11.5 ms over 24k (412-418
    TFLOP/s), against 5.7 / 12.9 ms for 128 x 64 and 8.8 / 19.7 ms for the torch gather + mask path."""
    wide = dtype == torch.float32 or head_dim > 128  # 4-byte elements / wide heads: halve the tiles
    block_m = 64 if wide else 128
    block_m = min(block_m, max(16, triton.next_power_of_2(max(1, max_query_len))))
    block_n = 32 if wide else 128
    block_n = max(block_n, block_size)
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 2 if wide else 3
    return {"block_m": block_m, "block_n": block_n, "num_warps": num_warps, "num_stages": num_stages}


def paged_prefill_attention(
    query: torch.Tensor,  # [T, H, D] packed new tokens of S sequences
    key_cache: torch.Tensor,  # [blocks, block_size, KVH, D], already holding the new tokens
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, W] int block ids
    cu_query_lens: torch.Tensor,  # int [S + 1] on the device: new tokens' offsets in `query`
    context_lens: torch.Tensor,  # int [S] on the device: tokens cached before this chunk
    max_query_len: int,  # host int, at least the longest chunk (sizes the grid; rows past it stay unwritten)
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of each new token over its sequence's cached keys 0..context + i; [T, H, D].

    Any int dtype for block_tables / cu_query_lens / context_lens (loaded as is, no conversion kernel);
    the caches must have the query's dtype (the engine allocates them in the model dtype).
    The keyword arguments override the launch configuration (default_config) for tuning.
    """
    T, H, D = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    if H % kv_heads:
        raise ValueError(f"{H} query heads do not group over {kv_heads} KV heads")
    S = cu_query_lens.shape[0] - 1  # block_tables may carry extra (padding) rows
    out = torch.empty(T, H, D, dtype=query.dtype, device=query.device)
    if T == 0 or S == 0 or max_query_len <= 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError(f"KV cache dtype {key_cache.dtype} differs from the query's {query.dtype}")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("the KV caches must be contiguous along head_dim")
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    cfg = default_config(max_query_len, D, query.dtype, block_size)
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    if block_n % block_size:
        raise ValueError(f"BLOCK_N={block_n} must be a multiple of the cache block size {block_size}")
    grid = (triton.cdiv(max_query_len, block_m), H, S)
    _prefill_kernel[grid](
        query, key_cache, value_cache, out, block_tables, cu_query_lens, context_lens,
        float(scale) * LOG2E,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=H // kv_heads, HEAD_DIM=D, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # fp32 stays exact; bf16 ignores it
        INTERP=not query.is_cuda,  # CPU tensors only reach here under TRITON_INTERPRET=1
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )  # fmt: skip
    return out
