"""Warm-up: before a server says it is ready, run synthetic requests of the shapes it will meet, so that the
Triton kernels they need are compiled (and CUDA's lazily loaded modules loaded) now rather than while a
user waits.

Triton compiles a kernel once per specialisation: its constexprs and whether each integer argument is 1
or a multiple of 16. A prompt's length, how many prompts share a step, a chunk that continues an earlier
one, a prefix-cache hit, and the sampler's options each pick different ones, so the warm-up walks those
(on 2026-12-03 the first 1,024-token request on a fresh H200 took 2.9 s against 0.1 s warm). Decode steps
are already compiled by the CUDA-graph capture, and the largest prefill by the memory profile.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from glimpse.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, detokenize=False)
SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.1,
                         logprobs=2, seed=1, max_tokens=3, ignore_eos=True, detokenize=False)  # fmt: skip


def _prompt(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=gen).tolist()


def _run(engine: Any, prompts: list[tuple[list[int], SamplingParams]]) -> None:
    """Run these prompts as one wave of requests to completion."""
    for i, (ids, params) in enumerate(prompts):
        engine.add_request(f"__warmup-{time.monotonic_ns()}-{i}", ids, params)
    while engine.has_unfinished():
        engine.step()


def warm_up(engine: Any, *, any_device: bool = False) -> float:
    """Run the warm-up requests through `engine`, an LLMEngine at the end of its start (CUDA only: the CPU
    compiles nothing); returns the seconds it took. The counters /metrics reads are zeroed after; the
    prefix cache may keep the synthetic prompts' blocks, evictable like any others. `any_device`: run on
    the CPU too (tests)."""
    if engine.device.type != "cuda" and not any_device:
        return 0.0
    start = time.perf_counter()
    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    limit = engine.max_model_len - GREEDY.max_tokens - 1
    budget = engine.cfg.scheduler.max_num_batched_tokens
    block = engine.cfg.cache.block_size
    lengths = [n for n in (1, 17, 100, 1000) if n <= limit]
    for n in lengths:  # one prompt at a time: ragged and block-aligned lengths
        _run(engine, [(_prompt(n, vocab, gen), GREEDY)])
    waves = [[(_prompt(n, vocab, gen), GREEDY) for n in (33, 250, 7) if n <= limit]]  # packed prompts
    waves.append([(_prompt(min(40, limit), vocab, gen), SAMPLED)])  # every sampler option
    if budget + 64 <= limit:  # a prompt longer than a step: chunks that continue a saved state
        waves.append([(_prompt(budget + 64, vocab, gen), GREEDY)])
    for wave in waves:
        _run(engine, wave)
    if engine.prefix_cache is not None and 4 * block + 9 <= limit:  # the same prefix twice: a cache hit
        shared = _prompt(4 * block, vocab, gen)
        _run(engine, [(shared + _prompt(5, vocab, gen), GREEDY)])
        _run(engine, [(shared + _prompt(9, vocab, gen), GREEDY)])
    if engine.vision_encoder is not None:  # image batches of one and of several tiles
        size = engine.model.config.force_image_size
        with torch.inference_mode():
            for tiles in (1, 3):
                engine.model.encode_images(torch.randn(tiles, 3, size, size, device=engine.device))
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    engine.forget_warmup()
    return time.perf_counter() - start
