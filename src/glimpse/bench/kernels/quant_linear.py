"""GPU micro-benchmark of the quantised linear layers at the 12B model's shapes: bf16 `torch.matmul`
against FP8 (`torch._scaled_mm`, alone and as `fp8_linear` with its activation quantisation) and NVFP4
(the Triton W4A16 kernel's variants: split-K, tiled, dequantise + cuBLAS), for decode (M = 1, 16, 64 rows)
and prefill (M = 4096).

Method: for every (layer, M) each implementation gets several copies of its weights, together well over
the L2 cache, and the calls cycle through them, so that every call reads its weights from HBM as a decode
step does; the calls are captured in a CUDA graph (no launch gaps) and the median of many replays is
divided by the calls in it. GB/s counts the weight bytes only (what bounds a decode step: E4M3 scales
included for NVFP4); TFLOP/s counts 2·M·N·K. Each implementation's output is checked once against its
torch reference (largest error / largest |reference|; one bf16 rounding is about 2^-9 = 2e-3, FP8's
activation quantisation adds its own). A device-to-device copy (bytes read + written) is
measured first as the bandwidth ceiling.

    python -m glimpse.bench.kernels.quant_linear             # all layers, M = 1 16 64 4096
    python -m glimpse.bench.kernels.quant_linear --m 1 16 --layers in_proj kv --sweep --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from glimpse.bench.timing import sets_over_l2, time_graph
from glimpse.kernels import backend, triton_fp8, triton_nvfp4
from glimpse.kernels.quant_formats import dequantize_fp8, dequantize_nvfp4, quantize_fp8, quantize_nvfp4
from glimpse.kernels.quant_linear import fp8_linear, quantize_input_fp8
from glimpse.kernels.triton_nvfp4 import LaunchConfig

# name: (K = in features, N = out features) of the 12B language model's linear layers
LAYERS_12B = {
    "in_proj": (5120, 22656),  # Mamba: z, x, B, C, dt in one matrix
    "out_proj": (10240, 5120),
    "mlp_up": (5120, 20480),
    "mlp_down": (20480, 5120),
    "q": (5120, 5120),
    "kv": (5120, 1024),  # k and v each
    "o": (5120, 5120),
}
ROWS = (1, 16, 64, 4096)
DEVICE = "cuda"

# a few launch configurations per variant for --sweep
SWEEP = {
    "splitk": [
        LaunchConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w)
        for bm in (1, 16)
        for bn, bk, w in ((32, 128, 4), (64, 128, 4), (64, 256, 4), (128, 128, 8), (64, 256, 8))
    ],
    "rows": [
        LaunchConfig(block_m=1, block_n=bn, block_k=bk, num_warps=w)
        for bn, bk, w in ((8, 256, 4), (16, 512, 4), (32, 256, 4), (16, 256, 8), (32, 512, 8), (64, 128, 4))
    ]
    + [
        LaunchConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
        for bm in (16, 64)
        for bn, bk, w, st in ((32, 128, 4, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 256, 4, 2))
    ],
    "dequant_rows": [
        LaunchConfig(block_m=0, block_n=bn, block_k=bk, num_warps=w)
        for bn, bk, w in ((8, 512, 4), (32, 256, 4), (64, 128, 4), (16, 1024, 8), (64, 512, 8), (128, 256, 8))
    ],
    "tiled": [
        LaunchConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            (64, 128, 64, 4, 3),
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (128, 128, 128, 8, 2),
            (64, 64, 128, 4, 4),
        )
    ],
}


def _time_ms(calls) -> float:
    """Median ms per call of the calls in one CUDA graph."""
    return time_graph(calls, reps=30).ms


def copy_gbps(nbytes: int = 2 << 30) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_graph([lambda: dst.copy_(src)], reps=20).ms / 1e6


def _copies(tensors: tuple[torch.Tensor, ...], nbytes: int) -> list[tuple[torch.Tensor, ...]]:
    """The tensors and enough clones of them (at other addresses) to keep the calls' weights out of L2."""
    n = sets_over_l2(nbytes, hi=256)
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def _row(layer, m, k, n, impl, ms, weight_bytes, err, **extra) -> dict:
    return {
        "layer": layer, "M": m, "K": k, "N": n, "impl": impl, "us": round(ms * 1e3, 2),
        "weight_GBps": round(weight_bytes / ms / 1e6, 1), "TFLOPs": round(2 * m * n * k / ms / 1e9, 2),
        "rel_err": err, **extra,
    }  # fmt: skip


def bench_layer(layer: str, m: int, sweep: bool = False, seed: int = 0) -> list[dict]:
    """Rows (one per implementation, and per configuration with `sweep`) for one layer at M rows."""
    k, n = LAYERS_12B[layer]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = torch.randn(n, k, device=DEVICE, generator=g) / k**0.5
    x = torch.randn(m, k, device=DEVICE, generator=g).bfloat16()
    rows = []

    # bf16
    sets = _copies((w.bfloat16(),), 2 * n * k)
    ref = x.float() @ sets[0][0].float().T
    err = _error(torch.matmul(x, sets[0][0].T), ref)
    ms = _time_ms([lambda s=s: torch.matmul(x, s[0].T) for s in sets])
    rows.append(_row(layer, m, k, n, "bf16_matmul", ms, 2 * n * k, err))

    # FP8: the matmul alone on pre-quantised activations, and the op (activation quantisation included)
    weight, s_w = quantize_fp8(w)
    s_in = x.float().abs().max() / 448
    xq = quantize_input_fp8(x, s_in)
    ref = (xq.float() @ dequantize_fp8(weight, 1.0).T) * (s_in * s_w)
    sets = _copies((weight, s_w), n * k)

    def scaled_mm(s):
        return torch._scaled_mm(xq, s[0].t(), scale_a=s_in, scale_b=s[1], out_dtype=torch.bfloat16)

    err = _error(scaled_mm(sets[0]), ref)
    ms = _time_ms([lambda s=s: scaled_mm(s) for s in sets])
    rows.append(_row(layer, m, k, n, "fp8_scaled_mm", ms, n * k, err))
    err = _error(fp8_linear(x, weight, s_w, s_in), ref)
    ms = _time_ms([lambda s=s: fp8_linear(x, s[0], s[1], s_in) for s in sets])
    rows.append(_row(layer, m, k, n, "fp8_linear", ms, n * k, err))
    err = _error(quantize_input_fp8(x, s_in).float(), triton_fp8.quantize_input(x, s_in).float())
    ms = _time_ms([lambda: triton_fp8.quantize_input(x, s_in)])
    rows.append(_row(layer, m, k, n, "fp8_quantize_input", ms, 3 * m * k, err))
    del sets, weight

    # NVFP4 (W4A16)
    packed, scale, scale_2 = quantize_nvfp4(w)
    nbytes = n * k // 2 + n * k // 16
    ref = x.float() @ dequantize_nvfp4(packed, scale, scale_2).T
    sets = _copies((packed, scale, scale_2), nbytes)
    for variant in nvfp4_variants(m):
        configs = [None]
        if sweep and variant in SWEEP:
            configs += [
                c
                for c in SWEEP[variant]
                if variant in ("tiled", "dequant_rows") or (c.block_m == 1) == (m == 1)
            ]
        for cfg in configs:

            def call(s, variant=variant, cfg=cfg):
                return triton_nvfp4.nvfp4_matmul(x, *s, variant=variant, config=cfg)

            err = _error(call(sets[0]), ref)
            ms = _time_ms([lambda s=s: call(s) for s in sets])
            used = cfg or triton_nvfp4.default_config(variant, m)
            rows.append(_row(layer, m, k, n, f"nvfp4_{variant}", ms, nbytes, err, config=used.__dict__))
    return rows


def nvfp4_variants(m: int) -> list[str]:
    """The kernel variants worth timing at M rows: split-K and rows up to DECODE_MAX_ROWS, tiled from 16
    rows on, the two dequantise + cuBLAS variants beyond DECODE_MAX_ROWS."""
    variants = ["splitk", "rows"] if m <= triton_nvfp4.DECODE_MAX_ROWS else []
    variants += ["tiled"] if m >= 16 else []
    variants += ["dequant", "dequant_rows"] if m > triton_nvfp4.DECODE_MAX_ROWS else []
    return variants


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", default=list(LAYERS_12B), choices=list(LAYERS_12B))
    ap.add_argument("--m", type=int, nargs="+", default=list(ROWS), help="rows (tokens) per call")
    ap.add_argument("--sweep", action="store_true", help="also time the NVFP4 kernel's SWEEP configurations")
    ap.add_argument("--json", default=None, help="write every row to this file")
    args = ap.parse_args(argv)
    head = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": backend.triton.__version__,
        "copy_GBps": round(copy_gbps(), 1),
    }
    print(json.dumps(head))
    print(f"{'layer':>9} {'M':>5} {'impl':>16} {'us':>9} {'weight GB/s':>11} {'TFLOP/s':>8} {'rel err':>9}")
    rows = []
    for layer in args.layers:
        for m in args.m:
            for r in bench_layer(layer, m, sweep=args.sweep):
                rows.append(r)
                cfg = r.get("config")
                tag = (
                    f" {cfg['block_m']}x{cfg['block_n']}x{cfg['block_k']} w{cfg['num_warps']}" if cfg else ""
                )
                print(
                    f"{layer:>9} {m:>5} {r['impl']:>16} {r['us']:>9.2f} {r['weight_GBps']:>11.0f} "
                    f"{r['TFLOPs']:>8.1f} {r['rel_err']:>9.2e}{tag}",
                    flush=True,
                )
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
