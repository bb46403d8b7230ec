"""AsyncLLM: the engine behind an async interface, for the server and the agents.

The engine runs on one background thread that owns it: requests and aborts reach it through a command
queue, outputs come back to each caller's asyncio queue. `generate` is an async iterator of cumulative
RequestOutputs; leaving it early (a client that disconnects) aborts the request and frees its memory.

Input processing runs on the caller's threads (the server's worker threads); a chat's media work runs
in the media pool (media_pool.py), so text requests never wait behind it. The one thing processing
needs from the engine, EVS's frame embeddings, is handed to the engine thread as a command and waited
for, so the vision encoder only ever runs on the engine thread, between steps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from glimpse.engine.config import EngineConfig
from glimpse.engine.engine import LLMEngine
from glimpse.engine.llm import input_processor
from glimpse.engine.media_pool import MediaPool
from glimpse.engine.vision_encoder import CachedVisionEncoder
from glimpse.errors import GlimpseError
from glimpse.inputs import MediaPixels, ProcessedInput
from glimpse.outputs import RequestOutput
from glimpse.processing.multimodal import has_media
from glimpse.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineDeadError(RuntimeError):
    pass


class _OnEngineThread:
    """The engine's vision encoder as processing sees it from a request thread: each call is run by the
    engine thread between two steps (`run` hands it over and waits)."""

    def __init__(self, encoder: CachedVisionEncoder, run: Callable[..., Any]) -> None:
        self._encoder = encoder
        self._run = run
        self.frames_per_encode = encoder.frames_per_encode

    def encode_frames(self, pixels: MediaPixels, start: int, end: int) -> torch.Tensor:
        return self._run(self._encoder.encode_frames, pixels, start, end)


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        vision = engine.vision_encoder
        self.processor = input_processor(engine, _OnEngineThread(vision, self._call) if vision else None)
        self.media_pool = MediaPool()
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._closed = False  # the engine thread has stopped taking commands
        self._closing = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="glimpse-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> AsyncLLM:
        return cls(LLMEngine(cfg))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # The engine thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            with self._closing:
                self._closed = True
            while not self._commands.empty():  # nobody will run these: release whoever waits on them
                cmd = self._commands.get()
                if cmd[0] == "call":
                    cmd[1].set_exception(EngineDeadError("the engine has been shut down"))

    def _serve(self) -> None:
        engine = self.engine
        while not self._stopped.is_set():
            block = not engine.has_unfinished()
            try:
                while True:
                    cmd = self._commands.get(block=block, timeout=0.1 if block else None)
                    block = False
                    self._run_command(cmd)
                    if cmd[0] == "call":  # at most one vision call between two steps
                        break
            except queue.Empty:
                pass
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a failed step must not take the server down: fail what was in flight
                log.exception("engine step failed; aborting the requests in flight")
                for rid in list(engine.requests):
                    engine.abort(rid)
                    self._finish_stream(rid, e)
                engine.drop_pending()
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        self._streams.pop(out.request_id, None)

    def _run_command(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, inp, params = cmd
            try:
                self.engine.add_request(
                    rid, inp.prompt_token_ids, params, prompt=inp.prompt, media_spans=inp.media_spans,
                    media_info=inp.media_info, video_tokens=inp.video_tokens,
                )  # fmt: skip
            except Exception as e:
                self._finish_stream(rid, e)
        elif kind == "abort":
            out = self.engine.abort(cmd[1])
            stream = self._streams.pop(cmd[1], None)
            if stream is not None and out is not None:
                stream.put(out)
        elif kind == "call":
            _, future, fn, args = cmd
            try:
                future.set_result(fn(*args))
            except Exception as e:
                future.set_exception(e)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` run by the engine thread between two steps; blocks the calling thread until done."""
        future: Future = Future()
        with self._closing:
            if self._closed:
                raise EngineDeadError("the engine has been shut down")
            self._commands.put(("call", future, fn, args))
        return future.result()

    def _finish_stream(self, rid: str, error: BaseException) -> None:
        stream = self._streams.pop(rid, None)
        if stream is not None:
            stream.put(error)

    # The caller's side -------------------------------------------------------------------------------
    def process(self, prompt: Any) -> ProcessedInput:
        """`InputProcessor.from_prompt` (a ProcessedInput passes through). Media makes it blocking work:
        call it off the event loop."""
        if isinstance(prompt, ProcessedInput):
            return prompt
        return self.processor.from_prompt(prompt)

    async def process_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> ProcessedInput:
        """`InputProcessor.from_messages` (the chat template, the media), off the event loop. Messages
        with media go to the media pool, which may refuse them when busy (503); cancelling the awaiting
        task (a client that disconnects) cancels their fetching and decoding. Text-only messages go to
        a plain worker thread."""
        if not has_media(messages):
            return await asyncio.to_thread(self.processor.from_messages, messages, **kwargs)
        return await self.media_pool.run(
            lambda cancel: self.processor.from_messages(messages, cancel=cancel, **kwargs)
        )

    async def generate(
        self, prompt: Any, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request until it finishes; closing the iterator aborts it."""
        if self._stopped.is_set():
            raise EngineDeadError("the engine has been shut down")
        inp = prompt if isinstance(prompt, ProcessedInput) else await asyncio.to_thread(self.process, prompt)
        rid = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[rid] = stream
        self._commands.put(("add", rid, inp, sampling_params or SamplingParams()))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self.media_pool.shutdown()
        self._stopped.set()
        self._thread.join(timeout=5)

    def check_health(self) -> None:
        """EngineDeadError when the engine thread no longer runs (what a health check asks)."""
        if self._stopped.is_set() or not self._thread.is_alive():
            raise EngineDeadError("the engine has stopped")

    def is_idle(self) -> bool:
        """No request in flight and every block and slot free (what tests check after a storm)."""
        return not self.engine.has_unfinished() and self.engine.all_memory_free() and self._commands.empty()


__all__ = ["AsyncLLM", "EngineDeadError", "GlimpseError"]
