"""Triton, if installed. CPU installs and CI have none and run the torch references; on a GPU the
`triton_*` modules take over unless GLIMPSE_TRITON=0 (to time or debug the reference path)."""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

ENABLED = os.environ.get("GLIMPSE_TRITON", "1") != "0"
