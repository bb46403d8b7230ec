"""Benchmark of the decode-path Mamba kernels against the memory-bandwidth floor.

A decode step of one Mamba layer reads and writes every running sequence's SSM state once; nothing else
it touches comes close in size. So the floor of a kernel is (bytes it must move) / (copy bandwidth), where
the copy bandwidth is measured on the same card in the same process: a large device-to-device copy,
bytes read + bytes written over its time.

Method (docs/KERNELS.md): 12B shapes (128 heads, head_dim 80, state 128, 8 groups, conv 12288 x 4), random
data, state slots scattered through a pool; several independent sets of state + inputs, together well
over the L2 cache, are cycled so that no call finds its state in L2; the calls are captured in a CUDA
graph and the median replay time is divided by the calls in it (launch gaps excluded, as the engine's
graphs will); "eager" is the same loop without a graph (Python launch overhead included).

    python -m glimpse.bench.kernels --out DIR          # copy bandwidth, parity, tables, config sweeps
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from glimpse.bench.floors import time_graph

SHAPES_12B = {"heads": 128, "head_dim": 80, "state": 128, "groups": 8, "conv_kernel": 4}
SET_BYTES = 320 << 20  # aim for this much state over all sets (L2 is 50 MB on an H100)
DEVICE = "cuda"


# Timing ----------------------------------------------------------------------------------------------


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def time_eager(calls: list[Callable[[], object]], reps: int = 5) -> float:
    """Median ms per call of the calls launched one by one (Python and launch overhead included)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = _events()
        start.record()
        for c in calls:
            c()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / len(calls)


def measure_copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> dict:
    """GB/s of a device-to-device copy (read + written bytes) and of an in-place scale (same traffic as
    the state update: read and write the same addresses)."""
    src = torch.randn(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    out = {}
    for name, fn in (
        ("copy", functools.partial(dst.copy_, src)),
        ("inplace_scale", functools.partial(src.mul_, 0.999)),
    ):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = _events()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        out[f"{name}_gbps"] = 2 * nbytes / (ms * 1e-3) / 1e9
        out[f"{name}_ms"] = ms
    out["bytes"] = nbytes
    del src, dst
    torch.cuda.empty_cache()
    return out


# Problem set-up --------------------------------------------------------------------------------------


def _n_sets(per_set_bytes: int, lo: int = 2, hi: int = 64) -> int:
    return max(lo, min(hi, math.ceil(SET_BYTES / max(1, per_set_bytes))))


def _ssm_sets(batch, ssm_dtype, dtype, heads, head_dim, state, groups, n_sets, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    slots_total = batch * n_sets
    pool = torch.randn(slots_total, heads, head_dim, state, device=DEVICE, generator=g).to(ssm_dtype)
    perm = torch.randperm(slots_total, device=DEVICE, generator=g)
    d_inner, gn = heads * head_dim, groups * state
    sets = []
    for i in range(n_sets):
        xbc = torch.randn(batch, d_inner + 2 * gn, device=DEVICE, generator=g).to(dtype)
        dt_raw = torch.randn(batch, heads, device=DEVICE, generator=g).to(dtype)
        dt_bias = torch.randn(heads, device=DEVICE, generator=g)
        sets.append(
            {
                "x": xbc[:, :d_inner].view(batch, heads, head_dim),
                "B": xbc[:, d_inner : d_inner + gn].view(batch, groups, state),
                "C": xbc[:, d_inner + gn :].view(batch, groups, state),
                "dt_raw": dt_raw,
                "dt_bias": dt_bias,
                "dt": F.softplus(dt_raw.float() + dt_bias),
                "slots": perm[i * batch : (i + 1) * batch].contiguous(),
            }
        )
    A = -torch.exp(torch.rand(heads, device=DEVICE, generator=g) * 3)
    D = torch.randn(heads, device=DEVICE, generator=g)
    return pool, sets, A, D


def ssm_bytes(batch, ssm_dtype, dtype, heads, head_dim, state, groups, fused_dt=False) -> int:
    """Fewest bytes one decode state update must move."""
    es, xs = torch.empty(0, dtype=ssm_dtype).element_size(), torch.empty(0, dtype=dtype).element_size()
    n = 2 * batch * heads * head_dim * state * es  # state read + written
    n += 2 * batch * heads * head_dim * xs  # x in, y out
    n += 2 * batch * groups * state * xs  # B, C
    n += batch * heads * (xs if fused_dt else 4) + batch * 8  # dt, slots
    return n


def conv_bytes(batch, state_dtype, dtype, channels, kernel) -> int:
    es, xs = torch.empty(0, dtype=state_dtype).element_size(), torch.empty(0, dtype=dtype).element_size()
    return 2 * batch * (kernel - 1) * channels * es + 2 * batch * channels * xs + channels * (kernel + 1) * xs


# Benchmarks ------------------------------------------------------------------------------------------


def _row(op, batch, ssm_dtype, ms, nbytes, copy_gbps, **extra) -> dict:
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {
        "op": op,
        "batch": batch,
        "state_dtype": str(ssm_dtype).replace("torch.", ""),
        "ms": ms,
        "bytes": nbytes,
        "gbps": gbps,
        "floor_ms": nbytes / (copy_gbps * 1e9) * 1e3,
        "pct_floor": 100.0 * gbps / copy_gbps,
        **extra,
    }


def _ssm_problem(batch, ssm_dtype, dtype, shapes, seed=0):
    s = shapes
    per_set = batch * s["heads"] * s["head_dim"] * s["state"] * torch.empty(0, dtype=ssm_dtype).element_size()
    n_sets = _n_sets(per_set)
    pool, sets, A, D = _ssm_sets(
        batch, ssm_dtype, dtype, s["heads"], s["head_dim"], s["state"], s["groups"], n_sets, seed
    )
    return pool, sets, A, D


def _ssm_calls(fn, pool, sets, A, D, fused_dt=False, **kw) -> list[Callable[[], object]]:
    """One call per set (repeated to at least 16), each a partial of `fn` on that set's tensors."""
    calls = []
    for st in sets:
        dt_args = (st["dt_raw"], st["dt_bias"]) if fused_dt else (st["dt"],)
        calls.append(
            functools.partial(fn, st["x"], *dt_args, A, st["B"], st["C"], D, pool, st["slots"], **kw)
        )
    return calls * max(1, math.ceil(16 / len(sets)))


def _conv_problem(batch, state_dtype, dtype, channels, kernel, seed=1):
    n_sets = _n_sets(
        batch * (kernel - 1) * channels * torch.empty(0, dtype=state_dtype).element_size(), hi=256
    )
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    cpool = torch.randn(batch * n_sets, kernel - 1, channels, device=DEVICE, generator=g).to(state_dtype)
    weight = torch.randn(channels, kernel, device=DEVICE, generator=g).to(dtype)
    bias = torch.randn(channels, device=DEVICE, generator=g).to(dtype)
    perm = torch.randperm(batch * n_sets, device=DEVICE, generator=g)
    xs = [torch.randn(batch, channels, device=DEVICE, generator=g).to(dtype) for _ in range(n_sets)]
    slots = [perm[i * batch : (i + 1) * batch] for i in range(n_sets)]
    return cpool, weight, bias, xs, slots


def _conv_calls(fn, cpool, weight, bias, xs, slots, **kw) -> list[Callable[[], object]]:
    calls = [functools.partial(fn, x, weight, bias, cpool, sl, **kw) for x, sl in zip(xs, slots)]
    return calls * max(1, math.ceil(16 / len(xs)))


def _without_triton(fn, *args, **kw):
    """Run fn with the reference functions' Triton dispatch switched off."""
    from glimpse.kernels import triton_ssm_update

    triton_ssm_update.ENABLED = False
    try:
        return fn(*args, **kw)
    finally:
        triton_ssm_update.ENABLED = True


def _bench_ssm_batch(batch, ssm_dtype, dtype, shapes, copy_gbps, reference) -> list[dict]:
    from glimpse.kernels import ssd, triton_ssm_update

    pool, sets, A, D = _ssm_problem(batch, ssm_dtype, dtype, shapes)
    s = shapes
    rows = []
    for op, fn, fused_dt in (
        ("ssm_update", triton_ssm_update.selective_state_update, False),
        ("ssm_update_fused_dt", triton_ssm_update.selective_state_update_fused_dt, True),
    ):
        calls = _ssm_calls(fn, pool, sets, A, D, fused_dt)
        extra = {"eager_ms": time_eager(calls), "sets": len(sets)}
        ms = time_graph(calls)
        if reference and not fused_dt:
            ref_calls = _ssm_calls(ssd.selective_state_update, pool, sets[:8], A, D)[: len(sets[:8])]
            extra["ref_ms"] = _without_triton(time_eager, ref_calls, reps=3)
        nbytes = ssm_bytes(
            batch, ssm_dtype, dtype, s["heads"], s["head_dim"], s["state"], s["groups"], fused_dt
        )
        rows.append(_row(op, batch, ssm_dtype, ms, nbytes, copy_gbps, **extra))
    return rows


def _bench_conv_batch(batch, label_dtype, state_dtype, dtype, channels, kernel, copy_gbps, reference):
    from glimpse.kernels import triton_conv
    from glimpse.kernels.causal_conv1d import causal_conv1d_update as conv_reference

    cpool, weight, bias, xs, slots = _conv_problem(batch, state_dtype, dtype, channels, kernel)
    rows = []
    for op, fn in (
        ("conv_update", triton_conv.causal_conv1d_update),
        ("conv_update_silu", triton_conv.causal_conv1d_update_silu),
    ):
        calls = _conv_calls(fn, cpool, weight, bias, xs, slots)
        extra = {"eager_ms": time_eager(calls), "sets": len(xs)}
        ms = time_graph(calls)
        if reference and op == "conv_update":
            ref_calls = _conv_calls(conv_reference, cpool, weight, bias, xs[:8], slots[:8])[: len(xs[:8])]
            extra["ref_ms"] = _without_triton(time_eager, ref_calls, reps=3)
        nbytes = conv_bytes(batch, state_dtype, dtype, channels, kernel)
        rows.append(_row(op, batch, label_dtype, ms, nbytes, copy_gbps, **extra))
    return rows


def bench_decode_kernels(
    batch_sizes=(1, 16, 64, 256),
    ssm_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype = torch.bfloat16,
    copy_gbps: float | None = None,
    reference: bool = True,
    conv_state_dtype: torch.dtype | None = None,
    shapes: dict | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Time the Triton decode kernels of one Mamba layer; one row per (op, batch).

    ops: `ssm_update` (selective_state_update, dt given), `ssm_update_fused_dt` (softplus in the kernel),
    `conv_update` (pre-activation), `conv_update_silu`. Each row: ms per layer (CUDA graph), eager ms,
    the torch reference's eager ms (`ref_ms`, when `reference`), bytes moved, GB/s, % of the copy floor.
    Conv rows carry the SSM state dtype of the table they belong to; their conv state is `conv_state_dtype`
    (default: `dtype`, as the engine allocates it).
    """
    s = dict(SHAPES_12B, **(shapes or {}))
    channels = s["heads"] * s["head_dim"] + 2 * s["groups"] * s["state"]
    conv_state_dtype = conv_state_dtype or dtype
    if copy_gbps is None:
        copy_gbps = measure_copy_bandwidth()["copy_gbps"]
    rows = []
    for batch in batch_sizes:
        new = _bench_ssm_batch(batch, ssm_dtype, dtype, s, copy_gbps, reference)
        torch.cuda.empty_cache()
        new += _bench_conv_batch(
            batch, ssm_dtype, conv_state_dtype, dtype, channels, s["conv_kernel"], copy_gbps, reference
        )
        torch.cuda.empty_cache()
        if verbose:
            _print_rows(new, header=not rows)
        rows += new
    if verbose:
        print(f"\ncopy bandwidth floor: {copy_gbps:.0f} GB/s")
        _print_rows(rows)
    return rows


def sweep_ssm_configs(
    batch_sizes=(1, 16, 64, 256),
    ssm_dtypes=(torch.float32, torch.bfloat16),
    configs=((8, 2), (8, 4), (16, 2), (16, 4), (16, 8), (32, 4), (32, 8), (64, 8)),
    copy_gbps: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """Time selective_state_update for each (BLOCK_P, num_warps) at the 12B shapes."""
    from glimpse.kernels import triton_ssm_update

    s = SHAPES_12B
    copy_gbps = copy_gbps or measure_copy_bandwidth()["copy_gbps"]
    rows = []
    for ssm_dtype in ssm_dtypes:
        for batch in batch_sizes:
            pool, sets, A, D = _ssm_problem(batch, ssm_dtype, dtype, s)
            nbytes = ssm_bytes(batch, ssm_dtype, dtype, s["heads"], s["head_dim"], s["state"], s["groups"])
            for block_p, warps in configs:
                calls = _ssm_calls(
                    triton_ssm_update.selective_state_update,
                    pool,
                    sets,
                    A,
                    D,
                    block_p=block_p,
                    num_warps=warps,
                )
                ms = time_graph(calls)
                rows.append(_row(f"ssm_update[{block_p},{warps}]", batch, ssm_dtype, ms, nbytes, copy_gbps))
            pool = sets = None
            torch.cuda.empty_cache()
    _print_rows(rows)
    return rows


def sweep_conv_configs(
    batch_sizes=(16, 64, 256),
    configs=((128, 1), (256, 2), (512, 2), (512, 4), (1024, 4), (1024, 8)),
    copy_gbps: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """Time causal_conv1d_update for each (BLOCK_C, num_warps) at the 12B shapes (bf16 state)."""
    from glimpse.kernels import triton_conv

    s = SHAPES_12B
    channels = s["heads"] * s["head_dim"] + 2 * s["groups"] * s["state"]
    kernel = s["conv_kernel"]
    copy_gbps = copy_gbps or measure_copy_bandwidth()["copy_gbps"]
    rows = []
    for batch in batch_sizes:
        problem = _conv_problem(batch, dtype, dtype, channels, kernel)
        nbytes = conv_bytes(batch, dtype, dtype, channels, kernel)
        for block_c, warps in configs:
            calls = _conv_calls(triton_conv.causal_conv1d_update, *problem, block_c=block_c, num_warps=warps)
            ms = time_graph(calls)
            rows.append(_row(f"conv_update[{block_c},{warps}]", batch, dtype, ms, nbytes, copy_gbps))
        problem = None
        torch.cuda.empty_cache()
    _print_rows(rows)
    return rows


# Prompt chunks: the packed varlen conv ---------------------------------------------------------------


def conv_varlen_bytes(tokens, seqs, state_dtype, dtype, channels, kernel) -> int:
    """x read once, y written once, each sequence's state read and written, weight + bias."""
    es, xs = torch.empty(0, dtype=state_dtype).element_size(), torch.empty(0, dtype=dtype).element_size()
    return 2 * tokens * channels * xs + 2 * seqs * (kernel - 1) * channels * es + channels * (kernel + 1) * xs


def _conv_varlen_torch(x, weight, bias, state, cu, slots, init):
    """What the model ran before the kernel: the list-based reference, then silu."""
    from glimpse.kernels.causal_conv1d import causal_conv1d_varlen

    return F.silu(causal_conv1d_varlen(x, weight, bias, state, cu, slots, init))


def bench_conv_varlen(
    tokens=(4096, 32768),
    channels: int = 12288,
    kernel: int = 4,
    seqs: int = 4,
    dtype: torch.dtype = torch.bfloat16,
    state_dtype: torch.dtype | None = None,
    configs=(None,),
    reference: bool = True,
    copy_gbps: float | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Time `triton_conv.causal_conv1d_varlen_silu` (conv + silu + state update of packed prompt chunks)
    against the torch path the model used before (list-based `causal_conv1d_varlen`, then silu).

    Per token count: `seqs` sequences of about equal length (every other one with a cached state), x a
    column slice of a wider in_proj-like output (strided rows, as in the model). `configs`: launch
    configurations (block_t, block_c, num_warps) to time, None for the default. Rows: `ms` (CUDA graph of
    the launches, median), `eager_ms` (CUDA events around eager calls, launch overhead included), bytes
    moved, GB/s, % of the copy floor, `max_err` (max |triton - torch|, both bf16) and, with `reference`,
    the torch path's eager ms in `ref_ms` and as its own row. `batch` (and `tokens`) is the token count.
    """
    from glimpse.kernels import triton_conv

    state_dtype = state_dtype or dtype
    if copy_gbps is None:
        copy_gbps = measure_copy_bandwidth()["copy_gbps"]
    g = torch.Generator(device=DEVICE).manual_seed(3)
    rows = []
    for total in tokens:
        lens = [total // seqs] * seqs
        lens[-1] += total - sum(lens)
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        wide = torch.randn(total, channels + 10368, device=DEVICE, generator=g).to(dtype)  # z | xBC | dt
        x = wide[:, 10240 : 10240 + channels]
        weight = (torch.randn(channels, kernel, device=DEVICE, generator=g) * 0.5).to(dtype)
        bias = torch.randn(channels, device=DEVICE, generator=g).to(dtype)
        pool = torch.randn(4 * seqs, kernel - 1, channels, device=DEVICE, generator=g).to(state_dtype)
        slots_list = list(range(1, 4 * seqs, 4))
        init_list = [i % 2 == 0 for i in range(seqs)]
        cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
        slots = torch.tensor(slots_list, device=DEVICE)
        init = torch.tensor(init_list, device=DEVICE)
        nbytes = conv_varlen_bytes(total, seqs, state_dtype, dtype, channels, kernel)

        pool0 = pool.clone()  # the timed calls update `pool` in place; parity starts from this copy
        y_ref = _conv_varlen_torch(x, weight, bias, pool0.clone(), cu, slots_list, init_list)
        ref_ms = None
        if reference:
            ref_call = functools.partial(_conv_varlen_torch, x, weight, bias, pool, cu, slots_list, init_list)
            ref_ms = _without_triton(time_eager, [ref_call], reps=5)
        new = []
        for cfg in configs:
            bt, bc, warps = cfg or (None, None, None)
            kw = {"block_t": bt, "block_c": bc, "num_warps": warps}
            fn = triton_conv.causal_conv1d_varlen_silu
            call = functools.partial(fn, x, weight, bias, pool, cu_t, slots, init, max(lens), **kw)
            y = fn(x, weight, bias, pool0.clone(), cu_t, slots, init, max(lens), **kw)
            err = (y.float() - y_ref.float()).abs().max().item()
            del y
            extra = {"eager_ms": time_eager([call] * 4), "max_err": err, "tokens": total, "seqs": seqs}
            if ref_ms is not None:
                extra["ref_ms"] = ref_ms
            name = "conv_varlen" if cfg is None else f"conv_varlen[{bt},{bc},{warps}]"
            new.append(_row(name, total, state_dtype, time_graph([call] * 4), nbytes, copy_gbps, **extra))
        if ref_ms is not None:
            torch_row = _row("conv_varlen_torch", total, state_dtype, ref_ms, nbytes, copy_gbps)
            new.append(dict(torch_row, tokens=total, seqs=seqs))
        if verbose:
            _print_rows(new, header=not rows)
            print("max |triton - torch|: " + ", ".join(f"{r['max_err']:.3g}" for r in new if "max_err" in r))
        rows += new
        del wide, x, pool, pool0, y_ref
        torch.cuda.empty_cache()
    return rows


# Parity at full size ----------------------------------------------------------------------------------


def parity_report(batch: int = 64, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> list[dict]:
    """Errors of the kernels against the torch references (run on CPU copies) at the 12B shapes."""
    from glimpse.kernels import triton_conv, triton_ssm_update
    from glimpse.kernels.causal_conv1d import causal_conv1d_update as conv_reference
    from glimpse.kernels.ssd import selective_state_update as ssm_reference

    def err(out, ref):
        out, ref = out.detach().cpu().double(), ref.double()
        d = (out - ref).abs()
        return {
            "max_abs": d.max().item(),
            "rel_norm": (d.norm() / ref.norm()).item(),
            "max_rel": (d / ref.abs().clamp_min(1e-3)).max().item(),
            "exact_frac": (d == 0).double().mean().item(),
            "finite": bool(torch.isfinite(out).all()),
        }

    s = SHAPES_12B
    rows = []
    for ssm_dtype in (torch.float32, torch.bfloat16):
        for fused_dt in (False, True):
            pool, sets, A, D = _ssm_sets(
                batch, ssm_dtype, dtype, s["heads"], s["head_dim"], s["state"], s["groups"], 2, seed
            )
            st = sets[0]
            pool_ref = pool.cpu().clone()
            before = pool.clone()
            cpu = {k: v.cpu() for k, v in st.items()}
            y_ref = ssm_reference(
                cpu["x"], cpu["dt"], A.cpu(), cpu["B"], cpu["C"], D.cpu(), pool_ref, cpu["slots"]
            )
            if fused_dt:
                y = triton_ssm_update.selective_state_update_fused_dt(
                    st["x"], st["dt_raw"], st["dt_bias"], A, st["B"], st["C"], D, pool, st["slots"]
                )
            else:
                y = triton_ssm_update.selective_state_update(
                    st["x"], st["dt"], A, st["B"], st["C"], D, pool, st["slots"]
                )
            torch.cuda.synchronize()
            other = torch.ones(pool.shape[0], dtype=torch.bool)
            other[cpu["slots"]] = False
            untouched = bool(torch.equal(pool.cpu()[other], before.cpu()[other]))
            op = "ssm_update_fused_dt" if fused_dt else "ssm_update"
            sd = str(ssm_dtype).replace("torch.", "")
            rows.append(
                {
                    "op": op,
                    "state_dtype": sd,
                    "what": "y",
                    **err(y, y_ref),
                    "other_slots_untouched": untouched,
                }
            )
            rows.append({"op": op, "state_dtype": sd, "what": "state", **err(pool, pool_ref)})
            del pool, sets, before, pool_ref
    # conv: against the bf16 torch reference and against a float64 evaluation
    ch = s["heads"] * s["head_dim"] + 2 * s["groups"] * s["state"]
    k = s["conv_kernel"]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(batch, ch, device=DEVICE, generator=g).to(dtype)
    w = (torch.randn(ch, k, device=DEVICE, generator=g) * 0.5).to(dtype)
    b = torch.randn(ch, device=DEVICE, generator=g).to(dtype)
    cpool = torch.randn(3 * batch, k - 1, ch, device=DEVICE, generator=g).to(dtype)
    slots = torch.randperm(3 * batch, device=DEVICE, generator=g)[:batch]
    ref_pool = cpool.cpu().clone()
    pool64 = cpool.cpu().double()
    y_ref = conv_reference(x.cpu(), w.cpu(), b.cpu(), ref_pool, slots.cpu())
    y64 = conv_reference(x.cpu().double(), w.cpu().double(), b.cpu().double(), pool64, slots.cpu())
    p2 = cpool.clone()
    y = triton_conv.causal_conv1d_update(x, w, b, cpool, slots)
    ys = triton_conv.causal_conv1d_update_silu(x, w, b, p2, slots)
    rows.append({"op": "conv_update", "state_dtype": "bfloat16", "what": "y vs bf16 torch", **err(y, y_ref)})
    rows.append({"op": "conv_update", "state_dtype": "bfloat16", "what": "y vs float64", **err(y, y64)})
    rows.append(
        {"op": "conv_update", "state_dtype": "bfloat16", "what": "bf16 torch vs float64", **err(y_ref, y64)}
    )
    rows.append({"op": "conv_update", "state_dtype": "bfloat16", "what": "state", **err(cpool, ref_pool)})
    rows.append(
        {"op": "conv_update_silu", "state_dtype": "bfloat16", "what": "y vs float64", **err(ys, F.silu(y64))}
    )
    print(f"\nparity at the 12B shapes, batch {batch}, inputs {dtype} (reference: torch on CPU)")
    print(f"{'op':<22}{'state':<10}{'what':<24}{'max abs':>11}{'rel (norm)':>12}{'exact':>8}")
    for r in rows:
        print(
            f"{r['op']:<22}{r['state_dtype']:<10}{r['what']:<24}{r['max_abs']:>11.3e}{r['rel_norm']:>12.3e}"
            f"{100 * r['exact_frac']:>7.1f}%"
            + ("" if r.get("other_slots_untouched", True) else "  OTHER SLOTS CHANGED")
        )
    return rows


# Output ----------------------------------------------------------------------------------------------


def _print_rows(rows: list[dict], header: bool = True) -> None:
    if header:
        print(
            f"\n{'op':<24}{'batch':>6}{'state':>10}{'ms/layer':>10}{'eager ms':>10}{'torch ms':>10}"
            f"{'MB moved':>10}{'GB/s':>8}{'% floor':>9}"
        )
    for r in rows:
        eager = f"{r['eager_ms']:.4f}" if "eager_ms" in r else "-"
        ref = f"{r['ref_ms']:.4f}" if "ref_ms" in r else "-"
        print(
            f"{r['op']:<24}{r['batch']:>6}{r['state_dtype']:>10}{r['ms']:>10.4f}{eager:>10}{ref:>10}"
            f"{r['bytes'] / 1e6:>10.2f}{r['gbps']:>8.0f}{r['pct_floor']:>8.1f}%"
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-parity", action="store_true")
    args = ap.parse_args(argv)
    props = torch.cuda.get_device_properties(0)
    results: dict = {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None

    def save():
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))

    bw = measure_copy_bandwidth()
    results["bandwidth"] = bw
    print(
        f"{results['device']}: copy {bw['copy_gbps']:.0f} GB/s, in-place scale {bw['inplace_scale_gbps']:.0f} GB/s"
    )
    save()
    if not args.no_parity:
        results["parity"] = parity_report()
        save()
    if not args.no_sweep:
        results["sweep_ssm"] = sweep_ssm_configs(copy_gbps=bw["copy_gbps"])
        save()
        results["sweep_conv"] = sweep_conv_configs(copy_gbps=bw["copy_gbps"])
        save()
    results["bench"] = {}
    for ssm_dtype in (torch.float32, torch.bfloat16):
        name = str(ssm_dtype).replace("torch.", "")
        print(f"\n=== state {name}")
        results["bench"][name] = bench_decode_kernels(
            tuple(args.batch_sizes), ssm_dtype=ssm_dtype, copy_gbps=bw["copy_gbps"], verbose=True
        )
        save()
    print(f"\nsummary ({results['device']}, copy floor {bw['copy_gbps']:.0f} GB/s):")
    _print_rows([r for rows in results["bench"].values() for r in rows])


if __name__ == "__main__":
    main()


# Paged decode attention ------------------------------------------------------------------------------


def bench_decode_attention(
    batches=(1, 8, 64, 256),
    context: int = 1100,
    heads: int = 40,
    kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    table_blocks: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    copy_gbps: float | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Microseconds per call of the Triton paged decode attention (kernels/triton_attention.py) at the
    real model's attention shapes, every sequence `context` keys long; one row per batch size.

    Row: `auto_splits` (what `choose_num_splits` picks, i.e. what the model runs; 1 = single pass),
    `split_us` (the split-KV path with `num_splits`, default max(2, auto_splits), so it is timed even where
    the heuristic keeps the single pass), `single_us` (the single-pass kernel), `auto_us` (whichever of the
    two the heuristic picks), `floor_us` (the K/V bytes read, over the copy bandwidth), `speedup`
    (single / split) and `pct_floor` (floor / auto). The tables are `table_blocks` wide (default: just
    enough for `context`; a captured graph of the engine has its full max-length width, which the split
    count follows). Same method as the Mamba rows: sets of caches cycled to defeat L2, calls captured in
    a CUDA graph (`time_graph`).

        from glimpse.bench.kernels import bench_decode_attention
        rows = bench_decode_attention()                      # batches 1, 8, 64, 256 at 1,100 keys
        rows = bench_decode_attention((1, 4), context=8000, table_blocks=512, num_splits=32)
    """
    from glimpse.kernels import triton_attention as ta

    if copy_gbps is None:
        copy_gbps = measure_copy_bandwidth()["copy_gbps"]
    elsize = torch.empty((), dtype=dtype).element_size()
    need = -(-context // block_size)
    width = max(table_blocks or need, need)
    tile = block_n or ta.tile_tokens(dtype, head_dim)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    scale = head_dim**-0.5
    rows = []
    for batch in batches:
        pool_set_bytes = 2 * batch * need * block_size * kv_heads * head_dim * elsize
        n_sets = _n_sets(pool_set_bytes)
        n_blocks = n_sets * batch * need + 1  # the last block pads the tables past `need`
        kc = torch.randn(n_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=dtype)
        vc = torch.randn_like(kc)
        perm = torch.randperm(n_blocks - 1, device=DEVICE).to(torch.int32).view(n_sets, batch, need)
        tables = torch.full((n_sets, batch, width), n_blocks - 1, dtype=torch.int32, device=DEVICE)
        tables[:, :, :need] = perm
        lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
        qs = [torch.randn(batch, heads, head_dim, device=DEVICE, dtype=dtype) for _ in range(n_sets)]
        auto = ta.choose_num_splits(batch, kv_heads, width, block_size, tile, sms)
        splits = num_splits or max(2, auto)

        def calls(n, qs=qs, kc=kc, vc=vc, tables=tables, lens=lens):
            fn = functools.partial(ta.paged_decode_attention, num_splits=n, block_n=block_n)
            return [functools.partial(fn, q, kc, vc, tables[i], lens, scale) for i, q in enumerate(qs)]

        split_ms = time_graph(calls(splits))
        single_ms = time_graph(calls(1))
        auto_ms = single_ms if auto == 1 else (split_ms if auto == splits else time_graph(calls(auto)))
        kv_bytes = 2 * batch * context * kv_heads * head_dim * elsize
        floor_us = kv_bytes / (copy_gbps * 1e9) * 1e6
        row = {
            "op": "paged_decode_attention",
            "batch": batch,
            "context": context,
            "table_blocks": width,
            "block_n": tile,
            "auto_splits": auto,
            "splits": splits,
            "split_us": split_ms * 1e3,
            "single_us": single_ms * 1e3,
            "auto_us": auto_ms * 1e3,
            "floor_us": floor_us,
            "kv_bytes": kv_bytes,
            "speedup": single_ms / split_ms,
            "pct_floor": 100.0 * floor_us / (auto_ms * 1e3),
        }
        rows.append(row)
        if verbose:
            if len(rows) == 1:
                print(
                    f"\n{'batch':>6}{'context':>8}{'auto':>6}{'splits':>7}{'split us':>10}{'single us':>11}"
                    f"{'auto us':>9}{'floor us':>10}{'speedup':>9}{'% floor':>9}"
                )
            print(
                f"{batch:>6}{context:>8}{auto:>6}{splits:>7}{row['split_us']:>10.1f}{row['single_us']:>11.1f}"
                f"{row['auto_us']:>9.1f}{floor_us:>10.2f}{row['speedup']:>9.2f}{row['pct_floor']:>8.1f}%"
            )
            sys.stdout.flush()
        del kc, vc, tables, qs
        torch.cuda.empty_cache()
    return rows
