"""PDF documents to page images (pypdfium2), so a document is just a list of images to the model.

120 dpi renders a US-letter page at 1020x1320 and an A4 page at 992x1404: about the 1k-wide pages the
model card suggests, readable after tiling, without wasting pixels.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pypdfium2 as pdfium
from PIL import Image

from glimpse.errors import LimitExceededError, MediaError
from glimpse.processing.media import Cancelled

DEFAULT_DPI = 120.0
DEFAULT_MAX_PAGES = 32
DEFAULT_MAX_PAGE_PIXELS = 16_777_216  # 4096², a poster-sized page is scaled down to this
_POINTS_PER_INCH = 72.0

# PDFium is not thread-safe, not even across different documents: every call goes through this lock.
_PDFIUM_LOCK = threading.Lock()


def _open(data: bytes) -> pdfium.PdfDocument:
    """Open a document from bytes or raise a MediaError saying why it isn't a usable PDF."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise MediaError("the PDF is empty")
    if b"%PDF" not in bytes(data[:1024]):
        raise MediaError("the file is not a PDF (no %PDF header); send a PDF document")
    try:
        return pdfium.PdfDocument(bytes(data))
    except pdfium.PdfiumError as e:
        detail = str(e)
        if "password" in detail.lower():
            raise MediaError("the PDF is encrypted with a password; send an unencrypted PDF") from None
        raise MediaError(f"the PDF is corrupt or unreadable ({detail})") from None


def pdf_page_count(data: bytes) -> int:
    """Pages in a PDF, without rendering anything."""
    with _PDFIUM_LOCK:
        doc = _open(data)
        try:
            return len(doc)
        finally:
            doc.close()


def _page_scale(width_pt: float, height_pt: float, dpi: float, max_page_pixels: int) -> float:
    """Scale from points to pixels at `dpi`, reduced so one page stays under `max_page_pixels`."""
    scale = dpi / _POINTS_PER_INCH
    pixels = width_pt * scale * height_pt * scale
    if pixels > max_page_pixels:
        scale *= math.sqrt(max_page_pixels / pixels)
    return scale


def _page_layout(
    doc: pdfium.PdfDocument, index: int, dpi: float, max_page_pixels: int
) -> tuple[float, int, int]:
    """(scale, width, height) of a page's rendering, from its size alone: nothing is drawn. The pixel
    size is the one PDFium's renderer gives (points x scale, rounded up)."""
    page = doc[index]
    try:
        width_pt, height_pt = page.get_size()  # already turned by the page's /Rotate
    except pdfium.PdfiumError as e:
        raise MediaError(f"page {index + 1} of the PDF could not be read ({e})") from None
    finally:
        page.close()
    if not (width_pt > 0 and height_pt > 0):
        raise MediaError(f"page {index + 1} of the PDF has no area ({width_pt}x{height_pt} points)")
    scale = _page_scale(width_pt, height_pt, dpi, max_page_pixels)
    return scale, math.ceil(width_pt * scale), math.ceil(height_pt * scale)


def _render_page(doc: pdfium.PdfDocument, index: int, scale: float) -> Image.Image:
    page = doc[index]
    try:
        bitmap = page.render(scale=scale, draw_annots=True)
        try:
            # to_pil() may share the bitmap's memory, which close() frees: copy before closing.
            image = bitmap.to_pil()
            return image.copy() if image.mode == "RGB" else image.convert("RGB")
        finally:
            bitmap.close()
    except pdfium.PdfiumError as e:
        raise MediaError(f"page {index + 1} of the PDF could not be rendered ({e})") from None
    finally:
        page.close()


def render_pdf(
    data: bytes,
    max_pages: int = DEFAULT_MAX_PAGES,
    dpi: float = DEFAULT_DPI,
    max_page_pixels: int = DEFAULT_MAX_PAGE_PIXELS,
    *,
    before_rendering: Callable[[list[tuple[int, int]]], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[Image.Image]:
    """Render every page to an RGB image, in order.

    Refuses a document over `max_pages` before rendering anything (LimitExceededError, 413) and
    anything that isn't a readable PDF (MediaError, 400). `before_rendering` gets every page's pixel
    size (width, height) before the first page is drawn, and may refuse the document by raising (a
    caller that counts the tiles the pages will take). Rendering stops with `Cancelled` between pages
    once `cancel` is set.
    """
    if dpi <= 0:
        raise ValueError(f"dpi must be positive, got {dpi}")
    with _PDFIUM_LOCK:
        doc = _open(data)
        try:
            count = len(doc)
            if count == 0:
                raise MediaError("the PDF has no pages")
            if count > max_pages:
                raise LimitExceededError(
                    f"the PDF has {count} pages; at most {max_pages} pages are allowed per document"
                )
            layouts = [_page_layout(doc, i, dpi, max_page_pixels) for i in range(count)]
            if before_rendering is not None:
                before_rendering([(width, height) for _, width, height in layouts])
            pages = []
            for i, (scale, _, _) in enumerate(layouts):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("the request was cancelled")
                pages.append(_render_page(doc, i, scale))
            return pages
        finally:
            doc.close()
