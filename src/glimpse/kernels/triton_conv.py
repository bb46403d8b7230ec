"""Triton version of the Mamba2 decode convolution (`glimpse.kernels.causal_conv1d.causal_conv1d_update`).

One program per (sequence, block of channels): read the K-1 cached inputs at the sequence's slot and the
new input, write the window shifted by one back in place (no gather/scatter copies), and return

    y[b, c] = bias[c] + sum_k weight[c, k] * window[b, k, c]      window = (state[slot, 0..K-2], x[b])

accumulated in fp32 and rounded once to x's dtype (the torch reference rounds each product in x's dtype,
so in bf16 the two differ by about one bf16 ulp; against an fp32 evaluation this one is the closer).
`causal_conv1d_update_silu` returns silu(y) from the same pass, which is what the mixer uses next.

This module imports without Triton (`HAS_TRITON` is then False).
"""

from __future__ import annotations

import torch

from glimpse.kernels.triton_ssm_update import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

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
    """silu(causal_conv1d_update(...)) in one pass; the torch reference (then silu) where Triton can't run."""
    if available(x):
        return _launch(x, weight, bias, conv_state, slots, True, block_c, num_warps)
    from glimpse.kernels.causal_conv1d import causal_conv1d_update as reference

    return torch.nn.functional.silu(reference(x, weight, bias, conv_state, slots))
