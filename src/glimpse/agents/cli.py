"""`glimpse video` and `glimpse extract`: flags and commands (the main CLI mounts them as subcommands).

`python -m glimpse.agents.cli video|extract ...` runs them on their own too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glimpse.agents.cache import default_cache_dir
from glimpse.agents.client import DEFAULT_MODEL, make_client
from glimpse.agents.document import ExtractOptions, SchemaProblem, extract
from glimpse.agents.loop import LoopLimits
from glimpse.agents.media import VideoReadError
from glimpse.agents.report import write_video_reports
from glimpse.agents.video import VideoOptions, analyze_video


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help=f"a hub id, a local directory or a built-in such as tiny-vl, run in this process (default "
        f"{DEFAULT_MODEL}); with --base-url, the served model's name (default: the server's first)",
    )
    g.add_argument(
        "--base-url",
        default=None,
        help="an OpenAI-compatible server instead, e.g. http://gpu-box:8000/v1 (glimpse serve, vLLM)",
    )
    g.add_argument("--api-key", default=None, help="the server's API key")
    g.add_argument(
        "--concurrency", type=int, default=16, help="requests in flight to the server (default 16)"
    )
    g.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)"
    )
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where finished segments and documents are kept for resuming (default {default_cache_dir()})",
    )
    g.add_argument("--no-cache", action="store_true", help="keep nothing on disk; start from scratch")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")  # fmt: skip


def _cache_dir(args: argparse.Namespace) -> Path | None:
    return None if args.no_cache else (args.cache_dir or default_cache_dir())


def _client(args: argparse.Namespace):
    return make_client(args.model, args.base_url, args.api_key, args.concurrency)


def add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the video file")
    p.add_argument("--ask", metavar="QUESTION", default=None, help="a question to answer, citing time ranges")
    p.add_argument("--summary", action="store_true", help="summarise the video")
    p.add_argument("--chapters", action="store_true", help="divide the video into chapters")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for report.json, report.md and report.html (default FILE_STEM-report)",
    )
    g = p.add_argument_group("sampling")
    g.add_argument("--segment-seconds", type=float, default=30.0, help="target segment length (default 30)")
    g.add_argument(
        "--fps", type=float, default=1.0, help="frames per second sampled in a segment (default 1)"
    )
    g.add_argument("--frames-per-segment", type=int, default=16, help="at most this many (default 16)")
    g.add_argument(
        "--video-pruning-rate", type=float, default=0.5, help="EVS rate for segments (default 0.5)"
    )
    g.add_argument(
        "--scene-threshold",
        type=float,
        default=0.4,
        help="colour-histogram distance that counts as a scene change, 0-1 (default 0.4)",
    )
    g.add_argument("--batch-segments", type=int, default=32, help="segments per batch (default 32)")
    g = p.add_argument_group("tool loop")
    g.add_argument("--max-steps", type=int, default=6, help="model turns that may call tools (default 6)")
    g.add_argument("--max-loop-tokens", type=int, default=4096,
                   help="tokens a task may generate in its tool loop (default 4096)")  # fmt: skip
    add_model_args(p)


def video_options(args: argparse.Namespace) -> VideoOptions:
    summary, chapters = args.summary, args.chapters
    if not (args.ask or summary or chapters):
        summary = chapters = True  # nothing asked: the report gets both
    return VideoOptions(
        question=args.ask, summary=summary, chapters=chapters, segment_seconds=args.segment_seconds, fps=args.fps,
        frames_per_segment=args.frames_per_segment, video_pruning_rate=args.video_pruning_rate,
        scene_threshold=args.scene_threshold, batch_segments=args.batch_segments,
        limits=LoopLimits(max_steps=args.max_steps, max_total_tokens=args.max_loop_tokens),
        temperature=args.temperature, cache_dir=_cache_dir(args), progress=not args.no_progress,
    )  # fmt: skip


def run_video(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"glimpse video: error: no such file: {path}", file=sys.stderr)
        return 2
    options = video_options(args)
    result = analyze_video(path, _client(args), options)
    out = args.out or Path(f"{path.stem}-report")
    paths = write_video_reports(result.report, result.thumbnails, path, out)
    report = result.report
    for key in ("answer", "summary"):
        if report.get(key):
            cites = ", ".join(f"{c['start']:.1f}-{c['end']:.1f} s" for c in report[key]["citations"])
            print(f"{key}: {report[key]['text']}" + (f" [{cites}]" if cites else ""))
    for error in report.get("errors", []):
        print(f"error: {error}", file=sys.stderr)
    print(f"wrote {paths['json']}, {paths['md']}, {paths['html']}")
    return 0


def add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="FILES_OR_DIRS", help="PDFs, images, or directories of them")
    p.add_argument("--schema", type=Path, required=True, help="a JSON Schema file: the record to extract")
    p.add_argument(
        "--out", type=Path, default=Path("results.jsonl"), help="JSON lines out (default results.jsonl)"
    )
    p.add_argument(
        "--tables",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write each list-of-objects field as DIR/NAME-HASH.FIELD.csv",
    )
    g = p.add_argument_group("pages")
    g.add_argument(
        "--pages-per-request", type=int, default=4, help="pages the model reads at once (default 4)"
    )
    g.add_argument(
        "--max-num-tiles", type=int, default=6, help="tiles per page in those requests (default 6)"
    )
    g.add_argument("--max-pages", type=int, default=64, help="longer documents are an error (default 64)")
    g.add_argument("--batch-documents", type=int, default=32, help="documents per batch (default 32)")
    g.add_argument("--no-reask", action="store_true",
                   help="don't ask again for fields that are missing, invalid or uncertain")  # fmt: skip
    g.add_argument("--uncertain-below", type=_probability, default=0.5, metavar="P",
                   help="re-ask a valid field when the lowest probability of its value's tokens is below P "
                        "(default 0.5; 0: only missing or invalid fields)")  # fmt: skip
    add_model_args(p)


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def extract_options(args: argparse.Namespace) -> ExtractOptions:
    return ExtractOptions(
        pages_per_request=args.pages_per_request, max_num_tiles=args.max_num_tiles, max_pages=args.max_pages,
        batch_documents=args.batch_documents, reask=not args.no_reask, uncertain_below=args.uncertain_below,
        temperature=args.temperature,
        tables_dir=args.tables, cache_dir=_cache_dir(args), progress=not args.no_progress,
    )  # fmt: skip


def run_extract(args: argparse.Namespace) -> int:
    try:
        schema = json.loads(args.schema.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"glimpse extract: error: cannot read the schema {args.schema}: {e}", file=sys.stderr)
        return 2
    lines = extract(args.inputs, schema, _client(args), extract_options(args), out=args.out)
    failed = sum(1 for line in lines if line["error"])
    print(f"{len(lines)} documents, {failed} with errors: {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glimpse-agents", description="The video and extraction agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("video", help="answers, a summary and chapters for a video, with a report")
    add_video_args(v)
    v.set_defaults(func=run_video)
    x = sub.add_parser("extract", help="one JSON record per document, under a JSON Schema")
    add_extract_args(x)
    x.set_defaults(func=run_extract)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SchemaProblem, VideoReadError) as e:
        print(f"glimpse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
