"""The packed chunked SSD scan of Mamba2 prompts (`ssd.ssd_chunk_scan_varlen` on CUDA: the vectorised
plan and the Triton kernels of kernels/triton_ssd.py) at the 12B's shapes, against the reference loop;
and a sweep of the Triton kernels' launch configurations."""

from __future__ import annotations

import functools
import math

import torch

from glimpse.bench.timing import time_eager
from glimpse.kernels import ssd, triton_ssd
from glimpse.kernels.ssd_vectorized import ssd_chunk_scan_varlen_vectorized
from glimpse.kernels.triton_ssd import (
    chunk_cb,
    chunk_layout,
    chunk_scan,
    chunk_state,
    chunk_state_fused,
    state_passing,
)


def bench_ssd(
    tokens=(4096, 6192, 32768),
    heads: int = 128,
    head_dim: int = 80,
    groups: int = 8,
    state: int = 128,
    chunk: int = 128,
    device: str = "cuda",
    iters: int = 20,
    check_up_to: int = 8192,
    state_dtype: torch.dtype = torch.float32,
    compile_intra: bool = False,
    use_triton: bool | None = None,
    precision: str | None = None,
    compare: bool = True,
) -> list[dict]:
    """Median time of one layer's scan (bf16 inputs, per-sequence initial states, fp32 state pool).

    6,192 tokens are packed as the four prompts of notes/kernels.md (1500, 700, 3000, 992), every other
    count as one prompt. Up to `check_up_to` tokens the result is also compared with the reference run on
    CPU copies (max abs error of y over max |y|, and the same for the final states).

    The row's figures are for the default path (`use_triton`, `precision`: as the scan's defaults, i.e.
    the Triton kernels on CUDA when available). With `compare` and Triton in use, `row["variants"]` also
    times the Triton kernels at precision "bf16" and "exact", with the chunk states fused with the state
    passing or not (triton_ssd.FUSED_STATES), and the PyTorch path, each with its errors.
    """
    results = []
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    for T in tokens:
        lens = [1500, 700, 3000, 992] if T == 6192 else [T]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        nseq = len(lens)
        x = torch.randn(T, heads, head_dim, generator=gen).bfloat16()
        dt = torch.nn.functional.softplus(torch.randn(T, heads, generator=gen) - 2.0)
        A = -torch.exp(torch.rand(heads, generator=gen) * 3.0)
        B = torch.randn(T, groups, state, generator=gen).bfloat16()
        C = torch.randn(T, groups, state, generator=gen).bfloat16()
        D = torch.randn(heads, generator=gen)
        pool0 = (0.1 * torch.randn(nseq + 1, heads, head_dim, state, generator=gen)).to(state_dtype)
        slots = list(range(1, nseq + 1))
        init = [True] * nseq
        args = [t.to(dev) for t in (x, dt, A, B, C, D)]
        pool = pool0.to(dev, copy=True)  # pool0 stays the pristine initial states
        main_triton = ssd.use_triton_scan(args[0]) if use_triton is None else use_triton
        main_prec = (precision or triton_ssd.PRECISION) if main_triton else None
        fused0 = triton_ssd.FUSED_STATES
        variants = [(main_triton, main_prec, fused0)]
        if compare and main_triton:
            variants += [(True, p, fused0) for p in ("bf16", "exact") if p != main_prec]
            variants += [(True, main_prec, not fused0), (False, None, fused0)]

        def run(use, prec, fused, pool=pool, args=args, cu=cu, slots=slots, init=init, fused0=fused0):
            triton_ssd.FUSED_STATES = fused
            try:
                return ssd_chunk_scan_varlen_vectorized(
                    *args, pool, cu, slots, init, chunk,
                    compile_intra=compile_intra, use_triton=use, precision=prec,
                )  # fmt: skip
            finally:
                triton_ssd.FUSED_STATES = fused0

        y_ref = ref_pool = None
        row: dict = {}
        for use, prec, fused in variants:
            timing = time_eager(
                functools.partial(run, use, prec, fused), reps=iters, warmup=3, device=dev,
                setup=functools.partial(pool.copy_, pool0),
            )  # fmt: skip
            vrow = {
                "path": (f"triton/{prec}/" + ("fused" if fused else "separate")) if use else "torch",
                "median_ms": timing.ms,
                "min_ms": min(timing.samples_ms),
                "tokens_per_s": T / timing.ms * 1e3,
            }
            # once more, untimed: the output and final states for the parity check, and the peak memory
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            pool.copy_(pool0)
            y = run(use, prec, fused)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                vrow["peak_extra_MiB"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
            if T <= check_up_to:
                if y_ref is None:
                    ref_pool = pool0.clone()
                    y_ref = ssd.ssd_chunk_scan_varlen(x, dt, A, B, C, D, ref_pool, cu, slots, init, chunk)
                    y_ref = y_ref.float()
                vrow["y_rel_err"] = float((y.float().cpu() - y_ref).abs().max() / y_ref.abs().max())
                got = pool.float().cpu()[1:]
                want = ref_pool.float()[1:]
                vrow["state_rel_err"] = float((got - want).abs().max() / want.abs().max())
            if not row:
                row = {
                    "tokens": T,
                    "seqlens": lens,
                    "chunks": sum(max(1, math.ceil(n / chunk)) for n in lens),
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "compile_intra": compile_intra,
                    **vrow,
                }
            if len(variants) > 1:
                row.setdefault("variants", []).append(vrow)
        results.append(row)
    return results


def sweep_configs(tokens=(1500, 700, 3000, 992), heads=128, head_dim=80, groups=8, state=128, chunk=128,
                  precision=None, iters=20, device="cuda", candidates=None) -> list[dict]:  # fmt: skip
    """On a GPU: time each kernel under alternative launch configurations (12B shapes, the 6,192-token
    batch of bench_ssd). Returns rows {kernel, config, ms, rel_diff_vs_default}; set
    triton_ssd.CONFIG[kernel] to the fastest to use it. `candidates` ({kernel: [config, ...]}) replaces the
    built-in lists."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    cu = [0]
    for n in tokens:
        cu.append(cu[-1] + n)
    T = cu[-1]
    x = torch.randn(T, heads, head_dim, generator=gen).bfloat16().to(dev)
    dt = torch.nn.functional.softplus(torch.randn(T, heads, generator=gen) - 2.0).to(dev)
    A = (-torch.exp(torch.rand(heads, generator=gen) * 3.0)).to(dev)
    B = torch.randn(T, groups, state, generator=gen).bfloat16().to(dev)
    C = torch.randn(T, groups, state, generator=gen).bfloat16().to(dev)
    D = torch.randn(heads, generator=gen).to(dev)
    lay = chunk_layout(cu, chunk, dev)
    nseq = len(tokens)
    pool = torch.zeros(nseq, heads, head_dim, state, device=dev)
    slot = torch.arange(nseq, device=dev)
    init = torch.zeros(nseq, dtype=torch.int64, device=dev)  # the walks start from zeros: repeatable
    out = torch.empty_like(x)
    S, a = chunk_state(x, dt, A, B, lay["tok0"], lay["clen"], chunk, precision=precision)
    CB = chunk_cb(C, B, lay["tok0"], lay["clen"], chunk, precision=precision)
    carry = torch.empty(2, 1, device=dev)
    Ctot = lay["tok0"].numel()

    kw = {"precision": precision}
    candidates = candidates or {
        "fused": [
            (32, 128, 4, 2), (16, 128, 4, 2), (32, 64, 4, 2), (32, 128, 8, 2), (16, 64, 4, 2), (64, 128, 8, 2),
            (32, 128, 4, 3), (16, 128, 4, 3),
        ],
        "state": [(16, 4, 2), (32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 8, 2), (128, 8, 2), (128, 8, 1)],
        "cb": [(64, 64, 4), (128, 128, 8), (128, 64, 8), (64, 32, 4)],
        "passing": [(256, 4), (512, 4), (1024, 4), (2048, 8), (4096, 8)],
        "scan": [
            (64, 64, 128, 32, 8, 2), (64, 64, 128, 32, 4, 2), (64, 64, 128, 64, 8, 2), (64, 32, 128, 32, 4, 3),
            (128, 64, 128, 32, 8, 2), (128, 32, 128, 32, 8, 2), (64, 64, 32, 32, 4, 2), (64, 64, 32, 128, 4, 2),
            (128, 64, 32, 64, 8, 2), (64, 64, 64, 64, 4, 2), (128, 128, 128, 32, 8, 1),
        ],
    }  # fmt: skip
    fns = {
        "fused": lambda cfg: chunk_state_fused(
            x, dt, A, B, lay["tok0"], lay["clen"], chunk, pool, lay["seq_cstart"], lay["seq_nch"], slot, init,
            0, Ctot, carry[0], carry[1], E=S, a=a, config=cfg, **kw,
        ),
        "state": lambda cfg: chunk_state(x, dt, A, B, lay["tok0"], lay["clen"], chunk, S=S, a=a, config=cfg, **kw),
        "cb": lambda cfg: chunk_cb(C, B, lay["tok0"], lay["clen"], chunk, CB=CB, config=cfg, **kw),
        "passing": lambda cfg: state_passing(
            S, a, pool, lay["seq_cstart"], lay["seq_nch"], slot, init, 0, Ctot, carry[0], carry[1], config=cfg
        ),
        "scan": lambda cfg: chunk_scan(x, dt, C, CB, a, S, D, lay["tok0"], lay["clen"], chunk, out, config=cfg, **kw),
    }  # fmt: skip
    outputs = {
        "fused": S,
        "state": S,
        "cb": CB,
        "scan": out,
    }  # compared with the default configuration's result
    rows = []
    for kernel, cfgs in candidates.items():
        want = None
        if kernel in outputs:
            fns[kernel](triton_ssd.CONFIG[kernel])
            want = outputs[kernel].float().clone()
        for cfg in cfgs:
            try:
                ms = time_eager(functools.partial(fns[kernel], cfg), reps=iters, warmup=3, device=dev).ms
            except Exception as exc:  # an impossible config (resources) is reported, not fatal
                rows.append({"kernel": kernel, "config": cfg, "error": repr(exc)[:200]})
                continue
            row = {"kernel": kernel, "config": cfg, "ms": ms, "default": cfg == triton_ssd.CONFIG[kernel]}
            if want is not None:
                got = outputs[kernel].float()
                row["rel_diff_vs_default"] = float((got - want).abs().max() / want.abs().max())
            rows.append(row)
    return rows
