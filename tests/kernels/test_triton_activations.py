"""relu(x)² in one Triton pass against torch's relu then square: bit-exact on CUDA (both round once from
an exact relu). Triton's interpreter truncates to bf16 instead of rounding, so there one bf16 ulp."""

from __future__ import annotations

import pytest
import torch

from glimpse.kernels import activations, triton_activations

from .triton_device import triton_test_device

DEVICE = triton_test_device()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 20480), (37, 1000), (5000,)])
def test_relu_square_matches_torch(dtype, shape):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    ref = torch.relu(x).square()
    out = x.to(DEVICE)
    if DEVICE == "cpu":  # the interpreter: call the kernel directly (the dispatcher keeps CPU on torch)
        assert triton_activations.relu_square_(out) is out
    else:
        assert activations.relu_square_(out) is out
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all()
    else:
        assert torch.equal(out.cpu(), ref)
