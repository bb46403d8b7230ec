"""Decoding the sampled frames of a video file with PyAV: the sampling rule (video.py) picks the frames,
and decoding seeks to each, so a two-hour file costs about as much as a short one; a long clip's samples
are split into groups that threads decode at once, each on its own container.
"""

from __future__ import annotations

import io
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from glimpse.errors import InvalidRequestError, LimitExceededError, MediaError
from glimpse.processing.media import Cancellation, Cancelled
from glimpse.processing.video import VideoClip, check_sampling_args, sample_frames, sampled_count

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

logger = logging.getLogger(__name__)

VideoSource = bytes | bytearray | memoryview | str | os.PathLike[str]


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


def _frames_from_duration(container: InputContainer, stream: VideoStream, fps: float) -> int | None:
    """At least how many frames the stated durations imply, for files that state no frame count; None
    when none is stated. Containers disagree on whether their duration counts from 0 or from the first
    timestamp (Matroska that starts late states its end), so the shortest reading is taken, less a
    frame for rounding: the estimate refuses only what the exact count would refuse too."""
    readings = []
    if stream.duration and stream.time_base:
        readings.append(float(stream.duration * stream.time_base))
    if container.duration:
        seconds = container.duration / av.time_base
        readings.append(seconds)
        if container.start_time and seconds > container.start_time / av.time_base:
            readings.append(seconds - container.start_time / av.time_base)
    frames = min(readings, default=0.0) * fps
    if not (math.isfinite(frames) and frames >= 2):
        return None
    return math.floor(frames) - 1


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

    def indexed_keyframe(self, target: int) -> int | None:
        """Timestamp of the last keyframe at or before target, when the index reaches that far."""
        index = self._index
        if index is None or len(index) == 0 or index[-1].timestamp < target:
            return None
        i = index.search_timestamp(target, backward=True)
        return index[i].timestamp if i >= 0 else None

    def index_lag(self, start_pts: int) -> int:
        """How far the index's times lie below the frames' pts (an estimate, from the first keyframe).

        MP4 indexes decode times, which B-frames put before presentation times (two frames, often);
        Matroska indexes presentation times.
        """
        index = self._index
        if index is None or len(index) == 0:
            return 0
        return max(0, start_pts - index[0].timestamp)

    def should_seek(self, current_pts: int, target_pts: float) -> bool:
        keyframe = self.indexed_keyframe(int(target_pts))
        if keyframe is not None:
            return keyframe - current_pts > self._min_skip
        return target_pts - current_pts > max(self._gap, self._min_skip)


class _Cancelled(Cancelled):
    """Stops a decoding thread whose frames are no longer wanted (another group failed, or the request
    that wanted the video is gone)."""


class _FrameReader:
    """Decodes the frames showing at given presentation times, seeking when that beats decoding on.

    A target is met by the first frame whose pts reaches it, within half a nominal frame (pts are
    rounded to the time base, and variable frame rate streams only come close). With `cancel`, every
    frame first checks it and raises _Cancelled once it is set.
    """

    def __init__(
        self,
        container: InputContainer,
        stream: VideoStream,
        fps: float,
        cancel: threading.Event | None = None,
    ) -> None:
        self._container = container
        self._stream = stream
        self._cancel = cancel
        self.ticks_per_frame = 1 / (fps * stream.time_base)
        self._ticks_per_second = 1 / stream.time_base
        self._tolerance = self.ticks_per_frame / 2
        self.guide = _KeyframeGuide(stream, self.ticks_per_frame)
        self._frames: Iterator[VideoFrame] = container.decode(stream)
        self._current: VideoFrame | None = None
        self._keyframe_pts = 0
        self._lowest = -1
        self.start_pts = 0
        self.decoded = 0
        self.seeks = 0

    def _next(self) -> VideoFrame | None:
        if self._cancel is not None and self._cancel.is_set():
            raise _Cancelled
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

    def follow(self, probe: _FrameReader) -> None:
        """Take the stream's start from `probe`, a reader of the same file that has read its first frame.

        This reader's container must be fresh (nothing read): its first target seeks.
        """
        self.start_pts = probe.start_pts
        self._keyframe_pts = probe.start_pts
        self._lowest = probe._lowest

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
        if current is None or self.guide.should_seek(current.pts, target):
            self._seek(target)
        frame = self._current
        while frame is not None and frame.pts < target - self._tolerance:
            frame = self._next()
        self.guide.learn(self._keyframe_pts, target)
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


# Decoding in threads only when the samples need at least this much work (pixels of the frames they
# need decoded, a seek counted as _SEEK_FRAMES frames): two frames of 1080p, 18 of 640x360. Below it
# the time is mostly opening containers and starting threads; on two cores threads already tie with
# one thread at a tenth of this and win from a quarter of it (64x48 clips), so this is conservative.
_PARALLEL_MIN_PIXELS = 1 << 22
# What a seek costs, in frames decoded (it also flushes the decoder's threads); see _KeyframeGuide.
_SEEK_FRAMES = _KeyframeGuide._MIN_SKIP


def _cpu_count() -> int:
    """Cores this process may run on (the affinity mask, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """Decoding threads for one video when the caller names none: one per core, at most 8."""
    return min(8, _cpu_count())


def _plan_groups(targets: Sequence[float], probe: _FrameReader, workers: int) -> tuple[list[range], float]:
    """Split the samples into at most `workers` contiguous groups, balanced by the frames each decodes.

    A group may start only at a sample whose keyframe (from the index) comes after the sample before it,
    so no two groups decode the same frames. Where the index doesn't reach (MPEG-TS, Matroska with few
    cues), a group may start where two samples are more than `_MIN_SKIP` frames apart, where the reader
    would seek too; that costs at most one GOP decoded twice per group. Returns the groups (positions
    in `targets`) and an estimate of the frames they decode in all.
    """
    count = len(targets)
    ticks_per_frame = probe.ticks_per_frame
    min_skip = _KeyframeGuide._MIN_SKIP * ticks_per_frame
    lag = probe.guide.index_lag(probe.start_pts)

    def keyframe(k: int) -> float | None:
        """The pts of the keyframe a seek to sample k lands on, when the index tells."""
        key = probe.guide.indexed_keyframe(int(targets[k] - lag))
        return None if key is None else key + lag

    starts = [0]  # runs: samples decoded with no seek between them; a run starts with a seek
    for k in range(1, count):
        key = keyframe(k)
        apart = key > targets[k - 1] if key is not None else targets[k] - targets[k - 1] > min_skip
        if apart:
            starts.append(k)
    ends = [*starts[1:], count]
    costs = []
    for first, end in zip(starts, ends):
        key = keyframe(first)
        origin = key if key is not None else targets[first] - min_skip
        costs.append(max(0.0, targets[end - 1] - origin) / ticks_per_frame + 1 + _SEEK_FRAMES)
    total = sum(costs)
    groups = min(workers, len(starts))
    cuts = [0]  # runs that start a group
    if groups > 1:
        prefix = np.cumsum(costs)  # prefix[r]: cost of runs 0..r
        for g in range(1, groups):
            goal = total * g / groups
            r = int(np.searchsorted(prefix, goal))  # first run whose prefix reaches the goal
            # a group starting at run r has prefix[r - 1] before it; one starting at r + 1, prefix[r]
            before = prefix[r - 1] if r > 0 else 0.0
            cut = r + 1 if r + 1 < len(starts) and prefix[r] - goal < goal - before else r
            cut = max(cut, cuts[-1] + 1)
            if cut >= len(starts):
                break
            cuts.append(cut)
    bounds = [starts[c] for c in cuts] + [count]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])], total


def _decode_groups(
    source: VideoSource,
    probe: _FrameReader,
    fps: float,
    targets: Sequence[float],
    groups: Sequence[range],
    done: dict[int, np.ndarray],
    size: int | None,
    request: Cancellation | None,
) -> tuple[list[np.ndarray], int, int]:
    """Decode each group in its own thread on its own container; frames come back in sample order.

    PyAV lets go of the GIL while FFmpeg reads, decodes and scales, so the groups run at once; each
    container is opened, used and closed by one thread. FFmpeg's own threads per container are cut so
    that all of them together stay near the core count. `done` holds samples already decoded (by
    position). When a group fails the others stop at their next frame, and the first error (in sample
    order) is raised here, in the calling thread, once every thread has finished. A cancelled `request`
    stops them all the same way. Returns (frames, frames decoded, seeks).
    """
    arrays: list[np.ndarray | None] = [done.get(k) for k in range(len(targets))]
    threads = max(1, _cpu_count() // len(groups))
    cancel = threading.Event()

    def decode(group: range) -> tuple[int, int]:
        if all(arrays[k] is not None for k in group):
            return 0, 0
        container = None
        try:
            if cancel.is_set():
                raise _Cancelled
            container = _open(source)
            stream = _video_stream(container)
            stream.thread_count = threads
            reader = _FrameReader(container, stream, fps, cancel)
            reader.follow(probe)
            for k in group:
                if arrays[k] is None:
                    arrays[k] = _to_array(reader.frame_at(targets[k]), size)
            return reader.decoded, reader.seeks
        except BaseException:
            cancel.set()
            raise
        finally:
            if container is not None:
                container.close()

    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="glimpse-video") as pool:
        futures = [pool.submit(decode, group) for group in groups]
        try:
            with request.on_cancel(cancel.set) if request is not None else nullcontext():
                wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            cancel.set()  # when a group failed or this thread was interrupted; a no-op once all are done
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
    counts = [f.result() for f in futures]
    assert all(a is not None for a in arrays)
    return arrays, sum(c[0] for c in counts), sum(c[1] for c in counts)  # type: ignore[return-value]


def _decode_clip(
    source: VideoSource,
    container: InputContainer,
    fps: float,
    num_frames: int,
    limits: tuple[float, int],
    size: int | None,
    workers: int,
    before_decoding: Callable[[int], None] | None,
    cancel: Cancellation | None,
) -> VideoClip:
    """Probe, check, sample and decode; the first frame is decoded first because its pts anchors the rest.

    The limits are checked from the container's metadata before any frame is decoded: the stated frame
    count, else the count its stated duration implies (checked again once the count is known).
    Samples far enough apart are decoded by up to `workers` threads (see _plan_groups); a short clip, or
    one whose samples all lie close together, is decoded here as one sequence.
    """
    started = time.perf_counter()
    stream = _video_stream(container)
    original_fps = _stream_fps(stream)
    max_seconds, max_frames = limits

    def plan(total: int) -> None:
        """Refuse sampling `total` frames over the limits; `before_decoding` sees the count."""
        count = sampled_count(total, original_fps, fps, num_frames)
        _check_limits(total / original_fps, count, max_seconds, max_frames)
        if before_decoding is not None:
            before_decoding(count)

    stated = int(stream.frames) if stream.frames else None
    if stated is not None:
        plan(stated)  # the count the file states is the one used below: checked before decoding anything
    elif (estimate := _frames_from_duration(container, stream, original_fps)) is not None:
        count = sampled_count(estimate, original_fps, fps, num_frames)
        _check_limits(estimate / original_fps, count, max_seconds, max_frames)  # again once counted
    reader = _FrameReader(container, stream, original_fps, cancel)
    first = reader.first()
    total = _total_frames(container, stream, reader)
    if stated is None:
        plan(total)
    indices, timestamps, separators = sample_frames(total, original_fps, fps, num_frames)
    targets = [reader.start_pts + index * reader.ticks_per_frame for index in indices]
    groups = [range(len(indices))]
    reopenable = isinstance(source, bytes) or os.path.isfile(source)  # not a pipe or device
    if workers > 1 and len(indices) > 1 and reopenable:
        planned, work = _plan_groups(targets, reader, workers)
        if len(planned) > 1 and len(planned[0]) == 1 and indices[0] == 0:  # decoded already: no thread
            planned = [range(0, planned[1].stop), *planned[2:]]
        if len(planned) > 1 and work * first.width * first.height >= _PARALLEL_MIN_PIXELS:
            groups = planned
    if len(groups) > 1:
        done = {k: _to_array(first, size) for k, index in enumerate(indices) if index == 0}
        arrays, decoded, seeks = _decode_groups(
            source, reader, original_fps, targets, groups, done, size, cancel
        )
        decoded, seeks = decoded + reader.decoded, seeks + reader.seeks
    else:
        arrays = []
        for index, target in zip(indices, targets):
            frame = first if index == 0 else reader.frame_at(target)
            arrays.append(_to_array(frame, size))
        decoded, seeks = reader.decoded, reader.seeks
    logger.debug(
        "video: %d samples, %d frames decoded, %d seeks, %d threads, %.3f s",
        len(indices),
        decoded,
        seeks,
        len(groups),
        time.perf_counter() - started,
        extra={"decoded_frames": decoded, "seeks": seeks, "decode_groups": len(groups)},
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
    workers: int | None = None,
    before_decoding: Callable[[int], None] | None = None,
    cancel: Cancellation | None = None,
) -> VideoClip:
    """Decode the sampled frames of a video (bytes or a path), seeking to each rather than decoding all.

    Up to `workers` threads (default: one per core, at most 8) decode groups of samples at once, each
    on its own container; the frames are the same, in the same order, as with `workers=1`.
    Raises MediaError (400) for input that isn't a decodable video, LimitExceededError (413) when it
    is longer than `max_seconds` or sampling gives more than `max_frames` frames: checked from the
    container's metadata before any frame is decoded when it states them. `before_decoding` gets the
    number of frames to be sampled before they are decoded, and may refuse the video by raising.
    Decoding stops with `Cancelled` at the next frame once `cancel` is set.
    """
    check_sampling_args(fps, num_frames)
    if size is not None and size < 1:
        raise InvalidRequestError(f"frame size must be positive, got {size}", param="size")
    if workers is None:
        workers = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if isinstance(source, bytearray | memoryview):
        source = bytes(source)  # one copy, that every thread's BytesIO then shares
    container = _open(source)
    try:
        return _decode_clip(
            source,
            container,
            fps,
            num_frames,
            (max_seconds, max_frames),
            size,
            workers,
            before_decoding,
            cancel,
        )
    except av.error.FFmpegError as e:
        raise MediaError(f"the video can't be decoded ({_reason(e)})") from e
    finally:
        container.close()
