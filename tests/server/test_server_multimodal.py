"""End to end with media: `glimpse serve tiny-vl` and images, videos and PDFs made in the test.

The server runs with small limits so that each refusal is cheap to provoke: at most 3 images, 1 video
and 2 files per request, 2,000,000 pixels per image; local files only inside a temporary folder;
private URLs refused (the default). Every media item is sent inline (data: URIs) or as a local file:
nothing leaves the machine.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server.server_process import Server, start_server, wait_idle

TOKENS_PER_TILE = 256
MAX_PIXELS = 2_000_000


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(media_dir):
    s = start_server(
        "tiny-vl", "--limit-mm-per-prompt", '{"image": 3, "video": 1, "file": 2}',
        "--max-image-pixels", str(MAX_PIXELS), "--allowed-local-media-path", str(media_dir),
    )  # fmt: skip
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()
    s.remove_log()


# ----------------------------------------------------------------------------------------------- media


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    if width * height <= 1_000_000:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
    else:  # big and flat: small to send, large to decode
        img = Image.new("RGB", (width, height), (int(rng.integers(0, 256)), 40, 90))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(width: int = 64, height: int = 64, seed: int = 0) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(png(width, height, seed), "image/png")}}


def mp4(num_frames: int = 16, fps: int = 8, size: int = 64) -> bytes:
    """A short clip of changing noise (so EVS has something to prune), encoded with PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(1)
        base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        for i in range(num_frames):
            frame = base.copy()
            frame[: (i + 1) * size // num_frames] = rng.integers(0, 256, 3, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def pdf(pages: int = 2) -> bytes:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    for _ in range(pages):
        doc.new_page(300, 400)
    buf = io.BytesIO()
    doc.save(buf)
    return buf.getvalue()


def chat(server: Server, parts: list[dict], text: str = "Describe.", **extra) -> httpx.Response:
    body = {"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
            **extra}  # fmt: skip
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def refused(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["type"] == "invalid_request_error"
    return err


def prompt_tokens(r: httpx.Response) -> int:
    return ok(r)["usage"]["prompt_tokens"]


# ----------------------------------------------------------------------------------------------- tests


def test_image(server: Server):
    text_only = prompt_tokens(chat(server, []))
    one = chat(server, [image_part()])
    body = ok(one)
    assert body["usage"]["prompt_tokens"] - text_only >= TOKENS_PER_TILE
    assert "video_tokens" not in body["usage"]
    # Tiles: a 2:1 image gets a 2x1 grid plus a thumbnail; max_num_tiles=1 leaves one tile.
    wide = image_part(1024, 512, seed=3)
    many = prompt_tokens(chat(server, [wide]))
    few = prompt_tokens(chat(server, [wide], mm_processor_kwargs={"max_num_tiles": 1}))
    assert many - few == 2 * TOKENS_PER_TILE


def test_several_images_and_stream(server: Server):
    parts = [image_part(seed=i) for i in range(3)]
    total = prompt_tokens(chat(server, parts))
    assert total >= 3 * TOKENS_PER_TILE
    body = {"model": "tiny-vl", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe."}]}]}  # fmt: skip
    events = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert events[-1]["usage"]["prompt_tokens"] == total


def test_video_and_evs(server: Server):
    video = {"type": "video_url", "video_url": {"url": data_uri(mp4(), "video/mp4")}}
    full = ok(chat(server, [video]))
    # 16 frames at 8 fps = 2 s; sampled at 2 fps: 4 frames of 256 tokens.
    assert full["usage"]["video_tokens"] == {"total": 4 * TOKENS_PER_TILE, "kept": 4 * TOKENS_PER_TILE}
    pruned = ok(chat(server, [video], video_pruning_rate=0.5))
    assert pruned["usage"]["video_tokens"] == {"total": 4 * TOKENS_PER_TILE, "kept": 2 * TOKENS_PER_TILE}
    assert full["usage"]["prompt_tokens"] - pruned["usage"]["prompt_tokens"] == 2 * TOKENS_PER_TILE
    fewer = ok(chat(server, [video], media_io_kwargs={"video": {"fps": 2, "num_frames": 3}}))
    assert fewer["usage"]["video_tokens"]["total"] == 3 * TOKENS_PER_TILE


def test_pdf_pages_are_not_images(server: Server):
    doc = pdf(pages=4)  # 4 pages > the 3-image limit: pages do not count as images
    nested = {"type": "file", "file": {"file_data": data_uri(doc, "application/pdf"), "filename": "a.pdf"}}
    flat = {"type": "input_file", "file_data": data_uri(doc, "application/pdf"), "filename": "a.pdf"}
    a = prompt_tokens(chat(server, [nested]))
    b = prompt_tokens(chat(server, [flat]))
    assert a == b >= 4 * TOKENS_PER_TILE
    refused(chat(server, [nested, flat, nested]), 400)  # 3 files > 2


def test_local_files(server: Server, media_dir):
    path = media_dir / "inside.png"
    path.write_bytes(png(64, 64, seed=9))
    assert (
        prompt_tokens(chat(server, [{"type": "image_url", "image_url": {"url": f"file://{path}"}}]))
        > TOKENS_PER_TILE
    )
    refused(chat(server, [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]), 400)
    refused(
        chat(server, [{"type": "image_url", "image_url": {"url": f"file://{media_dir}/../outside.png"}}]), 400
    )


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:{port}/health", "http://localhost:{port}/x.png", "http://10.1.2.3/x.png",
     "http://169.254.169.254/latest/meta-data", "http://[::1]:{port}/x.png", "http://192.168.0.1/x.png"],
)  # fmt: skip
def test_private_urls_refused(server: Server, url: str):
    r = chat(server, [{"type": "image_url", "image_url": {"url": url.format(port=server.port)}}])
    refused(r, 400)


def test_too_many_items(server: Server):
    err = refused(chat(server, [image_part(seed=i) for i in range(4)]), 400)
    assert "4 images" in err["message"]
    video = {"type": "video_url", "video_url": {"url": data_uri(b"not decoded", "video/mp4")}}
    refused(chat(server, [video, video]), 400)


def test_limits_and_bad_media(server: Server):
    refused(chat(server, [image_part(2000, MAX_PIXELS // 2000 + 1)]), 413)
    broken = {"type": "image_url", "image_url": {"url": data_uri(b"definitely not a png", "image/png")}}
    refused(chat(server, [broken]), 400)
    refused(
        chat(server, [{"type": "video_url", "video_url": {"url": data_uri(b"\x00" * 64, "video/mp4")}}]), 400
    )
    not_pdf = {"type": "file", "file": {"file_data": data_uri(b"hello", "application/pdf")}}
    refused(chat(server, [not_pdf]), 400)
    refused(chat(server, [{"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}]), 400)


def test_idle_after_all(server: Server):
    wait_idle(server, timeout=30)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
