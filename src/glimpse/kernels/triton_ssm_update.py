"""Triton version of the Mamba2 decode step (`glimpse.kernels.ssd.selective_state_update`).

One program per (sequence, head, block of BLOCK_P head_dim rows) makes a single pass over its tile of the
state pool, in place at the sequence's slot (no gather/scatter copies):

    s = state[slot, h, rows, :] (fp32 or bf16 in the pool, fp32 in registers)
    s = exp(dt * A[h]) * s + (dt * x[b, h, rows]) (outer) B[b, h // (H/G), :]
    state[slot, h, rows, :] = s   (cast back to the pool's dtype)
    y[b, h, rows] = s @ C[b, h // (H/G), :] + D[h] * x[b, h, rows]

y is reduced from the fp32 state before it is rounded to the pool's dtype, exactly as the torch reference
does. B and C stay [batch, groups, state]: the kernel picks the group, nothing is expanded to heads.

`selective_state_update_fused_dt` also takes the raw dt out of in_proj and computes
dt = clamp(softplus(dt_raw + dt_bias), dt_min, dt_max) in the kernel (what Mamba2Mixer._dt does in torch).

This module imports without Triton (`HAS_TRITON` is then False); the kernels exist only where it is
installed. `glimpse.kernels.ssd` decides when they run.
"""

from __future__ import annotations

import math

import torch

from glimpse.kernels.backend import HAS_TRITON, tl, triton

# Launch defaults, chosen from the device sweep recorded in docs/KERNELS.md (H100, 2026-11-25).
DEFAULT_CONFIG = {
    torch.float32: (16, 4),  # (BLOCK_P, num_warps) for an fp32 state pool
    torch.bfloat16: (16, 2),
    torch.float16: (16, 2),
}


if HAS_TRITON:

    @triton.jit
    def _ssu_kernel(
        x_ptr,
        dt_ptr,
        dt_bias_ptr,
        A_ptr,
        B_ptr,
        C_ptr,
        D_ptr,
        state_ptr,
        slots_ptr,
        y_ptr,
        dt_min,
        dt_max,
        P,
        N,
        heads_per_group,
        stride_x_b,
        stride_x_h,
        stride_x_p,
        stride_dt_b,
        stride_dt_h,
        stride_B_b,
        stride_B_g,
        stride_B_n,
        stride_C_b,
        stride_C_g,
        stride_C_n,
        stride_s_slot,
        stride_s_h,
        stride_s_p,
        stride_s_n,
        stride_y_b,
        stride_y_h,
        stride_y_p,
        DT_SOFTPLUS: tl.constexpr,
        DT_CLAMP: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        g = h // heads_per_group

        slot = tl.load(slots_ptr + b).to(tl.int64)
        rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < P
        col_ok = cols < N
        tile_ok = row_ok[:, None] & col_ok[None, :]

        # The state tile first: it is the only large load, so get it in flight before the small ones.
        s_ptrs = (
            state_ptr
            + slot * stride_s_slot
            + h.to(tl.int64) * stride_s_h
            + rows[:, None] * stride_s_p
            + cols[None, :] * stride_s_n
        )
        s = tl.load(s_ptrs, mask=tile_ok, other=0.0).to(tl.float32)

        b64 = b.to(tl.int64)
        x = tl.load(x_ptr + b64 * stride_x_b + h * stride_x_h + rows * stride_x_p, mask=row_ok, other=0.0)
        x = x.to(tl.float32)
        Bv = tl.load(B_ptr + b64 * stride_B_b + g * stride_B_g + cols * stride_B_n, mask=col_ok, other=0.0)
        Cv = tl.load(C_ptr + b64 * stride_C_b + g * stride_C_g + cols * stride_C_n, mask=col_ok, other=0.0)
        Bv = Bv.to(tl.float32)
        Cv = Cv.to(tl.float32)
        dt = tl.load(dt_ptr + b64 * stride_dt_b + h * stride_dt_h).to(tl.float32)
        if DT_SOFTPLUS:
            v = dt + tl.load(dt_bias_ptr + h).to(tl.float32)
            # softplus as torch computes it (threshold 20), with log1p(e) = log(u) * e / (u - 1), u = 1 + e,
            # which stays accurate where e = exp(v) is tiny (libdevice's log1p is not in the interpreter).
            e = tl.exp(tl.minimum(v, 20.0))
            u = 1.0 + e
            um1 = u - 1.0
            lp = tl.where(um1 == 0.0, e, tl.log(u) * (e / tl.where(um1 == 0.0, 1.0, um1)))
            dt = tl.where(v > 20.0, v, lp)
            if DT_CLAMP:
                dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        A = tl.load(A_ptr + h).to(tl.float32)
        D = tl.load(D_ptr + h).to(tl.float32)

        decay = tl.exp(dt * A)
        s = s * decay + (dt * x)[:, None] * Bv[None, :]
        tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=tile_ok)

        y = tl.sum(s * Cv[None, :], axis=1) + D * x
        tl.store(
            y_ptr + b64 * stride_y_b + h * stride_y_h + rows * stride_y_p,
            y.to(y_ptr.dtype.element_ty),
            mask=row_ok,
        )


def _launch(
    x: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    ssm_state: torch.Tensor,
    slots: torch.Tensor,
    dt_limit: tuple[float, float] | None,
    block_p: int | None,
    num_warps: int | None,
) -> torch.Tensor:
    batch, heads, head_dim = x.shape
    groups, state_size = B.shape[1], B.shape[2]
    assert ssm_state.shape[1:] == (heads, head_dim, state_size), (ssm_state.shape, x.shape, B.shape)
    assert heads % groups == 0 and C.shape == B.shape and dt.shape == (batch, heads)
    assert slots.shape == (batch,)
    y = torch.empty((batch, heads, head_dim), dtype=x.dtype, device=x.device)
    if batch == 0:
        return y
    d_block, d_warps = DEFAULT_CONFIG.get(ssm_state.dtype, (16, 4))
    block_p = block_p or min(d_block, triton.next_power_of_2(head_dim))
    num_warps = num_warps or d_warps
    softplus = dt_bias is not None
    clamp = softplus and dt_limit is not None and (dt_limit[0] > 0 or math.isfinite(dt_limit[1]))
    lo, hi = (float(dt_limit[0]), float(dt_limit[1])) if clamp else (0.0, 0.0)
    grid = (triton.cdiv(head_dim, block_p), heads, batch)
    _ssu_kernel[grid](
        x,
        dt,
        dt_bias if softplus else dt,
        A,
        B,
        C,
        D,
        ssm_state,
        slots,
        y,
        lo,
        hi,
        head_dim,
        state_size,
        heads // groups,
        *x.stride(),
        *dt.stride(),
        *B.stride(),
        *C.stride(),
        *ssm_state.stride(),
        *y.stride(),
        DT_SOFTPLUS=softplus,
        DT_CLAMP=clamp,
        BLOCK_P=block_p,
        BLOCK_N=triton.next_power_of_2(state_size),
        num_warps=num_warps,
    )
    return y


def selective_state_update(
    x: torch.Tensor,  # [B, H, P]
    dt: torch.Tensor,  # [B, H] fp32, after softplus and limits
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [B, G, N]
    C: torch.Tensor,  # [B, G, N]
    D: torch.Tensor,  # [H]
    ssm_state: torch.Tensor,  # [slots, H, P, N], updated in place
    slots: torch.Tensor,  # int [B]
    *,
    block_p: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Same contract as `glimpse.kernels.ssd.selective_state_update`, on CUDA tensors through Triton."""
    return _launch(x, dt, None, A, B, C, D, ssm_state, slots, None, block_p, num_warps)


def selective_state_update_fused_dt(
    x: torch.Tensor,  # [B, H, P]
    dt_raw: torch.Tensor,  # [B, H] dt straight out of in_proj (any float dtype, any strides)
    dt_bias: torch.Tensor,  # [H]
    A: torch.Tensor,  # [H] fp32, negative
    B: torch.Tensor,  # [B, G, N]
    C: torch.Tensor,  # [B, G, N]
    D: torch.Tensor,  # [H]
    ssm_state: torch.Tensor,  # [slots, H, P, N], updated in place
    slots: torch.Tensor,  # int [B]
    dt_limit: tuple[float, float] = (0.0, math.inf),
    *,
    block_p: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """The decode step with dt = clamp(softplus(dt_raw + dt_bias), *dt_limit) computed in the kernel: the same
    contract as `glimpse.kernels.ssd.selective_state_update_fused_dt`."""
    return _launch(x, dt_raw, dt_bias, A, B, C, D, ssm_state, slots, dt_limit, block_p, num_warps)
