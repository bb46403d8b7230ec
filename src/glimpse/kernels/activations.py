"""relu(x)² (the NemotronH MLP's activation) in one pass over the activations.

torch runs relu and square as two kernels, each reading and writing the whole [tokens, 20480] tensor; at a
4k-token prefill that is ~0.7 GB of traffic per MLP layer. On CUDA one Triton pass squares in place
(kernels/triton_activations.py); the torch path below is the reference (CPU, or GLIMPSE_TRITON=0).
"""

from __future__ import annotations

import torch

from glimpse.kernels import backend, triton_activations


def use_triton(x: torch.Tensor) -> bool:
    """The kernel takes x: Triton usable on it (see backend), contiguous and not empty."""
    return backend.triton_usable(x) and x.is_contiguous() and x.numel() > 0


def relu_square_(x: torch.Tensor) -> torch.Tensor:
    """relu(x)² written over x; returns x."""
    if use_triton(x):
        return triton_activations.relu_square_(x)
    return torch.relu_(x).square_()
