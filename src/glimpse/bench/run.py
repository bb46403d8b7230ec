"""`glimpse bench`: run the scenarios, print a table, write JSON. Figures go in docs/PERFORMANCE.md."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_bench_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a checkpoint directory, hub id or built-in model")
    src.add_argument("--random-weights", default=None, metavar="ARCH",
                     help="the full-size architecture with random weights, e.g. nemotron-nano-12b-v2")  # fmt: skip
    p.add_argument("--scenarios", default="decode1,decode,prefill,drift",
                   help="comma list of decode1, decode, prefill, drift, hf-reference")  # fmt: skip
    p.add_argument("--concurrency", type=_ints, default=[16, 64, 256])
    p.add_argument("--ssm-dtypes", default="float32,bfloat16")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--prefill-lens", type=_ints, default=[4096, 32768])
    p.add_argument("--prefill-chunk", type=int, default=None, help="max_num_batched_tokens for prefill")
    p.add_argument("--drift-steps", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", default="bench.json", help="where to write the results")


def _environment(device: torch.device) -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    env["device"] = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       timeout=5).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _load(args, device: torch.device, dtype: torch.dtype):
    from glimpse.bench.random_model import random_model

    if args.random_weights:
        return random_model(args.random_weights, device, dtype), None
    from glimpse.loader import resolve_model_path
    from glimpse.model.loading import load_model
    from glimpse.processing.tokenizer import load_tokenizer

    path = resolve_model_path(args.model or "tiny")
    return load_model(path, device, dtype), load_tokenizer(path)


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
    return json.dumps(r)


def main(args: argparse.Namespace) -> int:
    from glimpse.bench import floors, llm_bench
    from glimpse.engine.engine import EngineConfig

    probe = EngineConfig(model="-", device=args.device, dtype=args.dtype)
    device = probe.resolve_device()
    dtype = probe.resolve_dtype(device)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    results: dict = {"environment": _environment(device), "results": []}
    if "hf-reference" in scenarios:
        results["results"] += [_report(r) for r in run_hf_reference(args)]
        scenarios.remove("hf-reference")
    if scenarios:
        model, tokenizer = _load(args, device, dtype)
        ctx = llm_bench.BenchContext(model, tokenizer, device, dtype, floors.measure_bandwidth(device),
                                     floors.measure_matmul_rate(device))  # fmt: skip
        results["environment"] |= {"bandwidth_GBps": ctx.bandwidth / 1e9, "matmul_TFLOPs": ctx.matmul_rate / 1e12,
                                   "model": args.random_weights or args.model or "tiny",
                                   "weights": "random" if args.random_weights else "checkpoint"}  # fmt: skip
        ssm_dtypes = [d for d in args.ssm_dtypes.split(",") if d]
        out = results["results"]
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
