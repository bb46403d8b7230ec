"""NemotronH: a stack of pre-norm residual blocks (Mamba2 'M', attention '*', relu² MLP '-'),
a final RMSNorm and an untied lm_head. Parameter names match the checkpoint (`backbone.*`, `lm_head`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.config import NemotronHConfig
from glimpse.distributed.group import SINGLE, TPGroup
from glimpse.kernels.activations import relu_square_
from glimpse.kernels.norms import add_rms_norm, rms_norm
from glimpse.model.attention import Attention
from glimpse.model.batch import CacheTensors, ForwardBatch
from glimpse.model.mamba2 import Mamba2Mixer
from glimpse.model.parallel import Split, cols, linear_splits, rows, shard_config


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """down_proj(relu(up_proj(x))²): no gate."""

    def __init__(self, config: NemotronHConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp  # up_proj column-parallel, down_proj row-parallel
        self.total_width = config.intermediate_size
        width = config.intermediate_size // tp.size
        self.up_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: CacheTensors) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(relu_square_(self.up_proj(x))))

    def tp_splits(self) -> dict[str, Split]:
        r, width, bias = self.tp.rank, self.up_proj.out_features, self.up_proj.bias is not None
        return linear_splits("up_proj", rows(r * width, width, self.total_width), r, bias) | linear_splits(
            "down_proj", cols(r * width, width, self.total_width), r, bias
        )


class Block(nn.Module):
    def __init__(self, config: NemotronHConfig, kind: str, kind_index: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if kind == "mamba":
            self.mixer: nn.Module = Mamba2Mixer(config, kind_index, tp)
        elif kind == "attention":
            self.mixer = Attention(config, kind_index, tp)
        else:
            self.mixer = MLP(config, tp)

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
    def __init__(self, config: NemotronHConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = config.vocab_size
        # vocabulary-parallel: this rank embeds token ids vocab_start.. (model/parallel.py)
        self.vocab_start, local_vocab = tp.split(config.vocab_size)
        self.embeddings = nn.Embedding(local_vocab, config.hidden_size)
        counts = {"mamba": 0, "attention": 0, "mlp": 0}
        layers = []
        for kind in config.layer_kinds:
            layers.append(Block(config, kind, counts[kind], tp))
            counts[kind] += 1
        self.layers = nn.ModuleList(layers)
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_parallel:
            return self.embeddings(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.embeddings.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.embeddings.weight)
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))

    def tp_splits(self) -> dict[str, Split]:
        return {"embeddings.weight": rows(self.vocab_start, self.embeddings.num_embeddings, self.vocab_size)}


class NemotronHForCausalLM(nn.Module):
    def __init__(self, config: NemotronHConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config  # the whole model's; llm_config is this rank's share
        self.tp = tp
        self.backbone = Backbone(config, tp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size // tp.size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def llm_config(self) -> NemotronHConfig:
        """The geometry this rank holds (the whole model's without tensor parallelism): what the caches
        are sized by."""
        return shard_config(self.config, self.tp.size)

    @property
    def is_multimodal(self) -> bool:
        return False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed(input_ids)

    def tp_splits(self) -> dict[str, Split]:
        start, count = self.backbone.vocab_start, self.lm_head.out_features
        return {"lm_head.weight": rows(start, count, self.config.vocab_size)}

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
        return self.tp.all_gather_last(self.lm_head(hidden))
