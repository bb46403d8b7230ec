"""The Triton prompt-chunk convolution (`triton_conv.causal_conv1d_varlen_silu`) against the torch reference.

Runs on CUDA only (skipped elsewhere, so CPU CI needs no Triton). For debugging on a CPU, set
TRITON_INTERPRET=1 and GLIMPSE_TEST_INTERPRET=1: the same checks then run on CPU tensors through the Triton
interpreter (small shapes; the interpreter truncates fp32 -> bf16 instead of rounding).

References run on CPU copies: `causal_conv1d_varlen` (the list-based loop) followed by silu, once in the
inputs' dtype (what the model computed before) and once in float64. Tolerances, |out - ref| <= atol + rtol
|ref| everywhere:
- y against float64: the kernel sums in fp32 and rounds once to x's dtype, so within one ulp of x's dtype
  (bf16: 2^-7 relative, fp32: 1e-5) plus atol 1e-6 (1e-5 for fp32, for the fp32 sum of K + 1 terms);
- y against the reference in x's dtype: 4 bf16 ulps + atol 0.02 (the bf16 reference rounds the conv and
  then silu separately); fp32: 1e-5 / 1e-5;
- the new state: exact (it is a copy of inputs), except fp32 x into a bf16 state (one rounding: one ulp).
Slots outside the batch must be bit-for-bit untouched.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glimpse.kernels.causal_conv1d import causal_conv1d_varlen as ref_varlen
from tests.kernels.fixtures import _one_thread  # noqa: F401  (autouse: one CPU thread)
from tests.kernels.triton_device import triton_test_device  # noqa: E402

DEVICE = triton_test_device()

from glimpse.kernels import triton_conv  # noqa: E402

BF16_ULP = 2.0**-7


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def _close(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> None:
    out, ref = _cpu(out).double(), _cpu(ref).double()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed elements)"
    diff = (out - ref).abs()
    bad = diff > atol + rtol * ref.abs()
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements off; max abs error {diff.max().item():.3g}"
    )


def _problem(lens, channels, kernel, dtype, state_dtype, has_bias, strided, seed, init=None):
    """Packed inputs on DEVICE. Inputs and cached states hold values of x's dtype (as the model's do)."""
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    total, num_seqs = cu[-1], len(lens)
    pad = 8 if strided else 0  # x as a column slice of a wider tensor, like in_proj's split
    # sliced on the device: moving a sliced tensor with .to() would make it contiguous
    x_wide = torch.randn(total, channels + 2 * pad, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(channels, kernel, generator=g) * 0.5).to(dtype)
    bias = torch.randn(channels, generator=g).to(dtype) if has_bias else None
    num_slots = 2 * num_seqs + 1
    pool = torch.randn(num_slots, kernel - 1, channels, generator=g).to(dtype).to(state_dtype)
    slots = torch.randperm(num_slots, generator=g)[:num_seqs]
    if init is None:
        init = (torch.rand(num_seqs, generator=g) < 0.6).tolist()
    dev = {
        "x": x_wide[:, pad : pad + channels],
        "weight": weight.to(DEVICE),
        "bias": None if bias is None else bias.to(DEVICE),
        "conv_state": pool.to(DEVICE),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        "slots": slots.to(DEVICE),
        "has_initial_state": torch.tensor(init, dtype=torch.bool, device=DEVICE),
    }
    if strided:
        assert dev["x"].stride(0) > channels
    return dev, (cu, slots.tolist(), list(init))


def _references(dev, host, dtype=None, silu=True):
    """(y, new state) of the list-based torch reference (+ silu) on CPU copies, in `dtype` (default x's)."""
    cu, slots, init = host
    x, w, b, pool = (None if dev[k] is None else _cpu(dev[k]) for k in ("x", "weight", "bias", "conv_state"))
    if dtype is not None:
        x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        pool = pool.to(dtype)
    pool = pool.clone()
    y = ref_varlen(x, w, b, pool, cu, slots, init)
    return (F.silu(y) if silu else y), pool


def _run(dev, **kw):
    return triton_conv.causal_conv1d_varlen_silu(
        dev["x"],
        dev["weight"],
        dev["bias"],
        dev["conv_state"],
        dev["cu_seqlens"],
        dev["slots"],
        dev["has_initial_state"],
        **kw,
    )


def _check(dev, host, dtype, state_dtype, y, before, silu=True):
    y_ref, state_ref = _references(dict(dev, conv_state=before), host, silu=silu)
    y64, _ = _references(dict(dev, conv_state=before), host, torch.float64, silu=silu)
    assert y.dtype == dev["x"].dtype and y.shape == dev["x"].shape and y.is_contiguous()
    if dtype == torch.bfloat16:
        _close(y, y64, BF16_ULP, 1e-6)
        _close(y, y_ref, 4 * BF16_ULP, 0.02)
    else:
        _close(y, y64, 1e-5, 1e-5)
        _close(y, y_ref, 1e-5, 1e-5)

    state = _cpu(dev["conv_state"])
    in_batch = torch.zeros(state.shape[0], dtype=torch.bool)
    in_batch[torch.tensor(host[1], dtype=torch.long)] = True
    assert torch.equal(state[~in_batch], _cpu(before)[~in_batch]), "slots outside the batch changed"
    if dtype == torch.float32 and state_dtype == torch.bfloat16:
        _close(state, state_ref, BF16_ULP, 0.0)
    else:
        assert torch.equal(state, state_ref), "the new state must be an exact copy of the last inputs"


# (lengths, channels, kernel, bias, strided): lengths 0..3 are shorter than K - 1 = 3 for K = 4
CASES = [
    pytest.param([5, 1, 2, 3, 20, 4], 40, 4, True, True, id="k4-mixed-strided-bias"),
    pytest.param([1, 2, 3, 1, 9], 24, 4, False, False, id="k4-short-nobias"),
    pytest.param([7, 1, 2, 19], 40, 2, True, True, id="k2-strided-bias"),
    pytest.param([3, 0, 6, 1], 33, 3, True, False, id="k3-empty-seq-odd-channels"),
]
DTYPES = [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16-bf16state"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32state"),
    pytest.param(torch.float32, torch.float32, id="fp32-fp32state"),
    pytest.param(torch.float32, torch.bfloat16, id="fp32-bf16state"),
]


@pytest.mark.parametrize("dtype,state_dtype", DTYPES)
@pytest.mark.parametrize("lens,channels,kernel,has_bias,strided", CASES)
def test_varlen_matches_reference(lens, channels, kernel, has_bias, strided, dtype, state_dtype):
    dev, host = _problem(
        lens, channels, kernel, dtype, state_dtype, has_bias, strided, seed=len(lens) + kernel
    )
    before = dev["conv_state"].clone()
    # small tiles: sequences straddle token blocks (also inside their first K - 1 tokens) and channel blocks
    y = _run(dev, max_seqlen=max(lens), block_t=4, block_c=16, num_warps=1)
    _check(dev, host, dtype, state_dtype, y, before)


@pytest.mark.parametrize("init", [[False] * 4, [True] * 4], ids=["fresh", "all-cached"])
def test_varlen_initial_state_all_or_none(init):
    dev, host = _problem([2, 6, 1, 11], 32, 4, torch.bfloat16, torch.float32, True, True, seed=3, init=init)
    before = dev["conv_state"].clone()
    y = _run(dev)  # default launch configuration
    _check(dev, host, torch.bfloat16, torch.float32, y, before)


def test_varlen_without_silu():
    dev, host = _problem([4, 2, 9], 24, 4, torch.float32, torch.float32, True, False, seed=11)
    before = dev["conv_state"].clone()
    y = _run(dev, silu=False, block_t=8, block_c=16)
    _check(dev, host, torch.float32, torch.float32, y, before, silu=False)


def test_varlen_one_sequence_default_config():
    dev, host = _problem([37], 48, 4, torch.bfloat16, torch.bfloat16, True, True, seed=2, init=[True])
    before = dev["conv_state"].clone()
    y = _run(dev, max_seqlen=None)
    _check(dev, host, torch.bfloat16, torch.bfloat16, y, before)


def test_varlen_chunks_continue_the_whole_sequence():
    """Convolving a prompt in chunks (state carried between them) equals convolving it at once."""
    lens, channels = [13, 2, 7], 24
    dev, _ = _problem(
        [sum(lens)], channels, 4, torch.float32, torch.float32, True, False, seed=5, init=[False]
    )
    whole_state = dev["conv_state"].clone()
    y_whole = _run(dict(dev, conv_state=whole_state))
    start, parts = 0, []
    for i, n in enumerate(lens):
        chunk = dict(
            dev,
            x=dev["x"][start : start + n],
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32, device=DEVICE),
            has_initial_state=torch.tensor([i > 0], device=DEVICE),
        )
        parts.append(_run(chunk, block_t=4, block_c=8))
        start += n
    _close(torch.cat(parts), y_whole, 1e-6, 1e-6)
    assert torch.equal(_cpu(dev["conv_state"]), _cpu(whole_state))


def test_varlen_rows_past_the_last_sequence_are_zero():
    dev, host = _problem([3, 5], 16, 4, torch.float32, torch.float32, False, False, seed=9)
    x = torch.cat([dev["x"], torch.randn(6, 16, device=DEVICE)])  # 6 padding rows after the sequences
    before = dev["conv_state"].clone()
    y = _run(dict(dev, x=x), block_t=4, block_c=8)
    assert torch.equal(_cpu(y[8:]), torch.zeros(6, 16))
    _check(dev, host, torch.float32, torch.float32, y[:8], before)
