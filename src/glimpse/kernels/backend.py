"""Whether Triton can run: installed, not switched off, and the tensor on CUDA.

CPU installs and CI have no Triton and run the torch references. On a GPU the kernels take over unless
GLIMPSE_TRITON=0 (to time or debug the reference path). Each op's public module (norms, ssd, attention,
...) adds its own shape rules to `triton_usable` and is the one place that decides for that op; the
`triton_*` modules only hold kernels and their launchers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

ENABLED = os.environ.get("GLIMPSE_TRITON", "1") != "0"

# Triton's interpreter runs the kernels on CPU tensors (tests only); some kernels take other code paths there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(t: torch.Tensor) -> bool:
    """Triton is installed, not switched off (GLIMPSE_TRITON=0), and `t` lives on a CUDA device."""
    return ENABLED and HAS_TRITON and t.is_cuda


@contextlib.contextmanager
def torch_only() -> Iterator[None]:
    """Within the block every op runs its torch reference, on CUDA too (GLIMPSE_TRITON=0 for a moment):
    how a benchmark times the reference on the same tensors."""
    global ENABLED
    saved, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = saved
