"""Triton W4A16 matmul for NVFP4 weights on GPUs without FP4 matrix units (Hopper): y = x @ Wᵀ with W
dequantised in registers from the checkpoint's tensors (formats in `glimpse.kernels.quant_formats`).

Inputs: x [M, K] (bf16, fp16 or fp32; unit last stride), weight uint8 [N, K/2] (low nibble = even
element), weight_scale E4M3 bytes [N, K/16] (row-major, as on disk: no swizzle), weight_scale_2 a one-element
fp32 tensor on the device (read by the kernel, so no host sync and the call can sit in a CUDA graph).
K must be a multiple of 16 (whole groups); M, N and K need not be multiples of any tile.

How a tile is dequantised. The packed bytes of a [BLOCK_K, BLOCK_N] weight tile are loaded as
[BLOCK_K/16 groups, 8 bytes, BLOCK_N]; the group's E4M3 scale broadcasts over the middle axis. The low
nibbles are the even elements of K and the high nibbles the odd ones, so instead of interleaving them the
kernels multiply them with x's even and odd columns respectively (two products of depth BLOCK_K/2).
Both decodes are a few integer ops and one bitcast:
- E2M1: the 3 magnitude bits go to fp32 bits 24:22 (exponent's low two bits and the mantissa's top bit)
  and the sign to bit 31. That float is e2m1 · 2^-126 for every code, the two smallest included (they land
  on fp32 subnormals, which plain multiplies on NVIDIA GPUs keep: no flush).
- E4M3: the 7 bits below the sign go to fp32 bits 26:20; that float is e4m3 · 2^-120 (subnormals included,
  S.1111.111 forced to NaN). The group factor the kernel multiplies by is e4m3 · 2^118, so a weight
  becomes e2m1 · e4m3 · 2^-8: at most 6 significant bits inside bf16/fp16 range, i.e. EXACT in the
  activation dtype. weight_scale_2 · 2^8 multiplies the fp32 accumulator once at the end.
So the products see the same weights as the fp32 reference and differ from it only in summation order.

Variants (`nvfp4_matmul` picks by M with `default_variant`; each can be forced for tests and tuning):
- "rows" (one row: the GEMV): each program reads [BLOCK_N rows, groups, 8 bytes] weight tiles along K
  (contiguous in memory and in each thread), sums a group's products before its scale multiplies them
  once, and reduces at the end; K splits (atomics) only where N alone can't fill the GPU. (It has a tl.dot
  branch for more rows too, slower than split-K's.)
- "splitk" (2 to DECODE_MAX_ROWS rows): programs over (N blocks, K splits, row tiles); a tl.dot on a
  BLOCK_M row tile with the weights dequantised as [groups, 8, BLOCK_N]. Several K splits add into an fp32
  buffer with atomics (order not fixed, so the last bit may vary between runs), then cast.
- "dequant_rows" (prefill) and "dequant": one Triton pass writes the whole weight as e2m1 · e4m3 · 2^-8
  in the activation dtype (exact; row-wise with the even and odd elements interleaved in registers, or
  column-wise), cuBLAS multiplies, and the output is scaled by weight_scale_2 · 2^8 in place (two
  roundings of the output instead of one).
- "tiled": programs over (N blocks, M blocks); tl.dot on [BLOCK_M, BLOCK_K/2] x [BLOCK_K/2, BLOCK_N]
  tiles. Kept to measure against: at 4096 rows it is 12× slower than "dequant_rows" (the nibble reshape).
How fast each is, and what bounds them, is in docs/PERFORMANCE.md (the H200, 2026-12-03).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glimpse.kernels.backend import HAS_TRITON, tl, triton

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GROUP = 16
DECODE_MAX_ROWS = 64
PREFILL_VARIANT = "dequant_rows"


def default_variant(m: int) -> str:
    """What `nvfp4_matmul` runs for M rows, by measurement on the H200 (2026-12-03, the 12B model's
    in_proj): one row the row-wise GEMV (49 µs against split-K's 62), up to DECODE_MAX_ROWS split-K with
    tl.dot, beyond them PREFILL_VARIANT (dequantise + cuBLAS: 1.75 ms at 4096 rows, tiled 21.6 ms)."""
    if m == 1:
        return "rows"
    return "splitk" if m <= DECODE_MAX_ROWS else PREFILL_VARIANT


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of one call (powers of two; BLOCK_K a multiple of 32)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1
    split_k: int | None = None  # splitk only: None = enough splits to fill the GPU


def default_config(variant: str, m: int) -> LaunchConfig:
    """Simple starting points, to be tuned on the card (python -m glimpse.bench.kernels.quant_linear)."""
    if variant == "splitk":
        if m == 1:
            return LaunchConfig(block_m=1, block_n=64, block_k=128, num_warps=4)
        return LaunchConfig(block_m=16, block_n=128, block_k=128, num_warps=8)  # best of the sweep at M=64
    if variant == "rows":
        if m == 1:
            return LaunchConfig(block_m=1, block_n=16, block_k=512, num_warps=4)
        return LaunchConfig(block_m=min(64, max(16, triton.next_power_of_2(m))), block_n=64, block_k=128,
                            num_warps=4, num_stages=2)  # fmt: skip
    if variant == "dequant":
        return LaunchConfig(block_m=0, block_n=64, block_k=128, num_warps=4)
    if variant == "dequant_rows":
        return LaunchConfig(block_m=0, block_n=16, block_k=512, num_warps=4)
    if m <= 64:
        return LaunchConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
    return LaunchConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


if HAS_TRITON:

    @triton.jit
    def _e2m1_low(b):
        """The low nibble of uint32 bytes b as fp32: e2m1 · 2^-126."""
        return (((b & 0x7) << 22) | ((b & 0x8) << 28)).to(tl.float32, bitcast=True)

    @triton.jit
    def _e2m1_high(b):
        """The high nibble of uint32 bytes b as fp32: e2m1 · 2^-126."""
        return (((b & 0x70) << 18) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)

    @triton.jit
    def _group_factor(s):
        """E4M3 scale bytes s (uint32) as fp32 e4m3 · 2^118 (NaN for the NaN codes)."""
        bits = ((s & 0x7F) << 20) | ((s & 0x80) << 24)
        bits = tl.where((s & 0x7F) == 0x7F, 0x7FC00000, bits)
        # e4m3 · 2^-120 times 2^238, in two factors of 2^119 (2^238 does not fit fp32)
        return bits.to(tl.float32, bitcast=True) * 6.646139978924579e35 * 6.646139978924579e35

    @triton.jit
    def _weight_tile(w_ptr, s_ptr, rn, n_ok, g0, groups, stride_wn, stride_sn, G: tl.constexpr):
        """Even- and odd-element weights of groups g0 .. g0 + G of columns rn, as two fp32 [G, 8, BLOCK_N]
        tensors of e2m1 · e4m3 · 2^-8 (zero outside K and N)."""
        rg = tl.arange(0, G)
        rj = tl.arange(0, 8)
        g_ok = (g0 + rg) < groups
        col = rn.to(tl.int64)
        w_offs = col[None, None, :] * stride_wn + ((g0 + rg) * 8)[:, None, None] + rj[None, :, None]
        b = tl.load(w_ptr + w_offs, mask=g_ok[:, None, None] & n_ok[None, None, :], other=0).to(tl.uint32)
        s_offs = col[None, :] * stride_sn + (g0 + rg)[:, None]
        s = tl.load(s_ptr + s_offs, mask=g_ok[:, None] & n_ok[None, :], other=0).to(tl.uint32)
        factor = _group_factor(s)[:, None, :]
        return _e2m1_low(b) * factor, _e2m1_high(b) * factor

    @triton.jit
    def _dot_step(x_rows, k0, K, m_ok, w_even, w_odd, acc, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
        """acc + x[:, k0 + even] @ w_even + x[:, k0 + odd] @ w_odd, the weights given as [HALF/8, 8, BLOCK_N]
        fp32 and cast to the activation dtype (exactly: see the module docstring)."""
        k_even = k0 + 2 * tl.arange(0, HALF)
        x_mask = m_ok[:, None] & (k_even < K)[None, :]
        x_even = tl.load(x_rows + k_even[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_rows + (k_even + 1)[None, :], mask=x_mask, other=0.0)
        w_even = tl.reshape(w_even, (HALF, BLOCK_N))
        w_odd = tl.reshape(w_odd, (HALF, BLOCK_N))
        if INTERP:  # this Triton's interpreter computes bf16 dots wrongly (numpy on the raw bits): fp32
            acc = tl.dot(x_even.to(tl.float32), w_even, acc, input_precision="ieee")
            acc = tl.dot(x_odd.to(tl.float32), w_odd, acc, input_precision="ieee")
        else:
            acc = tl.dot(x_even, w_even.to(x_even.dtype), acc, input_precision=PRECISION)
            acc = tl.dot(x_odd, w_odd.to(x_odd.dtype), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _nvfp4_tiled_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        gs_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_ym,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        G: tl.constexpr = BLOCK_K // 16
        HALF: tl.constexpr = BLOCK_K // 2
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        groups = K // 16
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w_even, w_odd = _weight_tile(w_ptr, s_ptr, rn, n_ok, k0 // 16, groups, stride_wn, stride_sn, G)
            acc = _dot_step(x_rows, k0, K, m_ok, w_even, w_odd, acc, HALF, BLOCK_N, PRECISION, INTERP)
        acc = acc * (tl.load(gs_ptr) * 256.0)
        y_offs = rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _nvfp4_splitk_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        gs_ptr,
        y_ptr,  # the output (one split) or an fp32 buffer of zeros (several: ATOMIC)
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_ym,
        steps_per_split,
        BLOCK_M: tl.constexpr,  # 1: one row per program, multiply-add (GEMV); else tl.dot over BLOCK_M rows
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ATOMIC: tl.constexpr,
        PRECISION: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        G: tl.constexpr = BLOCK_K // 16
        HALF: tl.constexpr = BLOCK_K // 2
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        groups = K // 16
        first = pid_k * steps_per_split
        gs = tl.load(gs_ptr) * 256.0
        if BLOCK_M == 1:
            # x's even/odd elements laid out like the weight tile's [G, 8] (group, byte) axes
            rk = tl.arange(0, G)[:, None] * 16 + tl.arange(0, 8)[None, :] * 2
            x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
            acc3 = tl.zeros([G, 8, BLOCK_N], dtype=tl.float32)
            for step in range(first, first + steps_per_split):
                k0 = step * BLOCK_K
                w_even, w_odd = _weight_tile(
                    w_ptr, s_ptr, rn, n_ok, k0 // 16, groups, stride_wn, stride_sn, G
                )
                k_ok = (k0 + rk) < K
                x_even = tl.load(x_row + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)
                x_odd = tl.load(x_row + k0 + rk + 1, mask=k_ok, other=0.0).to(tl.float32)
                acc3 += x_even[:, :, None] * w_even + x_odd[:, :, None] * w_odd
            acc = tl.sum(tl.sum(acc3, axis=1), axis=0) * gs
            y_offs = pid_m.to(tl.int64) * stride_ym + rn
            if ATOMIC:
                tl.atomic_add(y_ptr + y_offs, acc, mask=n_ok)
            else:
                tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = rm < M
            x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for step in range(first, first + steps_per_split):
                k0 = step * BLOCK_K
                w_even, w_odd = _weight_tile(
                    w_ptr, s_ptr, rn, n_ok, k0 // 16, groups, stride_wn, stride_sn, G
                )
                acc = _dot_step(x_rows, k0, K, m_ok, w_even, w_odd, acc, HALF, BLOCK_N, PRECISION, INTERP)
            acc = acc * gs
            y_offs = rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
            y_mask = m_ok[:, None] & n_ok[None, :]
            if ATOMIC:
                tl.atomic_add(y_ptr + y_offs, acc, mask=y_mask)
            else:
                tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)

    @triton.jit
    def _nvfp4_rows_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        gs_ptr,
        y_ptr,  # the output (one split) or an fp32 buffer of zeros (several: ATOMIC)
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_ym,
        steps_per_split,
        BLOCK_M: tl.constexpr,  # 1: one row per program, multiply-add (GEMV); else tl.dot over BLOCK_M rows
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ATOMIC: tl.constexpr,
        PRECISION: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        """Weight tiles read row-wise ([BLOCK_N, groups, 8 bytes], K contiguous in memory and in each
        thread); one row: the products of a group are summed before its scale multiplies them once."""
        G: tl.constexpr = BLOCK_K // 16
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rg = tl.arange(0, G)
        rj = tl.arange(0, 8)
        groups = K // 16
        w_rows = w_ptr + rn.to(tl.int64)[:, None, None] * stride_wn
        s_rows = s_ptr + rn.to(tl.int64)[:, None] * stride_sn
        first = pid_k * steps_per_split
        gs = tl.load(gs_ptr) * 256.0
        if BLOCK_M == 1:
            x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
            acc2 = tl.zeros([BLOCK_N, G], dtype=tl.float32)
            for step in range(first, first + steps_per_split):
                g = step * G + rg
                g_ok = g < groups
                b = tl.load(w_rows + (g * 8)[None, :, None] + rj[None, None, :],
                            mask=n_ok[:, None, None] & g_ok[None, :, None], other=0).to(tl.uint32)  # fmt: skip
                s = tl.load(s_rows + g[None, :], mask=n_ok[:, None] & g_ok[None, :], other=0).to(tl.uint32)
                k_even = (g * 16)[:, None] + 2 * rj[None, :]
                x_even = tl.load(x_row + k_even, mask=g_ok[:, None], other=0.0).to(tl.float32)
                x_odd = tl.load(x_row + k_even + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
                part = tl.sum(_e2m1_low(b) * x_even[None, :, :] + _e2m1_high(b) * x_odd[None, :, :], axis=2)
                acc2 += part * _group_factor(s)
            acc = tl.sum(acc2, axis=1) * gs
            y_offs = pid_m.to(tl.int64) * stride_ym + rn
            y_mask = n_ok
        else:
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = rm < M
            x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
            rb = tl.arange(0, BLOCK_K // 2)  # byte within the step
            w_rows2 = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for step in range(first, first + steps_per_split):
                kb = step * (BLOCK_K // 2) + rb
                kb_ok = kb < K // 2
                w_mask = n_ok[:, None] & kb_ok[None, :]
                b = tl.load(w_rows2 + kb[None, :], mask=w_mask, other=0).to(tl.uint32)
                s = tl.load(s_rows + (kb // 8)[None, :], mask=w_mask, other=0).to(tl.uint32)
                factor = _group_factor(s)
                x_mask = m_ok[:, None] & kb_ok[None, :]
                x_even = tl.load(x_rows + 2 * kb[None, :], mask=x_mask, other=0.0)
                x_odd = tl.load(x_rows + 2 * kb[None, :] + 1, mask=x_mask, other=0.0)
                if INTERP:  # the interpreter's bf16 dots are wrong (see _dot_step): fp32
                    acc = tl.dot(x_even.to(tl.float32), tl.trans(_e2m1_low(b) * factor), acc,
                                 input_precision="ieee")  # fmt: skip
                    acc = tl.dot(x_odd.to(tl.float32), tl.trans(_e2m1_high(b) * factor), acc,
                                 input_precision="ieee")  # fmt: skip
                else:
                    w_even = (_e2m1_low(b) * factor).to(x_even.dtype)
                    w_odd = (_e2m1_high(b) * factor).to(x_odd.dtype)
                    acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision=PRECISION)
                    acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision=PRECISION)
            acc = acc * gs
            y_offs = rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
            y_mask = m_ok[:, None] & n_ok[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptr + y_offs, acc, mask=y_mask)
        else:
            tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)

    @triton.jit
    def _nvfp4_dequant_rows_kernel(
        w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on, BLOCK_N: tl.constexpr, BYTES: tl.constexpr
    ):  # fmt: skip
        """out[n, k] = e2m1 · e4m3 · 2^-8 for BLOCK_N rows and BYTES packed bytes of K, read and written
        along K (the even and odd elements interleaved in registers before one contiguous store)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        kb = tl.program_id(1) * BYTES + tl.arange(0, BYTES)
        mask = (rn < N)[:, None] & (kb < K // 2)[None, :]
        rows = rn.to(tl.int64)[:, None]
        b = tl.load(w_ptr + rows * stride_wn + kb[None, :], mask=mask, other=0).to(tl.uint32)
        s = tl.load(s_ptr + rows * stride_sn + (kb // 8)[None, :], mask=mask, other=0).to(tl.uint32)
        factor = _group_factor(s)
        pair = tl.interleave(_e2m1_low(b) * factor, _e2m1_high(b) * factor)  # [BLOCK_N, 2·BYTES]
        k = tl.program_id(1) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        out_mask = (rn < N)[:, None] & (k < K)[None, :]
        tl.store(out_ptr + rows * stride_on + k[None, :], pair.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _nvfp4_dequant_kernel(
        w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on, BLOCK_N: tl.constexpr, G: tl.constexpr
    ):  # fmt: skip
        """out[n, k] = e2m1 · e4m3 · 2^-8 for BLOCK_N rows and G groups of K (weight_scale_2 left out)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        g0 = tl.program_id(1) * G
        n_ok = rn < N
        groups = K // 16
        w_even, w_odd = _weight_tile(w_ptr, s_ptr, rn, n_ok, g0, groups, stride_wn, stride_sn, G)
        rg = g0 + tl.arange(0, G)
        k_even = rg[:, None, None] * 16 + 2 * tl.arange(0, 8)[None, :, None]
        offs = rn.to(tl.int64)[None, None, :] * stride_on + k_even
        mask = (rg < groups)[:, None, None] & n_ok[None, None, :]
        tl.store(out_ptr + offs, w_even.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + offs + 1, w_odd.to(out_ptr.dtype.element_ty), mask=mask)

# Launchers (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) -------------------------------------


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[int, int, int]:
    m, k = x.shape
    n = weight.shape[0]
    if weight.dtype != torch.uint8 or weight.shape != (n, k // 2) or k % GROUP:
        raise ValueError(f"x {tuple(x.shape)} and NVFP4 weight {tuple(weight.shape)} {weight.dtype} disagree")
    if weight_scale.shape != (n, k // GROUP):
        raise ValueError(f"weight_scale {tuple(weight_scale.shape)} is not [{n}, {k // GROUP}]")
    if x.dtype not in DTYPES:
        raise TypeError(f"activations of dtype {x.dtype} are not supported")
    return m, n, k


def _dequantize_exact(weight, scales, dtype, cfg: LaunchConfig) -> torch.Tensor:
    n, half_k = weight.shape
    out = torch.empty(n, 2 * half_k, dtype=dtype, device=weight.device)
    groups_per_program = cfg.block_k // GROUP
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(2 * half_k // GROUP, groups_per_program))
    _nvfp4_dequant_kernel[grid](
        weight, scales, out, n, 2 * half_k, weight.stride(0), scales.stride(0), out.stride(0),
        BLOCK_N=cfg.block_n, G=groups_per_program, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


def _dequantize_rows(weight, scales, dtype, cfg: LaunchConfig) -> torch.Tensor:
    n, half_k = weight.shape
    out = torch.empty(n, 2 * half_k, dtype=dtype, device=weight.device)
    nbytes = cfg.block_k // 2
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(half_k, nbytes))
    _nvfp4_dequant_rows_kernel[grid](
        weight, scales, out, n, 2 * half_k, weight.stride(0), scales.stride(0), out.stride(0),
        BLOCK_N=cfg.block_n, BYTES=nbytes, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


def dequantize_exact(
    weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype, config: LaunchConfig | None = None
) -> torch.Tensor:
    """W / (weight_scale_2 · 2^8) = e2m1 · e4m3 · 2^-8 as [N, K] in `dtype`: exact in bf16, fp16 and fp32
    (at most 6 significant bits, within their range)."""
    if weight.dtype != torch.uint8 or weight_scale.shape != (weight.shape[0], 2 * weight.shape[1] // GROUP):
        raise ValueError(
            f"NVFP4 weight {tuple(weight.shape)} and scales {tuple(weight_scale.shape)} disagree"
        )
    scales = weight_scale.contiguous().view(torch.uint8)
    return _dequantize_exact(weight.contiguous(), scales, dtype, config or default_config("dequant", 0))


def nvfp4_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    *,
    variant: str | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ Wᵀ in x's dtype, W the NVFP4 weight (see the module docstring).

    `variant` "splitk", "tiled" or "dequant" (None: splitk for M ≤ DECODE_MAX_ROWS, else PREFILL_VARIANT);
    `config` overrides the tiles."""
    m, n, k = _check(x, weight, weight_scale)
    variant = variant or default_variant(m)
    cfg = config or default_config(variant, m)
    if cfg.block_k % 32 or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"block_k {cfg.block_k} must be a power of two and a multiple of 32")
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    scales = weight_scale.contiguous().view(torch.uint8)
    gs = torch.as_tensor(weight_scale_2, dtype=torch.float32, device=x.device).reshape(1)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays exact; 16-bit operands ignore it
    interp = not x.is_cuda  # CPU tensors only reach here under TRITON_INTERPRET=1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    n_blocks = triton.cdiv(n, cfg.block_n)
    if variant in ("dequant", "dequant_rows"):
        w = (_dequantize_exact if variant == "dequant" else _dequantize_rows)(weight, scales, x.dtype, cfg)
        return torch.matmul(x, w.t(), out=y).mul_(gs * 256.0)
    if variant == "tiled":
        grid = (n_blocks, triton.cdiv(m, cfg.block_m))
        _nvfp4_tiled_kernel[grid](
            x, weight, scales, gs, y, m, n, k,
            x.stride(0), weight.stride(0), scales.stride(0), y.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision, INTERP=interp,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return y
    if variant not in ("splitk", "rows"):
        raise ValueError(f"unknown variant {variant!r}")
    m_programs = m if cfg.block_m == 1 else triton.cdiv(m, cfg.block_m)
    steps = triton.cdiv(k, cfg.block_k)
    fill = (4 if variant == "splitk" else 2) * _multiprocessors(x.device)
    split = cfg.split_k or max(1, fill // (n_blocks * m_programs))
    steps_per_split = triton.cdiv(steps, min(split, steps))
    split = triton.cdiv(steps, steps_per_split)  # no empty splits
    out = y if split == 1 else torch.zeros(m, n, dtype=torch.float32, device=x.device)
    if variant == "rows":
        _nvfp4_rows_kernel[(n_blocks, split, m_programs)](
            x, weight, scales, gs, out, m, n, k,
            x.stride(0), weight.stride(0), scales.stride(0), out.stride(0), steps_per_split,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ATOMIC=split > 1,
            PRECISION=precision, INTERP=interp, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return y if split == 1 else y.copy_(out)
    _nvfp4_splitk_kernel[(n_blocks, split, m_programs)](
        x, weight, scales, gs, out, m, n, k,
        x.stride(0), weight.stride(0), scales.stride(0), out.stride(0), steps_per_split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ATOMIC=split > 1,
        PRECISION=precision, INTERP=interp, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y if split == 1 else y.copy_(out)
