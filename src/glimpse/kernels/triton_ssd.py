"""Triton kernels for the packed chunked SSD scan of Mamba2 prompts (`ssd_vectorized` calls them on CUDA).

Same maths and chunk layout as `glimpse.kernels.ssd_vectorized` (read its docstring first): every sequence
is cut into chunks of Q tokens from its first token; chunk c covers tokens tok0[c] .. tok0[c] + clen[c] - 1
and its rows q >= clen[c] are padding (dt = 0: they neither decay nor feed the state). Per head h, group
g = h // (H / G), and a_t = cumsum(dt * A) within the chunk:

    y_t = sum_{s<=t} (C_t . B_s) exp(a_t - a_s) dt_s x_s  +  exp(a_t) C_t . E_c  +  D x_t
    S_c = sum_s exp(a_last - a_s) dt_s x_s (outer) B_s
    E_c = exp(a_last(c-1)) E_{c-1} + S_{c-1}    (E at a sequence's first chunk = its initial state or 0)

Per group of chunks, three launches (four with FUSED_STATES off); none materialises a [chunks, H, Q, Q]
tensor:

1. States, either fused (default) or as two kernels:
   `_fused_state_kernel`, one program per (P x N tile, head, sequence): walks the sequence's chunks in
   order; per chunk: dt, a = cumsum(dt A) (written to `a` [chunks, H, Q] for the scan), w_s =
   exp(a_last - a_s) dt_s, S_c^T = B^T [N, Q] @ (w x) [Q, P] as tl.dot ("chunk state"), writes
   E_c = r (the state entering the chunk) and updates r = exp(a_last) r + S_c in registers ("state
   passing"). The walk starts from the sequence's pool slot (zeros without an initial state) and ends by
   writing the final state into the slot in the pool's dtype. S never reaches memory.
   Or `_chunk_state_kernel` (one program per (P block, head, chunk): a and S_c as above, S written to
   an fp32 [chunks, H, P, N] buffer) then `_state_passing_kernel` (one program per (block of P*N state
   elements, head, sequence): the same walk over the stored S_c, overwriting each with E_c in place).
   Either replaces the PyTorch decay-matrix product (O(chunks^2) work and two extra state round trips).
2. `_chunk_cb_kernel`, one program per (tile, group, chunk): CB = C B^T [Q, Q] per group (not per head:
   16x smaller than the per-head decay product), fp32.
3. `_chunk_scan_kernel`, one program per (T block x P block, head, chunk): y = exp(a_t) (C_t @ E_c^T)
   + sum over s blocks up to the diagonal of (CB * exp(a_t - a_s) masked to s <= t, before the exp, * dt_s)
   @ x_s, + D x_t; y written once, in token order, in x's dtype (the "chunk scan" kernel).

A sequence whose chunks span two groups hands its running state over through a [H, P, N] carry buffer.

x, B, C are read in place from their token layout (any strides; the mixer passes views into one projection);
B and C by group, never expanded to heads. Everything accumulates in fp32.

Precision. The products whose operands are both inputs (C B^T) are exact bf16 tensor-core dots. The others
have one fp32 operand (the decay-weighted scores, w x, the states E). `PRECISION` (env
GLIMPSE_SSD_PRECISION) picks how that operand enters the tensor cores when x, B, C are bf16:
  "exact": split into three bf16 parts (hi + mid + lo = the fp32 value to its last bit), three
      dots against the exact bf16 operand: fp32-accurate, like the PyTorch path (the parity tests of
      `ssd_vectorized` ask for one bf16 rounding of y and 1e-5 on the states), 3x the tensor work;
  "bf16x2": two parts (about 16 bits);
  "bf16" (default): rounded to bf16 once, and the fused state kernel stores E in bf16 (half its
      traffic); the accuracy of mamba-ssm's scan, which makes the same choices. Measured on an H100 at 12B
      shapes (6,192 packed tokens): 1.28 ms per layer against 2.39 ms for "exact", relative error 5.2e-3
      on y and 2.1e-3 on the final states (exact: 1.3e-3, which is y's own bf16 rounding, and 1.2e-5).
Other input dtypes (fp32, fp16) use fp32 dots (input_precision="ieee").

Under the Triton interpreter (TRITONINTERPRET=1, CPU tensors) bf16 dots are computed wrongly by this Triton
version (numpy multiplies the raw bf16 bits), so the kernels upcast the bf16 parts to fp32 before each dot
there (`INTERP`), and use `while` loops (the interpreter can't take a runtime `range` bound).

This module imports without Triton (`HAS_TRITON` is then False); `glimpse.kernels.ssd` decides when the
kernels run.
"""

from __future__ import annotations

import bisect
import math
import os

import torch

from glimpse.kernels.backend import HAS_TRITON, INTERPRET, tl, triton

PRECISION = os.environ.get("GLIMPSE_SSD_PRECISION", "bf16")
_SPLITS = {"exact": 3, "bf16x3": 3, "bf16x2": 2, "bf16": 1}

# Largest state buffer ([chunks, H, P, N] fp32) per group of chunks; 512 MiB = 97 chunks of the 12B
# (12,000 tokens) per group. The [chunks, G, Q, Q] CB buffer is 10x smaller.
DEFAULT_GROUP_BYTES = 512 * 2**20

# Launch configurations (untuned guesses for an H100; glimpse.bench.kernels.ssd.sweep_configs times
# alternatives on a GPU).
#   scan:    (BLOCK_T, BLOCK_S, BLOCK_P, BLOCK_K (N per step of the inter-chunk product), num_warps, num_stages)
#   fused:   (BLOCK_P, BLOCK_N, num_warps, num_stages)  chunk states + state passing in one walk
#   state:   (BLOCK_P, num_warps, num_stages)
#   cb:      (BLOCK_T, BLOCK_S, num_warps)
#   passing: (BLOCK, num_warps)
DEFAULT_CONFIG = {
    "fused": (32, 128, 4, 2),
    "scan": (64, 64, 128, 32, 8, 2),
    "state": (32, 4, 2),
    "cb": (64, 64, 4),
    "passing": (1024, 4),
}
CONFIG = dict(DEFAULT_CONFIG)
# One kernel walks each sequence's chunks computing S_c and passing the state (no S round trip through
# memory), instead of the chunk-state kernel + the state-passing kernel (env GLIMPSE_SSD_FUSED=0).
FUSED_STATES = os.environ.get("GLIMPSE_SSD_FUSED", "1") != "0"


def _split(precision: str | None, *tensors: torch.Tensor) -> int:
    """Number of bf16 parts of the fp32 dot operand; 0 = fp32 dots (inputs not all bf16)."""
    precision = precision or PRECISION
    if precision not in _SPLITS:
        raise ValueError(f"unknown SSD precision {precision!r}; one of {sorted(_SPLITS)}")
    if any(t.dtype != torch.bfloat16 for t in tensors):
        return 0
    return _SPLITS[precision]


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


if HAS_TRITON:

    @triton.jit
    def _dot_fr(acc, e, f, SPLIT: tl.constexpr, INTERP: tl.constexpr):
        """acc + e @ f: e exact in its dtype (bf16 unless SPLIT == 0), f fp32 split into SPLIT bf16 parts."""
        if SPLIT == 0:
            acc = tl.dot(e.to(tl.float32), f, acc, input_precision="ieee")
        else:
            if INTERP:
                e = e.to(tl.float32)
            r = f
            for i in tl.static_range(SPLIT):
                part = r.to(tl.bfloat16)
                if i + 1 < SPLIT:
                    r = r - part.to(tl.float32)
                if INTERP:
                    acc = tl.dot(e, part.to(tl.float32), acc)
                else:
                    acc = tl.dot(e, part, acc)
        return acc

    @triton.jit
    def _dot_fl(acc, f, e, SPLIT: tl.constexpr, INTERP: tl.constexpr):
        """acc + f @ e: f fp32 split into SPLIT bf16 parts, e exact in its dtype (bf16 unless SPLIT == 0)."""
        if SPLIT == 0:
            acc = tl.dot(f, e.to(tl.float32), acc, input_precision="ieee")
        else:
            if INTERP:
                e = e.to(tl.float32)
            r = f
            for i in tl.static_range(SPLIT):
                part = r.to(tl.bfloat16)
                if i + 1 < SPLIT:
                    r = r - part.to(tl.float32)
                if INTERP:
                    acc = tl.dot(part.to(tl.float32), e, acc)
                else:
                    acc = tl.dot(part, e, acc)
        return acc

    @triton.jit
    def _dot_ee(acc, a, b, SPLIT: tl.constexpr, INTERP: tl.constexpr):
        """acc + a @ b, both exact in their dtype (bf16 unless SPLIT == 0): one dot, fp32 accumulation."""
        if SPLIT == 0:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif INTERP:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _chunk_state_kernel(
        x_ptr,
        dt_ptr,
        A_ptr,
        B_ptr,
        tok0_ptr,
        clen_ptr,
        S_ptr,
        a_ptr,
        H,
        P,
        N,
        heads_per_group,
        sx_t,
        sx_h,
        sx_p,
        sdt_t,
        sdt_h,
        sB_t,
        sB_g,
        sB_n,
        Q: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        h = tl.program_id(1)
        c = tl.program_id(2).to(tl.int64)
        g = h // heads_per_group
        tok0 = tl.load(tok0_ptr + c).to(tl.int64)
        clen = tl.load(clen_ptr + c).to(tl.int32)

        q = tl.arange(0, BLOCK_Q)
        q_ok = q < clen
        # scalar 64-bit bases, 32-bit offsets inside the chunk
        x_base = x_ptr + tok0 * sx_t + h * sx_h
        B_base = B_ptr + tok0 * sB_t + g * sB_g
        dt = tl.load(dt_ptr + tok0 * sdt_t + h * sdt_h + q * sdt_t, mask=q_ok, other=0.0).to(tl.float32)
        A = tl.load(A_ptr + h).to(tl.float32)
        a = tl.cumsum(dt * A, axis=0)  # padding rows (dt = 0) repeat the last valid value
        ch = c * H + h
        tl.store(a_ptr + ch * Q + q, a, mask=(q < Q) & (pid_p == 0))
        a_last = tl.sum(tl.where(q == BLOCK_Q - 1, a, 0.0), axis=0)
        w = tl.exp(a_last - a) * dt  # exponent <= 0

        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < P
        n = tl.arange(0, BLOCK_N)
        n_ok = n < N
        x = tl.load(
            x_base + q[:, None] * sx_t + p[None, :] * sx_p,
            mask=q_ok[:, None] & p_ok[None, :],
            other=0.0,
        )
        xw = x.to(tl.float32) * w[:, None]  # [BLOCK_Q, BLOCK_P]
        Bt = tl.load(
            B_base + q[None, :] * sB_t + n[:, None] * sB_n,
            mask=q_ok[None, :] & n_ok[:, None],
            other=0.0,
        )  # [BLOCK_N, BLOCK_Q]
        acc = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
        acc = _dot_fr(acc, Bt, xw, SPLIT, INTERP)  # S^T [N, P]
        tl.store(
            S_ptr + ch * P * N + p[None, :] * N + n[:, None],
            acc,
            mask=p_ok[None, :] & n_ok[:, None],
        )

    @triton.jit
    def _chunk_cb_kernel(
        C_ptr,
        B_ptr,
        tok0_ptr,
        clen_ptr,
        CB_ptr,
        G,
        N,
        sC_t,
        sC_g,
        sC_n,
        sB_t,
        sB_g,
        sB_n,
        Q: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        g = tl.program_id(1)
        c = tl.program_id(2).to(tl.int64)
        n_sb = tl.cdiv(Q, BLOCK_S)
        pid_t = pid // n_sb
        pid_s = pid % n_sb
        tok0 = tl.load(tok0_ptr + c).to(tl.int64)
        clen = tl.load(clen_ptr + c).to(tl.int32)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        n = tl.arange(0, BLOCK_N)
        n_ok = n < N
        Ct = tl.load(
            C_ptr + tok0 * sC_t + g * sC_g + t[:, None] * sC_t + n[None, :] * sC_n,
            mask=(t < clen)[:, None] & n_ok[None, :],
            other=0.0,
        )
        Bs = tl.load(
            B_ptr + tok0 * sB_t + g * sB_g + s[None, :] * sB_t + n[:, None] * sB_n,
            mask=(s < clen)[None, :] & n_ok[:, None],
            other=0.0,
        )
        cb = tl.zeros([BLOCK_T, BLOCK_S], dtype=tl.float32)
        cb = _dot_ee(cb, Ct, Bs, SPLIT, INTERP)
        tl.store(
            CB_ptr + (c * G + g) * Q * Q + t[:, None] * Q + s[None, :],
            cb,
            mask=(t < Q)[:, None] & (s < Q)[None, :],
        )

    @triton.jit(do_not_specialize=["c_lo", "c_hi"])  # group bounds: one compiled variant
    def _state_passing_kernel(
        S_ptr,
        a_ptr,
        pool_ptr,
        carry_in_ptr,
        carry_out_ptr,
        seq_c0_ptr,
        seq_nc_ptr,
        seq_slot_ptr,
        seq_init_ptr,
        c_lo,
        c_hi,
        H,
        PN,
        N,
        sp_slot,
        sp_h,
        sp_p,
        sp_n,
        Q: tl.constexpr,
        BLOCK: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        sq = tl.program_id(2)
        e = pid * BLOCK + tl.arange(0, BLOCK)
        ok = e < PN
        pp = e // N
        nn = e % N
        cs = tl.load(seq_c0_ptr + sq).to(tl.int32)  # the sequence's chunks, global indices [cs, ce)
        ce = cs + tl.load(seq_nc_ptr + sq).to(tl.int32)
        lo = tl.maximum(cs, c_lo)
        hi = tl.minimum(ce, c_hi)
        slot = tl.load(seq_slot_ptr + sq).to(tl.int64)
        has_init = tl.load(seq_init_ptr + sq) != 0
        from_carry = cs < c_lo  # continues from the previous group of chunks
        to_carry = ce > c_hi  # continues into the next one
        pool_ptrs = pool_ptr + slot * sp_slot + h * sp_h + pp * sp_p + nn * sp_n
        r_pool = tl.load(pool_ptrs, mask=ok & has_init & (cs >= c_lo), other=0.0).to(tl.float32)
        r_carry = tl.load(carry_in_ptr + h * PN + e, mask=ok & from_carry, other=0.0)
        r = tl.where(from_carry, r_carry, r_pool)
        if INTERP:
            i = lo
            while i < hi:
                ch = (i - c_lo).to(tl.int64) * H + h
                s_c = tl.load(S_ptr + ch * PN + e, mask=ok, other=0.0)
                tl.store(S_ptr + ch * PN + e, r, mask=ok)  # S_c becomes E_c, the state entering chunk c
                a_last = tl.load(a_ptr + ch * Q + (Q - 1))
                r = tl.exp(a_last) * r + s_c
                i += 1
        else:
            for i in range(lo, hi):
                ch = (i - c_lo).to(tl.int64) * H + h
                s_c = tl.load(S_ptr + ch * PN + e, mask=ok, other=0.0)
                tl.store(S_ptr + ch * PN + e, r, mask=ok)
                a_last = tl.load(a_ptr + ch * Q + (Q - 1))
                r = tl.exp(a_last) * r + s_c
        tl.store(pool_ptrs, r.to(pool_ptr.dtype.element_ty), mask=ok & (ce <= c_hi))
        tl.store(carry_out_ptr + h * PN + e, r, mask=ok & to_carry)

    @triton.jit
    def _fused_state_step(
        r,
        cl,
        pid,
        h,
        A,
        q,
        p,
        p_ok,
        n,
        n_ok,
        x_ptr,
        dt_ptr,
        B_ptr,
        tok0_ptr,
        clen_ptr,
        E_ptr,
        a_ptr,
        g,
        H,
        P,
        N,
        sx_t,
        sx_h,
        sx_p,
        sdt_t,
        sdt_h,
        sB_t,
        sB_g,
        sB_n,
        Q: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,
        SPLIT: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        """One chunk (local index cl) of the fused walk: write E_c = r, return exp(a_last) r + S_c."""
        tok0 = tl.load(tok0_ptr + cl).to(tl.int64)
        clen = tl.load(clen_ptr + cl).to(tl.int32)
        q_ok = q < clen
        dt = tl.load(dt_ptr + tok0 * sdt_t + h * sdt_h + q * sdt_t, mask=q_ok, other=0.0).to(tl.float32)
        a = tl.cumsum(dt * A, axis=0)
        ch = cl * H + h
        tl.store(a_ptr + ch * Q + q, a, mask=(q < Q) & (pid == 0))
        a_last = tl.sum(tl.where(q == BLOCK_Q - 1, a, 0.0), axis=0)
        w = tl.exp(a_last - a) * dt
        x = tl.load(
            x_ptr + tok0 * sx_t + h * sx_h + q[:, None] * sx_t + p[None, :] * sx_p,
            mask=q_ok[:, None] & p_ok[None, :],
            other=0.0,
        )
        xw = x.to(tl.float32) * w[:, None]
        Bt = tl.load(
            B_ptr + tok0 * sB_t + g * sB_g + q[None, :] * sB_t + n[:, None] * sB_n,
            mask=q_ok[None, :] & n_ok[:, None],
            other=0.0,
        )
        s_c = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
        s_c = _dot_fr(s_c, Bt, xw, SPLIT, INTERP)  # S_c^T [N, P]
        tl.store(
            E_ptr + ch * P * N + p[None, :] * N + n[:, None],
            r.to(E_ptr.dtype.element_ty),
            mask=n_ok[:, None] & p_ok[None, :],
        )
        return tl.exp(a_last) * r + s_c

    @triton.jit(do_not_specialize=["c_lo", "c_hi"])  # group bounds: one compiled variant
    def _fused_state_kernel(
        x_ptr,
        dt_ptr,
        A_ptr,
        B_ptr,
        tok0_ptr,
        clen_ptr,
        E_ptr,
        a_ptr,
        pool_ptr,
        carry_in_ptr,
        carry_out_ptr,
        seq_c0_ptr,
        seq_nc_ptr,
        seq_slot_ptr,
        seq_init_ptr,
        c_lo,
        c_hi,
        H,
        P,
        N,
        heads_per_group,
        sx_t,
        sx_h,
        sx_p,
        sdt_t,
        sdt_h,
        sB_t,
        sB_g,
        sB_n,
        sp_slot,
        sp_h,
        sp_p,
        sp_n,
        Q: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        """Chunk states and state passing in one walk per (P x N tile, head, sequence): no S round trip."""
        pid = tl.program_id(0)
        h = tl.program_id(1)
        sq = tl.program_id(2)
        n_nb = tl.cdiv(N, BLOCK_N)
        pid_p = pid // n_nb
        pid_n = pid % n_nb
        g = h // heads_per_group
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < P
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        tile = n_ok[:, None] & p_ok[None, :]
        q = tl.arange(0, BLOCK_Q)
        A = tl.load(A_ptr + h).to(tl.float32)

        cs = tl.load(seq_c0_ptr + sq).to(tl.int32)  # the sequence's chunks, global indices [cs, ce)
        ce = cs + tl.load(seq_nc_ptr + sq).to(tl.int32)
        lo = tl.maximum(cs, c_lo)
        hi = tl.minimum(ce, c_hi)
        slot = tl.load(seq_slot_ptr + sq).to(tl.int64)
        has_init = tl.load(seq_init_ptr + sq) != 0
        from_carry = cs < c_lo
        pool_ptrs = pool_ptr + slot * sp_slot + h * sp_h + p[None, :] * sp_p + n[:, None] * sp_n  # [N, P]
        r_pool = tl.load(pool_ptrs, mask=tile & has_init & (cs >= c_lo), other=0.0).to(tl.float32)
        r_carry = tl.load(
            carry_in_ptr + h * P * N + p[None, :] * N + n[:, None], mask=tile & from_carry, other=0.0
        )
        r = tl.where(from_carry, r_carry, r_pool)
        if INTERP:
            i = lo
            while i < hi:
                r = _fused_state_step(
                    r, (i - c_lo).to(tl.int64), pid, h, A, q, p, p_ok, n, n_ok, x_ptr, dt_ptr, B_ptr,
                    tok0_ptr, clen_ptr, E_ptr, a_ptr, g, H, P, N, sx_t, sx_h, sx_p, sdt_t, sdt_h,
                    sB_t, sB_g, sB_n, Q, BLOCK_Q, BLOCK_N, BLOCK_P, SPLIT, INTERP,
                )  # fmt: skip
                i += 1
        else:
            for i in range(lo, hi):
                r = _fused_state_step(
                    r, (i - c_lo).to(tl.int64), pid, h, A, q, p, p_ok, n, n_ok, x_ptr, dt_ptr, B_ptr,
                    tok0_ptr, clen_ptr, E_ptr, a_ptr, g, H, P, N, sx_t, sx_h, sx_p, sdt_t, sdt_h,
                    sB_t, sB_g, sB_n, Q, BLOCK_Q, BLOCK_N, BLOCK_P, SPLIT, INTERP,
                )  # fmt: skip
        # the slot is loaded again (not kept from before the loop) so that the [N, P] tile of 64-bit pool
        # pointers is not held in registers across the loop
        slot = tl.load(seq_slot_ptr + sq).to(tl.int64)
        pool_ptrs = pool_ptr + slot * sp_slot + h * sp_h + p[None, :] * sp_p + n[:, None] * sp_n
        tl.store(pool_ptrs, r.to(pool_ptr.dtype.element_ty), mask=tile & (ce <= c_hi))
        tl.store(carry_out_ptr + h * P * N + p[None, :] * N + n[:, None], r, mask=tile & (ce > c_hi))

    @triton.jit
    def _intra_block(
        acc,
        k,
        t,
        a_t,
        clen,
        cb_base,
        a_base,
        x_base,
        dt_base,
        p,
        p_ok,
        sx_t,
        sx_p,
        sdt_t,
        Q: tl.constexpr,
        BLOCK_S: tl.constexpr,
        SPLIT: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        """acc + (CB * exp(a_t - a_s) [s <= t] * dt_s) @ x_s for the s block starting at k."""
        s = k + tl.arange(0, BLOCK_S)
        s_ok = s < clen
        cb = tl.load(
            cb_base + t[:, None] * Q + s[None, :], mask=(t < Q)[:, None] & (s < Q)[None, :], other=0.0
        )
        a_s = tl.load(a_base + s, mask=s < Q, other=0.0)
        dt_s = tl.load(dt_base + s * sdt_t, mask=s_ok, other=0.0).to(tl.float32)
        causal = (t[:, None] >= s[None, :]) & s_ok[None, :]
        decay = tl.exp(tl.where(causal, a_t[:, None] - a_s[None, :], float("-inf")))  # masked before exp
        L = tl.where(causal, cb * decay * dt_s[None, :], 0.0)
        xs = tl.load(
            x_base + s[:, None] * sx_t + p[None, :] * sx_p,
            mask=s_ok[:, None] & p_ok[None, :],
            other=0.0,
        )
        return _dot_fl(acc, L, xs, SPLIT, INTERP)

    @triton.jit
    def _chunk_scan_kernel(
        x_ptr,
        dt_ptr,
        C_ptr,
        CB_ptr,
        a_ptr,
        E_ptr,
        D_ptr,
        y_ptr,
        tok0_ptr,
        clen_ptr,
        H,
        G,
        P,
        N,
        heads_per_group,
        sx_t,
        sx_h,
        sx_p,
        sdt_t,
        sdt_h,
        sC_t,
        sC_g,
        sC_n,
        sy_t,
        sy_h,
        sy_p,
        Q: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        c = tl.program_id(2).to(tl.int64)
        n_pb = tl.cdiv(P, BLOCK_P)
        pid_t = pid // n_pb
        pid_p = pid % n_pb
        g = h // heads_per_group
        tok0 = tl.load(tok0_ptr + c).to(tl.int64)
        clen = tl.load(clen_ptr + c).to(tl.int32)

        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < clen
        # scalar 64-bit bases, 32-bit offsets inside the chunk
        x_base = x_ptr + tok0 * sx_t + h * sx_h
        dt_base = dt_ptr + tok0 * sdt_t + h * sdt_h
        C_base = C_ptr + tok0 * sC_t + g * sC_g
        y_base = y_ptr + tok0 * sy_t + h * sy_h
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < P
        ch = c * H + h
        a_base = a_ptr + ch * Q
        a_t = tl.load(a_base + t, mask=t < Q, other=0.0)

        # inter-chunk: exp(a_t) * C_t . E_c, over N in blocks of BLOCK_K (E stored [P, N], read as E^T [N, P])
        acc = tl.zeros([BLOCK_T, BLOCK_P], dtype=tl.float32)
        for k0 in range(0, BLOCK_N, BLOCK_K):
            n = k0 + tl.arange(0, BLOCK_K)
            n_ok = n < N
            Ct = tl.load(
                C_base + t[:, None] * sC_t + n[None, :] * sC_n,
                mask=t_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            Et = tl.load(
                E_ptr + ch * P * N + p[None, :] * N + n[:, None],
                mask=n_ok[:, None] & p_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = _dot_fr(acc, Ct, Et, SPLIT, INTERP)
        acc = acc * tl.exp(a_t)[:, None]

        # intra-chunk, s blocks up to this T block's diagonal (and the chunk's last valid row)
        cb_base = CB_ptr + (c * G + g) * Q * Q
        s_end = tl.minimum((pid_t + 1) * BLOCK_T, clen)
        if INTERP:
            k = s_end * 0
            while k < s_end:
                acc = _intra_block(
                    acc, k, t, a_t, clen, cb_base, a_base, x_base, dt_base, p, p_ok,
                    sx_t, sx_p, sdt_t, Q, BLOCK_S, SPLIT, INTERP,
                )  # fmt: skip
                k += BLOCK_S
        else:
            for k in range(0, s_end, BLOCK_S):
                acc = _intra_block(
                    acc, k, t, a_t, clen, cb_base, a_base, x_base, dt_base, p, p_ok,
                    sx_t, sx_p, sdt_t, Q, BLOCK_S, SPLIT, INTERP,
                )  # fmt: skip

        # + D x_t, one rounding to the output dtype
        tile = t_ok[:, None] & p_ok[None, :]
        xt = tl.load(x_base + t[:, None] * sx_t + p[None, :] * sx_p, mask=tile, other=0.0)
        acc += tl.load(D_ptr + h).to(tl.float32) * xt.to(tl.float32)
        tl.store(
            y_base + t[:, None] * sy_t + p[None, :] * sy_p,
            acc.to(y_ptr.dtype.element_ty),
            mask=tile,
        )


# ----------------------------------------------------------------------------------------- launchers
def chunk_state(x, dt, A, B, tok0, clen, chunk_size, *, precision=None, config=None, S=None, a=None):
    """S [chunks, H, P, N] fp32 (each chunk's own state contribution) and a [chunks, H, Q] (cumsum dt A).

    x [T, H, P], dt [T, H], B [T, G, N] in token layout; tok0 / clen [chunks] the chunk layout."""
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    Q = chunk_size
    nc = tok0.numel()
    S = torch.empty(nc, H, P, N, dtype=torch.float32, device=x.device) if S is None else S
    a = torch.empty(nc, H, Q, dtype=torch.float32, device=x.device) if a is None else a
    assert S.is_contiguous() and a.is_contiguous() and S.shape == (nc, H, P, N) and a.shape == (nc, H, Q)
    if nc == 0:
        return S, a
    bp, warps, stages = config or CONFIG["state"]
    block_p = min(bp, _p2(P))
    grid = (triton.cdiv(P, block_p), H, nc)
    _chunk_state_kernel[grid](
        x, dt, A, B, tok0, clen, S, a, H, P, N, H // G,
        *x.stride(), *dt.stride(), *B.stride(),
        Q, _p2(Q), block_p, _p2(N), _split(precision, x, B), INTERPRET,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return S, a


def chunk_cb(C, B, tok0, clen, chunk_size, *, precision=None, config=None, CB=None):
    """CB [chunks, G, Q, Q] fp32: C_t . B_s of each chunk and group (rows / columns of padding are 0)."""
    G, N = B.shape[1], B.shape[2]
    Q = chunk_size
    nc = tok0.numel()
    CB = torch.empty(nc, G, Q, Q, dtype=torch.float32, device=C.device) if CB is None else CB
    assert CB.is_contiguous() and CB.shape == (nc, G, Q, Q)
    if nc == 0:
        return CB
    bt, bs, warps = config or CONFIG["cb"]
    bt, bs = min(bt, _p2(Q)), min(bs, _p2(Q))
    grid = (triton.cdiv(Q, bt) * triton.cdiv(Q, bs), G, nc)
    _chunk_cb_kernel[grid](
        C, B, tok0, clen, CB, G, N, *C.stride(), *B.stride(),
        Q, bt, bs, _p2(N), _split(precision, C, B), INTERPRET,
        num_warps=warps,
    )  # fmt: skip
    return CB


def state_passing(
    S, a, ssm_state, seq_cstart, seq_nch, seq_slot, seq_init, chunk_lo, chunk_hi, carry_in, carry_out,
    *, config=None,
):  # fmt: skip
    """In place: S [chunks c_lo..c_hi-1, H, P, N] becomes E (the state entering each chunk).

    For each sequence overlapping the chunk range (seq_* are [n] slices of the per-sequence arrays: first
    chunk, chunk count, pool slot, has-initial-state flag), the walk starts from its pool slot (or zeros,
    or carry_in [H, P, N] when it began before chunk_lo) and ends by writing its final state to the slot
    in the pool's dtype (or to carry_out when it continues past chunk_hi)."""
    nseq = seq_cstart.numel()
    _, H, P, N = S.shape
    assert S.is_contiguous() and a.is_contiguous() and a.shape[:2] == S.shape[:2]
    if nseq == 0:
        return S
    block, warps = config or CONFIG["passing"]
    block = min(block, _p2(P * N))
    Q = a.shape[-1]
    grid = (triton.cdiv(P * N, block), H, nseq)
    _state_passing_kernel[grid](
        S, a, ssm_state, carry_in, carry_out, seq_cstart, seq_nch, seq_slot, seq_init,
        int(chunk_lo), int(chunk_hi), H, P * N, N, *ssm_state.stride(),
        Q, block, INTERPRET,
        num_warps=warps,
    )  # fmt: skip
    return S


def chunk_state_fused(
    x, dt, A, B, tok0, clen, chunk_size, ssm_state, seq_cstart, seq_nch, seq_slot, seq_init, chunk_lo, chunk_hi,
    carry_in, carry_out, *, precision=None, config=None, E=None, a=None,
):  # fmt: skip
    """Chunk states and state passing in one kernel: E [chunks, H, P, N] (state entering each chunk of
    chunk_lo..chunk_hi-1; tok0 / clen are that range's slices) and a [chunks, H, Q], with the pool and the
    carries handled as in `state_passing`. S never reaches memory. E is fp32, or bf16 at precision "bf16"
    (the running state itself stays fp32 in registers)."""
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    Q = chunk_size
    nc = tok0.numel()
    if E is None:  # at precision "bf16" the scan rounds E to bf16 anyway: store it so (half the traffic)
        e_dtype = torch.bfloat16 if _split(precision, x, B) == 1 else torch.float32
        E = torch.empty(nc, H, P, N, dtype=e_dtype, device=x.device)
    a = torch.empty(nc, H, Q, dtype=torch.float32, device=x.device) if a is None else a
    assert E.is_contiguous() and a.is_contiguous() and E.shape == (nc, H, P, N) and a.shape == (nc, H, Q)
    assert chunk_hi - chunk_lo == nc
    nseq = seq_cstart.numel()
    if nseq == 0:
        return E, a
    bp, bn, warps, stages = config or CONFIG["fused"]
    bp, bn = min(bp, _p2(P)), min(bn, _p2(N))
    grid = (triton.cdiv(P, bp) * triton.cdiv(N, bn), H, nseq)
    _fused_state_kernel[grid](
        x, dt, A, B, tok0, clen, E, a, ssm_state, carry_in, carry_out, seq_cstart, seq_nch, seq_slot, seq_init,
        int(chunk_lo), int(chunk_hi), H, P, N, H // G,
        *x.stride(), *dt.stride(), *B.stride(), *ssm_state.stride(),
        Q, _p2(Q), bp, bn, _split(precision, x, B), INTERPRET,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return E, a


def chunk_scan(x, dt, C, CB, a, E, D, tok0, clen, chunk_size, out, *, precision=None, config=None):
    """out[token] = intra-chunk + inter-chunk (from E [chunks, H, P, N]) + D x, for every chunk's valid rows."""
    T, H, P = x.shape
    G, N = C.shape[1], C.shape[2]
    Q = chunk_size
    nc = tok0.numel()
    assert CB.is_contiguous() and a.is_contiguous() and E.is_contiguous()
    assert CB.shape == (nc, G, Q, Q) and a.shape == (nc, H, Q) and E.shape == (nc, H, P, N)
    if nc == 0:
        return out
    bt, bs, bp, bk, warps, stages = config or CONFIG["scan"]
    bq, bn = _p2(Q), _p2(N)
    bt, bs, bp, bk = min(bt, bq), min(bs, bq), min(bp, _p2(P)), min(bk, bn)
    grid = (triton.cdiv(Q, bt) * triton.cdiv(P, bp), H, nc)
    _chunk_scan_kernel[grid](
        x, dt, C, CB, a, E, D, out, tok0, clen, H, G, P, N, H // G,
        *x.stride(), *dt.stride(), *C.stride(), *out.stride(),
        Q, bt, bs, bp, bn, bk, _split(precision, x, C), INTERPRET,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def _groups(Ctot: int, per_group: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil(Ctot / per_group))
    size = math.ceil(Ctot / n)
    return [(c0, min(c0 + size, Ctot)) for c0 in range(0, Ctot, size)]


@torch.no_grad()
def ssd_chunk_scan_varlen_triton(
    x: torch.Tensor,  # [T, H, P]
    dt: torch.Tensor,  # [T, H] fp32
    A: torch.Tensor,  # [H] fp32
    B: torch.Tensor,  # [T, G, N]
    C: torch.Tensor,  # [T, G, N]
    D: torch.Tensor,  # [H]
    ssm_state: torch.Tensor,  # [slots, H, P, N], updated in place with the final states
    tok0: torch.Tensor,  # [chunks] first token of each chunk (device, integer)
    clen: torch.Tensor,  # [chunks] valid rows of each chunk (0..Q)
    seq_cstart: torch.Tensor,  # [S] first chunk of each sequence
    seq_nch: torch.Tensor,  # [S] chunks of each sequence (>= 1)
    seq_slot: torch.Tensor,  # [S] pool slot
    seq_init: torch.Tensor,  # [S] 1 where the sequence continues from its slot's state
    first_chunk: list[int],  # host copies of seq_cstart and seq_cstart + seq_nch - 1 (sorted)
    last_chunk: list[int],
    chunk_size: int,
    out: torch.Tensor | None = None,
    *,
    precision: str | None = None,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    chunk_group: int | None = None,
    fused_states: bool | None = None,
) -> torch.Tensor:
    """The whole packed scan with the Triton kernels; `ssd_vectorized` builds the chunk layout.

    `fused_states` (default FUSED_STATES): chunk states and state passing in one kernel
    (`chunk_state_fused`), else the two separate kernels (`chunk_state` then `state_passing`)."""
    T, H, P = x.shape
    N = B.shape[2]
    Q = chunk_size
    dev = x.device
    out = torch.empty_like(x) if out is None else out
    Ctot = tok0.numel()
    if Ctot == 0:
        return out
    A32, D32 = A.detach().float(), D.detach().float()
    per_group = chunk_group or max(1, group_bytes // (4 * H * P * N))
    groups = _groups(Ctot, per_group)
    if len(groups) > 1:
        carry = torch.empty(2, H, P, N, dtype=torch.float32, device=dev)
    else:  # never read or written
        carry = torch.empty(2, 1, dtype=torch.float32, device=dev)
    fused = FUSED_STATES if fused_states is None else fused_states
    for gi, (c0, c1) in enumerate(groups):
        t0, cl = tok0[c0:c1], clen[c0:c1]
        s_lo, s_hi = bisect.bisect_left(last_chunk, c0), bisect.bisect_left(first_chunk, c1)
        seq = (seq_cstart[s_lo:s_hi], seq_nch[s_lo:s_hi], seq_slot[s_lo:s_hi], seq_init[s_lo:s_hi])
        if fused:
            E, a = chunk_state_fused(
                x, dt, A32, B, t0, cl, Q, ssm_state, *seq, c0, c1, carry[gi % 2], carry[(gi + 1) % 2],
                precision=precision,
            )  # fmt: skip
        else:
            E, a = chunk_state(x, dt, A32, B, t0, cl, Q, precision=precision)
            state_passing(E, a, ssm_state, *seq, c0, c1, carry[gi % 2], carry[(gi + 1) % 2])
        CB = chunk_cb(C, B, t0, cl, Q, precision=precision)
        chunk_scan(x, dt, C, CB, a, E, D32, t0, cl, Q, out, precision=precision)
        del E, a, CB
    return out


def chunk_layout(cu_seqlens: list[int], chunk_size: int, device) -> dict:
    """The chunk layout of `ssd_vectorized` for standalone use (tests): per chunk tok0 / clen, per sequence
    first chunk and chunk count (an empty sequence owns one all-padding chunk)."""
    tok0, clen, cstart, nch = [], [], [], []
    for s in range(len(cu_seqlens) - 1):
        a, b = cu_seqlens[s], cu_seqlens[s + 1]
        n = max(1, math.ceil((b - a) / chunk_size))
        cstart.append(len(tok0))
        nch.append(n)
        for k in range(n):
            tok0.append(a + k * chunk_size)
            clen.append(max(0, min(chunk_size, b - a - k * chunk_size)))

    def dev(v):
        return torch.tensor(v, dtype=torch.int64, device=device)

    return {
        "tok0": dev(tok0),
        "clen": dev(clen),
        "seq_cstart": dev(cstart),
        "seq_nch": dev(nch),
        "first_chunk": cstart,
        "last_chunk": [c + n - 1 for c, n in zip(cstart, nch)],
    }
