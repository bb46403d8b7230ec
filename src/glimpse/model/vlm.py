"""Nemotron Nano 2 VL: RADIO eyes -> pixel shuffle -> `mlp1` projector -> embeddings written into the
`<image>` positions of the prompt -> NemotronH. Module names match the checkpoint
(`vision_model.radio_model.model.*`, `mlp1.*`, `language_model.*`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.config import NemotronHConfig, VLConfig, read_config_json
from glimpse.config_radio import RadioConfig
from glimpse.model.batch import CacheTensors, ForwardBatch
from glimpse.model.nemotron_h import NemotronHForCausalLM
from glimpse.model.projector import Projector
from glimpse.model.vision import VisionTower

# Checkpoint tensors the model knowingly does not use: pixels arrive normalised, the cls outputs are dropped.
_UNUSED = ("vision_model.radio_model.input_conditioner.", "vision_model.radio_model.summary_idxs")


class NemotronVLModel(nn.Module):
    def __init__(self, config: VLConfig, vision: RadioConfig) -> None:
        super().__init__()
        self.config = config
        self.language_model = NemotronHForCausalLM(config.llm)
        self.vision_model = VisionTower(vision, config.downsample_ratio)
        self.mlp1 = Projector.for_model(
            vision.hidden_size, config.projector_hidden_size, config.llm.hidden_size, config.downsample_ratio
        )

    @property
    def llm_config(self) -> NemotronHConfig:
        return self.config.llm

    @property
    def is_multimodal(self) -> bool:
        return True

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed(input_ids)

    def forward(
        self,
        batch: ForwardBatch,
        cache: CacheTensors,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.language_model(batch, cache, input_ids, inputs_embeds, logits_indices)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, 512, 512] normalised tiles -> [N, 256, hidden] LLM embeddings."""
        return self.vision_model.encode_tiles(pixel_values, self.mlp1)

    @torch.inference_mode()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """[T, 3, 512, 512] normalised frames -> [T, 16, 16, hidden] (the grid EVS compares)."""
        return self.vision_model.encode_frames(frames, self.mlp1)


def vl_name_map(name: str) -> str | None:
    if name.startswith(_UNUSED):
        return None
    if name.startswith("language_model.model."):
        return "language_model.backbone." + name[len("language_model.model.") :]
    return name


def load_vl_model(model_dir: Path, device: torch.device | str, dtype: torch.dtype) -> NemotronVLModel:
    from glimpse.loader import (
        check_supported_quantization,
        checkpoint_files,
        fp8_name_map,
        load_weights,
        read_weight_scales,
        tensor_shapes,
    )

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
