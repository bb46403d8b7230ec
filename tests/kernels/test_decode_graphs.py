"""GPU only: the Triton paged decode attention against the torch path, and decode steps replayed from
CUDA graphs against eager execution (the same kernels, so the same tokens)."""

from __future__ import annotations

import pytest
import torch

from glimpse import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_paged_decode_matches_torch(dtype):
    from glimpse.kernels.attention import _decode_attention
    from glimpse.kernels.triton_attention import paged_decode_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, KVH, D, bs, nb = 37, 40, 8, 128, 16, 600
    q = torch.randn(B, H, D, device="cuda", dtype=dtype, generator=gen)
    kc = torch.randn(nb, bs, KVH, D, device="cuda", dtype=dtype, generator=gen)
    vc = torch.randn(nb, bs, KVH, D, device="cuda", dtype=dtype, generator=gen)
    tables = torch.randperm(nb, device="cuda", generator=gen)[: B * 16].view(B, 16)
    ctx = torch.randint(0, 16 * bs - 1, (B,), generator=torch.Generator().manual_seed(1)).tolist()
    ctx[0], ctx[1] = 0, 16 * bs - 1  # a one-token sequence and a full table
    ref = _decode_attention(q.float(), kc.float(), vc.float(), tables, ctx, D**-0.5)
    out = paged_decode_attention(q, kc, vc, tables, torch.tensor(ctx, device="cuda") + 1, D**-0.5)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_graph_replay_equals_eager():
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(30, 30 + n))} for n in (3, 17, 50, 9, 33)]
    small = dict(device="cuda", dtype="float32", max_num_seqs=8, gpu_memory_utilization=0.3)
    eager_llm = LLM("tiny", enforce_eager=True, **small)
    eager = eager_llm.generate(prompts, params)
    eager_llm.engine.close()
    graphed_llm = LLM("tiny", **small)
    assert graphed_llm.engine.runner.graphs is not None
    graphed = graphed_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in eager]
    assert graphed_llm.engine.all_memory_free()
    graphed_llm.engine.close()
