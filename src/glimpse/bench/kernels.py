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

SHAPES_12B = {"heads": 128, "head_dim": 80, "state": 128, "groups": 8, "conv_kernel": 4}
SET_BYTES = 320 << 20  # aim for this much state over all sets (L2 is 50 MB on an H100)
DEVICE = "cuda"


# Timing ----------------------------------------------------------------------------------------------


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def time_graph(calls: list[Callable[[], object]], reps: int = 20, warmup: int = 3) -> float:
    """Median ms per call: the calls captured once in a CUDA graph, the graph replayed `reps` times."""
    for c in calls:  # compile and warm outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = _events()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(calls)


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
