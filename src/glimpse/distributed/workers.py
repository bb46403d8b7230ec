"""The follower processes of a tensor-parallel group, seen from rank 0: started, fed, watched, stopped.

Rank 0 starts ranks 1..size-1 (spawned, so no CUDA or thread state is forked), each with a pipe. Rank 0
sends every follower the same messages through its pipe; a follower reads them in order and replies
only where asked. A watchdog thread waits on the processes: when one exits while the group is running,
it records why and calls `on_death`, so rank 0 fails with that message instead of waiting on a peer
that will never answer. A follower whose pipe closes (rank 0 gone) exits by itself.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from glimpse.distributed.group import CollectiveError

log = logging.getLogger(__name__)

FollowerMain = Callable[[int, int, str, Connection, Any], None]
"""(rank, size, init_method, pipe, payload): a follower's whole life; must be importable (spawned)."""


class WorkerLostError(RuntimeError):
    """A tensor-parallel rank died: the model is incomplete, so the engine cannot go on."""


def free_tcp_address() -> str:
    """A `tcp://127.0.0.1:PORT` rendezvous with a port free right now (all ranks live on this host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _death_message(rank: int, proc: mp.process.BaseProcess, size: int) -> str:
    return (
        f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}; "
        f"the model is split across {size} processes and cannot run without it"
    )


class Followers:
    """Ranks 1..size-1 of a group whose rank 0 is this process."""

    def __init__(self, size: int, main: FollowerMain, payload: Any, init_method: str) -> None:
        ctx = mp.get_context("spawn")
        self.size = size
        self.pipes: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        self.lost: str | None = None  # why the group broke, once it has
        self.on_death: list[Callable[[str], None]] = []
        self._closing = False
        self._lock = threading.Lock()
        self._lost_event = threading.Event()
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=main, args=(rank, size, init_method, theirs, payload), name=f"glimpse-tp-rank{rank}",
                daemon=True,
            )  # fmt: skip
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)
        self._watchdog = threading.Thread(target=self._watch, name="glimpse-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, start=1)}
        while sentinels:
            for s in wait(list(sentinels)):
                rank, proc = sentinels.pop(s)
                if self._closing:
                    continue
                proc.join(timeout=1)
                self._mark_lost(_death_message(rank, proc, self.size))

    def _mark_lost(self, why: str) -> None:
        with self._lock:  # the watchdog and the engine's thread may both find the death
            if self.lost is not None:
                return
            self.lost = why
            self._lost_event.set()
        log.critical("%s", why)
        for callback in list(self.on_death):
            try:
                callback(why)
            except Exception:
                log.exception("a tensor-parallel death callback failed")

    def check(self) -> None:
        """Raise WorkerLostError if a follower has died."""
        if self.lost is not None:
            raise WorkerLostError(self.lost)

    def send(self, message: Any) -> None:
        """The same message to every follower, in rank order."""
        self.check()
        try:
            for pipe in self.pipes:
                pipe.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as e:
            self._wait_for_cause()
            raise WorkerLostError(self.lost or f"a tensor-parallel rank stopped answering ({e})") from None

    def receive_all(self, timeout_s: float) -> list[Any]:
        """One reply from each follower, in rank order (within `timeout_s` each)."""
        replies = []
        for rank, pipe in enumerate(self.pipes, start=1):
            if not pipe.poll(timeout_s):
                self._wait_for_cause()
                raise WorkerLostError(
                    self.lost or f"tensor-parallel rank {rank} did not answer in {timeout_s:.0f} s"
                )
            try:
                reply = pipe.recv()
            except (EOFError, OSError):
                self._wait_for_cause()
                raise WorkerLostError(self.lost or f"tensor-parallel rank {rank} closed its pipe") from None
            if isinstance(reply, BaseException):  # the follower failed before it could join in
                raise reply
            replies.append(reply)
        return replies

    def explain(self, error: BaseException) -> BaseException:
        """A step that failed: WorkerLostError with the watchdog's reason when a follower died (a
        collective fails as its peer's socket closes, a moment before the watchdog may have looked),
        else the error itself."""
        if self.lost is None and isinstance(error, (CollectiveError, OSError)):
            self._wait_for_cause()
        return WorkerLostError(f"{self.lost} ({type(error).__name__}: {error})") if self.lost else error

    def _wait_for_cause(self, timeout_s: float = 15.0) -> None:
        """A failed send or collective is usually a dead follower the watchdog hasn't reported yet: give
        it up to `timeout_s` to (the watchdog alone reaps the processes, so nothing here races it)."""
        if self.lost is None and not self._closing:
            self._lost_event.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask every follower to stop, then make sure it has (terminated after `timeout_s`)."""
        self._closing = True
        for pipe in self.pipes:
            try:
                pipe.send(None)  # a follower stops on None
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=timeout_s)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for pipe in self.pipes:
            pipe.close()
