"""The number formats of NVIDIA's "modelopt" checkpoints, decoded and encoded in plain torch.

- FP8 (`quant_algo: FP8`): `weight` float8_e4m3fn [N, K] with one fp32 `weight_scale` per tensor:
  W = e4m3(weight) * weight_scale.
- NVFP4 (`quant_algo: NVFP4`, groups of 16 along K): `weight` uint8 [N, K/2] holding two E2M1 codes per
  byte, the LOW nibble being the first (even) element; `weight_scale` float8_e4m3fn [N, K/16] (row-major,
  one per group); `weight_scale_2` one fp32 per tensor:
  W[n, k] = e2m1(code[n, k]) * e4m3(weight_scale[n, k // 16]) * weight_scale_2.

E2M1 code: bit 3 the sign, bits 2:0 an index into {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
E4M3 (the "fn" variant): sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
(mantissa/8 * 2^-6); no infinities; S.1111.111 is NaN, so the largest finite value is 448 (0x7E).

Decoding here reads the bits (it does not lean on torch's float8 casts), so it serves as the reference for
the kernels. The quantisers exist to make small test checkpoints: they round to nearest (ties to the even
code), which is what a checkpoint's producer may or may not have done, so nothing compares against them.
"""

from __future__ import annotations

import torch

NVFP4_GROUP = 16
"""Elements of K that share one E4M3 scale."""

E2M1_MAX = 6.0
E4M3_MAX = 448.0

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""|value| of E2M1 codes 0..7 (code + 8 is the same magnitude, negative)."""


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a uint8 or float8_e4m3fn tensor, as uint8."""
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 or float8_e4m3fn bytes, got {t.dtype}")
    return t


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of E2M1 codes (integers 0..15, one per element)."""
    table = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), device=codes.device)
    return table[codes.long()]


def e4m3_to_float(bits: torch.Tensor) -> torch.Tensor:
    """fp32 values of E4M3 (fn) bytes: a uint8 tensor of raw codes, or a float8_e4m3fn tensor."""
    b = _as_bits(bits).to(torch.int32)
    sign = torch.where(b >= 0x80, -1.0, 1.0)
    exponent = (b >> 3) & 0xF
    mantissa = (b & 0x7).float()
    normal = (1.0 + mantissa / 8.0) * torch.exp2((exponent - 7).float())
    subnormal = mantissa / 8.0 * 2.0**-6
    value = sign * torch.where(exponent == 0, subnormal, normal)
    return torch.where((b & 0x7F) == 0x7F, torch.nan, value)


def unpack_nvfp4(packed: torch.Tensor) -> torch.Tensor:
    """E2M1 codes [..., 2 * B] (uint8, 0..15) of packed bytes [..., B]: element 2i is byte i's low nibble,
    element 2i + 1 its high nibble."""
    packed = _as_bits(packed)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return codes.flatten(-2)


def pack_nvfp4(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of `unpack_nvfp4`: codes [..., K] (K even) to bytes [..., K/2]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"an even number of codes per row is needed, got {codes.shape[-1]}")
    c = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return c[..., 0] | (c[..., 1] << 4)


def float_to_e2m1(values: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) nearest to `values`, ties to the code with a zero mantissa bit (even); values
    beyond ±6 saturate. NaN maps to 0."""
    grid = torch.tensor(E2M1_MAGNITUDES, device=values.device)
    v = torch.nan_to_num(values.float(), nan=0.0)
    mag = v.abs().clamp(max=E2M1_MAX)
    lower = (torch.searchsorted(grid, mag.contiguous(), right=True) - 1).clamp(0, len(grid) - 2)
    below, above = grid[lower], grid[lower + 1]
    up = (above - mag < mag - below) | ((above - mag == mag - below) & (lower % 2 == 1))
    index = lower + up.long()
    sign = (v < 0) & (index > 0)  # no negative zero
    return (index | (sign.long() << 3)).to(torch.uint8)


def dequantize_nvfp4(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor | float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W [N, K] from NVFP4 tensors: weight uint8 [N, K/2], weight_scale E4M3 [N, K/16] (float8_e4m3fn or
    its raw uint8 bytes), weight_scale_2 fp32 (a scalar tensor or a number). Computed in fp32, then cast."""
    n, half_k = weight.shape
    k = 2 * half_k
    if k % NVFP4_GROUP or weight_scale.shape != (n, k // NVFP4_GROUP):
        raise ValueError(
            f"weight {tuple(weight.shape)} and weight_scale {tuple(weight_scale.shape)} disagree"
        )
    values = e2m1_to_float(unpack_nvfp4(weight))
    scales = e4m3_to_float(weight_scale).repeat_interleave(NVFP4_GROUP, dim=-1)
    w = values * scales * torch.as_tensor(weight_scale_2, dtype=torch.float32, device=weight.device)
    return w.to(dtype)


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight uint8 [N, K/2], weight_scale float8_e4m3fn [N, K/16], weight_scale_2 fp32 scalar) of w [N, K].

    weight_scale_2 = amax(|w|) / (6 * 448), so that every group scale amax_group / 6 / weight_scale_2 fits
    E4M3; group scales round to nearest E4M3, codes to the nearest E2M1 of w / (scale * weight_scale_2)."""
    n, k = w.shape
    if k % NVFP4_GROUP:
        raise ValueError(f"K = {k} is not a multiple of {NVFP4_GROUP}")
    w = w.float()
    amax = w.abs().max()
    global_scale = torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))
    groups = w.view(n, k // NVFP4_GROUP, NVFP4_GROUP)
    group_scale = (groups.abs().amax(-1) / E2M1_MAX / global_scale).clamp(max=E4M3_MAX)
    scale_e4m3 = group_scale.to(torch.float8_e4m3fn)
    step = e4m3_to_float(scale_e4m3).unsqueeze(-1) * global_scale
    scaled = torch.where(step > 0, groups / torch.where(step > 0, step, 1.0), 0.0)
    codes = float_to_e2m1(scaled).view(n, k)
    return pack_nvfp4(codes), scale_e4m3, global_scale


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight float8_e4m3fn, weight_scale fp32 scalar) of w with one scale per tensor: amax / 448."""
    w = w.float()
    amax = w.abs().max()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(
    weight: torch.Tensor, weight_scale: torch.Tensor | float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """W = e4m3(weight) * weight_scale, computed in fp32, then cast to dtype."""
    scale = torch.as_tensor(weight_scale, dtype=torch.float32, device=weight.device)
    return (e4m3_to_float(weight) * scale).to(dtype)
