"""The whole VL forward for dense 512² tiles vs transformers' NemotronH_Omni_Reasoning_V3, which implements
the same image path (RADIO -> pixel shuffle v2 -> projector -> embeddings in the `<image>` positions ->
NemotronH). Logits agree to 1e-4 relative; greedy tokens agree."""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import NemotronHConfig as HFTextConfig
from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
    NemotronH_Omni_Reasoning_V3_Config,
)
from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import NemotronH_Omni_Reasoning_V3

from glimpse.config import NemotronHConfig, VLConfig
from glimpse.config_radio import RadioConfig
from glimpse.model.vlm import NemotronVLModel
from tests.model.nemotron_reference import new_cache
from tests.model.test_projector_parity import hf_radio_to_nvidia

IMAGE_TOKEN, IMG_START, IMG_END = 5, 6, 7


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    text = HFTextConfig(
        hidden_size=24, hybrid_override_pattern="M-M*-", num_attention_heads=2, num_key_value_heads=1, head_dim=12,
        intermediate_size=48, vocab_size=64, mamba_num_heads=4, mamba_head_dim=6, n_groups=2, ssm_state_size=8,
        chunk_size=16, time_step_limit=(0.0, math.inf),
    )  # fmt: skip
    config = NemotronH_Omni_Reasoning_V3_Config(
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_img_size": 2048,
                       "num_cls_tokens": 4, "num_registers": 4, "video_temporal_patch_size": 2},
        text_config=text.to_dict(), projector_hidden_size=48, vision_hidden_size=32, image_token_id=IMAGE_TOKEN,
    )  # fmt: skip
    ref = NemotronH_Omni_Reasoning_V3(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("lambda1", "A_log", "dt_bias", ".D")):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 2 and "token" not in name:
                p.copy_(noise / math.sqrt(p.shape[1]) * (3 if "embed" in name else 1))
            else:
                p.copy_(0.5 * noise)
    for m in ref.modules():
        if hasattr(m, "time_step_limit"):
            m.time_step_limit = (0.0, math.inf)

    vision_shapes = {k: tuple(v.shape) for k, v in ref.vision_model.state_dict().items()}
    radio = RadioConfig.from_checkpoint(ref.config.vision_config.to_dict(), vision_shapes)
    llm = NemotronHConfig.from_dict(ref.config.text_config.to_dict())
    ours = NemotronVLModel(
        VLConfig(llm=llm, vision_config={}, projector_hidden_size=48, vit_hidden_size=32), radio
    )
    ours.vision_model.vit.load_state_dict(hf_radio_to_nvidia(ref.vision_model.state_dict()))
    proj = ref.multi_modal_projector
    ours.mlp1.load_state_dict({"0.weight": proj.layer_norm.weight, "1.weight": proj.linear_1.weight,
                               "3.weight": proj.linear_2.weight})  # fmt: skip
    lm = {re.sub(r"^model\.", "backbone.", k): v for k, v in ref.language_model.state_dict().items()}
    ours.language_model.load_state_dict(lm)
    return ref, ours.eval()


def prompt_with_images(num_tiles: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Text, then per image `<img>` + `<image>`×256·tiles + `</img>`; returns ids and (start, length) spans."""
    ids, spans = [10, 11, 12], []
    for n in num_tiles:
        ids.append(IMG_START)
        spans.append((len(ids), 256 * n))
        ids += [IMAGE_TOKEN] * (256 * n) + [IMG_END, 13]
    return ids + [14, 15, 16], spans


def our_logits(model: NemotronVLModel, ids: list[int], spans, tiles: torch.Tensor) -> torch.Tensor:
    """What the engine does: embed the tokens, write the vision embeddings over the placeholder runs."""
    from glimpse.model.batch import ForwardBatch

    emb = model.embed(torch.tensor(ids))
    vision = model.encode_images(tiles).flatten(0, 1)
    offset = 0
    for start, length in spans:
        emb[start : start + length] = vision[offset : offset + length]
        offset += length
    batch = ForwardBatch([len(ids)], [0], torch.tensor([0]), torch.arange(128).view(1, -1))
    cache = new_cache(model.llm_config, slots=1, blocks=128, block_size=16)
    return model(batch, cache, inputs_embeds=emb, logits_indices=torch.arange(len(ids)))


@torch.no_grad()
def test_vl_logits_and_greedy_tokens_match_reference(pair):
    ref, ours = pair
    tiles = torch.randn(3, 3, 512, 512, generator=torch.Generator().manual_seed(3))
    ids, spans = prompt_with_images([2, 1])  # one image of 2 tiles, one of 1 tile
    packed = tiles.reshape(3, 3, 32, 16, 32, 16).permute(0, 2, 4, 1, 3, 5).reshape(3 * 1024, 768)
    grid = torch.tensor([[32, 32]] * 3)
    expected = ref(input_ids=torch.tensor([ids]), pixel_values=packed, image_grid_hw=grid).logits[0]
    got = our_logits(ours, ids, spans, tiles)
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= 1e-4, f"relative error {err:.2e}"

    # greedy continuation: 8 tokens, the reference recomputing the whole prompt each time
    seq_ref, seq_ours = list(ids), list(ids)
    for _ in range(8):
        r = ref(input_ids=torch.tensor([seq_ref]), pixel_values=packed, image_grid_hw=grid).logits[0, -1]
        o = our_logits(ours, seq_ours, spans, tiles)[-1]
        seq_ref.append(int(r.argmax()))
        seq_ours.append(int(o.argmax()))
    assert seq_ours == seq_ref
