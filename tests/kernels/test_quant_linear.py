"""The quantised linear ops (kernels/quant_linear.py): the torch references against float64 computations
written here from the formats' definitions, and on CUDA the fast paths (`torch._scaled_mm` for FP8, the
Triton kernel for NVFP4; the kernel's own tests are in test_triton_nvfp4.py) against the references.

FP8: y = (fp8(x / s_in) @ e4m3(W)ᵀ) · s_in · s_w. NVFP4: W = e2m1(code) · e4m3(scale[n, k // 16]) · s2,
codes two per byte with the low nibble first, y = x @ Wᵀ.
"""

from __future__ import annotations

import pytest
import torch

from glimpse.kernels import quant_linear
from glimpse.kernels.quant_formats import quantize_fp8, quantize_nvfp4
from tests.kernels.fixtures import _one_thread  # noqa: F401

CUDA = torch.cuda.is_available()
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _e4m3_f64(t: torch.Tensor) -> torch.Tensor:
    """float64 values of E4M3 bytes through torch's own float8 dtype (not the code under test)."""
    return t.view(torch.float8_e4m3fn).to(torch.float64)


def _nvfp4_weight_f64(weight: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    n, half = weight.shape
    table = torch.tensor(E2M1, dtype=torch.float64)
    w = weight.long().cpu()
    codes = torch.empty(n, 2 * half, dtype=torch.long)
    codes[:, 0::2] = w % 16  # low nibble: the even element
    codes[:, 1::2] = w // 16
    group = torch.arange(2 * half) // 16
    return table[codes] * _e4m3_f64(scale.cpu())[:, group] * scale_2.double().cpu()


def _fp8_f64(x: torch.Tensor, weight: torch.Tensor, s_w: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    x = x.cpu().float()
    xq = (x / s_in.cpu()).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float64)
    return (xq @ _e4m3_f64(weight.cpu()).T) * s_in.double().cpu() * s_w.double().cpu()


def _check(out: torch.Tensor, expect: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rtol: float,
           roundings: int = 1):  # fmt: skip
    """|out - expect| <= rtol · scale (+ `roundings` of the output dtype's rounding of expect), NaN failing."""
    o = out.cpu().double()
    assert out.dtype == dtype and o.shape == expect.shape
    assert torch.isfinite(o).all()
    rounding = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    bad = (o - expect).abs() > rtol * scale + roundings * rounding * expect.abs()
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} off; max {(o - expect).abs().max().item():.3g}"


def _data(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[0, 0] = 4.0 / k**0.5  # an outlier row
    return x, w


# FP8 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 24, 48), (5, 40, 80), (9, 7, 33)])
def test_fp8_reference(m, n, k, dtype):
    x, w = _data(m, n, k, seed=m + n + k)
    x = x.to(dtype)
    weight, s_w = quantize_fp8(w)
    s_in = x.float().abs().max() / 448 * 1.25  # static scales rarely fit a batch exactly
    out = quant_linear.fp8_linear(x, weight, s_w, s_in)
    expect = _fp8_f64(x, weight, s_w, s_in)
    magnitude = (x.double().abs() @ w.double().abs().T).clamp(min=1e-3)
    _check(out, expect, magnitude, dtype, 1e-5)


def test_fp8_reference_clamps_and_keeps_leading_dims():
    x, w = _data(6, 16, 32, seed=3)
    x[0, 0] = 1e4  # beyond 448 · s_in: saturates rather than becoming NaN
    weight, s_w = quantize_fp8(w)
    s_in = torch.tensor(0.01)
    out = quant_linear.fp8_linear(x.view(2, 3, 32), weight, s_w, s_in)
    assert out.shape == (2, 3, 16)
    expect = _fp8_f64(x, weight, s_w, s_in).view(2, 3, 16)
    _check(out, expect, (x.double().abs().clamp(max=4.48) @ w.double().abs().T).view(2, 3, 16), x.dtype, 1e-5)


def test_scaled_mm_call_form_on_cpu(monkeypatch):
    """The fast path's call (transposed row-major weight, 0-dim fp32 scales, out_dtype) through the CPU
    build's `torch._scaled_mm`, where that build has one: the same numbers as the reference."""
    x, w = _data(4, 32, 64, seed=5)
    x = x.bfloat16()
    weight, s_w = quantize_fp8(w)
    s_in = x.float().abs().max() / 448
    expect = quant_linear.fp8_linear(x, weight, s_w, s_in)
    monkeypatch.setattr(quant_linear, "use_scaled_mm", lambda x, w: True)
    try:
        out = quant_linear.fp8_linear(x, weight, s_w, s_in)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch build has no CPU _scaled_mm: {e}")
    _check(out, expect.double(), (x.double().abs() @ w.double().abs().T), torch.bfloat16, 1e-5)


@pytest.mark.skipif(not CUDA, reason="cuBLASLt FP8 needs CUDA")
@pytest.mark.parametrize("m", [1, 7, 16, 17, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_fast_paths_on_cuda(m, dtype, monkeypatch):
    """The Triton quantisation then cuBLASLt, as the reference, at every row count."""
    from glimpse.kernels import triton_fp8

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matrix units need sm_89+")
    n, k = 96, 256
    x, w = _data(m, n, k, seed=m)
    weight, s_w = quantize_fp8(w)
    s_in = x.abs().max() / 448
    calls = []
    scaled_mm, quantize = torch._scaled_mm, triton_fp8.quantize_input
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append("mm") or scaled_mm(*a, **kw))
    monkeypatch.setattr(
        triton_fp8, "quantize_input", lambda *a, **kw: calls.append("q") or quantize(*a, **kw)
    )
    dev = [t.cuda() for t in (x.to(dtype), weight, s_w, s_in)]
    out = quant_linear.fp8_linear(*dev)
    assert calls == ["q", "mm"]
    expect = _fp8_f64(x.to(dtype), weight, s_w, s_in)
    _check(out, expect, x.double().abs() @ w.double().abs().T, dtype, 1e-4)
    # shapes cuBLASLt can't take fall back to the reference
    calls.clear()
    out = quant_linear.fp8_linear(dev[0][:, :40].contiguous(), dev[1][:, :40].contiguous(), dev[2], dev[3])
    assert calls == [] and out.shape == (m, n)


# NVFP4 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 24, 48), (5, 40, 80), (9, 7, 16)])
def test_nvfp4_reference(m, n, k, dtype):
    x, w = _data(m, n, k, seed=m * n + k)
    x = x.to(dtype)
    weight, scale, scale_2 = quantize_nvfp4(w)
    out = quant_linear.nvfp4_linear(x, weight, scale, scale_2)
    w64 = _nvfp4_weight_f64(weight, scale, scale_2)
    expect = x.double() @ w64.T
    _check(out, expect, (x.double().abs() @ w64.abs().T).clamp(min=1e-3), dtype, 1e-5)
    out3 = quant_linear.nvfp4_linear(x.view(1, m, k), weight, scale, scale_2)
    assert out3.shape == (1, m, n) and torch.equal(out3[0], out)


@pytest.mark.skipif(not CUDA, reason="the Triton NVFP4 kernel runs on CUDA")
@pytest.mark.parametrize("m", [1, 5, 16, 17, 200])
def test_nvfp4_linear_takes_the_kernel_on_cuda(m, monkeypatch):
    from glimpse.kernels import triton_nvfp4

    n, k = 200, 528
    x, w = _data(m, n, k, seed=m)
    weight, scale, scale_2 = quantize_nvfp4(w)
    calls = []
    kernel = triton_nvfp4.nvfp4_matmul
    monkeypatch.setattr(triton_nvfp4, "nvfp4_matmul", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    xb = x.bfloat16()
    out = quant_linear.nvfp4_linear(xb.cuda(), weight.cuda(), scale.cuda(), scale_2.cuda())
    assert calls == [1]
    w64 = _nvfp4_weight_f64(weight, scale, scale_2)
    # the prefill variants (dequantise + cuBLAS) round the matmul's output, then its product with scale_2
    roundings = 2 if triton_nvfp4.default_variant(m).startswith("dequant") else 1
    _check(out, xb.double() @ w64.T, xb.double().abs() @ w64.abs().T, torch.bfloat16, 1e-5, roundings)
