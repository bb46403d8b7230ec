"""Which model a name means and which model a checkpoint holds: the directory found (built-in models made
on first use), then text-only NemotronH or the VL model built on the meta device and loaded."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from glimpse.config import NemotronHConfig, VLConfig, is_vl_config, read_config_json
from glimpse.config_radio import RadioConfig
from glimpse.loader import (
    check_supported_quantization,
    checkpoint_files,
    find_checkpoint,
    fp8_name_map,
    llm_name_map,
    load_weights,
    read_weight_scales,
    tensor_shapes,
    vl_name_map,
)
from glimpse.model.nemotron_h import NemotronHForCausalLM
from glimpse.model.tiny import BUILTIN_MODELS, ensure_builtin
from glimpse.model.vlm import NemotronVLModel


def resolve_model_path(
    model: str | os.PathLike, *, revision: str | None = None, download_dir: str | None = None
) -> Path:
    """A local directory, a built-in name (`tiny`, `tiny-vl`: made on first use under $GLIMPSE_CACHE),
    or a hub id (downloaded when online, at `revision` into `download_dir` when given)."""
    builtin = dict.fromkeys(BUILTIN_MODELS, ensure_builtin)
    return find_checkpoint(model, builtin, revision=revision, download_dir=download_dir)


def load_model(model_dir: Path, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    if is_vl_config(read_config_json(model_dir)):
        return load_vl_model(model_dir, device, dtype)
    return load_language_model(model_dir, device, dtype)


def load_language_model(
    model_dir: Path, device: torch.device | str, dtype: torch.dtype
) -> NemotronHForCausalLM:
    """The text-only NemotronH checkpoint (`NemotronHForCausalLM`)."""
    quant = check_supported_quantization(model_dir)
    config = NemotronHConfig.from_dict(read_config_json(model_dir))
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    files = checkpoint_files(model_dir)
    names, scales = llm_name_map(), None
    if quant == "FP8":
        names, scales = fp8_name_map(names), read_weight_scales(files)
    load_weights(model, files, names, device, dtype, scales)
    model.tie_weights()
    return model.eval()


def load_vl_model(model_dir: Path, device: torch.device | str, dtype: torch.dtype) -> NemotronVLModel:
    """The VL checkpoint (`NemotronH_Nano_VL_V2`); the ViT's shape is read with its tensors' shapes."""
    quant = check_supported_quantization(model_dir)
    config = VLConfig.from_dict(read_config_json(model_dir))
    files = checkpoint_files(model_dir)
    vision = RadioConfig.from_checkpoint(config.vision_config, tensor_shapes(files))
    with torch.device("meta"):
        model = NemotronVLModel(config, vision)
    names, scales = vl_name_map, None
    if quant == "FP8":
        names, scales = fp8_name_map(vl_name_map), read_weight_scales(files)
    load_weights(model, files, names, device, dtype, scales)
    model.language_model.tie_weights()
    return model.eval()
