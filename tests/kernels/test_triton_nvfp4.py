"""The Triton NVFP4 W4A16 matmul (kernels/triton_nvfp4.py), both variants, against the torch reference
(`quant_linear.nvfp4_linear` on CPU copies) for ragged shapes: M not a multiple of the row tile, N not a
multiple of the column tile, K = 16 · odd and K spanning several tiles and splits.

Runs on CUDA, or on a CPU through Triton's interpreter with TRITON_INTERPRET=1 GLIMPSE_TEST_INTERPRET=1
(small shapes and tiles there; the interpreter truncates fp32 -> bf16 instead of rounding); else skipped.

The kernel's weights are exact in the activation dtype (e2m1 · e4m3 · 2^-8), so it differs from the fp32
reference only in summation order (fp32 accumulation) and the final rounding to the output dtype.
"""

from __future__ import annotations

import pytest
import torch

from glimpse.kernels import backend, quant_linear
from glimpse.kernels.quant_formats import dequantize_nvfp4, quantize_nvfp4
from tests.kernels.fixtures import _one_thread  # noqa: F401
from tests.kernels.triton_device import triton_test_device

DEVICE = triton_test_device()

from glimpse.kernels import triton_nvfp4  # noqa: E402
from glimpse.kernels.triton_nvfp4 import LaunchConfig  # noqa: E402

# one output rounding: nearest on CUDA (half an ulp), truncation in the interpreter (a whole one)
ROUNDING = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

# small tiles so that the interpreter's shapes still span several tiles in M, N and K
SMALL = {
    "gemv": LaunchConfig(block_m=1, block_n=32, block_k=32, num_warps=4),
    "splitk": LaunchConfig(block_m=16, block_n=32, block_k=32, num_warps=4),
    "tiled": LaunchConfig(block_m=16, block_n=32, block_k=64, num_warps=4),
    "dequant": LaunchConfig(block_m=0, block_n=32, block_k=64, num_warps=4),
    "rows1": LaunchConfig(block_m=1, block_n=8, block_k=32, num_warps=4),
    "rows": LaunchConfig(block_m=16, block_n=32, block_k=64, num_warps=4),
    "dequant_rows": LaunchConfig(block_m=0, block_n=8, block_k=64, num_warps=4),
}


def _case(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[:, :16] *= 1e-3  # a group with a subnormal E4M3 scale in every row
    weight, scale, scale_2 = quantize_nvfp4(w)
    return x, weight, scale, scale_2


def _check(out: torch.Tensor, x, weight, scale, scale_2, roundings: int = 1):
    """out against the CPU reference: fp32 summation-order error (relative to sum |x| |w|) plus
    `roundings` roundings of the output."""
    expect = quant_linear.nvfp4_linear(x.float(), weight, scale, scale_2).double()
    magnitude = x.double().abs() @ dequantize_nvfp4(weight, scale, scale_2).double().abs().T
    o = out.cpu().double()
    assert out.dtype == x.dtype and o.shape == expect.shape
    assert torch.isfinite(o).all(), "unwritten or non-finite outputs"
    bound = 2e-6 * magnitude + roundings * ROUNDING[x.dtype] * expect.abs() + 1e-30
    bad = (o - expect).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} off; max {(o - expect).abs().max().item():.3g}"


def _run(x, weight, scale, scale_2, **kw):
    d = [t.to(DEVICE) for t in (x, weight, scale, scale_2)]
    return triton_nvfp4.nvfp4_matmul(*d, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "m,n,k,variant,config,split",
    [
        (1, 40, 48, "splitk", "gemv", 1),  # K = 16·3: one ragged K tile, N two ragged tiles
        (1, 72, 208, "splitk", "gemv", 3),  # K = 16·13: 7 K steps over 3 splits (atomics)
        (1, 72, 208, "splitk", "gemv", 7),  # one step per split
        (3, 40, 80, "splitk", "splitk", 1),  # rows through tl.dot, 13 of 16 masked
        (3, 72, 208, "splitk", "splitk", 4),
        (17, 40, 208, "splitk", "splitk", 2),  # two row tiles
        (17, 72, 208, "tiled", "tiled", None),
        (64, 40, 80, "tiled", "tiled", None),
        (3, 40, 80, "tiled", "tiled", None),  # a tiled call with few rows
        (17, 72, 208, "dequant", "dequant", None),
        (1, 40, 48, "rows", "rows1", 1),  # the row-wise GEMV: ragged K and N tiles
        (1, 72, 208, "rows", "rows1", 3),  # 7 K steps over 3 splits (atomics)
        (3, 40, 80, "rows", "rows", 1),  # rows through tl.dot, 13 of 16 masked
        (17, 72, 208, "rows", "rows", 2),  # two row tiles, two splits
        (17, 72, 208, "dequant_rows", "dequant_rows", None),
        (17, 40, 48, "dequant_rows", "dequant_rows", None),  # K shorter than one tile
    ],
)
def test_variants_ragged(m, n, k, variant, config, split, dtype):
    x, weight, scale, scale_2 = _case(m, n, k, dtype, seed=m * 1000 + n + k)
    cfg = SMALL[config]
    if split is not None:
        cfg = LaunchConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, split_k=split)
    out = _run(x, weight, scale, scale_2, variant=variant, config=cfg)
    # dequant rounds the matmul's output, then its product with the global scale
    _check(out, x, weight, scale, scale_2, roundings=2 if variant.startswith("dequant") else 1)


@pytest.mark.parametrize("m", [1, 3, 17, 64, 65])
def test_default_dispatch_and_configs(m):
    """nvfp4_matmul's own choice of variant and tiles (default_variant), K = 16·33."""
    x, weight, scale, scale_2 = _case(m, 130, 528, torch.bfloat16, seed=m)
    variant = triton_nvfp4.default_variant(m)
    roundings = 2 if variant.startswith("dequant") else 1
    _check(_run(x, weight, scale, scale_2), x, weight, scale, scale_2, roundings=roundings)


def test_fp16_and_strided_rows():
    x, weight, scale, scale_2 = _case(5, 48, 96, torch.float16, seed=9)
    wide = torch.zeros(5, 128, dtype=torch.float16)
    wide[:, :96] = x
    out = _run(wide[:, :96], weight, scale, scale_2, variant="splitk", config=SMALL["splitk"])
    _check(out, x, weight, scale, scale_2)


def test_extreme_scales():
    """Scales at both ends of E4M3 (448 and the 2^-9 subnormal) and a large global scale: the in-register
    decode keeps every weight exact, so fp32 activations match the reference to summation order."""
    g = torch.Generator().manual_seed(4)
    n, k = 24, 64
    weight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    bits = torch.randint(0, 0x7F, (n, k // 16), generator=g, dtype=torch.uint8)
    bits[:, 0] = 0x7E
    bits[:, 1] = 0x01
    bits[0, 2] = 0x80  # negative zero
    bits[1, 3] = 0xFE  # negative scale
    scale = bits.view(torch.float8_e4m3fn)
    scale_2 = torch.tensor(3.5e3)
    x = torch.randn(2, k, generator=g)
    for variant, config in (("splitk", "gemv"), ("splitk", "splitk"), ("tiled", "tiled")):
        out = _run(
            x[:1] if config == "gemv" else x, weight, scale, scale_2, variant=variant, config=SMALL[config]
        )
        _check(out, x[:1] if config == "gemv" else x, weight, scale, scale_2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_exact(dtype):
    """The dequantising pass writes e2m1 · e4m3 · 2^-8 exactly (every code, subnormal and extreme scales,
    N and K/16 not multiples of its tile); NaN scales give NaN weights."""
    g = torch.Generator().manual_seed(8)
    n, k = 37, 208
    weight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    bits = torch.randint(0, 0x7F, (n, k // 16), generator=g, dtype=torch.uint8)
    bits[:, 0], bits[:, 1], bits[:, 2] = 0x7E, 0x01, 0x81
    scale = bits.view(torch.float8_e4m3fn)
    out = triton_nvfp4.dequantize_exact(weight.to(DEVICE), scale.to(DEVICE), dtype, SMALL["dequant"])
    expect = dequantize_nvfp4(weight, scale, torch.tensor(2.0**-8), torch.float32)
    assert out.dtype == dtype and torch.equal(out.cpu().float(), expect)
    bits[3, 4] = 0xFF
    out = triton_nvfp4.dequantize_exact(weight.to(DEVICE), bits.to(DEVICE), dtype).cpu().float()
    assert torch.isnan(out[3, 64:80]).all() and torch.isnan(out).sum() == 16


def test_empty_and_bad_shapes():
    x, weight, scale, scale_2 = _case(2, 16, 32, torch.float32, seed=1)
    assert _run(x[:0], weight, scale, scale_2).shape == (0, 16)
    with pytest.raises(ValueError):
        _run(x[:, :16], weight, scale, scale_2)
    with pytest.raises(ValueError):
        _run(x, weight, scale[:, :1], scale_2)


def test_nvfp4_linear_dispatches_to_the_kernel(monkeypatch):
    """quant_linear.nvfp4_linear calls the kernel when `use_triton` says so (patched to accept CPU tensors
    under the interpreter), with leading dims folded into rows, and keeps the reference when GLIMPSE_TRITON
    is off."""
    x, weight, scale, scale_2 = _case(6, 40, 80, torch.bfloat16, seed=2)
    calls = []
    kernel = triton_nvfp4.nvfp4_matmul
    monkeypatch.setattr(triton_nvfp4, "nvfp4_matmul", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    if DEVICE == "cpu":
        monkeypatch.setattr(quant_linear, "use_triton", lambda t: t.dtype in triton_nvfp4.DTYPES)
    d = [t.to(DEVICE) for t in (x.view(2, 3, 80), weight, scale, scale_2)]
    out = quant_linear.nvfp4_linear(*d)
    assert calls == [1] and out.shape == (2, 3, 40)
    _check(out.view(6, 40), x, weight, scale, scale_2)
    if DEVICE == "cuda":
        monkeypatch.setattr(backend, "ENABLED", False)
        quant_linear.nvfp4_linear(*d)
        assert calls == [1]


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_kernels_replay_in_a_cuda_graph():
    """Both variants (the split-K one with its zeroed fp32 buffer) captured and replayed: same output."""
    x, weight, scale, scale_2 = _case(64, 520, 1040, torch.bfloat16, seed=7)
    d = [t.cuda() for t in (x, weight, scale, scale_2)]
    calls = [
        lambda: triton_nvfp4.nvfp4_matmul(d[0][:1], *d[1:]),
        lambda: triton_nvfp4.nvfp4_matmul(d[0][:8], *d[1:]),
        lambda: triton_nvfp4.nvfp4_matmul(*d),
    ]
    eager = [c() for c in calls]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = [c() for c in calls]
    graph.replay()
    torch.cuda.synchronize()
    for o, e, rows in zip(out, eager, (1, 8, 64)):
        _check(o, x[:rows], weight, scale, scale_2)
        _check(e, x[:rows], weight, scale, scale_2)
