"""The split language model on real gloo groups gives the unsplit model's logits: a packed prefill of
three sequences, a second chunk on top of their caches, and a decode step, in float32 so
the only difference is the order of the sums (tolerance 1e-4 on logits of size ~2). (The VL model's
language model is the same module: tests/distributed/test_tp_engine.py splits it end to end.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glimpse.distributed.group import SINGLE, TPGroup
from glimpse.engine.cache import allocate_cache_tensors
from glimpse.errors import CheckpointError
from glimpse.loader import Split, _read
from glimpse.model.batch import ForwardBatch
from glimpse.model.loading import check_tensor_parallel_size, load_model, resolve_model_path
from glimpse.model.parallel import shard_config, tp_refusal
from glimpse.model.tiny import make_tiny, tiny_text_config
from tests.distributed.ranks import run_ranks

TOLERANCE = 1e-4


@torch.no_grad()
def three_steps(tp: TPGroup, model_dir: str, keep_packed: bool = False) -> list[torch.Tensor]:
    """Logits of every token of a packed prefill, of a second chunk on top of it, and of a decode step."""
    model = load_model(Path(model_dir), "cpu", torch.float32, tp=tp, keep_packed=keep_packed)
    config = model.llm_config
    cache = allocate_cache_tensors(config, 3, 12, 16, torch.float32, torch.float32, "cpu")
    cache.conv_state.zero_()
    cache.ssm_state.zero_()
    gen = torch.Generator().manual_seed(5)
    tables = torch.arange(12).view(3, 4)
    slots = torch.tensor([0, 1, 2])
    out = []
    context = [0, 0, 0]
    for lens in ([9, 17, 4], [5, 1, 20], [1, 1, 1]):
        ids = torch.randint(config.vocab_size, (sum(lens),), generator=gen)
        batch = ForwardBatch(list(lens), list(context), slots, tables)
        out.append(model(batch, cache, input_ids=ids, logits_indices=torch.arange(sum(lens))))
        context = [c + n for c, n in zip(context, lens)]
    return out


def test_split_model_matches_the_whole_one(tiny4):
    """Two ranks here; four ranks run end to end in test_tp_engine.py (4 processes on CI's 2 cores are slow)."""
    want = three_steps(SINGLE, tiny4)
    got = run_ranks(2, three_steps, tiny4)
    for w, g in zip(want, got):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() < TOLERANCE
        assert torch.equal(g.argmax(-1), w.argmax(-1))


@torch.no_grad()
def packed_pair(tp: TPGroup, fp8: str, nvfp4: str) -> list[list[torch.Tensor]]:
    return [three_steps(tp, fp8, keep_packed=True), three_steps(tp, nvfp4, keep_packed=True)]


def test_packed_fp8_and_nvfp4_layers_split_with_their_scales(tmp_path_factory):
    """Quantised layers kept packed (as on GPUs): FP8's per-tensor scales whole on each rank, NVFP4's
    per-16 scales sliced with their weights (row-parallel: along K, in whole groups)."""
    fp8 = str(make_tiny(tmp_path_factory.mktemp("fp8"), n_groups=4, quantization="fp8"))
    nvfp4 = str(make_tiny(tmp_path_factory.mktemp("nvfp4"), n_groups=4, quantization="nvfp4"))
    want = packed_pair(SINGLE, fp8, nvfp4)
    share = load_model(Path(nvfp4), "cpu", torch.float32, tp=TPGroup(rank=1, size=2), keep_packed=True)
    assert type(share.backbone.layers[0].mixer.out_proj).__name__ == "Nvfp4Linear"
    got = run_ranks(2, packed_pair, fp8, nvfp4)
    for w_model, g_model in zip(want, got):
        for w, g in zip(w_model, g_model):
            assert (g - w).abs().max().item() < TOLERANCE
            assert torch.equal(g.argmax(-1), w.argmax(-1))


def test_each_rank_holds_its_share_only(tiny4):
    whole = load_model(Path(tiny4), "cpu", torch.float32)
    share = load_model(Path(tiny4), "cpu", torch.float32, tp=TPGroup(rank=2, size=4))  # no collective runs
    mixer, part = whole.backbone.layers[0].mixer, share.backbone.layers[0].mixer
    # in_proj is z | x | B | C | dt: rank 2 of 4 takes the third quarter of each
    d, bc, h = mixer.d_inner, mixer.groups * mixer.state_size, mixer.heads
    w = mixer.in_proj.weight
    pieces = [w[:d], w[d : 2 * d], w[2 * d : 2 * d + bc], w[2 * d + bc : 2 * d + 2 * bc], w[2 * d + 2 * bc :]]
    expect = torch.cat([p[2 * len(p) // 4 : 3 * len(p) // 4] for p in pieces])
    assert torch.equal(part.in_proj.weight, expect)
    assert torch.equal(part.A_log, mixer.A_log[h // 2 : 3 * h // 4])
    assert torch.equal(part.out_proj.weight, mixer.out_proj.weight[:, d // 2 : 3 * d // 4])
    v = whole.lm_head.out_features
    assert torch.equal(share.lm_head.weight, whole.lm_head.weight[v // 2 : 3 * v // 4])
    attention = whole.backbone.layers[3].mixer  # 2 KV heads over 4 ranks: ranks 2 and 3 share head 1
    assert torch.equal(share.backbone.layers[3].mixer.k_proj.weight, attention.k_proj.weight[16:32])
    assert share.llm_config.mamba_num_heads == 2 and share.llm_config.num_key_value_heads == 1


def test_a_size_the_model_cannot_take_is_refused_with_the_reason():
    config = tiny_text_config()  # 4 query heads, 2 KV heads, 8 Mamba heads in 2 groups, vocabulary 640
    assert tp_refusal(config, 2) is None
    why = tp_refusal(config, 4)
    assert "n_groups (2) is not divisible by 4" in why
    why = tp_refusal(config, 3)
    assert "num_attention_heads (4) is not divisible by 3" in why and "mamba_num_heads (8)" in why
    assert "num_key_value_heads (2) neither divides by 3" in why and "vocab_size (640)" in why
    with pytest.raises(ValueError, match="n_groups"):
        check_tensor_parallel_size(resolve_model_path("tiny"), 4)
    assert shard_config(config, 2).mamba_conv_dim == config.mamba_conv_dim // 2


def test_a_split_that_would_cut_a_scale_group_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 3, dtype=torch.uint8)}, tmp_path / "s.safetensors")  # 48 columns
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        ok = _read(f, "w", Split(1, ((16, 16),), 48), "w")
        assert ok.shape == (4, 1)
        with pytest.raises(CheckpointError, match="scale group"):
            _read(f, "w", Split(1, ((8, 8),), 48), "w")
