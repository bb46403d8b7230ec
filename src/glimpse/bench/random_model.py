"""The full-size architecture with random weights, built straight on the device (no download):
speed does not depend on the values."""

from __future__ import annotations

import math

import torch

from glimpse.config import NemotronHConfig
from glimpse.model.nemotron_h import NemotronHForCausalLM

PATTERN_12B = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"


def nemotron_nano_12b_v2() -> NemotronHConfig:
    """The 12B language model of Nemotron Nano 2 VL (MODEL_SPEC.md §1)."""
    return NemotronHConfig.from_dict(
        dict(
            vocab_size=131072, hidden_size=5120, hybrid_override_pattern=PATTERN_12B, num_attention_heads=40,
            num_key_value_heads=8, head_dim=128, intermediate_size=20480, mamba_num_heads=128, mamba_head_dim=80,
            n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128, layer_norm_epsilon=1e-5,
            max_position_embeddings=131072, eos_token_id=2,
        )
    )  # fmt: skip


PRESETS = {"nemotron-nano-12b-v2": nemotron_nano_12b_v2}


@torch.no_grad()
def random_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> NemotronHForCausalLM:
    if name not in PRESETS:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name]()
    with torch.device("meta"):
        model = NemotronHForCausalLM(config).to(dtype)  # allocate in the target dtype: 12B in fp32 won't fit
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for pname, p in model.named_parameters():
        if pname.endswith("A_log"):
            p.copy_(torch.log(torch.empty(p.shape, device=device).uniform_(1, 16, generator=gen)))
        elif pname.endswith("dt_bias"):
            dt = torch.exp(
                torch.empty(p.shape, device=device).uniform_(math.log(1e-3), math.log(1e-1), generator=gen)
            )
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif pname.endswith(".D") or "norm" in pname:
            p.fill_(1.0)
        elif pname.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0, 0.02, generator=gen)
    for pname, p in model.named_parameters():
        if pname.endswith(("A_log", ".D", "dt_bias")):  # kept in fp32, as the loader keeps them
            p.data = p.data.float()
    return model.eval()
