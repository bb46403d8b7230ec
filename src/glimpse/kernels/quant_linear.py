"""Linear layers over NVIDIA modelopt checkpoints' FP8 and NVFP4 weights: y = x @ Wᵀ (no bias).

The torch code in each function is the reference (CPU, GLIMPSE_TRITON=0, or shapes the fast path can't
take); on CUDA, where `use_scaled_mm` / `use_triton` allow:
- `fp8_linear` runs cuBLASLt's FP8 matmul (`torch._scaled_mm`) on GPUs with FP8 matrix units (sm_89+)
  after a one-pass Triton quantisation of the activations (kernels/triton_fp8.py), byte for byte the
  reference's, so the two differ only in accumulation.
- `nvfp4_linear` runs the Triton W4A16 kernel (kernels/triton_nvfp4.py): bf16/fp16 activations against
  weights dequantised in registers (Hopper has no FP4 matrix units; `input_scale` is not used).
Formats: `glimpse.kernels.quant_formats`.
"""

from __future__ import annotations

import torch

from glimpse.kernels import backend, triton_fp8, triton_nvfp4
from glimpse.kernels.quant_formats import E4M3_MAX, dequantize_nvfp4, e4m3_to_float

SCALED_MM_DTYPES = (torch.bfloat16, torch.float16)  # the model's activations; fp32 keeps the reference


def quantize_input_fp8(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """fp8(x / s_in): divided in fp32, clamped to ±448 (E4M3 has no infinities), rounded to nearest E4M3."""
    return (x.float() / input_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def use_scaled_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """cuBLASLt FP8 takes these: CUDA tensors (and GLIMPSE_TRITON not 0, the switch of every fast path),
    bf16/fp16 activations, sm_89+, K and N multiples of 16, and a row-major [N, K] weight (passed as its
    column-major transpose)."""
    if not (backend.ENABLED and x.is_cuda and weight.is_cuda and x.dtype in SCALED_MM_DTYPES):
        return False
    n, k = weight.shape
    return (
        torch.cuda.get_device_capability(x.device) >= (8, 9)
        and k % 16 == 0
        and n % 16 == 0
        and weight.is_contiguous()
    )


def use_triton(x: torch.Tensor) -> bool:
    """The NVFP4 kernel takes x: Triton usable on it (see backend), in a dtype it handles."""
    return backend.triton_usable(x) and x.dtype in triton_nvfp4.DTYPES


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor
) -> torch.Tensor:
    """y [..., N] = (fp8(x / s_in) @ e4m3(weight)ᵀ) · s_in · s_w in x's dtype.

    weight float8_e4m3fn [N, K]; weight_scale (s_w) and input_scale (s_in) one-element fp32 tensors on x's
    device (tensors, not numbers, so that no call syncs with the host)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if use_scaled_mm(x2, weight) and backend.triton_usable(x2):
        xq = triton_fp8.quantize_input(x2.contiguous(), input_scale.float())  # bytes as the reference's
    else:
        xq = quantize_input_fp8(x2, input_scale)
    if use_scaled_mm(x2, weight):
        y = torch._scaled_mm(
            xq.contiguous(),
            weight.t(),
            scale_a=input_scale.float().reshape(()),
            scale_b=weight_scale.float().reshape(()),
            out_dtype=x.dtype,
        )
    else:
        w = e4m3_to_float(weight)  # the e4m3 values, exact in fp32 (no host scalar: graph capture safe)
        y = ((xq.float() @ w.t()) * (input_scale.float() * weight_scale.float())).to(x.dtype)
    return y.reshape(*shape[:-1], weight.shape[0])


def nvfp4_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor
) -> torch.Tensor:
    """y [..., N] = x @ Wᵀ in x's dtype, W = e2m1(weight) · e4m3(weight_scale) · weight_scale_2 (weight-only:
    x is not quantised).

    weight uint8 [N, K/2]; weight_scale float8_e4m3fn [N, K/16]; weight_scale_2 a one-element fp32 tensor."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if use_triton(x2):
        y = triton_nvfp4.nvfp4_matmul(x2, weight, weight_scale, weight_scale_2)
    else:
        w = dequantize_nvfp4(weight, weight_scale, weight_scale_2, torch.float32)
        y = (x2.float() @ w.t()).to(x.dtype)
    return y.reshape(*shape[:-1], weight.shape[0])
