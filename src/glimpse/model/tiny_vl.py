"""The tiny VL checkpoint: real geometry (16-pixel patches, 512-pixel tiles, pixel shuffle 0.5, so 256
tokens per tile and per video frame), tiny widths, a context that fits a 128-frame video."""

from __future__ import annotations

import torch

from glimpse.config import NemotronHConfig, VLConfig
from glimpse.config_radio import RadioConfig
from glimpse.model.projector import Projector
from glimpse.model.radio import RadioViT

TINY_VL_CONTEXT = 49152  # the real model's trained context; 128 frames x 258 tokens fit


def tiny_radio_config() -> RadioConfig:
    return RadioConfig(
        hidden_size=32, depth=2, num_heads=2, intermediate_size=128, patch_size=16, max_grid=128
    )


def tiny_vl_checkpoint(
    llm: NemotronHConfig, llm_state: dict[str, torch.Tensor], seed: int
) -> tuple[VLConfig, dict[str, torch.Tensor]]:
    """The VL config and every tensor, around a language model whose tensors (`language_model.*`) are
    given; the vision weights are random from `seed + 1`."""
    radio = tiny_radio_config()
    config = VLConfig(
        llm=llm,
        vision_config=radio.to_checkpoint_dict(),
        projector_hidden_size=96,
        vit_hidden_size=radio.hidden_size,
    )
    state = dict(llm_state)
    gen = torch.Generator().manual_seed(seed + 1)
    vit = RadioViT(radio)
    for name, p in vit.state_dict().items():
        if name.endswith("bias"):
            t = torch.zeros(p.shape)
        elif "norm" in name:
            t = torch.ones(p.shape)
        else:
            t = torch.randn(p.shape, generator=gen) * (0.5 if "pos_embed" in name or "cls" in name else 0.05)
        state[f"vision_model.radio_model.model.{name}"] = t.to(torch.bfloat16)
    proj = Projector.for_model(radio.hidden_size, config.projector_hidden_size, llm.hidden_size)
    for name, p in proj.state_dict().items():
        t = torch.ones(p.shape) if name == "0.weight" else torch.randn(p.shape, generator=gen) * 0.1
        state[f"mlp1.{name}"] = t.to(torch.bfloat16)
    # The real checkpoint carries RADIO's input normaliser as buffers; Glimpse normalises itself.
    state["vision_model.radio_model.input_conditioner.norm_mean"] = torch.tensor(config.norm_mean).view(
        3, 1, 1
    )
    state["vision_model.radio_model.input_conditioner.norm_std"] = torch.tensor(config.norm_std).view(3, 1, 1)
    return config, state
