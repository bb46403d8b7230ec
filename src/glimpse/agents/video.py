"""The video agent: hours of footage -> notes per segment -> answers, a summary and chapters citing time.

1. Scan: small thumbnails (keyframes when dense enough) give scene changes; segments of about
   `segment_seconds` start at the scene change nearest each boundary.
2. Notes: each segment is sampled (`fps`, at most `frames_per_segment` frames, evenly spaced from its
   start) and the model writes JSON notes under a schema, with EVS pruning near-duplicate frame tokens.
   Segments go to the model in batches (one batched call in-process, concurrent requests over HTTP);
   each finished segment is cached on disk, keyed by the file's hash and every parameter that shapes
   its notes, so an interrupted run resumes where it stopped.
3. Tasks: the question, the summary and the chapters each run a bounded tool loop over the notes
   (`inspect`, `frame`, `search_notes`, `read_notes`), in lockstep, ending in schema-bound JSON whose
   time ranges are clamped to the file.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from glimpse.agents import media, notes
from glimpse.agents.cache import ResultCache, default_cache_dir, file_key
from glimpse.agents.client import Completion, ModelClient, ModelRequest
from glimpse.agents.loop import (
    LoopLimits,
    LoopResult,
    Task,
    Tool,
    ToolError,
    ToolPlan,
    done,
    dumps,
    run_loops,
)
from glimpse.agents.scenes import Segment, cut_segments, scene_changes
from glimpse.agents.schemas import chapters_schema, cited_text_schema, frame_schema

NOTES_VERSION = 1  # bump when the notes prompt or schema changes: cached notes then no longer apply


@dataclass
class VideoOptions:
    question: str | None = None
    summary: bool = False
    chapters: bool = False
    segment_seconds: float = 30.0
    fps: float = 1.0
    frames_per_segment: int = 16
    video_pruning_rate: float = 0.5
    scene_threshold: float = 0.4
    thumb_every: float = 2.0  # seconds between scan thumbnails (when keyframes are sparser)
    max_chars: int = 300  # per note string; the answer and the summary get 8x
    max_items: int = 8  # per note list
    notes_max_tokens: int = 1024
    answer_max_tokens: int = 2048
    batch_segments: int = 32
    inspect_max_frames: int = 32
    frame_max_tiles: int = 12
    overview_chars: int = 60_000
    max_citations: int = 8
    max_chapters: int = 12
    limits: LoopLimits = field(default_factory=LoopLimits)
    temperature: float = 0.0
    cache_dir: Path | None = field(default_factory=default_cache_dir)  # None: keep nothing
    progress: bool = True

    def notes_params(self, model: str) -> dict[str, Any]:
        """Everything that shapes a segment's notes (the cache key)."""
        return {
            "v": NOTES_VERSION, "model": model, "segment_seconds": self.segment_seconds, "fps": self.fps,
            "frames": self.frames_per_segment, "q": self.video_pruning_rate, "scene": self.scene_threshold,
            "thumb_every": self.thumb_every, "chars": self.max_chars, "items": self.max_items,
            "max_tokens": self.notes_max_tokens, "temperature": self.temperature,
        }  # fmt: skip


@dataclass
class VideoResult:
    report: dict[str, Any]  # report.json
    thumbnails: dict[int, bytes]  # segment index -> JPEG of its keyframe (for the HTML report)
    path: Path


class _Usage:
    def __init__(self) -> None:
        self.requests = self.prompt_tokens = self.completion_tokens = 0

    def add(self, outs: list[Completion]) -> None:
        self.requests += len(outs)
        self.prompt_tokens += sum(o.prompt_tokens for o in outs)
        self.completion_tokens += sum(o.completion_tokens for o in outs)


class _Metered(ModelClient):
    """Counts requests and tokens on the way through."""

    def __init__(self, client: ModelClient, usage: _Usage) -> None:
        self.client, self.usage, self.name = client, usage, client.name

    def complete(self, requests, on_done=None):
        outs = self.client.complete(requests, on_done)
        self.usage.add(outs)
        return outs


def _keyframe_jpeg(frame, info: media.VideoInfo) -> bytes:
    """A 160-pixel-wide thumbnail in the file's aspect (frames for the model are squashed square)."""
    height = max(2, round(media.THUMB_WIDTH * info.height / info.width))
    return media.jpeg_bytes(Image.fromarray(frame).resize((media.THUMB_WIDTH, height), Image.BILINEAR), 75)


class VideoAgent:
    def __init__(self, client: ModelClient, options: VideoOptions | None = None) -> None:
        self.usage = _Usage()
        self.client = _Metered(client, self.usage)
        self.options = options or VideoOptions()
        # Wall seconds per phase of the last run (a benchmark reads them): scan, frames_wait (waiting for
        # decoded clips), frames_decode_threads (decoding, summed over the threads that overlap the model).
        self.timings: defaultdict[str, float] = defaultdict(float)
        self._timings_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ notes
    def _scan(self, path: Path, info: media.VideoInfo, cache: ResultCache) -> list[float]:
        o = self.options
        cached = cache.get("scan")
        if cached is not None:
            return cached["cuts"]
        thumbs = media.scan_thumbnails(path, info, every=o.thumb_every)
        cuts = scene_changes(thumbs, o.scene_threshold)
        cache.put("scan", {"cuts": cuts, "thumbnails": len(thumbs)})
        return cuts

    def _segment_request(self, path: Path, seg: Segment) -> tuple[media.Clip, ModelRequest]:
        o = self.options
        clip = media.read_clip(path, seg.start, seg.end, o.fps, o.frames_per_segment)
        return clip, notes.notes_request(
            clip, seg.start, seg.end, max_chars=o.max_chars, max_items=o.max_items,
            max_tokens=o.notes_max_tokens, pruning_rate=o.video_pruning_rate, temperature=o.temperature,
        )  # fmt: skip

    def _segment_entry(self, seg: Segment, clip: media.Clip | None, out: Completion | None,
                       error: str | None, info: media.VideoInfo) -> dict[str, Any]:  # fmt: skip
        entry: dict[str, Any] = {
            "index": seg.index, "start": round(seg.start, 3), "end": round(seg.end, 3), "scene_cut": seg.scene_cut,
            "frames": [round(t, 3) for t in clip.times] if clip else [], "fps": round(clip.fps, 4) if clip else 0.0,
            "keyframe": round(clip.times[len(clip.times) // 2], 3) if clip else None,
        }  # fmt: skip
        parsed = notes.empty_notes()
        if error is None and out is not None:
            try:
                parsed = notes.file_times(out.json(), clip.start, seg.start, seg.end)
            except ValueError as e:
                error = out.error or f"the notes are not valid JSON ({e}; finish_reason {out.finish_reason})"
        entry.update(parsed)
        entry["error"] = error
        if clip is not None:
            frame = clip.frames[len(clip.frames) // 2]
            entry["thumbnail"] = base64.b64encode(_keyframe_jpeg(frame, info)).decode("ascii")
        return entry

    def _notes(self, path: Path, info: media.VideoInfo, segments: list[Segment], cache: ResultCache):
        """Notes for every segment not cached. The next batch's clips decode in threads while the model
        works on the current batch, so decoding and the model overlap."""
        o = self.options
        entries: dict[int, dict[str, Any]] = {}
        for seg in segments:
            cached = cache.get(f"segment-{seg.index:05d}-{seg.start:.3f}-{seg.end:.3f}")
            if cached is not None:
                entries[seg.index] = cached
        todo = [s for s in segments if s.index not in entries]
        batches = [todo[lo : lo + o.batch_segments] for lo in range(0, len(todo), o.batch_segments)]
        bar = tqdm(total=len(segments), initial=len(entries), desc="segments", unit="seg",
                   disable=not o.progress, leave=False)  # fmt: skip
        with ThreadPoolExecutor(4) as pool:
            upcoming = [pool.submit(self._prepare, path, s) for s in batches[0]] if batches else []
            for n, batch in enumerate(batches):
                waited = time.monotonic()
                prepared = [f.result() for f in upcoming]
                self.timings["frames_wait"] += time.monotonic() - waited
                if n + 1 < len(batches):
                    upcoming = [pool.submit(self._prepare, path, s) for s in batches[n + 1]]
                ready = [(k, p) for k, p in enumerate(prepared) if p[1] is not None]

                def finished(i: int, out: Completion, ready=ready, batch=batch, prepared=prepared) -> None:
                    k = ready[i][0]
                    seg, clip = batch[k], prepared[k][0]
                    entry = self._segment_entry(seg, clip, out, out.error, info)
                    entries[seg.index] = entry
                    if entry["error"] is None:
                        cache.put(f"segment-{seg.index:05d}-{seg.start:.3f}-{seg.end:.3f}", entry)
                    bar.update(1)

                self.client.complete([p[1] for _, p in ready], on_done=finished)
                for k, (clip, req, error) in enumerate(prepared):
                    if req is None:
                        entries[batch[k].index] = self._segment_entry(batch[k], clip, None, error, info)
                        bar.update(1)
        bar.close()
        return [entries[s.index] for s in segments]

    def _prepare(self, path: Path, seg: Segment):
        started = time.monotonic()
        try:
            clip, req = self._segment_request(path, seg)
            return clip, req, None
        except media.VideoReadError as e:
            return None, None, str(e)
        finally:
            with self._timings_lock:
                self.timings["frames_decode_threads"] += time.monotonic() - started

    # ------------------------------------------------------------------------------------------ tools
    def _tools(
        self, path: Path, info: media.VideoInfo, segments: list[dict[str, Any]], focus: str
    ) -> list[Tool]:
        o = self.options
        d = info.duration

        def number(args: dict[str, Any], key: str, default: float | None = None) -> float:
            value = args.get(key)
            value = default if value is None else value
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ToolError(f"{key} must be a number of seconds, got {value!r}") from None

        def inspect(args: dict[str, Any]) -> ToolPlan:
            start, end = notes.clamp_range(0.0, d, number(args, "start"), number(args, "end"))
            if end - start < 1.0:
                start, end = notes.clamp_range(0.0, d, start - 0.5, end + 0.5)
            fps = min(max(number(args, "fps", 2.0), 0.1), 8.0)
            try:
                clip = media.read_clip(path, start, end, fps, o.inspect_max_frames)
            except media.VideoReadError as e:
                raise ToolError(str(e)) from None
            req = notes.notes_request(
                clip, start, end, max_chars=o.max_chars, max_items=o.max_items, max_tokens=o.notes_max_tokens,
                pruning_rate=o.video_pruning_rate, focus=focus, temperature=o.temperature,
            )  # fmt: skip

            def finish(outs: list[Completion]) -> str:
                try:
                    found = notes.file_times(outs[0].json(), clip.start, start, end)
                except ValueError:
                    return "error: the clip's notes could not be read"
                return dumps({"start": start, "end": end, "fps": round(clip.fps, 3), **found})

            return ToolPlan([req], finish, {"start": start, "end": end, "fps": fps})

        def frame(args: dict[str, Any]) -> ToolPlan:
            t = min(max(number(args, "t"), 0.0), d)
            try:
                ((true_t, image),) = media.frames_at(path, [t], size=None)
            except media.VideoReadError as e:
                raise ToolError(str(e)) from None
            text = (f"This is the frame at {true_t:.2f} s of the video. Describe it in detail and transcribe any "
                    f"visible text. Pay special attention to: {focus}")  # fmt: skip
            req = ModelRequest(
                messages=[
                    {"role": "system", "content": notes.NOTES_SYSTEM},
                    {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]},
                ],
                json_schema=frame_schema(o.max_chars, o.max_items), max_tokens=o.notes_max_tokens,
                max_num_tiles=o.frame_max_tiles, temperature=o.temperature,
            )  # fmt: skip

            def finish(outs: list[Completion]) -> str:
                try:
                    return dumps({"t": round(true_t, 3), **outs[0].json()})
                except ValueError:
                    return "error: the frame's description could not be read"

            return ToolPlan([req], finish, {"t": round(t, 3)})

        def search_notes(args: dict[str, Any]) -> ToolPlan:
            query = str(args.get("query", ""))
            return done(dumps(notes.search(segments, query)), {"query": query})

        def read_notes(args: dict[str, Any]) -> ToolPlan:
            start, end = notes.clamp_range(0.0, d, number(args, "start"), number(args, "end"))
            hits = [
                {k: s[k] for k in ("start", "end", "summary", *notes.NOTE_KINDS)}
                for s in segments
                if s["end"] >= start and s["start"] <= end
            ]
            return done(dumps(hits), {"start": start, "end": end})

        seconds = {"type": "number", "description": "seconds from the start of the video"}
        return [
            Tool("inspect", "Re-watch a time range more densely and get detailed notes on it.",
                 {"start": seconds, "end": seconds, "fps": {"type": "number", "description": "frames per second"}},
                 ["start", "end"], inspect),
            Tool("frame", "Look at the single frame at time t at full resolution (details, small text).",
                 {"t": seconds}, ["t"], frame),
            Tool("search_notes", "Find notes that mention words of the query.",
                 {"query": {"type": "string"}}, ["query"], search_notes),
            Tool("read_notes", "Read the full notes of the segments in a time range.",
                 {"start": seconds, "end": seconds}, ["start", "end"], read_notes),
        ]  # fmt: skip

    # ------------------------------------------------------------------------------------------ tasks
    def _tasks(self, info: media.VideoInfo, segments: list[dict[str, Any]]) -> dict[str, Task]:
        o = self.options
        d = info.duration
        system = (
            f"/no_think\nYou analyse a video of {notes.clock(d)} ({d:.1f} s) from notes on each of its segments. "
            "Tools let you look again: inspect(start, end, fps) re-watches a range densely, frame(t) looks at one "
            "frame closely, search_notes(query) and read_notes(start, end) look up notes. Times are seconds from "
            "the start of the video. Base everything on the video and cite the time ranges it rests on."
        )
        material = f"Notes, one line per segment:\n{notes.overview(segments, o.overview_chars)}"
        long_text = cited_text_schema(d, 8 * o.max_chars, o.max_citations)

        def task(what: str, final: str, schema: dict[str, Any]) -> Task:
            return Task(
                messages=[{"role": "system", "content": system},
                          {"role": "user", "content": f"{material}\n\nTask: {what}"}],
                final_instruction=final, final_schema=schema, final_max_tokens=o.answer_max_tokens,
            )  # fmt: skip

        tasks: dict[str, Task] = {}
        if o.question:
            tasks["answer"] = task(
                f"Answer this question about the video: {o.question}\nUse the tools when the notes are not enough.",
                "Now give the final answer as JSON: text (the answer) and citations (the time ranges, in seconds "
                "from the start, that support it).", long_text,
            )  # fmt: skip
        if o.summary:
            tasks["summary"] = task(
                "Summarise the whole video: what happens, who appears, what is shown, in order.",
                "Now give the summary as JSON: text (the summary) and citations (the time ranges, in seconds "
                "from the start, of the moments it mentions).", long_text,
            )  # fmt: skip
        if o.chapters:
            tasks["chapters"] = task(
                f"Divide the video into chapters that follow each other and cover it from 0 to {d:.1f} s, each "
                "with a short title and a one-sentence summary.",
                "Now give the chapters as JSON: chapters, each with start and end (seconds from the start of "
                "the video), title and summary.", chapters_schema(d, o.max_chars, o.max_chapters),
            )  # fmt: skip
        return tasks

    @staticmethod
    def _cited(result: LoopResult, d: float) -> dict[str, Any]:
        final = result.final or {}
        citations = []
        for c in final.get("citations") or []:
            start, end = notes.clamp_range(0.0, d, c.get("start"), c.get("end"))
            citations.append({"start": start, "end": end})
        return {"text": str(final.get("text", "")), "citations": citations, "steps": result.steps,
                "stopped": result.stopped, "error": result.error}  # fmt: skip

    @staticmethod
    def _chapters(result: LoopResult, d: float) -> list[dict[str, Any]]:
        chapters = []
        for c in (result.final or {}).get("chapters") or []:
            start, end = notes.clamp_range(0.0, d, c.get("start"), c.get("end"))
            chapters.append({"start": start, "end": end, "title": str(c.get("title", "")),
                             "summary": str(c.get("summary", ""))})  # fmt: skip
        return sorted(chapters, key=lambda c: (c["start"], c["end"]))

    # ------------------------------------------------------------------------------------------ run
    def run(self, path: str | Path) -> VideoResult:
        t0 = time.monotonic()
        o = self.options
        path = Path(path)
        info = media.probe(path)
        cache = ResultCache(o.cache_dir, "video", file_key(path), o.notes_params(self.client.name))
        started = time.monotonic()
        cuts = self._scan(path, info, cache)
        self.timings["scan"] += time.monotonic() - started
        segments = cut_segments(info.duration, cuts, o.segment_seconds)
        entries = self._notes(path, info, segments, cache)
        thumbnails = {e["index"]: base64.b64decode(e.pop("thumbnail")) for e in entries if "thumbnail" in e}
        tasks = self._tasks(info, entries)
        results: dict[str, LoopResult] = {}
        if tasks:
            focus = o.question or "what matters for a summary of the video"
            tools = self._tools(path, info, entries, focus)
            outcome = run_loops(self.client, list(tasks.values()), tools, o.limits, o.temperature)
            results = dict(zip(tasks, outcome))
        d = info.duration
        report = {
            "version": 1,
            "file": str(path),
            "duration": round(d, 3),
            "model": self.client.name,
            "sampling": {
                "segment_seconds": o.segment_seconds,
                "fps": o.fps,
                "frames_per_segment": o.frames_per_segment,
                "video_pruning_rate": o.video_pruning_rate,
                "scene_threshold": o.scene_threshold,
            },  # fmt: skip
            "scene_changes": [round(c, 3) for c in cuts],
            "segments": entries,
            "question": o.question,
            "answer": self._cited(results["answer"], d) if "answer" in results else None,
            "summary": self._cited(results["summary"], d) if "summary" in results else None,
            "chapters": self._chapters(results["chapters"], d) if "chapters" in results else None,
            "errors": [f"{name}: {r.error}" for name, r in results.items() if r.error],
            "usage": asdict_usage(self.usage),
            "elapsed_s": round(time.monotonic() - t0, 3),
        }
        return VideoResult(report, thumbnails, path)


def asdict_usage(usage: _Usage) -> dict[str, int]:
    return {"requests": usage.requests, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens}  # fmt: skip


def analyze_video(path: str | Path, client: ModelClient, options: VideoOptions | None = None) -> VideoResult:
    """Notes, then the answer, summary and chapters the options ask for (see the module docstring)."""
    return VideoAgent(client, options).run(path)
