"""Nemotron Nano 2 VL: RADIO eyes -> pixel shuffle -> `mlp1` projector -> embeddings written into the
`<image>` positions of the prompt -> NemotronH. Module names match the checkpoint
(`vision_model.radio_model.model.*`, `mlp1.*`, `language_model.*`)."""

from __future__ import annotations

import torch
from torch import nn

from glimpse.config import NemotronHConfig, VLConfig
from glimpse.config_radio import RadioConfig
from glimpse.distributed.group import SINGLE, TPGroup
from glimpse.model.batch import CacheTensors, ForwardBatch
from glimpse.model.nemotron_h import NemotronHForCausalLM
from glimpse.model.projector import Projector
from glimpse.model.vision import VisionTower


class NemotronVLModel(nn.Module):
    def __init__(self, config: VLConfig, vision: RadioConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.language_model = NemotronHForCausalLM(config.llm, tp)  # split across ranks; vision replicated
        self.vision_model = VisionTower(vision, config.downsample_ratio)
        self.mlp1 = Projector.for_model(
            vision.hidden_size, config.projector_hidden_size, config.llm.hidden_size, config.downsample_ratio
        )

    @property
    def llm_config(self) -> NemotronHConfig:
        return self.language_model.llm_config

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
