"""Video input for the model: which frames to sample, decoding just those frames, and the per-frame prompt.

The sampling rule and the prompt text follow the reference processor exactly (MODEL_SPEC.md §5, API.md):
the model was trained on them. Decoding seeks to each sampled frame, so a two-hour file costs about as
much as a short one.
"""

from __future__ import annotations

import io
import logging
import math
import numbers
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import av
import numpy as np

from glimpse.errors import InvalidRequestError, LimitExceededError, MediaError

if TYPE_CHECKING:
    import torch
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

logger = logging.getLogger(__name__)

IMG_START = "<img>"
IMG_END = "</img>"
IMAGE_TOKEN = "<image>"

VideoSource = bytes | bytearray | memoryview | str | os.PathLike[str]


# --------------------------------------------------------------------------------------------- sampling


def prompt_timestamp(index: int, original_fps: float) -> float:
    """The time the prompt shows for a frame: integer milliseconds per source frame, as the reference does.

    This drifts from the true time (1% slow at 29.97 fps); `index / original_fps` is the true time.
    """
    return index * int(1000 / original_fps) / 1000


def _separator(k: int, seconds: float | None) -> str:
    """Text before frame k (1-based); frames after the first start on a new line, as in training."""
    newline = "\n" if k > 1 else ""
    if seconds is None:
        return f"{newline}Frame {k}: "
    return f"{newline}Frame {k} sampled at {seconds:.2f} seconds: "


def _check_sampling_args(fps: float, num_frames: int) -> None:
    """Reject sampling settings a user sent that would make no sense (400)."""
    if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise InvalidRequestError(f"video fps must be a positive number, got {fps!r}", param="fps")
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 1:
        raise InvalidRequestError(
            f"video num_frames must be a positive integer, got {num_frames!r}", param="num_frames"
        )


def sample_frames(
    total_frames: int, original_fps: float, fps: float = 2, num_frames: int = 128
) -> tuple[list[int], list[float], list[str]]:
    """Pick the frames the model sees: `fps` per second, at most `num_frames`, spread evenly.

    Returns (frame indices, prompt timestamps in seconds, separators), one entry per sampled frame.
    """
    _check_sampling_args(fps, num_frames)
    if total_frames < 1:
        raise MediaError("the video has no frames")
    if not (math.isfinite(original_fps) and original_fps > 0):
        raise MediaError(f"the video has no usable frame rate ({original_fps!r})")
    duration = total_frames / original_fps
    n = max(1, min(num_frames, total_frames, math.floor(duration * fps)))
    if n == total_frames:
        indices = list(range(total_frames))
    else:
        indices = [int(i) for i in np.linspace(0, total_frames - 1, n, dtype=int)]
    timestamps = [prompt_timestamp(i, original_fps) for i in indices]
    separators = [_separator(k, t) for k, t in enumerate(timestamps, start=1)]
    return indices, timestamps, separators


def separators_for_frame_list(num_frames: int, video_fps: float | None = None) -> list[str]:
    """Separators for frames given as a list (used as given): timed when their fps is known."""
    if video_fps is None:
        return [_separator(k, None) for k in range(1, num_frames + 1)]
    return [_separator(i + 1, prompt_timestamp(i, video_fps)) for i in range(num_frames)]


# --------------------------------------------------------------------------------------------- clips


@dataclass
class VideoClip:
    """Sampled frames and what the prompt and the response need to know about them.

    `timestamps` are what the prompt shows (reference formula); `seconds` are true times for users.
    Both are None for a frame list given without its fps, as are `original_fps` and `duration`.
    """

    frames: list[np.ndarray] | torch.Tensor  # HxWx3 uint8 arrays, or a uint8 tensor [T, H, W, 3]
    frame_indices: list[int]
    timestamps: list[float] | None
    seconds: list[float] | None
    separators: list[str]
    original_fps: float | None
    total_frames: int
    duration: float | None

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)


def _frame_array(frame: Any, k: int) -> np.ndarray:
    """One user-given frame as an HxWx3 uint8 array (PIL images are converted to RGB)."""
    if hasattr(frame, "convert") and hasattr(frame, "size"):  # a PIL image
        frame = frame.convert("RGB")
    array = np.asarray(frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise MediaError(
            f"video frame {k} must be a PIL image or an HxWx3 uint8 array, "
            f"got {array.dtype} with shape {tuple(array.shape)}"
        )
    return array


def clip_from_frames(
    frames: Sequence[Any], video_fps: float | None = None, *, max_frames: int = 1024
) -> VideoClip:
    """A clip from frames given as a list (multi_modal_data, as vLLM takes it): no sampling."""
    if len(frames) == 0:
        raise MediaError("the video frame list is empty")
    if len(frames) > max_frames:
        raise LimitExceededError(f"the video has {len(frames)} frames; at most {max_frames} are allowed")
    if video_fps is not None and not (math.isfinite(video_fps) and video_fps > 0):
        raise InvalidRequestError(
            f"video_fps must be a positive number, got {video_fps!r}", param="video_fps"
        )
    arrays = [_frame_array(f, k) for k, f in enumerate(frames, start=1)]
    count = len(arrays)
    indices = list(range(count))
    timed = video_fps is not None
    return VideoClip(
        frames=arrays,
        frame_indices=indices,
        timestamps=[prompt_timestamp(i, video_fps) for i in indices] if timed else None,
        seconds=[i / video_fps for i in indices] if timed else None,
        separators=separators_for_frame_list(count, video_fps),
        original_fps=float(video_fps) if timed else None,
        total_frames=count,
        duration=count / video_fps if timed else None,
    )


# --------------------------------------------------------------------------------------------- decoding


# Demuxers that make a "video" out of something else (text rendered as ANSI art, filter graphs, stream
# descriptions, playlists of other files): refused, so an upload can't pull in or render other data.
_REFUSED_FORMATS = frozenset({"tty", "lavfi", "ffmetadata", "sdp", "rtp", "rtsp", "concat", "hls", "dash"})
# Paths are local files only: no network or nested protocols (concat:, subfile:, ...) spelled in a path.
_PATH_PROTOCOLS = "file"
# In-memory bytes need no protocol at all; this matches none, so nested opens fail.
_BYTES_PROTOCOLS = "none"


def _reason(error: Exception) -> str:
    """FFmpeg's words for what went wrong, without the errno and file name noise."""
    return getattr(error, "strerror", None) or str(error)


def _open(source: VideoSource) -> InputContainer:
    """Open bytes (in memory, no temp file) or a path; anything that isn't a video file is a 400."""
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise MediaError("the video is empty (0 bytes)")
        target: Any = io.BytesIO(source)
        name, protocols = "the video data", _BYTES_PROTOCOLS
    else:
        target = os.fspath(source)
        name, protocols = f"the video file {target!r}", _PATH_PROTOCOLS
    try:
        container = av.open(target, mode="r", options={"protocol_whitelist": protocols})
    except FileNotFoundError as e:
        raise MediaError(f"{name} does not exist") from e
    except (av.error.FFmpegError, OSError) as e:
        raise MediaError(f"{name} is not a video that can be decoded ({_reason(e)})") from e
    if _REFUSED_FORMATS.intersection(container.format.name.split(",")):
        container.close()
        raise MediaError(f"{name} is not a video file (it reads as {container.format.long_name})")
    return container


def _video_stream(container: InputContainer) -> VideoStream:
    if not container.streams.video:
        raise MediaError("the file has no video stream (audio-only or not a video)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame and slice threads: decoding is the cost
    return stream


def _stream_fps(stream: VideoStream) -> float:
    """Average frame rate (frames / duration), right for variable frame rate too; else the guessed rate."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return float(rate)
    raise MediaError("the video stream has no frame rate")


def _stated_seconds(container: InputContainer, stream: VideoStream) -> float | None:
    """The duration the stream states, else the container's; None when neither does."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


class _KeyframeGuide:
    """Decides between seeking to a keyframe and decoding on, from the index when it covers the target.

    Without a usable index it learns the largest distance seen from a keyframe to a target, and decodes
    on when the next target is no farther than that (a seek would land no later than where we are).
    Either way a seek must skip more than `_MIN_SKIP` frames: a seek also flushes the decoder's threads,
    so skipping a few frames is slower than decoding them (measured on 640x360 H.264).
    """

    _MIN_SKIP = 16

    def __init__(self, stream: VideoStream, ticks_per_frame: float) -> None:
        self._index = getattr(stream, "index_entries", None)  # PyAV >= 16
        self._min_skip = self._MIN_SKIP * ticks_per_frame
        self._gap = 0.0

    def learn(self, keyframe_pts: int, target_pts: float) -> None:
        self._gap = max(self._gap, target_pts - keyframe_pts)

    def _indexed_keyframe(self, target: int) -> int | None:
        """Timestamp of the last keyframe at or before target, when the index reaches that far."""
        index = self._index
        if index is None or len(index) == 0 or index[-1].timestamp < target:
            return None
        i = index.search_timestamp(target, backward=True)
        return index[i].timestamp if i >= 0 else None

    def should_seek(self, current_pts: int, target_pts: float) -> bool:
        keyframe = self._indexed_keyframe(int(target_pts))
        if keyframe is not None:
            return keyframe - current_pts > self._min_skip
        return target_pts - current_pts > max(self._gap, self._min_skip)


class _FrameReader:
    """Decodes the frames showing at given presentation times, seeking when that beats decoding on.

    A target is met by the first frame whose pts reaches it, within half a nominal frame (pts are
    rounded to the time base, and variable frame rate streams only come close).
    """

    def __init__(self, container: InputContainer, stream: VideoStream, fps: float) -> None:
        self._container = container
        self._stream = stream
        self.ticks_per_frame = 1 / (fps * stream.time_base)
        self._ticks_per_second = 1 / stream.time_base
        self._tolerance = self.ticks_per_frame / 2
        self._guide = _KeyframeGuide(stream, self.ticks_per_frame)
        self._frames: Iterator[VideoFrame] = container.decode(stream)
        self._current: VideoFrame | None = None
        self._keyframe_pts = 0
        self._lowest = -1
        self.start_pts = 0
        self.decoded = 0
        self.seeks = 0

    def _next(self) -> VideoFrame | None:
        frame = next(self._frames, None)
        if frame is not None:
            self.decoded += 1
            if frame.pts is None:
                raise MediaError("the video has frames without timestamps and can't be sampled")
            if frame.key_frame:
                self._keyframe_pts = frame.pts
            self._current = frame
        return frame

    def first(self) -> VideoFrame:
        """The first frame; its pts is where the stream starts (not always 0)."""
        frame = self._next()
        if frame is None:
            raise MediaError("the video stream has no decodable frames")
        self.start_pts = frame.pts
        self._keyframe_pts = frame.pts
        self._lowest = min(0, frame.pts) - 1  # below every timestamp, B-frame dts included
        return frame

    def _seek(self, target: float) -> None:
        """Seek to the keyframe before target, backing off when the demuxer lands after it.

        Indexed containers land right the first time; MPEG-TS and the like search by dts and may not.
        """
        offset = math.floor(target)
        back = self._ticks_per_second
        while True:
            offset = max(offset, self._lowest)
            self._container.seek(offset, stream=self._stream, backward=True)
            self.seeks += 1
            self._current = None
            self._frames = self._container.decode(self._stream)
            frame = self._next()
            if offset == self._lowest or (frame is not None and frame.pts < target + self._tolerance):
                self._keyframe_pts = frame.pts if frame is not None else self.start_pts
                return
            offset = math.floor(offset - back)
            back *= 2

    def last_pts(self, stated_seconds: float | None) -> int:
        """The last frame's pts, from a seek near the end (for streams that don't state a frame count)."""
        seconds = stated_seconds if stated_seconds else 1e7
        self._seek(self.start_pts + seconds * self._ticks_per_second)
        while self._next() is not None:
            pass
        if self._current is None:
            raise MediaError("the video stream has no decodable frames")
        last = self._current.pts
        self._current = None  # the next target must seek
        return last

    def frame_at(self, target: float) -> VideoFrame:
        """The frame at target pts (the last frame when the stream ends before it)."""
        current = self._current
        if current is not None and current.pts >= target - self._tolerance:
            return current  # a variable frame rate can map two targets to one frame
        if current is None or self._guide.should_seek(current.pts, target):
            self._seek(target)
        frame = self._current
        while frame is not None and frame.pts < target - self._tolerance:
            frame = self._next()
        self._guide.learn(self._keyframe_pts, target)
        if self._current is None:
            raise MediaError("the video stream has no decodable frames")
        return self._current if frame is None else frame


def _total_frames(container: InputContainer, stream: VideoStream, reader: _FrameReader) -> int:
    """The stated frame count, else counted from the first and last timestamps (Matroska, MPEG-TS)."""
    if stream.frames:
        return int(stream.frames)
    last = reader.last_pts(_stated_seconds(container, stream))
    return round((last - reader.start_pts) / reader.ticks_per_frame) + 1


def _check_limits(seconds: float, sampled: int, max_seconds: float, max_frames: int) -> None:
    """413 when the video is too long or sampling it would give too many frames."""
    if seconds > max_seconds:
        raise LimitExceededError(f"the video is {seconds:.1f} s long; at most {max_seconds:g} s are allowed")
    if sampled > max_frames:
        raise LimitExceededError(
            f"sampling this video gives {sampled} frames; at most {max_frames} are allowed "
            "(lower fps or num_frames)"
        )


def _to_array(frame: VideoFrame, size: int | None) -> np.ndarray:
    """RGB HxWx3 uint8; `size` squashes to size x size here, before the full frame is ever copied."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    return frame.reformat(width=size, height=size, format="rgb24", interpolation="BICUBIC").to_ndarray()


def _decode_clip(
    container: InputContainer, fps: float, num_frames: int, limits: tuple[float, int], size: int | None
) -> VideoClip:
    """Probe, sample and decode; the first frame is decoded first because its pts anchors the rest."""
    started = time.perf_counter()
    stream = _video_stream(container)
    original_fps = _stream_fps(stream)
    max_seconds, max_frames = limits
    if stream.frames:  # reject a too-long file before decoding anything
        _check_limits(stream.frames / original_fps, 0, max_seconds, max_frames)
    reader = _FrameReader(container, stream, original_fps)
    first = reader.first()
    total = _total_frames(container, stream, reader)
    indices, timestamps, separators = sample_frames(total, original_fps, fps, num_frames)
    _check_limits(total / original_fps, len(indices), max_seconds, max_frames)
    arrays = []
    for index in indices:
        frame = first if index == 0 else reader.frame_at(reader.start_pts + index * reader.ticks_per_frame)
        arrays.append(_to_array(frame, size))
    logger.debug(
        "video: %d samples, %d frames decoded, %d seeks, %.3f s",
        len(indices),
        reader.decoded,
        reader.seeks,
        time.perf_counter() - started,
        extra={"decoded_frames": reader.decoded, "seeks": reader.seeks},
    )
    return VideoClip(
        frames=arrays,
        frame_indices=indices,
        timestamps=timestamps,
        seconds=[i / original_fps for i in indices],
        separators=separators,
        original_fps=original_fps,
        total_frames=total,
        duration=total / original_fps,
    )


def decode_video(
    source: VideoSource,
    fps: float = 2.0,
    num_frames: int = 128,
    *,
    max_frames: int = 1024,
    max_seconds: float = 21600,
    size: int | None = None,
) -> VideoClip:
    """Decode the sampled frames of a video (bytes or a path), seeking to each rather than decoding all.

    Raises MediaError (400) for input that isn't a decodable video, LimitExceededError (413) when it
    is longer than `max_seconds` or sampling gives more than `max_frames` frames.
    """
    _check_sampling_args(fps, num_frames)
    if size is not None and size < 1:
        raise InvalidRequestError(f"frame size must be positive, got {size}", param="size")
    container = _open(source)
    try:
        return _decode_clip(container, fps, num_frames, (max_seconds, max_frames), size)
    except av.error.FFmpegError as e:
        raise MediaError(f"the video can't be decoded ({_reason(e)})") from e
    finally:
        container.close()


# --------------------------------------------------------------------------------------------- prompt


class PromptPiece(NamedTuple):
    """One piece of a video's prompt, tokenised on its own with add_special_tokens=False.

    kind "text": `value` is a string (a separator, "<img>" or "</img>").
    kind "image": `value` is a count n of "<image>" placeholder tokens (0 for a fully pruned frame).
    """

    kind: Literal["text", "image"]
    value: str | int


def frame_prompt_text(clip: VideoClip, tokens_per_frame: Sequence[int]) -> list[PromptPiece]:
    """The video's prompt as a flat list: per frame, separator, "<img>", n_k "<image>", "</img>".

    Every frame yields exactly these four pieces, even one that keeps 0 tokens after EVS.
    """
    if len(tokens_per_frame) != clip.num_frames:
        raise ValueError(f"{len(tokens_per_frame)} token counts for {clip.num_frames} frames")
    pieces: list[PromptPiece] = []
    for separator, count in zip(clip.separators, tokens_per_frame):
        if count < 0:
            raise ValueError(f"a frame can't keep {count} tokens")
        pieces += [
            PromptPiece("text", separator),
            PromptPiece("text", IMG_START),
            PromptPiece("image", int(count)),
            PromptPiece("text", IMG_END),
        ]
    return pieces


def pieces_to_text(pieces: Sequence[PromptPiece]) -> str:
    """The prompt text the pieces stand for (image runs spelled out as "<image>" tokens)."""
    return "".join(str(v) if kind == "text" else IMAGE_TOKEN * int(v) for kind, v in pieces)
