"""The Triton FP8 kernels (kernels/triton_fp8.py) on CUDA: the one-pass activation quantisation is
bit-identical to the torch reference, and the rows kernel (GEMV and FP8 dot) equals the reference
computed in float64 from the same quantised operands, on ragged shapes and K not a multiple of the tile."""

from __future__ import annotations

import pytest
import torch

from glimpse.kernels.quant_formats import quantize_fp8
from glimpse.kernels.quant_linear import quantize_input_fp8

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="Triton FP8 kernels run on CUDA (sm_89+)")


def _skip_old_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 needs sm_89+")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 5120), (7, 33), (300, 1000)])
def test_quantize_input_is_bit_identical(m, k, dtype):
    from glimpse.kernels import triton_fp8

    _skip_old_gpu()
    g = torch.Generator(device="cuda").manual_seed(m + k)
    x = (torch.randn(m, k, device="cuda", generator=g) * 3).to(dtype)
    x[0, 0] = 1e6  # clamped to 448
    s_in = (x.float().abs().amax() / 2000).reshape(())  # many values beyond ±448: the clamp is exercised
    got = triton_fp8.quantize_input(x, s_in)
    assert torch.equal(got.view(torch.uint8), quantize_input_fp8(x, s_in).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m,n,k", [(1, 40, 528), (1, 1024, 5120), (3, 72, 320), (16, 100, 300), (40, 64, 4096)]
)
@pytest.mark.parametrize("split_k", [None, 3])
def test_rows_kernel_against_float64(m, n, k, dtype, split_k):
    from glimpse.kernels import triton_fp8

    _skip_old_gpu()
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) / k**0.5
    weight, s_w = quantize_fp8(w)
    s_in = (x.float().abs().amax() / 448).reshape(())
    xq = quantize_input_fp8(x, s_in).to(torch.float64)
    expect = (xq @ weight.to(torch.float64).T) * s_in.double() * s_w.double()
    out = triton_fp8.fp8_rows_matmul(x.cuda(), weight.cuda(), s_w.cuda(), s_in.cuda(), split_k=split_k)
    assert out.dtype == dtype and out.shape == (m, n)
    scale = (xq.abs() @ weight.to(torch.float64).abs().T) * s_in.double() * s_w.double()
    rounding = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    err = (out.cpu().double() - expect).abs()
    assert (err <= 1e-5 * scale + rounding * expect.abs()).all(), err.max().item()
