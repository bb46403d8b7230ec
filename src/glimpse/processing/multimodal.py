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
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from glimpse.config import VLConfig
from glimpse.errors import InvalidRequestError, MediaError
from glimpse.inputs import MediaPixels, MediaSpan, ProcessedInput, VisionEncoder
from glimpse.processing import evs
from glimpse.processing.chat import render_chat
from glimpse.processing.image import resize_square, tile_count, tile_image
from glimpse.processing.media import (
    Cancellation,
    MediaLimits,
    MediaPolicy,
    content_hash,
    fetch_bytes,
    finish_image,
    image_bytes,
    load_image,
    open_image,
    resolve_local_path,
)
from glimpse.processing.pdf import render_pdf
from glimpse.processing.video import VideoClip, clip_from_frames, frame_prompt_text
from glimpse.processing.video_decode import decode_video

TEXT_PART_TYPES = ("text", "input_text")


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
    cancel: Cancellation | None = None  # set when the request is gone: the media work stops

    @classmethod
    def build(
        cls,
        geometry: VLConfig,
        mm_processor_kwargs: dict[str, Any] | None,
        media_io_kwargs: dict[str, Any] | None,
        video_pruning_rate: float,
        limits: MediaLimits,
        policy: MediaPolicy,
        cancel: Cancellation | None = None,
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
        return cls(tiles, float(fps), num, float(q), policy, limits, cancel)


def _to_uint8_chw(images: list) -> torch.Tensor:
    """[N, 3, H, W] uint8 as a channels-last view of one stacked [N, H, W, 3] buffer: no transposing copy
    on the host (moving it to the GPU keeps the strides; the normalisation there reads it as it is)."""
    arrays = [im if isinstance(im, np.ndarray) else np.asarray(im.convert("RGB")) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class MediaBuilder:
    """Loads the media of one prompt, in order, and turns it into tokens and spans.

    Each item's place in the rendered text is a marker holding a random nonce of this builder, so text
    (a user's message, a system prompt) can never name an item: it can't guess the nonce. Before an
    item is decoded, the prompt tokens it will take are counted from its header or metadata (image
    size, PDF page sizes, sampled frames), and the request is refused once the media alone would not
    fit in `context_tokens`. Identical bytes are decoded once per request.
    """

    def __init__(
        self,
        tokenizer,
        geometry: VLConfig,
        encoder: VisionEncoder,
        options: MediaOptions,
        context_tokens: int | None = None,
    ) -> None:
        self.tok = tokenizer
        self.cfg = geometry
        self.encoder = encoder
        self.options = options
        self.context_tokens = context_tokens
        self.items: list[list[ImageItem] | VideoItem] = []  # a PDF is a list of page images
        self.media_tokens = 0  # placeholder tokens of the items so far
        # what was decoded, by the hash of its bytes: identical media is decoded once per request
        self._images: dict[str, ImageItem] = {}
        self._pdfs: dict[str, list[ImageItem]] = {}
        self._videos: dict[str, VideoItem] = {}
        self._nonce = secrets.token_hex(16)
        self._marker_re = re.compile(f"\x00media:{self._nonce}:(\\d+)\x00")
        self.ids = {
            name: self.tok.convert_tokens_to_ids(name)
            for name in (self.cfg.img_start_token, self.cfg.img_context_token, self.cfg.img_end_token)
        }
        if self.tok.unk_token_id in self.ids.values():
            raise InvalidRequestError(
                "this checkpoint's tokenizer lacks the image tokens <img>, <image>, </img>"
            )

    def _add(self, item: list[ImageItem] | VideoItem, tokens: int) -> str:
        """Append an item taking `tokens` placeholder tokens; its marker for the text."""
        self._check_room(tokens)
        self.media_tokens += tokens
        self.items.append(item)
        return f"\x00media:{self._nonce}:{len(self.items) - 1}\x00"

    def _check_room(self, tokens: int) -> None:
        """400 when the media so far and `tokens` more leave no room for a generated token."""
        total = self.media_tokens + tokens
        if self.context_tokens is not None and total + 1 > self.context_tokens:
            raise InvalidRequestError(
                f"the media in this request take at least {total} prompt tokens; this model's context is "
                f"{self.context_tokens} tokens, which must hold the prompt and at least one generated token "
                "(send fewer or smaller media, fewer PDF pages or video frames)"
            )

    def _check_cancelled(self) -> None:
        if self.options.cancel is not None:
            self.options.cancel.check()

    def _tiles(self, width: int, height: int) -> int:
        size, thumbnail = self.cfg.force_image_size, self.cfg.use_thumbnail
        return tile_count(width, height, self.options.max_num_tiles, size, thumbnail)

    # Loading ---------------------------------------------------------------------------------------------
    def add_image(self, image: Any) -> str:
        self._check_cancelled()
        o = self.options
        if isinstance(image, Image.Image):
            self._check_room(self._tiles(image.width, image.height) * self.cfg.tokens_per_tile)
            item = self._image_item(load_image(image, o.policy, o.limits))
        else:
            data = image_bytes(image, o.policy, o.limits, o.cancel)
            key = content_hash(data)
            if key not in self._images:
                opened = open_image(data, o.limits)  # the header only
                w, h = opened.size  # EXIF may turn it a quarter: count the cheaper way round
                self._check_room(min(self._tiles(w, h), self._tiles(h, w)) * self.cfg.tokens_per_tile)
                self._images[key] = self._image_item(finish_image(opened, o.limits))
            item = self._images[key]
        return self._add([item], self._tile_tokens(item))

    def _image_item(self, img, page: int | None = None) -> ImageItem:
        tiles = tile_image(img, self.options.max_num_tiles, self.cfg.force_image_size, self.cfg.use_thumbnail)
        u8 = _to_uint8_chw(tiles)
        key = f"image:{content_hash(u8.permute(0, 2, 3, 1).numpy())}"
        return ImageItem(MediaPixels("image", u8, key), page)

    def add_pdf(self, data: bytes) -> str:
        self._check_cancelled()
        key = content_hash(data)
        if key not in self._pdfs:

            def check_pages(sizes: list[tuple[int, int]]) -> None:
                self._check_room(sum(self._tiles(w, h) for w, h in sizes) * self.cfg.tokens_per_tile)

            o = self.options
            pages = render_pdf(
                data, max_pages=o.limits.max_pdf_pages, before_rendering=check_pages, cancel=o.cancel
            )
            self._pdfs[key] = [self._image_item(p, page=i + 1) for i, p in enumerate(pages)]
        pages = self._pdfs[key]
        return self._add(pages, sum(self._tile_tokens(p) for p in pages))

    def _video_token_count(self, frames: int) -> int:
        """The placeholder tokens of `frames` sampled frames: what EVS keeps (all of them without it)."""
        return evs.retained_count(frames, self.cfg.tokens_per_tile, self.options.pruning_rate)

    def add_video(self, source: Any, video_fps: float | None = None) -> str:
        self._check_cancelled()
        o, limits = self.options, self.options.limits
        size = self.cfg.force_image_size
        key = None
        if isinstance(source, (list, tuple)):
            clip = clip_from_frames(source, video_fps, max_frames=limits.max_video_frames)
        else:
            if isinstance(source, str):
                source = self._video_source(source)
            if isinstance(source, bytes | bytearray | memoryview):  # a local path is not read whole
                key = content_hash(source)
                if key in self._videos:
                    item = self._videos[key]
                    return self._add(item, self._video_token_count(item.pixels.data.shape[0]))
            clip = decode_video(
                source, o.video_fps, o.video_num_frames, max_frames=limits.max_video_frames,
                max_seconds=limits.max_video_seconds, size=size,
                before_decoding=lambda n: self._check_room(self._video_token_count(n)), cancel=o.cancel,
            )  # fmt: skip
        frames = [resize_square(f, size) for f in clip.frames]
        u8 = _to_uint8_chw(frames)
        pixels_key = f"video:{content_hash(u8.permute(0, 2, 3, 1).numpy())}"  # the stacked buffer, not a copy
        item = VideoItem(clip, MediaPixels("video", u8, pixels_key), o.pruning_rate)
        if key is not None:
            self._videos[key] = item
        return self._add(item, self._video_token_count(len(frames)))

    def _video_source(self, url: str) -> Any:
        """A local path stays a path (decoded with seeking, never read whole); anything else is fetched."""
        o = self.options
        if url.startswith("data:") or ("://" in url and not url.startswith("file://")):
            return fetch_bytes(url, o.policy, o.limits, o.limits.max_video_bytes, o.cancel)
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
                raw = fetch_bytes(data, o.policy, o.limits, o.limits.max_pdf_bytes, o.cancel)
            else:
                try:
                    raw = base64.b64decode(data, validate=True)
                except ValueError:
                    raise MediaError("file_data must be a data: URI or base64") from None
        elif spec.get("file_url"):
            raw = fetch_bytes(spec["file_url"], o.policy, o.limits, o.limits.max_pdf_bytes, o.cancel)
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
        for m in self._marker_re.finditer(text):
            ids += self._text(text[pos : m.start()])
            pos = m.end()
            index = int(m.group(1))
            if index in used:  # a template that repeats a message: the item would count twice
                raise InvalidRequestError("the chat template placed a media item twice in the prompt")
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
        shown = self._marker_re.sub(
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


def has_media(messages: list[dict[str, Any]]) -> bool:
    """Whether any message has a content part other than text: work for the media pool."""
    return any(
        isinstance(part, dict) and part.get("type") not in TEXT_PART_TYPES
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for part in m["content"]
    )


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
