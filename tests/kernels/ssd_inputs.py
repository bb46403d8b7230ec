"""Random packed SSD-scan inputs shared by the scan tests: sequences of the given lengths, scattered
distinct state slots (a few spare), and a mix of sequences with and without an initial state."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_inputs(
    lens, H, G, P, N, dtype, state_dtype=torch.float32, seed=0, dt_shift=0.0, a_shift=0.0, extra_slots=3
):
    gen = torch.Generator().manual_seed(seed)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    T = cu[-1]
    x = torch.randn(T, H, P, generator=gen).to(dtype)
    dt = F.softplus(torch.randn(T, H, generator=gen) + dt_shift)
    A = -torch.exp(torch.randn(H, generator=gen) + a_shift)
    B = torch.randn(T, G, N, generator=gen).to(dtype)
    C = torch.randn(T, G, N, generator=gen).to(dtype)
    D = torch.randn(H, generator=gen)
    S = len(lens)
    pool = torch.randn(S + extra_slots, H, P, N, generator=gen).to(state_dtype)
    slots = torch.randperm(S + extra_slots, generator=gen)[:S].tolist()  # distinct, scattered
    init = [i % 3 != 1 for i in range(S)]  # mixed
    return (x, dt, A, B, C, D), pool, cu, slots, init
