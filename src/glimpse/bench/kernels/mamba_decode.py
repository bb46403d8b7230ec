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
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from glimpse.bench.kernels.common import (
    DEVICE,
    SHAPES_12B,
    conv_channels,
    dtype_name,
    measure_copy_bandwidth,
    print_rows,
)
from glimpse.bench.kernels.conv import bench_conv_update, sweep_conv_configs
from glimpse.bench.kernels.ssm_update import bench_ssm_update, ssm_sets, sweep_ssm_configs
from glimpse.kernels import backend, causal_conv1d, ssd, triton_conv, triton_ssm_update


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
    channels, kernel = conv_channels(s), s["conv_kernel"]
    conv_state_dtype = conv_state_dtype or dtype
    if copy_gbps is None:
        copy_gbps = measure_copy_bandwidth()["copy_gbps"]
    rows = []
    for batch in batch_sizes:
        new = bench_ssm_update(batch, ssm_dtype, dtype, s, copy_gbps, reference)
        torch.cuda.empty_cache()
        new += bench_conv_update(
            batch, ssm_dtype, conv_state_dtype, dtype, channels, kernel, copy_gbps, reference
        )
        torch.cuda.empty_cache()
        if verbose:
            print_rows(new, header=not rows)
        rows += new
    if verbose:
        print(f"\ncopy bandwidth floor: {copy_gbps:.0f} GB/s")
        print_rows(rows)
    return rows


# Parity at full size ----------------------------------------------------------------------------------


def parity_report(batch: int = 64, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> list[dict]:
    """Errors of the kernels against the torch references (run on CPU copies) at the 12B shapes."""
    ssm_reference, conv_reference = ssd.selective_state_update, causal_conv1d.causal_conv1d_update

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
            pool, sets, A, D = ssm_sets(
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
            sd = dtype_name(ssm_dtype)
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
    ch = conv_channels(s)
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
        "triton": backend.triton.__version__ if backend.HAS_TRITON else None,
    }

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
        name = dtype_name(ssm_dtype)
        print(f"\n=== state {name}")
        results["bench"][name] = bench_decode_kernels(
            tuple(args.batch_sizes), ssm_dtype=ssm_dtype, copy_gbps=bw["copy_gbps"], verbose=True
        )
        save()
    print(f"\nsummary ({results['device']}, copy floor {bw['copy_gbps']:.0f} GB/s):")
    print_rows([r for rows in results["bench"].values() for r in rows])


if __name__ == "__main__":
    main()
