"""Triton kernels for modelopt FP8 linear layers (E4M3 weights, one static per-tensor activation scale).

- `quantize_input` writes fp8(x / s_in) in one pass (the torch reference makes four: float, divide,
  clamp, cast), for the prefill path that hands the result to cuBLASLt's FP8 matmul.
- `fp8_rows_matmul` is the decode path (few rows): each program reads a [BLOCK_N, BLOCK_K] tile of the
  weight with K contiguous, quantises the matching slice of x in registers exactly as the reference does
  (divide in fp32, clamp to ±448, round to nearest E4M3), and accumulates in fp32: a multiply-add for one
  row (GEMV), an FP8 tensor-core dot for 16 or more. One kernel per linear layer instead of the reference's
  four quantisation kernels plus cuBLASLt's matmul, which at one row reads the weight at a fraction of
  the memory bandwidth.
So both paths see the same quantised operands as `kernels.quant_linear.fp8_linear`'s reference and
differ from it only in summation order.
"""

from __future__ import annotations

import torch

from glimpse.kernels.backend import HAS_TRITON, tl, triton

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

if HAS_TRITON:

    @triton.jit
    def _quantized(x, s_in):
        """fp8(x / s_in) as the reference rounds it: an IEEE fp32 division, clamped, rounded to E4M3."""
        q = tl.math.div_rn(x.to(tl.float32), s_in)
        return tl.clamp(q, -448.0, 448.0).to(tl.float8e4nv)  # E4M3's largest finite value

    @triton.jit
    def _quantize_kernel(x_ptr, s_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * stride_out + cols, _quantized(x, tl.load(s_ptr)), mask=ok)

    @triton.jit
    def _fp8_rows_kernel(
        x_ptr,
        w_ptr,
        ws_ptr,
        xs_ptr,
        y_ptr,  # the output (one split) or an fp32 buffer of zeros (several: ATOMIC)
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        steps_per_split,
        BLOCK_M: tl.constexpr,  # 1: one row per program, multiply-add; else an FP8 dot over BLOCK_M rows
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ATOMIC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
        s_in = tl.load(xs_ptr)
        scale = s_in * tl.load(ws_ptr)
        first = pid_k * steps_per_split
        if BLOCK_M == 1:
            x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for step in range(first, first + steps_per_split):
                k = step * BLOCK_K + rk
                k_ok = k < K
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_row + k, mask=k_ok, other=0.0)
                acc2 += w.to(tl.float32) * _quantized(x, s_in).to(tl.float32)[None, :]
            acc = tl.sum(acc2, axis=1) * scale
            y_offs = pid_m.to(tl.int64) * stride_ym + rn
            y_mask = n_ok
        else:
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = rm < M
            x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for step in range(first, first + steps_per_split):
                k = step * BLOCK_K + rk
                k_ok = k < K
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                acc = tl.dot(_quantized(x, s_in), tl.trans(w), acc)
            acc = acc * scale
            y_offs = rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
            y_mask = m_ok[:, None] & n_ok[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptr + y_offs, acc, mask=y_mask)
        else:
            tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


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


def rows_config(m: int, n: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the rows kernel: narrow column tiles when N is small, so
    that the grid fills the GPU without splitting K (no atomics, a deterministic sum)."""
    sms = _multiprocessors(device)
    if m == 1:
        block_n = 32
        while block_n > 4 and triton.cdiv(n, block_n) < 2 * sms:
            block_n //= 2
        return 1, block_n, 256, 4
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    return block_m, 64, 128, 4


def fp8_rows_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """y [M, N] = (fp8(x / s_in) @ e4m3(weight)ᵀ) · s_in · s_w in x's dtype, x [M, K] with unit last stride,
    weight float8_e4m3fn [N, K] row-major; the scales one-element fp32 tensors on x's device."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape != (n, k) or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"x {tuple(x.shape)} and FP8 weight {tuple(weight.shape)} {weight.dtype} disagree")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    block_m, block_n, block_k, warps = rows_config(m, n, x.device)
    n_blocks = triton.cdiv(n, block_n)
    m_programs = m if block_m == 1 else triton.cdiv(m, block_m)
    steps = triton.cdiv(k, block_k)
    split = split_k or max(1, _multiprocessors(x.device) // (n_blocks * m_programs))
    steps_per_split = triton.cdiv(steps, min(split, steps))
    split = triton.cdiv(steps, steps_per_split)
    out = y if split == 1 else torch.zeros(m, n, dtype=torch.float32, device=x.device)
    _fp8_rows_kernel[(n_blocks, split, m_programs)](
        x, weight, weight_scale, input_scale, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0), steps_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=split > 1, num_warps=warps,
    )  # fmt: skip
    return y if split == 1 else y.copy_(out)
