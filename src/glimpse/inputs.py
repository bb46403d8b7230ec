"""What input processing hands the engine: token ids, and the media spans whose embeddings replace tokens.

Processing describes media as plain data (uint8 pixels, a frame number, a content key); the engine's
vision encoder turns that into embeddings when a prompt chunk reaches the span. The only thing
processing asks of the engine is `VisionEncoder`: EVS must see every frame's embeddings to decide how
many tokens each frame keeps, before the prompt exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch


@dataclass(eq=False)
class MediaPixels:
    """One image's tiles or one video's frames, waiting for the vision encoder."""

    kind: Literal["image", "video"]
    data: torch.Tensor  # uint8 [N, 3, H, W]: normalised on the device when encoded (4x fewer bytes to move)
    key: str  # content hash + processing parameters (encoder cache, prefix cache)


@dataclass
class MediaSpan:
    """A run of placeholder tokens in the prompt filled by vision embeddings instead of the token table.

    `embeddings` is [length, hidden]; `content_hash` identifies the media and its processing (prefix
    cache keys include it, since the placeholder tokens alone say nothing about the pixels). An image's
    span covers all its tiles; a video has one span per frame (`frame`), all sharing one `pixels`."""

    start: int  # position of the first placeholder token in the prompt
    embeddings: torch.Tensor | None  # None until the engine encodes `pixels` (EVS fills it at once)
    length: int
    content_hash: str
    pixels: MediaPixels | None = None
    frame: int | None = None  # a video span: which frame of `pixels`

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class ProcessedInput:
    prompt: str | None
    prompt_token_ids: list[int]
    media_spans: list[MediaSpan] = field(default_factory=list)
    media_info: list[dict[str, Any]] = field(default_factory=list)
    video_tokens: dict[str, int] | None = None


class VisionEncoder(Protocol):
    """What processing needs from the engine's vision encoder (EVS counts tokens from the embeddings)."""

    frames_per_encode: int  # frames per encoder call: EVS asks for a video a group at a time

    def encode_frames(self, pixels: MediaPixels, start: int, end: int) -> torch.Tensor:
        """[end - start, h, w, hidden] embeddings of video frames start..end-1 (the grid EVS compares)."""
        ...
