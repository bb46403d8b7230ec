"""The vectorised packed SSD scan against the torch reference (`ssd_chunk_scan_varlen`, loops over chunks).

Runs on CPU (both implementations are plain torch). Errors are measured relative to the largest reference
value (max |out - ref| / max |ref|): fp32 results must agree to 1e-5; results rounded to bf16 (outputs of
bf16 inputs, bf16 state pools) to within one bf16 rounding of each element. A CUDA-only test at the
12B's shapes checks the dispatch from `ssd_chunk_scan_varlen` when a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from glimpse.bench.kernels.ssd import bench_ssd
from glimpse.kernels.ssd import ssd_chunk_scan_varlen as reference
from glimpse.kernels.ssd_vectorized import ssd_chunk_scan_varlen_vectorized
from tests.kernels.fixtures import _one_thread  # noqa: F401  (autouse: one CPU thread)
from tests.kernels.ssd_inputs import ssd_inputs

BF16_ULP = 2.0**-7  # one bf16 rounding changes a value by at most 2^-8 of it; two (either side) by 2^-7


def _lengths(Q: int) -> list[int]:
    # shorter than a chunk, exactly one chunk, a few chunks and a remainder, length 1, not a multiple
    return [Q // 2 + 1, 1, 3 * Q + 2, Q, max(2 * Q - 3, 1), 5]


def _inputs(lens, H, G, P, N, dtype, state_dtype, seed=0, dt_shift=0.0, a_shift=0.0, extra_slots=3):
    return ssd_inputs(lens, H, G, P, N, dtype, state_dtype, seed, dt_shift, a_shift, extra_slots)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _check_bf16(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Each element within one bf16 rounding step of the reference (both start from the same fp32 maths)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all()
    tol = BF16_ULP * ref.abs() + 1e-6 * ref.abs().max()
    assert ((out - ref).abs() <= tol).all(), float(((out - ref).abs() - tol).max())


def _compare(args, pool, cu, slots, init, Q, chunk_group=None, **kw):
    ref_pool, pool_out = pool.clone(), pool.clone()
    y_ref = reference(*args, ref_pool, cu, slots, init, Q)
    y = ssd_chunk_scan_varlen_vectorized(*args, pool_out, cu, slots, init, Q, chunk_group=chunk_group, **kw)
    assert y.dtype == args[0].dtype and y.shape == args[0].shape
    others = [i for i in range(pool.shape[0]) if i not in slots]
    assert torch.equal(pool_out[others], pool[others]), "slots of other sequences changed"
    return y, y_ref, pool_out[slots], ref_pool[slots]


CASES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("Q", [4, 16, 128])
@pytest.mark.parametrize("G", [1, 2, 8])
@pytest.mark.parametrize("dtype,state_dtype", CASES, ids=["fp32", "bf16-in", "bf16-all"])
@pytest.mark.parametrize("chunk_group", [None, 2])
def test_matches_reference(Q, G, dtype, state_dtype, chunk_group):
    H, P, N = 16, 8, 16
    args, pool, cu, slots, init = _inputs(_lengths(Q), H, G, P, N, dtype, state_dtype, seed=Q * 10 + G)
    y, y_ref, st, st_ref = _compare(args, pool, cu, slots, init, Q, chunk_group=chunk_group)
    if dtype == torch.float32:
        assert _rel(y, y_ref) <= 1e-5
    else:
        _check_bf16(y, y_ref)
    if state_dtype == torch.float32:  # fp32 maths on identical (possibly bf16-valued) inputs
        assert _rel(st, st_ref) <= 1e-5
    else:
        _check_bf16(st, st_ref)


@pytest.mark.parametrize("chunk_group", [1, 3, 7, None])
def test_group_carry_long_sequences(chunk_group):
    """Sequences spanning many chunk groups: the state carried from group to group."""
    Q, H, G, P, N = 8, 16, 4, 4, 8
    lens = [83, 8, 1, 40, 57, 3]
    args, pool, cu, slots, init = _inputs(lens, H, G, P, N, torch.float32, torch.float32, seed=7)
    y, y_ref, st, st_ref = _compare(args, pool, cu, slots, init, Q, chunk_group=chunk_group)
    assert _rel(y, y_ref) <= 1e-5
    assert _rel(st, st_ref) <= 1e-5


def test_group_bytes_budget_splits():
    """A tiny byte budget forces one chunk per group through the default (non-override) path."""
    Q, H, G, P, N = 4, 16, 2, 4, 8
    args, pool, cu, slots, init = _inputs([9, 1, 14], H, G, P, N, torch.float32, torch.float32, seed=3)
    y, y_ref, st, st_ref = _compare(args, pool, cu, slots, init, Q, group_bytes=1)
    assert _rel(y, y_ref) <= 1e-5
    assert _rel(st, st_ref) <= 1e-5


def test_strong_decay_does_not_overflow():
    """Chunk log-decays of hundreds: exp of the (masked) upper triangle would overflow if taken."""
    Q, H, G, P, N = 16, 16, 2, 4, 8
    args, pool, cu, slots, init = _inputs(
        [50, 16, 7], H, G, P, N, torch.float32, torch.float32, seed=11, dt_shift=3.0, a_shift=1.5
    )
    assert (args[1] * -args[2]).sum(0).max() > 200  # the decay really is strong
    y, y_ref, st, st_ref = _compare(args, pool, cu, slots, init, Q, chunk_group=2)
    assert _rel(y, y_ref) <= 1e-5
    assert _rel(st, st_ref) <= 1e-5


def test_empty_sequences():
    """A sequence of length 0 keeps its initial state (or gets zeros), as the reference does."""
    Q, H, G, P, N = 4, 16, 8, 4, 8
    args, pool, cu, slots, init = _inputs([6, 0, 3, 0], H, G, P, N, torch.float32, torch.float32, seed=5)
    init = [True, True, False, False]
    y, y_ref, st, st_ref = _compare(args, pool, cu, slots, init, Q)
    assert _rel(y, y_ref) <= 1e-5
    assert torch.equal(st[1], pool[slots[1]]) and not st[3].any()
    assert _rel(st, st_ref) <= 1e-5
    args, pool, cu, slots, init = _inputs([0, 0], H, G, P, N, torch.float32, torch.float32, seed=6)
    _compare(args, pool, cu, slots, [True, False], Q)


def test_strided_inputs_and_grad_mode():
    """As the mixer calls it: x, B, C are views into one split projection; A and D are parameters."""
    Q, H, G, P, N = 16, 16, 2, 4, 8
    args, pool, cu, slots, init = _inputs([20, 1, 33], H, G, P, N, torch.bfloat16, torch.float32, seed=9)
    x, dt, A, B, C, D = args
    T = x.shape[0]
    xBC = torch.cat([x.reshape(T, -1), B.reshape(T, -1), C.reshape(T, -1)], dim=1)
    xs, Bs, Cs = xBC.split([H * P, G * N, G * N], dim=-1)
    xs, Bs, Cs = xs.view(T, H, P), Bs.view(T, G, N), Cs.view(T, G, N)
    assert not xs.is_contiguous()
    A, D = torch.nn.Parameter(A), torch.nn.Parameter(D)
    y, y_ref, st, st_ref = _compare((xs, dt, A, Bs, Cs, D), pool, cu, slots, init, Q)
    _check_bf16(y, y_ref)
    assert _rel(st, st_ref) <= 1e-5


def test_plan_cache_across_layers_and_batches():
    """Layers of one forward reuse the cached chunk plan; a new batch (slots, flags) gets a new one."""
    Q, H, G, P, N = 8, 16, 2, 4, 8
    lens = [13, 1, 20]
    layout = None
    for seed, flip in [(20, False), (21, False), (22, True)]:
        args, pool, cu, slots, init = _inputs(lens, H, G, P, N, torch.float32, torch.float32, seed=seed)
        slots, init = layout = layout or (slots, init)  # same batch layout, new data
        if flip:
            init = [not b for b in init]
        y, y_ref, st, st_ref = _compare(args, pool, cu, slots, init, Q)
        assert _rel(y, y_ref) <= 1e-5 and _rel(st, st_ref) <= 1e-5


def test_rejects_shared_slots():
    args, pool, cu, slots, init = _inputs([3, 4], 16, 2, 4, 8, torch.float32, torch.float32)
    with pytest.raises(ValueError):
        ssd_chunk_scan_varlen_vectorized(*args, pool, cu, [1, 1], init, 4)


def test_bench_runs_on_cpu():
    rows = bench_ssd(tokens=(200,), heads=8, head_dim=4, groups=2, state=8, chunk=16, device="cpu", iters=2)
    assert rows[0]["tokens"] == 200 and rows[0]["y_rel_err"] < 1e-2 and rows[0]["state_rel_err"] < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["exact", "bf16"])
def test_cuda_dispatch_12b_shapes(precision, monkeypatch):
    """On a GPU, `ssd_chunk_scan_varlen` dispatches here; compare with the reference on CPU copies.
    "exact" must match to one bf16 rounding (states 1e-5); the default "bf16" to mamba-ssm's accuracy:
    5e-2 of the largest |y| (measured 5.2e-3 at 6k tokens) and 1e-2 on the states (measured 2.1e-3)."""
    from glimpse.kernels import triton_ssd

    monkeypatch.setattr(triton_ssd, "PRECISION", precision)
    Q, H, G, P, N = 128, 128, 8, 80, 128
    lens = [300, 1, 517, 128]
    for state_dtype in (torch.float32, torch.bfloat16):
        args, pool, cu, slots, init = _inputs(lens, H, G, P, N, torch.bfloat16, state_dtype, seed=2)
        ref_pool = pool.clone()
        y_ref = reference(*args, ref_pool, cu, slots, init, Q)
        pool_gpu = pool.cuda()
        y = reference(*[a.cuda() for a in args], pool_gpu, cu, slots, init, Q)  # dispatches on CUDA
        st = pool_gpu.cpu()
        others = [i for i in range(pool.shape[0]) if i not in slots]
        assert torch.equal(st[others], pool[others])
        if precision == "bf16":
            assert _rel(y.cpu().float(), y_ref.float()) <= 5e-2
            assert _rel(st[slots].float(), ref_pool[slots].float()) <= 1e-2
            continue
        _check_bf16(y.cpu(), y_ref)
        if state_dtype == torch.float32:
            assert _rel(st[slots], ref_pool[slots]) <= 1e-5
        else:
            _check_bf16(st[slots], ref_pool[slots])
