"""The Triton FP8 activation quantisation (kernels/triton_fp8.py) on CUDA: bit-identical to the torch
reference, clamping included, on ragged shapes."""

from __future__ import annotations

import pytest
import torch

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
    x[0, 0] = 6e4  # clamped to 448 (and still finite in fp16)
    s_in = (x.float().abs().amax() / 2000).reshape(())  # many values beyond ±448: the clamp is exercised
    got = triton_fp8.quantize_input(x, s_in)
    assert torch.equal(got.view(torch.uint8), quantize_input_fp8(x, s_in).view(torch.uint8))
