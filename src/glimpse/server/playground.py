"""The web playground `glimpse serve` answers at `/`, and the agent jobs behind it.

    GET  /                                  the page (static files beside this module: no build step,
    GET  /playground/{file}                 nothing fetched from elsewhere)
    POST /v1/glimpse/pages                  a PDF as the body -> its pages as small JPEG data: URLs
    POST /v1/glimpse/extract                {"schema", "files": [{"name", "data"}], "options"} -> a job
    POST /v1/glimpse/video?name=&options=   a video file as the body -> a job (the video analyst)
    GET  /v1/glimpse/jobs/{id}              a job: status, stage, progress, result
    DELETE /v1/glimpse/jobs/{id}            cancel it (at its next model request) and forget it
    GET  /v1/glimpse/jobs/{id}/report.html  the analyst's report; `?video_src=URL` points its player
                                            elsewhere (a browser holding the file), else at ...
    GET  /v1/glimpse/jobs/{id}/video        ... the uploaded video
    GET  /v1/glimpse/jobs/{id}/report.json  the report as data

Every /v1 route needs the API key when the server has one. Jobs run on a few daemon threads, with a
bounded queue, and reach the model as any client does: the agents' HTTP client against this server's own
address, with its API key. Uploads are bounded by the media limits (`--max-video-bytes`,
`--max-pdf-bytes`, `--max-pdf-pages`, `--max-request-bytes`); files and results live in a temporary
directory, the oldest finished jobs dropped past `MAX_JOBS`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import ConfigDict, Field

from glimpse.agents import (
    ExtractAgent,
    ExtractOptions,
    HTTPClient,
    LoopLimits,
    ModelClient,
    SchemaProblem,
    VideoAgent,
    VideoOptions,
    VideoReadError,
    render_html,
)
from glimpse.agents.media import probe
from glimpse.agents.scenes import cut_segments
from glimpse.errors import InvalidRequestError, LimitExceededError, MediaError, NotFoundError
from glimpse.processing.pdf import render_pdf
from glimpse.server.jobs import Job, JobStore, ProgressClient
from glimpse.server.protocol import Bool, Float, Int, OpenAIModel, parse_request
from glimpse.server.serving_completions import ServingContext

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
MAX_EXTRACT_FILES = 32
THUMB_DPI = 48.0  # pages rendered for thumbnails (a Letter page: 408 x 528)
_UNSAFE_NAME = re.compile(r"[^\w.\- ]+")


# ------------------------------------------------------------------------------------------ options


class _Options(OpenAIModel):
    model_config = ConfigDict(extra="forbid")


class VideoJobOptions(_Options):
    """What the analyst may be asked (VideoOptions' names); bounded so one job stays reasonable."""

    question: Annotated[str, Field(max_length=4000)] | None = None
    summary: Bool = True
    chapters: Bool = True
    segment_seconds: Annotated[Float, Field(ge=2, le=3600)] = 30.0
    fps: Annotated[Float, Field(gt=0, le=30)] = 1.0
    frames_per_segment: Annotated[Int, Field(ge=1, le=256)] = 16
    video_pruning_rate: Annotated[Float, Field(ge=0, lt=1)] = 0.5
    max_chars: Annotated[Int, Field(ge=0, le=4000)] = 300
    max_items: Annotated[Int, Field(ge=0, le=64)] = 8
    notes_max_tokens: Annotated[Int, Field(ge=16, le=32768)] = 1024
    answer_max_tokens: Annotated[Int, Field(ge=16, le=32768)] = 2048
    max_steps: Annotated[Int, Field(ge=1, le=16)] = 6
    max_tokens_per_step: Annotated[Int, Field(ge=1, le=32768)] = 512

    def agent_options(self, cache_dir: Path) -> VideoOptions:
        limits = LoopLimits(max_steps=self.max_steps, max_tokens_per_step=self.max_tokens_per_step)
        kept = self.model_dump(exclude={"max_steps", "max_tokens_per_step"})
        return VideoOptions(**kept, limits=limits, cache_dir=cache_dir, progress=False)


class ExtractJobOptions(_Options):
    pages_per_request: Annotated[Int, Field(ge=1, le=16)] = 4
    max_num_tiles: Annotated[Int, Field(ge=1, le=12)] = 6
    max_tokens: Annotated[Int, Field(ge=16, le=32768)] = 4096
    reask: Bool = True
    max_steps: Annotated[Int, Field(ge=1, le=16)] = 3
    max_tokens_per_step: Annotated[Int, Field(ge=1, le=32768)] = 512

    def agent_options(self, cache_dir: Path, max_pages: int) -> ExtractOptions:
        limits = LoopLimits(max_steps=self.max_steps, max_tokens_per_step=self.max_tokens_per_step)
        kept = self.model_dump(exclude={"max_steps", "max_tokens_per_step"})
        return ExtractOptions(**kept, max_pages=max_pages, limits=limits, cache_dir=cache_dir, progress=False)


class UploadedFile(OpenAIModel):
    name: Annotated[str, Field(min_length=1, max_length=255)]
    data: str  # base64, or a data: URL


class ExtractJobRequest(_Options):
    schema_: dict[str, Any] = Field(alias="schema")
    files: Annotated[list[UploadedFile], Field(min_length=1, max_length=MAX_EXTRACT_FILES)]
    options: ExtractJobOptions = Field(default_factory=ExtractJobOptions)


# ------------------------------------------------------------------------------------------- helpers


def safe_name(name: str, default: str) -> str:
    """A file name safe to write: the last path part, odd characters replaced, at most 100 characters."""
    base = _UNSAFE_NAME.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).strip(" .")
    return base[-100:] or default


def decode_upload(data: str, what: str) -> bytes:
    """Base64 or a base64 data: URL."""
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64"):
            raise InvalidRequestError(f"{what}: a data: URL must be base64", param="files")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what}: the data is not valid base64", param="files") from None


def page_thumbnails(pdf: bytes, max_pages: int, width: int) -> list[dict[str, Any]]:
    pages = []
    for number, image in enumerate(render_pdf(pdf, max_pages=max_pages, dpi=THUMB_DPI), start=1):
        full_width, full_height = image.size
        image.thumbnail((width, 4 * width), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=80)
        pages.append({
            "page": number, "width": full_width, "height": full_height,
            "image": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
        })  # fmt: skip
    return pages


async def _chunks(request: Request, limit: int, what: str):
    """The body's chunks, refused past `limit` bytes (413) by its Content-Length or while reading it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise LimitExceededError(f"the {what} is {int(declared)} bytes; this server accepts at most {limit}")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise LimitExceededError(f"the {what} is over {limit} bytes, the most this server accepts")
        yield chunk
    if size == 0:
        raise InvalidRequestError(f"the {what} is empty: send it as the request body")


async def read_body(request: Request, limit: int, what: str) -> bytes:
    return b"".join([chunk async for chunk in _chunks(request, limit, what)])


async def save_body(request: Request, limit: int, what: str, path: Path) -> None:
    """The body written to `path` as it arrives (nothing is left there when it is refused)."""
    try:
        with open(path, "wb") as f:
            async for chunk in _chunks(request, limit, what):
                f.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def own_base_url(request: Request) -> str:
    """This server's /v1 as reached from inside it: the address of the socket that took the request."""
    host, port = request.scope.get("server") or ("127.0.0.1", None)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1" if port else f"http://{host}/v1"


# ------------------------------------------------------------------------------------------- routes


def add_playground(app: FastAPI, ctx: ServingContext, api_key: str | None, auth: Callable) -> JobStore:
    """Serve the page at `/` and the job routes under /v1/glimpse (behind `auth`, the API key check)."""
    store = JobStore()
    limits = ctx.media_limits

    def client_for(job: Job, base_url: str) -> ModelClient:
        return ProgressClient(
            HTTPClient(base_url, api_key=api_key, model=ctx.served_model_name, concurrency=8), job
        )

    # The page knows whether to ask for the key before its first call (it can't read the key itself).
    index = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    index = index.replace('data-api-key="open"', f'data-api-key="{"required" if api_key else "open"}"', 1)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index, headers={"Cache-Control": "no-cache"})

    app.mount("/playground", StaticFiles(directory=STATIC_DIR), name="playground")

    router = APIRouter(prefix="/v1/glimpse", dependencies=[Depends(auth)])

    @router.post("/pages")
    async def pages(request: Request, width: int = 240) -> JSONResponse:
        """A PDF (the body) -> {"pages": [{"page", "width", "height", "image"}]}, images `width` wide."""
        if not 16 <= width <= 1600:
            raise InvalidRequestError("width must be between 16 and 1600 pixels", param="width")
        pdf = await read_body(request, min(limits.max_pdf_bytes, ctx.max_request_bytes), "PDF")
        if not pdf.startswith(b"%PDF"):
            raise MediaError("the body is not a PDF")
        found = await asyncio.to_thread(page_thumbnails, pdf, limits.max_pdf_pages, width)
        return JSONResponse({"pages": found})

    @router.post("/extract", status_code=202)
    async def start_extract(request: Request) -> JSONResponse:
        body = await read_body(request, ctx.max_request_bytes, "request body")
        req = parse_request(ExtractJobRequest, body)
        job = store.new("extract", ", ".join(f.name for f in req.files)[:200])
        try:
            options = req.options.agent_options(store.cache_dir, limits.max_pdf_pages)
            try:
                agent = ExtractAgent(client_for(job, own_base_url(request)), req.schema_, options)
            except SchemaProblem as e:
                raise InvalidRequestError(str(e), param="schema") from None
            paths: list[Path] = []
            for i, f in enumerate(req.files):
                data = decode_upload(f.data, f.name)
                limit = limits.max_pdf_bytes if data.startswith(b"%PDF") else limits.max_image_bytes
                if len(data) > limit:
                    raise LimitExceededError(f"{f.name} is {len(data)} bytes; at most {limit} are allowed")
                path = job.dir / f"{i:02d}-{safe_name(f.name, 'document')}"
                path.write_bytes(data)
                paths.append(path)
        except BaseException:
            shutil.rmtree(job.dir, ignore_errors=True)
            raise
        names = {str(p): f.name for p, f in zip(paths, req.files)}

        def work(job: Job) -> None:
            job.advance("extracting", 0, len(paths))
            job.result = {"lines": []}
            for line in agent.run(paths):
                with job.lock:
                    job.result["lines"].append({**line, "file": names.get(line["file"], line["file"])})
                    job.done += 1

        store.submit(job, work)
        return JSONResponse(job.public(), status_code=202)

    @router.post("/video", status_code=202)
    async def start_video(request: Request, name: str = "video.mp4", options: str = "{}") -> JSONResponse:
        opts = parse_request(VideoJobOptions, options)
        job = store.new("video", safe_name(name, "video.mp4"))
        path = job.dir / job.name
        try:
            await save_body(request, limits.max_video_bytes, "video", path)
            try:
                info = await asyncio.to_thread(probe, path)
            except VideoReadError as e:
                raise MediaError(str(e).replace(str(path), job.name)) from None
            if info.duration > limits.max_video_seconds:
                raise LimitExceededError(
                    f"the video is {info.duration:.0f} s long; at most {limits.max_video_seconds:g} s are "
                    "allowed (--max-video-seconds)"
                )
        except BaseException:
            shutil.rmtree(job.dir, ignore_errors=True)
            raise
        job.video = path
        segments = len(cut_segments(info.duration, [], opts.segment_seconds))
        agent_options = opts.agent_options(store.cache_dir)
        base_url = own_base_url(request)

        def work(job: Job) -> None:
            job.advance("scanning", 0, segments)
            result = VideoAgent(client_for(job, base_url), agent_options).run(path)
            report = {**result.report, "file": job.name}
            with job.lock:
                job.result, job.thumbnails = report, result.thumbnails

        store.submit(job, work)
        return JSONResponse(job.public(), status_code=202)

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> JSONResponse:
        return JSONResponse(store.get(job_id).public())

    @router.delete("/jobs/{job_id}")
    async def cancel_job(job_id: str) -> JSONResponse:
        return JSONResponse(store.cancel(job_id).public())

    def finished_video(job_id: str) -> Job:
        job = store.get(job_id)
        if job.kind != "video":
            raise NotFoundError(f"job {job_id!r} is not a video analysis")
        if job.status != "done":
            raise InvalidRequestError(f"job {job_id!r} has no report yet: it is {job.status}")
        return job

    @router.get("/jobs/{job_id}/report.html")
    async def report_html(job_id: str, video_src: str | None = None) -> HTMLResponse:
        job = finished_video(job_id)
        if video_src is not None and not video_src.startswith(("blob:", "http://", "https://", "/")):
            raise InvalidRequestError(
                "video_src must be a blob:, http(s): or absolute-path URL", param="video_src"
            )
        html = render_html(job.result, job.thumbnails, video_src or f"/v1/glimpse/jobs/{job_id}/video")
        return HTMLResponse(html)

    @router.get("/jobs/{job_id}/report.json")
    async def report_json(job_id: str) -> JSONResponse:
        return JSONResponse(finished_video(job_id).result)

    @router.get("/jobs/{job_id}/video")
    async def video(job_id: str) -> Response:
        job = store.get(job_id)
        if job.video is None or not job.video.exists():
            raise NotFoundError(f"job {job_id!r} has no video")
        return FileResponse(job.video, filename=job.name)

    app.include_router(router)
    return store


__all__ = ["add_playground", "JobStore", "Job", "VideoJobOptions", "ExtractJobOptions", "STATIC_DIR"]
