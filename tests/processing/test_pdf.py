"""PDF pages to images, with documents made in the test."""

from __future__ import annotations

import io

import pypdfium2 as pdfium
import pytest

from glimpse.errors import LimitExceededError, MediaError
from glimpse.processing import pdf
from glimpse.processing.media import Cancellation, Cancelled
from glimpse.processing.pdf import pdf_page_count, render_pdf

LETTER = (612, 792)  # points
A4 = (595, 842)


def make_pdf(*sizes: tuple[float, float], rotate_first: int = 0) -> bytes:
    doc = pdfium.PdfDocument.new()
    for width, height in sizes:
        page = doc.new_page(width, height)
        if rotate_first and len(doc) == 1:
            page.set_rotation(rotate_first)
        page.close()
    out = io.BytesIO()
    doc.save(out)
    doc.close()
    return out.getvalue()


def test_page_count() -> None:
    assert pdf_page_count(make_pdf(LETTER, A4, LETTER)) == 3


def test_letter_and_a4_render_near_1000x1400() -> None:
    pages = render_pdf(make_pdf(LETTER, A4))
    assert [p.mode for p in pages] == ["RGB", "RGB"]
    (lw, lh), (aw, ah) = pages[0].size, pages[1].size
    assert (lw, lh) == (1020, 1320)  # 8.5 x 11 in at 120 dpi
    assert abs(aw - 992) <= 1 and abs(ah - 1404) <= 1  # 210 x 297 mm at 120 dpi
    for w, h in (pages[0].size, pages[1].size):
        assert 900 <= w <= 1100 and 1250 <= h <= 1500


def test_blank_page_is_white() -> None:
    page = render_pdf(make_pdf(A4))[0]
    assert page.getpixel((10, 10)) == (255, 255, 255)


def test_dpi_and_rotation() -> None:
    pages = render_pdf(make_pdf(LETTER, rotate_first=90), dpi=72)
    assert pages[0].size == (792, 612)


def test_huge_page_is_scaled_down() -> None:
    page = render_pdf(make_pdf((14400, 14400)), max_page_pixels=1_000_000)[0]  # 200 x 200 inches
    assert page.width * page.height <= 1_000_000
    assert abs(page.width - 1000) <= 1


def test_too_many_pages() -> None:
    data = make_pdf(*[LETTER] * 5)
    with pytest.raises(LimitExceededError) as err:
        render_pdf(data, max_pages=4)
    assert "5 pages" in err.value.message and "4" in err.value.message
    assert err.value.status == 413
    assert len(render_pdf(data, max_pages=5)) == 5


@pytest.mark.parametrize("data", [b"", b"hello, not a pdf", b"\x89PNG\r\n\x1a\n" + b"\0" * 64])
def test_not_a_pdf(data: bytes) -> None:
    with pytest.raises(MediaError) as err:
        render_pdf(data)
    assert err.value.status == 400


def test_corrupt_pdf() -> None:
    data = make_pdf(LETTER)
    with pytest.raises(MediaError, match="PDF"):
        render_pdf(b"%PDF-1.7\n" + b"garbage " * 50)
    with pytest.raises(MediaError):
        pdf_page_count(data[:40])


def test_page_sizes_are_known_before_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    """`before_rendering` sees every page's pixel size, exactly as rendered, before any page is drawn."""
    data = make_pdf(LETTER, A4, (14400, 14400), LETTER, rotate_first=90)
    seen: list[list[tuple[int, int]]] = []
    pages = render_pdf(data, max_page_pixels=1_000_000, before_rendering=seen.append)
    assert seen == [[p.size for p in pages]]

    drawn = []
    real = pdf._render_page
    monkeypatch.setattr(pdf, "_render_page", lambda *args: drawn.append(1) or real(*args))

    def refuse(sizes: list[tuple[int, int]]) -> None:
        raise LimitExceededError(f"{len(sizes)} pages are too many tiles")

    with pytest.raises(LimitExceededError, match="4 pages"):
        render_pdf(data, before_rendering=refuse)
    assert drawn == []


def test_cancelled_rendering_stops_between_pages() -> None:
    cancel = Cancellation()
    cancel.set()
    with pytest.raises(Cancelled):
        render_pdf(make_pdf(LETTER, LETTER), cancel=cancel)
