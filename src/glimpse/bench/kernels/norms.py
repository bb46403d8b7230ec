"""The Triton RMS norms (kernels/triton_norms.py) at the 12B's shapes: ms per call and GB/s of each, for
each `num_warps`, against the torch references of kernels/norms.py, all replayed from CUDA graphs.

    python -m glimpse.bench.kernels.norms      # JSON lines on stdout
"""

from __future__ import annotations

import functools
import json

import torch

from glimpse.bench.timing import time_graph
from glimpse.kernels import backend, norms, triton_norms


def _graph_ms(fn, reps: int = 50, calls: int = 20) -> float:
    """Median ms per call of `calls` back-to-back calls of `fn` in one CUDA graph."""
    return time_graph([fn] * calls, reps=reps).ms


def bench_norms(
    rows=(1, 64, 256),
    hidden: int = 5120,
    d_inner: int = 10240,
    groups: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    warps=(None, 4, 8, 16),
    eps: float = 1e-5,
    device: str = "cuda",
) -> list[dict]:
    """ms per call and GB/s (minimal bytes: inputs read once, outputs written once) of each norm at 12B
    shapes, Triton (each `num_warps`; None = the default) against the torch reference, CUDA graphs.

    Shapes as the model has them: the gate z is a column slice of in_proj's [rows, 22656] output; the
    weights are in the activation dtype (a bf16 checkpoint). Also reports the largest difference from the
    reference (in units of the output's bf16 ulp when bf16) so that a run on the card doubles as a check.
    """

    def reference(fn, *args):
        """The torch reference on the same CUDA tensors (the public norms dispatch to Triton otherwise)."""

        def call():
            with backend.torch_only():
                return fn(*args)

        return call

    dev = device
    g = torch.Generator(device=dev).manual_seed(0)
    esize = torch.finfo(dtype).bits // 8
    results = []
    for T in rows:
        x = torch.randn(T, hidden, device=dev, generator=g).to(dtype)
        d = torch.randn(T, hidden, device=dev, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(hidden, device=dev, generator=g)).to(dtype)
        proj = torch.randn(T, d_inner + 12288 + 128, device=dev, generator=g).to(dtype)
        z = proj[:, :d_inner]
        xm = torch.randn(T, d_inner, device=dev, generator=g).to(dtype)
        wm = (1 + 0.1 * torch.randn(d_inner, device=dev, generator=g)).to(dtype)
        # (Triton call taking num_warps, torch reference, minimal bytes moved)
        cases = {
            "rms_norm": (
                functools.partial(triton_norms.rms_norm, x, w, eps),
                reference(norms.rms_norm, x, w, eps),
                (2 * T * hidden + hidden) * esize,
            ),
            "add_rms_norm": (
                functools.partial(triton_norms.add_rms_norm, x, d, w, eps),
                reference(norms.add_rms_norm, x, d, w, eps),
                (4 * T * hidden + hidden) * esize,
            ),
            "gated_rms_norm": (
                functools.partial(triton_norms.gated_rms_norm, xm, z, wm, groups, eps),
                reference(norms.gated_rms_norm, xm, z, wm, groups, eps),
                (3 * T * d_inner + d_inner) * esize,
            ),
        }
        for name, (tri, torch_fn, nbytes) in cases.items():
            out, expect = tri(num_warps=None), torch_fn()
            if isinstance(out, tuple):
                out, expect = out[1], expect[1]
            diff = (out.float() - expect.float()).abs()
            ulp = (
                (2.0 ** (torch.floor(torch.log2(expect.float().abs().clamp_min(1e-30))) - 7))
                if dtype == torch.bfloat16
                else expect.float().abs().clamp_min(1e-30) * torch.finfo(dtype).eps
            )
            row = {
                "op": name,
                "rows": T,
                "dtype": str(dtype).removeprefix("torch."),
                "bytes": nbytes,
                "max_err_ulps": (diff / ulp).max().item(),
                "frac_exact": (diff == 0).float().mean().item(),
                "torch_ms": _graph_ms(torch_fn),
            }
            row["torch_gbps"] = nbytes / (row["torch_ms"] * 1e-3) / 1e9
            for nw in warps:
                key = "triton" if nw is None else f"triton_w{nw}"
                ms = _graph_ms(functools.partial(tri, num_warps=nw))
                row[f"{key}_ms"] = ms
                row[f"{key}_gbps"] = nbytes / (ms * 1e-3) / 1e9
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
            results.append(row)
    return results


if __name__ == "__main__":
    for r in bench_norms():
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}))
