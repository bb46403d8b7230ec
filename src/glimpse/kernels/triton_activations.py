"""Triton version of relu(x)² (`glimpse.kernels.activations.relu_square_`): one in-place pass.

The kernel squares in fp32 and rounds once; torch rounds relu(x) (exact) then the square, so the two agree
to the last bit in fp32 and bf16 alike. This module imports without Triton (`HAS_TRITON` is then False).
"""

from __future__ import annotations

import torch

from glimpse.kernels.backend import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _relu_square_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.maximum(v, 0.0)
        tl.store(x_ptr + offs, (v * v).to(x_ptr.dtype.element_ty), mask=ok)


def relu_square_(x: torch.Tensor, *, block: int = 4096, num_warps: int = 8) -> torch.Tensor:
    """relu(x)² written over x (contiguous, not empty: CUDA, or CPU under TRITON_INTERPRET=1); returns x."""
    _relu_square_kernel[(triton.cdiv(x.numel(), block),)](x, x.numel(), BLOCK=block, num_warps=num_warps)
    return x
