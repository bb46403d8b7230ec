"""Inputs generated for the agents' tests: a video of several minutes with scene changes, PDFs, images."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

SCENE_COLOURS = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 200, 40), (140, 40, 160), (30, 170, 170)]


def make_video(path: Path, seconds: float = 200.0, fps: int = 4, scene_seconds: float = 40.0,
               size: tuple[int, int] = (160, 120), codec: str = "libx264") -> Path:  # fmt: skip
    """A colour per scene (a cut every `scene_seconds`), a square moving within it, H.264 in MP4."""
    w, h = size
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(fps * 2)}
        for i in range(int(seconds * fps)):
            t = i / fps
            scene = int(t // scene_seconds)
            frame = np.empty((h, w, 3), np.uint8)
            frame[:] = SCENE_COLOURS[scene % len(SCENE_COLOURS)]
            x = int((t % scene_seconds) / scene_seconds * (w - 20))
            frame[h // 2 - 10 : h // 2 + 10, x : x + 20] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def page_image(title: str, lines: list[str], size: tuple[int, int] = (612, 792)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((40, 40), title, fill="black")
    for k, line in enumerate(lines):
        draw.text((40, 80 + 20 * k), line, fill="black")
    return image


def make_pdf(path: Path, pages: int = 5, title: str = "Invoice") -> Path:
    images = [page_image(f"{title} page {p + 1}", [f"Item {p}-{k}: {10 * k + p} EUR" for k in range(6)])
              for p in range(pages)]  # fmt: skip
    images[0].save(path, format="PDF", save_all=True, append_images=images[1:], resolution=72.0)
    return path


def make_image(path: Path, text: str = "Receipt total 42 EUR") -> Path:
    page_image("Receipt", [text], size=(400, 300)).save(path)
    return path


def pdf_bytes(pages: int = 2) -> bytes:
    buf = io.BytesIO()
    images = [page_image(f"page {p + 1}", []) for p in range(pages)]
    images[0].save(buf, format="PDF", save_all=True, append_images=images[1:])
    return buf.getvalue()
