"""Multimodal prompts -> token ids with vision embeddings attached (media spans).

Each image becomes `<img>` + `<image>`×(256·tiles) + `</img>`; several images are labelled `<image k>`;
a PDF is its pages as images; a video is, per sampled frame, `Frame k sampled at t seconds: ` + `<img>`
+ `<image>`×n_k + `</img>`, where n_k is 256, or fewer when EVS prunes the frame. Token ids come from the
tokenizer; each piece is tokenised on its own. The media goes to the engine as uint8 pixels in media
spans; the engine encodes them when its prompt chunks reach them. Only EVS needs embeddings here (they
decide each frame's tokens): it asks the engine's vision encoder for them, a frame group at a time.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from glimpse.config import VLConfig
from glimpse.errors import InvalidRequestError, MediaError
from glimpse.inputs import MediaPixels, MediaSpan, ProcessedInput, VisionEncoder
from glimpse.processing import evs
from glimpse.processing.chat import render_chat
from glimpse.processing.image import resize_square, tile_image
from glimpse.processing.media import (
    MediaLimits,
    MediaPolicy,
    content_hash,
    fetch_bytes,
    load_image,
    resolve_local_path,
)
from glimpse.processing.pdf import render_pdf
from glimpse.processing.video import VideoClip, clip_from_frames, frame_prompt_text
from glimpse.processing.video_decode import decode_video

_MARKER = "\x00media{}\x00"
_MARKER_RE = re.compile("\x00media(\\d+)\x00")


@dataclass
class ImageItem:
    pixels: MediaPixels  # uint8 tiles [N, 3, 512, 512]
    page: int | None = None


@dataclass
class VideoItem:
    clip: VideoClip
    pixels: MediaPixels  # uint8 frames [T, 3, 512, 512]
    pruning_rate: float


@dataclass
class MediaOptions:
    max_num_tiles: int
    video_fps: float
    video_num_frames: int
    pruning_rate: float
    policy: MediaPolicy
    limits: MediaLimits

    @classmethod
    def build(
        cls,
        geometry: VLConfig,
        mm_processor_kwargs: dict[str, Any] | None,
        media_io_kwargs: dict[str, Any] | None,
        video_pruning_rate: float,
        limits: MediaLimits,
        policy: MediaPolicy,
    ) -> MediaOptions:
        """One request's options: its kwargs checked, over the model's and the processor's defaults."""
        mm = dict(mm_processor_kwargs or {})
        video_io = dict((media_io_kwargs or {}).get("video") or {})
        q = video_pruning_rate
        tiles = mm.get("max_num_tiles", geometry.max_num_tiles)
        if not isinstance(tiles, int) or not 1 <= tiles <= 64:
            raise InvalidRequestError("mm_processor_kwargs.max_num_tiles must be an integer in [1, 64]")
        if not isinstance(q, (int, float)) or not 0 <= q < 1:
            raise InvalidRequestError("video_pruning_rate must be in [0, 1)", param="video_pruning_rate")
        fps, num = video_io.get("fps", 2.0), video_io.get("num_frames", 128)
        if not isinstance(fps, (int, float)) or fps <= 0:
            raise InvalidRequestError("media_io_kwargs.video.fps must be a positive number")
        if not isinstance(num, int) or num < 1:
            raise InvalidRequestError("media_io_kwargs.video.num_frames must be a positive integer")
        return cls(tiles, float(fps), num, float(q), policy, limits)


def _to_uint8_chw(images: list) -> torch.Tensor:
    """[N, 3, H, W] uint8 as a channels-last view of one stacked [N, H, W, 3] buffer: no transposing copy
    on the host (moving it to the GPU keeps the strides; the normalisation there reads it as it is)."""
    arrays = [im if isinstance(im, np.ndarray) else np.asarray(im.convert("RGB")) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class MediaBuilder:
    """Loads the media of one prompt, in order, and turns it into tokens and spans."""

    def __init__(self, tokenizer, geometry: VLConfig, encoder: VisionEncoder, options: MediaOptions) -> None:
        self.tok = tokenizer
        self.cfg = geometry
        self.encoder = encoder
        self.options = options
        self.items: list[list[ImageItem] | VideoItem] = []  # a PDF is a list of page images
        self.ids = {
            name: self.tok.convert_tokens_to_ids(name)
            for name in (self.cfg.img_start_token, self.cfg.img_context_token, self.cfg.img_end_token)
        }
        if self.tok.unk_token_id in self.ids.values():
            raise InvalidRequestError(
                "this checkpoint's tokenizer lacks the image tokens <img>, <image>, </img>"
            )

    # Loading ---------------------------------------------------------------------------------------------
    def add_image(self, image: Any) -> str:
        img = load_image(image, self.options.policy, self.options.limits)
        self.items.append([self._image_item(img)])
        return _MARKER.format(len(self.items) - 1)

    def _image_item(self, img, page: int | None = None) -> ImageItem:
        tiles = tile_image(img, self.options.max_num_tiles, self.cfg.force_image_size, self.cfg.use_thumbnail)
        u8 = _to_uint8_chw(tiles)
        key = f"image:{content_hash(u8.permute(0, 2, 3, 1).numpy())}"
        return ImageItem(MediaPixels("image", u8, key), page)

    def add_pdf(self, data: bytes) -> str:
        pages = render_pdf(data, max_pages=self.options.limits.max_pdf_pages)
        self.items.append([self._image_item(p, page=i + 1) for i, p in enumerate(pages)])
        return _MARKER.format(len(self.items) - 1)

    def add_video(self, source: Any, video_fps: float | None = None) -> str:
        o, limits = self.options, self.options.limits
        size = self.cfg.force_image_size
        if isinstance(source, (list, tuple)):
            clip = clip_from_frames(source, video_fps, max_frames=limits.max_video_frames)
        else:
            if isinstance(source, str):
                source = self._video_source(source)
            clip = decode_video(
                source, o.video_fps, o.video_num_frames, max_frames=limits.max_video_frames,
                max_seconds=limits.max_video_seconds, size=size,
            )  # fmt: skip
        frames = [resize_square(f, size) for f in clip.frames]
        u8 = _to_uint8_chw(frames)
        key = f"video:{content_hash(u8.permute(0, 2, 3, 1).numpy())}"  # the stacked buffer, not a copy
        self.items.append(VideoItem(clip, MediaPixels("video", u8, key), o.pruning_rate))
        return _MARKER.format(len(self.items) - 1)

    def _video_source(self, url: str) -> Any:
        """A local path stays a path (decoded with seeking, never read whole); anything else is fetched."""
        o = self.options
        if url.startswith("data:") or ("://" in url and not url.startswith("file://")):
            return fetch_bytes(url, o.policy, o.limits, o.limits.max_video_bytes)
        return str(resolve_local_path(url, o.policy, o.limits.max_video_bytes))  # a path or a file:// URL

    def add_part(self, part: dict[str, Any]) -> str:
        kind = part.get("type")
        if kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            return self.add_image(self._require(url, "image_url.url"))
        if kind == "image_pil":
            return self.add_image(part.get("image_pil"))
        if kind == "video_url":
            ref = part.get("video_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            return self.add_video(self._require(url, "video_url.url"))
        if kind in ("file", "input_file"):
            spec = part.get("file", {}) if kind == "file" else part
            return self.add_pdf(self._file_bytes(spec))
        raise InvalidRequestError(f"unsupported content part type {kind!r}")

    @staticmethod
    def _require(value: Any, name: str) -> Any:
        if not value:
            raise InvalidRequestError(f"{name} is required")
        return value

    def _file_bytes(self, spec: dict[str, Any]) -> bytes:
        o = self.options
        if spec.get("file_data"):
            data = spec["file_data"]
            if data.startswith("data:"):
                raw = fetch_bytes(data, o.policy, o.limits, o.limits.max_pdf_bytes)
            else:
                try:
                    raw = base64.b64decode(data, validate=True)
                except ValueError:
                    raise MediaError("file_data must be a data: URI or base64") from None
        elif spec.get("file_url"):
            raw = fetch_bytes(spec["file_url"], o.policy, o.limits, o.limits.max_pdf_bytes)
        else:
            raise InvalidRequestError("a file part needs file_data or file_url")
        if not raw.startswith(b"%PDF"):
            raise MediaError("only PDF files are supported in file parts")
        return raw

    # Tokens ----------------------------------------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def build(self, text: str) -> ProcessedInput:
        """Turn rendered text with media markers into token ids, spans and the per-media report."""
        ids: list[int] = []
        spans: list[MediaSpan] = []
        info: list[dict[str, Any]] = []
        video_total = video_kept = 0
        n_images = sum(len(i) for i in self.items if isinstance(i, list))
        image_no = 0
        pos = 0
        used = set()
        for m in _MARKER_RE.finditer(text):
            ids += self._text(text[pos : m.start()])
            pos = m.end()
            index = int(m.group(1))
            used.add(index)
            item = self.items[index]
            if isinstance(item, list):
                for k, image in enumerate(item):
                    image_no += 1
                    if k:
                        ids += self._text("\n")
                    if n_images > 1:
                        ids += self._text(f"<image {image_no}>")
                    ids += self._image_tokens(image, spans, len(ids))
                    entry = {
                        "type": "image",
                        "tiles": image.pixels.data.shape[0],
                        "tokens": self._tile_tokens(image),
                    }
                    if image.page is not None:
                        entry["page"] = image.page
                    info.append(entry)
            else:
                kept = self._video_tokens(item, ids, spans)
                total = item.pixels.data.shape[0] * self.cfg.tokens_per_tile
                video_total, video_kept = video_total + total, video_kept + sum(kept)
                clip = item.clip
                info.append({
                    "type": "video", "frame_indices": clip.frame_indices, "seconds": clip.seconds,
                    "tokens": total, "tokens_kept": sum(kept),
                })  # fmt: skip
        ids += self._text(text[pos:])
        if len(used) != len(self.items):
            raise InvalidRequestError("some media items have no place in the prompt")
        videos = (
            {"total": video_total, "kept": video_kept}
            if any(isinstance(i, VideoItem) for i in self.items)
            else None
        )
        shown = _MARKER_RE.sub(
            lambda m: "<video>" if isinstance(self.items[int(m.group(1))], VideoItem) else "<image>", text
        )
        return ProcessedInput(shown, ids, spans, info, videos)

    def _tile_tokens(self, image: ImageItem) -> int:
        return image.pixels.data.shape[0] * self.cfg.tokens_per_tile

    def _image_tokens(self, image: ImageItem, spans: list[MediaSpan], at: int) -> list[int]:
        n = self._tile_tokens(image)
        start_id, ctx_id, end_id = self.ids.values()
        spans.append(MediaSpan(at + 1, None, n, image.pixels.key, pixels=image.pixels))
        return [start_id] + [ctx_id] * n + [end_id]

    def _video_tokens(self, item: VideoItem, ids: list[int], spans: list[MediaSpan]) -> list[int]:
        ctx_id = self.ids[self.cfg.img_context_token]
        pixels = item.pixels
        total = pixels.data.shape[0]
        if item.pruning_rate > 0:  # EVS needs every frame now: the embeddings decide each frame's tokens
            step = self.encoder.frames_per_encode
            grid = torch.cat(
                [
                    self.encoder.encode_frames(pixels, lo, min(lo + step, total))
                    for lo in range(0, total, step)
                ]
            )
            mask = evs.retention_mask(grid, item.pruning_rate)
            kept = [int(k) for k in mask.flatten(1).sum(1).tolist()]
        else:
            grid, mask, kept = None, None, [self.cfg.tokens_per_tile] * total
        frame = 0
        for piece in frame_prompt_text(item.clip, kept):
            if piece.kind == "text":
                ids += self._text(str(piece.value))
                continue
            n = int(piece.value)
            if n:
                key = f"{pixels.key}:{frame}:{item.pruning_rate}"
                embeddings = (
                    grid[frame][mask[frame]] if grid is not None else None
                )  # None: the engine encodes
                spans.append(MediaSpan(len(ids), embeddings, n, key, pixels=pixels, frame=frame))
                ids += [ctx_id] * n
            frame += 1
        return kept


def chat_with_media(
    builder: MediaBuilder,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> ProcessedInput:
    """OpenAI messages whose content parts may hold images, videos and PDFs."""
    text = render_chat(
        builder.tok,
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs,
        on_media=builder.add_part,
    )
    return builder.build(text)


def prompt_with_media(builder: MediaBuilder, prompt: dict[str, Any]) -> ProcessedInput:
    """`{"prompt": "...<image>...<video>...", "multi_modal_data": {"image": ..., "video": ...}}` (vLLM's
    shape). Placeholders `<image>` / `<video>` in the text mark where each item goes, in order; without
    any, the media goes first."""
    data = prompt["multi_modal_data"]
    images = data.get("image")
    images = [] if images is None else images if isinstance(images, list) else [images]
    video = data.get("video")
    videos = (
        [] if video is None else [video] if not isinstance(video, list) or _is_frame_list(video) else video
    )
    text = prompt["prompt"]
    if "\x00" in text:
        raise InvalidRequestError("the prompt contains a NUL character")
    img_markers = [builder.add_image(im) for im in images]
    vid_markers = [builder.add_video(v, data.get("video_fps")) for v in videos]
    n_img, n_vid = text.count("<image>"), text.count("<video>")
    if n_img == 0 and n_vid == 0:
        text = "".join(img_markers + vid_markers) + text
    else:
        if n_img != len(images) or n_vid != len(videos):
            raise InvalidRequestError(
                f"the prompt has {n_img} <image> and {n_vid} <video> placeholders for {len(images)} images and "
                f"{len(videos)} videos"
            )
        for marker in img_markers:
            text = text.replace("<image>", marker, 1)
        for marker in vid_markers:
            text = text.replace("<video>", marker, 1)
    out = builder.build(text)
    out.prompt = prompt["prompt"]
    return out


def _is_frame_list(video: list) -> bool:
    """A list of frames (PIL images or arrays) is one video; a list of paths/bytes/frame lists is several."""
    return bool(video) and not isinstance(video[0], (str, bytes, list, tuple))
