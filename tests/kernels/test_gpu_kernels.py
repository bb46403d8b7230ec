"""Parity of the Triton decode kernels (Mamba2 state update, causal conv update) with the torch references.

Runs on CUDA only (skipped elsewhere, so CPU CI needs no Triton). For debugging on a CPU, set
TRITON_INTERPRET=1 and GLIMPSE_TEST_INTERPRET=1: the same checks then run on CPU tensors through the Triton
interpreter (which truncates fp32 -> bf16 instead of rounding; the bf16 tolerances allow for it).

The references always run on CPU copies of the inputs, so they never dispatch to the kernels under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glimpse.kernels.causal_conv1d import causal_conv1d_update as ref_conv_update
from glimpse.kernels.ssd import selective_state_update as ref_state_update
from tests.kernels.triton_device import triton_test_device  # noqa: E402

DEVICE = triton_test_device()
_INTERPRET = DEVICE == "cpu"

from glimpse.kernels import causal_conv1d, ssd, triton_conv, triton_ssm_update  # noqa: E402

BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one ulp is at most 2^-7 of the value


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def _close(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> tuple[float, float]:
    """Assert |out - ref| <= atol + rtol |ref| everywhere (NaN fails); return (max abs, norm-relative) error."""
    out, ref = _cpu(out).double(), _cpu(ref).double()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed elements)"
    diff = (out - ref).abs()
    bad = diff > atol + rtol * ref.abs()
    assert not bad.any(), f"{int(bad.sum())} elements off; max abs error {diff.max().item():.3g}"
    return diff.max().item(), (diff.norm() / ref.norm().clamp_min(1e-30)).item()


def _packed_xbc(batch: int, heads: int, head_dim: int, groups: int, state: int, dtype, g: torch.Generator):
    """x, B, C as the mixer has them: strided views into one packed [batch, conv_dim] activation."""
    d_inner, gn = heads * head_dim, groups * state
    xbc = torch.randn(batch, d_inner + 2 * gn, generator=g).to(dtype).to(DEVICE)
    x = xbc[:, :d_inner].view(batch, heads, head_dim)
    B = xbc[:, d_inner : d_inner + gn].view(batch, groups, state)
    C = xbc[:, d_inner + gn :].view(batch, groups, state)
    return x, B, C


def _ssm_case(batch, heads, head_dim, groups, state, in_dtype, state_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, B, C = _packed_xbc(batch, heads, head_dim, groups, state, in_dtype, g)
    # raw dt as a strided slice of a wider projection output, like in_proj's last columns
    dt_raw = (torch.randn(batch, heads + 7, generator=g) * 2).to(in_dtype).to(DEVICE)[:, 3 : 3 + heads]
    dt_bias = torch.randn(heads, generator=g).to(DEVICE)
    A = -torch.exp(torch.rand(heads, generator=g) * 3).to(DEVICE)
    D = torch.randn(heads, generator=g).to(in_dtype).to(DEVICE)
    num_slots = 2 * batch + 3
    pool = torch.randn(num_slots, heads, head_dim, state, generator=g).to(state_dtype).to(DEVICE)
    slots = torch.randperm(num_slots, generator=g)[:batch].to(DEVICE)  # scattered, out of order
    return x, dt_raw, dt_bias, A, B, C, D, pool, slots


def _state_tol(state_dtype):
    if state_dtype == torch.float32:
        return 1e-5, 1e-5
    return BF16_ULP, 1e-6  # one rounding of the same fp32 value may land one ulp apart


def _check_pool(pool_out, pool_ref, pool_before, slots, state_dtype):
    untouched = torch.ones(pool_out.shape[0], dtype=torch.bool)
    untouched[_cpu(slots)] = False
    assert torch.equal(_cpu(pool_out)[untouched], _cpu(pool_before)[untouched]), (
        "a slot not in the batch changed"
    )
    rtol, atol = _state_tol(state_dtype)
    return _close(pool_out, pool_ref, rtol, atol)


SHAPES = [
    pytest.param(5, 128, 80, 8, 128, id="12B-b5"),  # the 12B's heads / head_dim / groups / state
    pytest.param(3, 6, 10, 3, 24, id="odd"),  # nothing a power of two, 2 heads per group
]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32state", "bf16state"])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32], ids=["bf16in", "fp32in"])
@pytest.mark.parametrize("batch,heads,head_dim,groups,state", SHAPES)
def test_selective_state_update(batch, heads, head_dim, groups, state, in_dtype, state_dtype):
    x, dt_raw, dt_bias, A, B, C, D, pool, slots = _ssm_case(
        batch, heads, head_dim, groups, state, in_dtype, state_dtype, seed=1
    )
    dt = F.softplus(dt_raw.float() + dt_bias)
    before = pool.clone()
    pool_ref = _cpu(pool).clone()
    y_ref = ref_state_update(*map(_cpu, (x, dt, A, B, C, D)), pool_ref, _cpu(slots))
    y = triton_ssm_update.selective_state_update(x, dt, A, B, C, D, pool, slots)
    assert y.dtype == x.dtype and y.shape == x.shape
    # y comes from the fp32 state in both; only the final rounding to x's dtype may differ
    rtol = 1e-5 if in_dtype == torch.float32 else BF16_ULP
    _close(y, y_ref, rtol, 1e-4)
    _check_pool(pool, pool_ref, before, slots, state_dtype)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32state", "bf16state"])
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.05, 1.5)], ids=["nolimit", "clamped"])
def test_selective_state_update_fused_dt(dt_limit, state_dtype):
    x, dt_raw, dt_bias, A, B, C, D, pool, slots = _ssm_case(
        5, 128, 80, 8, 128, torch.bfloat16, state_dtype, 2
    )
    dt_raw[0, :4] = torch.tensor([-40.0, -12.0, 19.0, 30.0])  # both softplus branches, tiny and large
    before = pool.clone()
    pool_ref = _cpu(pool).clone()
    dt = F.softplus(_cpu(dt_raw).float() + _cpu(dt_bias).float())
    if dt_limit[0] > 0 or math.isfinite(dt_limit[1]):
        dt = dt.clamp(*dt_limit)
    y_ref = ref_state_update(*map(_cpu, (x,)), dt, *map(_cpu, (A, B, C, D)), pool_ref, _cpu(slots))
    y = triton_ssm_update.selective_state_update_fused_dt(
        x, dt_raw, dt_bias, A, B, C, D, pool, slots, dt_limit=dt_limit
    )
    _close(y, y_ref, BF16_ULP, 1e-4)
    _check_pool(pool, pool_ref, before, slots, state_dtype)


@pytest.mark.parametrize("block_p,num_warps", [(8, 2), (32, 4), (64, 8)])
def test_selective_state_update_launch_configs(block_p, num_warps):
    """Other tile heights (80 rows are not a multiple of 32 or 64: the last block is partly masked)."""
    x, dt_raw, dt_bias, A, B, C, D, pool, slots = _ssm_case(
        3, 16, 80, 2, 128, torch.bfloat16, torch.bfloat16, 9
    )
    dt = F.softplus(dt_raw.float() + dt_bias)
    before = pool.clone()
    pool_ref = _cpu(pool).clone()
    y_ref = ref_state_update(*map(_cpu, (x, dt, A, B, C, D)), pool_ref, _cpu(slots))
    y = triton_ssm_update.selective_state_update(
        x, dt, A, B, C, D, pool, slots, block_p=block_p, num_warps=num_warps
    )
    _close(y, y_ref, BF16_ULP, 1e-4)
    _check_pool(pool, pool_ref, before, slots, torch.bfloat16)


def test_selective_state_update_many_steps():
    """Ten steps on an fp32 pool stay with the reference (errors don't build up)."""
    x, dt_raw, dt_bias, A, B, C, D, pool, slots = _ssm_case(
        4, 16, 80, 2, 128, torch.float32, torch.float32, 3
    )
    pool_ref = _cpu(pool).clone()
    g = torch.Generator().manual_seed(4)
    for _ in range(10):
        x = torch.randn(x.shape, generator=g).to(DEVICE)
        dt = F.softplus(torch.randn(dt_raw.shape, generator=g)).to(DEVICE)
        y_ref = ref_state_update(*map(_cpu, (x, dt, A, B, C, D)), pool_ref, _cpu(slots))
        y = triton_ssm_update.selective_state_update(x, dt, A, B, C, D, pool, slots)
        _close(y, y_ref, 1e-5, 1e-4)
    _close(pool, pool_ref, 1e-5, 1e-5)


CONV_CASES = [
    pytest.param(6, 12288, 4, True, id="12B-b6"),
    pytest.param(3, 50, 4, False, id="odd-nobias"),
    pytest.param(2, 33, 2, True, id="k2"),
]


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=["bf16state", "fp32state"])
@pytest.mark.parametrize("batch,channels,kernel,has_bias", CONV_CASES)
def test_causal_conv1d_update(batch, channels, kernel, has_bias, state_dtype):
    g = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16
    x = torch.randn(batch, channels + 8, generator=g).to(dtype).to(DEVICE)[:, 8:]  # strided, like a split
    weight = (torch.randn(channels, kernel, generator=g) * 0.5).to(dtype).to(DEVICE)
    bias = torch.randn(channels, generator=g).to(dtype).to(DEVICE) if has_bias else None
    num_slots = 2 * batch + 1
    # the state holds earlier inputs, which are values of x's dtype
    pool = torch.randn(num_slots, kernel - 1, channels, generator=g).to(dtype).to(state_dtype).to(DEVICE)
    slots = torch.randperm(num_slots, generator=g)[:batch].to(DEVICE)
    before = pool.clone()

    pool_ref = _cpu(pool).clone()
    args = [_cpu(weight), None if bias is None else _cpu(bias)]
    y_ref = ref_conv_update(_cpu(x), *args, pool_ref, _cpu(slots))  # rounds every product in bf16
    pool64 = _cpu(before).double()
    y64 = ref_conv_update(
        _cpu(x).double(), *[a if a is None else a.double() for a in args], pool64, _cpu(slots)
    )

    pool_silu = pool.clone()
    y = triton_conv.causal_conv1d_update(x, weight, bias, pool, slots)
    assert y.dtype == x.dtype and y.shape == x.shape
    _close(y, y64, BF16_ULP, 1e-6)  # one rounding of an fp32 sum: within an ulp of the exact value
    _close(y, y_ref, 4 * BF16_ULP, 0.05)  # the bf16 reference rounds K+1 times
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[_cpu(slots)] = False
    assert torch.equal(_cpu(pool)[untouched], _cpu(before)[untouched])
    assert torch.equal(_cpu(pool), pool_ref), "the shifted window must be exact"

    y_silu = triton_conv.causal_conv1d_update_silu(x, weight, bias, pool_silu, slots)
    _close(y_silu, F.silu(y64), BF16_ULP, 1e-6)
    assert torch.equal(_cpu(pool_silu), pool_ref)


@pytest.mark.skipif(DEVICE != "cuda", reason="dispatch happens on CUDA tensors only")
def test_reference_functions_dispatch_to_triton():
    """The public ops (kernels/ssd.py, kernels/causal_conv1d.py) run the kernels on CUDA: bit-equal results."""
    x, dt_raw, dt_bias, A, B, C, D, pool, slots = _ssm_case(
        4, 16, 80, 2, 128, torch.bfloat16, torch.float32, 6
    )
    dt = F.softplus(dt_raw.float() + dt_bias)
    p1, p2 = pool.clone(), pool.clone()
    y1 = ref_state_update(x, dt, A, B, C, D, p1, slots)
    y2 = triton_ssm_update.selective_state_update(x, dt, A, B, C, D, p2, slots)
    assert torch.equal(y1, y2) and torch.equal(p1, p2)
    p1, p2 = pool.clone(), pool.clone()
    y1 = ssd.selective_state_update_fused_dt(x, dt_raw, dt_bias, A, B, C, D, p1, slots)
    y2 = triton_ssm_update.selective_state_update_fused_dt(x, dt_raw, dt_bias, A, B, C, D, p2, slots)
    assert torch.equal(y1, y2) and torch.equal(p1, p2)

    xc = torch.randn(4, 300, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(300, 4, device=DEVICE, dtype=torch.bfloat16)
    cs = torch.randn(pool.shape[0], 3, 300, device=DEVICE, dtype=torch.bfloat16)  # the same slots as above
    c1, c2 = cs.clone(), cs.clone()
    assert torch.equal(
        ref_conv_update(xc, w, None, c1, slots), triton_conv.causal_conv1d_update(xc, w, None, c2, slots)
    )
    assert torch.equal(c1, c2)
    assert torch.equal(
        causal_conv1d.causal_conv1d_update_silu(xc, w, None, c1, slots),
        triton_conv.causal_conv1d_update_silu(xc, w, None, c2, slots),
    )
    assert torch.equal(c1, c2)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_kernels_replay_in_a_cuda_graph():
    x, dt_raw, dt_bias, A, B, C, D, pool, slots = _ssm_case(
        8, 128, 80, 8, 128, torch.bfloat16, torch.float32, 7
    )
    conv_x = torch.randn(8, 12288, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(12288, 4, device=DEVICE, dtype=torch.bfloat16)
    cs = torch.randn(20, 3, 12288, device=DEVICE, dtype=torch.bfloat16)
    pool_eager, cs_eager = pool.clone(), cs.clone()

    def step(p, c):
        y = triton_ssm_update.selective_state_update_fused_dt(x, dt_raw, dt_bias, A, B, C, D, p, slots)
        return y, triton_conv.causal_conv1d_update_silu(conv_x, w, None, c, slots)

    y_eager, yc_eager = step(pool_eager, cs_eager)
    step(pool.clone(), cs.clone())  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph, yc_graph = step(pool, cs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph, y_eager) and torch.equal(yc_graph, yc_eager)
    assert torch.equal(pool, pool_eager) and torch.equal(cs, cs_eager)


@pytest.mark.skipif(DEVICE != "cuda", reason="the mixer dispatches on CUDA tensors only")
@pytest.mark.parametrize("ssm_dtype", [torch.float32, torch.bfloat16], ids=["fp32state", "bf16state"])
def test_mamba2_mixer_decode_on_cuda_matches_cpu(ssm_dtype):
    """The whole decode path of a (tiny) mixer on CUDA, through the kernels, against the CPU torch path."""
    from glimpse.model.batch import CacheTensors, ForwardBatch
    from glimpse.model.mamba2 import Mamba2Mixer
    from glimpse.model.tiny import tiny_text_config

    config = tiny_text_config()
    torch.manual_seed(8)
    mixer = Mamba2Mixer(config, 0)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        mixer.A_log.copy_(torch.rand(config.mamba_num_heads))
    batch, slots = 3, torch.tensor([4, 0, 2])
    conv = torch.randn(1, 6, config.conv_kernel - 1, config.mamba_conv_dim)
    ssm = torch.randn(1, 6, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size).to(
        ssm_dtype
    )
    hidden = torch.randn(batch, config.hidden_size)
    empty = torch.empty(0)
    outs = {}
    for dev in ("cpu", "cuda"):
        cache = CacheTensors(conv.clone().to(dev), ssm.clone().to(dev), empty.to(dev), empty.to(dev))
        fb = ForwardBatch(
            [1] * batch, [5] * batch, slots.to(dev), torch.zeros(batch, 1, dtype=torch.int64, device=dev)
        )
        with torch.no_grad():
            outs[dev] = (mixer.to(dev)(hidden.to(dev), fb, cache), cache)
    (y_cpu, c_cpu), (y_gpu, c_gpu) = outs["cpu"], outs["cuda"]
    _close(y_gpu, y_cpu, 1e-3, 1e-4)  # cuBLAS vs CPU matmuls in fp32 differ a little
    _close(c_gpu.conv_state, c_cpu.conv_state, 1e-5, 1e-5)
    rtol, atol = (1e-3, 1e-4) if ssm_dtype == torch.float32 else (2 * BF16_ULP, 1e-4)
    _close(c_gpu.ssm_state, c_cpu.ssm_state, rtol, atol)
