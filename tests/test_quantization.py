"""Reading a modelopt checkpoint's quantisation (glimpse/quantization.py), matching its exclusion list
against our module names, checking a `quantization=` flag against the files, and the quantised linear
modules (model/quant_linear.py) against computations written here from the formats' definitions."""

from __future__ import annotations

import json

import pytest
import torch

from glimpse.errors import CheckpointError
from glimpse.kernels.quant_formats import quantize_fp8, quantize_nvfp4
from glimpse.model.quant_linear import Fp8Linear, Nvfp4Linear, quantized_linear_names
from glimpse.quantization import (
    NANO_VL_FP8_EXCLUDE,
    QuantConfig,
    module_matches,
    read_quant_config,
    resolve_quantization,
)

PUBLISHED = QuantConfig("FP8", None, NANO_VL_FP8_EXCLUDE)


@pytest.mark.parametrize(
    "name",
    [
        "language_model.backbone.layers.0.mixer.conv1d",  # model.layers.*.conv1d*
        "backbone.layers.5.mixer.conv1d",
        "vision_model.radio_model.model.blocks.0.attn.qkv",  # model.layers.vision_model*
        "vision_model.radio_model.model.blocks.31.mlp.fc2",
        "vision_model.radio_model.model.patch_generator.embedder",
        "mlp1.1",  # model.layers.mlp1*
        "mlp1.3",
        "language_model.lm_head",  # model.layers.language_model.lm_head, lm_head
        "lm_head",
    ],
)
def test_published_exclusions_name_our_full_precision_modules(name):
    assert PUBLISHED.is_excluded(name)


@pytest.mark.parametrize(
    "name",
    [
        "language_model.backbone.layers.3.mixer.in_proj",
        "language_model.backbone.layers.3.mixer.out_proj",
        "language_model.backbone.layers.3.mixer.q_proj",
        "language_model.backbone.layers.3.mixer.o_proj",
        "language_model.backbone.layers.1.mixer.up_proj",
        "backbone.layers.1.mixer.down_proj",
        "backbone.layers.0.mixer.in_proj",
        "language_model.backbone.embeddings",
    ],
)
def test_published_exclusions_leave_the_language_model_linears_quantised(name):
    assert not PUBLISHED.is_excluded(name)


def test_matching_keeps_layer_numbers_and_parents():
    layer4 = "backbone.layers.4.mixer*"
    assert module_matches(layer4, "backbone.layers.4.mixer.in_proj")
    assert module_matches(layer4, "language_model.backbone.layers.4.mixer.in_proj")
    assert not module_matches(layer4, "backbone.layers.14.mixer.in_proj")
    assert not module_matches(layer4, "backbone.layers.3.mixer.in_proj")
    # the VL checkpoint's own spelling (language_model.model.) still names our language_model.backbone.
    assert module_matches(
        "language_model.model.layers.2.mixer.q_proj", "language_model.backbone.layers.2.mixer.q_proj"
    )
    assert not module_matches(
        "language_model.model.layers.2.mixer.q_proj", "language_model.backbone.layers.2.mixer.k_proj"
    )
    # a pattern naming a parent (no wildcard) covers what is below it
    assert module_matches("backbone.layers.4", "backbone.layers.4.mixer.up_proj")
    assert not module_matches("backbone.layers.4", "backbone.layers.40.mixer.up_proj")
    assert not module_matches("mlp1*", "backbone.layers.1.mixer.up_proj")


def test_quantised_layers_of_the_tiny_vl_model_are_exactly_its_language_model_linears():
    from glimpse.bench.random_model import nemotron_nano_vl_tiny
    from glimpse.model.vlm import NemotronVLModel

    config, radio = nemotron_nano_vl_tiny()
    with torch.device("meta"):
        model = NemotronVLModel(config, radio)
    names = quantized_linear_names(model, PUBLISHED)
    kinds = config.llm.layer_kinds
    assert len(names) == 2 * kinds.count("mamba") + 4 * kinds.count("attention") + 2 * kinds.count("mlp")
    assert all(n.startswith("language_model.backbone.layers.") for n in names)
    assert "language_model.backbone.layers.0.mixer.in_proj" in names
    # an exclusion list that also keeps attention in bf16 (other Nemotron checkpoints do)
    no_attention = QuantConfig(
        "FP8", None, (*NANO_VL_FP8_EXCLUDE, "*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj")
    )
    assert len(quantized_linear_names(model, no_attention)) == len(names) - 4 * kinds.count("attention")


def _write(path, name, data):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(data))
    return path


def test_hf_quant_config_is_read(tmp_path):
    quant = {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": "FP8",
        "group_size": 16,
        "exclude_modules": ["lm_head"],
    }
    found = read_quant_config(
        _write(tmp_path, "hf_quant_config.json", {"producer": {}, "quantization": quant})
    )
    assert found == QuantConfig("NVFP4", 16, ("lm_head",), "FP8")
    assert found.method == "modelopt_fp4"
    assert (
        read_quant_config(_write(tmp_path / "x", "hf_quant_config.json", found.to_hf_quant_config())) == found
    )


def test_config_json_quantization_config_is_read(tmp_path):
    section = {"quant_method": "modelopt", "quant_algo": "fp8", "ignore": ["lm_head", "*conv1d*"]}
    found = read_quant_config(_write(tmp_path, "config.json", {"quantization_config": section}))
    assert found == QuantConfig("FP8", None, ("lm_head", "*conv1d*"))
    assert found.method == "modelopt"
    assert read_quant_config(_write(tmp_path / "plain", "config.json", {"hidden_size": 8})) is None


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("hf_quant_config.json", {"quantization": {"quant_algo": "W4A8_AWQ"}}, "quant_algo 'W4A8_AWQ'"),
        ("hf_quant_config.json", {"quantization": {"kv_cache_quant_algo": "FP8"}}, "quant_algo None"),
        ("config.json", {"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method 'gptq'"),
        (
            "config.json",
            {"quantization_config": {"quant_method": "modelopt", "quant_algo": "INT4_AWQ"}},
            "INT4_AWQ",
        ),
    ],
)
def test_other_quantisations_are_refused_by_name(tmp_path, name, data, message):
    with pytest.raises(CheckpointError, match=message + ".*Glimpse serves"):
        read_quant_config(_write(tmp_path, name, data))


def test_the_flag_must_agree_with_the_checkpoint():
    fp8, nvfp4 = QuantConfig("FP8"), QuantConfig("NVFP4", 16)
    assert resolve_quantization(None, None) is None
    assert resolve_quantization(None, fp8) is fp8
    assert resolve_quantization("modelopt", fp8) is fp8
    assert resolve_quantization("modelopt_fp4", nvfp4) is nvfp4
    with pytest.raises(CheckpointError, match="asks for an NVFP4 checkpoint, but this checkpoint is FP8"):
        resolve_quantization("modelopt_fp4", fp8)
    with pytest.raises(CheckpointError, match="asks for an FP8 checkpoint, but this checkpoint is NVFP4"):
        resolve_quantization("modelopt", nvfp4)
    with pytest.raises(
        CheckpointError, match="asks for an NVFP4 checkpoint, but this checkpoint is not quantised"
    ):
        resolve_quantization("modelopt_fp4", None)
    with pytest.raises(ValueError, match="quantization 'awq' is not supported"):
        resolve_quantization("awq", fp8)


# The modules on the CPU (their ops fall back to the torch references) against float64 sums -------------
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _data(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(3, 5, k, generator=g),
        torch.randn(n, k, generator=g) / k**0.5,
        torch.randn(n, generator=g),
    )


def test_fp8_linear_module_matches_its_definition():
    x, w, bias = _data(48, 64, 0)
    layer = Fp8Linear(64, 48, bias=True)
    weight, weight_scale = quantize_fp8(w)
    input_scale = x.abs().max() / 448
    layer.load_state_dict(
        {"weight": weight, "weight_scale": weight_scale, "input_scale": input_scale, "bias": bias}
    )
    xq = (x / input_scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * input_scale.double()
    want = xq @ (weight.double() * weight_scale.double()).T + bias.double()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    plain = Fp8Linear(64, 48)  # without a bias, in the activations' dtype (the model's bias would be too)
    plain.load_state_dict({"weight": weight, "weight_scale": weight_scale, "input_scale": input_scale})
    assert plain(x.bfloat16()).dtype == torch.bfloat16


def test_nvfp4_linear_module_matches_its_definition():
    x, w, _ = _data(48, 64, 1)
    layer = Nvfp4Linear(64, 48)
    weight, weight_scale, weight_scale_2 = quantize_nvfp4(w)
    layer.load_state_dict(
        {
            "weight": weight,
            "weight_scale": weight_scale,
            "weight_scale_2": weight_scale_2,
            "input_scale": torch.tensor(1.0),
        }
    )
    codes = torch.stack((weight % 16, weight // 16), dim=-1).flatten(-2).long()  # low nibble first
    scales = weight_scale.double().repeat_interleave(16, dim=-1)
    w_ref = torch.tensor(E2M1, dtype=torch.float64)[codes] * scales * weight_scale_2.double()
    torch.testing.assert_close(layer(x).double(), x.double() @ w_ref.T, rtol=1e-5, atol=1e-5)
    assert (w_ref - w.double()).abs().max() < 0.2 * w.abs().max()  # and it is a quantisation of w
    with pytest.raises(CheckpointError, match="multiple of 16"):
        Nvfp4Linear(40, 8)


@pytest.mark.parametrize("quantization, cls", [("fp8", Fp8Linear), ("nvfp4", Nvfp4Linear)])
def test_random_weights_model_is_built_quantised(quantization, cls):
    """The benchmark's random-weight model (`--random-weights ARCH --quantization fp8|nvfp4`) holds its
    language model's linears packed, everything else as the bf16 one, and computes finite logits."""
    from glimpse.bench.random_model import random_model
    from glimpse.model.batch import ForwardBatch
    from glimpse.model.quant_linear import weight_precision
    from tests.model.nemotron_reference import new_cache

    model = random_model(
        "nemotron-nano-vl-tiny", torch.device("cpu"), torch.bfloat16, quantization=quantization
    )
    assert weight_precision(model) == quantization.upper()
    lm = model.language_model
    packed = [name for name, m in model.named_modules() if isinstance(m, cls)]
    assert len(packed) == len(quantized_linear_names(model, PUBLISHED))
    assert all(name.startswith("language_model.backbone.layers.") for name in packed)
    assert type(lm.lm_head) is torch.nn.Linear and lm.lm_head.weight.dtype == torch.bfloat16
    assert lm.backbone.layers[0].mixer.conv1d.weight.dtype == torch.bfloat16
    assert lm.backbone.layers[0].mixer.A_log.dtype == torch.float32
    for name in packed:
        layer = model.get_submodule(name)
        assert (layer.weight_scale.float() > 0).all() and layer.input_scale > 0, name
    batch = ForwardBatch([6], [0], torch.tensor([0]), torch.arange(4).view(1, -1))
    with torch.no_grad():
        logits = lm(batch, new_cache(lm.config), input_ids=torch.arange(10, 16))
    assert logits.shape == (1, lm.config.vocab_size) and torch.isfinite(logits.float()).all()
