"""Where the Triton kernel tests run: CUDA, or (for debugging on a CPU) Triton's interpreter when both
TRITON_INTERPRET=1 and GLIMPSE_TEST_INTERPRET=1 are set; otherwise the whole module is skipped, so CPU
CI needs no Triton."""

from __future__ import annotations

import os

import pytest
import torch


def triton_test_device() -> str:
    interpret = os.environ.get("GLIMPSE_TEST_INTERPRET") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available():
        device = "cuda"
    elif interpret:
        device = "cpu"
    else:
        pytest.skip("the Triton kernels need CUDA", allow_module_level=True)
    pytest.importorskip("triton")
    return device
