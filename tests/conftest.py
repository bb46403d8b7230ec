"""Shared fixtures. Tests run on the CPU in float32; the built-in tiny models live in a per-session cache."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def _glimpse_cache(tmp_path_factory):
    """Keep the built-in tiny checkpoints out of the user's home, shared by every test of the run."""
    if "GLIMPSE_CACHE" not in os.environ:
        os.environ["GLIMPSE_CACHE"] = str(tmp_path_factory.mktemp("glimpse-cache"))
    yield
