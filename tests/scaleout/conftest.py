"""One local Ray cluster for the Ray tests (2 CPUs, started and stopped here); skipped, with the reason,
only where Ray is not installed (`pip install glimpse-vl[ray]`; .ci/run installs it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install glimpse-vl[ray]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
