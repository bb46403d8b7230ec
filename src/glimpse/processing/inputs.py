"""Prompts and conversations -> what the engine needs: token ids, and media spans to embed.

One place turns every kind of input (a string, token ids, a prompt with multi_modal_data, OpenAI
messages with content parts) into a `ProcessedInput`, for the Python API and the server alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glimpse.engine.request import MediaSpan
from glimpse.errors import InvalidRequestError
from glimpse.processing.chat import render_chat


@dataclass
class ProcessedInput:
    prompt: str | None
    prompt_token_ids: list[int]
    media_spans: list[MediaSpan] = field(default_factory=list)
    media_info: list[dict[str, Any]] = field(default_factory=list)
    video_tokens: dict[str, int] | None = None


class InputProcessor:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer

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
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        media_io_kwargs: dict[str, Any] | None = None,
        video_pruning_rate: float | None = None,
        media_limits: Any = None,
        media_policy: Any = None,
    ) -> ProcessedInput:
        if getattr(self.engine.model, "is_multimodal", False):
            from glimpse.processing.multimodal import process_chat

            return process_chat(
                self, messages, tools=tools, chat_template_kwargs=chat_template_kwargs,
                mm_processor_kwargs=mm_processor_kwargs, media_io_kwargs=media_io_kwargs,
                video_pruning_rate=video_pruning_rate, media_limits=media_limits, media_policy=media_policy,
            )  # fmt: skip
        text = render_chat(self.tokenizer, messages, tools=tools, chat_template_kwargs=chat_template_kwargs)
        return ProcessedInput(text, self.tokenizer.encode(text, add_special_tokens=False))

    def _multimodal_prompt(self, prompt: dict[str, Any]) -> ProcessedInput:
        if not getattr(self.engine.model, "is_multimodal", False):
            raise InvalidRequestError("this model reads text only; multi_modal_data needs a VL checkpoint")
        from glimpse.processing.multimodal import process_prompt

        return process_prompt(self, prompt)
