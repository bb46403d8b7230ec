"""Parity of the Triton paged prefill attention (kernels/triton_prefill_attention.py) with a plain torch
reference: each sequence's keys gathered from the block pool, an explicit lower-right causal mask, softmax
in fp32.

Runs on CUDA only (skipped elsewhere, so CPU CI needs no Triton). For debugging on a CPU, set
TRITON_INTERPRET=1 and GLIMPSE_TEST_INTERPRET=1: the same checks then run on CPU tensors through the Triton
interpreter (which truncates fp32 -> bf16 instead of rounding; the bf16 tolerances allow for it). Shapes
are small (head_dim 32/64, a few heads) to keep the interpreter run short.

Every cache slot that no sequence owns, and every slot of a sequence past its length, holds NaN, and the
block tables' unused tail points at NaN blocks: any read past a sequence's keys shows up as NaN output.
The references run on CPU copies of the inputs.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.triton_device import triton_test_device  # noqa: E402

DEVICE = triton_test_device()
_INTERPRET = DEVICE == "cpu"

from glimpse.kernels import attention as torch_attention  # noqa: E402
from glimpse.kernels import backend  # noqa: E402
from glimpse.kernels import triton_prefill_attention as tpa  # noqa: E402

BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one ulp is at most 2^-7 of the value
# (rtol, atol) of the kernel's output against the fp32 reference computed from the same (rounded) inputs.
# fp32: ieee dots on CUDA, numpy in the interpreter; only summation order differs.
# bf16: the output is rounded to bf16 (one ulp, rtol) and P is rounded to bf16 before the PV product
# (relative 2^-8, 2^-7 when the interpreter truncates, of each weight; on values ~N(0, 1) that stays
# well inside 1e-2 absolute).
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (BF16_ULP, 1e-2)}

# (context, new tokens) per sequence: context 0, one new token, lengths off the block size and off
# BLOCK_M, a chunk spanning several query blocks, contexts ending mid-block and on a block boundary, and
# (49, 40), whose full query blocks end their causal range exactly on a BLOCK_N boundary
MIXED = [(0, 37), (5, 1), (16, 16), (23, 50), (70, 3), (0, 1), (31, 70), (48, 17), (49, 40)]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def _close(out: torch.Tensor, expect: torch.Tensor, rtol: float, atol: float) -> float:
    """Assert |out - expect| <= atol + rtol |expect| everywhere (NaN fails); return the max abs error."""
    assert out.shape == expect.shape, (out.shape, expect.shape)
    o, e = _cpu(out).double(), _cpu(expect).double()
    assert torch.isfinite(o).all(), "non-finite output: a read past a sequence's keys, or an unwritten row"
    diff = (o - e).abs()
    bad = diff > atol + rtol * e.abs()
    worst = diff.max().item()
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements off; max abs error {worst:.3g}"
    return worst


def _case(seqs, heads, kv_heads, head_dim, block_size, dtype, seed=0, spare_blocks=5, table_pad=3):
    """Packed queries, a NaN-filled pool holding each sequence's context + new keys in shuffled blocks, and
    the step's metadata. Returns a dict of device tensors plus host `query_lens` / `context_lens`."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // block_size) for c, n in seqs]
    width = max(need) + table_pad
    num_blocks = sum(need) + spare_blocks
    key_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=g)
    owned, free = perm[: sum(need)], perm[sum(need) :]
    tables = torch.empty(len(seqs), width, dtype=torch.int64)
    used = 0
    for s, ((c, n), nb) in enumerate(zip(seqs, need)):
        tables[s, :nb] = owned[used : used + nb]
        # the unused tail points at blocks nobody owns (all NaN), never at an out-of-range id
        tables[s, nb:] = free[torch.randint(len(free), (width - nb,), generator=g)]
        used += nb
        total = c + n
        pos = torch.arange(total)
        blk, off = tables[s, pos // block_size], pos % block_size
        key_cache[blk, off] = torch.randn(total, kv_heads, head_dim, generator=g)
        value_cache[blk, off] = torch.randn(total, kv_heads, head_dim, generator=g)
    T = sum(n for _, n in seqs)
    query = torch.randn(T, heads, head_dim, generator=g)
    query_lens = [n for _, n in seqs]
    context_lens = [c for c, _ in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    return {
        "query": query.to(dtype).to(DEVICE),
        "key_cache": key_cache.to(dtype).to(DEVICE),
        "value_cache": value_cache.to(dtype).to(DEVICE),
        "block_tables": tables.to(DEVICE),
        "cu_query_lens": cu.to(DEVICE),
        "context_lens": torch.tensor(context_lens, dtype=torch.int32).to(DEVICE),
        "query_lens": query_lens,
        "context_lens_host": context_lens,
    }


def reference(query, key_cache, value_cache, block_tables, query_lens, context_lens, scale) -> torch.Tensor:
    """fp32 on CPU: gather each sequence's keys 0..context + n - 1, mask key j > context + i, softmax."""
    query, key_cache, value_cache, block_tables = map(_cpu, (query, key_cache, value_cache, block_tables))
    T, H, D = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = H // kv_heads
    out = torch.zeros(T, H, D)
    start = 0
    for s, (n, c) in enumerate(zip(query_lens, context_lens)):
        total = c + n
        pos = torch.arange(total)
        blk, off = block_tables[s, pos // block_size], pos % block_size
        k = key_cache[blk, off].float().repeat_interleave(group, dim=1)  # [total, H, D]
        v = value_cache[blk, off].float().repeat_interleave(group, dim=1)
        q = query[start : start + n].float()  # [n, H, D]
        scores = torch.einsum("ihd,jhd->hij", q, k) * scale  # [H, n, total]
        visible = pos[None, :] <= (c + torch.arange(n))[:, None]  # [n, total]: lower-right aligned
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start : start + n] = torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v)
        start += n
    return out


def _run(case, scale, max_query_len=None, **launch):
    return tpa.paged_prefill_attention(
        case["query"],
        case["key_cache"],
        case["value_cache"],
        case["block_tables"],
        case["cu_query_lens"],
        case["context_lens"],
        max(case["query_lens"]) if max_query_len is None else max_query_len,
        scale,
        **launch,
    )


def _check(case, out, scale, dtype) -> float:
    expect = reference(
        case["query"],
        case["key_cache"],
        case["value_cache"],
        case["block_tables"],
        case["query_lens"],
        case["context_lens_host"],
        scale,
    )
    assert out.dtype == dtype
    return _close(out.float(), expect, *TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_m,block_n",
    [
        (5, 1, 32, 16, 16),  # GQA group 5; BLOCK_N = block_size
        (5, 1, 32, 32, 32),  # BLOCK_N two cache blocks
        (2, 2, 64, 64, 32),  # group 1 (MHA); every chunk inside one query block
        (6, 2, 32, 16, 64),  # group 3; BLOCK_N wider than BLOCK_M
    ],
)
def test_mixed_sequences(dtype, heads, kv_heads, head_dim, block_m, block_n):
    case = _case(MIXED, heads, kv_heads, head_dim, 16, dtype, seed=heads * 7 + head_dim)
    scale = head_dim**-0.5
    out = _run(case, scale, block_m=block_m, block_n=block_n, num_warps=4, num_stages=2)
    _check(case, out, scale, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_default_config(dtype):
    """No launch overrides: default_config's choice (BLOCK_M 64/128 here, as on the GPU)."""
    seqs = [(40, 130), (0, 9), (17, 1)]
    case = _case(seqs, 5, 1, 32, 16, dtype, seed=3)
    out = _run(case, 0.3)
    _check(case, out, 0.3, dtype)


def test_single_token_chunks_and_long_context():
    """New length 1 everywhere (a decode-shaped step) and contexts over many blocks, with block 32."""
    seqs = [(0, 1), (1, 1), (31, 1), (32, 1), (250, 1)]
    case = _case(seqs, 5, 1, 32, 32, torch.bfloat16, seed=11)
    out = _run(case, 32**-0.5, block_m=16, block_n=64, num_warps=4, num_stages=2)
    _check(case, out, 32**-0.5, torch.bfloat16)


def test_metadata_variants():
    """int64 cu_query_lens (as ForwardBatch has it) and int32 block tables; a strided query (a slice of a
    wider projection); an empty sequence; a grid sized past the longest chunk; a block table with a
    padding row past the last sequence."""
    seqs = [(9, 20), (0, 0), (30, 33)]
    case = _case(seqs, 4, 2, 32, 16, torch.bfloat16, seed=5)
    T, H, D = case["query"].shape
    wide = torch.randn(T, H * D + 24, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    wide = wide.to(DEVICE)
    wide[:, 8 : 8 + H * D] = case["query"].reshape(T, H * D)
    case["query"] = wide[:, 8 : 8 + H * D].view(T, H, D)
    assert not case["query"].is_contiguous()
    case["cu_query_lens"] = case["cu_query_lens"].to(torch.int64)
    tables = case["block_tables"].to(torch.int32)
    case["block_tables"] = torch.cat([tables, torch.full_like(tables[:1], -1)])  # never read
    out = _run(case, 0.2, max_query_len=64, block_m=16, block_n=16, num_warps=4, num_stages=2)
    _check(case, out, 0.2, torch.bfloat16)


def test_matches_torch_path():
    """The same numbers as the torch path in kernels/attention.py that it is meant to replace."""
    case = _case(MIXED, 5, 1, 32, 16, torch.float32, seed=21, table_pad=0)
    scale = 32**-0.5
    out = _run(case, scale, block_m=32, block_n=32, num_warps=4, num_stages=2)
    # the torch path gathers whole blocks, so give it a pool without NaN (the kernel's own NaN check is above)
    kc, vc = (torch.nan_to_num(_cpu(case[k]), nan=0.0) for k in ("key_cache", "value_cache"))
    tables = _cpu(case["block_tables"])
    q = _cpu(case["query"])
    expect = torch_attention.paged_attention(
        q, kc, vc, tables, case["query_lens"], case["context_lens_host"], scale
    )
    _close(out, expect, *TOL[torch.float32])


def test_available(monkeypatch):
    """The shape rule both paged attention kernels share (`attention.use_triton`, which the dispatch in
    `paged_attention` reads), and the GLIMPSE_TRITON switch it reads (`backend.ENABLED`)."""
    t = torch.empty(3, 4, 64, device=DEVICE)
    assert not torch_attention.use_triton(t.cpu(), 16)
    if DEVICE == "cuda":
        assert torch_attention.use_triton(t, 16)
        assert not torch_attention.use_triton(t, 12)  # block size not a power of 2
        assert not torch_attention.use_triton(torch.empty(3, 4, 8, device=DEVICE), 16)  # head_dim under 16
        monkeypatch.setattr(backend, "ENABLED", False)  # GLIMPSE_TRITON=0
        assert not torch_attention.use_triton(t, 16)


@pytest.mark.skipif(DEVICE != "cuda", reason="the dispatch takes Triton on CUDA tensors only")
def test_paged_attention_dispatch(monkeypatch):
    """`attention.paged_attention` runs this kernel for prompt chunks on CUDA, and the torch path once
    GLIMPSE_TRITON is off; both give the same numbers."""
    calls = []
    real = tpa.paged_prefill_attention
    monkeypatch.setattr(tpa, "paged_prefill_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = _case(MIXED[:4], 4, 2, 32, 16, torch.float32, seed=5, table_pad=0)
    # the torch path gathers whole blocks, so give it a pool without NaN (as in test_matches_torch_path)
    kc, vc = (torch.nan_to_num(case[k], nan=0.0) for k in ("key_cache", "value_cache"))
    prefill_tensors = (case["cu_query_lens"], None, case["context_lens"])  # as ForwardBatch.prefill_tensors()

    def run():
        return torch_attention.paged_attention(
            case["query"], kc, vc, case["block_tables"], case["query_lens"], case["context_lens_host"],
            32**-0.5, prefill_tensors=prefill_tensors,
        )  # fmt: skip

    out = run()
    assert calls == [1]
    monkeypatch.setattr(backend, "ENABLED", False)
    expect = run()
    assert calls == [1]
    _close(out, expect, *TOL[torch.float32])


def test_rejects_bad_inputs():
    case = _case([(3, 5)], 4, 2, 32, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        _run(dict(case, key_cache=case["key_cache"].float(), value_cache=case["value_cache"].float()), 0.2)
    with pytest.raises(ValueError, match="multiple of the cache block size"):
        _run(case, 0.2, block_n=24)
    with pytest.raises(ValueError, match="group"):
        _run(dict(case, query=case["query"][:, :3]), 0.2)
