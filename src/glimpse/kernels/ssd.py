"""The Mamba2 selective state space (SSD) recurrence, per head h with group g = h // (heads / groups):

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t (outer) B_t        state [head_dim, state]
    y_t = S_t @ C_t + D * x_t

Prompt chunks use the chunked form (exact, quadratic only inside a chunk); single tokens use the step.
Everything is computed in fp32; the state pool may store fp32 or bf16. The loops here are the reference;
on CUDA the scan runs vectorised over all chunks (kernels/ssd_vectorized.py), through the Triton kernels of
kernels/triton_ssd.py where `use_triton_scan` allows, and the step runs kernels/triton_ssm_update.py where
`use_triton_update` allows.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from glimpse.kernels import backend, triton_ssm_update
from glimpse.kernels.ssd_vectorized import ssd_chunk_scan_varlen_vectorized


@functools.cache
def _has_bf16_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def use_triton_scan(x: torch.Tensor) -> bool:
    """The scan's Triton kernels take x: Triton usable on it (see backend), on a device with bf16 tensor
    cores (sm_80 or newer)."""
    if not backend.triton_usable(x):
        return False
    index = x.device.index
    return _has_bf16_tensor_cores(torch.cuda.current_device() if index is None else index)


def use_triton_update(x: torch.Tensor) -> bool:
    """The decode step's Triton kernel takes x: Triton usable on it (see backend); any dtypes and strides."""
    return backend.triton_usable(x)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., groups, N] -> [..., heads, N]: each group serves heads/groups consecutive heads."""
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def ssd_sequence(
    x: torch.Tensor,  # [L, H, P] fp32
    dt: torch.Tensor,  # [L, H] fp32, after softplus and limits
    A: torch.Tensor,  # [H] fp32, negative
    B: torch.Tensor,  # [L, H, N] fp32 (already expanded to heads)
    C: torch.Tensor,  # [L, H, N]
    state: torch.Tensor,  # [H, P, N] fp32 initial state
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence through the chunked scan; returns (y [L, H, P] without the D term, final state)."""
    L = x.shape[0]
    y = torch.empty_like(x)
    for start in range(0, L, chunk_size):
        end = min(start + chunk_size, L)
        xc, dtc, Bc, Cc = x[start:end], dt[start:end], B[start:end], C[start:end]
        cum = torch.cumsum(dtc * A, 0)  # [l, H] log-decay from the chunk start
        # decay[t, s] = exp(cum_t - cum_s) for s <= t; mask before exp so the upper triangle can't overflow
        diff = cum[:, None, :] - cum[None, :, :]
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(diff.masked_fill(~causal[:, :, None], float("-inf")))
        scores = torch.einsum("thn,shn->tsh", Cc, Bc) * decay * dtc[None, :, :]
        y_chunk = torch.einsum("tsh,shp->thp", scores, xc)
        y_chunk += torch.einsum("thn,hpn->thp", Cc, state) * torch.exp(cum)[:, :, None]
        y[start:end] = y_chunk
        to_end = torch.exp(cum[-1][None, :] - cum) * dtc  # [l, H]
        state = torch.exp(cum[-1])[:, None, None] * state + torch.einsum("sh,shp,shn->hpn", to_end, xc, Bc)
    return y, state


def ssd_chunk_scan_varlen(
    x: torch.Tensor,  # [T, H, P]
    dt: torch.Tensor,  # [T, H] fp32, after softplus and limits
    A: torch.Tensor,  # [H] fp32
    B: torch.Tensor,  # [T, G, N]
    C: torch.Tensor,  # [T, G, N]
    D: torch.Tensor,  # [H]
    ssm_state: torch.Tensor,  # [slots, H, P, N], updated in place with each sequence's final state
    cu_seqlens: list[int],
    slots: list[int],
    has_initial_state: list[bool],
    chunk_size: int,
) -> torch.Tensor:
    """Packed prompt chunks of several sequences, each continuing from its cached state (or zeros)."""
    with_triton = use_triton_scan(x)
    if with_triton or x.is_cuda:  # vectorised over all chunks, the heavy steps in Triton where they can run
        return ssd_chunk_scan_varlen_vectorized(
            x, dt, A, B, C, D, ssm_state, cu_seqlens, slots, has_initial_state, chunk_size,
            use_triton=with_triton,
        )  # fmt: skip
    heads = x.shape[1]
    xf, Bf, Cf = x.float(), _heads(B.float(), heads), _heads(C.float(), heads)
    y = torch.empty_like(xf)
    for s, slot in enumerate(slots):
        a, b = cu_seqlens[s], cu_seqlens[s + 1]
        init = ssm_state[slot].float() if has_initial_state[s] else xf.new_zeros(ssm_state.shape[1:])
        y[a:b], final = ssd_sequence(xf[a:b], dt[a:b], A, Bf[a:b], Cf[a:b], init, chunk_size)
        ssm_state[slot] = final.to(ssm_state.dtype)
    y += D.float()[None, :, None] * xf
    return y.to(x.dtype)


def selective_state_update(
    x: torch.Tensor,  # [B, H, P]
    dt: torch.Tensor,  # [B, H] fp32, after softplus and limits
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [B, G, N]
    C: torch.Tensor,  # [B, G, N]
    D: torch.Tensor,  # [H]
    ssm_state: torch.Tensor,  # [slots, H, P, N], updated in place
    slots: torch.Tensor,  # int64 [B]
) -> torch.Tensor:
    """Decode: one recurrent step for every sequence at once."""
    if use_triton_update(x):
        return triton_ssm_update.selective_state_update(x, dt, A, B, C, D, ssm_state, slots)
    heads = x.shape[1]
    xf = x.float()
    Bh, Ch = _heads(B.float(), heads), _heads(C.float(), heads)
    state = ssm_state[slots].float()  # [B, H, P, N]
    decay = torch.exp(dt * A)[:, :, None, None]
    state = state * decay + (dt[:, :, None] * xf)[..., None] * Bh[:, :, None, :]
    ssm_state[slots] = state.to(ssm_state.dtype)
    y = torch.einsum("bhpn,bhn->bhp", state, Ch) + D.float()[None, :, None] * xf
    return y.to(x.dtype)


def selective_state_update_fused_dt(
    x: torch.Tensor,  # [B, H, P]
    dt_raw: torch.Tensor,  # [B, H] dt straight out of in_proj (any float dtype, any strides)
    dt_bias: torch.Tensor,  # [H]
    A: torch.Tensor,  # [H] fp32, negative
    B: torch.Tensor,  # [B, G, N]
    C: torch.Tensor,  # [B, G, N]
    D: torch.Tensor,  # [H]
    ssm_state: torch.Tensor,  # [slots, H, P, N], updated in place
    slots: torch.Tensor,  # int64 [B]
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    """The decode step with dt = clamp(softplus(dt_raw + dt_bias), *dt_limit) (what Mamba2Mixer._dt computes),
    inside the kernel on CUDA."""
    if use_triton_update(x):
        return triton_ssm_update.selective_state_update_fused_dt(
            x, dt_raw, dt_bias, A, B, C, D, ssm_state, slots, dt_limit
        )
    dt = F.softplus(dt_raw.float() + dt_bias.float())
    if dt_limit[0] > 0 or math.isfinite(dt_limit[1]):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    return selective_state_update(x, dt, A, B, C, D, ssm_state, slots)
