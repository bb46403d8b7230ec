"""The Triton paged decode attention (kernels/triton_attention.py) at the real model's attention shapes:
single pass against split KV, beside the floor of reading the K/V once at copy bandwidth."""

from __future__ import annotations

import functools
import sys

import torch

from glimpse.bench.kernels.common import DEVICE, measure_copy_bandwidth
from glimpse.bench.timing import sets_over_l2, time_graph
from glimpse.kernels import triton_attention as ta


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

        from glimpse.bench.kernels.decode_attention import bench_decode_attention
        rows = bench_decode_attention()                      # batches 1, 8, 64, 256 at 1,100 keys
        rows = bench_decode_attention((1, 4), context=8000, table_blocks=512, num_splits=32)
    """
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
        n_sets = sets_over_l2(pool_set_bytes)
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

        split_ms = time_graph(calls(splits)).ms
        single_ms = time_graph(calls(1)).ms
        auto_ms = single_ms if auto == 1 else (split_ms if auto == splits else time_graph(calls(auto)).ms)
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
