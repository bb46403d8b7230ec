"""Reading a video file for the agents: probe it, scan cheap thumbnails, decode frames at given times.

Times are seconds from the start of the file: a frame's presentation time minus the stream's start
time, so they match what a `<video>` element shows. Frames for the model are decoded straight to the
512x512 square the model squashes every video frame to (as the engine's own decoder does), so nothing is
resized twice. Clips for an HTTP server travel as a small H.264 file whose frame rate makes the server
sample exactly the frames given.
"""

from __future__ import annotations

import base64
import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

MODEL_FRAME_SIZE = 512  # the tile size: every video frame becomes one 512x512 tile
THUMB_WIDTH = 160


class VideoReadError(ValueError):
    """The file can't be read as a video (missing, corrupt, no video stream)."""


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds
    fps: float
    width: int
    height: int


@dataclass
class Thumbnail:
    t: float  # seconds from the start of the file
    image: np.ndarray  # HxWx3 uint8, THUMB_WIDTH wide


@dataclass
class Clip:
    """Frames for the model, evenly spaced by `1 / fps` seconds from `times[0]`.

    `times` are the true times of the decoded frames in the file; the prompt numbers the frames from
    0 at `fps` (clip time), and `start` maps clip time back to file time.
    """

    frames: list[np.ndarray]
    times: list[float]
    fps: float

    @property
    def start(self) -> float:
        return self.times[0]


def _open(path: str | Path):
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError) as e:
        raise VideoReadError(f"{path}: not a readable video ({getattr(e, 'strerror', None) or e})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: the file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _start_seconds(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def probe(path: str | Path) -> VideoInfo:
    container, stream = _open(path)
    try:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 25.0
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = _duration_by_decoding(container, stream)
        width, height = stream.codec_context.width, stream.codec_context.height
    finally:
        container.close()
    if not duration or duration <= 0 or not width:
        raise VideoReadError(f"{path}: the video states no duration or size")
    return VideoInfo(duration=float(duration), fps=fps, width=width, height=height)


def _duration_by_decoding(container, stream) -> float:
    start, last = _start_seconds(stream), 0.0
    for frame in container.decode(stream):
        if frame.time is not None:
            last = frame.time - start
    return last


def _thumb(frame) -> np.ndarray:
    height = max(2, round(THUMB_WIDTH * frame.height / max(1, frame.width) / 2) * 2)
    return frame.to_ndarray(format="rgb24", width=THUMB_WIDTH, height=height)


SCAN_PIECE_SECONDS = 300.0  # a long file is scanned in pieces of about this length, in parallel
SCAN_THREADS = 8


def scan_thumbnails(path: str | Path, info: VideoInfo, every: float = 2.0) -> list[Thumbnail]:
    """Small frames about `every` seconds apart, cheaply: keyframes only when they are that dense,
    else one decoding pass that keeps a frame per `every` seconds. A long file is cut into time pieces
    scanned by threads at once (each seeks to its piece), then joined in order."""
    thumbs = _scan_pieces(path, info, keyframes_only=True, every=every)
    sparse = len(thumbs) < 2 or (info.duration / len(thumbs)) > 2 * every
    return _scan_pieces(path, info, keyframes_only=False, every=every) if sparse else thumbs


def _scan_pieces(path: str | Path, info: VideoInfo, keyframes_only: bool, every: float) -> list[Thumbnail]:
    pieces = max(1, min(64, math.ceil(info.duration / SCAN_PIECE_SECONDS)))
    if pieces == 1:
        return _scan(path, keyframes_only, every)
    bounds = [info.duration * k / pieces for k in range(pieces + 1)]
    bounds[-1] = math.inf
    with ThreadPoolExecutor(min(SCAN_THREADS, pieces)) as pool:
        parts = list(
            pool.map(lambda k: _scan(path, keyframes_only, every, bounds[k], bounds[k + 1]), range(pieces))
        )
    return [t for part in parts for t in part]


def _scan(
    path: str | Path, keyframes_only: bool, every: float, lo: float = 0.0, hi: float = math.inf
) -> list[Thumbnail]:
    """Thumbnails of the frames at lo <= t < hi (seconds from the start)."""
    container, stream = _open(path)
    if keyframes_only:
        stream.codec_context.skip_frame = "NONKEY"
    start, out = _start_seconds(stream), []
    next_t = lo
    try:
        if lo > 0:
            container.seek(
                int((lo + start) / stream.time_base), stream=stream, backward=True, any_frame=False
            )
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            t = max(0.0, frame.time - start)
            if t >= hi:
                break
            if t + 1e-6 >= next_t:
                out.append(Thumbnail(t, _thumb(frame)))
                next_t = t + (every / 2 if keyframes_only else every)
    except av.error.FFmpegError as e:
        if not out and lo == 0:
            raise VideoReadError(f"{path}: decoding failed ({e})") from None
    finally:
        container.close()
    return out


def frames_at(
    path: str | Path, times: list[float], size: tuple[int, int] | None = (MODEL_FRAME_SIZE, MODEL_FRAME_SIZE)
) -> list[tuple[float, np.ndarray]]:
    """The frame showing at each time (sorted ascending), as (true time, HxWx3 uint8).

    Seeks to the keyframe before a target unless the target is close ahead, then decodes forward.
    `size` (width, height) resizes as the engine does (bicubic); None keeps the full frame.
    """
    container, stream = _open(path)
    start = _start_seconds(stream)
    rate = stream.average_rate or stream.guessed_rate
    half_frame = 0.5 / float(rate) if rate else 0.02
    out: list[tuple[float, np.ndarray]] = []
    decoder = None
    prev = ahead = None  # (time, frame): the last frame at or before the target, and one decoded past it

    def convert(frame) -> np.ndarray:
        if size is None:
            return frame.to_ndarray(format="rgb24")
        w, h = size
        return frame.reformat(width=w, height=h, format="rgb24", interpolation="BICUBIC").to_ndarray()

    try:
        for target in times:
            position = ahead[0] if ahead is not None else prev[0] if prev is not None else None
            if decoder is None or position is None or target - position > 3.0 or target < position - 3.0:
                ts = int(max(0.0, target + start - 1e-3) / stream.time_base)
                container.seek(ts, stream=stream, backward=True, any_frame=False)
                decoder, prev, ahead = container.decode(stream), None, None
            while True:
                if ahead is None:
                    frame = next(decoder, None)
                    if frame is None:
                        break
                    if frame.time is None:
                        continue
                    ahead = (max(0.0, frame.time - start), frame)
                if ahead[0] > target + half_frame:
                    break
                prev, ahead = ahead, None
            chosen = prev or ahead  # before the first frame: the first; past the end: the last
            if chosen is None:
                raise VideoReadError(f"{path}: no frame at {target:.2f} s")
            out.append((chosen[0], convert(chosen[1])))
    except av.error.FFmpegError as e:
        raise VideoReadError(f"{path}: decoding failed ({e})") from None
    finally:
        container.close()
    return out


def evenly_spaced(start: float, end: float, fps: float, max_frames: int) -> tuple[list[float], float]:
    """Sample times from `start`, `1/rate` apart, covering [start, end): at most `max_frames`, at least 1.

    Returns (times, rate); the spacing is whole milliseconds so the clip's frame rate is exact.
    """
    length = max(0.0, end - start)
    n = max(1, min(max_frames, math.floor(length * fps + 1e-9)))
    step_ms = max(1, round(1000 * length / n)) if n > 1 else max(1, round(1000 / fps))
    times = [start + k * step_ms / 1000 for k in range(n)]
    return times, 1000 / step_ms


def read_clip(path: str | Path, start: float, end: float, fps: float, max_frames: int) -> Clip:
    times, rate = evenly_spaced(start, end, fps, max_frames)
    decoded = frames_at(path, times)
    return Clip(frames=[f for _, f in decoded], times=[t for t, _ in decoded], fps=rate)


def encode_clip(clip: Clip) -> bytes:
    """The clip as a small MP4 (H.264) at its own frame rate: a server sampling it at any rate at least
    that high with `num_frames = len(frames)` gets exactly these frames, timed as in the prompt."""
    buf = io.BytesIO()
    rate = Fraction(clip.fps).limit_denominator(1000)
    with av.open(buf, mode="w", format="mp4") as out:
        h, w = clip.frames[0].shape[:2]
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "16", "preset": "veryfast", "g": "1"}
        for array in clip.frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def jpeg_bytes(image: Image.Image | np.ndarray, quality: int = 90) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
