from __future__ import annotations

import pytest

from glimpse.model.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny4(tmp_path_factory) -> str:
    """The tiny text model with 4 Mamba groups (the built-in has 2), so that it splits four ways."""
    return str(make_tiny(tmp_path_factory.mktemp("tiny4"), n_groups=4))


@pytest.fixture(scope="session")
def tiny4_vl(tmp_path_factory) -> str:
    """The tiny VL model with 4 Mamba groups."""
    return str(make_tiny(tmp_path_factory.mktemp("tiny4-vl"), vl=True, n_groups=4))
