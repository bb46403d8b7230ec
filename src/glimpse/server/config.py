"""The server's own settings (API.md, Command line), beside the engine's (glimpse.engine.config) and the
media limits (glimpse.processing.media); `glimpse serve`'s flags are generated from all three."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from glimpse.engine.config import EngineConfig
from glimpse.processing.media import MediaLimits
from glimpse.settings import POSITIVE, add_flags, check_settings, from_flat, from_namespace, setting, to_flat

API_KEY_ENV = "GLIMPSE_API_KEY"
# Where the server's engine settings differ from the Python API's: a server refuses private media URLs.
SERVER_ENGINE_DEFAULTS = {"allow_private_media_urls": False}


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens, who may call it, and how much one request may carry."""

    host: str = setting("127.0.0.1", help="address to listen on")
    port: int = setting(8000, help="port to listen on", rule=POSITIVE)
    served_model_name: str | None = setting(
        None, help="the model id clients send and /v1/models lists (default: MODEL as given)"
    )
    api_key: str | None = setting(
        default_factory=lambda: os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV}, else open)",
        metavar="KEY",
    )
    uvicorn_log_level: str = setting(
        "info", help="uvicorn's log level", choices=("critical", "error", "warning", "info", "debug", "trace")
    )
    max_request_bytes: int = setting(268_435_456, help="bytes per request body", rule=POSITIVE)
    # A /v1/completions batch is tokenised and scheduled prompt by prompt: the caps bound that work, and
    # are checked before any prompt is processed. Evaluation harnesses send batches of tens to hundreds.
    max_prompts_per_request: int = setting(
        4096, help="prompts one /v1/completions request may carry (more is a 400)", rule=POSITIVE
    )
    max_sequences_per_request: int = setting(
        4096, help="sequences one request may ask for, prompts x n (more is a 400)", rule=POSITIVE
    )
    media_limits: MediaLimits = field(default_factory=MediaLimits)

    def __post_init__(self) -> None:
        check_settings(self)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """`glimpse serve`'s flags: the engine's (with the server's defaults), the server's, the media limits'."""
    add_flags(parser, EngineConfig, defaults=SERVER_ENGINE_DEFAULTS)
    add_flags(parser, ServerConfig)


def serve_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """The configurations that parsed `glimpse serve` flags describe."""
    return from_namespace(EngineConfig, args), from_namespace(ServerConfig, args)


def configs_to_json(engine: EngineConfig, server: ServerConfig) -> str:
    """Both configurations as JSON of flat names (what `python -m glimpse.server` reads)."""
    return json.dumps({"engine": to_flat(engine), "server": to_flat(server)})


def configs_from_json(text: str) -> tuple[EngineConfig, ServerConfig]:
    data = json.loads(text)
    return from_flat(EngineConfig, **data["engine"]), from_flat(ServerConfig, **data.get("server", {}))


__all__ = [
    "ServerConfig",
    "SERVER_ENGINE_DEFAULTS",
    "add_serve_flags",
    "serve_configs",
    "configs_to_json",
    "configs_from_json",
]
