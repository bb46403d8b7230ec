"""Checkpoints load in every spelling and layout, and broken ones fail with the tensor named."""

from __future__ import annotations

import json

import pytest
import torch

from glimpse.config import NemotronHConfig
from glimpse.errors import CheckpointError
from glimpse.model.loading import load_language_model
from glimpse.model.tiny import build_tokenizer, make_tiny
from tests.model.nemotron_reference import build_reference, new_cache, ours_from_reference, run_chunks

IDS = list(range(40, 71))


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return run_chunks(model, new_cache(model.config), IDS, [len(IDS)], 0, torch.arange(16))


@pytest.fixture(scope="module")
def reference():
    return build_reference("small")


def test_transformers_save_pretrained_layout(reference, tmp_path):
    """transformers' own files: `backbone.` names, `layers_block_type`, `num_hidden_layers: null`."""
    reference.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "layers_block_type" in cfg  # the spelling this test is about
    model = load_language_model(tmp_path, "cpu", torch.float32)
    torch.testing.assert_close(logits_of(model), logits_of(ours_from_reference(reference)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("style", ["nvidia", "legacy", "transformers"])
@pytest.mark.parametrize("prefix", ["backbone", "model"])
def test_every_spelling_and_prefix_loads_the_same_model(tmp_path, style, prefix):
    base = make_tiny(tmp_path / "base", seed=3)
    other = make_tiny(tmp_path / "other", seed=3, style=style, name_prefix=prefix, shards=3)
    cfg = json.loads((other / "config.json").read_text())
    assert ("hybrid_override_pattern" in cfg) == (style != "transformers")
    assert ("mamba_n_groups" in cfg) == (style == "legacy")
    assert (other / "model.safetensors.index.json").is_file()
    a = load_language_model(base, "cpu", torch.float32)
    b = load_language_model(other, "cpu", torch.float32)
    torch.testing.assert_close(logits_of(a), logits_of(b), rtol=0, atol=0)


def test_bf16_checkpoint_loads_in_requested_dtype_with_fp32_ssm_parameters(tmp_path):
    model = load_language_model(make_tiny(tmp_path / "m"), "cpu", torch.bfloat16)
    mixer = model.backbone.layers[0].mixer
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch.float32
    assert not any(p.is_meta for p in model.parameters())


def test_truncated_shard_names_the_tensor(tmp_path):
    ckpt = make_tiny(tmp_path / "m", shards=2)
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"truncated: tensor '[\w.]+'"):
        load_language_model(ckpt, "cpu", torch.float32)


def test_misshaped_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = make_tiny(tmp_path / "m")
    state = load_file(ckpt / "model.safetensors")

    bad = dict(state)
    bad["backbone.layers.3.mixer.k_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    save_file(bad, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.3\.mixer\.k_proj\.weight.*shape \[3, 3\]"):
        load_language_model(ckpt, "cpu", torch.float32)

    missing = {k: v for k, v in state.items() if k != "backbone.layers.0.mixer.A_log"}
    save_file(missing, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*backbone\.layers\.0\.mixer\.A_log"):
        load_language_model(ckpt, "cpu", torch.float32)

    extra = dict(state) | {"backbone.layers.0.mixer.surprise": torch.zeros(2)}
    save_file(extra, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.*surprise"):
        load_language_model(ckpt, "cpu", torch.float32)


def test_missing_shard_named_by_index(tmp_path):
    ckpt = make_tiny(tmp_path / "m", shards=2)
    sorted(ckpt.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(CheckpointError, match="missing.*model-00001-of-00002"):
        load_language_model(ckpt, "cpu", torch.float32)


def test_unsupported_pattern_letter_is_a_clear_error():
    cfg = json.loads(json.dumps(NemotronHConfig.from_dict(
        dict(vocab_size=8, hidden_size=8, hybrid_override_pattern="M*-", num_attention_heads=2, head_dim=4,
             intermediate_size=8, mamba_num_heads=2, mamba_head_dim=4, n_groups=1, ssm_state_size=4)
    ).to_dict()))  # fmt: skip
    cfg["hybrid_override_pattern"] = "M*E-"
    with pytest.raises(CheckpointError, match="'E' is a mixture-of-experts block"):
        NemotronHConfig.from_dict(cfg)
    cfg.pop("hybrid_override_pattern")
    cfg["layers_block_type"] = ["mamba", "moe"]
    with pytest.raises(CheckpointError, match="moe"):
        NemotronHConfig.from_dict(cfg)


def test_unsupported_quantisation_is_refused_plainly(tmp_path):
    """FP8 and NVFP4 load (tests/test_quantization_loading.py); other modelopt formats are named."""
    ckpt = make_tiny(tmp_path / "m")
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "W4A8_AWQ"}}))
    with pytest.raises(CheckpointError, match="quant_algo 'W4A8_AWQ'; Glimpse serves modelopt FP8 and NVFP4"):
        load_language_model(ckpt, "cpu", torch.float32)


LINEARS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "up_proj.weight",
           "down_proj.weight", "in_proj.weight", "out_proj.weight")  # fmt: skip


def write_fp8_checkpoint(src, dst):
    """modelopt's FP8 layout: E4M3 weights with a per-tensor fp32 weight_scale and input_scale beside them."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    out = {}
    for name, t in state.items():
        if name.endswith(LINEARS):
            scale = t.float().abs().max() / 448.0
            out[name] = (t.float() / scale).to(torch.float8_e4m3fn)
            out[name[: -len("weight")] + "weight_scale"] = scale.reshape(())
            out[name[: -len("weight")] + "input_scale"] = torch.tensor(0.02)
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors")
    quant = {
        "producer": {"name": "modelopt"},
        "quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head"]},
    }
    (dst / "hf_quant_config.json").write_text(json.dumps(quant))
    return out


def test_fp8_checkpoint_loads_dequantised(tmp_path):
    base = make_tiny(tmp_path / "base", seed=4)
    fp8 = write_fp8_checkpoint(base, tmp_path / "fp8")
    model = load_language_model(tmp_path / "fp8", "cpu", torch.float32)
    params = dict(model.named_parameters())
    checked = 0
    for name, t in fp8.items():
        if t.dtype == torch.float8_e4m3fn:
            want = t.float() * fp8[name + "_scale"]
            torch.testing.assert_close(params[name], want, rtol=0, atol=0)
            checked += 1
    assert checked == sum(1 for n in fp8 if n.endswith(LINEARS))
    # E4M3 keeps ~2 significant digits: the logits stay close to the bf16 checkpoint's
    ref = logits_of(load_language_model(base, "cpu", torch.float32))
    got = logits_of(model)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.1


def test_fp8_weight_without_its_scale_is_named(tmp_path):
    from safetensors.torch import save_file

    fp8 = write_fp8_checkpoint(make_tiny(tmp_path / "base"), tmp_path / "fp8")
    victim = next(n for n in fp8 if n.endswith("down_proj.weight"))
    del fp8[victim + "_scale"]
    save_file(fp8, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.") + ".*no"):
        load_language_model(tmp_path / "fp8", "cpu", torch.float32)


def test_offline_hub_id_gives_a_clear_error(monkeypatch):
    from glimpse.model.loading import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not get 'nvidia/NoSuchModel-xyz'"):
        resolve_model_path("nvidia/NoSuchModel-xyz")
    with pytest.raises(CheckpointError, match="not a directory, a built-in model"):
        resolve_model_path("./no/such/dir")


def test_tokenizer_files_round_trip(tmp_path):
    """The tiny tokenizer keeps the real special tokens and the template's reasoning switch."""
    from transformers import AutoTokenizer

    ckpt = make_tiny(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(ckpt)
    for t in (
        "<SPECIAL_10>",
        "<SPECIAL_11>",
        "<SPECIAL_12>",
        "<think>",
        "</think>",
        "<img>",
        "<image>",
        "</img>",
    ):
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    assert build_tokenizer().get_vocab() == tok.get_vocab()  # deterministic
    eos = json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<SPECIAL_12>") in eos
