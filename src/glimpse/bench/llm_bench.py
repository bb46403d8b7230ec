"""Language-model scenarios of `glimpse bench`, each figure beside its floor from the same run.

(a) decode at batch 1; (b) steady-state decode throughput at N concurrent requests (prompt P, output O,
ignore_eos; only the decode steps after every prompt is in are timed; prefix caching off); (c) prefill
tokens/s for long prompts; plus the logit drift of a bf16 SSM state against fp32. Every prompt is distinct
random tokens, so no cache can serve it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glimpse.bench import floors
from glimpse.bench.timing import time_eager
from glimpse.engine.cache import allocate_cache_tensors
from glimpse.engine.config import EngineConfig
from glimpse.engine.engine import LLMEngine
from glimpse.model.batch import ForwardBatch
from glimpse.sampling_params import SamplingParams


@dataclass
class BenchContext:
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    bandwidth: float  # bytes/s, read + write
    matmul_rate: float  # FLOP/s
    seed: int = 0
    model_dir: Path | None = None  # the checkpoint, when the model came from one
    tensor_parallel_size: int = 1  # >1: each engine loads its own split copy of the checkpoint


def _engine(ctx: BenchContext, **kw) -> LLMEngine:
    settings = dict(device=str(ctx.device), dtype=str(ctx.dtype).removeprefix("torch."), enable_prefix_caching=False,
                    seed=ctx.seed, **kw)  # fmt: skip
    if ctx.tensor_parallel_size > 1:  # the engine splits the checkpoint across its ranks itself
        cfg = EngineConfig.from_kwargs(
            ctx.model_dir, tensor_parallel_size=ctx.tensor_parallel_size, **settings
        )
        return LLMEngine(cfg)
    return LLMEngine(
        EngineConfig.from_kwargs("<bench>", **settings), model=ctx.model, tokenizer=ctx.tokenizer
    )


def _release(engine: LLMEngine) -> None:
    engine.close()


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=gen).tolist()


def decode_throughput(
    ctx: BenchContext, concurrency: int, prompt_len: int, output_len: int, ssm_dtype: str
) -> dict:
    """Steady-state decode: time only the steps where every request is decoding."""
    config = ctx.model.llm_config
    engine = _engine(
        ctx, max_num_seqs=concurrency, max_num_batched_tokens=max(8192, prompt_len),
        max_model_len=prompt_len + output_len + 16, mamba_ssm_cache_dtype=ssm_dtype,
    )  # fmt: skip
    try:
        running = min(concurrency, engine.scheduler.max_num_seqs)
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
        for i, p in enumerate(_prompts(running, prompt_len, config.vocab_size, ctx.seed + concurrency)):
            engine.add_request(f"d{i}", p, params)
        seqs = [s for r in engine.requests.values() for s in r.sequences]
        while any(s.is_prefilling or s.slot is None for s in seqs):
            engine.step()
        contexts = []  # the mean context of each timed step

        def decode_steps() -> None:
            while all(not s.is_finished for s in seqs):
                contexts.append(sum(s.num_tokens for s in seqs) / len(seqs))
                engine.step()

        seconds = time_eager(decode_steps, reps=1, warmup=0, device=ctx.device).seconds
        steps = len(contexts)
        while engine.has_unfinished():
            engine.step()
        ssm = torch.float32 if ssm_dtype == "float32" else torch.bfloat16
        mean_ctx = sum(contexts) / max(1, len(contexts))
        step_bytes = floors.decode_step_bytes(ctx.model, config, running, mean_ctx, ctx.dtype, ssm)
        step_s = seconds / max(1, steps)
        floor_s = step_bytes / ctx.bandwidth
        return {
            "scenario": "decode", "concurrency": running, "requested_concurrency": concurrency,
            "ssm_dtype": ssm_dtype, "prompt_len": prompt_len, "output_len": output_len, "steps": steps,
            "step_ms": step_s * 1e3, "floor_step_ms": floor_s * 1e3, "tokens_per_s": running / step_s,
            "floor_tokens_per_s": running / floor_s, "fraction_of_floor": floor_s / step_s,
            "step_bytes": step_bytes,
        }  # fmt: skip
    finally:
        _release(engine)


def prefill(ctx: BenchContext, length: int, max_num_batched_tokens: int | None = None) -> dict:
    """One prompt of `length` random tokens; time until its first token is sampled."""
    config = ctx.model.llm_config
    budget = max_num_batched_tokens or length
    engine = _engine(ctx, max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=length + 16)
    try:
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
        warm = _prompts(1, min(length, 512), config.vocab_size, ctx.seed + 1)[0]
        engine.add_request("warm", warm, params)
        while engine.has_unfinished():
            engine.step()
        prompt = _prompts(1, length, config.vocab_size, ctx.seed + length)[0]

        def run_prompt() -> None:
            engine.add_request("p", prompt, params)
            while engine.has_unfinished():
                engine.step()

        seconds = time_eager(run_prompt, reps=1, warmup=0, device=ctx.device).seconds
        flops = floors.prefill_flops(ctx.model, config, length)
        floor_s = flops / ctx.matmul_rate
        return {
            "scenario": "prefill", "tokens": length, "chunk": budget, "seconds": seconds,
            "tokens_per_s": length / seconds, "floor_seconds": floor_s, "floor_tokens_per_s": length / floor_s,
            "fraction_of_floor": floor_s / seconds,
        }  # fmt: skip
    finally:
        _release(engine)


@torch.inference_mode()
def ssm_state_drift(ctx: BenchContext, prompt_len: int, steps: int) -> dict:
    """Logits with a bf16 SSM state against fp32, over `steps` decode steps fed the same (fp32-greedy) tokens."""
    config = ctx.model.llm_config
    dev = ctx.device
    prompt = _prompts(1, prompt_len, config.vocab_size, ctx.seed + 7)[0]
    bs, blocks = 16, -(-(prompt_len + steps + 1) // 16)
    table = torch.arange(blocks, device=dev).view(1, -1)
    caches = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        c = allocate_cache_tensors(config, 1, blocks, bs, ctx.dtype, dt, dev)
        c.conv_state.zero_()
        c.ssm_state.zero_()
        caches[name] = c
    slot = torch.tensor([0], device=dev)
    ids = torch.tensor(prompt, device=dev)
    logits = {k: ctx.model(ForwardBatch([prompt_len], [0], slot, table), c, input_ids=ids)[0].float()
              for k, c in caches.items()}  # fmt: skip
    worst, agree = 0.0, 0
    for i in range(steps):
        ref, other = logits["float32"], logits["bfloat16"]
        worst = max(worst, float((ref - other).abs().max() / ref.abs().max()))
        agree += int(ref.argmax() == other.argmax())
        nxt = ref.argmax().view(1)
        batch = ForwardBatch([1], [prompt_len + i], slot, table)
        logits = {k: ctx.model(batch, c, input_ids=nxt)[0].float() for k, c in caches.items()}
    del caches
    return {
        "scenario": "ssm_state_drift", "prompt_len": prompt_len, "steps": steps,
        "max_relative_logit_drift": worst, "argmax_agreement": agree / steps,
    }  # fmt: skip
