"""GPU only: the RADIO ViT's CUDA path (fc1 + tanh GELU in one cuBLASLt call) against the exact fp32 CPU
forward, and the optional head_dim padding of its attention against SDPA unpadded."""

from __future__ import annotations

import pytest
import torch

from glimpse.config_radio import RadioConfig
from glimpse.model import radio
from glimpse.model.radio import RadioViT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _vit() -> RadioViT:
    torch.manual_seed(0)
    # head_dim 40: padded to 64 on CUDA (the ViT-H's 80 goes to 128 the same way)
    return RadioViT(RadioConfig(hidden_size=80, depth=3, num_heads=2, intermediate_size=320, max_grid=32)).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("attention", ["native", "pad"])
def test_cuda_vit_matches_cpu_fp32(attention, monkeypatch):
    monkeypatch.setattr(radio, "VIT_ATTENTION", attention)
    vit = _vit()
    pixels = torch.randn(3, 3, 64, 96)
    with torch.inference_mode():
        ref = vit(pixels)
        out = vit.to("cuda", torch.bfloat16)(pixels.to("cuda", torch.bfloat16))
    assert radio.GELU_EPILOGUE
    assert _rel(out.cpu(), ref) < 3e-2  # bf16 activations through 3 blocks


def test_padded_attention_equals_unpadded(monkeypatch):
    vit = _vit().to("cuda", torch.float32)
    pixels = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        monkeypatch.setattr(radio, "VIT_ATTENTION", "native")
        native = vit(pixels)
        monkeypatch.setattr(radio, "VIT_ATTENTION", "pad")
        padded = vit(pixels)
    assert _rel(padded, native) < 1e-5
