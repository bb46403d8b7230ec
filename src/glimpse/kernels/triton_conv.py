"""Triton version of the Mamba2 decode convolution (`glimpse.kernels.causal_conv1d.causal_conv1d_update`).

One program per (sequence, block of channels): read the K-1 cached inputs at the sequence's slot and the
new input, write the window shifted by one back in place (no gather/scatter copies), and return

    y[b, c] = bias[c] + sum_k weight[c, k] * window[b, k, c]      window = (state[slot, 0..K-2], x[b])

accumulated in fp32 and rounded once to x's dtype (the torch reference rounds each product in x's dtype,
so in bf16 the two differ by about one bf16 ulp; against an fp32 evaluation this one is the closer).
`causal_conv1d_update_silu` returns silu(y) from the same pass, which is what the mixer uses next.

This module imports without Triton (`HAS_TRITON` is then False); `glimpse.kernels.causal_conv1d` decides
when its kernels run.
"""

from __future__ import annotations

import torch

from glimpse.kernels.backend import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _conv_update_kernel(
        x_ptr,
        w_ptr,
        bias_ptr,
        state_ptr,
        slots_ptr,
        y_ptr,
        channels,
        stride_x_b,
        stride_x_c,
        stride_w_c,
        stride_w_k,
        stride_s_slot,
        stride_s_k,
        stride_s_c,
        stride_y_b,
        stride_y_c,
        KW: tl.constexpr,
        KW_POW2: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        b = tl.program_id(0)
        cblk = tl.program_id(1)
        offs = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
        taps = tl.arange(0, KW_POW2)
        ok = offs < channels
        slot = tl.load(slots_ptr + b).to(tl.int64)
        b64 = b.to(tl.int64)

        # The whole window as one [KW_POW2, BLOCK_C] tile: rows 0..KW-2 from the state, row KW-1 = x.
        # Every load is issued before any store, so nothing waits on a store's address check.
        s_ptrs = state_ptr + slot * stride_s_slot + taps[:, None] * stride_s_k + offs[None, :] * stride_s_c
        from_state = (taps[:, None] < KW - 1) & ok[None, :]
        old = tl.load(s_ptrs, mask=from_state, other=0.0)
        xv = tl.load(x_ptr + b64 * stride_x_b + offs * stride_x_c, mask=ok, other=0.0)
        w = tl.load(
            w_ptr + offs[None, :] * stride_w_c + taps[:, None] * stride_w_k,
            mask=(taps[:, None] < KW) & ok[None, :],
            other=0.0,
        )
        window = tl.where(taps[:, None] == KW - 1, xv.to(state_ptr.dtype.element_ty)[None, :], old)
        acc = tl.sum(
            tl.where(taps[:, None] == KW - 1, xv.to(tl.float32)[None, :], old.to(tl.float32))
            * w.to(tl.float32),
            axis=0,
        )
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # shift by one: window row k (1..KW-1) becomes state row k-1
        tl.store(s_ptrs - stride_s_k, window, mask=(taps[:, None] >= 1) & (taps[:, None] < KW) & ok[None, :])
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        tl.store(y_ptr + b64 * stride_y_b + offs * stride_y_c, acc.to(y_ptr.dtype.element_ty), mask=ok)


# (BLOCK_C, num_warps), from the device sweep in docs/KERNELS.md.
DEFAULT_CONFIG = (512, 4)


def _launch(x, weight, bias, conv_state, slots, silu, block_c, num_warps) -> torch.Tensor:
    batch, channels = x.shape
    kw = weight.shape[1]
    assert kw >= 2 and weight.shape[0] == channels
    assert conv_state.shape[1:] == (kw - 1, channels), (conv_state.shape, weight.shape)
    assert slots.shape == (batch,)
    y = torch.empty((batch, channels), dtype=x.dtype, device=x.device)
    if batch == 0:
        return y
    block_c = block_c or min(DEFAULT_CONFIG[0], triton.next_power_of_2(channels))
    num_warps = num_warps or DEFAULT_CONFIG[1]
    grid = (batch, triton.cdiv(channels, block_c))
    _conv_update_kernel[grid](
        x,
        weight,
        bias if bias is not None else x,
        conv_state,
        slots,
        y,
        channels,
        *x.stride(),
        *weight.stride(),
        *conv_state.stride(),
        *y.stride(),
        KW=kw,
        KW_POW2=triton.next_power_of_2(kw),
        HAS_BIAS=bias is not None,
        SILU=silu,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return y


def causal_conv1d_update(
    x: torch.Tensor,  # [B, C] one new token per sequence
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None,  # [C]
    conv_state: torch.Tensor,  # [slots, K-1, C], updated in place
    slots: torch.Tensor,  # int [B]
    *,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Same contract as `glimpse.kernels.causal_conv1d.causal_conv1d_update` (pre-activation output)."""
    return _launch(x, weight, bias, conv_state, slots, False, block_c, num_warps)


def causal_conv1d_update_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    slots: torch.Tensor,
    *,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """silu(causal_conv1d_update(...)) in one pass."""
    return _launch(x, weight, bias, conv_state, slots, True, block_c, num_warps)


# Prompt chunks ---------------------------------------------------------------------------------------
#
# `causal_conv1d_varlen_silu` convolves the packed tokens of several sequences in one launch. Programs tile
# the packed run as (block of BLOCK_T tokens, block of BLOCK_C channels), regardless of where sequences
# start, so the grid needs no host-side knowledge of the lengths. Each program finds every token's sequence
# by a binary search over cu_seqlens (a few cached loads of BLOCK_T integers), then sums the K taps:
#
#     y[t, c] = bias[c] + sum_k w[c, k] * in(t - K + 1 + k, c)
#     in(u, c) = x[u, c]                               if u >= start(seq(t))
#              = state[slot, u - start + K - 1, c]    else, if the sequence has an initial state
#              = 0                                    else
#
# Tap k of the tile is the x tile shifted by K - 1 - k rows, loaded again (the repeat hits L1/L2: DRAM sees
# x about once, plus K - 1 halo rows per tile). The cached inputs are read only by programs whose tile holds
# one of a sequence's first K - 1 tokens (a scalar branch). The new state (each sequence's last K - 1
# inputs, partly the old state when the chunk is shorter than K - 1) is written by a second, small launch,
# after every read of the old state has been made.

if HAS_TRITON:
    # The search bounds change with the batch: no recompilation (or constexpr 1) for them.
    @triton.jit(do_not_specialize=["num_seqs", "search_top"])
    def _conv_varlen_kernel(
        x_ptr,
        w_ptr,
        bias_ptr,
        state_ptr,
        cu_ptr,
        slots_ptr,
        init_ptr,
        y_ptr,
        num_tokens,
        channels,
        num_seqs,
        search_top,  # largest power of two <= num_seqs - 1 (0 for one sequence)
        stride_x_t,
        stride_w_c,
        stride_w_k,
        stride_s_slot,
        stride_s_k,
        stride_y_t,
        KW: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        tblk = tl.program_id(0)
        cblk = tl.program_id(1)
        t = tblk * BLOCK_T + tl.arange(0, BLOCK_T)
        offs = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs < channels
        # Tokens past cu_seqlens[-1] (padding, if any) belong to no sequence: they get zeros.
        t_ok = (t < num_tokens) & (t < tl.load(cu_ptr + num_seqs))

        # seq(t) = the last s < num_seqs with cu[s] <= t (empty sequences are skipped over).
        seq = tl.zeros([BLOCK_T], dtype=tl.int32)
        step = search_top
        while step > 0:
            cand = seq + step
            probe = tl.load(cu_ptr + cand, mask=cand < num_seqs, other=num_tokens + 1)
            seq = tl.where(probe <= t, cand, seq)
            step = step // 2
        start = tl.load(cu_ptr + seq).to(tl.int32)
        rel = t - start  # position of each token in its sequence's chunk

        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for k in tl.static_range(KW):
            src = t - (KW - 1) + k
            m = (t_ok & (src >= start))[:, None] & c_ok[None, :]
            xk = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_x_t + offs[None, :], mask=m, other=0.0)
            wk = tl.load(w_ptr + offs * stride_w_c + k * stride_w_k, mask=c_ok, other=0.0)
            acc += xk.to(tl.float32) * wk.to(tl.float32)[None, :]

        # Only a tile holding one of some sequence's first K - 1 tokens reads cached inputs.
        if tl.min(tl.where(t_ok, rel, KW)) < KW - 1:
            slot = tl.load(slots_ptr + seq, mask=t_ok, other=0).to(tl.int64)
            init = tl.load(init_ptr + seq, mask=t_ok, other=0) != 0
            for k in tl.static_range(KW - 1):
                row = rel + k  # = src - start + K - 1, a state row when src < start
                m = (t_ok & init & (row < KW - 1))[:, None] & c_ok[None, :]
                sk = tl.load(
                    state_ptr + slot[:, None] * stride_s_slot + row[:, None] * stride_s_k + offs[None, :],
                    mask=m,
                    other=0.0,
                )
                wk = tl.load(w_ptr + offs * stride_w_c + k * stride_w_k, mask=c_ok, other=0.0)
                # the cached inputs are read as inputs, i.e. in x's dtype (as the torch reference does)
                acc += sk.to(x_ptr.dtype.element_ty).to(tl.float32) * wk.to(tl.float32)[None, :]

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        acc = tl.where(t_ok[:, None], acc, 0.0)
        y_ptrs = y_ptr + t.to(tl.int64)[:, None] * stride_y_t + offs[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(t < num_tokens)[:, None] & c_ok[None, :])

    @triton.jit
    def _conv_varlen_state_kernel(
        x_ptr,
        state_ptr,
        cu_ptr,
        slots_ptr,
        init_ptr,
        channels,
        stride_x_t,
        stride_s_slot,
        stride_s_k,
        KW: tl.constexpr,
        ROWS_POW2: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """state[slot(s)] = the last K - 1 inputs of (old state or zeros) ++ the chunk of sequence s."""
        s = tl.program_id(0)
        cblk = tl.program_id(1)
        offs = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs < channels
        rows = tl.arange(0, ROWS_POW2)
        start = tl.load(cu_ptr + s).to(tl.int32)
        end = tl.load(cu_ptr + s + 1).to(tl.int32)
        slot = tl.load(slots_ptr + s).to(tl.int64)
        init = tl.load(init_ptr + s) != 0
        src = end - (KW - 1) + rows  # input position of new state row j
        is_row = (rows < KW - 1)[:, None] & c_ok[None, :]
        from_x = (src >= start)[:, None] & is_row
        xv = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_x_t + offs[None, :], mask=from_x, other=0.0)
        # a chunk shorter than K - 1 keeps part of the old state: new row j = old row j + length
        slot_ptr = state_ptr + slot * stride_s_slot + offs[None, :]
        old_row = (end - start) + rows
        from_old = (src < start)[:, None] & is_row & init
        old = tl.load(slot_ptr + old_row[:, None] * stride_s_k, mask=from_old, other=0.0)
        new = tl.where(from_x, xv, old.to(x_ptr.dtype.element_ty))
        # Rows of this slot are read above and written below, possibly by different threads: every read
        # of the program completes before any write.
        tl.debug_barrier()
        tl.store(slot_ptr + rows[:, None] * stride_s_k, new.to(state_ptr.dtype.element_ty), mask=is_row)


# (BLOCK_T, BLOCK_C, num_warps) of the prompt kernel, from the H100 sweep of 2026-11-25 (bench_conv_varlen,
# 12,288 channels, bf16): (32, 256, 4) took 0.098 ms at 4,096 tokens and 0.676 ms at 32,768 (81% of the
# copy floor), against 0.104 / 0.736 for (16, 256, 4) and 1.70 / 12.5 ms for the torch loop it replaces.
VARLEN_CONFIG = (32, 256, 4)
VARLEN_STATE_CONFIG = (512, 4)  # (BLOCK_C, num_warps) of the state update


def causal_conv1d_varlen_silu(
    x: torch.Tensor,  # [T, C] packed tokens; rows may be strided, channels contiguous
    weight: torch.Tensor,  # [C, K], 2 <= K <= 8
    bias: torch.Tensor | None,  # [C]
    conv_state: torch.Tensor,  # [slots, K-1, C], channels contiguous; read, then updated in place
    cu_seqlens: torch.Tensor,  # int32 (or int64) [S+1] on x's device
    slots: torch.Tensor,  # int64 [S]
    has_initial_state: torch.Tensor,  # bool [S]: False -> zeros before the chunk
    max_seqlen: int | None = None,  # accepted for the caller's convenience; the grid does not need it
    silu: bool = True,
    *,
    block_t: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Causal depthwise conv (then silu) of prompt chunks, continuing each sequence from its cached inputs.

    Always launches the Triton kernels (also on CPU tensors under TRITON_INTERPRET=1); the dispatcher with
    a torch fallback is `glimpse.kernels.causal_conv1d.causal_conv1d_varlen_silu`. No host synchronisation:
    the grid depends on shapes only. Returns a new contiguous [T, C] tensor of x's dtype (fp32 sums, one
    rounding). Rows past cu_seqlens[-1], if any, are zeros. A slot must not appear twice in `slots`.
    """
    del max_seqlen
    num_tokens, channels = x.shape
    kw = weight.shape[1]
    num_seqs = slots.shape[0]
    assert 2 <= kw <= 8 and weight.shape == (channels, kw), (weight.shape, x.shape)
    assert conv_state.shape[1:] == (kw - 1, channels), (conv_state.shape, weight.shape)
    assert cu_seqlens.shape == (num_seqs + 1,) and has_initial_state.shape == (num_seqs,)
    assert bias is None or bias.shape == (channels,)
    assert conv_state.stride(2) == 1, "conv_state needs contiguous channels"
    if x.stride(1) != 1:
        x = x.contiguous()
    if num_seqs == 0 or channels == 0:
        return torch.zeros((num_tokens, channels), dtype=x.dtype, device=x.device)
    y = torch.empty((num_tokens, channels), dtype=x.dtype, device=x.device)
    cu_seqlens, slots = cu_seqlens.contiguous(), slots.contiguous()  # no-ops for the usual arguments
    has_initial_state = has_initial_state.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if has_initial_state.dtype == torch.bool:
        has_initial_state = has_initial_state.view(torch.uint8)  # same bytes; a plain integer load

    if num_tokens > 0:
        bt = block_t or VARLEN_CONFIG[0]
        bc = block_c or min(VARLEN_CONFIG[1], triton.next_power_of_2(channels))
        warps = num_warps or VARLEN_CONFIG[2]
        top = 1 << ((num_seqs - 1).bit_length() - 1) if num_seqs > 1 else 0
        _conv_varlen_kernel[(triton.cdiv(num_tokens, bt), triton.cdiv(channels, bc))](
            x,
            weight,
            bias if bias is not None else weight,
            conv_state,
            cu_seqlens,
            slots,
            has_initial_state,
            y,
            num_tokens,
            channels,
            num_seqs,
            top,
            x.stride(0),
            *weight.stride(),
            conv_state.stride(0),
            conv_state.stride(1),
            y.stride(0),
            KW=kw,
            HAS_BIAS=bias is not None,
            SILU=silu,
            BLOCK_T=bt,
            BLOCK_C=bc,
            num_warps=warps,
        )
    sbc = min(VARLEN_STATE_CONFIG[0], triton.next_power_of_2(channels))
    _conv_varlen_state_kernel[(num_seqs, triton.cdiv(channels, sbc))](
        x,
        conv_state,
        cu_seqlens,
        slots,
        has_initial_state,
        channels,
        x.stride(0),
        conv_state.stride(0),
        conv_state.stride(1),
        KW=kw,
        ROWS_POW2=triton.next_power_of_2(kw - 1),
        BLOCK_C=sbc,
        num_warps=VARLEN_STATE_CONFIG[1],
    )
    return y
