"""agents-video and agents-extract: the two agents' heavy passes, timed end to end with the in-process engine.

- agents-video: a generated long H.264 video (1080p by default) through the video analyst's whole notes
  pass (scan, segments, notes per segment; no question, summary or chapters), with the notes' output
  capped. Reported: total seconds, segments, and where the time went.
- agents-extract: generated text-heavy US-letter PDFs through the document extractor under an invoice
  schema, output capped. Reported: pages per second and the same kind of breakdown.

Breakdown (seconds of wall time on the thread that drives the engine, each counted once):
  scan / pages      the agent's own media work it had to wait for (thumbnail scan; clips or pages not
                    decoded or rendered yet when the model wanted them); the decoding done in threads
                    while the model worked is reported beside, as thread-seconds;
  processing        prompts to engine inputs (tokenising, tiling, frame tensors, EVS's own bookkeeping) and
                    adding them to the engine (compiling their JSON schemas), less the vision encoder
                    calls inside it;
  vision            the vision encoder (RADIO + projector), the device synchronised around each call;
  prefill / decode  engine steps that computed prompt tokens (mixed steps count here) / only decoded,
                    less the vision encoder calls inside them (structured-output masks are inside both);
  other             the rest (the agents' Python, JSON parsing, result caching).

The inputs are made once and kept (`--agents-dir`, default a glimpse-bench folder in the temp dir): the
video is encoded in parallel parts (one libx264 process per core) and joined without re-encoding.
Every frame of the video is different (a moving picture, a moving square and a frame counter), so no
encoder or prefix cache can serve one segment from another.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glimpse.agents import (
    ExtractAgent,
    ExtractOptions,
    InProcessClient,
    VideoAgent,
    VideoOptions,
    media,
    notes,
)
from glimpse.bench.random_model import bench_tokenizer, random_model, restrict_vocab
from glimpse.engine.config import EngineConfig
from glimpse.engine.engine import LLMEngine
from glimpse.engine.llm import LLM, input_processor

SCENARIOS = ("agents-video", "agents-extract")


def add_agents_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("agents-video, agents-extract (the agents in-process; run them on their own)")
    g.add_argument("--agents-video-minutes", type=float, default=60.0, help="length of the generated video")
    g.add_argument("--agents-video-size", default="1920x1080", help="WIDTHxHEIGHT of the generated video")
    g.add_argument("--agents-video-fps", type=int, default=10,
                   help="frame rate of the generated video (10: a 60-minute 1080p file encodes in about a "
                        "minute on 16 cores; the analyst samples 1 fps either way)")  # fmt: skip
    g.add_argument("--agents-segment-seconds", type=float, default=30.0, help="the analyst's segment length")
    g.add_argument("--agents-sample-fps", type=float, default=1.0, help="the analyst's sampling rate")
    g.add_argument("--agents-frames-per-segment", type=int, default=16, help="frames per segment, at most")
    g.add_argument("--agents-pruning-rate", type=float, default=0.5, help="EVS rate of the notes requests")
    g.add_argument("--agents-batch-segments", type=int, default=32, help="segments per batched engine call")
    g.add_argument(
        "--agents-notes-max-tokens", type=int, default=256, help="output cap of each segment's notes"
    )
    g.add_argument("--agents-pages", type=int, default=256, help="PDF pages extracted (agents-extract)")
    g.add_argument("--agents-pages-per-doc", type=int, default=4, help="pages per generated document")
    g.add_argument("--agents-extract-tiles", type=int, default=6, help="max tiles per page")
    g.add_argument("--agents-extract-max-tokens", type=int, default=256, help="output cap of each request")
    g.add_argument("--agents-reask", action="store_true",
                   help="let the extractor re-ask failing or uncertain fields (off by default: random weights "
                        "fail every record, which would time the re-ask on every document)")  # fmt: skip
    g.add_argument(
        "--agents-dir",
        default=None,
        help="where the generated inputs are made and kept (default: glimpse-bench in the temp dir)",
    )


# ------------------------------------------------------------------------------------------- the video


@dataclass(frozen=True)
class VideoSpec:
    minutes: float = 60.0
    width: int = 1920
    height: int = 1080
    fps: int = 10
    keyint_seconds: int = 2  # a keyframe every 2 s: the analyst's scan reads keyframes only
    crf: int = 23
    seed: int = 0
    version: int = 1  # bump when the picture changes

    @property
    def frames(self) -> int:
        return max(1, round(self.minutes * 60 * self.fps))

    @property
    def keyint(self) -> int:
        return max(1, self.keyint_seconds * self.fps)

    def file_name(self) -> str:
        return (f"agents-{self.minutes:g}min-{self.width}x{self.height}-{self.fps}fps-k{self.keyint}-crf{self.crf}-"
                f"s{self.seed}-v{self.version}.mp4")  # fmt: skip


def scene_starts(spec: VideoSpec) -> list[int]:
    """First frame of each scene: scenes last 15 to 75 s (seeded), so cuts fall inside segments."""
    rng = np.random.default_rng(spec.seed)
    starts, at = [], 0
    while at < spec.frames:
        starts.append(at)
        at += int(rng.integers(15, 76)) * spec.fps
    return starts


class _Scene:
    """One scene's planes (a coarse random picture larger than the frame, panned), made once per scene."""

    MARGIN = 256

    def __init__(self, spec: VideoSpec, index: int) -> None:
        rng = np.random.default_rng((spec.seed, index))
        w, h, m = spec.width, spec.height, self.MARGIN
        block = int(rng.choice([32, 64, 128]))
        base = int(rng.integers(40, 200))
        coarse = rng.integers(
            max(16, base - 60), min(235, base + 60), ((h + m) // block + 2, (w + m) // block + 2)
        )
        self.luma = np.repeat(np.repeat(coarse.astype(np.uint8), block, 0), block, 1)
        cb, cr = (int(x) for x in rng.integers(60, 196, 2))
        self.cb = np.full((h // 2, w // 2), cb, np.uint8)
        self.cr = np.full((h // 2, w // 2), cr, np.uint8)
        self.pan = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))


def _frame(spec: VideoSpec, scene: _Scene, k: int, into: np.ndarray) -> None:
    """yuv420p planes of frame k (stacked [H*3/2, W], as PyAV takes them): the scene panning, a bright
    square crossing it, and frame k's number in binary along the top (every frame is different)."""
    w, h, m = spec.width, spec.height, _Scene.MARGIN
    dy, dx = ((m - abs(k * p % (2 * m) - m)) % m for p in scene.pan)  # panning back and forth: no jumps
    y = into[:h]
    y[:] = scene.luma[dy : dy + h, dx : dx + w]
    side = max(8, h // 6)
    x0 = (k * max(1, w // (8 * spec.fps))) % max(1, w - side)
    y[h // 3 : h // 3 + side, x0 : x0 + side] = 235
    bit_w, bit_h = max(2, w // 40), max(2, h // 40)
    for b in range(24):
        y[:bit_h, b * bit_w : (b + 1) * bit_w] = 235 if (k >> b) & 1 else 16
    into[h : h + h // 4] = scene.cb.reshape(h // 4, w)
    into[h + h // 4 :] = scene.cr.reshape(h // 4, w)


def _encode_part(spec: VideoSpec, first: int, last: int, path: str) -> int:
    """Frames first..last-1 as one MP4 (starting on a keyframe), one encoder thread: parts run in parallel."""
    import av

    starts = scene_starts(spec)
    opts = {"preset": "ultrafast", "crf": str(spec.crf), "threads": "1",
            "x264-params": f"keyint={spec.keyint}:min-keyint={spec.keyint}:scenecut=0"}  # fmt: skip
    planes = np.empty((spec.height * 3 // 2, spec.width), np.uint8)
    scene_index, scene = -1, None
    with av.open(path, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=spec.fps, options=opts)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        for k in range(first, last):
            index = int(np.searchsorted(starts, k, side="right")) - 1
            if index != scene_index:
                scene_index, scene = index, _Scene(spec, index)
            _frame(spec, scene, k, planes)
            for packet in stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return last - first


def _join(parts: list[tuple[str, int]], path: Path, spec: VideoSpec) -> None:
    """The parts' packets end to end (no re-encoding), each part shifted by the frames before it."""
    import av

    with av.open(parts[0][0]) as first, av.open(str(path), mode="w", format="mp4") as out:
        template = first.streams.video[0]
        tb = template.time_base
        ostream = out.add_stream_from_template(template)
        offset = 0
        for part, frames in parts:
            shift = Fraction(offset, spec.fps) / tb
            if shift.denominator != 1:
                raise ValueError(f"a {spec.fps} fps frame is not a whole number of {tb} ticks")
            with av.open(part) as src:
                for packet in src.demux(src.streams.video[0]):
                    if packet.dts is None:
                        continue
                    packet.pts += int(shift)
                    packet.dts += int(shift)
                    packet.stream = ostream
                    out.mux(packet)
            offset += frames


def make_video(spec: VideoSpec, work_dir: Path, workers: int | None = None) -> tuple[Path, dict]:
    """Build (or reuse) the video; returns its path and how it was made."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / spec.file_name()
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") == asdict(spec) and meta.get("bytes") == path.stat().st_size:
            return path, meta | {"reused": True}
    started = time.monotonic()
    workers = workers or os.cpu_count() or 1
    gops = math.ceil(spec.frames / spec.keyint)
    per = math.ceil(gops / max(1, min(workers, gops))) * spec.keyint  # parts start on keyframes
    bounds = [(a, min(spec.frames, a + per)) for a in range(0, spec.frames, per)]
    names = [str(work_dir / f"part-{i:03d}-{spec.file_name()}") for i in range(len(bounds))]
    # fork: the workers need only numpy and PyAV, and no device has been touched yet
    with ProcessPoolExecutor(
        min(workers, len(bounds)), mp_context=multiprocessing.get_context("fork")
    ) as pool:
        counts = list(pool.map(_encode_part, itertools.repeat(spec), *zip(*bounds), names))
    encode_s = time.monotonic() - started
    tmp = path.with_suffix(".part.mp4")
    _join(list(zip(names, counts)), tmp, spec)
    tmp.replace(path)
    for name in names:
        Path(name).unlink(missing_ok=True)
    meta = {"spec": asdict(spec), "bytes": path.stat().st_size, "parts": len(bounds), "encode_s": encode_s,
            "total_s": time.monotonic() - started, "scene_changes": len(scene_starts(spec)) - 1}  # fmt: skip
    meta_path.write_text(json.dumps(meta, indent=2))
    return path, meta | {"reused": False}


# ------------------------------------------------------------------------------------------- the PDFs

INVOICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string"},
        "date": {"type": "string"},
        "vendor": {"type": "string"},
        "total": {"type": "number"},
        "items": {"type": "array", "items": {"type": "object", "required": ["description", "amount"],
                  "properties": {"description": {"type": "string"}, "amount": {"type": "number"}}}},
    },
    "required": ["invoice_number", "date", "vendor", "total"],
}  # fmt: skip

_WORDS = (
    "service delivery contract payment invoice account balance period terms net due within days of "
    "receipt late fee applies interest annual rate customer supplier order quantity unit price tax "
    "shipping handling warehouse region north south east west total subtotal discount credit note "
    "reference purchase agreement maintenance support license hardware software consulting hours"
).split()


def _pdf_text(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def text_pdf(pages: list[list[str]]) -> bytes:
    """A PDF of US-letter pages, each its lines in 9-point Helvetica (real text, as a word processor
    writes it, not images)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]  # fmt: skip
    kids = []
    for lines in pages:
        body = "BT /F1 9 Tf 11 TL 50 750 Td " + " ".join(f"{_pdf_text(x)} Tj T*" for x in lines) + " ET"
        stream = body.encode("latin-1", "replace")
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        content = len(objects)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                       b"/Resources << /Font << /F1 3 0 R >> >> >>" % content)  # fmt: skip
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids),
        len(kids),
    )
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def invoice_pages(doc: int, pages: int, seed: int = 0) -> list[list[str]]:
    """Dense invoice-like text: a header, line items and paragraphs of terms, 60 lines a page."""
    rng = np.random.default_rng((seed, doc))

    def words(n: int) -> str:
        return " ".join(rng.choice(_WORDS, n))

    out = []
    for p in range(pages):
        lines = []
        if p == 0:
            lines += [f"INVOICE No. INV-{doc:05d}-{int(rng.integers(1000, 9999))}", f"Date: 2026-{1 + doc % 12:02d}-"
                      f"{1 + doc % 28:02d}", f"Vendor: {words(3).title()} Ltd.", ""]  # fmt: skip
        while len(lines) < 60:
            if rng.random() < 0.5:
                lines.append(f"{len(lines):3d}  {words(8):<70} {int(rng.integers(1, 40)):3d} x "
                             f"{rng.uniform(1, 900):9.2f} EUR")  # fmt: skip
            else:
                lines.append(words(16))
        if p == pages - 1:
            lines[-1] = f"TOTAL DUE: {rng.uniform(100, 90000):.2f} EUR"
        out.append(lines[:60])
    return out


def make_pdfs(pages: int, per_doc: int, work_dir: Path) -> list[Path]:
    """`pages` pages as documents of `per_doc` pages (the last may be shorter), made once and kept."""
    folder = work_dir / f"agents-pdfs-{pages}p-{per_doc}-v1"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for doc, first in enumerate(range(0, pages, per_doc)):
        path = folder / f"invoice-{doc:05d}.pdf"
        if not path.is_file():
            tmp = path.with_suffix(".part")
            tmp.write_bytes(text_pdf(invoice_pages(doc, min(per_doc, pages - first))))
            tmp.replace(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- the engine


class _EngineLLM(LLM):
    """`LLM` around an engine built here (a random-weight model has no checkpoint directory to load)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.processor = input_processor(engine)
        self._ids = itertools.count()


def build_llm(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[LLM, str]:
    kwargs = {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if args.random_weights:
        cfg = EngineConfig.from_kwargs("<bench>", **kwargs)
        model = random_model(args.random_weights, device, dtype, quantization=args.quantization)
        tokenizer = bench_tokenizer()
        restrict_vocab(model, len(tokenizer))  # every sampled token is one the tokenizer can spell
        return _EngineLLM(LLMEngine(cfg, model=model, tokenizer=tokenizer)), f"random:{args.random_weights}"
    name = args.model or "tiny-vl"
    return LLM(name, **kwargs), name


class EnginePhases:
    """Wall seconds of the engine's phases, by wrapping the methods of one LLM's parts (see the module
    docstring). Time is exclusive: a vision call inside a step counts as vision, not as the step."""

    def __init__(self, llm: LLM) -> None:
        self.device = llm.engine.device
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.counts: defaultdict[str, int] = defaultdict(int)
        self._stack: list[float] = []  # per open region: seconds of its nested regions
        self._prefilled = False
        engine, model = llm.engine, llm.engine.model
        engine.step = self._step(engine.step)
        engine.scheduler.schedule = self._schedule(engine.scheduler.schedule)
        llm.processor.from_prompt = self._region(llm.processor.from_prompt, "processing")
        engine.add_request = self._region(engine.add_request, "processing")
        for name in ("encode_video", "encode_images"):
            setattr(model, name, self._region(getattr(model, name), "vision", sync=True))

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _enter(self) -> float:
        self._stack.append(0.0)
        return time.perf_counter()

    def _leave(self, started: float, category: str) -> None:
        elapsed = time.perf_counter() - started
        nested = self._stack.pop()
        self.seconds[category] += elapsed - nested
        self.counts[category] += 1
        if self._stack:
            self._stack[-1] += elapsed

    def _region(self, fn, category: str, sync: bool = False):
        def timed(*args, **kwargs):
            if sync:
                self._sync()  # work queued before this call is not ours
            started = self._enter()
            try:
                out = fn(*args, **kwargs)
                if sync:
                    self._sync()
                return out
            finally:
                self._leave(started, category)

        return timed

    def _schedule(self, fn):
        def schedule(*args, **kwargs):
            out = fn(*args, **kwargs)
            prefill = [c for c in out.chunks if c.seq.is_prefilling]
            if prefill:
                self._prefilled = True
                self.counts["prefill_tokens"] += sum(c.num_tokens for c in prefill)
            return out

        return schedule

    def _step(self, fn):
        def step(*args, **kwargs):
            self._prefilled = False
            started = self._enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._leave(started, "prefill" if self._prefilled else "decode")

        return step


def _breakdown(total: float, parts: dict[str, float]) -> dict[str, float]:
    out = {k: round(v, 3) for k, v in parts.items()}
    out["other"] = round(total - sum(parts.values()), 3)
    return out


# ------------------------------------------------------------------------------------------- scenarios


def video_spec(args: argparse.Namespace) -> VideoSpec:
    try:
        width, height = (int(x) for x in args.agents_video_size.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"--agents-video-size must be WIDTHxHEIGHT, got {args.agents_video_size!r}"
        ) from None
    if width % 2 or height % 4 or width < 64 or height < 64:
        raise ValueError("--agents-video-size: at least 64x64, the width even, the height a multiple of 4")
    return VideoSpec(minutes=args.agents_video_minutes, width=width, height=height, fps=args.agents_video_fps)


def video_notes(
    llm: LLM, name: str, phases: EnginePhases, args: argparse.Namespace, path: Path, made: dict
) -> dict:
    spec = video_spec(args)
    options = VideoOptions(
        segment_seconds=args.agents_segment_seconds, fps=args.agents_sample_fps,
        frames_per_segment=args.agents_frames_per_segment, video_pruning_rate=args.agents_pruning_rate,
        notes_max_tokens=args.agents_notes_max_tokens, batch_segments=args.agents_batch_segments,
        cache_dir=None, progress=False,
    )  # fmt: skip
    client = InProcessClient(llm, name)
    _warm_video(client, path, options)
    phases.reset()
    agent = VideoAgent(client, options)
    started = time.monotonic()
    report = agent.run(path).report
    total = time.monotonic() - started
    t, e = agent.timings, phases.seconds
    segments = report["segments"]
    return {
        "scenario": "agents_video", "model": name, "file": str(path), "minutes": spec.minutes,
        "width": spec.width, "height": spec.height, "file_fps": spec.fps, "file_bytes": made["bytes"],
        "file_made_s": None if made["reused"] else round(made["total_s"], 2), "file_reused": made["reused"],
        "total_s": round(total, 3), "segments": len(segments), "scene_changes": len(report["scene_changes"]),
        "segments_with_errors": sum(1 for s in segments if s["error"]),
        "frames_sampled": sum(len(s["frames"]) for s in segments),
        "sampling": {**report["sampling"], "notes_max_tokens": options.notes_max_tokens, "temperature": 0.0,
                     "batch_segments": options.batch_segments},
        "breakdown_s": _breakdown(total, {"scan": t["scan"], "frames": t["frames_wait"],
                                          "processing": e["processing"], "vision": e["vision"],
                                          "prefill": e["prefill"], "decode": e["decode"]}),
        "frames_decode_thread_s": round(t["frames_decode_threads"], 3),
        "engine": {"vision_calls": phases.counts["vision"], "prefill_steps": phases.counts["prefill"],
                   "decode_steps": phases.counts["decode"], "prefill_tokens": phases.counts["prefill_tokens"]},
        "usage": report["usage"], "target_s": 150.0,
    }  # fmt: skip


def _warm_video(client: InProcessClient, path: Path, options: VideoOptions) -> None:
    """The engine's first calls compile and autotune: two segments' notes first, untimed. Their frames
    are flipped, so neither the encoder cache nor the prefix cache can serve the timed run from them."""
    info = media.probe(path)
    end = min(info.duration, options.segment_seconds)
    clip = media.read_clip(path, 0.0, end, options.fps, options.frames_per_segment)
    clip.frames = [np.ascontiguousarray(f[::-1]) for f in clip.frames]
    request = notes.notes_request(clip, 0.0, end, max_chars=options.max_chars, max_items=options.max_items,
                                  max_tokens=8, pruning_rate=options.video_pruning_rate)  # fmt: skip
    client.complete([request, request])


def document_extract(llm: LLM, name: str, phases: EnginePhases, args: argparse.Namespace, work: Path) -> dict:
    paths = make_pdfs(args.agents_pages, args.agents_pages_per_doc, work)
    warm_path = work / "agents-warm-v1.pdf"  # a document of its own: no cache can serve the timed run from it
    if not warm_path.is_file():
        warm_path.write_bytes(text_pdf(invoice_pages(10**6, 2)))
    options = ExtractOptions(
        max_num_tiles=args.agents_extract_tiles, max_tokens=args.agents_extract_max_tokens,
        reask=args.agents_reask, cache_dir=None, progress=False,
    )  # fmt: skip
    client = InProcessClient(llm, name)
    warm = ExtractOptions(**{**options.__dict__, "max_tokens": 8, "reask": False})
    list(ExtractAgent(client, INVOICE_SCHEMA, warm).run([warm_path]))  # compile and autotune, untimed
    phases.reset()
    agent = ExtractAgent(client, INVOICE_SCHEMA, options)
    started = time.monotonic()
    lines = list(agent.run(paths))
    total = time.monotonic() - started
    t, e = agent.timings, phases.seconds
    return {
        "scenario": "agents_extract", "model": name, "documents": len(paths), "pages": args.agents_pages,
        "pages_per_doc": args.agents_pages_per_doc, "total_s": round(total, 3),
        "pages_per_s": round(args.agents_pages / total, 3), "target_pages_per_s": 5.0,
        "documents_with_errors": sum(1 for x in lines if x["error"]),
        "options": {"pages_per_request": options.pages_per_request, "max_num_tiles": options.max_num_tiles,
                    "dpi": options.dpi, "max_tokens": options.max_tokens, "reask": options.reask,
                    "temperature": options.temperature, "batch_documents": options.batch_documents},
        "breakdown_s": _breakdown(total, {"pages": t["pages_wait"], "processing": e["processing"],
                                          "vision": e["vision"], "prefill": e["prefill"], "decode": e["decode"]}),
        "pages_load_thread_s": round(t["pages_load_threads"], 3),
        "engine": {"vision_calls": phases.counts["vision"], "prefill_steps": phases.counts["prefill"],
                   "decode_steps": phases.counts["decode"], "prefill_tokens": phases.counts["prefill_tokens"]},
    }  # fmt: skip


def run(args: argparse.Namespace, scenarios: list[str], device: torch.device, dtype: torch.dtype,
        report=lambda r: r) -> list[dict]:  # fmt: skip
    """The agents scenarios asked for, with one engine; the inputs are made before the model loads."""
    work = Path(args.agents_dir) if args.agents_dir else Path(tempfile.gettempdir()) / "glimpse-bench"
    if "agents-video" in scenarios:  # encode in forked processes before any device work
        path, made = make_video(video_spec(args), work)
    llm, name = build_llm(args, device, dtype)
    phases = EnginePhases(llm)
    rows = []
    try:
        if "agents-video" in scenarios:
            rows.append(report(video_notes(llm, name, phases, args, path, made)))
        if "agents-extract" in scenarios:
            rows.append(report(document_extract(llm, name, phases, args, work)))
    finally:
        llm.engine.close()
    return rows


def row_text(r: dict) -> str:
    parts = "  ".join(f"{k} {v:.1f}" for k, v in r["breakdown_s"].items())
    if r["scenario"] == "agents_video":
        s = r["sampling"]
        made = "reused" if r["file_reused"] else f"made in {r['file_made_s']:.0f} s"
        return (f"agents video  {r['minutes']:g} min {r['height']}p {r['file_fps']} fps H.264 ({made}): notes pass "
                f"{r['total_s']:.1f} s (target {r['target_s']:.0f}), {r['segments']} segments "
                f"({r['segments_with_errors']} with errors), {r['frames_sampled']} frames at {s['fps']:g} fps, "
                f"<= {s['frames_per_segment']} per {s['segment_seconds']:g} s segment, EVS q={s['video_pruning_rate']}, "
                f"output <= {s['notes_max_tokens']} tokens, greedy\n    seconds: {parts}  "
                f"(decoding in threads {r['frames_decode_thread_s']:.1f})")  # fmt: skip
    o = r["options"]
    return (f"agents extract  {r['pages']} pages in {r['documents']} PDFs: {r['total_s']:.1f} s, "
            f"{r['pages_per_s']:.2f} pages/s (target {r['target_pages_per_s']:g}), {o['pages_per_request']} pages "
            f"per request, <= {o['max_num_tiles']} tiles per page, output <= {o['max_tokens']} tokens, greedy, "
            f"re-ask {'on' if o['reask'] else 'off'}\n    seconds: {parts}  "
            f"(rendering in threads {r['pages_load_thread_s']:.1f})")  # fmt: skip
