"""Video input for the model: which frames to sample, clips of sampled or given frames, and the
per-frame prompt.

The sampling rule and the prompt text follow the reference processor exactly (MODEL_SPEC.md §5, API.md):
the model was trained on them. Decoding a file into a clip is video_decode.py's job.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from glimpse.errors import InvalidRequestError, LimitExceededError, MediaError

if TYPE_CHECKING:
    import torch

IMG_START = "<img>"
IMG_END = "</img>"
IMAGE_TOKEN = "<image>"


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


def check_sampling_args(fps: float, num_frames: int) -> None:
    """Reject sampling settings a user sent that would make no sense (400)."""
    if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise InvalidRequestError(f"video fps must be a positive number, got {fps!r}", param="fps")
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 1:
        raise InvalidRequestError(
            f"video num_frames must be a positive integer, got {num_frames!r}", param="num_frames"
        )


def sampled_count(total_frames: int, original_fps: float, fps: float = 2, num_frames: int = 128) -> int:
    """How many frames `sample_frames` picks, without picking them: a limit on it can be checked first."""
    check_sampling_args(fps, num_frames)
    if total_frames < 1:
        raise MediaError("the video has no frames")
    if not (math.isfinite(original_fps) and original_fps > 0):
        raise MediaError(f"the video has no usable frame rate ({original_fps!r})")
    by_rate = min(total_frames / original_fps * fps, total_frames)  # capped first: it may overflow
    return max(1, min(num_frames, total_frames, math.floor(by_rate)))


def sample_frames(
    total_frames: int, original_fps: float, fps: float = 2, num_frames: int = 128
) -> tuple[list[int], list[float], list[str]]:
    """Pick the frames the model sees: `fps` per second, at most `num_frames`, spread evenly.

    Returns (frame indices, prompt timestamps in seconds, separators), one entry per sampled frame.
    """
    n = sampled_count(total_frames, original_fps, fps, num_frames)
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
