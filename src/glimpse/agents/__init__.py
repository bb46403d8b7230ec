"""Agents over the model: `analyze_video` (footage -> notes, answers, summary, chapters with time
citations, and a report) and `extract` (documents -> schema-valid records citing their pages).

Both talk to the model through a `ModelClient`: `InProcessClient` (glimpse.LLM in this process) or
`HTTPClient` (any OpenAI-compatible server); `make_client` picks one.

With `glimpse serve` (the recipe for a GPU box and a web playground): run
`glimpse serve nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16 --host 0.0.0.0 --api-key KEY` there, then
anywhere `glimpse video FILE --base-url http://BOX:8000/v1 --api-key KEY --ask Q --out DIR` (or
`analyze_video(FILE, HTTPClient(URL, api_key=KEY))`): DIR/report.html is self-contained (a playground
can link or frame it beside the video) and DIR/report.json carries the same results as data. Likewise
`glimpse extract INPUTS --schema S.json --base-url ...`. The server needs no extra flags: clips travel as
small MP4 `data:` URLs and pages as JPEG `data:` URLs, never as local paths.
"""

from glimpse.agents.client import (
    DEFAULT_MODEL,
    Completion,
    HTTPClient,
    InProcessClient,
    ModelClient,
    ModelRequest,
    make_client,
)
from glimpse.agents.document import ExtractAgent, ExtractOptions, SchemaProblem, extract
from glimpse.agents.loop import LoopLimits, LoopResult, Task, Tool, ToolPlan, run_loops
from glimpse.agents.media import VideoReadError
from glimpse.agents.report import render_html, render_markdown, write_video_reports
from glimpse.agents.schemas import EXTRACT_LINE_SCHEMA, REPORT_SCHEMA
from glimpse.agents.toolcalls import ToolCall, parse_tool_calls
from glimpse.agents.video import VideoAgent, VideoOptions, VideoResult, analyze_video

__all__ = [
    "DEFAULT_MODEL", "EXTRACT_LINE_SCHEMA", "REPORT_SCHEMA", "Completion", "ExtractAgent", "ExtractOptions",
    "HTTPClient", "InProcessClient", "LoopLimits", "LoopResult", "ModelClient", "ModelRequest", "SchemaProblem",
    "Task", "Tool", "ToolCall", "ToolPlan", "VideoAgent", "VideoOptions", "VideoReadError", "VideoResult",
    "analyze_video", "extract", "make_client", "parse_tool_calls", "render_html", "render_markdown", "run_loops",
    "write_video_reports",
]  # fmt: skip
