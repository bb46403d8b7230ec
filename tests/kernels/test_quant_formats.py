"""The modelopt number formats (kernels/quant_formats.py) against tables written here from the formats'
definitions, not derived from the code under test:

- E2M1 (NVFP4 elements): bit 3 the sign, bits 2:0 index {0, 0.5, 1, 1.5, 2, 3, 4, 6}; two codes per byte,
  the LOW nibble the first (even) element.
- E4M3 "fn": sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 subnormal (m/8 · 2^-6); no
  infinities; S.1111.111 NaN; 448 the largest finite value.
"""

from __future__ import annotations

import math

import pytest
import torch

from glimpse.kernels import quant_formats as qf
from tests.kernels.fixtures import _one_thread  # noqa: F401

# code -> value, from the definition
E2M1 = {
    0b0000: 0.0, 0b0001: 0.5, 0b0010: 1.0, 0b0011: 1.5, 0b0100: 2.0, 0b0101: 3.0, 0b0110: 4.0, 0b0111: 6.0,
    0b1000: -0.0, 0b1001: -0.5, 0b1010: -1.0, 0b1011: -1.5, 0b1100: -2.0, 0b1101: -3.0, 0b1110: -4.0,
    0b1111: -6.0,
}  # fmt: skip

# byte -> value, from the definition (1.mmm · 2^(e-7); 0.mmm · 2^-6 when e = 0)
E4M3 = {
    0x00: 0.0,
    0x01: 2.0**-9,  # smallest subnormal: 1/8 · 2^-6
    0x02: 2.0**-8,
    0x05: 5 * 2.0**-9,
    0x07: 7 * 2.0**-9,  # largest subnormal
    0x08: 2.0**-6,  # smallest normal
    0x09: 1.125 * 2.0**-6,
    0x30: 0.5,
    0x38: 1.0,
    0x3C: 1.5,
    0x3F: 1.875,
    0x40: 2.0,
    0x55: 1.625 * 2.0**3,
    0x77: 1.875 * 2.0**7,  # 240
    0x78: 256.0,
    0x7E: 448.0,  # the largest finite
    0x80: -0.0,
    0x81: -(2.0**-9),
    0x87: -7 * 2.0**-9,
    0x88: -(2.0**-6),
    0xB8: -1.0,
    0xC4: -3.0,
    0xFE: -448.0,
}


def _same(a: float, b: float) -> bool:
    """Equal values with equal signs (so -0.0 differs from 0.0), or both NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


# E2M1 ---------------------------------------------------------------------------------------------------


def test_e2m1_codes():
    values = qf.e2m1_to_float(torch.arange(16, dtype=torch.uint8))
    for code, expect in E2M1.items():
        assert _same(values[code].item(), expect), (code, values[code].item(), expect)


@pytest.mark.parametrize("position", ["low", "high"])
def test_e2m1_every_code_in_both_nibbles(position):
    """Each code in one nibble of a byte with every code in the other: unpacking puts the low nibble first,
    and dequantising (scale 1.0 = E4M3 0x38, weight_scale_2 1) gives the table's values."""
    code = torch.arange(16, dtype=torch.uint8).repeat_interleave(16)
    other = torch.arange(16, dtype=torch.uint8).repeat(16)
    low, high = (code, other) if position == "low" else (other, code)
    packed = (low | (high << 4)).view(1, 256)  # one row, K = 512
    codes = qf.unpack_nvfp4(packed)
    assert codes.shape == (1, 512)
    assert torch.equal(codes[0, 0::2], low) and torch.equal(codes[0, 1::2], high)
    scales = torch.full((1, 512 // 16), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)
    w = qf.dequantize_nvfp4(packed, scales, torch.tensor(1.0))
    mine = w[0, 0::2] if position == "low" else w[0, 1::2]
    for i in range(256):
        assert _same(mine[i].item(), E2M1[int(code[i])]), (position, i, mine[i].item())
    assert torch.equal(qf.pack_nvfp4(codes), packed)


def test_float_to_e2m1_rounds_to_nearest_even():
    v = torch.tensor(
        [0.0, 0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 6.0, 7.0, 100.0, -0.1, -0.3]
    )
    expect = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0, 0.0, -0.5]
    codes = qf.float_to_e2m1(v)
    got = [E2M1[int(c)] for c in codes]
    assert got == expect
    assert int(codes[-2]) == 0  # -0.1 rounds to +0, not to the negative-zero code


# E4M3 ---------------------------------------------------------------------------------------------------


def test_e4m3_table():
    bits = torch.tensor(list(E4M3), dtype=torch.uint8)
    values = qf.e4m3_to_float(bits)
    for b, v in zip(E4M3, values.tolist()):
        assert _same(v, E4M3[b]), (hex(b), v, E4M3[b])
    # the same through a float8_e4m3fn tensor
    assert torch.equal(qf.e4m3_to_float(bits.view(torch.float8_e4m3fn)), values)


def test_e4m3_nan_and_all_codes():
    nan = qf.e4m3_to_float(torch.tensor([0x7F, 0xFF], dtype=torch.uint8))
    assert torch.isnan(nan).all()
    every = qf.e4m3_to_float(torch.arange(256, dtype=torch.uint8))
    assert torch.isnan(every).sum() == 2 and torch.isfinite(every).sum() == 254
    finite = every[torch.isfinite(every)]
    assert finite.max() == 448.0 and finite.min() == -448.0
    # positive codes 0x00..0x7E increase strictly (the format is monotonic in its bits)
    assert (every[1:0x7F] > every[0:0x7E]).all()
    # a second oracle: torch's own float8_e4m3fn
    theirs = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(torch.nan_to_num(every, nan=1e9), torch.nan_to_num(theirs, nan=1e9))
    ok = torch.isfinite(every)
    assert torch.equal(torch.signbit(every[ok]), torch.signbit(theirs[ok]))


# Round trips --------------------------------------------------------------------------------------------


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0, 3] = 0.3  # an outlier: most groups' scales sit well below the global one
    w[1, : 2 * qf.NVFP4_GROUP] = 0.0  # all-zero groups
    w[2, 16:32] *= 1e-4  # tiny groups (subnormal E4M3 scales)
    return w


def test_nvfp4_round_trip_within_the_format():
    """|w - deq(q(w))| <= max(step, |w|) / 4 with step = group scale · global scale: half a gap of the
    E2M1 grid (gaps 0.5 below 2, 1 below 4, 2 below 6, in units of step), and E4M3's rounding of the
    group scale (at most 1/16 down) costs at most the saturation of values in (6, 6.375] steps."""
    w = _weights(6, 160, 0)
    weight, scale, global_scale = qf.quantize_nvfp4(w)
    assert weight.dtype == torch.uint8 and weight.shape == (6, 80)
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (6, 10)
    assert global_scale.dtype == torch.float32 and global_scale.numel() == 1
    assert torch.isclose(global_scale, w.abs().max() / (6 * 448))
    deq = qf.dequantize_nvfp4(weight, scale, global_scale)
    step = (scale.float() * global_scale).repeat_interleave(16, dim=1)
    bound = torch.maximum(step, w.abs()) / 4 + 1e-9
    assert ((deq - w).abs() <= bound).all()
    assert (deq[1, :32] == 0).all()
    assert deq.dtype == torch.float32
    assert qf.dequantize_nvfp4(weight, scale, global_scale, torch.bfloat16).dtype == torch.bfloat16


def test_nvfp4_grid_values_round_trip_exactly():
    """Weights on the format's grid whose groups each reach ±6 steps quantise back to the same codes and
    scales (the largest group scale 448 makes the global scale exactly 1)."""
    g = torch.Generator().manual_seed(1)
    n, k = 4, 64
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    codes[codes == 8] = 0  # -0 quantises to +0
    codes[:, ::16] = 7  # each group holds a +6
    scale_bits = torch.randint(0x08, 0x7E, (n, k // 16), generator=g, dtype=torch.uint8)
    scale_bits[0, 0] = 0x7E
    scales = scale_bits.view(torch.float8_e4m3fn)
    w = qf.dequantize_nvfp4(qf.pack_nvfp4(codes), scales, torch.tensor(1.0))
    weight, scale, global_scale = qf.quantize_nvfp4(w)
    assert global_scale.item() == 1.0
    assert torch.equal(scale.view(torch.uint8), scale_bits)
    assert torch.equal(qf.unpack_nvfp4(weight), codes)


def test_nvfp4_zeros_and_shape_errors():
    weight, scale, global_scale = qf.quantize_nvfp4(torch.zeros(2, 32))
    assert (weight == 0).all() and torch.isfinite(global_scale)
    assert (qf.dequantize_nvfp4(weight, scale, global_scale) == 0).all()
    with pytest.raises(ValueError):
        qf.quantize_nvfp4(torch.zeros(2, 24))
    with pytest.raises(ValueError):
        qf.dequantize_nvfp4(weight, scale[:, :1], global_scale)


def test_fp8_round_trip_within_the_format():
    """E4M3 keeps 4 significant bits: relative error at most 2^-4 for normals, absolute at most half the
    subnormal spacing (2^-10 · scale) below."""
    w = _weights(5, 48, 2)
    weight, scale = qf.quantize_fp8(w)
    assert weight.dtype == torch.float8_e4m3fn and scale.numel() == 1
    assert torch.isclose(scale, w.abs().max() / 448)
    deq = qf.dequantize_fp8(weight, scale)
    bound = torch.maximum(w.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)
    assert ((deq - w).abs() <= bound).all()
    assert (deq.abs().max() - w.abs().max()).abs() <= 1e-6 * w.abs().max()  # amax maps to 448 exactly
    assert qf.dequantize_fp8(weight, scale, torch.bfloat16).dtype == torch.bfloat16
