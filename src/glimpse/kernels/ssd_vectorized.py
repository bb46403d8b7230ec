"""The packed chunked SSD scan of Mamba2 prompts, fully vectorised in PyTorch (no Python loop over chunks).

Same contract and semantics as `glimpse.kernels.ssd.ssd_chunk_scan_varlen` (the reference, which loops over
sequences and chunks); this version is what runs on the GPU and it works on any device. Maths (per head h,
group g = h // (H / G), everything in fp32):

* Layout. Every sequence is cut into chunks of Q tokens starting at its first token (as the reference does);
  its last chunk is padded with dt = 0, so padding neither decays the state nor adds to it. A sequence of
  length 0 gets one all-padding chunk (its final state is then its initial state, as in the reference).
* Within chunk c, a_t = cumsum(dt * A) (log-decay from the chunk start, t inclusive), and

      y_t  = sum_{s<=t} (C_t . B_s) exp(a_t - a_s) dt_s x_s      (intra-chunk; C.B computed once per group)
           + exp(a_t) C_t . E_c                                  (inter-chunk: E_c = state entering the chunk)
           + D x_t
      S_c  = sum_s exp(a_last - a_s) dt_s x_s (outer) B_s        (chunk's own contribution, zero initial state)

  The exponent is masked to -inf above the diagonal before exp, so nothing overflows.
* States between chunks: E_c = alpha_c E_{c-1} + V_c with alpha_c = exp(a_last(c-1)), V_c = S_{c-1}; at the
  first chunk of a sequence alpha = 0 and V = the sequence's initial state (zeros without one). Unrolled,
  E_i = sum_{k<=i} exp(sum_{k<j<=i} log alpha_j) V_k: a lower-triangular [chunks, chunks] decay matrix per
  head (its log built by a masked cumsum, so each entry sums only its own terms, and a -inf at every
  sequence start zeroes the decay across sequences), applied with one batched matmul.
* Memory. Chunks are processed in groups (a Python loop over groups only) so the [chunks, H, Q, Q]
  intermediates stay within `group_bytes`; the state entering the next group is carried over.
  Final states: F = exp(a_last) E_last + S_last per sequence, written to its slot in the pool's dtype.

Layouts are chosen so that every batched matmul can read its operands as strided views (no copies): the
intra-chunk product is batched over (chunk, head) on [c, H, Q, *] tensors; the products with B and C are
batched over (chunk, group) with the heads of a group stacked into the rows ([R*P, Q] @ [Q, N]), so B and C
are never expanded from groups to heads.
"""

from __future__ import annotations

import bisect
import math

import torch

from glimpse.kernels import triton_ssd

_DEFAULT_GROUP_BYTES = 256 * 2**20  # largest per-group intermediate ([chunks, H, Q, Q] fp32 or states)


class _Plan:
    """Chunk layout of a packed batch, built on the host with vectorised torch ops, sent in one copy.

    Every Mamba layer of a forward pass sees the same batch, so the last plan is cached (`_plan`)."""

    def __init__(
        self,
        cu_seqlens: list[int],
        slots: list[int],
        has_initial_state: list[bool],
        chunk_size: int,
        T: int,
        H: int,
        G: int,
        device: torch.device,
    ) -> None:
        Q = chunk_size
        cu = torch.tensor(cu_seqlens, dtype=torch.int64)
        S = cu.numel() - 1
        lens = cu[1:] - cu[:-1]
        nch = torch.clamp((lens + Q - 1) // Q, min=1)  # an empty sequence still owns one (padding) chunk
        cstart = torch.cumsum(nch, 0) - nch
        Ctot = int(nch.sum())
        chunk_seq = torch.repeat_interleave(torch.arange(S), nch)
        chunk_k = torch.arange(Ctot) - cstart[chunk_seq]
        tok0 = cu[:-1][chunk_seq] + chunk_k * Q
        clen = torch.clamp(lens[chunk_seq] - chunk_k * Q, 0, Q)
        q = torch.arange(Q)
        idx = tok0[:, None] + q[None, :]
        # padding reads the sequence's own last token (finite data); its dt is zeroed by `valid`
        idx = torch.minimum(idx, (cu[1:][chunk_seq] - 1)[:, None]).clamp(0, max(T - 1, 0))
        valid = q[None, :] < clen[:, None]
        is_first = torch.ones(Ctot + 1, dtype=torch.int64)  # index Ctot: a virtual chunk after the last
        is_first[:Ctot] = (chunk_k == 0).long()
        tok_seq = torch.repeat_interleave(torch.arange(S), lens)
        tok_local = torch.arange(T) - cu[:-1][tok_seq]
        tok_chunk = cstart[tok_seq] + tok_local // Q
        tok_q = tok_local % Q

        self.S, self.Ctot, self.T = S, Ctot, T
        self.first_chunk = cstart.tolist()  # host copies, for the per-group ranges
        self.last_chunk = (cstart + nch - 1).tolist()
        self.tok_begin = tok0.tolist()
        self.tok_end = (tok0 + clen).tolist()
        parts = {
            "idx": idx,
            "valid": valid.long(),
            "is_first": is_first,
            "cstart": cstart,
            "clast": cstart + nch - 1,
            "tok_chunk": tok_chunk,
            "tok_q": tok_q,
            "slots": torch.tensor(slots, dtype=torch.int64),
            "has_init": torch.tensor(has_initial_state, dtype=torch.int64),
            "tok0": tok0,  # the Triton kernels read tokens in place: chunk c = tokens tok0 .. tok0 + clen - 1
            "clen": clen,
            "nch": nch,
        }
        flat = torch.cat([p.reshape(-1) for p in parts.values()])
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        else:
            flat = flat.to(device)
        views = torch.split(flat, [p.numel() for p in parts.values()])
        for (name, p), v in zip(parts.items(), views):
            setattr(self, name, v.view(p.shape))
        self.valid = self.valid.bool()
        self.is_first = self.is_first.bool()
        self.has_init_i64 = self.has_init
        self.has_init = self.has_init.bool()
        self.h_ar = torch.arange(H, device=device)[None, :, None]
        self.g_ar = torch.arange(G, device=device)[None, :, None]
        self.upper = torch.ones(Q, Q, dtype=torch.bool, device=device).triu(1)


_PLAN_CACHE: list = [None, None]  # [key, plan]: the last batch seen


def _plan(cu_seqlens, slots, has_initial_state, Q, T, H, G, device) -> _Plan:
    key = (tuple(cu_seqlens), tuple(slots), tuple(bool(b) for b in has_initial_state), Q, T, H, G, device)
    if _PLAN_CACHE[0] != key:
        _PLAN_CACHE[1] = _Plan(cu_seqlens, slots, has_initial_state, Q, T, H, G, device)
        _PLAN_CACHE[0] = key
    return _PLAN_CACHE[1]


def _groups(Ctot: int, per_group: int) -> list[tuple[int, int]]:
    """Split [0, Ctot) into ceil(Ctot / per_group) groups of nearly equal size."""
    n = max(1, math.ceil(Ctot / per_group))
    size = math.ceil(Ctot / n)
    return [(c0, min(c0 + size, Ctot)) for c0 in range(0, Ctot, size)]


@torch.no_grad()  # serving only; the out= matmuls would refuse inputs that require grad
def ssd_chunk_scan_varlen_vectorized(
    x: torch.Tensor,  # [T, H, P]
    dt: torch.Tensor,  # [T, H] fp32, after softplus and limits
    A: torch.Tensor,  # [H] fp32
    B: torch.Tensor,  # [T, G, N]
    C: torch.Tensor,  # [T, G, N]
    D: torch.Tensor,  # [H]
    ssm_state: torch.Tensor,  # [slots, H, P, N] (fp32 or bf16), updated in place with the final states
    cu_seqlens: list[int],
    slots: list[int],
    has_initial_state: list[bool],
    chunk_size: int,
    group_bytes: int = _DEFAULT_GROUP_BYTES,
    chunk_group: int | None = None,
    compile_intra: bool = False,
    use_triton: bool = False,
    precision: str | None = None,
) -> torch.Tensor:
    """Packed prompt chunks of several sequences, each continuing from its cached state (or zeros).

    `chunk_group` (chunks per group) overrides the group size derived from `group_bytes`; tests use it to
    exercise the carry between groups. `compile_intra` (experimental, off by default) runs the intra-chunk
    product through torch.compile, which fuses its elementwise passes over the [chunks, H, Q, Q] tensor. Slots must be distinct (the reference would chain sequences that
    share one; a serving batch never does).

    `use_triton` (the caller, `ssd.ssd_chunk_scan_varlen`, decides) runs the heavy steps as the Triton kernels
    of `glimpse.kernels.triton_ssd` on the same chunk layout (`precision`: see that module; default its
    PRECISION) instead of the PyTorch code below. With Triton, `group_bytes` bounds the [chunks, H, P, N]
    fp32 state buffer instead (its default is then triton_ssd.DEFAULT_GROUP_BYTES).
    """
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    Q = chunk_size
    if H % G:
        raise ValueError(f"{H} heads are not a multiple of {G} groups")
    R = H // G
    if len(slots) != len(cu_seqlens) - 1 or len(has_initial_state) != len(slots):
        raise ValueError("cu_seqlens, slots and has_initial_state disagree on the number of sequences")
    if len(set(slots)) != len(slots):
        raise ValueError("each sequence needs its own state slot")
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != T:
        raise ValueError("cu_seqlens must run from 0 to the number of tokens")
    dev = x.device
    out = torch.empty_like(x)
    if not slots:
        return out
    if T == 0:  # only empty sequences: each final state is its initial state
        for s, slot in enumerate(slots):
            if not has_initial_state[s]:
                ssm_state[slot].zero_()
        return out

    plan = _plan(cu_seqlens, slots, has_initial_state, Q, T, H, G, dev)
    if use_triton:
        tb = triton_ssd.DEFAULT_GROUP_BYTES if group_bytes == _DEFAULT_GROUP_BYTES else group_bytes
        return triton_ssd.ssd_chunk_scan_varlen_triton(
            x, dt, A, B, C, D, ssm_state, plan.tok0, plan.clen, plan.cstart, plan.nch, plan.slots,
            plan.has_init_i64, plan.first_chunk, plan.last_chunk, Q, out,
            precision=precision, group_bytes=tb, chunk_group=chunk_group,
        )  # fmt: skip
    slots_t, init_t, h_ar, g_ar, upper = plan.slots, plan.has_init, plan.h_ar, plan.g_ar, plan.upper
    A32 = A.float()
    D32 = D.float()

    intra = _intra_chunk_compiled() if compile_intra else _intra_chunk
    per_chunk = 4 * H * max(Q * Q, P * N, Q * P)
    per_group = chunk_group if chunk_group is not None else max(1, group_bytes // per_chunk)
    carry = None  # state entering the group's first chunk (when that chunk continues a sequence)
    for c0, c1 in _groups(plan.Ctot, per_group):
        gc = c1 - c0
        idx = plan.idx[c0:c1][:, None, :]  # [gc, 1, Q]
        # ---- gather the group's tokens into the chunk layout (padding: dt = 0)
        x_g = x[idx, h_ar]  # [gc, H, Q, P], x.dtype
        dt_g = torch.where(plan.valid[c0:c1][:, None, :], dt[idx, h_ar].float(), 0.0)  # [gc, H, Q]
        B_g = B[idx, g_ar].float()  # [gc, G, Q, N]
        C_g = C[idx, g_ar].float()
        a = torch.cumsum(dt_g * A32[None, :, None], dim=-1)  # [gc, H, Q]
        a_last = a[:, :, -1]  # [gc, H]

        # ---- intra-chunk: y = ((C.B) * exp(a_t - a_s) masked) @ (dt x)
        CB = torch.bmm(C_g.view(gc * G, Q, N), B_g.view(gc * G, Q, N).transpose(1, 2))  # [gc*G, Q, Q]
        xdt = x_g * dt_g[..., None]  # fp32 [gc, H, Q, P]
        y = intra(a, CB.view(gc, G, Q, Q), xdt, upper)  # [gc, H, Q, P]
        del CB, xdt

        # ---- chunk states S_c, written after slot 0 of V (V_i = state fed into chunk c0+i)
        V = torch.empty(gc + 1, H, P, N, dtype=torch.float32, device=dev)
        w = torch.exp(a_last[:, :, None] - a) * dt_g  # [gc, H, Q]
        xw = torch.empty(gc, G, Q, R, P, dtype=torch.float32, device=dev)  # heads of a group side by side
        torch.mul(
            x_g.view(gc, G, R, Q, P).permute(0, 1, 3, 2, 4),
            w.view(gc, G, R, Q).permute(0, 1, 3, 2)[..., None],
            out=xw,
        )
        torch.bmm(
            xw.view(gc * G, Q, R * P).transpose(1, 2),  # [gc*G, R*P, Q]
            B_g.view(gc * G, Q, N),
            out=V[1:].view(gc * G, R * P, N),
        )
        del xw

        # sequences ending in the group: keep S_last before V's entries at sequence starts are replaced
        s_lo, s_hi = _seq_range(plan.last_chunk, c0, c1)
        if s_hi > s_lo:
            last_local = plan.clast[s_lo:s_hi] - c0
            S_last = V.index_select(0, last_local + 1)
        if carry is not None:
            V[0] = carry
        f_lo, f_hi = _seq_range(plan.first_chunk, c0, c1)
        if f_hi > f_lo:  # sequences starting in the group: their initial states (zeros without one)
            sl = slots_t[f_lo:f_hi]
            init = ssm_state.index_select(0, sl).float()
            init = torch.where(init_t[f_lo:f_hi][:, None, None, None], init, 0.0)
            V.index_copy_(0, plan.cstart[f_lo:f_hi] - c0, init)

        # ---- states entering each chunk: E = M @ V, M[i, k] = exp(sum_{k<j<=i} log alpha_j)
        log_alpha = torch.zeros(gc + 1, H, dtype=torch.float32, device=dev)
        log_alpha[1:] = torch.where(plan.is_first[c0 + 1 : c1 + 1][:, None], float("-inf"), a_last)
        M = _decay_matrix(log_alpha.t())  # [H, gc+1, gc+1]
        E = torch.empty(gc + 1, H, P, N, dtype=torch.float32, device=dev)
        torch.bmm(M, V.view(gc + 1, H, P * N).transpose(0, 1), out=E.view(gc + 1, H, P * N).transpose(0, 1))
        del V, M
        # state entering chunk c1: right when c1 continues a sequence, else replaced by an initial state
        carry = E[gc].clone()

        if s_hi > s_lo:  # final states of the sequences ending here
            final = torch.exp(a_last.index_select(0, last_local))[:, :, None, None] * E.index_select(
                0, last_local
            )
            final += S_last
            ssm_state.index_copy_(0, slots_t[s_lo:s_hi], final.to(ssm_state.dtype))
            del S_last

        # ---- inter-chunk output: exp(a_t) * (C_t . E_c), heads of a group stacked in the matmul's columns
        y_off = torch.bmm(
            C_g.view(gc * G, Q, N), E[:gc].view(gc * G, R * P, N).transpose(1, 2)
        )  # [gc*G, Q, R*P]
        y.view(gc, G, R, Q, P).permute(0, 1, 3, 2, 4).addcmul_(
            y_off.view(gc, G, Q, R, P), torch.exp(a).view(gc, G, R, Q).permute(0, 1, 3, 2)[..., None]
        )
        del y_off, E

        # ---- back to token order, + D x, cast to the output dtype (fp32 maths, one rounding)
        t0, t1 = plan.tok_begin[c0], plan.tok_end[c1 - 1]
        if t1 > t0:
            y_tok = y.transpose(1, 2)[plan.tok_chunk[t0:t1] - c0, plan.tok_q[t0:t1]]  # [n, H, P] fp32
            torch.addcmul(y_tok, x[t0:t1], D32[:, None], out=out[t0:t1])
    return out


def _intra_chunk(a: torch.Tensor, CB: torch.Tensor, xdt: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """a [c, H, Q] log-decays, CB [c, G, Q, Q], xdt [c, H, Q, P] fp32 -> sum_{s<=t} CB exp(a_t - a_s) xdt_s."""
    c, H, Q = a.shape
    G, P = CB.shape[1], xdt.shape[-1]
    L = a[:, :, :, None] - a[:, :, None, :]  # [c, H, Q(t), Q(s)]
    L.masked_fill_(upper, float("-inf"))  # before exp: the upper triangle may be large and positive
    L.exp_()
    L.view(c, G, H // G, Q, Q).mul_(CB[:, :, None])
    return torch.bmm(L.view(c * H, Q, Q), xdt.view(c * H, Q, P)).view(c, H, Q, P)


_COMPILED = None


def _intra_chunk_compiled():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_intra_chunk, dynamic=True)
    return _COMPILED


def _seq_range(chunk_of_seq: list[int], c0: int, c1: int) -> tuple[int, int]:
    """The sequences whose (sorted) chunk index lies in [c0, c1), as a range [lo, hi)."""
    return bisect.bisect_left(chunk_of_seq, c0), bisect.bisect_left(chunk_of_seq, c1)


def _decay_matrix(log_alpha: torch.Tensor) -> torch.Tensor:
    """log_alpha [H, n] -> M [H, n, n], M[i, k] = exp(sum_{k<j<=i} log_alpha[j]) for k <= i, else 0.

    Each entry sums only its own terms (a masked cumsum, not a difference of prefix sums), so long
    sequences lose no precision; a -inf (a sequence start) zeroes every product that crosses it.
    """
    n = log_alpha.shape[-1]
    ar = torch.arange(n, device=log_alpha.device)
    below = ar[:, None] > ar[None, :]  # j > k
    terms = log_alpha[:, :, None].expand(-1, n, n).masked_fill(~below, 0.0)  # [H, j, k]
    seg = torch.cumsum(terms, dim=1)  # [H, i, k] = sum_{k<j<=i}
    seg.masked_fill_(ar[None, :] > ar[:, None], float("-inf"))  # k > i
    return seg.exp_()
