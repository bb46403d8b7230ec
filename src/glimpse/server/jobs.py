"""Agent jobs for the playground: each runs on one of a few daemon threads, behind a bounded queue, with
its files in a temporary directory; its progress is counted from the model requests it makes.

A job's agent reaches the model through `ProgressClient`, which counts each answered request into the
job and raises `JobCancelled` into a cancelled job at its next request. The video agent's segment notes
come first (requests with a clip and no tools); the first other request starts its answering stage.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glimpse.agents import ModelClient, SchemaProblem, VideoReadError
from glimpse.errors import GlimpseError, NotFoundError
from glimpse.server.protocol import random_id

log = logging.getLogger(__name__)

WORKERS = 2  # jobs running at once; each sends its model requests concurrently anyway
MAX_WAITING = 8  # jobs queued behind those
MAX_JOBS = 32  # jobs kept (with their files); the oldest finished go first


class BusyError(GlimpseError):
    """429: every job slot and queue place is taken; try again later."""

    status = 429
    error_type = "rate_limit_error"


class JobCancelled(Exception):
    """Raised into a job's agent at its next model request after the job was cancelled."""


@dataclass
class Job:
    id: str
    kind: str  # "video" or "extract"
    name: str
    dir: Path
    status: str = "queued"  # queued, running, done, failed, cancelled
    stage: str = "queued"
    done: int = 0
    total: int | None = None
    requests: int = 0  # model requests answered so far
    error: str | None = None
    result: Any = None  # video: the report; extract: the lines so far
    thumbnails: dict[int, bytes] = field(default_factory=dict)
    video: Path | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self, stage: str, done: int = 0, total: int | None = None) -> None:
        with self.lock:
            self.stage, self.done, self.total = stage, done, total

    def answered(self, counts_as_done: bool) -> None:
        with self.lock:
            self.requests += 1
            if counts_as_done:
                self.done += 1

    @property
    def ended(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def public(self) -> dict[str, Any]:
        with self.lock:
            end = self.finished or time.time()
            result = self.result
            if self.kind == "extract" and result is not None:  # a copy: the job may add lines meanwhile
                result = {"lines": list(result["lines"])}
            out: dict[str, Any] = {
                "id": self.id, "object": "glimpse.job", "kind": self.kind, "name": self.name,
                "status": self.status, "stage": self.stage,
                "progress": {"done": self.done, "total": self.total, "requests": self.requests},
                "created": int(self.created), "elapsed_s": round(end - (self.started or end), 3),
                "error": self.error, "result": result,
            }  # fmt: skip
        if self.kind == "video":
            base = f"/v1/glimpse/jobs/{self.id}"
            out["links"] = {"report_html": f"{base}/report.html", "report_json": f"{base}/report.json",
                            "video": f"{base}/video"}  # fmt: skip
        return out


class JobStore:
    """Jobs by id, the threads that run them, and the directory their files live in (made on first use)."""

    def __init__(
        self, workers: int = WORKERS, max_waiting: int = MAX_WAITING, max_jobs: int = MAX_JOBS
    ) -> None:
        self.workers, self.max_jobs = workers, max_jobs
        self.jobs: dict[str, Job] = {}
        self.queue: queue.Queue[tuple[Job, Callable[[Job], None]]] = queue.Queue(max_waiting)
        self.lock = threading.Lock()
        self._root: tempfile.TemporaryDirectory | None = None
        self._threads: list[threading.Thread] = []

    @property
    def root(self) -> Path:
        with self.lock:
            if self._root is None:
                self._root = tempfile.TemporaryDirectory(prefix="glimpse-jobs-")
            return Path(self._root.name)

    @property
    def cache_dir(self) -> Path:
        """The agents' cache, shared by this server's jobs: a new question about a video reuses its notes."""
        return self.root / "cache"

    def new(self, kind: str, name: str) -> Job:
        """A job with its directory, not yet queued; BusyError when the queue is full."""
        if self.queue.full():
            raise BusyError(f"{self.queue.maxsize} jobs are already waiting; try again when one has finished")
        job_id = random_id("job")
        job = Job(job_id, kind, name, self.root / job_id)
        job.dir.mkdir(parents=True)
        return job

    def submit(self, job: Job, work: Callable[[Job], None]) -> None:
        try:
            self.queue.put_nowait((job, work))
        except queue.Full:
            shutil.rmtree(job.dir, ignore_errors=True)
            raise BusyError(
                f"{self.queue.maxsize} jobs are already waiting; try again when one has finished"
            ) from None
        with self.lock:
            self.jobs[job.id] = job
            self._drop_old()
            if len(self._threads) < self.workers:  # daemon threads: a running job never holds up exit
                thread = threading.Thread(
                    target=self._work, name=f"glimpse-job-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def get(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(
                f"no job {job_id!r} (finished jobs are kept until {self.max_jobs} newer ones)"
            )
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self.lock:
            self.jobs.pop(job_id, None)
        with job.lock:
            job.cancelled = True
            if not job.ended and job.status == "queued":
                job.status, job.finished = "cancelled", time.time()
        if job.ended:
            shutil.rmtree(job.dir, ignore_errors=True)
        return job

    def _drop_old(self) -> None:
        ended = sorted((j for j in self.jobs.values() if j.ended), key=lambda j: j.created)
        for job in ended[: max(0, len(self.jobs) - self.max_jobs)]:
            del self.jobs[job.id]
            shutil.rmtree(job.dir, ignore_errors=True)

    def _work(self) -> None:
        while True:
            job, work = self.queue.get()
            if job.cancelled:
                continue
            with job.lock:
                job.status, job.started = "running", time.time()
            try:
                work(job)
                status, error = ("cancelled", None) if job.cancelled else ("done", None)
            except JobCancelled:
                status, error = "cancelled", None
            except (GlimpseError, VideoReadError, SchemaProblem) as e:
                status, error = "failed", str(e)
            except Exception as e:  # a bug or a broken dependency: the job says so, the server goes on
                log.exception("job %s failed", job.id)
                status, error = "failed", f"{type(e).__name__}: {e}"
            with job.lock:
                job.status, job.error, job.finished = status, error, time.time()
                if status == "done":
                    job.stage = "done"
            if job.cancelled:
                shutil.rmtree(job.dir, ignore_errors=True)


class ProgressClient(ModelClient):
    """The agent's client, counting answered requests into its job and stopping a cancelled job."""

    def __init__(self, client: ModelClient, job: Job) -> None:
        self.client, self.job, self.name = client, job, client.name

    def complete(self, requests, on_done=None):
        job = self.job
        if job.cancelled:
            raise JobCancelled()
        notes = job.kind == "video" and all(is_notes(r) for r in requests)
        if job.kind == "video":
            if notes and job.stage == "scanning":
                job.advance("notes", 0, job.total)
            elif not notes and job.stage in ("scanning", "notes"):
                job.advance("answering")

        def answered(i, out):
            job.answered(counts_as_done=notes)
            if on_done is not None:
                on_done(i, out)

        return self.client.complete(requests, answered)


def is_notes(request) -> bool:
    if request.tools:
        return False
    return any(
        isinstance(m.get("content"), list) and any(p.get("type") == "clip" for p in m["content"])
        for m in request.messages
    )


__all__ = [
    "Job",
    "JobStore",
    "ProgressClient",
    "BusyError",
    "JobCancelled",
    "WORKERS",
    "MAX_WAITING",
    "MAX_JOBS",
]
