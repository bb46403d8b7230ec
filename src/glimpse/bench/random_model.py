"""The full-size architecture with random weights, built straight on the device (no download):
speed does not depend on the values.

Text: `nemotron-nano-12b-v2` (the 12B NemotronH). VL: `nemotron-nano-12b-v2-vl` (RADIO ViT-H/16 +
`mlp1` projector 5120·4 -> 20480 -> 5120 + the same 12B LLM), and `nemotron-nano-vl-tiny` (the tiny VL
checkpoint's geometry, for tests). A random VL model has no tokenizer of its own: `bench_tokenizer()` is
the tiny byte-level BPE with the real special tokens (`<img>`, `<image>`, `</img>`); its ids are a prefix
of any vocabulary, so they are valid for the 131,072-row embedding table.

`quantization="fp8"|"nvfp4"` builds the model as the published quantised checkpoints hold it: the
language model's linears are Fp8Linear / Nvfp4Linear, their random bf16 weights quantised on the device
one layer at a time (the whole model never exists in bf16).
"""

from __future__ import annotations

import math

import torch

from glimpse.config import NemotronHConfig, VLConfig
from glimpse.config_radio import RadioConfig
from glimpse.kernels.quant_formats import E2M1_MAX, E4M3_MAX, quantize_fp8, quantize_nvfp4
from glimpse.model.nemotron_h import NemotronHForCausalLM
from glimpse.model.quant_linear import (
    Nvfp4Linear,
    Quantization,
    published_quant_config,
    replace_quantized_linears,
)

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


def nemotron_nano_12b_v2_vl() -> tuple[VLConfig, RadioConfig]:
    """Nemotron Nano 2 VL: C-RADIO ViT-H/16 (1280 wide, 32 deep, 16 heads, MLP 5120, 8 prefix tokens),
    pixel shuffle 0.5, `mlp1` 5120 -> 20480 -> 5120, the 12B LLM."""
    radio = RadioConfig()  # the defaults are the 12B VL's ViT-H/16
    config = VLConfig(
        llm=nemotron_nano_12b_v2(),
        vision_config=radio.to_checkpoint_dict(),
        projector_hidden_size=20480,
        vit_hidden_size=radio.hidden_size,
    )
    return config, radio


def nemotron_nano_vl_tiny() -> tuple[VLConfig, RadioConfig]:
    """The tiny VL checkpoint's shapes (glimpse/model/tiny_vl.py), random: the CPU tests of the VL scenarios."""
    from glimpse.model.tiny import tiny_text_config
    from glimpse.model.tiny_vl import TINY_VL_CONTEXT, tiny_radio_config

    radio = tiny_radio_config()
    vocab = (len(bench_tokenizer()) + 63) // 64 * 64
    llm = tiny_text_config(max_position_embeddings=TINY_VL_CONTEXT, vocab_size=vocab)
    config = VLConfig(llm=llm, vision_config=radio.to_checkpoint_dict(), projector_hidden_size=96,
                      vit_hidden_size=radio.hidden_size)  # fmt: skip
    return config, radio


PRESETS = {"nemotron-nano-12b-v2": nemotron_nano_12b_v2}
VL_PRESETS = {
    "nemotron-nano-12b-v2-vl": nemotron_nano_12b_v2_vl,
    "nemotron-nano-vl-tiny": nemotron_nano_vl_tiny,
}


def is_vl_preset(name: str | None) -> bool:
    return name in VL_PRESETS


_TOKENIZER = None


def bench_tokenizer():
    """The tokenizer random VL models are served with: the tiny one (has <img>, <image>, </img>)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from glimpse.model.tiny import build_tokenizer

        _TOKENIZER = build_tokenizer()
    return _TOKENIZER


PACKED_TENSORS = ("weight", "weight_scale", "weight_scale_2", "input_scale")
INPUT_AMAX = 8.0
"""The FP8 layers' static input scale is INPUT_AMAX / 448: unit-RMS activations up to 8 are representable
(a checkpoint calibrates it; speed does not depend on it)."""


@torch.no_grad()
def _fill_random_(model: torch.nn.Module, device: torch.device, seed: int, skip: set[str]) -> None:
    """Random values with the right structure: Mamba2's usual A and dt ranges, unit norms, zero biases.
    Parameters named in `skip` are left alone."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for pname, p in model.named_parameters():
        if pname in skip:
            continue
        if pname.endswith("A_log"):
            p.copy_(torch.log(torch.empty(p.shape, device=device).uniform_(1, 16, generator=gen)))
        elif pname.endswith("dt_bias"):
            dt = torch.exp(
                torch.empty(p.shape, device=device).uniform_(math.log(1e-3), math.log(1e-1), generator=gen)
            )
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif pname.endswith(".D"):
            p.fill_(1.0)
        elif pname.endswith("bias"):
            p.zero_()
        elif "norm" in pname or pname == "mlp1.0.weight":  # mlp1.0 is the projector's RMSNorm
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=gen)
    for pname, p in model.named_parameters():
        if pname.endswith(("A_log", ".D", "dt_bias")):  # kept in fp32, as the loader keeps them
            p.data = p.data.float()


@torch.no_grad()
def _fill_quantized_(model: torch.nn.Module, layers: list[str], device: torch.device, seed: int) -> None:
    """Each quantised layer's packed tensors from a random bf16 weight made and quantised on the device,
    one layer at a time."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    for name in layers:
        layer = model.get_submodule(name)
        w = torch.empty(layer.out_features, layer.in_features, device=device, dtype=torch.bfloat16)
        w.normal_(0, 0.02, generator=gen)
        if isinstance(layer, Nvfp4Linear):
            weight, scale, scale_2 = quantize_nvfp4(w)
            layer.weight_scale_2.copy_(scale_2)
            layer.input_scale.fill_(INPUT_AMAX / (E2M1_MAX * E4M3_MAX))
        else:
            weight, scale = quantize_fp8(w)
            layer.input_scale.fill_(INPUT_AMAX / E4M3_MAX)
        layer.weight.copy_(weight)
        layer.weight_scale.copy_(scale)


def _materialise(
    model: torch.nn.Module, device: torch.device, seed: int, quantization: Quantization | None
) -> torch.nn.Module:
    """Allocate the meta-device `model` on `device` and fill it; quantised first when asked."""
    layers = replace_quantized_linears(model, published_quant_config(quantization)) if quantization else []
    model = model.to_empty(device=device)
    packed = {f"{name}.{leaf}" for name in layers for leaf in PACKED_TENSORS}
    _fill_random_(model, torch.device(device), seed, packed)
    _fill_quantized_(model, layers, torch.device(device), seed)
    return model


@torch.no_grad()
def random_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    quantization: Quantization | None = None,
) -> torch.nn.Module:
    """A text preset gives NemotronHForCausalLM; a VL preset gives NemotronVLModel (see random_vl_model).
    `quantization` (`fp8`, `nvfp4`): the language model's linears quantised, as the published checkpoints."""
    if name in VL_PRESETS:
        return random_vl_model(name, device, dtype, seed, quantization)
    if name not in PRESETS:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(PRESETS) + sorted(VL_PRESETS)}")
    config = PRESETS[name]()
    with torch.device("meta"):
        model = NemotronHForCausalLM(config).to(dtype)  # allocate in the target dtype: 12B in fp32 won't fit
    return _materialise(model, device, seed, quantization).eval()


@torch.no_grad()
def random_vl_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    quantization: Quantization | None = None,
):
    """The VL model (vision tower, projector, LLM) with random weights, allocated on the device in `dtype`."""
    from glimpse.model.vlm import NemotronVLModel

    if name not in VL_PRESETS:
        raise ValueError(f"unknown VL architecture {name!r}; known: {sorted(VL_PRESETS)}")
    config, radio = VL_PRESETS[name]()
    with torch.device("meta"):
        model = NemotronVLModel(config, radio).to(dtype)
    model = _materialise(model, device, seed, quantization)
    model.language_model.tie_weights()
    return model.eval()


@torch.no_grad()
def restrict_vocab(model: torch.nn.Module, vocab: int) -> None:
    """Make every sampled token one a `vocab`-entry tokenizer can spell (for serving random weights with
    the small bench tokenizer: out-of-range ids detokenize to nothing, so a stream would carry no text).

    lm_head rows >= vocab become zero (logit 0) and the rest are scaled so their logits are large (std
    ~0.5 per weight): greedy and temperature-1 sampling both pick an id below `vocab`. Speed is unchanged.
    """
    lm = getattr(model, "language_model", model)
    w = lm.lm_head.weight
    if w is lm.backbone.embeddings.weight:  # tied: untie so the prompt embeddings stay as they are
        lm.lm_head.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
        w = lm.lm_head.weight
    w[vocab:].zero_()
    w[:vocab].mul_(25.0)
