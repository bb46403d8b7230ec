"""NemotronH: a stack of pre-norm residual blocks (Mamba2 'M', attention '*', relu² MLP '-'),
a final RMSNorm and an untied lm_head. Parameter names match the checkpoint (`backbone.*`, `lm_head`)."""

from __future__ import annotations

import torch
from torch import nn

from glimpse.config import NemotronHConfig
from glimpse.kernels.activations import relu_square_
from glimpse.kernels.norms import add_rms_norm, rms_norm
from glimpse.model.attention import Attention
from glimpse.model.batch import CacheTensors, ForwardBatch
from glimpse.model.mamba2 import Mamba2Mixer


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """down_proj(relu(up_proj(x))²): no gate."""

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: CacheTensors) -> torch.Tensor:
        return self.down_proj(relu_square_(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: NemotronHConfig, kind: str, kind_index: int) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if kind == "mamba":
            self.mixer: nn.Module = Mamba2Mixer(config, kind_index)
        elif kind == "attention":
            self.mixer = Attention(config, kind_index)
        else:
            self.mixer = MLP(config)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: CacheTensors) -> torch.Tensor:
        """x + mixer(norm(x)); the model itself runs `forward_fused` to share the norm with the residual add."""
        return self.forward_fused(x, self.norm(x), None, batch, cache)[0]

    def forward_fused(
        self,
        x: torch.Tensor,
        normed: torch.Tensor,  # self.norm(x), computed by the previous block (or the model for block 0)
        next_norm: RMSNorm | None,
        batch: ForwardBatch,
        cache: CacheTensors,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` with the residual add fused with the next block's norm (one kernel on CUDA):
        returns (x + mixer(normed), next_norm(that)), or (x + mixer(normed), None) for the last block."""
        out = self.mixer(normed, batch, cache)
        if next_norm is None:
            return x + out, None
        return add_rms_norm(x, out, next_norm.weight, next_norm.eps)


class Backbone(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        counts = {"mamba": 0, "attention": 0, "mlp": 0}
        layers = []
        for kind in config.layer_kinds:
            layers.append(Block(config, kind, counts[kind]))
            counts[kind] += 1
        self.layers = nn.ModuleList(layers)
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class NemotronHForCausalLM(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def llm_config(self) -> NemotronHConfig:
        return self.config

    @property
    def is_multimodal(self) -> bool:
        return False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(input_ids)

    def forward(
        self,
        batch: ForwardBatch,
        cache: CacheTensors,
        input_ids: torch.Tensor | None = None,  # [T]
        inputs_embeds: torch.Tensor | None = None,  # [T, hidden]: multimodal prompts come embedded
        logits_indices: torch.Tensor | None = None,  # which tokens need logits; default each seq's last
    ) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed(input_ids)
        # hidden = layer(hidden) for each layer, each block's residual add fused with the next one's norm
        layers = self.backbone.layers
        normed = layers[0].norm(hidden) if len(layers) else None
        for i, layer in enumerate(layers):
            next_norm = layers[i + 1].norm if i + 1 < len(layers) else None
            hidden, normed = layer.forward_fused(hidden, normed, next_norm, batch, cache)
        if logits_indices is None:
            logits_indices = batch.last_token_indices()
        hidden = self.backbone.norm_f(hidden[logits_indices])
        return self.lm_head(hidden)
