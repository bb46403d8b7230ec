"""The public ops off CUDA (plain CPU, no Triton needed): every `use_triton*` rule says no, and the fused
decode ops equal their parts (softplus and clamp then the state update; the conv update then silu)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glimpse.kernels import activations, attention, causal_conv1d, norms, ssd
from tests.kernels.fixtures import _one_thread  # noqa: F401  (autouse: one CPU thread)


def test_rules_keep_cpu_tensors_on_torch():
    x = torch.randn(4, 64)
    assert not activations.use_triton(x)
    assert not norms.use_triton(x, x)
    assert not causal_conv1d.use_triton(x)
    assert not ssd.use_triton_scan(x)
    assert not ssd.use_triton_update(x)
    assert not attention.use_triton(x.view(4, 1, 64), 16)


@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.05, 1.5)], ids=["nolimit", "clamped"])
def test_selective_state_update_fused_dt_on_cpu(dt_limit):
    g = torch.Generator().manual_seed(0)
    batch, heads, head_dim, groups, state = 3, 4, 8, 2, 16
    x = torch.randn(batch, heads, head_dim, generator=g)
    dt_raw = torch.randn(batch, heads + 2, generator=g)[:, 1 : 1 + heads] * 3  # strided, like in_proj's split
    dt_bias = torch.randn(heads, generator=g)
    A = -torch.exp(torch.rand(heads, generator=g))
    B, C = torch.randn(2, batch, groups, state, generator=g)
    D = torch.randn(heads, generator=g)
    pool = torch.randn(5, heads, head_dim, state, generator=g)
    slots = torch.tensor([4, 0, 2])
    expect_pool = pool.clone()
    dt = F.softplus(dt_raw + dt_bias)
    if dt_limit != (0.0, math.inf):
        dt = dt.clamp(*dt_limit)
    expect = ssd.selective_state_update(x, dt, A, B, C, D, expect_pool, slots)
    out = ssd.selective_state_update_fused_dt(x, dt_raw, dt_bias, A, B, C, D, pool, slots, dt_limit)
    assert torch.equal(out, expect) and torch.equal(pool, expect_pool)


def test_causal_conv1d_update_silu_on_cpu():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 12, generator=g)
    weight, bias = torch.randn(12, 4, generator=g), torch.randn(12, generator=g)
    pool = torch.randn(5, 3, 12, generator=g)
    slots = torch.tensor([1, 4, 3])
    expect_pool = pool.clone()
    expect = F.silu(causal_conv1d.causal_conv1d_update(x, weight, bias, expect_pool, slots))
    out = causal_conv1d.causal_conv1d_update_silu(x, weight, bias, pool, slots)
    assert torch.equal(out, expect) and torch.equal(pool, expect_pool)
