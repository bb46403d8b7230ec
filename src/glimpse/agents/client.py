"""One way for the agents to ask the model: in-process over `glimpse.LLM`, or any OpenAI-compatible server.

Both backends take a list of `ModelRequest`s and return one `Completion` per request, in order, with
the same fields: the in-process backend runs the whole list as one batched `LLM.generate` call (the
engine schedules them together); the HTTP backend sends them from a thread pool (the server batches).

Messages are OpenAI-style, with two media parts of our own that each backend turns into what it sends:
- `{"type": "image", "image": PIL image or HxWx3 array}`: in-process a PIL image in `multi_modal_data`;
  over HTTP a JPEG `data:` URL in an `image_url` part.
- `{"type": "clip", "clip": media.Clip}`: frames already decoded at known times. In-process they go as a
  frame list with `video_fps` (the engine numbers them from 0 at that rate); over HTTP as a small MP4 in
  a `video_url` part, with `media_io_kwargs` that make the server sample exactly those frames, so the
  model reads the same prompt either way. At most one clip per request.
Reasoning is off for every request: the agents put `/no_think` in their system messages.
"""

from __future__ import annotations

import codecs
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from glimpse.agents.media import Clip, data_url, encode_clip, jpeg_bytes
from glimpse.agents.toolcalls import ToolCall, parse_arguments, parse_tool_calls
from glimpse.sampling_params import SamplingParams

DEFAULT_MODEL = "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16"
# Text that would read as a media placeholder or an image marker once rendered: defused in our prompts.
_PLACEHOLDERS = {"<image>": "< image>", "<video>": "< video>", "<img>": "< img>", "</img>": "< /img>"}


log = logging.getLogger(__name__)


@dataclass
class ModelRequest:
    messages: list[dict[str, Any]]
    max_tokens: int = 512
    temperature: float = 0.0
    json_schema: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    max_num_tiles: int | None = None
    video_pruning_rate: float | None = None
    seed: int | None = None
    logprobs: bool = False  # ask for each sampled token's log-probability (Completion.token_logprobs)


@dataclass
class Completion:
    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the request failed; the other fields are then empty
    # With ModelRequest.logprobs: (the text each token added, its log-probability), in order; None when
    # not asked for or the server sent none.
    token_logprobs: list[tuple[str, float]] | None = None

    def json(self) -> Any:
        """The text as JSON (a schema-constrained answer); ValueError when it isn't."""
        if self.error:
            raise ValueError(self.error)
        return json.loads(self.text)


OnDone = Callable[[int, Completion], None]


def defuse(text: str) -> str:
    for raw, safe in _PLACEHOLDERS.items():
        text = text.replace(raw, safe)
    return text


def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def _pil(image: Image.Image | np.ndarray) -> Image.Image:
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")


class ModelClient:
    """What the agents call. `name` identifies the model (part of cache keys)."""

    name: str

    def complete(self, requests: list[ModelRequest], on_done: OnDone | None = None) -> list[Completion]:
        raise NotImplementedError


class InProcessClient(ModelClient):
    """`glimpse.LLM` in this process; every call is one batched `generate`. `llm` is an `LLM`, or a model
    to load as `LLM(llm, **engine_args)`."""

    def __init__(self, llm: Any, name: str | None = None, **engine_args: Any) -> None:
        if isinstance(llm, str):
            from glimpse.engine.llm import LLM  # torch and the model code: only for in-process use

            name, llm = name or llm, LLM(llm, **engine_args)
        self.llm = llm
        self.name = name or "in-process"
        self.tokenizer = llm.get_tokenizer()
        self._lock = threading.Lock()  # the engine serves one caller at a time

    def _prompt(self, req: ModelRequest) -> Any:
        images: list[Image.Image] = []
        clips: list[Clip] = []
        messages = []
        for m in req.messages:
            pieces = []
            for part in _parts(m.get("content")):
                kind = part["type"]
                if kind == "text":
                    pieces.append(defuse(part["text"]))
                elif kind == "image":
                    images.append(_pil(part["image"]))
                    pieces.append("<image>")
                elif kind == "clip":
                    clips.append(part["clip"])
                    pieces.append("<video>")
                else:
                    raise ValueError(f"unsupported content part {kind!r}")
            messages.append({**m, "content": "\n".join(pieces)})
        if len(clips) > 1:
            raise ValueError("at most one clip per request")
        text = self.tokenizer.apply_chat_template(
            messages, tools=req.tools or None, add_generation_prompt=True, tokenize=False
        )
        if not images and not clips:
            return {"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False), "prompt": text}
        data: dict[str, Any] = {}
        if images:
            data["image"] = images
        if clips:
            data["video"] = clips[0].frames
            data["video_fps"] = clips[0].fps
        prompt: dict[str, Any] = {"prompt": text, "multi_modal_data": data}
        if req.max_num_tiles is not None:
            prompt["mm_processor_kwargs"] = {"max_num_tiles": req.max_num_tiles}
        if req.video_pruning_rate is not None:
            prompt["video_pruning_rate"] = req.video_pruning_rate
        return prompt

    @staticmethod
    def _params(req: ModelRequest) -> SamplingParams:
        return SamplingParams(
            max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed, json_schema=req.json_schema,
            logprobs=0 if req.logprobs else None,
        )  # fmt: skip

    def _completion(self, req: ModelRequest, out: Any) -> Completion:
        c = out.outputs[0]
        text, calls = (c.text, [])
        if req.tools:
            text, calls = parse_tool_calls(c.text)
        token_logprobs = None
        if req.logprobs and c.logprobs is not None and c.token_texts is not None:
            token_logprobs = [(piece, entry[token].logprob)
                              for piece, entry, token in zip(c.token_texts, c.logprobs, c.token_ids)]  # fmt: skip
        return Completion(
            text=text, tool_calls=calls, finish_reason=c.finish_reason,
            prompt_tokens=len(out.prompt_token_ids), completion_tokens=len(c.token_ids),
            token_logprobs=token_logprobs,
        )  # fmt: skip

    def complete(self, requests: list[ModelRequest], on_done: OnDone | None = None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        prompts, params, index = [], [], []
        for i, req in enumerate(requests):
            try:
                prompts.append(self._prompt(req))
                params.append(self._params(req))
                index.append(i)
            except Exception as e:  # one bad request fails alone
                results[i] = Completion("", error=f"{type(e).__name__}: {e}")
        with self._lock:
            try:
                outs = self.llm.generate(prompts, params) if prompts else []
                for i, out in zip(index, outs):
                    results[i] = self._completion(requests[i], out)
            except Exception as e:  # some request broke the batch: run each alone to find it
                log.warning("a batch of %d requests failed (%s: %s); running them one at a time",
                            len(index), type(e).__name__, e)  # fmt: skip
                for k, i in enumerate(index):
                    try:
                        results[i] = self._completion(
                            requests[i], self.llm.generate(prompts[k], params[k])[0]
                        )
                    except Exception as e:
                        results[i] = Completion("", error=f"{type(e).__name__}: {e}")
        done = [r if r is not None else Completion("", error="no result") for r in results]
        if on_done is not None:
            for i, r in enumerate(done):
                on_done(i, r)
        return done


class HTTPClient(ModelClient):
    """An OpenAI-compatible server (`glimpse serve`, vLLM) through the `openai` package."""

    def __init__(
        self, base_url: str, api_key: str | None = None, model: str | None = None, concurrency: int = 16,
        timeout: float = 600.0,
    ) -> None:  # fmt: skip
        import openai

        self.openai = openai.OpenAI(
            base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=2
        )
        self.model = model or self.openai.models.list().data[0].id
        self.name = f"{base_url.rstrip('/')}#{self.model}"
        self.concurrency = max(1, concurrency)

    @staticmethod
    def _message(m: dict[str, Any]) -> tuple[dict[str, Any], Clip | None]:
        if isinstance(m.get("content"), str) or m.get("content") is None:
            return dict(m), None
        parts, clip = [], None
        for part in m["content"]:
            kind = part["type"]
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                url = data_url(jpeg_bytes(part["image"], quality=92), "image/jpeg")
                parts.append({"type": "image_url", "image_url": {"url": url}})
            elif kind == "clip":
                clip = part["clip"]
                url = data_url(encode_clip(clip), "video/mp4")
                parts.append({"type": "video_url", "video_url": {"url": url}})
            else:
                raise ValueError(f"unsupported content part {kind!r}")
        return {**m, "content": parts}, clip

    def _kwargs(self, req: ModelRequest) -> dict[str, Any]:
        messages, clips = [], []
        for m in req.messages:
            msg, clip = self._message(m)
            messages.append(msg)
            if clip is not None:
                clips.append(clip)
        if len(clips) > 1:
            raise ValueError("at most one clip per request")
        extra: dict[str, Any] = {}
        if clips:  # sample exactly the clip's frames: a rate above the clip's, as many frames as it has
            extra["media_io_kwargs"] = {
                "video": {"fps": 2 * clips[0].fps, "num_frames": len(clips[0].frames)}
            }
        if req.max_num_tiles is not None:
            extra["mm_processor_kwargs"] = {"max_num_tiles": req.max_num_tiles}
        if req.video_pruning_rate is not None:
            extra["video_pruning_rate"] = req.video_pruning_rate
        kwargs: dict[str, Any] = {
            "model": self.model, "messages": messages, "max_tokens": req.max_tokens,
            "temperature": req.temperature,
        }  # fmt: skip
        if req.seed is not None:
            kwargs["seed"] = req.seed
        if req.json_schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": req.json_schema, "strict": True},
            }
        if req.tools:
            kwargs["tools"], kwargs["tool_choice"] = req.tools, "auto"
        if req.logprobs:
            kwargs["logprobs"] = True
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    def _one(self, req: ModelRequest) -> Completion:
        try:
            response = self.openai.chat.completions.create(**self._kwargs(req))
        except Exception as e:
            return Completion("", error=f"{type(e).__name__}: {e}")
        choice = response.choices[0]
        calls = []
        for call in choice.message.tool_calls or []:
            arguments = parse_arguments(call.function.arguments)
            calls.append(ToolCall(call.function.name, arguments if arguments is not None else {}, id=call.id))
        usage = response.usage
        token_logprobs = None
        if req.logprobs and choice.logprobs is not None and choice.logprobs.content is not None:
            token_logprobs = _token_pieces(choice.logprobs.content)
        return Completion(
            text=(choice.message.content or "").strip() if calls else choice.message.content or "",
            tool_calls=calls, finish_reason=choice.finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0, token_logprobs=token_logprobs,
        )  # fmt: skip

    def complete(self, requests: list[ModelRequest], on_done: OnDone | None = None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        pool = ThreadPoolExecutor(min(self.concurrency, max(1, len(requests))))
        try:
            futures = {pool.submit(self._one, req): i for i, req in enumerate(requests)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if on_done is not None:
                    on_done(i, results[i])
        finally:  # interrupted (Ctrl-C): drop the requests not yet sent instead of waiting for them
            pool.shutdown(wait=False, cancel_futures=True)
        return [r for r in results if r is not None]


def _token_pieces(entries: list[Any]) -> list[tuple[str, float]]:
    """OpenAI's per-token logprob entries -> (the text each token added, its logprob). A token's `token`
    is its text decoded alone (U+FFFD for part of a character); its `bytes` decoded in sequence give the
    characters it completes, so the pieces join to the content exactly."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return [(decoder.decode(bytes(t.bytes)) if t.bytes is not None else t.token, t.logprob) for t in entries]


def make_client(
    model: str | None = None, base_url: str | None = None, api_key: str | None = None, concurrency: int = 16
) -> ModelClient:
    """`base_url` given: that server (`model` names the served model, else its first); else `model`
    (default the BF16 VL checkpoint) loaded in this process."""
    if base_url:
        return HTTPClient(base_url, api_key=api_key, model=model, concurrency=concurrency)
    return InProcessClient(model or DEFAULT_MODEL)
