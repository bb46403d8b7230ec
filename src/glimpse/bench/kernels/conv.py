"""The Mamba2 causal conv at the 12B's shapes: the decode update (`causal_conv1d_update`, and with silu
fused) per layer against the copy floor and the torch reference, a sweep of its launch configurations,
and the packed prompt-chunk conv (`causal_conv1d_varlen_silu`) against the list-based torch path."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from glimpse.bench.kernels.common import (
    DEVICE,
    SHAPES_12B,
    conv_channels,
    measure_copy_bandwidth,
    print_rows,
    row,
)
from glimpse.bench.timing import at_least, sets_over_l2, time_eager, time_graph
from glimpse.kernels import backend, causal_conv1d, triton_conv


def conv_bytes(batch, state_dtype, dtype, channels, kernel) -> int:
    """Fewest bytes one decode conv update must move: the window state read and written, x in, y out,
    weight and bias."""
    es, xs = torch.empty(0, dtype=state_dtype).element_size(), torch.empty(0, dtype=dtype).element_size()
    return 2 * batch * (kernel - 1) * channels * es + 2 * batch * channels * xs + channels * (kernel + 1) * xs


def _problem(batch, state_dtype, dtype, channels, kernel, seed=1):
    per_set = batch * (kernel - 1) * channels * torch.empty(0, dtype=state_dtype).element_size()
    n_sets = sets_over_l2(per_set, hi=256)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    cpool = torch.randn(batch * n_sets, kernel - 1, channels, device=DEVICE, generator=g).to(state_dtype)
    weight = torch.randn(channels, kernel, device=DEVICE, generator=g).to(dtype)
    bias = torch.randn(channels, device=DEVICE, generator=g).to(dtype)
    perm = torch.randperm(batch * n_sets, device=DEVICE, generator=g)
    xs = [torch.randn(batch, channels, device=DEVICE, generator=g).to(dtype) for _ in range(n_sets)]
    slots = [perm[i * batch : (i + 1) * batch] for i in range(n_sets)]
    return cpool, weight, bias, xs, slots


def _calls(fn, cpool, weight, bias, xs, slots, **kw) -> list[Callable[[], object]]:
    """One call per input set."""
    return [functools.partial(fn, x, weight, bias, cpool, sl, **kw) for x, sl in zip(xs, slots)]


def bench_conv_update(batch, label_dtype, state_dtype, dtype, channels, kernel, copy_gbps, reference):
    """Rows `conv_update` (pre-activation) and `conv_update_silu` at one batch size, labelled with
    `label_dtype` (the SSM state dtype of the table they go in); with `reference`, the torch reference's
    eager ms (`ref_ms`) beside the first."""
    cpool, weight, bias, xs, slots = _problem(batch, state_dtype, dtype, channels, kernel)
    rows = []
    for op, fn in (
        ("conv_update", triton_conv.causal_conv1d_update),
        ("conv_update_silu", triton_conv.causal_conv1d_update_silu),
    ):
        calls = at_least(_calls(fn, cpool, weight, bias, xs, slots))
        extra = {"eager_ms": time_eager(calls).ms, "sets": len(xs)}
        ms = time_graph(calls).ms
        if reference and op == "conv_update":
            ref_calls = _calls(causal_conv1d.causal_conv1d_update, cpool, weight, bias, xs[:8], slots[:8])
            with backend.torch_only():
                extra["ref_ms"] = time_eager(ref_calls, reps=3).ms
        nbytes = conv_bytes(batch, state_dtype, dtype, channels, kernel)
        rows.append(row(op, batch, label_dtype, ms, nbytes, copy_gbps, **extra))
    return rows


def sweep_conv_configs(
    batch_sizes=(16, 64, 256),
    configs=((128, 1), (256, 2), (512, 2), (512, 4), (1024, 4), (1024, 8)),
    copy_gbps: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """Time causal_conv1d_update for each (BLOCK_C, num_warps) at the 12B shapes (bf16 state)."""
    channels = conv_channels(SHAPES_12B)
    kernel = SHAPES_12B["conv_kernel"]
    copy_gbps = copy_gbps or measure_copy_bandwidth()["copy_gbps"]
    rows = []
    for batch in batch_sizes:
        problem = _problem(batch, dtype, dtype, channels, kernel)
        nbytes = conv_bytes(batch, dtype, dtype, channels, kernel)
        for block_c, warps in configs:
            calls = _calls(triton_conv.causal_conv1d_update, *problem, block_c=block_c, num_warps=warps)
            ms = time_graph(at_least(calls)).ms
            rows.append(row(f"conv_update[{block_c},{warps}]", batch, dtype, ms, nbytes, copy_gbps))
        problem = None
        torch.cuda.empty_cache()
    print_rows(rows)
    return rows


# Prompt chunks: the packed varlen conv ---------------------------------------------------------------


def conv_varlen_bytes(tokens, seqs, state_dtype, dtype, channels, kernel) -> int:
    """x read once, y written once, each sequence's state read and written, weight + bias."""
    es, xs = torch.empty(0, dtype=state_dtype).element_size(), torch.empty(0, dtype=dtype).element_size()
    return 2 * tokens * channels * xs + 2 * seqs * (kernel - 1) * channels * es + channels * (kernel + 1) * xs


def _conv_varlen_torch(x, weight, bias, state, cu, slots, init):
    """What the model ran before the kernel: the list-based reference, then silu."""
    return F.silu(causal_conv1d.causal_conv1d_varlen(x, weight, bias, state, cu, slots, init))


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
            with backend.torch_only():
                ref_ms = time_eager(ref_call).ms
        new = []
        for cfg in configs:
            bt, bc, warps = cfg or (None, None, None)
            kw = {"block_t": bt, "block_c": bc, "num_warps": warps}
            fn = triton_conv.causal_conv1d_varlen_silu
            call = functools.partial(fn, x, weight, bias, pool, cu_t, slots, init, max(lens), **kw)
            y = fn(x, weight, bias, pool0.clone(), cu_t, slots, init, max(lens), **kw)
            err = (y.float() - y_ref.float()).abs().max().item()
            del y
            extra = {"eager_ms": time_eager([call] * 4).ms, "max_err": err, "tokens": total, "seqs": seqs}
            if ref_ms is not None:
                extra["ref_ms"] = ref_ms
            name = "conv_varlen" if cfg is None else f"conv_varlen[{bt},{bc},{warps}]"
            new.append(row(name, total, state_dtype, time_graph([call] * 4).ms, nbytes, copy_gbps, **extra))
        if ref_ms is not None:
            torch_row = row("conv_varlen_torch", total, state_dtype, ref_ms, nbytes, copy_gbps)
            new.append(dict(torch_row, tokens=total, seqs=seqs))
        if verbose:
            print_rows(new, header=not rows)
            print("max |triton - torch|: " + ", ".join(f"{r['max_err']:.3g}" for r in new if "max_err" in r))
        rows += new
        del wide, x, pool, pool0, y_ref
        torch.cuda.empty_cache()
    return rows
