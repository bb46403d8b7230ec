"""Where a decode step or a prefill spends its GPU time: a kernel table from torch.profiler.

Not a benchmark (its timings include the profiler's overhead); it answers "which kernels, how long each"
so the next optimisation is chosen by measurement. Decode steps are profiled both eager (every kernel a
separate launch, so the table names them) and as CUDA-graph replays (the time the engine really spends).

    python -m glimpse.bench.profile --random-weights nemotron-nano-12b-v2 --batch 1,64 --prefill 4096
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from glimpse.bench import floors
from glimpse.bench.llm_bench import BenchContext, _engine, _prompts
from glimpse.bench.random_model import random_model
from glimpse.bench.timing import sets_over_l2, sync, time_eager, time_graph
from glimpse.sampling_params import SamplingParams


def _table(prof, rows: int) -> str:
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)


def _kernel_total_us(prof) -> float:
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")


def profile_decode(ctx: BenchContext, batch: int, prompt_len: int, ssm_dtype: str, eager: bool, steps: int):
    config = ctx.model.llm_config
    engine = _engine(ctx, max_num_seqs=batch, max_num_batched_tokens=max(8192, prompt_len),
                     max_model_len=prompt_len + 64 + steps, mamba_ssm_cache_dtype=ssm_dtype,
                     enforce_eager=eager)  # fmt: skip
    try:
        params = SamplingParams(temperature=0, max_tokens=steps + 40, ignore_eos=True, detokenize=False)
        for i, p in enumerate(_prompts(batch, prompt_len, config.vocab_size, ctx.seed + batch)):
            engine.add_request(f"d{i}", p, params)
        seqs = [s for r in engine.requests.values() for s in r.sequences]
        while any(s.is_prefilling or s.slot is None for s in seqs):
            engine.step()
        for _ in range(10):  # warm: graphs captured, allocator settled
            engine.step()
        step_ms = time_eager([engine.step] * steps, reps=1, warmup=0, device=ctx.device).ms
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(steps):
                engine.step()
            sync(ctx.device)
        gpu_ms = _kernel_total_us(prof) / steps / 1e3
        head = (f"== decode batch {batch}, ssm {ssm_dtype}, {'eager' if eager else 'CUDA graphs'}: "
                f"{step_ms:.2f} ms/step unprofiled; kernels {gpu_ms:.2f} ms/step\n")  # fmt: skip
        return head + _table(prof, 40)
    finally:
        engine.close()


def profile_prefill(ctx: BenchContext, length: int) -> str:
    config = ctx.model.llm_config
    engine = _engine(ctx, max_num_seqs=4, max_num_batched_tokens=length, max_model_len=length + 16)
    try:
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
        for i in range(2):  # warm (Triton autotune / compile)
            engine.add_request(f"w{i}", _prompts(1, length, config.vocab_size, ctx.seed + 100 + i)[0], params)
            while engine.has_unfinished():
                engine.step()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        engine.add_request("p", _prompts(1, length, config.vocab_size, ctx.seed + length)[0], params)

        def run_prompt() -> None:
            while engine.has_unfinished():
                engine.step()

        with torch.profiler.profile(activities=acts) as prof:
            wall = time_eager(run_prompt, reps=1, warmup=0, device=ctx.device).seconds
        gpu_ms = _kernel_total_us(prof) / 1e3
        return f"== prefill {length}: {wall * 1e3:.1f} ms profiled wall; kernels {gpu_ms:.1f} ms\n" + _table(
            prof, 45
        )
    finally:
        engine.close()


def profile_vision(device: torch.device, batch: int = 64, size: int = 512, variants: str = "default") -> str:
    """The ViT-H/16 on `batch` tiles: the time of each variant and a kernel table of the default one.
    Variants: default (the module settings), native (no head-dim padding, exact GELU), gelu (the GELU
    epilogue only), pad (padding only), pad-flash / pad-cudnn / pad-efficient (padding, one SDPA backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from glimpse.config_radio import RadioConfig
    from glimpse.model import radio
    from glimpse.model.radio import RadioViT

    vit = RadioViT(RadioConfig()).to(device, torch.bfloat16).eval()
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
    lines = []
    saved = (radio.VIT_ATTENTION, radio.GELU_EPILOGUE)
    settings = {
        "default": saved,
        "native": ("native", False),
        "gelu": ("native", True),
        "pad": ("pad", False),
    }
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip
    for variant in variants.split(","):
        name, _, backend = variant.partition("-")
        radio.VIT_ATTENTION, radio.GELU_EPILOGUE = settings.get(name, saved)
        try:
            with (
                torch.inference_mode(),
                sdpa_kernel(backends[backend]) if backend else contextlib.nullcontext(),
            ):
                for _ in range(2):
                    vit(pixels)
                seconds = time_eager(lambda: vit(pixels), reps=5, device=device).seconds
            lines.append(
                f"vision {variant}: {seconds * 1e3:.1f} ms per {batch} tiles, {batch / seconds:.1f} tiles/s"
            )
        except RuntimeError as e:  # a backend that does not take these shapes
            lines.append(f"vision {variant}: failed ({str(e).splitlines()[0][:120]})")
        print(lines[-1], flush=True)
    radio.VIT_ATTENTION, radio.GELU_EPILOGUE = saved
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
        vit(pixels)
        sync(device)
    return "\n".join(lines) + "\n== vision default kernels\n" + _table(prof, 20)


GEMV_SHAPES = {  # (in, out) of the 12B's decode matmuls
    "mamba.in_proj": (5120, 22656), "mamba.out_proj": (10240, 5120), "mlp.up": (5120, 20480),
    "mlp.down": (20480, 5120), "attn.q": (5120, 5120), "attn.kv": (5120, 1024), "attn.o": (5120, 5120),
    "lm_head": (5120, 131072),
}  # fmt: skip


def profile_gemv(device: torch.device, rows=(1, 64), bandwidth: float | None = None) -> str:
    """Each decode matmul alone at M rows, replayed from a CUDA graph (weights cycled through copies so
    L2 holds none): time per call and weight bytes / time, for F.linear and, at M = 1, torch.mv."""
    bandwidth = bandwidth or floors.measure_bandwidth(device)
    lines = [f"copy bandwidth {bandwidth / 1e9:.0f} GB/s"]
    for name, (k, n) in GEMV_SHAPES.items():
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(sets_over_l2(k * n * 2))]
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ops = {"linear": lambda w, x=x: F.linear(x, w)}
            if m == 1:
                ops["mv"] = lambda w, x=x: torch.mv(w, x[0])
            for label, op in ops.items():
                per = time_graph([lambda w=w, op=op: op(w) for w in ws] * 4, reps=10).seconds
                gbps = k * n * 2 / per / 1e9
                lines.append(f"{name:15s} M={m:<3d} {label:6s} {per * 1e6:8.1f} us  {gbps:7.0f} GB/s  "
                             f"{100 * gbps * 1e9 / bandwidth:5.1f}% of copy bandwidth")  # fmt: skip
                print(lines[-1], flush=True)
        del ws
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random-weights", default="nemotron-nano-12b-v2")
    ap.add_argument("--batch", default="1,64", help="comma list of decode batch sizes ('' for none)")
    ap.add_argument("--ssm-dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--modes", default="eager,graphs")
    ap.add_argument("--prefill", default="4096", help="comma list of prefill lengths ('' for none)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gemv", action="store_true", help="time each decode matmul alone (M = 1 and 64)")
    ap.add_argument(
        "--vision", default="", help="comma list of ViT variants to time: eager,compile,gelu-epilogue"
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    texts = []
    if args.gemv:
        texts.append(profile_gemv(device))
    if args.vision:
        texts.append(profile_vision(device, variants=args.vision))
        print(texts[-1], flush=True)
    if not args.batch and not args.prefill:
        if args.out:
            args.out.write_text("\n\n".join(texts))
        return 0
    model = random_model(args.random_weights, device, dtype)
    ctx = BenchContext(model, None, device, dtype, floors.measure_bandwidth(device), 0.0)
    for b in [int(x) for x in args.batch.split(",") if x]:
        for mode in args.modes.split(","):
            texts.append(profile_decode(ctx, b, args.prompt_len, args.ssm_dtype, mode == "eager", args.steps))
            print(texts[-1], flush=True)
    for n in [int(x) for x in args.prefill.split(",") if x]:
        texts.append(profile_prefill(ctx, n))
        print(texts[-1], flush=True)
    if args.out:
        args.out.write_text("\n\n".join(texts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
