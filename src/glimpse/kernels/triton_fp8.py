"""The activation side of modelopt FP8 linear layers on the GPU: fp8(x / s_in) in one Triton pass.

The torch reference (`kernels.quant_linear.quantize_input_fp8`) makes four passes (float, divide, clamp,
cast) and at decode they cost more than cuBLASLt's FP8 matmul itself; this kernel rounds exactly as the
reference does (an IEEE fp32 division, clamped to ±448, round to nearest even E4M3), so the bytes are
identical. (A Triton FP8 GEMV with the quantisation fused in was measured too, on the H200 on 2026-12-03,
and lost to this pass + `torch._scaled_mm` at every shape but the 1024-wide k/v projection: 34 against
19 µs on out_proj at one row; see docs/PERFORMANCE.md.)
"""

from __future__ import annotations

import torch

from glimpse.kernels.backend import HAS_TRITON, tl, triton

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

if HAS_TRITON:

    @triton.jit
    def _quantized(x, s_in):
        """fp8(x / s_in) as the reference rounds it (NaN becomes ±448 here: the clamp sees it first)."""
        q = tl.math.div_rn(x.to(tl.float32), s_in)
        return tl.clamp(q, -448.0, 448.0).to(tl.float8e4nv)  # E4M3's largest finite value

    @triton.jit
    def _quantize_kernel(x_ptr, s_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * stride_out + cols, _quantized(x, tl.load(s_ptr)), mask=ok)


def quantize_input(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """fp8(x / s_in) for a 2-D x with unit last stride: bit-identical to quant_linear.quantize_input_fp8."""
    m, k = x.shape
    out = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    if m and k:
        block = min(4096, triton.next_power_of_2(k))
        _quantize_kernel[(m, triton.cdiv(k, block))](
            x, input_scale, out, k, x.stride(0), out.stride(0), BLOCK=block, num_warps=4 if block <= 1024 else 8
        )  # fmt: skip
    return out
