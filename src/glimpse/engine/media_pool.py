"""The media pool: where requests' media is fetched and decoded, apart from every other piece of work.

A fetch can hang on a slow server for its whole timeout, and decoding can take seconds of CPU. In the
event loop's default thread pool that work made text requests (and everything else sent there) wait
behind it. Here media work has threads of its own and a bounded queue:

- a request that finds every worker busy and the queue full is refused at once (503, try again later);
- a queued request whose work has not started after `queue_wait_s` is refused the same way, so no
  request waits longer than that for a worker;
- cancelling the task that awaits `run` (the server does when its client disconnects) cancels the
  request's media work: queued, it never starts; running, it stops at its next chunk, page or frame.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from glimpse.errors import GlimpseError
from glimpse.processing.media import Cancellation

T = TypeVar("T")

DEFAULT_QUEUE_WAIT_S = 10.0


class ServerBusyError(GlimpseError):
    """503: no room for the request's media work now; nothing was done, the client may try again."""

    status = 503
    error_type = "server_busy_error"


def default_media_workers() -> int:
    """As many as Python's default thread pool (cores + 4, at most 32): fetches mostly wait on sockets."""
    return min(32, (os.cpu_count() or 1) + 4)


class MediaPool:
    def __init__(
        self, workers: int | None = None, queue: int | None = None, queue_wait_s: float = DEFAULT_QUEUE_WAIT_S
    ) -> None:
        """`workers` threads (default: `default_media_workers()`), `queue` requests waiting for one
        (default: 4 per worker), each at most `queue_wait_s` seconds."""
        self.workers = workers or default_media_workers()
        self.queue = 4 * self.workers if queue is None else queue
        self.queue_wait_s = queue_wait_s
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="glimpse-media")
        self._lock = threading.Lock()
        self._admitted: set[Cancellation] = set()  # of the work queued or running

    def _admit(self) -> Cancellation:
        with self._lock:
            if len(self._admitted) >= self.workers + self.queue:
                raise ServerBusyError(
                    f"the server is busy with other requests' media ({self.workers} being processed, "
                    f"{self.queue} waiting); try again later"
                )
            cancel = Cancellation()
            self._admitted.add(cancel)
            return cancel

    def _release(self, cancel: Cancellation) -> None:
        with self._lock:
            self._admitted.discard(cancel)

    async def run(self, work: Callable[[Cancellation], T]) -> T:
        """`work(cancel)` on a media worker, its result or its exception. `cancel` is set when the
        awaiting task is cancelled; `work` passes it to the fetches and decoders, which then stop."""
        cancel = self._admit()
        try:
            future: Future[T] = self._executor.submit(work, cancel)
        except BaseException:
            self._release(cancel)
            raise
        future.add_done_callback(lambda _: self._release(cancel))
        result = asyncio.wrap_future(future)
        try:
            done, _ = await asyncio.wait({result}, timeout=self.queue_wait_s)
            if not done and future.cancel():  # still in the queue: it never starts
                raise ServerBusyError(
                    f"the server is busy with other requests' media: this request's media waited "
                    f"{self.queue_wait_s:g} s for a worker; try again later"
                )
            return await result
        finally:
            if not future.done():  # this task was cancelled (the client is gone): stop the work
                cancel.set()
                future.cancel()
            result.cancel()  # a no-op when awaited; else its outcome, when it comes, is nobody's

    def shutdown(self) -> None:
        """Cancel every request's media work (fetches stop at once) and let the threads end."""
        with self._lock:
            admitted = list(self._admitted)
        for cancel in admitted:
            cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
