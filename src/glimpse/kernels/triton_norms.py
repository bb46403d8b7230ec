"""Triton versions of the NemotronH RMS norms (`glimpse.kernels.norms`): one pass over the activations.

The torch references make a separate pass over the activations for every elementwise op (cast to fp32,
square, mean, rsqrt, two multiplies, cast back: ~8 kernels for `rms_norm`, ~12 for `gated_rms_norm`).
Here each row (or each norm group of a row) is one program that reads its inputs once, keeps them in
registers in fp32, and writes the output once:

- `rms_norm(x, w, eps)`: one program per row. y = (w.f32 * (x.f32 * rsqrt(mean(x.f32²) + eps))).to(x.dtype),
  the reference's operation order.
- `gated_rms_norm(x, z, w, groups, eps)`: one program per (row, group). h = x.f32 * silu(z.f32),
  h = (h * rsqrt(mean_group(h²) + eps)).to(x.dtype), y = w * h in torch's promoted dtype of (w, x),
  i.e. the normalised value is rounded to the input dtype BEFORE the weight multiply, as the reference does.
- `add_rms_norm(x, d, w, eps)`: r = x + d (rounded to the activation dtype, as torch's add does),
  y = rms_norm(r): returns (r, y). NemotronH's blocks use it to fuse each block's residual add with the
  next block's norm.

Rows may have any row stride (the Mamba gate z is a column slice of in_proj's output); the last dimension
must be contiguous (other layouts are copied first). Rows or groups wider than MAX_BLOCK elements take a
two-loop path (sum of squares, then normalise), which reads the row twice (the second time mostly from L2).

This module imports without Triton (`HAS_TRITON` is then False); the kernels exist only where it is
installed. `glimpse.kernels.norms` decides when they run.
"""

from __future__ import annotations

import torch

from glimpse.kernels.backend import HAS_TRITON, tl, triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Widest row (or norm group) a program keeps in registers in one piece; wider ones are looped over.
MAX_BLOCK = 16384


def _default_warps(block: int) -> int:
    """Warps per program: ~16 elements per thread at 8192 (hidden 5120), 2048 (a 1280-wide norm group)."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    if block >= 512:
        return 4
    return 2


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        d_ptr,  # the residual delta when ADD (else unused: x_ptr is passed)
        w_ptr,
        r_ptr,  # where x + d goes when ADD (else unused)
        y_ptr,
        stride_x,
        stride_d,
        stride_r,
        stride_y,
        N,
        eps,
        ADD: tl.constexpr,
        BLOCK: tl.constexpr,
        N_CHUNKS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        d_row = d_ptr + row * stride_d
        r_row = r_ptr + row * stride_r
        y_row = y_ptr + row * stride_y
        cols = tl.arange(0, BLOCK)
        if N_CHUNKS == 1:
            mask = cols < N
            h = tl.load(x_row + cols, mask=mask, other=0.0)
            if ADD:
                # torch's x + d: sum in fp32, rounded to the residual's dtype; the norm reads the rounded sum
                h = (h.to(tl.float32) + tl.load(d_row + cols, mask=mask, other=0.0).to(tl.float32)).to(
                    r_ptr.dtype.element_ty
                )
                tl.store(r_row + cols, h, mask=mask)
            h = h.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, (w * (h * rstd)).to(y_ptr.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(N_CHUNKS):
                offs = c * BLOCK + cols
                mask = offs < N
                h = tl.load(x_row + offs, mask=mask, other=0.0)
                if ADD:
                    h = (h.to(tl.float32) + tl.load(d_row + offs, mask=mask, other=0.0).to(tl.float32)).to(
                        r_ptr.dtype.element_ty
                    )
                    tl.store(r_row + offs, h, mask=mask)
                h = h.to(tl.float32)
                acc += h * h
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
            for c in range(N_CHUNKS):
                offs = c * BLOCK + cols
                mask = offs < N
                h = tl.load(x_row + offs, mask=mask, other=0.0)
                if ADD:  # the same rounded sum again (not a read-back of r: no ordering across threads)
                    h = (h.to(tl.float32) + tl.load(d_row + offs, mask=mask, other=0.0).to(tl.float32)).to(
                        r_ptr.dtype.element_ty
                    )
                h = h.to(tl.float32)
                w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(y_row + offs, (w * (h * rstd)).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_rms_norm_kernel(
        x_ptr,
        z_ptr,
        w_ptr,
        y_ptr,
        stride_x,
        stride_z,
        stride_y,
        GS,  # elements per group
        eps,
        BLOCK: tl.constexpr,
        N_CHUNKS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        start = g * GS
        x_row = x_ptr + row * stride_x + start
        z_row = z_ptr + row * stride_z + start
        y_row = y_ptr + row * stride_y + start
        w_grp = w_ptr + start
        cols = tl.arange(0, BLOCK)
        if N_CHUNKS == 1:
            mask = cols < GS
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            h = x * (z / (1.0 + tl.exp(-z)))  # x * silu(z), as torch computes silu in fp32
            rstd = tl.rsqrt(tl.sum(h * h, axis=0) / GS + eps)
            # the reference rounds the normalised value to the input dtype, then multiplies by the weight
            h = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_grp + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, (w * h).to(y_ptr.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(N_CHUNKS):
                offs = c * BLOCK + cols
                mask = offs < GS
                x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
                h = x * (z / (1.0 + tl.exp(-z)))
                acc += h * h
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / GS + eps)
            for c in range(N_CHUNKS):
                offs = c * BLOCK + cols
                mask = offs < GS
                x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
                h = x * (z / (1.0 + tl.exp(-z)))
                h = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
                w = tl.load(w_grp + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(y_row + offs, (w * h).to(y_ptr.dtype.element_ty), mask=mask)


# Launch wrappers (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) ---------------------------------


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` as [rows, n] with a unit last stride (a view where the layout allows, else a copy)."""
    t2 = t if t.dim() == 2 else t.reshape(-1, n)
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _blocking(n: int, block: int | None) -> tuple[int, int]:
    """(BLOCK, N_CHUNKS) for rows of n elements; `block` forces a (power of two) chunk width."""
    block = block or min(triton.next_power_of_2(max(n, 1)), MAX_BLOCK)
    assert block & (block - 1) == 0, "block must be a power of two"
    return block, triton.cdiv(n, block)


def _launch_rms(x, delta, weight, eps, block, num_warps):
    n = x.shape[-1]
    assert weight.shape == (n,), (weight.shape, x.shape)
    x2 = _rows(x, n)
    rows = x2.shape[0]
    if delta is not None:
        assert delta.shape == x.shape, (delta.shape, x.shape)
        d2 = _rows(delta, n)
        r = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, delta.dtype), device=x.device)
        r2 = r.view(rows, n)
        # the norm casts back to the residual's dtype
        y = torch.empty(x.shape, dtype=r.dtype, device=x.device)
    else:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        r = None
    y2 = y.view(rows, n)
    if delta is None:
        d2, r2 = x2, y2
    if rows == 0 or n == 0:
        return y, r
    weight = weight.contiguous()
    blk, chunks = _blocking(n, block)
    _rms_norm_kernel[(rows,)](
        x2,
        d2,
        weight,
        r2,
        y2,
        x2.stride(0),
        d2.stride(0),
        r2.stride(0),
        y2.stride(0),
        n,
        float(eps),
        delta is not None,
        blk,
        chunks,
        num_warps=num_warps or _default_warps(blk),
    )
    return y, r


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    block: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Same contract as `glimpse.kernels.norms.rms_norm` (output in x's dtype), through Triton."""
    return _launch_rms(x, None, weight, eps, block, num_warps)[0]


def add_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    block: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, rms_norm(r, weight, eps)) with r = x + delta, in one pass; r is a new tensor (x is not touched)."""
    y, r = _launch_rms(x, delta, weight, eps, block, num_warps)
    return r, y


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    eps: float,
    *,
    block: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Same contract as `glimpse.kernels.norms.gated_rms_norm`, through Triton. The output dtype is torch's
    promotion of (weight, x), as in the reference's final `weight * h.to(x.dtype)`."""
    n = x.shape[-1]
    assert gate.shape == x.shape, (gate.shape, x.shape)
    assert weight.shape == (n,) and n % groups == 0, (weight.shape, x.shape, groups)
    gs = n // groups
    x2, z2 = _rows(x, n), _rows(gate, n)
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows == 0 or n == 0:
        return y
    y2 = y.view(rows, n)
    weight = weight.contiguous()
    blk, chunks = _blocking(gs, block)
    _gated_rms_norm_kernel[(rows, groups)](
        x2,
        z2,
        weight,
        y2,
        x2.stride(0),
        z2.stride(0),
        y2.stride(0),
        gs,
        float(eps),
        blk,
        chunks,
        num_warps=num_warps or _default_warps(blk),
    )
    return y
