"""RMS norms of NemotronH: the plain one (blocks, final norm) and the gated, grouped one (Mamba output).

On CUDA each dispatches to a one-pass Triton kernel (kernels/triton_norms.py; GLIMPSE_TRITON=0 keeps the
torch code below, which is the reference the kernels are tested against). `use_triton` decides."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glimpse.kernels import backend, triton_norms


def use_triton(*tensors: torch.Tensor) -> bool:
    """The Triton norms take these tensors: Triton usable on each (see backend), all in dtypes they handle."""
    return all(backend.triton_usable(t) and t.dtype in triton_norms.DTYPES for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, multiply by the weight in fp32, cast back (as the reference does)."""
    if use_triton(x):
        return triton_norms.rms_norm(x, weight, eps)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, rms_norm(r, weight, eps)) with r = x + delta: a block's residual add and the next block's norm.

    x is not modified; r is a new tensor. One Triton pass on CUDA."""
    if use_triton(x, delta):
        return triton_norms.add_rms_norm(x, delta, weight, eps)
    r = x + delta
    return r, rms_norm(r, weight, eps)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, groups: int, eps: float
) -> torch.Tensor:
    """y = RMSNorm_grouped(x * silu(gate)) * weight: the gate comes BEFORE the norm in this model."""
    if use_triton(x, gate, weight):
        return triton_norms.gated_rms_norm(x, gate, weight, groups, eps)
    dtype = x.dtype
    h = x.float() * F.silu(gate.float())
    shape = h.shape
    h = h.view(*shape[:-1], groups, shape[-1] // groups)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.view(shape).to(dtype)
