"""The server's own settings (API.md, Command line), beside the engine's (glimpse.engine.config) and the
media limits (glimpse.processing.media); `glimpse serve`'s flags are generated from all three, plus the
vLLM flags that have nothing to do here (`VllmOnlyFlags`: accepted, and noted in the log)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any

from glimpse.engine.config import EngineConfig
from glimpse.errors import InvalidRequestError
from glimpse.processing.media import MediaLimits
from glimpse.settings import (
    POSITIVE,
    Rule,
    add_flags,
    check_settings,
    flag_name,
    from_flat,
    from_namespace,
    leaf_fields,
    setting,
    to_flat,
)

API_KEY_ENV = "GLIMPSE_API_KEY"
# Where the server's engine settings differ from the Python API's: a server refuses private media URLs.
SERVER_ENGINE_DEFAULTS = {"allow_private_media_urls": False}

PORT = Rule("> 0 and <= 65535", lambda v: 0 < v <= 65535 and not isinstance(v, bool))
NOT_NEGATIVE = Rule(">= 0", lambda v: v >= 0 and not isinstance(v, bool))


def _names(value: Any) -> bool:
    names = [value] if isinstance(value, str) else value
    return isinstance(names, list) and bool(names) and all(isinstance(n, str) and n for n in names)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def json_strings(text: str) -> list[str]:
    """A flag's JSON list of strings, e.g. `'["http://a.example"]'` (vLLM's form for the CORS flags)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not _strings(value):
        raise ValueError(f"expected a JSON list of strings like '[\"*\"]', got {text!r}")
    return value


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens, who may call it, and how much one request may carry."""

    host: str = setting("127.0.0.1", help="address to listen on")
    port: int = setting(8000, help="port to listen on", rule=PORT)
    served_model_name: str | list[str] | None = setting(
        None, help="the model ids clients may send, one or more; /v1/models lists them all and answers carry "
        "the first (default: MODEL as given)", rule=Rule("a name or a non-empty list of names", _names),
        nargs="+", metavar="NAME",
    )  # fmt: skip
    api_key: str | None = setting(
        default_factory=lambda: os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV}, else open)",
        metavar="KEY",
    )
    uvicorn_log_level: str = setting(
        "info", help="uvicorn's log level", choices=("critical", "error", "warning", "info", "debug", "trace")
    )
    ssl_keyfile: str | None = setting(
        None, help="serve HTTPS with this private key (PEM; may be left out when the certificate file "
        "holds it)", metavar="FILE",
    )  # fmt: skip
    ssl_certfile: str | None = setting(None, help="serve HTTPS with this certificate (PEM)", metavar="FILE")
    allowed_origins: list[str] = setting(
        default_factory=list, help="CORS: the web origins whose pages may call the server, as a JSON list; "
        "'[\"*\"]' allows any (default: none, so browsers keep other sites' pages out)",
        rule=Rule("a list of strings", _strings), parse=json_strings, metavar="JSON",
    )  # fmt: skip
    allowed_methods: list[str] = setting(
        default_factory=lambda: ["*"], help="CORS: the HTTP methods allowed origins may use, as a JSON list",
        rule=Rule("a list of strings", _strings), parse=json_strings, metavar="JSON",
    )  # fmt: skip
    allowed_headers: list[str] = setting(
        default_factory=lambda: ["*"], help="CORS: the headers allowed origins may send, as a JSON list",
        rule=Rule("a list of strings", _strings), parse=json_strings, metavar="JSON",
    )  # fmt: skip
    allow_credentials: bool = setting(False, help="CORS: allowed origins may send cookies and credentials")
    max_logprobs: int = setting(
        20, help="the most log-probabilities a request may ask for per token (logprobs, top_logprobs)",
        rule=NOT_NEGATIVE,
    )  # fmt: skip
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
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("ssl_keyfile needs ssl_certfile (the certificate that goes with the key)")

    def model_names(self, model: str) -> list[str]:
        """The names clients may send, the first the one answers carry: --served-model-name's, else MODEL."""
        names = self.served_model_name
        if names is None:
            return [model]
        return [names] if isinstance(names, str) else list(names)


_NOTHING_TO_DO = "accepted from vLLM command lines; changes nothing here: "


@dataclass(frozen=True)
class VllmOnlyFlags:
    """vLLM flags with nothing to do in Glimpse: accepted, so vLLM command lines work, and logged."""

    trust_remote_code: bool = setting(False, help=_NOTHING_TO_DO + "Glimpse runs no code from checkpoints")
    disable_log_requests: bool = setting(False, help=_NOTHING_TO_DO + "Glimpse logs no request contents")
    disable_log_stats: bool = setting(
        False, help=_NOTHING_TO_DO + "Glimpse logs no periodic statistics (/metrics has them)"
    )
    enable_auto_tool_choice: bool = setting(
        False, help=_NOTHING_TO_DO + "tool calls are parsed whenever a request gives tools"
    )
    tool_call_parser: str | None = setting(
        None, help=_NOTHING_TO_DO + "Glimpse parses Nemotron's tool calls itself", metavar="NAME"
    )
    reasoning_parser: str | None = setting(
        None, help=_NOTHING_TO_DO + "Glimpse parses Nemotron's <think> reasoning itself", metavar="NAME"
    )
    enable_chunked_prefill: bool | None = setting(
        None, help=_NOTHING_TO_DO + "Glimpse always splits long prompts into --max-num-batched-tokens chunks"
    )


def vllm_only_notes(args: argparse.Namespace) -> list[str]:
    """One line for each `VllmOnlyFlags` flag given: the flag and why it changes nothing."""
    notes = []
    for _, _, f, _ in leaf_fields(VllmOnlyFlags):
        value = getattr(args, f.name, f.default)
        if value != f.default:
            reason = f.metadata["help"].removeprefix(_NOTHING_TO_DO)
            notes.append(f"{flag_name(f.name)} is accepted for vLLM compatibility and does nothing: {reason}")
    return notes


def check_logprobs(count: int | None, server: int, param: str) -> None:
    """400 when a request asks for more log-probabilities per token than --max-logprobs allows (as vLLM)."""
    if count is not None and count > server:
        raise InvalidRequestError(
            f"{param} asks for {count} log-probabilities per token; this server returns at most {server} "
            "(--max-logprobs)",
            param=param,
        )


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """`glimpse serve`'s flags: the engine's (with the server's defaults), the server's, the media limits',
    and vLLM's that do nothing here."""
    add_flags(parser, EngineConfig, defaults=SERVER_ENGINE_DEFAULTS)
    add_flags(parser, ServerConfig)
    add_flags(parser, VllmOnlyFlags)


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
    "VllmOnlyFlags",
    "SERVER_ENGINE_DEFAULTS",
    "add_serve_flags",
    "serve_configs",
    "vllm_only_notes",
    "check_logprobs",
    "json_strings",
    "configs_to_json",
    "configs_from_json",
]
