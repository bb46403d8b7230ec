"""Prompts and conversations -> what the engine needs: token ids, and media spans to embed.

One place turns every kind of input (a string, token ids, a prompt with multi_modal_data, OpenAI
messages with content parts) into a `ProcessedInput`, for the Python API and the server alike. It knows
the tokenizer, the model's image geometry, the media defaults and, for EVS, the vision encoder's
interface; it never sees the engine.
"""

from __future__ import annotations

from typing import Any

from glimpse.config import VLConfig
from glimpse.errors import InvalidRequestError
from glimpse.inputs import ProcessedInput, VisionEncoder
from glimpse.processing.chat import render_chat
from glimpse.processing.media import Cancellation, MediaLimits, MediaPolicy
from glimpse.processing.multimodal import MediaBuilder, MediaOptions, chat_with_media, prompt_with_media


class InputProcessor:
    def __init__(
        self,
        tokenizer,
        geometry: VLConfig | None = None,
        encoder: VisionEncoder | None = None,
        *,
        video_pruning_rate: float = 0.0,
        media_policy: MediaPolicy | None = None,
        context_tokens: int | None = None,
    ) -> None:
        """`geometry` and `encoder` for a VL model (None: text only); `video_pruning_rate` and
        `media_policy` are the defaults for requests that name none. With `context_tokens` (the model's
        context), media that alone would not fit is refused before it is decoded."""
        if (geometry is None) != (encoder is None):
            raise ValueError("a VL model's processor needs both its geometry and its vision encoder")
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.encoder = encoder
        self.video_pruning_rate = video_pruning_rate
        self.media_policy = media_policy or MediaPolicy()
        self.context_tokens = context_tokens

    @property
    def is_multimodal(self) -> bool:
        return self.geometry is not None

    def from_prompt(self, prompt: Any) -> ProcessedInput:
        """A `str`, `{"prompt_token_ids": [...]}`, or `{"prompt": str, "multi_modal_data": {...}}`."""
        if isinstance(prompt, str):
            return ProcessedInput(prompt, self.tokenizer.encode(prompt))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise InvalidRequestError("prompt_token_ids must be a list of integers")
                return ProcessedInput(prompt.get("prompt"), list(ids))
            if "prompt" in prompt:
                if prompt.get("multi_modal_data"):
                    return self._multimodal_prompt(prompt)
                return ProcessedInput(prompt["prompt"], self.tokenizer.encode(prompt["prompt"]))
        raise InvalidRequestError(
            "a prompt must be a string, {'prompt_token_ids': [...]}, or {'prompt': str, 'multi_modal_data': {...}}"
        )

    def from_messages(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        media_io_kwargs: dict[str, Any] | None = None,
        video_pruning_rate: float | None = None,
        media_limits: MediaLimits | None = None,
        media_policy: MediaPolicy | None = None,
        cancel: Cancellation | None = None,
    ) -> ProcessedInput:
        """OpenAI messages; the media work stops (Cancelled) once `cancel` is set."""
        if self.is_multimodal:
            builder = self._media_builder(
                mm_processor_kwargs, media_io_kwargs, video_pruning_rate, media_limits, media_policy, cancel
            )
            return chat_with_media(
                builder, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                chat_template=chat_template, chat_template_kwargs=chat_template_kwargs,
            )  # fmt: skip
        text = render_chat(
            self.tokenizer, messages, tools=tools, add_generation_prompt=add_generation_prompt,
            chat_template=chat_template, chat_template_kwargs=chat_template_kwargs,
        )  # fmt: skip
        return ProcessedInput(text, self.tokenizer.encode(text, add_special_tokens=False))

    def _multimodal_prompt(self, prompt: dict[str, Any]) -> ProcessedInput:
        if not self.is_multimodal:
            raise InvalidRequestError("this model reads text only; multi_modal_data needs a VL checkpoint")
        builder = self._media_builder(
            prompt.get("mm_processor_kwargs"), prompt.get("media_io_kwargs"), prompt.get("video_pruning_rate"),
            None, None,
        )  # fmt: skip
        return prompt_with_media(builder, prompt)

    def _media_builder(
        self,
        mm_processor_kwargs: dict[str, Any] | None,
        media_io_kwargs: dict[str, Any] | None,
        video_pruning_rate: float | None,
        limits: MediaLimits | None,
        policy: MediaPolicy | None,
        cancel: Cancellation | None = None,
    ) -> MediaBuilder:
        rate = self.video_pruning_rate if video_pruning_rate is None else video_pruning_rate
        options = MediaOptions.build(
            self.geometry, mm_processor_kwargs, media_io_kwargs, rate, limits or MediaLimits(),
            policy or self.media_policy, cancel,
        )  # fmt: skip
        return MediaBuilder(self.tokenizer, self.geometry, self.encoder, options, self.context_tokens)
