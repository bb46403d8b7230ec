"""RadioViT against transformers' RadioModel (the oracle for NVIDIA's C-RADIO), plus config reading.

Name map, transformers (in memory) -> NVIDIA checkpoint (= our module, under `vision_model.radio_model.model.`):
    embeddings.patch_projection.weight   -> patch_generator.embedder.weight
    embeddings.position_embedding        -> patch_generator.pos_embed
    embeddings.cls_register_token        -> patch_generator.cls_token.token
    encoder.layer.{i}.norm1 / norm2 / mlp.fc1 / mlp.fc2 -> blocks.{i}.<same>
    encoder.layer.{i}.attention.{q,k,v}_proj -> blocks.{i}.attn.qkv (concatenated on dim 0, q | k | v)
    encoder.layer.{i}.attention.o_proj   -> blocks.{i}.attn.proj
    encoder.layer.{i}.layer_scale{1,2}.lambda1 (all ones; C-RADIO has none), input_conditioner.*,
    summary_idxs                         -> not held by RadioViT
transformers' conversion_mapping ("radio") encodes the same map; test_checkpoint_names_load_into_transformers
checks our names against it by loading our state dict through `RadioModel.from_pretrained`.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import RadioConfig as HFRadioConfig
from transformers import RadioModel

from glimpse.config_radio import RadioConfig
from glimpse.errors import CheckpointError
from glimpse.model.radio import RadioViT

WIDTH, DEPTH, HEADS, PATCH = 64, 2, 4, 16


def hf_to_nvidia(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers RadioModel state dict -> NVIDIA/our RadioViT names (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "embeddings.patch_projection.weight": "patch_generator.embedder.weight",
        "embeddings.position_embedding": "patch_generator.pos_embed",
        "embeddings.cls_register_token": "patch_generator.cls_token.token",
    }
    for name, tensor in hf_state.items():
        if name in fixed:
            out[fixed[name]] = tensor
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", name)
        if m is None:
            continue  # input_conditioner, summary_idxs, video_patch_projection
        i, rest = m.groups()
        if rest.startswith("layer_scale"):
            assert torch.all(tensor == 1), "RadioViT has no layer scale"
        elif rest.startswith("attention.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            parts = [hf_state[f"encoder.layer.{i}.attention.{p}_proj.{kind}"] for p in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
        elif rest.startswith("attention.o_proj."):
            out[f"blocks.{i}.attn.proj.{rest.rsplit('.', 1)[1]}"] = tensor
        elif not rest.startswith(("attention.k_proj.", "attention.v_proj.")):
            out[f"blocks.{i}.{rest}"] = tensor
    return out


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights far from init, so a wrong layout, order or interpolation can't hide behind small values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("lambda1"):
                continue
            if re.search(r"norm\d?\.weight$", name):
                param.copy_(1 + 0.2 * noise)
            elif param.dim() == 2 and "token" not in name:
                param.copy_(noise / math.sqrt(param.shape[1]))
            else:
                param.copy_(0.5 * noise)  # biases, position embedding, prefix tokens


def hf_config(max_grid: int) -> HFRadioConfig:
    return HFRadioConfig(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        patch_size=PATCH,
        max_img_size=max_grid * PATCH,
        num_cls_tokens=4,
        num_registers=4,
    )


def our_config(max_grid: int) -> RadioConfig:
    return RadioConfig(
        hidden_size=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        intermediate_size=4 * WIDTH,
        patch_size=PATCH,
        max_grid=max_grid,
        num_prefix_tokens=8,
    )


@pytest.fixture(scope="module", params=[32, 128], ids=["grid32", "grid128"])
def pair(request) -> tuple[RadioModel, RadioViT]:
    torch.manual_seed(0)
    ref = RadioModel._from_config(hf_config(request.param), attn_implementation="eager").eval()
    ref.make_preprocessor_external()  # both sides take the same, already normalised, pixels
    randomize(ref, seed=request.param)
    ours = RadioViT(our_config(request.param)).eval()
    ours.load_state_dict(hf_to_nvidia(ref.state_dict()), strict=True)
    return ref, ours


# 224² is 14×14 (smaller than both grids); 640×320 is 40×20 (larger than the 32 grid: upsampling).
@pytest.mark.parametrize(
    "size", [(512, 512), (256, 384), (640, 320), (224, 224)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_matches_transformers(pair, size) -> None:
    ref, ours = pair
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.no_grad():
        expected = ref(x).features
        got = ours(x)
        again = ours(x)  # served from the position-embedding cache
    assert got.shape == (2, (size[0] // PATCH) * (size[1] // PATCH), WIDTH)
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.equal(got, again)


def test_position_cache_follows_new_weights(pair) -> None:
    """Loading weights after a forward must not serve the old interpolated table."""
    ref, _ = pair
    ours = RadioViT(our_config(ref.embeddings.max_rows)).eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        ours(x)  # fills the cache from the random init
        ours.load_state_dict(hf_to_nvidia(ref.state_dict()))
        diff = (ours(x) - ref(x).features).abs().max().item()
    assert diff <= 1e-5


def test_checkpoint_names_load_into_transformers(tmp_path) -> None:
    """Our names under `radio_model.model.` are NVIDIA's as transformers' conversion mapping reads them."""
    torch.manual_seed(1)
    ours = RadioViT(our_config(32)).eval()
    randomize(ours, seed=1)
    save_file(
        {f"radio_model.model.{k}": v.contiguous() for k, v in ours.state_dict().items()},
        tmp_path / "model.safetensors",
    )
    (tmp_path / "config.json").write_text(json.dumps(hf_config(32).to_dict()))
    ref, info = RadioModel.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not info["unexpected_keys"]
    assert {k for k in info["missing_keys"] if "lambda1" not in k} <= {
        "summary_idxs",
        "input_conditioner.norm_mean",
        "input_conditioner.norm_std",
    }
    ref.eval().make_preprocessor_external()
    x = torch.randn(2, 3, 256, 384)
    with torch.no_grad():
        assert (ours(x) - ref(x).features).abs().max().item() <= 1e-5


# --- config reading -------------------------------------------------------------------------------------

NVIDIA_VISION_CONFIG = {
    "patch_size": 16,
    "max_resolution": 2048,
    "preferred_resolution": [512, 512],
    "args": {
        "model": "vit_huge_patch16_224",
        "teachers": [{"name": n, "use_summary": True} for n in ("clip", "siglip", "dino_v2", "sam")],
        "cls_token_per_teacher": True,
        "register_multiple": 8,
        "cpe_max_size": 2048,
    },
}


def real_shapes(
    prefix: str = "vision_model.radio_model.model.", prefix_rows: int = 8, grid: int = 128
) -> dict:
    shapes = {
        f"{prefix}patch_generator.embedder.weight": (1280, 768),
        f"{prefix}patch_generator.pos_embed": (1, grid * grid, 1280),
        f"{prefix}patch_generator.cls_token.token": (prefix_rows, 1280),
        "vision_model.radio_model.input_conditioner.norm_mean": (3, 1, 1),
        "language_model.backbone.layers.0.norm.weight": (5120,),
        "mlp1.0.weight": (5120,),
    }
    for i in range(32):
        shapes[f"{prefix}blocks.{i}.attn.qkv.weight"] = (3840, 1280)
        shapes[f"{prefix}blocks.{i}.attn.qkv.bias"] = (3840,)
        shapes[f"{prefix}blocks.{i}.attn.proj.bias"] = (1280,)
        shapes[f"{prefix}blocks.{i}.mlp.fc1.weight"] = (5120, 1280)
    return shapes


def test_from_checkpoint_real_layout() -> None:
    cfg = RadioConfig.from_checkpoint(NVIDIA_VISION_CONFIG, real_shapes())
    assert cfg == RadioConfig()  # 1280 wide, 32 deep, 16 heads, MLP 5120, patch 16, grid 128, 8 prefix rows
    assert cfg.num_cls_tokens == 4
    # The config alone (no tensors) says the same.
    assert RadioConfig.from_checkpoint(NVIDIA_VISION_CONFIG, {}) == RadioConfig()


def test_from_checkpoint_counts_come_from_shapes() -> None:
    """Prefix rows and grid as the tensors hold them, whatever the config's teachers/registers imply."""
    cfg = RadioConfig.from_checkpoint(NVIDIA_VISION_CONFIG, real_shapes(prefix_rows=10, grid=64))
    assert (cfg.num_prefix_tokens, cfg.max_grid) == (10, 64)
    bare = {"patch_size": 16, "args": {"model": "vit_huge_patch16_224"}}  # no teachers, no registers
    cfg = RadioConfig.from_checkpoint(bare, real_shapes(prefix_rows=8, grid=128))
    assert (cfg.num_prefix_tokens, cfg.max_grid, cfg.depth) == (8, 128, 32)


def test_from_checkpoint_transformers_spelling() -> None:
    ref = RadioModel(hf_config(32))
    shapes = {f"vision_model.{k}": tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = RadioConfig.from_checkpoint(hf_config(32).to_dict(), shapes)
    assert cfg == our_config(32)
    assert RadioConfig.from_checkpoint(hf_config(32).to_dict(), {}) == our_config(32)


@pytest.mark.parametrize("cfg", [RadioConfig(), our_config(32)], ids=["vit-h", "tiny"])
def test_to_checkpoint_dict_round_trip(cfg: RadioConfig) -> None:
    written = cfg.to_checkpoint_dict()
    assert written["args"]["cls_token_per_teacher"] and written["max_resolution"] == cfg.max_resolution
    assert RadioConfig.from_checkpoint(written, {}) == cfg
    assert RadioConfig.from_checkpoint(json.loads(json.dumps(written)), {}) == cfg
    if cfg == RadioConfig():
        assert (
            written["args"]["model"] == "vit_huge_patch16_224" and written["args"]["register_multiple"] == 8
        )


def test_to_checkpoint_dict_keeps_unknown_fields() -> None:
    source = {**NVIDIA_VISION_CONFIG, "version": "radio_v2.5-h", "adaptor_names": None}
    source["args"] = {**source["args"], "dtype": "bfloat16"}
    written = RadioConfig.from_checkpoint(source, real_shapes()).to_checkpoint_dict()
    assert written["version"] == "radio_v2.5-h" and written["args"]["dtype"] == "bfloat16"
    assert written["args"]["teachers"] == source["args"]["teachers"]


@pytest.mark.parametrize(
    ("config", "shapes", "message"),
    [
        (NVIDIA_VISION_CONFIG, {"m.patch_generator.pos_embed": (1, 1000, 1280)}, "not a square grid"),
        ({"args": {"model": "my_vit"}}, {"m.patch_generator.pos_embed": (1, 64, 32)}, "head count"),
        (NVIDIA_VISION_CONFIG, {"m.patch_generator.embedder.weight": (1024, 768)}, "width"),
        (
            {**NVIDIA_VISION_CONFIG, "args": {"model": "vit_huge_patch16_224", "model_norm": True}},
            {},
            "final norm",
        ),
        (
            NVIDIA_VISION_CONFIG,
            {"m.patch_generator.pos_embed": (1, 4, 1280), "m.blocks.1.mlp.fc1.weight": (5, 5)},
            "missing",
        ),
    ],
    ids=["non-square-grid", "no-heads", "width-contradiction", "final-norm", "missing-block"],
)
def test_from_checkpoint_refuses(config, shapes, message) -> None:
    with pytest.raises(CheckpointError, match=message):
        RadioConfig.from_checkpoint(config, shapes)
