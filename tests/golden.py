"""The golden vectors of shared/reference/ (tiling, EVS, video prompts), found inside the checkout or
beside it. Missing files skip their cases on a developer's machine but fail under CI, where shared/ is
always beside the clone: a golden test that silently skips proves nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def find_reference(name: str) -> Path | None:
    here = Path(__file__).resolve()
    roots = [Path(os.environ["GLIMPSE_SHARED"])] if "GLIMPSE_SHARED" in os.environ else []
    roots += [parent / "shared" for parent in here.parents]
    for shared in roots:
        if (shared / "reference" / name).is_file():
            return shared / "reference" / name
    return None


def golden_cases(name: str) -> list:
    path = find_reference(name)
    if path is not None:
        return json.loads(path.read_text())["cases"]
    if os.environ.get("CI"):
        raise FileNotFoundError(f"shared/reference/{name} not found beside the checkout")
    skip = pytest.mark.skip(reason=f"shared/reference/{name} not found")
    return [pytest.param(None, marks=skip, id="golden-file-missing")]
