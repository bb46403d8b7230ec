"""GPU only: the engine's CUDA paths end to end on the tiny model, against the CPU reference and against
each other. Chunked prefill (Triton conv, scan and paged prefill attention over cached KV), prefix-cache
hits (attention over cached blocks, Mamba snapshots), and asynchronous decode behind the CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from glimpse import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * n) % 400 + 20 for i in range(n)]} for n in (150, 37, 96, 5, 211)]
GPU = dict(device="cuda", dtype="float32", max_num_seqs=8, gpu_memory_utilization=0.3)


def _run(llm: LLM, params: SamplingParams):
    outs = llm.generate(PROMPTS, params)
    llm.engine.close()
    return [(o.outputs[0].token_ids, [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]) for o in outs]


def _close(a, b, tol):
    for (ta, la), (tb, lb) in zip(a, b):
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb)) <= tol


def test_chunked_prefill_on_cuda_matches_cpu():
    """32-token chunks: every prompt crosses several chunks, so the conv, the scan and attention all
    continue from cached state; fp32 throughout, so the CPU reference must agree closely."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    cpu = _run(LLM("tiny", device="cpu", max_num_seqs=8, max_num_batched_tokens=32), params)
    chunked = _run(LLM("tiny", max_num_batched_tokens=32, enable_prefix_caching=False, **GPU), params)
    whole = _run(LLM("tiny", max_num_batched_tokens=1024, enable_prefix_caching=False, **GPU), params)
    _close(chunked, cpu, 1e-3)
    _close(whole, cpu, 1e-3)


def test_prefix_cache_hits_on_cuda_match_no_cache():
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    shared = [20 + i % 300 for i in range(160)]
    prompts = [{"prompt_token_ids": shared + [30 + j, 40 + j]} for j in range(4)]
    ref_llm = LLM("tiny", enable_prefix_caching=False, **GPU)
    ref = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, params)]
    ref_llm.engine.close()
    llm = LLM("tiny", enable_prefix_caching=True, **GPU)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts[:1], params)]
    rest = llm.generate(prompts[1:], params)
    assert first + [o.outputs[0].token_ids for o in rest] == ref
    assert all(o.num_cached_tokens > 0 for o in rest)
    llm.engine.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_async_scheduling_on_cuda_equals_sync(dtype):
    """The same graphs and kernels with and without the pipelined host loop: identical tokens."""
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 40, 17, 1, 64)
    ] + [SamplingParams(temperature=0.9, seed=11, max_tokens=30, ignore_eos=True)]
    prompts = PROMPTS + PROMPTS[:1]
    kw = GPU | {"dtype": dtype}
    sync_llm = LLM("tiny", async_scheduling=False, **kw)
    sync = [o.outputs[0].token_ids for o in sync_llm.generate(prompts, params)]
    sync_llm.engine.close()
    async_llm = LLM("tiny", **kw)
    assert async_llm.engine.async_scheduling
    out = [o.outputs[0].token_ids for o in async_llm.generate(prompts, params)]
    assert async_llm.engine.num_async_steps > 30
    assert out == sync
    assert async_llm.engine.all_memory_free()
    async_llm.engine.close()
