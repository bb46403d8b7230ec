"""AsyncLLM: the engine behind an async interface, for the server and the agents.

The engine runs on one background thread that owns it: requests and aborts reach it through a command
queue, outputs come back to each caller's asyncio queue. `generate` is an async iterator of cumulative
RequestOutputs; leaving it early (a client that disconnects) aborts the request and frees its memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from glimpse.engine.config import EngineConfig
from glimpse.engine.engine import LLMEngine
from glimpse.errors import GlimpseError
from glimpse.outputs import RequestOutput
from glimpse.processing.inputs import ProcessedInput
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


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="glimpse-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> AsyncLLM:
        return cls(LLMEngine(cfg))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def processor(self):
        return self.engine.processor

    # The engine thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        while not self._stopped.is_set():
            block = not engine.has_unfinished()
            try:
                while True:
                    cmd = self._commands.get(block=block, timeout=0.1 if block else None)
                    block = False
                    self._run_command(cmd)
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

    def _finish_stream(self, rid: str, error: BaseException) -> None:
        stream = self._streams.pop(rid, None)
        if stream is not None:
            stream.put(error)

    # The caller's side -------------------------------------------------------------------------------
    def process(self, prompt: Any) -> ProcessedInput:
        if isinstance(prompt, ProcessedInput):
            return prompt
        return self.engine.processor.from_prompt(prompt)

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
        self._stopped.set()
        self._thread.join(timeout=5)

    def is_idle(self) -> bool:
        """No request in flight and every block and slot free (what tests check after a storm)."""
        return not self.engine.has_unfinished() and self.engine.all_memory_free() and self._commands.empty()


__all__ = ["AsyncLLM", "EngineDeadError", "GlimpseError"]
