"""The offline Python API, as in vLLM: `LLM(model).generate(prompts)` and `LLM(model).chat(messages)`.

`LLM` composes an input processor and an engine; `input_processor` is how any caller (AsyncLLM too)
builds the processor that fits an engine's tokenizer, model and media settings.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from glimpse.engine.config import EngineConfig
from glimpse.engine.engine import LLMEngine
from glimpse.inputs import MediaPixels, VisionEncoder
from glimpse.outputs import RequestOutput
from glimpse.processing.inputs import InputProcessor
from glimpse.processing.media import MediaPolicy
from glimpse.sampling_params import SamplingParams


def input_processor(engine: LLMEngine, encoder: VisionEncoder | None = None) -> InputProcessor:
    """The processor for `engine`'s inputs. EVS reaches the vision encoder through `encoder`; by default
    the engine's own, called on the caller's thread (right when that thread also steps the engine)."""
    cfg, vision = engine.cfg, engine.vision_encoder
    return InputProcessor(
        engine.tokenizer,
        vision.config if vision is not None else None,
        encoder or vision,
        video_pruning_rate=cfg.media.video_pruning_rate,
        media_policy=MediaPolicy(
            allowed_local_media_path=cfg.media.allowed_local_media_path,
            allow_private_urls=cfg.media.allow_private_media_urls,
        ),
        context_tokens=engine.max_model_len,
    )


class _OneAtATime:
    """The engine's vision encoder for processing threads: one call at a time, as the engine's memory plan
    and encoder cache assume (EVS encodes a video's frames while its prompt is processed)."""

    def __init__(self, encoder: VisionEncoder) -> None:
        self._encoder = encoder
        self._lock = threading.Lock()
        self.frames_per_encode = encoder.frames_per_encode

    def encode_frames(self, pixels: MediaPixels, start: int, end: int) -> torch.Tensor:
        with self._lock:
            return self._encoder.encode_frames(pixels, start, end)


class LLM:
    def __init__(self, model: str | os.PathLike[str], **kwargs: Any) -> None:
        """`kwargs`: the flat settings of `EngineConfig` (API.md's `LLM(...)` arguments and their defaults)."""
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **kwargs))
        vision = self.engine.vision_encoder
        self.processor = input_processor(self.engine, _OneAtATime(vision) if vision is not None else None)
        self._ids = itertools.count()
        # Prompts of one call are processed in parallel (decoding, tiling and resizing media release the
        # GIL): a batch of document pages was bound by this on one core.
        self._pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="glimpse-inputs")

    def _process_all(self, items: list, process: Callable[[Any], Any]) -> list:
        """process(item) for every item, in order; the first error in order is raised, as a loop would."""
        if len(items) <= 1:
            return [process(item) for item in items]
        return list(self._pool.map(process, items))

    def get_tokenizer(self):
        return self.engine.tokenizer

    @staticmethod
    def _per_prompt(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        return params

    def generate(
        self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """One prompt or a list; the result is always a list in the same order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        inputs = self._process_all(list(prompts), self.processor.from_prompt)
        return self._run(inputs, self._per_prompt(sampling_params, len(inputs)))

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        media_io_kwargs: dict[str, Any] | None = None,
        video_pruning_rate: float | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of message dicts) or a list of them; one output per conversation."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        inputs = self._process_all(
            conversations,
            lambda conv: self.processor.from_messages(
                conv,
                tools=tools,
                chat_template=chat_template,
                chat_template_kwargs=chat_template_kwargs,
                mm_processor_kwargs=mm_processor_kwargs,
                media_io_kwargs=media_io_kwargs,
                video_pruning_rate=video_pruning_rate,
            ),
        )
        return self._run(inputs, self._per_prompt(sampling_params, len(inputs)))

    def _run(self, inputs: list, params: list[SamplingParams]) -> list[RequestOutput]:
        engine = self.engine
        order = []
        try:
            for inp, p in zip(inputs, params):
                rid = str(next(self._ids))
                engine.add_request(
                    rid, inp.prompt_token_ids, p, prompt=inp.prompt, media_spans=inp.media_spans,
                    media_info=inp.media_info, video_tokens=inp.video_tokens,
                )  # fmt: skip
                order.append(rid)
            done: dict[str, RequestOutput] = {}
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            for rid in order:  # leave the engine clean for the next call
                engine.abort(rid)
            raise
        return [done[rid] for rid in order]
