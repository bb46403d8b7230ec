"""Video sampling, seeking decode and per-frame prompt text.

The test videos are made here with PyAV; every frame paints its own index in big black and white blocks,
so a test reads back exactly which frame was decoded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from glimpse.errors import InvalidRequestError, LimitExceededError, MediaError
from glimpse.processing import video_decode
from glimpse.processing.media import Cancellation, Cancelled
from glimpse.processing.video import (
    IMAGE_TOKEN,
    PromptPiece,
    clip_from_frames,
    frame_prompt_text,
    pieces_to_text,
    sample_frames,
    sampled_count,
    separators_for_frame_list,
)
from glimpse.processing.video_decode import decode_video

WIDTH, HEIGHT = 64, 48
BLOCK = 8  # pixels; aligned with the codecs' 8x8 transform so the blocks survive compression
BITS = 16  # two rows of eight blocks: indices up to 65535


# --------------------------------------------------------------------------------------------- helpers


def index_image(index: int) -> np.ndarray:
    """A frame that shows its index in binary: block b (row-major, 8 per row) is white when bit b is set."""
    bits = np.array([(index >> b) & 1 for b in range(BITS)], dtype=np.uint8).reshape(2, 8)
    gray = np.full((HEIGHT, WIDTH), 128, dtype=np.uint8)
    gray[: 2 * BLOCK] = np.kron(bits * 255, np.ones((BLOCK, BLOCK), dtype=np.uint8))
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_index(frame: np.ndarray) -> int:
    """The index painted by index_image, read from the block centres (works after squashing too)."""
    h, w = frame.shape[:2]
    value = 0
    for b in range(BITS):
        row, col = divmod(b, 8)
        y = int((row + 0.5) * BLOCK / HEIGHT * h)
        x = int((col + 0.5) * BLOCK / WIDTH * w)
        if frame[y, x].mean() > 128:
            value |= 1 << b
    return value


def have_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


H264 = "libx264" if have_encoder("libx264") else "mpeg4"


def write_video(
    path: Path,
    count: int,
    rate: Fraction | int,
    gop: int,
    *,
    codec: str = "mpeg4",
    b_frames: int = 0,
    start_seconds: float = 0.0,
    pts_ms: list[int] | None = None,
) -> Path:
    """Encode frames 0..count-1 with a fixed keyframe interval; shift all timestamps by start_seconds.

    `pts_ms` gives each frame's own time in milliseconds (variable frame rate).
    """
    options = {"g": str(gop), "sc_threshold": "1000000000", "bf": str(b_frames)}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        shift: int | None = None
        for i in [*range(count), None]:
            frame = None
            if i is not None:
                frame = av.VideoFrame.from_ndarray(index_image(i), format="rgb24")
                if pts_ms is not None:
                    frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                if shift is None:
                    shift = round(start_seconds / packet.time_base)
                packet.pts += shift
                packet.dts += shift
                container.mux(packet)
    return path


def write_repeated_video(
    path: Path, width: int, height: int, segment: int, repeats: int, rate: int, gop: int
) -> Path:
    """A long width x height video made fast: encode `segment` frames once, then remux them `repeats` times.

    Frame n shows index n % segment (scaled up); below it a moving pattern with a little noise, so that
    decoding costs about what it costs on real footage.
    """
    rng = np.random.default_rng(0)
    rows = np.arange(height) * HEIGHT // height
    cols = np.arange(width) * WIDTH // width
    top = height // 3
    y, x = np.mgrid[top:height, 0:width]
    options = {"g": str(gop), "sc_threshold": "1000000000", "bf": "2"}
    if H264 == "libx264":
        options["preset"] = "veryfast"
    packets = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(H264, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in [*range(segment), None]:
            frame = None
            if i is not None:
                image = index_image(i)[rows][:, cols]
                wave = 128 + 60 * np.sin((x + 4 * i) / 23) * np.cos((y - 3 * i) / 17)
                wave += rng.integers(-8, 9, wave.shape)
                image[top:] = np.clip(wave, 0, 255).astype(np.uint8)[:, :, None]
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            packets += [(p.pts, p.dts, p.is_keyframe, bytes(p), p.time_base) for p in stream.encode(frame)]
        step = round(Fraction(segment, rate) / packets[0][4])
        for r in range(repeats):
            for pts, dts, key, data, time_base in packets:
                packet = av.Packet(data)
                packet.pts, packet.dts, packet.time_base = pts + r * step, dts + r * step, time_base
                packet.is_keyframe, packet.stream = key, stream
                container.mux(packet)
    return path


def decoded_indices(clip) -> list[int]:
    return [read_index(frame) for frame in clip.frames]


def decode_groups(caplog) -> int:
    """How many threads the last decode_video used (from its debug record)."""
    groups = [r.decode_groups for r in caplog.records if hasattr(r, "decode_groups")]
    assert groups, "decode_video logged nothing"
    return groups[-1]


def assert_same_clip(clip, reference) -> None:
    assert clip.frame_indices == reference.frame_indices
    assert decoded_indices(clip) == decoded_indices(reference)
    assert len(clip.frames) == len(reference.frames)
    for a, b in zip(clip.frames, reference.frames):
        assert a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    assert clip.timestamps == reference.timestamps
    assert clip.separators == reference.separators
    assert (clip.original_fps, clip.total_frames) == (reference.original_fps, reference.total_frames)


def video_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("glimpse-video")]


def find_golden() -> Path | None:
    """shared/reference/video.json beside the checkout (or named by GLIMPSE_SHARED)."""
    candidates = [Path(os.environ["GLIMPSE_SHARED"])] if "GLIMPSE_SHARED" in os.environ else []
    here = Path(__file__).resolve()
    candidates += [parent / "shared" for parent in here.parents]
    for shared in candidates:
        if (shared / "reference" / "video.json").is_file():
            return shared / "reference" / "video.json"
    return None


GOLDEN = find_golden()
GOLDEN_CASES = json.loads(GOLDEN.read_text())["cases"] if GOLDEN else []


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="session")
def short_mp4(videos) -> Path:
    """90 frames at 30 fps (golden case 2), mpeg4, a keyframe every 12 frames."""
    return write_video(videos / "short.mp4", 90, 30, 12)


@pytest.fixture(scope="session")
def ntsc_mp4(videos) -> Path:
    """300 frames at 29.97 fps (golden case 1), H.264 with B-frames (pts and dts differ)."""
    return write_video(videos / "ntsc.mp4", 300, Fraction(2997, 100), 30, codec=H264, b_frames=2)


@pytest.fixture(scope="session")
def offset_mkv(videos) -> Path:
    """Matroska states no frame count; this one starts at 10 s."""
    return write_video(videos / "offset.mkv", 300, 30, 30, codec=H264, b_frames=2, start_seconds=10.0)


@pytest.fixture(scope="session")
def offset_ts(videos) -> Path:
    """MPEG-TS: no frame count, no index, seeks by dts; starts at 10 s."""
    return write_video(videos / "offset.ts", 300, 30, 30, codec=H264, b_frames=2, start_seconds=10.0)


@pytest.fixture
def always_parallel(monkeypatch):
    """Threads even for the tiny test clips, which are otherwise decoded as one sequence."""
    monkeypatch.setattr(video_decode, "_PARALLEL_MIN_PIXELS", 0)


@pytest.fixture(scope="session")
def long_mp4(videos) -> Path:
    """Two hours at 2 fps (14,400 frames), a keyframe every 5 s; about a second to encode at 64x48."""
    return write_video(videos / "long.mp4", 14400, 2, 10)


# --------------------------------------------------------------------------------------------- sampling


@pytest.mark.skipif(not GOLDEN_CASES, reason="shared/reference/video.json not found")
@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda c: f"{c['total_frames']}@{c['original_fps']}")
def test_sample_frames_matches_golden(case):
    known = {"total_frames", "original_fps", "fps", "num_frames"}
    known |= {"frame_indices", "timestamps", "separators", "true_seconds"}
    assert set(case) <= known, f"golden case has fields this test doesn't check: {set(case) - known}"
    indices, timestamps, separators = sample_frames(
        case["total_frames"], case["original_fps"], case["fps"], case["num_frames"]
    )
    assert indices == case["frame_indices"]
    assert timestamps == case["timestamps"]
    assert separators == case["separators"]
    if "true_seconds" in case:
        true_seconds = [i / case["original_fps"] for i in indices]
        assert true_seconds == pytest.approx(case["true_seconds"], abs=5e-4)


def test_sample_frames_takes_every_frame_when_few():
    indices, timestamps, separators = sample_frames(10, 5.0, fps=10, num_frames=128)
    assert indices == list(range(10))
    assert timestamps[:3] == [0.0, 0.2, 0.4]
    assert separators[0] == "Frame 1 sampled at 0.00 seconds: "
    assert separators[1] == "\nFrame 2 sampled at 0.20 seconds: "


def test_sample_frames_rejects_bad_arguments():
    with pytest.raises(InvalidRequestError):
        sample_frames(100, 30.0, fps=0)
    with pytest.raises(InvalidRequestError):
        sample_frames(100, 30.0, num_frames=0)
    with pytest.raises(MediaError):
        sample_frames(0, 30.0)
    with pytest.raises(MediaError):
        sample_frames(100, 0.0)


@pytest.mark.parametrize(
    ("total", "original_fps", "fps", "num_frames"),
    [(90, 30.0, 2, 128), (10, 5.0, 10, 128), (14400, 2.0, 2, 128), (3, 30.0, 2, 128), (1000, 30.0, 50, 7)],
)
def test_sampled_count_is_what_sampling_picks(total, original_fps, fps, num_frames):
    assert sampled_count(total, original_fps, fps, num_frames) == len(
        sample_frames(total, original_fps, fps, num_frames)[0]
    )


def test_sampled_count_of_absurd_metadata_is_cheap():
    """A header may claim anything: the count comes without allocating a frame list, and never overflows."""
    assert sampled_count(10**15, 1e-300, fps=1e6, num_frames=10**12) == 10**12
    assert sampled_count(10**15, 30.0, fps=2, num_frames=128) == 128


def test_separators_for_frame_list():
    assert separators_for_frame_list(3) == ["Frame 1: ", "\nFrame 2: ", "\nFrame 3: "]
    assert separators_for_frame_list(3, video_fps=30.0) == [
        "Frame 1 sampled at 0.00 seconds: ",
        "\nFrame 2 sampled at 0.03 seconds: ",
        "\nFrame 3 sampled at 0.07 seconds: ",
    ]


# --------------------------------------------------------------------------------------------- decoding


def test_decode_short_video(short_mp4):
    clip = decode_video(short_mp4)
    indices, timestamps, separators = sample_frames(90, 30.0)
    assert clip.frame_indices == indices == [0, 17, 35, 53, 71, 89]
    assert decoded_indices(clip) == indices
    assert clip.timestamps == timestamps == [0.0, 0.561, 1.155, 1.749, 2.343, 2.937]
    assert clip.seconds == pytest.approx([i / 30 for i in indices])
    assert clip.separators == separators
    assert (clip.original_fps, clip.total_frames, clip.duration) == (30.0, 90, 3.0)
    assert all(f.shape == (HEIGHT, WIDTH, 3) and f.dtype == np.uint8 for f in clip.frames)


def test_decode_bytes_matches_path(short_mp4):
    from_path = decode_video(str(short_mp4), fps=4, num_frames=9)
    from_bytes = decode_video(short_mp4.read_bytes(), fps=4, num_frames=9)
    assert from_bytes.frame_indices == from_path.frame_indices
    assert decoded_indices(from_bytes) == from_path.frame_indices
    for a, b in zip(from_bytes.frames, from_path.frames):
        np.testing.assert_array_equal(a, b)


def test_decode_every_frame_in_order(short_mp4):
    clip = decode_video(short_mp4, fps=100, num_frames=1000)
    assert clip.frame_indices == list(range(90))
    assert decoded_indices(clip) == list(range(90))


@pytest.mark.skipif(not GOLDEN_CASES, reason="shared/reference/video.json not found")
def test_decode_ntsc_b_frames_matches_golden(ntsc_mp4):
    case = GOLDEN_CASES[0]
    assert (case["total_frames"], case["original_fps"]) == (300, 29.97)
    clip = decode_video(ntsc_mp4, fps=case["fps"], num_frames=case["num_frames"])
    assert clip.original_fps == pytest.approx(29.97)
    assert clip.total_frames == 300
    assert clip.frame_indices == case["frame_indices"]
    assert decoded_indices(clip) == case["frame_indices"]
    assert clip.timestamps == case["timestamps"]
    assert clip.separators == case["separators"]
    assert clip.seconds == pytest.approx(case["true_seconds"], abs=5e-4)


@pytest.mark.parametrize("fps", [2, 0.4])  # 0.4: samples 74 frames apart, so the reader seeks
@pytest.mark.parametrize("name", ["offset_mkv", "offset_ts"])
def test_decode_without_frame_count_and_late_start(name, fps, request):
    clip = decode_video(request.getfixturevalue(name), fps=fps)
    assert clip.total_frames == 300
    assert clip.duration == pytest.approx(10.0)
    expected = sample_frames(300, 30.0, fps=fps)[0]
    assert clip.frame_indices == expected
    assert decoded_indices(clip) == expected


def test_decode_squashes_frames(short_mp4):
    clip = decode_video(short_mp4, size=48)
    assert all(f.shape == (48, 48, 3) for f in clip.frames)
    assert decoded_indices(clip) == clip.frame_indices


def test_variable_frame_rate_picks_frames_by_time(videos):
    pts_ms = [i * 33 for i in range(30)] + [990 + i * 66 for i in range(30)]
    path = write_video(videos / "vfr.mkv", 60, 30, 15, pts_ms=pts_ms)
    clip = decode_video(path, fps=4)
    got = decoded_indices(clip)
    assert got[0] == 0 and got == sorted(got)
    shown_at = [pts_ms[i] / 1000 for i in got]
    assert shown_at == pytest.approx(clip.seconds, abs=0.07)


def test_long_video_seeks_instead_of_decoding_everything(long_mp4, caplog):
    caplog.set_level(logging.DEBUG, logger="glimpse.processing.video_decode")
    started = time.perf_counter()
    clip = decode_video(long_mp4, fps=2, num_frames=128)
    elapsed = time.perf_counter() - started
    expected = sample_frames(14400, 2.0)[0]
    assert clip.frame_indices == expected and len(expected) == 128
    assert decoded_indices(clip) == expected
    assert clip.seconds[-1] == pytest.approx(7199.5)
    assert elapsed < 20, f"sampling a 2-hour video took {elapsed:.1f} s"
    decoded = [r.decoded_frames for r in caplog.records if hasattr(r, "decoded_frames")]
    assert decoded and decoded[-1] < 14400 // 4, f"decoded {decoded} frames of 14400"


# --------------------------------------------------------------------------------------------- threads


PARALLEL_CASES = [
    ("short_mp4", 2),  # samples 17 frames apart, a keyframe every 12
    ("ntsc_mp4", 2),  # B-frames: the index holds dts
    ("ntsc_mp4", 0.4),
    ("offset_mkv", 2),  # no frame count, a start at 10 s, an index that doesn't reach
    ("offset_mkv", 0.4),
    ("offset_ts", 2),  # no index: seeks by dts and backs off
    ("offset_ts", 0.4),
    ("long_mp4", 2),  # 128 samples, 112 frames apart
    ("long_mp4", 0.01),  # 72 samples; every frame sampled is a keyframe
]


@pytest.mark.parametrize(("name", "fps"), PARALLEL_CASES)
def test_parallel_decoding_matches_sequential(name, fps, request, always_parallel, caplog):
    caplog.set_level(logging.DEBUG, logger="glimpse.processing.video_decode")
    path = request.getfixturevalue(name)
    sequential = decode_video(path, fps=fps, workers=1)
    assert decode_groups(caplog) == 1
    assert decoded_indices(sequential) == sequential.frame_indices
    for workers in (2, 4):
        clip = decode_video(path, fps=fps, workers=workers)
        assert 1 < decode_groups(caplog) <= workers
        assert_same_clip(clip, sequential)
    assert not video_threads()


@pytest.mark.parametrize(
    ("name", "fps"), [("short_mp4", 2), ("ntsc_mp4", 100), ("offset_mkv", 2), ("long_mp4", 2)]
)
def test_parallel_groups_decode_no_frame_twice(name, fps, request, always_parallel, monkeypatch):
    """Groups start at a keyframe after the previous group's last sample (B-frames: the index holds dts)."""
    decoded: dict[str, list[int]] = {}
    real_next = video_decode._FrameReader._next

    def next_frame(self):
        frame = real_next(self)
        if frame is not None and threading.current_thread() is not threading.main_thread():
            decoded.setdefault(threading.current_thread().name, []).append(frame.pts)
        return frame

    monkeypatch.setattr(video_decode._FrameReader, "_next", next_frame)
    decode_video(request.getfixturevalue(name), fps=fps, workers=4)
    assert len(decoded) > 1
    seen: set[int] = set()
    for pts in decoded.values():
        assert not seen & set(pts)
        seen |= set(pts)


def test_parallel_decoding_from_bytes_squashed(ntsc_mp4, long_mp4, always_parallel, caplog):
    caplog.set_level(logging.DEBUG, logger="glimpse.processing.video_decode")
    for path in (ntsc_mp4, long_mp4):
        reference = decode_video(path, workers=1, size=32)
        data = path.read_bytes()
        for source in (data, bytearray(data), memoryview(data)):
            clip = decode_video(source, workers=3, size=32)
            assert decode_groups(caplog) > 1
            assert all(f.shape == (32, 32, 3) for f in clip.frames)
            assert_same_clip(clip, reference)


def test_parallel_variable_frame_rate(videos, always_parallel, caplog):
    caplog.set_level(logging.DEBUG, logger="glimpse.processing.video_decode")
    pts_ms = [i * 33 for i in range(90)] + [2970 + i * 66 for i in range(90)]
    path = write_video(videos / "vfr_parallel.mkv", 180, 30, 15, pts_ms=pts_ms)
    for fps in (0.5, 4):
        reference = decode_video(path, fps=fps, workers=1)
        clip = decode_video(path, fps=fps, workers=3)
        assert decode_groups(caplog) > 1
        assert_same_clip(clip, reference)


def test_long_video_uses_threads_by_default(long_mp4, caplog):
    """The 2-hour clip is long enough to split without help, whenever there is more than one core."""
    caplog.set_level(logging.DEBUG, logger="glimpse.processing.video_decode")
    decode_video(long_mp4, workers=4)
    assert decode_groups(caplog) == 4
    assert video_decode.default_workers() == min(8, video_decode._cpu_count())
    with pytest.raises(ValueError):
        decode_video(long_mp4, workers=0)


def test_worker_open_error_reaches_the_caller(long_mp4, monkeypatch):
    real_open = video_decode._open

    def open_on_main_thread_only(source):
        if threading.current_thread() is not threading.main_thread():
            raise MediaError("the video file went away")
        return real_open(source)

    monkeypatch.setattr(video_decode, "_open", open_on_main_thread_only)
    with pytest.raises(MediaError, match="went away") as err:
        decode_video(long_mp4, workers=4)
    assert err.value.status == 400
    assert not video_threads()


def test_worker_decode_error_cancels_the_other_groups(long_mp4, monkeypatch):
    """Groups in the second hour fail at once; those in the first hour (slowed down) stop early."""
    real_to_array = video_decode._to_array
    converted: list[float] = []

    def to_array(frame, size):
        if threading.current_thread() is not threading.main_thread():
            if frame.time >= 3600:
                raise av.error.InvalidDataError(0, "Invalid data found when processing input")
            time.sleep(0.05)
            converted.append(frame.time)
        return real_to_array(frame, size)

    monkeypatch.setattr(video_decode, "_to_array", to_array)
    with pytest.raises(MediaError, match="can't be decoded") as err:
        decode_video(long_mp4, workers=4)
    assert err.value.status == 400
    assert isinstance(err.value.__cause__, av.error.InvalidDataError)
    assert len(converted) < 32, f"{len(converted)} of 63 first-hour frames converted after the failure"
    assert not video_threads()


def test_limits_are_checked_before_any_thread_starts(long_mp4, monkeypatch, always_parallel):
    opened = []
    real_open = video_decode._open
    monkeypatch.setattr(video_decode, "_open", lambda source: opened.append(1) or real_open(source))
    with pytest.raises(LimitExceededError, match="7200.0 s long"):
        decode_video(long_mp4, workers=4, max_seconds=3600)
    with pytest.raises(LimitExceededError, match="128 frames"):
        decode_video(long_mp4, workers=4, max_frames=100)
    assert len(opened) == 2  # one container per call: no thread opened its own


def test_parallel_decoding_timing(videos, caplog):
    """Times sequential against threaded decoding of a 4-minute 640x360 H.264 file (printed, not asserted)."""
    caplog.set_level(logging.DEBUG, logger="glimpse.processing.video_decode")
    started = time.perf_counter()
    path = write_repeated_video(videos / "wide.mp4", 640, 360, segment=120, repeats=60, rate=30, gop=30)
    written = time.perf_counter() - started
    times, clips, groups = {}, {}, {}
    for workers in (1, 2, 4):
        started = time.perf_counter()
        clips[workers] = decode_video(path, workers=workers, size=512)
        times[workers] = time.perf_counter() - started
        groups[workers] = decode_groups(caplog)
    reference = clips[1]
    assert len(reference.frame_indices) == 128
    assert decoded_indices(reference) == [i % 120 for i in reference.frame_indices]
    for workers in (2, 4):
        assert groups[workers] == workers
        assert_same_clip(clips[workers], reference)
    print(
        f"\n640x360 H.264, 7200 frames, keyframe every 30, 128 samples at 512x512 "
        f"({video_decode._cpu_count()} cores; written in {written:.1f} s): "
        + ", ".join(f"workers={w}: {t:.2f} s" for w, t in times.items())
        + f"; speed-up x{times[1] / min(times[2], times[4]):.2f}"
    )


# --------------------------------------------------------------------------------------------- bad input


def _wav_bytes() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "source",
    [
        "empty",
        "random",
        "text",
        "text_file",
        "missing_file",
        "audio_only",
        "truncated_mp4",
        "protocol_in_path",
        "url_as_path",
    ],
)
def test_undecodable_input_is_media_error(source, short_mp4, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a video\n" * 50)
    inputs = {
        "empty": b"",
        "random": np.random.default_rng(0).bytes(4096),
        "text": b"hello, this is not a video\n" * 100,
        "text_file": str(text_file),
        "missing_file": str(tmp_path / "missing.mp4"),
        "audio_only": _wav_bytes(),
        "truncated_mp4": short_mp4.read_bytes()[:2000],  # the index (moov) is at the end
        "protocol_in_path": f"concat:{short_mp4}|{short_mp4}",  # only plain local files
        "url_as_path": "http://127.0.0.1:9/video.mp4",  # never fetched: no network protocol allowed
    }
    with pytest.raises(MediaError) as err:
        decode_video(inputs[source])
    assert err.value.status == 400
    assert err.value.message


def test_limits_are_413(short_mp4):
    with pytest.raises(LimitExceededError, match="3.0 s long") as err:
        decode_video(short_mp4, max_seconds=2)
    assert err.value.status == 413
    with pytest.raises(LimitExceededError, match="6 frames"):
        decode_video(short_mp4, max_frames=5)
    assert decode_video(short_mp4, max_frames=6, max_seconds=3).num_frames == 6


def without_pictures(video: bytes) -> bytes:
    """The same MP4 with its coded pictures zeroed: the metadata is intact, no frame decodes."""
    at = video.find(b"mdat")
    size = int.from_bytes(video[at - 4 : at], "big")
    return video[: at + 4] + bytes(size - 8) + video[at - 4 + size :]


def test_limits_are_checked_from_the_metadata_before_decoding(short_mp4):
    """The frame count the file states decides: a clip whose pictures can't be decoded gets the same
    413 as the intact one, and `before_decoding` sees the count first and may refuse."""
    broken = without_pictures(short_mp4.read_bytes())
    with pytest.raises(MediaError):
        decode_video(broken)  # nothing decodes
    for data in (short_mp4.read_bytes(), broken):
        with pytest.raises(LimitExceededError, match="6 frames"):
            decode_video(data, max_frames=5)
        with pytest.raises(LimitExceededError, match="3.0 s long"):
            decode_video(data, max_seconds=2)

    def refuse(count: int) -> None:
        raise LimitExceededError(f"{count} frames would not fit")

    with pytest.raises(LimitExceededError, match="6 frames would not fit"):
        decode_video(broken, before_decoding=refuse)
    counts: list[int] = []
    assert decode_video(short_mp4, before_decoding=counts.append).num_frames == 6
    assert counts == [6]


@pytest.mark.parametrize("name", ["offset_mkv", "offset_ts"])
def test_limits_without_a_frame_count_come_from_the_duration(name, request, monkeypatch):
    """Matroska and MPEG-TS state no frame count: their duration refuses a clip over the limits before a
    frame is decoded, and one at the limits is still decoded (the estimate never refuses too much)."""
    path = request.getfixturevalue(name)
    decoded = []
    real_next = video_decode._FrameReader._next
    monkeypatch.setattr(video_decode._FrameReader, "_next", lambda self: decoded.append(1) or real_next(self))
    with pytest.raises(LimitExceededError, match="sampling this video gives"):
        decode_video(path, fps=2, max_frames=10)
    with pytest.raises(LimitExceededError, match="s long"):
        decode_video(path, max_seconds=5)
    assert decoded == []
    counts: list[int] = []
    clip = decode_video(path, fps=2, max_frames=20, max_seconds=10, before_decoding=counts.append)
    assert clip.num_frames == 20
    assert counts == [20]


@pytest.mark.parametrize("workers", [1, 4])
def test_a_cancelled_decode_stops(long_mp4, always_parallel, monkeypatch, workers):
    """Cancelling (the request is gone) stops every decoding thread at its next frame."""
    cancel = Cancellation()
    real_to_array = video_decode._to_array
    converted: list[int] = []

    def to_array(frame, size):
        converted.append(1)
        if len(converted) == 3:
            cancel.set()
        return real_to_array(frame, size)

    monkeypatch.setattr(video_decode, "_to_array", to_array)
    with pytest.raises(Cancelled):
        decode_video(long_mp4, workers=workers, cancel=cancel)
    assert len(converted) < 3 + workers, f"{len(converted)} of 128 frames converted after the cancellation"
    assert not video_threads()


def test_bad_sampling_arguments_are_400(short_mp4):
    with pytest.raises(InvalidRequestError):
        decode_video(short_mp4, fps=-1)
    with pytest.raises(InvalidRequestError):
        decode_video(short_mp4, num_frames=0)


# --------------------------------------------------------------------------------------------- frame lists


def test_frame_list_without_fps():
    frames = [Image.fromarray(index_image(i)) for i in range(3)]
    clip = clip_from_frames(frames, None)
    assert clip.frame_indices == [0, 1, 2]
    assert clip.separators == ["Frame 1: ", "\nFrame 2: ", "\nFrame 3: "]
    assert clip.timestamps is None and clip.seconds is None and clip.duration is None
    assert [read_index(f) for f in clip.frames] == [0, 1, 2]


def test_frame_list_with_fps():
    frames = [index_image(i) for i in range(40)]
    clip = clip_from_frames(frames, video_fps=29.97)
    assert clip.frame_indices == list(range(40))
    assert clip.timestamps[15] == 0.495  # 33 whole milliseconds per frame, as the reference
    assert clip.separators[15] == "\nFrame 16 sampled at 0.49 seconds: "
    assert clip.seconds[15] == pytest.approx(15 / 29.97)
    assert clip.duration == pytest.approx(40 / 29.97)


def test_frame_list_rejects_bad_frames():
    with pytest.raises(MediaError):
        clip_from_frames([], None)
    with pytest.raises(MediaError):
        clip_from_frames([np.zeros((4, 4), np.uint8)], None)
    with pytest.raises(MediaError):
        clip_from_frames([np.zeros((4, 4, 3), np.float32)], None)
    with pytest.raises(LimitExceededError):
        clip_from_frames([index_image(0)] * 3, None, max_frames=2)


# --------------------------------------------------------------------------------------------- prompt


def test_frame_prompt_text_pieces():
    clip = clip_from_frames([index_image(0), index_image(1)], video_fps=2.0)
    pieces = frame_prompt_text(clip, [3, 0])
    assert pieces == [
        PromptPiece("text", "Frame 1 sampled at 0.00 seconds: "),
        PromptPiece("text", "<img>"),
        PromptPiece("image", 3),
        PromptPiece("text", "</img>"),
        PromptPiece("text", "\nFrame 2 sampled at 0.50 seconds: "),
        PromptPiece("text", "<img>"),
        PromptPiece("image", 0),
        PromptPiece("text", "</img>"),
    ]
    assert pieces_to_text(pieces) == (
        "Frame 1 sampled at 0.00 seconds: <img>" + IMAGE_TOKEN * 3 + "</img>"
        "\nFrame 2 sampled at 0.50 seconds: <img></img>"
    )
    with pytest.raises(ValueError):
        frame_prompt_text(clip, [1])
