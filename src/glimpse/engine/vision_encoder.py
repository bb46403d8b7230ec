"""The engine's vision encoder: media pixels -> LLM embeddings, on the engine's device, behind the encoder cache.

Pixels arrive as uint8 (processing never touches the device) and are normalised here. An image is
encoded whole (the model runs its tiles in micro-batches); a video a group of `FRAMES_PER_ENCODE`
frames at a time, as the engine's prompt chunks reach the group, so a long video's vision work
interleaves with other requests' steps instead of stalling them all at once (and a prefix-cache hit
skips it entirely).

Every call runs on the thread that steps the engine (AsyncLLM hands EVS's calls to its engine thread),
so one ViT batch runs at a time, as the memory plan assumed, and the encoder cache needs no lock.
"""

from __future__ import annotations

import torch

from glimpse.config import VLConfig
from glimpse.engine.encoder_cache import EncoderCache
from glimpse.inputs import MediaPixels, MediaSpan

FRAMES_PER_ENCODE = 16  # video frames per vision-encoder call (4,096 LLM tokens at 256 per frame)


def normalise(u8: torch.Tensor, config: VLConfig, device: torch.device) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> CLIP-normalised float on the device (pixels travel as bytes: 4x less)."""
    x = u8.to(device).float().div_(255)
    mean = torch.tensor(config.norm_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.norm_std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


class CachedVisionEncoder:
    """Implements `glimpse.inputs.VisionEncoder` for the engine's VL model."""

    frames_per_encode = FRAMES_PER_ENCODE

    def __init__(self, model: torch.nn.Module, device: torch.device, cache_bytes: int) -> None:
        self.model = model
        self.config: VLConfig = model.config
        self.device = device
        self.cache = EncoderCache(cache_bytes)

    def encode_images(self, pixels: MediaPixels) -> torch.Tensor:
        """[tiles * tokens_per_tile, hidden] embeddings of one image's tiles."""
        return self.cache.get_or_compute(
            pixels.key,
            lambda: self.model.encode_images(normalise(pixels.data, self.config, self.device)).flatten(0, 1),
        )

    def encode_frames(self, pixels: MediaPixels, start: int, end: int) -> torch.Tensor:
        """[end - start, h, w, hidden] embeddings of video frames start..end-1."""
        return self.cache.get_or_compute(
            f"{pixels.key}:{start}-{end}",
            lambda: self.model.encode_video(normalise(pixels.data[start:end], self.config, self.device)),
        )

    def fill(self, span: MediaSpan, spans: list[MediaSpan]) -> None:
        """Give `span` its embeddings. A video frame's whole group is encoded at once, so the other
        spans of `spans` (its request's) in that group get theirs too: one encoder call per group."""
        pixels = span.pixels
        if pixels.kind == "image":
            span.embeddings = self.encode_images(pixels)
            return
        start = span.frame // FRAMES_PER_ENCODE * FRAMES_PER_ENCODE
        end = min(start + FRAMES_PER_ENCODE, pixels.data.shape[0])
        group = self.encode_frames(pixels, start, end)
        for s in spans:
            if s.pixels is pixels and s.embeddings is None and start <= s.frame < end:
                s.embeddings = group[s.frame - start].flatten(0, 1)
