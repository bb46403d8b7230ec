"""`glimpse bench`: run the scenarios, print a table, write JSON. Figures go in docs/PERFORMANCE.md."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

from glimpse.bench.agents_bench import add_agents_args
from glimpse.bench.agents_bench import row_text as agents_row_text
from glimpse.engine.config import EngineConfig
from glimpse.settings import add_flags


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_bench_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a checkpoint directory, hub id or built-in model")
    src.add_argument("--random-weights", default=None, metavar="ARCH",
                     help="the full-size architecture with random weights: nemotron-nano-12b-v2 (text) or "
                          "nemotron-nano-12b-v2-vl (RADIO ViT-H + projector + the 12B LLM)")  # fmt: skip
    p.add_argument(
        "--commit",
        default=None,
        help="the commit the figures belong to, recorded as given (a "
        "copy of the tree on another machine may carry a stale .git); default: git rev-parse HEAD",
    )
    p.add_argument("--scenarios", default="decode1,decode,prefill,drift",
                   help="comma list of decode1, decode, prefill, drift, hf-reference (language model); vision, "
                        "video-ttft (need a VL model); video-decode, online (run first, before any model is "
                        "loaded in this process); agents-video, agents-extract (the agents in-process, on "
                        "their own: see agents_bench.py)")  # fmt: skip
    p.add_argument("--concurrency", type=_ints, default=[16, 64, 256],
                   help="comma list of sequences decoding at once (decode)")  # fmt: skip
    p.add_argument("--ssm-dtypes", default="float32,bfloat16", help="comma list of SSM state dtypes")
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens (decode, drift)")
    p.add_argument("--output-len", type=int, default=256, help="tokens decoded per sequence (decode)")
    p.add_argument("--prefill-lens", type=_ints, default=[4096, 32768], help="comma list of prompt sizes")
    p.add_argument("--prefill-chunk", type=int, default=None, help="max_num_batched_tokens for prefill")
    p.add_argument("--drift-steps", type=int, default=256, help="decode steps compared (drift)")
    p.add_argument("--quantization", default=None, choices=["fp8", "nvfp4"],
                   help="with --random-weights: the language model's linears quantised as NVIDIA's published "
                        "FP8 / NVFP4 checkpoints hold them (a checkpoint given by --model says its own)")  # fmt: skip
    add_flags(p, EngineConfig, only=("device", "dtype", "tensor_parallel_size"))
    p.add_argument("--json", default="bench.json", help="where to write the results")
    _add_vision_args(p)
    _add_online_args(p)
    add_agents_args(p)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _add_vision_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vision (d), video-ttft (e), video-decode (e2)")
    g.add_argument("--vision-batch", type=int, default=128, help="tiles per encoder call")
    g.add_argument("--vision-size", type=int, default=512, help="tile side in pixels")
    g.add_argument("--vision-repeats", type=int, default=5, help="timed encoder calls (median)")
    g.add_argument("--video-frames", type=int, default=128, help="frames in memory per video question")
    g.add_argument("--video-size", type=int, default=512, help="frame side in pixels")
    g.add_argument("--pruning-rates", default="0,0.75", help="EVS pruning rates for video-ttft")
    g.add_argument("--video-repeats", type=int, default=1, help="questions per pruning rate (median)")
    g.add_argument("--decode-width", type=int, default=1920, help="width of the encoded video")
    g.add_argument("--decode-height", type=int, default=1080, help="height of the encoded video")
    g.add_argument("--decode-fps", type=int, default=30, help="frame rate of the encoded video")
    g.add_argument("--decode-segment-seconds", type=float, default=60.0, help="length of the encoded segment")
    g.add_argument("--decode-segments", type=int, default=60, help="copies of the segment remuxed end to end")
    g.add_argument("--decode-keyint", type=int, default=60, help="frames between keyframes")
    g.add_argument("--decode-codec", default="auto", help="auto (libx264, else mpeg4), libx264, mpeg4")
    g.add_argument("--decode-preset", default="veryfast", help="libx264 preset of the segment")
    g.add_argument("--decode-frames", type=int, default=128, help="frames sampled (num_frames)")
    g.add_argument("--decode-sample-fps", type=float, default=2.0, help="sampling fps")
    g.add_argument("--decode-repeats", type=int, default=3, help="timed decodes (median)")
    g.add_argument("--decode-baseline-seconds", type=float, default=300.0,
                   help="seconds of video the every-frame baseline decodes before extrapolating to the "
                        "whole file (0: decode it all)")  # fmt: skip
    g.add_argument("--decode-dir", default=None,
                   help="where the long video is made and kept for reuse (default: a glimpse-bench folder "
                        "in the temp dir)")  # fmt: skip


def _add_online_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("online (f): glimpse serve under load")
    g.add_argument("--online-concurrency", type=_ints, default=[16], help="comma list of client counts")
    g.add_argument("--online-requests", type=int, default=200, help="requests per concurrency level")
    g.add_argument("--online-mix", default="text:0.4,image:0.3,pdf:0.15,video:0.15",
                   help="request kinds and their shares")  # fmt: skip
    g.add_argument("--online-prefix-caching", default="on,off", help="on, off or on,off (a server each)")
    g.add_argument("--online-output-len", type=int, default=128, help="max_tokens, with ignore_eos")
    g.add_argument("--online-temperature", type=float, default=0.0, help="sampling temperature")
    g.add_argument("--online-system-words", type=int, default=400, help="shared system prompt, random words")
    g.add_argument("--online-text-words", type=int, default=600, help="random words per text request")
    g.add_argument("--online-image-size", default="1280x720", help="WIDTHxHEIGHT of each image")
    g.add_argument("--online-pdf-pages", type=int, default=3, help="pages per PDF")
    g.add_argument("--online-pdf-page-size", default="612x792", help="page size in points")
    g.add_argument("--online-video-frames", type=int, default=32, help="frames per video")
    g.add_argument("--online-video-size", default="640x360", help="WIDTHxHEIGHT of each video")
    g.add_argument("--online-video-fps", type=float, default=2.0, help="frame rate of each video")
    g.add_argument("--online-server-args", default="", help="extra glimpse serve flags, one string")
    g.add_argument("--online-startup-timeout", type=float, default=900.0, help="seconds to start")
    g.add_argument("--online-request-timeout", type=float, default=600.0, help="seconds for one request")


def _environment(device: torch.device, commit: str | None = None) -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    env["device"] = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    if commit:
        env["commit"] = commit
        return env
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       timeout=5).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


VL_SCENARIOS = ("vision", "video-ttft")
NO_MODEL_SCENARIOS = ("video-decode", "online")


def _load(args, device: torch.device, dtype: torch.dtype, vl: bool = False):
    from glimpse.bench.random_model import bench_tokenizer, is_vl_preset, random_model

    if args.random_weights:
        tokenizer = bench_tokenizer() if is_vl_preset(args.random_weights) else None
        return (
            random_model(args.random_weights, device, dtype, quantization=args.quantization),
            tokenizer,
            None,
        )
    from glimpse.model.loading import load_model, resolve_model_path
    from glimpse.processing.tokenizer import load_tokenizer

    path = resolve_model_path(args.model or ("tiny-vl" if vl else "tiny"))
    return load_model(path, device, dtype), load_tokenizer(path), path


def _row(r: dict) -> str:
    s = r["scenario"]
    if s == "decode":
        return (f"decode  N={r['concurrency']:<4} ssm={r['ssm_dtype']:<8} step {r['step_ms']:8.2f} ms  "
                f"floor {r['floor_step_ms']:8.2f} ms  {r['tokens_per_s']:10.1f} tok/s  "
                f"{100 * r['fraction_of_floor']:5.1f}% of floor")  # fmt: skip
    if s == "prefill":
        return (f"prefill L={r['tokens']:<6} {r['seconds'] * 1e3:9.1f} ms  {r['tokens_per_s']:10.1f} tok/s  "
                f"floor {r['floor_tokens_per_s']:10.1f} tok/s  {100 * r['fraction_of_floor']:5.1f}% of floor")  # fmt: skip
    if s == "ssm_state_drift":
        return (f"bf16 SSM state over {r['steps']} steps: max relative logit drift "
                f"{r['max_relative_logit_drift']:.2e}, argmax agreement {100 * r['argmax_agreement']:.1f}%")  # fmt: skip
    if s == "vision":
        return (f"vision  B={r['batch']:<4} {r['tile_size']}² {r['tiles_per_s']:9.1f} tiles/s (encode)  "
                f"ViT {r['vit_tiles_per_s']:9.1f} tiles/s  ceiling {r['ceiling_tiles_per_s']:9.1f} tiles/s  "
                f"{100 * r['fraction_of_ceiling']:5.1f}% of ceiling")  # fmt: skip
    if s == "video_ttft":
        return (f"video   T={r['frames']:<4} q={r['pruning_rate']:<5} TTFT {r['ttft_s'] * 1e3:9.1f} ms  "
                f"video tokens kept {r['video_tokens_kept']}/{r['video_tokens']}  prompt {r['prompt_tokens']}  "
                f"(processing {r['processing_s'] * 1e3:.1f} ms, encoder alone {r['encode_video_s'] * 1e3:.1f} ms)")  # fmt: skip
    if s == "video_decode":
        extra = (f" (extrapolated from {r['baseline_frames_decoded']} frames)" if r["baseline_extrapolated"]
                 else "")  # fmt: skip
        return (f"decode  {r['sampled_frames']} of {r['total_frames']} frames ({r['duration_s'] / 60:.0f} min "
                f"{r['height']}p {r['codec']}): {r['glimpse_s'] * 1e3:9.1f} ms; every frame in order "
                f"{r['baseline_s']:.1f} s{extra}; {r['speedup']:.1f}x")  # fmt: skip
    if s.startswith("agents_"):
        return agents_row_text(r)
    if s == "online":
        from glimpse.bench.serving_bench import _row_text

        return _row_text(r)
    return json.dumps(r)


def _random_weight_bytes(name: str, dtype: torch.dtype) -> int | None:
    """Bytes of a random-weight preset's parameters in `dtype`, counted on the meta device (nothing is
    allocated); None for a name that is not a preset (random_model names the known ones)."""
    from glimpse.bench.random_model import PRESETS, VL_PRESETS
    from glimpse.model.nemotron_h import NemotronHForCausalLM
    from glimpse.model.vlm import NemotronVLModel

    with torch.device("meta"):
        if name in PRESETS:
            model = NemotronHForCausalLM(PRESETS[name]())
        elif name in VL_PRESETS:
            model = NemotronVLModel(*VL_PRESETS[name]())
        else:
            return None
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def _cpu_bytes_available() -> int | None:
    """What this process may still allocate: the system's available memory, capped by an address-space
    limit (ulimit -v) less what the process already maps; None if neither can be read."""
    known = []
    try:
        with open("/proc/meminfo") as f:
            known += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit != resource.RLIM_INFINITY:
        mapped = 0
        try:
            with open("/proc/self/status") as f:
                mapped = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
        except OSError:
            pass
        known.append(limit - mapped)
    return min(known) if known else None


def check_random_weights_fit(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """On the CPU, refuse a random-weight preset whose weights can't fit in memory before allocating any
    (the full-size 12B is ~49 GB in float32): a ValueError saying so, in place of an allocation that
    exhausts the machine. GPUs report their own out-of-memory error."""
    if device.type != "cpu":
        return
    need, have = _random_weight_bytes(name, dtype), _cpu_bytes_available()
    if need is not None and have is not None and need > have:
        dtype_name = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"--random-weights {name} needs {need / 1e9:.1f} GB for its weights in {dtype_name} on the CPU, "
            f"but {max(have, 0) / 1e9:.1f} GB is available; run it on a GPU (the full-size architectures "
            "are meant for one)"
        )


def main(args: argparse.Namespace) -> int:
    from glimpse.bench import agents_bench, floors, llm_bench, vision_bench

    probe = EngineConfig(model="-", device=args.device, dtype=args.dtype)
    device = probe.resolve_device()
    dtype = probe.resolve_dtype(device)
    if args.random_weights:
        check_random_weights_fit(args.random_weights, device, dtype)
        if args.tensor_parallel_size > 1:
            raise ValueError(
                "--tensor-parallel-size needs a checkpoint (--model) to split, not --random-weights"
            )
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    results: dict = {"environment": _environment(device, args.commit), "results": []}
    if "hf-reference" in scenarios:
        results["results"] += [_report(r) for r in run_hf_reference(args)]
        scenarios.remove("hf-reference")
    out = results["results"]
    for scenario in [s for s in scenarios if s in NO_MODEL_SCENARIOS]:  # no model in this process yet
        out += run_no_model_scenario(args, scenario)
    scenarios = [s for s in scenarios if s not in NO_MODEL_SCENARIOS]
    agents = [s for s in scenarios if s in agents_bench.SCENARIOS]  # they build their own engine
    if agents:
        results["environment"] |= {"model": args.random_weights or args.model or "tiny-vl",
                                   "weights": "random" if args.random_weights else "checkpoint"}  # fmt: skip
        out += agents_bench.run(args, agents, device, dtype, report=_report)
        scenarios = [s for s in scenarios if s not in agents]
    if scenarios:
        model, tokenizer, path = _load(args, device, dtype, vl=any(s in VL_SCENARIOS for s in scenarios))
        ctx = llm_bench.BenchContext(model, tokenizer, device, dtype, floors.measure_bandwidth(device),
                                     floors.measure_matmul_rate(device), model_dir=path,
                                     tensor_parallel_size=args.tensor_parallel_size)  # fmt: skip
        results["environment"] |= {"bandwidth_GBps": ctx.bandwidth / 1e9, "matmul_TFLOPs": ctx.matmul_rate / 1e12,
                                   "model": args.random_weights or args.model or "tiny",
                                   "weights": "random" if args.random_weights else "checkpoint",
                                   "tensor_parallel_size": args.tensor_parallel_size}  # fmt: skip
        ssm_dtypes = [d for d in args.ssm_dtypes.split(",") if d]
        for scenario in scenarios:
            if scenario == "decode1":
                for d in ssm_dtypes:
                    out.append(
                        _report(llm_bench.decode_throughput(ctx, 1, args.prompt_len, args.output_len, d))
                    )
            elif scenario == "decode":
                for n in args.concurrency:
                    for d in ssm_dtypes:
                        out.append(
                            _report(llm_bench.decode_throughput(ctx, n, args.prompt_len, args.output_len, d))
                        )
            elif scenario == "prefill":
                for length in args.prefill_lens:
                    out.append(_report(llm_bench.prefill(ctx, length, args.prefill_chunk)))
            elif scenario == "drift":
                out.append(
                    _report(llm_bench.ssm_state_drift(ctx, min(args.prompt_len, 1024), args.drift_steps))
                )
            elif scenario == "vision":
                out.append(
                    _report(
                        vision_bench.vision(ctx, args.vision_batch, args.vision_size, args.vision_repeats)
                    )
                )
            elif scenario == "video-ttft":
                rates = vision_bench.rates_from_text(args.pruning_rates)
                rows = vision_bench.video_ttft(ctx, args.video_frames, args.video_size, rates,
                                               chunk=args.prefill_chunk, repeats=args.video_repeats)  # fmt: skip
                out += [_report(r) for r in rows]
            else:
                raise ValueError(f"unknown scenario {scenario!r}")
    Path(args.json).write_text(json.dumps(results, indent=2))
    env = results["environment"]
    print(f"# {env['device']}, {env['date']}, commit {env['commit']}, torch {env['torch']}; "
          f"bandwidth {env.get('bandwidth_GBps', 0):.0f} GB/s, matmul {env.get('matmul_TFLOPs', 0):.0f} TFLOP/s")  # fmt: skip
    for r in results["results"]:
        print(_row(r))
    return 0


def _report(r: dict) -> dict:
    print(_row(r), flush=True)
    return r


def run_no_model_scenario(args: argparse.Namespace, scenario: str) -> list[dict]:
    """video-decode and online: nothing loaded in this process (the server loads its own model)."""
    if scenario == "video-decode":
        import tempfile

        from glimpse.bench import vision_bench

        work = Path(args.decode_dir) if args.decode_dir else Path(tempfile.gettempdir()) / "glimpse-bench"
        row = vision_bench.video_decode(
            vision_bench.spec_from_args(args), work, args.decode_frames, args.decode_sample_fps,
            args.video_size, args.decode_repeats, args.decode_baseline_seconds,
        )  # fmt: skip
        return [_report(row)]
    from glimpse.bench import serving_bench

    return serving_bench.online(serving_bench.config_from_args(args))  # prints each row as it comes


def run_hf_reference(args: argparse.Namespace) -> list[dict]:
    """transformers' NemotronH in its own process (it does not fit beside a loaded engine)."""
    cmd = [sys.executable, "-m", "glimpse.bench.hf_reference", "--prefill", str(min(args.prefill_lens)),
           "--prompt", "128", "--decode", "64"]  # fmt: skip
    if args.random_weights:
        cmd += ["--random-weights", args.random_weights]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return [{"scenario": "hf-reference", "error": proc.stderr[-2000:]}]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
