"""The Mamba2 decode state update (`ssd.selective_state_update`, and the variant with softplus(dt) in the
kernel) at the 12B's shapes: CUDA-graph and eager ms per layer against the copy floor, the torch reference,
and a sweep of the kernel's launch configurations."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from glimpse.bench.kernels.common import DEVICE, SHAPES_12B, measure_copy_bandwidth, print_rows, row
from glimpse.bench.timing import at_least, sets_over_l2, time_eager, time_graph
from glimpse.kernels import backend, ssd, triton_ssm_update


def ssm_sets(batch, ssm_dtype, dtype, heads, head_dim, state, groups, n_sets, seed=0):
    """A state pool and `n_sets` independent decode inputs (x, B, C as strided views of one activation, as
    the mixer has them), each set's slots scattered through the pool."""
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


def _problem(batch, ssm_dtype, dtype, shapes, seed=0):
    s = shapes
    per_set = batch * s["heads"] * s["head_dim"] * s["state"] * torch.empty(0, dtype=ssm_dtype).element_size()
    n_sets = sets_over_l2(per_set)
    return ssm_sets(batch, ssm_dtype, dtype, s["heads"], s["head_dim"], s["state"], s["groups"], n_sets, seed)


def _calls(fn, pool, sets, A, D, fused_dt=False, **kw) -> list[Callable[[], object]]:
    """One call per set, each a partial of `fn` on that set's tensors."""
    calls = []
    for st in sets:
        dt_args = (st["dt_raw"], st["dt_bias"]) if fused_dt else (st["dt"],)
        calls.append(
            functools.partial(fn, st["x"], *dt_args, A, st["B"], st["C"], D, pool, st["slots"], **kw)
        )
    return calls


def bench_ssm_update(batch, ssm_dtype, dtype, shapes, copy_gbps, reference) -> list[dict]:
    """Rows `ssm_update` (dt given) and `ssm_update_fused_dt` (softplus in the kernel) at one batch size;
    with `reference`, the torch reference's eager ms (`ref_ms`) beside the first."""
    pool, sets, A, D = _problem(batch, ssm_dtype, dtype, shapes)
    s = shapes
    rows = []
    for op, fn, fused_dt in (
        ("ssm_update", triton_ssm_update.selective_state_update, False),
        ("ssm_update_fused_dt", triton_ssm_update.selective_state_update_fused_dt, True),
    ):
        calls = at_least(_calls(fn, pool, sets, A, D, fused_dt))
        extra = {"eager_ms": time_eager(calls).ms, "sets": len(sets)}
        ms = time_graph(calls).ms
        if reference and not fused_dt:
            ref_calls = _calls(ssd.selective_state_update, pool, sets[:8], A, D)
            with backend.torch_only():
                extra["ref_ms"] = time_eager(ref_calls, reps=3).ms
        nbytes = ssm_bytes(
            batch, ssm_dtype, dtype, s["heads"], s["head_dim"], s["state"], s["groups"], fused_dt
        )
        rows.append(row(op, batch, ssm_dtype, ms, nbytes, copy_gbps, **extra))
    return rows


def sweep_ssm_configs(
    batch_sizes=(1, 16, 64, 256),
    ssm_dtypes=(torch.float32, torch.bfloat16),
    configs=((8, 2), (8, 4), (16, 2), (16, 4), (16, 8), (32, 4), (32, 8), (64, 8)),
    copy_gbps: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """Time selective_state_update for each (BLOCK_P, num_warps) at the 12B shapes."""
    s = SHAPES_12B
    copy_gbps = copy_gbps or measure_copy_bandwidth()["copy_gbps"]
    rows = []
    for ssm_dtype in ssm_dtypes:
        for batch in batch_sizes:
            pool, sets, A, D = _problem(batch, ssm_dtype, dtype, s)
            nbytes = ssm_bytes(batch, ssm_dtype, dtype, s["heads"], s["head_dim"], s["state"], s["groups"])
            for block_p, warps in configs:
                calls = _calls(
                    triton_ssm_update.selective_state_update,
                    pool,
                    sets,
                    A,
                    D,
                    block_p=block_p,
                    num_warps=warps,
                )
                ms = time_graph(at_least(calls)).ms
                rows.append(row(f"ssm_update[{block_p},{warps}]", batch, ssm_dtype, ms, nbytes, copy_gbps))
            pool = sets = None
            torch.cuda.empty_cache()
    print_rows(rows)
    return rows
