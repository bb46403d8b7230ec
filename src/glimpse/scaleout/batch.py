"""Batch jobs on a Ray cluster: many documents or videos, one Glimpse engine per GPU.

The driver (this process) lists the inputs and keys each one the way the agents key their caches (a
hash of the file and of every parameter that shapes the result). The output JSONL is the job's ledger:
a line without an error whose key is still current means that input is done, so a rerun sends only the
rest. Ray Data turns the inputs left into a dataset of small blocks (one block per actor call) and maps
them over a pool of actors: each actor loads one engine (`num_gpus=1` on a GPU cluster, CPUs
otherwise) and runs the agent on its batch, with the agents' own batching inside. Results stream back
to the driver, which appends one line per input as they come (and writes the video reports).

Failures: an exception while processing an item is retried in the actor (`retries` times) and then
becomes the item's error line. An actor that dies (a killed process, a lost node) is restarted by Ray
and its unfinished calls rerun; a call whose actor died more than `retries` times is given up and its
inputs get error lines. Nothing is written twice: the driver writes each input's line once. A rerun
keeps error lines too (a corrupt file stays corrupt) unless `retry_errors` asks to try them again.

Ray is imported by the functions that need it (`pip install glimpse-vl[ray]`), so this module loads
without it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from glimpse.agents.cache import file_key, params_key
from glimpse.agents.client import InProcessClient
from glimpse.agents.document import ExtractAgent, ExtractOptions, check_schema, expand_inputs
from glimpse.agents.media import VideoReadError
from glimpse.agents.report import write_video_reports
from glimpse.agents.video import NOTES_VERSION, VideoAgent, VideoOptions

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mpg", ".mpeg", ".wmv", ".flv"}
RAY_MISSING = "Ray is not installed: `pip install glimpse-vl[ray]` (or `pip install 'ray[data,serve]'`)"
# Video options that change how the work is done, not its result: left out of the key.
_VIDEO_UNKEYED = ("cache_dir", "progress", "batch_segments")

OnResult = Callable[[dict[str, Any], str], None]


@dataclass
class RayOptions:
    """How a batch runs on the cluster."""

    address: str | None = None  # ray.init's: None (RAY_ADDRESS, else a running local cluster, else a
    # new one), "auto", "ray://HEAD:10001"; ignored when this process is already connected
    actors: int | None = None  # engines; default one per GPU of the cluster, or 1 on a CPU-only cluster
    gpus_per_actor: float | None = None  # default 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    batch_size: int | None = None  # inputs per actor call; default batch_documents, or 1 video
    retries: int = 2  # more attempts for an item whose processing raised, or whose actor died
    retry_errors: bool = False  # a rerun tries again the inputs whose line is an error (else it keeps them)
    parquet: Path | None = None  # also write the lines as Parquet here (nested values as JSON text)
    engine_args: dict[str, Any] = field(default_factory=dict)  # LLM(model, **engine_args) in each actor
    progress: bool = True
    on_result: OnResult | None = None  # called on the driver with each line and the worker that made it


@dataclass
class BatchSummary:
    total: int  # inputs
    skipped: int  # already done by an earlier run
    done: int  # finished by this run without error
    failed: int  # finished by this run with an error line
    out: Path
    actors: int  # engines started (0 when nothing was left to do)
    elapsed_s: float


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise RuntimeError(f"{RAY_MISSING} ({e})") from None
    return ray


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _engine(model: str, engine_args: dict[str, Any]) -> InProcessClient:
    # The model name (not the actor's) is the client's name: it is part of every cache key.
    return InProcessClient(model, name=model, **engine_args)


# --------------------------------------------------------------------------------------------- jobs


@dataclass
class _Job:
    """What differs between the two kinds of batch."""

    kind: str  # "documents" | "videos"
    params_key: str
    worker: type
    worker_kwargs: dict[str, Any]
    batch_size: int

    def error_line(self, path: str, key: str | None, message: str) -> dict[str, Any]:
        if self.kind == "documents":
            return {"file": path, "data": None, "pages": None, "error": message, "key": key}
        return {"file": path, "report": None, "report_dir": None, "error": message, "key": key}


def extract_params(model: str, schema: dict[str, Any], options: ExtractOptions) -> dict[str, Any]:
    return options.params(model, schema)


def video_params(model: str, options: VideoOptions) -> dict[str, Any]:
    """Everything that shapes a video's report: the notes' key and the tasks' settings."""
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    tasks = {k: v for k, v in fields.items() if k not in _VIDEO_UNKEYED}
    tasks["limits"] = dataclasses.asdict(options.limits)
    return {"v": NOTES_VERSION, "model": model, "notes": options.notes_params(model), "tasks": tasks}


def expand_videos(items: list[str | Path]) -> list[Path]:
    """Files as given; directories walked (sorted) for video files."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        else:
            out.append(path)
    return out


# ------------------------------------------------------------------------------------------ actors


class ExtractWorker:
    """One engine and the extraction agent; called with a batch of document paths."""

    def __init__(self, model: str, schema: dict[str, Any], options: ExtractOptions,
                 engine_args: dict[str, Any], retries: int) -> None:  # fmt: skip
        self.agent = ExtractAgent(
            _engine(model, engine_args), schema, dataclasses.replace(options, progress=False)
        )
        self.retries = retries
        self.name = worker_name()

    def _alone(self, path: str) -> dict[str, Any]:
        error = "no attempt made"
        for _ in range(self.retries + 1):
            try:
                return next(iter(self.agent.run([path])))
            except Exception as e:  # a bug or a transient failure: try again, then report it in the line
                error = f"{type(e).__name__}: {e}"
        return {"file": path, "data": None, "pages": None,
                "error": f"failed after {self.retries + 1} attempts: {error}"}  # fmt: skip

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        paths, keys = [str(p) for p in batch["path"]], [str(k) for k in batch["key"]]
        try:
            lines = list(self.agent.run(paths))  # the whole batch in the agent's batched calls
        except Exception:  # something in the batch broke it: each document alone finds which
            lines = [self._alone(p) for p in paths]
        return {
            "key": keys,
            "line": [json.dumps({**line, "key": key}, ensure_ascii=False) for line, key in zip(lines, keys)],
            "thumbnails": [""] * len(keys),
            "worker": [self.name] * len(keys),
        }


class VideoWorker:
    """One engine; each call analyses its videos one after the other (segments batch inside)."""

    def __init__(self, model: str, options: VideoOptions, engine_args: dict[str, Any], retries: int) -> None:
        self.client = _engine(model, engine_args)
        self.options = dataclasses.replace(options, progress=False)
        self.retries = retries
        self.name = worker_name()

    def _one(self, path: str, key: str) -> tuple[dict[str, Any], str]:
        error = "no attempt made"
        for _ in range(self.retries + 1):
            try:
                result = VideoAgent(self.client, self.options).run(path)
            except VideoReadError as e:  # the file itself: another attempt reads the same bytes
                return {"file": path, "report": None, "report_dir": None, "error": str(e), "key": key}, ""
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                continue
            thumbs = {str(i): base64.b64encode(jpeg).decode("ascii") for i, jpeg in result.thumbnails.items()}
            line = {"file": path, "report": result.report, "report_dir": None, "error": None, "key": key}
            return line, json.dumps(thumbs)
        message = f"failed after {self.retries + 1} attempts: {error}"
        return {"file": path, "report": None, "report_dir": None, "error": message, "key": key}, ""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        paths, keys = [str(p) for p in batch["path"]], [str(k) for k in batch["key"]]
        done = [self._one(p, k) for p, k in zip(paths, keys)]
        return {
            "key": keys,
            "line": [json.dumps(line, ensure_ascii=False) for line, _ in done],
            "thumbnails": [thumbs for _, thumbs in done],
            "worker": [self.name] * len(keys),
        }


# ------------------------------------------------------------------------------------------ ledger


class _Ledger:
    """The output JSONL: lines kept from earlier runs (current key; without an error, or any with
    `keep_errors`), then this run's, appended and flushed one by one so an interrupted run keeps what it
    finished."""

    def __init__(self, out: Path, current: set[tuple[str, str]], keep_errors: bool) -> None:
        self.out = out
        self.done: set[tuple[str, str]] = set()
        kept: list[str] = []
        if out.is_file():
            with open(out, encoding="utf-8") as f:
                for text in f:
                    try:
                        line = json.loads(text)
                        entry = (line["file"], line["key"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line, or not ours
                    if entry in current and entry not in self.done and (keep_errors or not line.get("error")):
                        self.done.add(entry)
                        kept.append(text if text.endswith("\n") else text + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, out)
        self.handle = open(out, "a", encoding="utf-8")

    def write(self, line: dict[str, Any]) -> None:
        self.handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def write_parquet(jsonl: Path, path: Path) -> None:
    """The lines as a Parquet table: strings and nulls as they are, other values as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    with open(jsonl, encoding="utf-8") as f:
        for text in f:
            line = json.loads(text)
            rows.append({k: v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                         for k, v in line.items()})  # fmt: skip
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.table({c: pa.array([row.get(c) for row in rows], type=pa.string()) for c in columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


# ------------------------------------------------------------------------------------------ driver


def _sizing(ray, options: RayOptions, batches: int) -> tuple[int, dict[str, Any]]:
    """How many actors (never more than there are calls to make), and the resources each asks for."""
    wanted = options.actors
    gpus = ray.cluster_resources().get("GPU", 0)
    per_gpu = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if wanted is None:
        wanted = max(1, int(gpus / per_gpu)) if per_gpu > 0 else 1
    resources: dict[str, Any] = {"num_cpus": options.cpus_per_actor}
    if per_gpu > 0:
        resources["num_gpus"] = per_gpu
    return max(1, min(wanted, batches)), resources


def _results(
    ray, job: _Job, todo: list[tuple[str, str]], options: RayOptions, actors: int, resources: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Rows from the actors as they finish, then an error row for every input that never came back."""
    size = min(job.batch_size, len(todo))
    blocks = math.ceil(len(todo) / size)
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.max_errored_blocks  # the caller's, put back below
    context.enable_progress_bars = options.progress
    context.max_errored_blocks = -1  # a call given up on is reported below, not fatal to the job
    dataset = ray.data.from_items([{"path": p, "key": k} for p, k in todo], override_num_blocks=blocks)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for these yet and warns that the generic ones go in 2.64
        # (pyproject pins below it): without them an input that kills its actor would be retried forever.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        mapped = dataset.map_batches(
            job.worker, fn_constructor_kwargs=job.worker_kwargs, batch_size=size,
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
            max_restarts=-1, max_task_retries=options.retries, **resources,
        )  # fmt: skip
    returned: set[tuple[str, str]] = set()
    try:
        for row in mapped.iter_rows():
            line = json.loads(row["line"])
            entry = (line["file"], line["key"])
            if entry in returned:
                continue  # never expected (Ray returns a retried call's output once); written once regardless
            returned.add(entry)
            yield {"line": line, "thumbnails": row["thumbnails"], "worker": row["worker"]}
    finally:
        context.enable_progress_bars, context.max_errored_blocks = saved
    for path, key in todo:
        if (path, key) not in returned:
            message = f"its worker died more than {options.retries} times while processing it"
            yield {"line": job.error_line(path, key, message), "thumbnails": "", "worker": ""}


def _run(job: _Job, paths: list[Path], out: Path, options: RayOptions,
         on_line: Callable[[dict[str, Any], str], None] | None = None) -> BatchSummary:  # fmt: skip
    t0 = time.monotonic()
    entries: list[tuple[str, str | None, str | None]] = []  # (path, key, error)
    for path in paths:
        try:
            entries.append((str(path), f"{file_key(path)}-{job.params_key}", None))
        except OSError as e:
            entries.append((str(path), None, f"cannot read the file ({e.strerror or e})"))
    current = {(p, k) for p, k, _ in entries if k is not None}
    ledger = _Ledger(out, current, keep_errors=not options.retry_errors)
    todo = [(p, k) for p, k, error in entries if k is not None and (p, k) not in ledger.done]
    done = failed = actors = 0
    bar = tqdm(
        total=len(entries), initial=len(ledger.done), desc=job.kind, unit="", disable=not options.progress
    )
    try:
        for path, key, error in entries:
            if error is not None:
                ledger.write(job.error_line(path, key, error))
                failed += 1
                bar.update(1)
        if todo:
            ray = import_ray()
            started = not ray.is_initialized()
            if started:
                ray.init(address=options.address, log_to_driver=options.progress)
            try:
                actors, resources = _sizing(ray, options, math.ceil(len(todo) / job.batch_size))
                for item in _results(ray, job, todo, options, actors, resources):
                    line = item["line"]
                    if on_line is not None:
                        on_line(line, item["thumbnails"])
                    ledger.write(line)
                    done, failed = (done + 1, failed) if not line.get("error") else (done, failed + 1)
                    bar.update(1)
                    if options.on_result is not None:
                        options.on_result(line, item["worker"])
            finally:
                if started:
                    ray.shutdown()
    finally:
        bar.close()
        ledger.close()
    if options.parquet is not None:
        write_parquet(out, Path(options.parquet))
    return BatchSummary(total=len(entries), skipped=len(ledger.done), done=done, failed=failed, out=out,
                        actors=actors, elapsed_s=round(time.monotonic() - t0, 3))  # fmt: skip


def extract_on_ray(
    inputs: list[str | Path], schema: dict[str, Any], model: str, out: str | Path,
    options: ExtractOptions | None = None, ray_options: RayOptions | None = None,
) -> BatchSummary:  # fmt: skip
    """`glimpse extract --ray`: one line per input in `out` (the line `extract` writes, plus `key`).

    `model` is loaded by each actor (`LLM(model, **ray_options.engine_args)`); the schema is checked
    here first (a SchemaProblem), so a bad schema fails before any actor starts."""
    options = options or ExtractOptions()
    ray_options = ray_options or RayOptions()
    check_schema(schema)
    job = _Job(
        kind="documents", params_key=params_key(extract_params(model, schema, options)), worker=ExtractWorker,
        worker_kwargs={"model": model, "schema": schema, "options": options,
                       "engine_args": ray_options.engine_args, "retries": ray_options.retries},
        batch_size=ray_options.batch_size or options.batch_documents,
    )  # fmt: skip
    return _run(job, expand_inputs(inputs), Path(out), ray_options)


def analyze_videos_on_ray(
    inputs: list[str | Path], model: str, out_dir: str | Path, options: VideoOptions | None = None,
    ray_options: RayOptions | None = None,
) -> BatchSummary:  # fmt: skip
    """`glimpse video --ray`: each video's report in `out_dir/STEM-KEY/` (report.json, .md, .html) and
    one line per video in `out_dir/results.jsonl` (`file`, `key`, `report`, `report_dir`, `error`)."""
    options = options or VideoOptions()
    ray_options = ray_options or RayOptions()
    out_dir = Path(out_dir)
    job = _Job(
        kind="videos", params_key=params_key(video_params(model, options)), worker=VideoWorker,
        worker_kwargs={"model": model, "options": options, "engine_args": ray_options.engine_args,
                       "retries": ray_options.retries},
        batch_size=ray_options.batch_size or 1,
    )  # fmt: skip

    def write_reports(line: dict[str, Any], thumbnails: str) -> None:
        if line.get("report") is None:
            return
        report_dir = out_dir / f"{Path(line['file']).stem}-{line['key'][:8]}"
        thumbs = {int(i): base64.b64decode(b) for i, b in json.loads(thumbnails or "{}").items()}
        write_video_reports(line["report"], thumbs, Path(line["file"]), report_dir)
        line["report_dir"] = str(report_dir)

    return _run(job, expand_videos(inputs), out_dir / "results.jsonl", ray_options, on_line=write_reports)


def print_summary(summary: BatchSummary, what: str) -> None:
    print(
        f"{summary.total} {what}: {summary.skipped} done before, {summary.done} done now, {summary.failed} "
        f"with errors, on {summary.actors} engine(s) in {summary.elapsed_s:.1f} s: {summary.out}",
        file=sys.stderr,
    )


__all__ = [
    "BatchSummary", "ExtractWorker", "RayOptions", "VideoWorker", "analyze_videos_on_ray", "expand_videos",
    "extract_on_ray", "video_params", "write_parquet",
]  # fmt: skip
