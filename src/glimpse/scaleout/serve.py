"""Replicas of `glimpse serve` as a Ray Serve application: the same OpenAI-compatible API, on many GPUs.

Each replica is a Ray actor holding one engine and the very FastAPI app `build_server` makes (routes,
errors, API key, metrics, playground); Ray Serve's HTTP proxy spreads requests over the replicas, and
streams pass through it. `check_health` asks the engine (Serve restarts a replica whose engine thread
stopped), and Serve's autoscaling settings pass through as they are.

Two ways to start it:
- `glimpse serve MODEL [serve flags] --ray-replicas N` (or `--ray-autoscaling JSON`): `run_replicas`.
- a Serve config file for `serve run` / `serve deploy`, whose application is
  `import_path: glimpse.scaleout.serve:app_builder` with `args: {serve_args: "MODEL --flags ...",
  replicas: 2}` (docs/RAY.md has a full one).
Ray's own LLM server (`ray.serve.llm`) can't host Glimpse: it imports vLLM's or SGLang's protocol
classes when it loads (docs/RAY.md, "Ray's LLM APIs").
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from dataclasses import dataclass, fields
from typing import Any

import ray
from ray import serve

from glimpse.engine.config import EngineConfig
from glimpse.server.app import build_server
from glimpse.server.config import (
    ServerConfig,
    add_serve_flags,
    configs_from_json,
    configs_to_json,
    serve_configs,
)

log = logging.getLogger("glimpse.scaleout")
APP_NAME = "glimpse"


@dataclass
class ReplicaOptions:
    """How many replicas, what each asks of the cluster, and Serve's health and autoscaling settings."""

    replicas: int = 1
    autoscaling: dict[str, Any] | None = None  # Serve's autoscaling_config (min_replicas, max_replicas,
    # target_ongoing_requests, ...); replaces `replicas` when given
    gpus_per_replica: float | None = None  # default 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 256  # per replica; the engine's scheduler batches them
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    name: str = "GlimpseReplica"  # the deployment's name

    def __post_init__(self) -> None:
        if self.autoscaling is None and self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.autoscaling is not None and not isinstance(self.autoscaling, dict):
            raise ValueError("autoscaling must be a JSON object of Ray Serve's autoscaling_config fields")


@serve.ingress()
class GlimpseReplica:
    """One engine and its app; Serve asks `__serve_build_asgi_app__` for the app after `__init__`."""

    def __init__(self, configs: str) -> None:
        engine_config, server_config = configs_from_json(configs)
        logging.getLogger("glimpse").setLevel(logging.INFO)
        self._app, self._ctx = build_server(engine_config, server_config)

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Raises (and Serve replaces this replica) when the engine can no longer answer."""
        self._ctx.llm.check_health()


def _gpus(options: ReplicaOptions) -> float:
    if options.gpus_per_replica is not None:
        return options.gpus_per_replica
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def build_application(engine_config: EngineConfig, server_config: ServerConfig, options: ReplicaOptions):
    """The Serve application (a bound deployment) for these configurations; TLS is refused (Serve's
    proxy answers plain HTTP: terminate TLS in front of it)."""
    if server_config.ssl_certfile or server_config.ssl_keyfile:
        raise ValueError("--ssl-certfile/--ssl-keyfile don't apply with Ray Serve, whose proxy answers plain "
                         "HTTP: terminate TLS in front of it (a load balancer or a reverse proxy)")  # fmt: skip
    resources: dict[str, Any] = {"num_cpus": options.cpus_per_replica}
    gpus = _gpus(options)
    if gpus > 0:
        resources["num_gpus"] = gpus
    scaling: dict[str, Any] = (
        {"num_replicas": None, "autoscaling_config": options.autoscaling}
        if options.autoscaling is not None
        else {"num_replicas": options.replicas}
    )
    deployment = serve.deployment(GlimpseReplica, name=options.name).options(
        ray_actor_options=resources, max_ongoing_requests=options.max_ongoing_requests,
        health_check_period_s=options.health_check_period_s, health_check_timeout_s=options.health_check_timeout_s,
        **scaling,
    )  # fmt: skip
    return deployment.bind(configs_to_json(engine_config, server_config))


def app_builder(args: dict[str, Any]):
    """For `serve run` / `serve deploy` configs: `args.serve_args` is the `glimpse serve` command line
    (model and flags); the other keys are `ReplicaOptions` fields."""
    args = dict(args)
    parser = argparse.ArgumentParser(prog="glimpse serve (serve_args)", exit_on_error=False)
    add_serve_flags(parser)
    try:
        namespace = parser.parse_args(shlex.split(str(args.pop("serve_args", ""))))
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"serve_args: {e}") from None
    known = {f.name for f in fields(ReplicaOptions)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown application args {unknown}; known: serve_args, {', '.join(sorted(known))}")
    if isinstance(args.get("autoscaling"), str):
        args["autoscaling"] = json.loads(args["autoscaling"])
    return build_application(*serve_configs(namespace), ReplicaOptions(**args))


def run_replicas(engine_config: EngineConfig, server_config: ServerConfig, options: ReplicaOptions,
                 address: str | None = None) -> None:  # fmt: skip
    """`glimpse serve --ray-replicas N`: connect to (or start) a Ray cluster, deploy the replicas behind
    Serve's proxy on `server_config.host:port`, and serve until interrupted."""
    ray.init(address=address)
    try:
        serve.start(http_options={"host": server_config.host, "port": server_config.port})
        serve.run(build_application(engine_config, server_config, options), name=APP_NAME, route_prefix="/")
        what = (
            f"{options.replicas} replicas"
            if options.autoscaling is None
            else f"autoscaling {options.autoscaling}"
        )
        log.warning("serving %s on Ray Serve (%s) at http://%s:%d; Ctrl-C stops", engine_config.model, what,
                    server_config.host, server_config.port)  # fmt: skip
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


__all__ = ["APP_NAME", "GlimpseReplica", "ReplicaOptions", "app_builder", "build_application", "run_replicas"]
