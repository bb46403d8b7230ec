"""The prompt-chunk conv dispatcher (`causal_conv1d.causal_conv1d_varlen_silu`) off CUDA: the torch path.

Plain CPU, no Triton needed (runs in normal CI). It takes device-tensor arguments (cu_seqlens, slots,
has_initial_state) and must give exactly the list-based reference `causal_conv1d_varlen` followed by silu,
with the same in-place state update.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glimpse.kernels.causal_conv1d import causal_conv1d_varlen, causal_conv1d_varlen_silu


def _problem(lens, channels, kernel, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    x = torch.randn(cu[-1], channels + 5, generator=g).to(dtype)[:, 5:]  # strided rows
    weight = torch.randn(channels, kernel, generator=g).to(dtype)
    bias = torch.randn(channels, generator=g).to(dtype)
    pool = torch.randn(2 * len(lens) + 1, kernel - 1, channels, generator=g).to(dtype)
    slots = torch.randperm(pool.shape[0], generator=g)[: len(lens)]
    init = (torch.arange(len(lens)) % 2 == 0).tolist()
    return x, weight, bias, pool, cu, slots, init


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [4, 2])
def test_dispatcher_matches_list_reference_on_cpu(kernel, dtype, silu):
    x, weight, bias, pool, cu, slots, init = _problem([5, 1, 2, 3, 8], 12, kernel, dtype, seed=kernel)
    pool_ref, pool_out = pool.clone(), pool.clone()
    y_ref = causal_conv1d_varlen(x, weight, bias, pool_ref, cu, slots.tolist(), init)
    if silu:
        y_ref = F.silu(y_ref)
    y = causal_conv1d_varlen_silu(
        x,
        weight,
        bias,
        pool_out,
        torch.tensor(cu, dtype=torch.int32),
        slots,
        torch.tensor(init),
        max_seqlen=max(cu[i + 1] - cu[i] for i in range(len(slots))),
        silu=silu,
    )
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, y_ref)
    assert torch.equal(pool_out, pool_ref)


def test_dispatcher_zeroes_rows_past_the_last_sequence():
    x, weight, bias, pool, cu, slots, init = _problem([3, 4], 8, 4, torch.float32)
    padded = torch.cat([x, torch.randn(3, 8)])
    y = causal_conv1d_varlen_silu(
        padded, weight, None, pool, torch.tensor(cu, dtype=torch.int32), slots, torch.tensor(init)
    )
    assert torch.equal(y[cu[-1] :], torch.zeros(3, 8))
