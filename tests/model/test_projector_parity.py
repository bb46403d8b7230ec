"""Pixel shuffle, `mlp1` and the whole image path against transformers' NemotronH Omni implementation."""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import NemotronHConfig
from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
    NemotronH_Omni_Reasoning_V3_Config,
)
from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
    NemotronH_Omni_Reasoning_V3,
    NemotronH_Omni_Reasoning_V3MultiModalProjector,
)

from glimpse.config_radio import RadioConfig
from glimpse.model.projector import Projector, pixel_shuffle_v2
from glimpse.model.vision import VisionTower


def reference_shuffle(x: torch.Tensor) -> torch.Tensor:
    # The method does not touch `self`.
    return NemotronH_Omni_Reasoning_V3.pixel_shuffle(None, x, scale_factor=0.5)


@pytest.mark.parametrize("shape", [(2, 32, 32, 8), (1, 4, 6, 3), (3, 20, 12, 5)], ids=str)
def test_pixel_shuffle_matches_reference(shape) -> None:
    x = torch.randn(shape)
    assert torch.equal(pixel_shuffle_v2(x, 0.5), reference_shuffle(x))


def test_pixel_shuffle_token_order_by_hand() -> None:
    """Token (i, j) = concat(x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]); channels stay together."""
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    value = (10 * rows + cols).float()
    x = torch.stack([value, -value], dim=-1)[None]  # [1, 4, 4, 2]: channel 1 is minus channel 0
    out = pixel_shuffle_v2(x, 0.5)
    expected = torch.tensor(
        [
            [[0, -0, 1, -1, 10, -10, 11, -11], [2, -2, 3, -3, 12, -12, 13, -13]],
            [[20, -20, 21, -21, 30, -30, 31, -31], [22, -22, 23, -23, 32, -32, 33, -33]],
        ],
        dtype=torch.float32,
    )[None]
    assert torch.equal(out, expected)
    assert torch.equal(reference_shuffle(x), expected)


def copy_projector(ours: Projector, ref: NemotronH_Omni_Reasoning_V3MultiModalProjector) -> None:
    """mlp1.0 -> layer_norm, mlp1.1 -> linear_1, mlp1.3 -> linear_2 (transformers' conversion map)."""
    with torch.no_grad():
        ref.layer_norm.weight.copy_(ours[0].weight)
        ref.linear_1.weight.copy_(ours[1].weight)
        ref.linear_2.weight.copy_(ours[3].weight)


def make_projector(sizes: tuple[int, int, int], seed: int) -> Projector:
    torch.manual_seed(seed)
    proj = Projector(*sizes)
    with torch.no_grad():
        proj[0].weight.copy_(1 + 0.3 * torch.randn_like(proj[0].weight))
    return proj


def test_projector_matches_reference() -> None:
    ours = make_projector((32, 48, 24), seed=0)
    assert list(ours.state_dict()) == ["0.weight", "1.weight", "3.weight"]
    ref = NemotronH_Omni_Reasoning_V3MultiModalProjector(32, 48, 24)
    copy_projector(ours, ref)
    x = 3 * torch.randn(5, 7, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
        # bfloat16: same fp32 norm with fp32 weight multiply, so the same bits.
        assert torch.equal(ours.bfloat16()(x.bfloat16()), ref.bfloat16()(x.bfloat16()))


def test_projector_sizes_from_vl_config() -> None:
    proj = Projector.for_model(vit_hidden_size=16, projector_hidden_size=40, llm_hidden_size=24)
    shapes = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    assert shapes == {"0.weight": (64,), "1.weight": (40, 64), "3.weight": (24, 40)}
    assert proj[0].eps == 1e-5


def hf_radio_to_nvidia(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers RadioModel names -> NVIDIA's (the map is documented in test_radio_parity.py)."""
    fixed = {
        "embeddings.patch_projection.weight": "patch_generator.embedder.weight",
        "embeddings.position_embedding": "patch_generator.pos_embed",
        "embeddings.cls_register_token": "patch_generator.cls_token.token",
    }
    out = {new: hf_state[old] for old, new in fixed.items()}
    for name in hf_state:
        m = re.match(
            r"encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2|attention\.o_proj|attention\.q_proj)\.(\w+)$",
            name,
        )
        if m is None:
            continue
        i, part, kind = m.groups()
        if part == "attention.q_proj":
            qkv = [hf_state[f"encoder.layer.{i}.attention.{p}_proj.{kind}"] for p in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv)
        else:
            out[f"blocks.{i}.{part.replace('attention.o_proj', 'attn.proj')}.{kind}"] = hf_state[name]
    return out


@pytest.fixture(scope="module")
def omni() -> NemotronH_Omni_Reasoning_V3:
    """A tiny Omni whose image path (RADIO -> pixel shuffle -> projector) is the oracle for ours."""
    torch.manual_seed(0)
    text = NemotronHConfig(
        hidden_size=24,
        layers_block_type=["mlp"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=12,
        intermediate_size=48,
        vocab_size=64,
        mamba_num_heads=2,
        mamba_head_dim=12,
        n_groups=1,
        ssm_state_size=8,
    )
    config = NemotronH_Omni_Reasoning_V3_Config(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_img_size": 2048,
            "num_cls_tokens": 4,
            "num_registers": 4,
            "video_temporal_patch_size": 2,
        },
        text_config=text.to_dict(),
        projector_hidden_size=48,
        vision_hidden_size=32,
        image_token_id=5,
    )
    model = NemotronH_Omni_Reasoning_V3(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in list(model.vision_model.named_parameters()) + list(
            model.multi_modal_projector.named_parameters()
        ):
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("lambda1"):
                continue
            if name.endswith("norm.weight") or re.search(r"norm\d\.weight$", name):
                param.copy_(1 + 0.2 * noise)
            elif param.dim() == 2 and "token" not in name:
                param.copy_(noise / math.sqrt(param.shape[1]))
            else:
                param.copy_(0.5 * noise)
    return model


def test_image_path_matches_omni(omni) -> None:
    """encode_tiles on dense 512² tiles == transformers' get_image_features on the same tiles, packed."""
    cfg = RadioConfig.from_checkpoint(
        omni.config.vision_config.to_dict(),
        {k: tuple(v.shape) for k, v in omni.vision_model.state_dict().items()},
    )
    assert (cfg.hidden_size, cfg.depth, cfg.max_grid, cfg.num_prefix_tokens) == (32, 2, 128, 8)
    tower = VisionTower(cfg).eval()
    tower.vit.load_state_dict(hf_radio_to_nvidia(omni.vision_model.state_dict()))
    mlp1 = Projector.for_model(32, 48, 24)
    mlp1.load_state_dict(
        {
            f"{i}.weight": getattr(omni.multi_modal_projector, n).weight
            for i, n in ((0, "layer_norm"), (1, "linear_1"), (3, "linear_2"))
        }
    )

    tiles = torch.randn(3, 3, 512, 512, generator=torch.Generator().manual_seed(2))
    # transformers' packed layout: each tile's patches row-major, each patch (channel, row, col).
    packed = tiles.reshape(3, 3, 32, 16, 32, 16).permute(0, 2, 4, 1, 3, 5).reshape(3 * 1024, 768)
    with torch.no_grad():
        expected = torch.stack(omni.get_image_features(packed, torch.tensor([[32, 32]] * 3)).pooler_output)
        got = tower.encode_tiles(tiles, mlp1, max_batch=2)  # micro-batches of 2 + 1
        frames = tower.encode_frames(tiles, mlp1, max_batch=1)
        via_forward = mlp1(tower(tiles)).flatten(1, 2)  # how the VL model calls it: mlp1(vision_model(x))
    assert got.shape == (3, 256, 24) and frames.shape == (3, 16, 16, 24)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (frames.flatten(1, 2) - got).abs().max().item() <= 1e-6  # micro-batch size changes nothing
    assert (via_forward - got).abs().max().item() <= 1e-6
