"""Inputs shared by the agents' tests, generated once per session."""

from __future__ import annotations

import pytest

from tests.agents.generated import make_image, make_pdf, make_video


@pytest.fixture(scope="session")
def video_file(tmp_path_factory):
    """200 s at 4 fps, 160x120, a scene change every 40 s."""
    return make_video(tmp_path_factory.mktemp("video") / "scenes.mp4")


@pytest.fixture(scope="session")
def documents(tmp_path_factory):
    """Two PDFs (5 and 2 pages), a PNG, and a corrupt 'PDF'."""
    root = tmp_path_factory.mktemp("docs")
    corrupt = root / "c-corrupt.pdf"
    corrupt.write_bytes(b"%PDF-1.4\nthis is not a real PDF\n")
    return [make_pdf(root / "a-invoice.pdf", pages=5), make_pdf(root / "b-short.pdf", pages=2, title="Memo"),
            corrupt, make_image(root / "d-receipt.png")]  # fmt: skip
