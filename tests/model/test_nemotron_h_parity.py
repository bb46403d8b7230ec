"""NemotronH in Glimpse vs transformers' NemotronHForCausalLM (the reference), float32 on the CPU.

Tolerance: logits agree to 1e-4 relative to the largest reference logit."""

from __future__ import annotations

import pytest
import torch

from glimpse.model.batch import ForwardBatch
from tests.model.nemotron_reference import (
    CONFIGS,
    build_reference,
    new_cache,
    ours_from_reference,
    run_chunks,
)

RTOL = 1e-4


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert err <= RTOL, f"relative error {err:.2e} > {RTOL}"


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    ref = build_reference(request.param)
    return ref, ours_from_reference(ref)


@torch.no_grad()
def test_one_pass_matches_reference(pair):
    ref, ours = pair
    ids = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(1))  # no chunk size divides 37
    expected = ref(ids[None]).logits[0]
    got = run_chunks(ours, new_cache(ours.config), ids.tolist(), [37], 3, torch.arange(16))
    assert_close(got, expected)


@torch.no_grad()
def test_chunks_and_token_by_token_match_one_pass(pair):
    _, ours = pair
    ids = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    one = run_chunks(ours, new_cache(ours.config), ids, [37], 0, torch.arange(16))
    chunked = run_chunks(ours, new_cache(ours.config), ids, [6, 1, 13, 2, 15], 1, torch.arange(16))
    stepwise = run_chunks(ours, new_cache(ours.config), ids, [1] * 37, 2, torch.arange(16))
    mixed = run_chunks(ours, new_cache(ours.config), ids, [20] + [1] * 17, 5, torch.arange(16).flip(0))
    for other in (chunked, stepwise, mixed):
        assert_close(other, one)


@torch.no_grad()
def test_packed_batch_equals_each_prompt_alone(pair):
    _, ours = pair
    gen = torch.Generator().manual_seed(3)
    lens = [11, 29, 3, 17]
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lens]
    alone = [run_chunks(ours, new_cache(ours.config), p, [len(p)], 0, torch.arange(16))[-1] for p in prompts]
    cache = new_cache(ours.config, blocks=64)
    tables = torch.arange(64).view(4, 16)  # disjoint blocks per sequence
    batch = ForwardBatch(lens, [0] * 4, torch.tensor([4, 0, 6, 2]), tables)
    packed = ours(batch, cache, input_ids=torch.tensor(sum(prompts, [])))
    for i in range(4):
        assert_close(packed[i], alone[i])
    # then a decode step for all four together continues each one correctly
    nxt = [int(packed[i].argmax()) for i in range(4)]
    dec = ForwardBatch([1] * 4, lens, torch.tensor([4, 0, 6, 2]), tables)
    step = ours(dec, cache, input_ids=torch.tensor(nxt))
    for i in range(4):
        want = run_chunks(
            ours, new_cache(ours.config), prompts[i] + [nxt[i]], [lens[i] + 1], 0, torch.arange(16)
        )[-1]
        assert_close(step[i], want)


@torch.no_grad()
def test_greedy_32_tokens_match_reference(pair):
    ref, ours = pair
    prompt = torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(4))
    expected = ref.generate(
        prompt[None], max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    expected = expected[0, 13:].tolist()
    cache = new_cache(ours.config)
    tokens = prompt.tolist()
    table = torch.arange(16)
    logits = run_chunks(ours, cache, tokens, [13], 0, table)[-1]
    got = []
    for _ in range(32):
        nxt = int(logits.argmax())
        got.append(nxt)
        batch = ForwardBatch([1], [len(tokens)], torch.tensor([0]), table.view(1, -1))
        tokens.append(nxt)
        logits = ours(batch, cache, input_ids=torch.tensor([nxt]))[0]
    assert got == expected


@torch.no_grad()
def test_bf16_ssm_state_stays_close(pair):
    """A bf16 state pool (mamba_ssm_cache_dtype='bfloat16') drifts only slightly from fp32."""
    _, ours = pair
    ids = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    full = run_chunks(ours, new_cache(ours.config), ids, [8] + [1] * 16, 0, torch.arange(16))
    cache = new_cache(ours.config)
    cache.ssm_state = cache.ssm_state.to(torch.bfloat16)
    half = run_chunks(ours, cache, ids, [8] + [1] * 16, 0, torch.arange(16))
    err = (half - full).abs().max() / full.abs().max()
    assert 0 < err < 5e-2
