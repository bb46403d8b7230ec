"""Causal depthwise convolution of the Mamba2 mixer, continuing from a per-sequence state.

The state holds each sequence's last `kernel - 1` inputs, layout [slots, kernel - 1, channels]. On CUDA
the Triton kernels of kernels/triton_conv.py run where `use_triton` allows; the torch code here is the
reference (CPU, or GLIMPSE_TRITON=0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glimpse.kernels import backend, triton_conv


def use_triton(x: torch.Tensor) -> bool:
    """The conv kernels take x: Triton usable on it (see backend); any float dtype, strided rows."""
    return backend.triton_usable(x)


def causal_conv1d_varlen(
    x: torch.Tensor,  # [T, C] packed tokens of several sequences
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None,  # [C]
    conv_state: torch.Tensor,  # [slots, K-1, C], updated in place
    cu_seqlens: list[int],
    slots: list[int],
    has_initial_state: list[bool],
) -> torch.Tensor:
    """Prompt chunks: each sequence is convolved after its cached inputs (zeros for a fresh one)."""
    k = weight.shape[1]
    out = torch.empty_like(x)
    w = weight.unsqueeze(1)  # [C, 1, K] as conv1d wants
    for s, slot in enumerate(slots):
        start, end = cu_seqlens[s], cu_seqlens[s + 1]
        prev = conv_state[slot].to(x.dtype) if has_initial_state[s] else x.new_zeros(k - 1, x.shape[1])
        full = torch.cat([prev, x[start:end]], 0)  # [K-1+L, C]
        if end > start:
            y = F.conv1d(full.t().unsqueeze(0), w, bias, groups=x.shape[1])  # [1, C, L]
            out[start:end] = y[0].t()
        conv_state[slot] = full[-(k - 1) :].to(conv_state.dtype)
    return out


def causal_conv1d_varlen_silu_ref(
    x: torch.Tensor,  # [T, C]
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None,  # [C]
    conv_state: torch.Tensor,  # [slots, K-1, C], updated in place
    cu_seqlens: torch.Tensor,  # int [S+1]
    slots: torch.Tensor,  # int [S]
    has_initial_state: torch.Tensor,  # bool [S]
    max_seqlen: int | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """Torch reference of `causal_conv1d_varlen_silu` (device-tensor arguments; reads them back to the host).

    Rows past cu_seqlens[-1], if any, are zeros, as in the Triton kernel.
    """
    del max_seqlen
    cu = [int(v) for v in cu_seqlens.tolist()]
    slot_list = [int(v) for v in slots.tolist()]
    init = [bool(v) for v in has_initial_state.tolist()]
    out = causal_conv1d_varlen(x, weight, bias, conv_state, cu, slot_list, init)
    out[cu[-1] :] = 0
    return F.silu(out) if silu else out


def causal_conv1d_varlen_silu(
    x: torch.Tensor,  # [T, C] packed tokens; rows may be strided, channels contiguous
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None,  # [C]
    conv_state: torch.Tensor,  # [slots, K-1, C], read as the inputs before each chunk, updated in place
    cu_seqlens: torch.Tensor,  # int32 [S+1] on x's device
    slots: torch.Tensor,  # int64 [S]
    has_initial_state: torch.Tensor,  # bool [S]: False -> zeros before the chunk
    max_seqlen: int | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """silu(causal conv) of prompt chunks: one Triton launch (+ a small state update) on CUDA, with no host
    synchronisation; the torch reference elsewhere (or with GLIMPSE_TRITON=0)."""
    if use_triton(x):
        return triton_conv.causal_conv1d_varlen_silu(
            x, weight, bias, conv_state, cu_seqlens, slots, has_initial_state, max_seqlen, silu
        )
    return causal_conv1d_varlen_silu_ref(
        x, weight, bias, conv_state, cu_seqlens, slots, has_initial_state, max_seqlen, silu
    )


def causal_conv1d_update(
    x: torch.Tensor,  # [B, C] one new token per sequence
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,  # [slots, K-1, C], updated in place
    slots: torch.Tensor,  # int64 [B]
) -> torch.Tensor:
    """Decode: slide each sequence's window by one token."""
    if use_triton(x):
        return triton_conv.causal_conv1d_update(x, weight, bias, conv_state, slots)
    window = torch.cat([conv_state[slots].to(x.dtype), x.unsqueeze(1)], 1)  # [B, K, C]
    y = (window * weight.t().unsqueeze(0)).sum(1)
    if bias is not None:
        y = y + bias
    conv_state[slots] = window[:, 1:].to(conv_state.dtype)
    return y


def causal_conv1d_update_silu(
    x: torch.Tensor,  # [B, C] one new token per sequence
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,  # [slots, K-1, C], updated in place
    slots: torch.Tensor,  # int64 [B]
) -> torch.Tensor:
    """silu(causal_conv1d_update(...)): the decode conv and the mixer's next activation, one pass on CUDA."""
    if use_triton(x):
        return triton_conv.causal_conv1d_update_silu(x, weight, bias, conv_state, slots)
    return F.silu(causal_conv1d_update(x, weight, bias, conv_state, slots))
