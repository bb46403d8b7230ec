"""The Triton paged prefill attention (kernels/triton_prefill_attention.py) at the 12B's attention shapes:
ms and TFLOP/s per launch configuration against the torch path of kernels/attention.py.

    python -m glimpse.bench.kernels.prefill_attention
"""

from __future__ import annotations

import torch

from glimpse.bench.timing import time_eager
from glimpse.kernels.attention import paged_attention
from glimpse.kernels.triton_prefill_attention import paged_prefill_attention


def prefill_flops(chunk: int, context: int, heads: int, head_dim: int) -> int:
    """Useful FLOPs of one sequence's chunk: QK^T and PV over the keys each token sees (2 x 2 x H x D each)."""
    keys_seen = chunk * context + chunk * (chunk + 1) // 2
    return 4 * heads * head_dim * keys_seen


def bench_prefill_attention(
    chunk: int = 8192,
    context=(0, 8192, 24576),
    heads: int = 40,
    kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    configs=(None, (128, 128, 8, 3), (128, 64, 8, 2), (128, 32, 8, 4), (64, 64, 4, 3), (64, 128, 8, 3)),
    reference: bool = True,
    reps: int = 10,
    device: str = "cuda",
    verbose: bool = True,
) -> list[dict]:
    """ms per call and achieved TFLOP/s of paged_prefill_attention for one sequence's `chunk` new tokens on
    top of each `context` length (12B shapes by default: 40 heads over 8 KV heads, head_dim 128, block 16),
    for each launch config (BLOCK_M, BLOCK_N, num_warps, num_stages; None = default_config), and of the
    torch path in kernels/attention.py (`torch_ms`, `torch_tflops`; context 0 takes its SDPA-causal
    branch). Block tables are a random permutation of the pool, as after churn. Each row also carries the
    largest |difference| from the torch path. Median of `reps` CUDA-event timed calls after a warm-up.
    """
    g = torch.Generator(device=device).manual_seed(0)
    scale = head_dim**-0.5
    rows = []
    for ctx in context:
        total = ctx + chunk
        num_blocks = -(-total // block_size) + 8
        pool_shape = (num_blocks, block_size, kv_heads, head_dim)
        key_cache = torch.randn(pool_shape, device=device, generator=g).to(dtype)
        value_cache = torch.randn(pool_shape, device=device, generator=g).to(dtype)
        perm = torch.randperm(num_blocks, device=device, generator=g)
        tables = perm[: -(-total // block_size)][None, :].to(torch.int64)
        query = torch.randn(chunk, heads, head_dim, device=device, generator=g).to(dtype)
        pos = torch.arange(ctx, total, device=device)
        slots = tables[0, pos // block_size] * block_size + pos % block_size
        key = key_cache.view(-1, kv_heads, head_dim)[slots]
        value = value_cache.view(-1, kv_heads, head_dim)[slots]
        cu = torch.tensor([0, chunk], dtype=torch.int32, device=device)
        ctx_t = torch.tensor([ctx], dtype=torch.int32, device=device)
        flops = prefill_flops(chunk, ctx, heads, head_dim)
        label = str(dtype).removeprefix("torch.")
        row = {"chunk": chunk, "context": ctx, "dtype": label, "gflop": flops / 1e9}
        expect = None
        if reference:

            def torch_path(q=query, kc=key_cache, vc=value_cache, tables=tables, ctx=ctx, k=key, v=value):
                return paged_attention(q, kc, vc, tables, [chunk], [ctx], scale, k, v)

            try:
                expect = torch_path()
                row["torch_ms"] = time_eager(torch_path, reps=reps, device=device).ms
                row["torch_tflops"] = flops / (row["torch_ms"] * 1e-3) / 1e12
            except torch.cuda.OutOfMemoryError as e:  # its gathered keys and dense mask may not fit
                row["torch_error"] = f"OutOfMemoryError: {str(e)[:120]}"
                torch.cuda.empty_cache()
        for cfg in configs:
            kw = {} if cfg is None else dict(zip(("block_m", "block_n", "num_warps", "num_stages"), cfg))
            name = "triton" if cfg is None else "triton_m{}_n{}_w{}_s{}".format(*cfg)

            def call(kw=kw, query=query, key_cache=key_cache, value_cache=value_cache, tables=tables,
                     cu=cu, ctx_t=ctx_t):  # fmt: skip
                return paged_prefill_attention(
                    query, key_cache, value_cache, tables, cu, ctx_t, chunk, scale, **kw
                )

            try:
                out = call()
                ms = time_eager(call, reps=reps, device=device).ms
            except Exception as e:  # a config that does not fit (shared memory) is reported, not fatal
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                continue
            row[f"{name}_ms"] = ms
            row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
            if expect is not None:
                row[f"{name}_max_diff"] = (out.float() - expect.float()).abs().max().item()
        if "torch_ms" in row and "triton_ms" in row:
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
        if verbose:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
        del key_cache, value_cache, query, key, value, expect
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    bench_prefill_attention()
