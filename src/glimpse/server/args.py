"""Command-line flags of `glimpse serve` (API.md, Command line), beside the engine flags of glimpse/cli.py.

Every default here is the contract's; `ServerLimits.from_args` turns the parsed flags into the values
the request handlers check.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any

MEDIA_KINDS = ("image", "video", "file")
DEFAULT_LIMIT_MM_PER_PROMPT = {"image": 16, "video": 2, "file": 4}


def _limit_mm(text: str) -> dict[str, int]:
    """`--limit-mm-per-prompt '{"image": 4}'`: kinds not named keep their defaults."""
    try:
        given = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--limit-mm-per-prompt must be a JSON object like '{json.dumps(DEFAULT_LIMIT_MM_PER_PROMPT)}'"
        ) from None
    if not isinstance(given, dict):
        raise argparse.ArgumentTypeError("--limit-mm-per-prompt must be a JSON object")
    out = dict(DEFAULT_LIMIT_MM_PER_PROMPT)
    for kind, n in given.items():
        if kind not in MEDIA_KINDS:
            raise argparse.ArgumentTypeError(
                f"--limit-mm-per-prompt: unknown kind {kind!r}; the kinds are {', '.join(MEDIA_KINDS)}"
            )
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise argparse.ArgumentTypeError(f"--limit-mm-per-prompt: {kind} must be an integer >= 0")
        out[kind] = n
    return out


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_server_args(p: argparse.ArgumentParser) -> None:
    """Add the server's flags to the `serve` sub-command (the engine's come from cli._engine_args)."""
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send and /v1/models lists (default: MODEL as given)",
    )
    s.add_argument(
        "--api-key",
        default=os.environ.get("GLIMPSE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every /v1 route (default: $GLIMPSE_API_KEY, else open)",
    )
    s.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )

    m = p.add_argument_group("media")
    m.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="allow file:// media URLs inside DIR (default: no local files)",
    )
    m.add_argument(
        "--allow-private-media-urls",
        action="store_true",
        help="allow media URLs on loopback, private and link-local addresses (default: refused)",
    )
    m.add_argument(
        "--limit-mm-per-prompt",
        type=_limit_mm,
        default=dict(DEFAULT_LIMIT_MM_PER_PROMPT),
        metavar="JSON",
        help='media items per request (default \'{"image": 16, "video": 2, "file": 4}\'; PDF pages '
        "do not count as images)",
    )
    m.add_argument("--max-request-bytes", type=_positive(int), default=268435456)
    m.add_argument("--max-image-pixels", type=_positive(int), default=64000000)
    m.add_argument("--max-video-bytes", type=_positive(int), default=2147483648)
    m.add_argument("--max-video-seconds", type=_positive(float), default=21600.0)
    m.add_argument("--max-video-frames", type=_positive(int), default=1024, help="frames sampled per video")
    m.add_argument("--max-pdf-pages", type=_positive(int), default=32)
    m.add_argument(
        "--media-fetch-timeout", type=_positive(float), default=30.0, help="seconds per media fetch"
    )


@dataclass
class ServerLimits:
    """What the handlers check before and while processing a request."""

    max_request_bytes: int = 268435456
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMIT_MM_PER_PROMPT))
    max_image_pixels: int = 64000000
    max_video_bytes: int = 2147483648
    max_video_seconds: float = 21600.0
    max_video_frames: int = 1024
    max_pdf_pages: int = 32
    media_fetch_timeout: float = 30.0
    allowed_local_media_path: str | None = None
    allow_private_media_urls: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerLimits:
        names = cls.__dataclass_fields__
        values: dict[str, Any] = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
        return cls(**values)


__all__ = ["add_server_args", "ServerLimits", "MEDIA_KINDS", "DEFAULT_LIMIT_MM_PER_PROMPT"]
