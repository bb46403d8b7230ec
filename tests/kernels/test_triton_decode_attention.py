"""The Triton paged decode attention (kernels/triton_attention.py), single-pass and split-KV paths,
against a plain torch reference: each sequence's keys and values gathered from its blocks, softmax in
float64.

Runs on CUDA, or on a CPU through Triton's interpreter with TRITON_INTERPRET=1 GLIMPSE_TEST_INTERPRET=1
(skipped otherwise, so CPU CI needs no Triton). Every cache block a sequence doesn't own, and every slot
past its length in its last block, holds NaN, and table entries past the length point at a NaN block: a
single read of them would turn the output into NaN.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.triton_device import triton_test_device

DEVICE = triton_test_device()

from glimpse.kernels import triton_attention as ta  # noqa: E402

BLOCK_SIZE = 16
# (rtol, atol) per element, and the bound on the relative error norm
TOL = {torch.float32: (1e-5, 1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2, 1e-2)}


def _problem(lengths, kv_heads, group, head_dim, dtype, width=None, table_dtype=torch.int32, seed=0):
    """Query, caches, tables and lengths for sequences of `lengths` keys; the tables are `width` blocks
    wide (default: two more than the longest sequence needs) and the blocks are scattered through the pool."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    need = [-(-n // BLOCK_SIZE) for n in lengths]
    width = width or max(need) + 2
    assert width >= max(need)
    n_blocks = sum(need) + 3  # 3 blocks nobody owns
    shape = (n_blocks, BLOCK_SIZE, kv_heads, head_dim)
    kc = torch.full(shape, float("nan"))
    vc = torch.full(shape, float("nan"))
    order = torch.randperm(n_blocks, generator=gen)
    nan_block = int(order[-1])
    tables = torch.full((B, width), nan_block, dtype=torch.int64)
    used = 0
    for b, (n, k) in enumerate(zip(lengths, need)):
        blocks = order[used : used + k]
        used += k
        tables[b, :k] = blocks
        for i, blk in enumerate(blocks.tolist()):
            filled = min(BLOCK_SIZE, n - i * BLOCK_SIZE)
            kc[blk, :filled] = torch.randn(filled, kv_heads, head_dim, generator=gen)
            vc[blk, :filled] = torch.randn(filled, kv_heads, head_dim, generator=gen)
    q = torch.randn(B, kv_heads * group, head_dim, generator=gen)
    to = dict(device=DEVICE)
    return (
        q.to(dtype).to(**to),
        kc.to(dtype).to(**to),
        vc.to(dtype).to(**to),
        tables.to(table_dtype).to(**to),
        torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
    )


def _reference(q, kc, vc, tables, lengths, scale):
    """[B, H, D] float64: every sequence's keys gathered from its blocks, plain softmax."""
    q, kc, vc, tables = q.cpu().double(), kc.cpu().double(), vc.cpu().double(), tables.cpu().long()
    B, H, D = q.shape
    group = H // kc.shape[2]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        blocks = tables[b, : -(-n // BLOCK_SIZE)]
        k = kc[blocks].flatten(0, 1)[:n].repeat_interleave(group, dim=1)  # [n, H, D]
        v = vc[blocks].flatten(0, 1)[:n].repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b], k) * scale, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
    return out


def _check(out, ref, dtype):
    rtol, atol, rel = TOL[dtype]
    assert out.dtype == dtype
    o = out.cpu().double()
    assert torch.isfinite(o).all(), "non-finite output: a masked key or an unwritten row was read"
    err = ((o - ref).norm() / ref.norm()).item()
    assert err < rel, err
    torch.testing.assert_close(o, ref, rtol=rtol, atol=atol)


MIXED = [1, 15, 16, 17, 200, 33, 2, 64, 65, 100, 31, 48, 49, 1, 130, 16, 7, 90, 18, 3, 250, 63, 5, 80]
MIXED_33 = (MIXED * 2)[:33]


@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
@pytest.mark.parametrize(
    "lengths, kv_heads, group, head_dim, dtype",
    [
        ([1100], 2, 5, 128, torch.bfloat16),
        ([1100], 1, 5, 128, torch.float32),
        ([1, 17, 200], 2, 1, 64, torch.float32),
        ([15, 16, 1100], 1, 5, 64, torch.bfloat16),
        (MIXED_33, 1, 5, 64, torch.float32),
        (MIXED_33, 2, 1, 128, torch.bfloat16),
    ],
    ids=[
        "b1-bf16-g5-d128",
        "b1-fp32-g5-d128",
        "b3-fp32-g1-d64",
        "b3-bf16-g5-d64",
        "b33-fp32-g5-d64",
        "b33-bf16-g1-d128",
    ],
)
def test_matches_reference(lengths, kv_heads, group, head_dim, dtype, num_splits):
    q, kc, vc, tables, lens = _problem(lengths, kv_heads, group, head_dim, dtype)
    scale = head_dim**-0.5
    out = ta.paged_decode_attention(q, kc, vc, tables, lens, scale, num_splits=num_splits)
    _check(out, _reference(q, kc, vc, tables, lens, scale), dtype)


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_split_equals_single_pass_and_empty_splits(table_dtype):
    """More splits than a sequence has tiles: most ranges are empty and write neutral partials. Split and
    single pass agree to fp32 rounding; the tables are read as int32 or int64 (the engine's)."""
    lengths = [1, 5, 64, 65, 300]
    q, kc, vc, tables, lens = _problem(lengths, 2, 5, 64, torch.float32, width=40, table_dtype=table_dtype)
    scale = 0.3  # sharper than 1/sqrt(D): the running max matters
    ref = _reference(q, kc, vc, tables, lens, scale)
    single = ta.paged_decode_attention(q, kc, vc, tables, lens, scale, num_splits=1)
    split = ta.paged_decode_attention(q, kc, vc, tables, lens, scale, num_splits=16)
    _check(single, ref, torch.float32)
    _check(split, ref, torch.float32)
    torch.testing.assert_close(split, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_n", [16, 32, 64])
def test_tile_sizes(block_n):
    """Tiles of one block, and tiles spanning 2 and 4 blocks (each key looks up its own block)."""
    lengths = [1, 40, 129, 333]
    q, kc, vc, tables, lens = _problem(lengths, 2, 5, 64, torch.float32, seed=3)
    out = ta.paged_decode_attention(q, kc, vc, tables, lens, 0.125, num_splits=4, block_n=block_n)
    _check(out, _reference(q, kc, vc, tables, lens, 0.125), torch.float32)


def test_choose_num_splits():
    sms = 132
    # the real model at batch 1, 1,100 tokens: 69 blocks, 18 tiles of 64 keys -> 18 splits (144 programs)
    assert ta.choose_num_splits(1, 8, 69, 16, 64, sms) == 18
    # a wide table (the engine's max model length): enough splits for 2 programs per SM
    assert ta.choose_num_splits(1, 8, 512, 16, 64, sms) == 33
    assert ta.choose_num_splits(8, 8, 69, 16, 64, sms) == 5
    assert ta.choose_num_splits(32, 8, 69, 16, 64, sms) == 2
    # enough programs already, or a table too narrow to split: single pass
    assert ta.choose_num_splits(33, 8, 69, 16, 64, sms) == 1
    assert ta.choose_num_splits(64, 8, 69, 16, 64, sms) == 1
    assert ta.choose_num_splits(1, 8, 4, 16, 64, sms) == 1
    assert ta.choose_num_splits(1, 8, 8, 16, 64, sms) == 2
    # never more than MAX_SPLITS
    assert ta.choose_num_splits(1, 1, 10_000, 16, 64, sms) == ta.MAX_SPLITS
    assert ta.tile_tokens(torch.bfloat16, 128) == 64
    assert ta.tile_tokens(torch.float32, 128) == 32
    assert ta.tile_tokens(torch.float32, 64) == 64


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_cuda_graph_replay_with_new_lengths_and_tables(num_splits):
    """Capture one call, then change lengths and table contents in place and replay: the split count was
    fixed at capture, the ranges follow the new lengths."""
    kv_heads, group, head_dim, dtype = 2, 5, 128, torch.bfloat16
    first = [40, 3, 700]
    second = [1000, 17, 1]
    width = 70
    q, kc, vc, tables, lens = _problem(
        first, kv_heads, group, head_dim, dtype, width=width, table_dtype=torch.int64
    )
    q2, kc2, vc2, tables2, lens2 = _problem(second, kv_heads, group, head_dim, dtype, width=width, seed=5)
    # one pool big enough for either problem; the graph reads the static tensors
    n_blocks = max(kc.shape[0], kc2.shape[0])
    kpool = torch.full((n_blocks, *kc.shape[1:]), float("nan"), dtype=dtype, device="cuda")
    vpool = torch.full_like(kpool, float("nan"))
    kpool[: kc.shape[0]] = kc
    vpool[: vc.shape[0]] = vc
    scale = head_dim**-0.5
    call = lambda: ta.paged_decode_attention(q, kpool, vpool, tables, lens, scale, num_splits=num_splits)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    graph.replay()
    torch.cuda.synchronize()
    _check(out, _reference(q, kpool, vpool, tables, lens, scale), dtype)

    kpool.fill_(float("nan"))
    vpool.fill_(float("nan"))
    kpool[: kc2.shape[0]] = kc2
    vpool[: vc2.shape[0]] = vc2
    q.copy_(q2)
    tables.copy_(tables2)
    lens.copy_(lens2)
    graph.replay()
    torch.cuda.synchronize()
    _check(out, _reference(q, kpool, vpool, tables, lens, scale), dtype)
