"""The Ray flags of `glimpse video`, `glimpse extract` and `glimpse serve`, and their dispatch.

Without `--ray` (or `--ray-replicas`/`--ray-autoscaling`) the commands run as they always did and Ray is
never imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glimpse.agents.cli import extract_options, run_extract, run_video, video_options
from glimpse.scaleout.batch import (
    RAY_MISSING,
    RayOptions,
    analyze_videos_on_ray,
    extract_on_ray,
    print_summary,
)


def add_ray_batch_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray cluster (docs/RAY.md)")
    g.add_argument(
        "--ray", nargs="?", const="", default=None, metavar="ADDRESS",
        help="run the batch on a Ray cluster, one engine per GPU: ADDRESS as ray.init takes it ('auto', "
        "'ray://HEAD:10001'); alone: $RAY_ADDRESS, else a cluster running here, else a new local one. Put it "
        "after the inputs. A rerun skips the inputs already done in the output. For `video`, --out is then a "
        "directory for results.jsonl and the reports (default video-reports)",
    )  # fmt: skip
    g.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="engines to start (default: one per GPU of the cluster; 1 without GPUs)")  # fmt: skip
    g.add_argument("--ray-gpus-per-actor", type=float, default=None, metavar="G",
                   help="GPUs each engine takes (default 1 on a GPU cluster, else 0)")  # fmt: skip
    g.add_argument("--ray-cpus-per-actor", type=float, default=1.0, metavar="C",
                   help="CPUs each engine takes (default 1)")  # fmt: skip
    g.add_argument("--ray-batch-size", type=int, default=None, metavar="N",
                   help="inputs per actor call (default --batch-documents, or 1 video)")  # fmt: skip
    g.add_argument("--retries", type=int, default=2,
                   help="more attempts for an input whose processing failed or whose engine died (default 2)")  # fmt: skip
    g.add_argument("--retry-errors", action="store_true",
                   help="try again the inputs whose line in the output is an error (a rerun keeps them)")  # fmt: skip
    g.add_argument("--parquet", type=Path, default=None, metavar="PATH",
                   help="also write the result lines as Parquet here")  # fmt: skip


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_ray_serve_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray Serve replicas (docs/RAY.md)")
    g.add_argument("--ray-replicas", type=int, default=None, metavar="N",
                   help="serve with N replicas (one engine each, a GPU each on a GPU cluster) behind Ray "
                   "Serve's proxy on --host/--port")  # fmt: skip
    g.add_argument("--ray-autoscaling", type=_json_object, default=None, metavar="JSON",
                   help="Ray Serve's autoscaling_config instead of a fixed count, e.g. "
                   "'{\"min_replicas\": 1, \"max_replicas\": 8, \"target_ongoing_requests\": 64}'")  # fmt: skip
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="the Ray cluster (default: $RAY_ADDRESS, else a cluster running here, else a new one)")  # fmt: skip
    g.add_argument("--ray-gpus-per-replica", type=float, default=None, metavar="G",
                   help="GPUs each replica takes (default 1 on a GPU cluster, else 0)")  # fmt: skip


def ray_options(args: argparse.Namespace) -> RayOptions:
    return RayOptions(
        address=args.ray or None, actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor,
        cpus_per_actor=args.ray_cpus_per_actor, batch_size=args.ray_batch_size, retries=args.retries,
        retry_errors=args.retry_errors, parquet=args.parquet, progress=not args.no_progress,
    )  # fmt: skip


def _model(args: argparse.Namespace, command: str) -> str | None:
    if args.base_url:
        print(f"glimpse {command}: error: --ray runs engines on the cluster; it does not take --base-url "
              "(to spread requests over servers, serve with --ray-replicas and give its URL without --ray)",
              file=sys.stderr)  # fmt: skip
        return None
    return args.model or "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16"


def video_command(args: argparse.Namespace) -> int:
    if args.ray is None:
        return run_video(args)
    model = _model(args, "video")
    if model is None:
        return 2
    out = args.out or Path("video-reports")
    try:
        summary = analyze_videos_on_ray(args.file, model, out, video_options(args), ray_options(args))
    except RuntimeError as e:
        print(f"glimpse video: error: {e}", file=sys.stderr)
        return 2
    print_summary(summary, "videos")
    return 0


def extract_command(args: argparse.Namespace) -> int:
    if args.ray is None:
        return run_extract(args)
    model = _model(args, "extract")
    if model is None:
        return 2
    try:
        schema = json.loads(args.schema.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"glimpse extract: error: cannot read the schema {args.schema}: {e}", file=sys.stderr)
        return 2
    try:
        summary = extract_on_ray(
            args.inputs, schema, model, args.out, extract_options(args), ray_options(args)
        )
    except RuntimeError as e:
        print(f"glimpse extract: error: {e}", file=sys.stderr)
        return 2
    print_summary(summary, "documents")
    return 0


def wants_ray_serve(args: argparse.Namespace) -> bool:
    return args.ray_replicas is not None or args.ray_autoscaling is not None


def serve_command(args: argparse.Namespace, engine_config, server_config) -> int:
    """`glimpse serve ... --ray-replicas N`: the replicas on Ray Serve until interrupted."""
    try:
        from glimpse.scaleout import serve  # Ray, and the server's engine: only when serving on Ray
    except ImportError as e:
        print(f"glimpse serve: error: {RAY_MISSING} ({e})", file=sys.stderr)
        return 2
    options = serve.ReplicaOptions(
        replicas=args.ray_replicas or 1,
        autoscaling=args.ray_autoscaling,
        gpus_per_replica=args.ray_gpus_per_replica,
    )
    serve.run_replicas(engine_config, server_config, options, address=args.ray_address)
    return 0
