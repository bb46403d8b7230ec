"""What the kernel benchmarks share: the 12B's Mamba shapes, the copy-bandwidth floor a memory-bound kernel
is judged against (measured on the same card in the same process), and the result rows and their table.

Floor of a kernel = (bytes it must move) / (copy bandwidth), the copy bandwidth being a large
device-to-device copy: bytes read + bytes written over its time.
"""

from __future__ import annotations

import functools
import sys

import torch

from glimpse.bench.timing import time_eager

SHAPES_12B = {"heads": 128, "head_dim": 80, "state": 128, "groups": 8, "conv_kernel": 4}
DEVICE = "cuda"


def conv_channels(shapes: dict) -> int:
    """The Mamba conv's channels: x, B and C side by side."""
    return shapes["heads"] * shapes["head_dim"] + 2 * shapes["groups"] * shapes["state"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
        ms = time_eager(fn, reps=reps, warmup=3).ms
        out[f"{name}_gbps"] = 2 * nbytes / (ms * 1e-3) / 1e9
        out[f"{name}_ms"] = ms
    out["bytes"] = nbytes
    del src, dst
    torch.cuda.empty_cache()
    return out


def row(op, batch, state_dtype, ms, nbytes, copy_gbps, **extra) -> dict:
    """One result: ms per call, bytes moved, GB/s and its share of the copy floor."""
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {
        "op": op,
        "batch": batch,
        "state_dtype": dtype_name(state_dtype),
        "ms": ms,
        "bytes": nbytes,
        "gbps": gbps,
        "floor_ms": nbytes / (copy_gbps * 1e9) * 1e3,
        "pct_floor": 100.0 * gbps / copy_gbps,
        **extra,
    }


def print_rows(rows: list[dict], header: bool = True) -> None:
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
