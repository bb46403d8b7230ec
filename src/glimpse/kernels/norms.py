"""RMS norms of NemotronH: the plain one (blocks, final norm) and the gated, grouped one (Mamba output)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, multiply by the weight in fp32, cast back (as the reference does)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(dtype)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, groups: int, eps: float
) -> torch.Tensor:
    """y = RMSNorm_grouped(x * silu(gate)) * weight: the gate comes BEFORE the norm in this model."""
    dtype = x.dtype
    h = x.float() * F.silu(gate.float())
    shape = h.shape
    h = h.view(*shape[:-1], groups, shape[-1] // groups)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.view(shape).to(dtype)
