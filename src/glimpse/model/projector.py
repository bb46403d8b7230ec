"""Pixel shuffle (InternVL "v2") and the `mlp1` projector from vision features to LLM embeddings.

Checked against transformers' `NemotronH_Omni_Reasoning_V3.pixel_shuffle` and
`NemotronH_Omni_Reasoning_V3MultiModalProjector` in tests/model/test_projector_parity.py. vLLM's
`nano_nemotron_vl` does the same two views and transposes (the final transpose is what "v2" adds; "v1"
leaves the grid transposed, and no Nano 2 VL checkpoint uses it).

Token order: for ratio 0.5, output token (i, j) is concat(x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j],
x[2i+1, 2j+1]): row offset major, column offset minor (MODEL_SPEC §3, confirmed). For ratio 1/r in general
the r×r block is read row-major.

RMSNorm: computed in float32 with the weight multiplied in float32 and only the product cast back, as
transformers (and, per its comment, NVIDIA's reference) does. vLLM casts the normalised value to the input
dtype before the weight multiply; in float32 the two agree, in bfloat16 they differ by one rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pixel_shuffle_v2(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """[N, h, w, C] -> [N, h·scale, w·scale, C/scale²]: each r×r block of tokens (r = 1/scale) becomes one.

    One reshape-permute-reshape (a single copy) where the reference does two views and two transposes.
    """
    r = round(1 / scale)
    if r < 1 or abs(r * scale - 1) > 1e-9:
        raise ValueError(f"pixel shuffle scale must be 1/r for an integer r, got {scale}")
    n, h, w, c = x.shape
    if h % r or w % r:
        raise ValueError(f"a {h}x{w} grid can't be shuffled by {r}x{r} blocks")
    x = x.reshape(n, h // r, r, w // r, r, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // r, w // r, r * r * c)


class RMSNorm(nn.Module):
    """RMSNorm in float32, weight applied in float32, result cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ReluSquared(nn.Module):
    """relu(x)²: the activation of NemotronH's MLPs and of `mlp1` (ACT2FN["relu2"], vLLM ReLUSquared)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(F.relu(x))


class Projector(nn.Sequential):
    """`mlp1`: RMSNorm -> Linear -> relu² -> Linear, no biases. A Sequential so the checkpoint's indices
    (`0.weight`, `1.weight`, `3.weight`; index 2 is the parameter-free activation) are its names.

    Defaults are the 12B VL's: 4·1280 shuffled vision features -> 20480 -> 5120 (LLM width).
    """

    def __init__(
        self,
        input_size: int = 5120,
        hidden_size: int = 20480,
        output_size: int = 5120,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(
            RMSNorm(input_size, eps=eps),
            nn.Linear(input_size, hidden_size, bias=False),
            ReluSquared(),
            nn.Linear(hidden_size, output_size, bias=False),
        )

    @classmethod
    def for_model(
        cls,
        vit_hidden_size: int,
        projector_hidden_size: int,
        llm_hidden_size: int,
        downsample_ratio: float = 0.5,
    ) -> Projector:
        """Sized from the VL config's fields (`vit_hidden_size`, `projector_hidden_size`, LLM width)."""
        return cls(vit_hidden_size * round(1 / downsample_ratio) ** 2, projector_hidden_size, llm_hidden_size)

    @property
    def input_size(self) -> int:
        return self[1].in_features

    @property
    def output_size(self) -> int:
        return self[3].out_features
