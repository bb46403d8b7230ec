"""C-RADIO vision encoder (ViT-H/16 with cropped position embeddings), written for serving.

Maths (MODEL_SPEC.md §2), checked against `transformers.RadioModel` in tests/model/test_radio_parity.py:
patches cut in (channel, row, col) order and embedded by a bias-free Linear; the pos_embed grid (max_grid²)
bilinearly resized (align_corners=False, no antialias, in float32) to max(h, w)² and cropped to its
top-left h×w window; cls + register tokens prepended; pre-LN blocks with fused qkv, exact GELU; no final
norm; the prefix tokens dropped from the output. NVlabs RADIO interpolated with align_corners=True until
its commit cb07f55 (2025-06-28, "Add support for videos in CPE") and with False since; transformers and
vLLM use False, and so do we.

Its shape comes from `RadioConfig` (glimpse/config_radio.py), read from the checkpoint there.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.config_radio import RadioConfig


class ClsToken(nn.Module):
    """Holds the prefix rows (cls + registers) so the parameter is named `cls_token.token` as NVIDIA's."""

    def __init__(self, num_tokens: int, width: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.empty(num_tokens, width))


class PatchGenerator(nn.Module):
    """Patch embedding + cropped position embedding + prefix tokens (NVIDIA's `patch_generator`)."""

    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.max_grid = config.max_grid
        self.embedder = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        self.pos_embed = nn.Parameter(torch.empty(1, config.max_grid * config.max_grid, config.hidden_size))
        self.cls_token = ClsToken(config.num_prefix_tokens, config.hidden_size)
        # (h, w, dtype, device, storage, version) -> [1, h*w, width]; serving sees one or two grid sizes.
        self._pos_cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def position_embedding(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """[1, h*w, width]: the grid resized to max(h, w)² then its top-left h×w window, as NVIDIA/HF do."""
        pos = self.pos_embed
        cacheable = not (torch.is_grad_enabled() and pos.requires_grad)
        # Keyed on the storage and its version so loading new weights (copy_ bumps _version) or moving
        # the module to another device never serves a stale table.
        key = (h, w, dtype, pos.device, pos.data_ptr(), pos._version)
        if cacheable and (hit := self._pos_cache.get(key)) is not None:
            return hit
        side = max(h, w)
        grid = pos.reshape(1, self.max_grid, self.max_grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=False)
        out = grid.to(dtype)[:, :, :h, :w].flatten(2).transpose(1, 2).contiguous()
        if cacheable:
            if len(self._pos_cache) >= 8:
                self._pos_cache.clear()
            self._pos_cache[key] = out
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n, c, height, width = pixel_values.shape
        p = self.patch_size
        h, w = height // p, width // p
        # Each patch flattened as (channel, row, col), patches in row-major order over the grid.
        patches = (
            pixel_values.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, c * p * p)
        )
        x = self.embedder(patches)
        x = x + self.position_embedding(h, w, x.dtype)
        prefix = self.cls_token.token.to(x.dtype).unsqueeze(0).expand(n, -1, -1)
        return torch.cat([prefix, x], dim=1)


# How the GPU runs the ViT's attention. "native" (default): SDPA at head_dim 80 (cuDNN's kernel on an
# H100). "pad": zero-pad q, k, v to the next multiple of 64 (the softmax scale stays head_dim ** -0.5,
# padded dims add 0 to every score, padded output columns are dropped). Measured on an H100, 64 tiles
# of 512²: native 203 ms, padded 237 ms (the pad copies and 60% more attention work cost more than the
# 128-wide kernel saves). Env GLIMPSE_VIT_ATTENTION overrides.
VIT_ATTENTION = os.environ.get("GLIMPSE_VIT_ATTENTION", "native")
# fc1 + GELU as one cuBLASLt call on CUDA in 16-bit dtypes (the tanh form of GELU, which the epilogue
# computes; it differs from the exact erf GELU by < 5e-4, under one bf16 ulp of the activations). The
# CPU and fp32 paths keep the exact GELU the parity tests compare. Env GLIMPSE_VIT_GELU_EPILOGUE=0: off.
GELU_EPILOGUE = os.environ.get("GLIMPSE_VIT_GELU_EPILOGUE", "1") != "0"


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection (timm layout: q | k | v)."""

    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.num_heads, self.head_dim)
        padded = -(-self.head_dim // 64) * 64
        if x.is_cuda and VIT_ATTENTION == "pad" and padded != self.head_dim:
            qkv = F.pad(qkv, (0, padded - self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        out = out[..., : self.head_dim]
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.fc1.weight, self.fc1.bias
        if GELU_EPILOGUE and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and b is not None:
            h = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], h.shape[-1]))
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's nn.GELU


class Block(nn.Module):
    """Pre-LN transformer block; C-RADIO has no layer scale and no drop path at inference."""

    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RadioViT(nn.Module):
    """The C-RADIO ViT; parameter names match the checkpoint under `vision_model.radio_model.model.`."""

    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_generator = PatchGenerator(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Random weights for tiny checkpoints and benchmarks (speed does not depend on the values)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.patch_generator.pos_embed, std=std)
        nn.init.trunc_normal_(self.patch_generator.cls_token.token, std=std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] CLIP-normalised pixels -> [N, (H/p)·(W/p), width] patch features (prefix dropped)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"expected pixels [N, {self.config.num_channels}, H, W], got {tuple(pixel_values.shape)}"
            )
        p = self.config.patch_size
        if pixel_values.shape[-2] % p or pixel_values.shape[-1] % p:
            raise ValueError(
                f"image size {tuple(pixel_values.shape[-2:])} is not a multiple of the patch size {p}"
            )
        x = self.patch_generator(pixel_values)
        for block in self.blocks:
            x = block(x)
        return x[:, self.config.num_prefix_tokens :]
