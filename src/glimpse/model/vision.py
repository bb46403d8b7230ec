"""The image path: RADIO -> [N, h, w, C] grid -> pixel shuffle -> `mlp1` projector -> LLM embeddings.

The VL model holds this tower as `vision_model` and the projector beside it as `mlp1`, so checkpoint names
come out as `vision_model.radio_model.model.*` and `mlp1.{0,1,3}.weight`. `VisionTower.forward` returns the
pixel-shuffled grid, so the VL model's own call reads `mlp1(vision_model(x))`; `encode_tiles` and
`encode_frames` run that whole chain in micro-batches to bound activation memory (a 12-tile document page
plus thumbnail, or a 128-frame video, would otherwise hold every tile's ViT activations at once).
"""

from __future__ import annotations

import torch
from torch import nn

from glimpse.config_radio import RadioConfig
from glimpse.model.projector import pixel_shuffle_v2
from glimpse.model.radio import RadioViT


class RadioHolder(nn.Module):
    """NVIDIA's `radio_model` level (RADIOModel wraps the timm ViT as `.model`); it adds no maths here.

    The checkpoint's `radio_model.input_conditioner.*` and `radio_model.summary_idxs` are not parameters:
    pixels arrive CLIP-normalised and the summary (cls) outputs are dropped.
    """

    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.model = RadioViT(config)


class VisionTower(nn.Module):
    """C-RADIO plus the pixel shuffle; the projector is passed in (it lives in the VL model as `mlp1`)."""

    def __init__(self, config: RadioConfig, downsample_ratio: float = 0.5, max_batch: int = 64) -> None:
        super().__init__()
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.config = config
        self.downsample_ratio = downsample_ratio
        self.max_batch = max_batch
        self.radio_model = RadioHolder(config)

    @property
    def vit(self) -> RadioViT:
        return self.radio_model.model

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) the LLM sees for an image of this many pixels: (16, 16) for 512²."""
        p, r = self.config.patch_size, round(1 / self.downsample_ratio)
        return height // p // r, width // p // r

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> RADIO patch features as a grid [N, H/p, W/p, width]."""
        p = self.config.patch_size
        tokens = self.vit(pixel_values)
        return tokens.reshape(tokens.shape[0], pixel_values.shape[-2] // p, pixel_values.shape[-1] // p, -1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> pixel-shuffled grid [N, H/(p·r), W/(p·r), width·r²], the input of `mlp1`."""
        return pixel_shuffle_v2(self.features(pixel_values), self.downsample_ratio)

    def encode_tiles(
        self, pixel_values: torch.Tensor, projector: nn.Module, max_batch: int | None = None
    ) -> torch.Tensor:
        """[N, 3, 512, 512] tiles -> [N, 256, llm_hidden] embeddings, in LLM-token order per tile."""
        return self._encode(pixel_values, projector, max_batch).flatten(1, 2)

    def encode_frames(
        self, frames: torch.Tensor, projector: nn.Module, max_batch: int | None = None
    ) -> torch.Tensor:
        """[T, 3, 512, 512] video frames -> [T, 16, 16, llm_hidden], the grid EVS scores frame against frame."""
        return self._encode(frames, projector, max_batch)

    def _encode(
        self, pixel_values: torch.Tensor, projector: nn.Module, max_batch: int | None
    ) -> torch.Tensor:
        """Run tower + projector micro-batch by micro-batch into one preallocated output.

        Each micro-batch is moved to the tower's device and dtype on its own, so a large batch of pixels can
        wait in (pinned) host memory.
        """
        step = max_batch or self.max_batch
        if step < 1:
            raise ValueError(f"max_batch must be at least 1, got {step}")
        n, _, height, width = pixel_values.shape
        weight = self.vit.patch_generator.embedder.weight
        proj_dtype = next(projector.parameters()).dtype
        rows, cols = self.grid_size(height, width)
        out: torch.Tensor | None = None
        for start in range(0, n, step):
            chunk = pixel_values[start : start + step].to(
                device=weight.device, dtype=weight.dtype, non_blocking=True
            )
            embeddings = projector(self(chunk).to(proj_dtype))
            if out is None:
                out = embeddings.new_empty((n, rows, cols, embeddings.shape[-1]))
            out[start : start + chunk.shape[0]] = embeddings
        if out is None:  # no images: keep the shape contract
            out = torch.empty(
                (0, rows, cols, _output_size(projector)), dtype=proj_dtype, device=weight.device
            )
        return out


def _output_size(projector: nn.Module) -> int:
    last = [m for m in projector.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features
