"""What the hardware allows, measured in the same run as the figures it judges.

decode step floor = bytes the step must move / measured read+write bandwidth:
  every weight but the embedding table, plus each running sequence's Mamba conv and SSM state read and
  written, plus each sequence's attention K/V read.
prefill floor = FLOPs / measured bf16 matrix rate:
  2 x non-embedding parameters x tokens (lm_head for every token) plus causal attention.
"""

from __future__ import annotations

import torch

from glimpse.bench.timing import time_eager
from glimpse.config import NemotronHConfig
from glimpse.engine.cache import kv_bytes_per_token, state_bytes_per_sequence


def measure_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = time_eager(lambda: dst.copy_(src), reps=10, device=device).seconds
    return 2 * nbytes / seconds


def measure_matmul_rate(device: torch.device, n: int | None = None) -> float:
    """FLOP/s of a large bf16 (CPU: float32) matrix product."""
    n = n or (8192 if device.type == "cuda" else 512)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    seconds = time_eager(lambda: a @ b, reps=10, device=device).seconds
    return 2 * n**3 / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter except the embedding table."""
    lm = getattr(model, "language_model", model)
    total = sum(p.numel() * p.element_size() for p in lm.parameters())
    emb = lm.backbone.embeddings.weight
    return total - emb.numel() * emb.element_size()


def non_embedding_params(model: torch.nn.Module) -> int:
    """Multiply-adds per token, as parameters: a quantised linear counts its logical in x out weights, not
    its packed bytes and scales."""
    lm = getattr(model, "language_model", model)
    total = 0
    for module in lm.modules():
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            total += module.in_features * module.out_features
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total - lm.backbone.embeddings.weight.numel()


def decode_step_bytes(
    model: torch.nn.Module, config: NemotronHConfig, batch: int, mean_context: float,
    dtype: torch.dtype, ssm_dtype: torch.dtype,
) -> float:  # fmt: skip
    state = state_bytes_per_sequence(config, dtype, ssm_dtype)
    kv = kv_bytes_per_token(config, dtype)
    return weight_bytes(model) + batch * (2 * state + mean_context * kv)


def prefill_flops(model: torch.nn.Module, config: NemotronHConfig, tokens: int) -> float:
    linear = 2 * non_embedding_params(model) * tokens
    # causal attention: QK^T and PV over half the square, per attention layer
    attention = (
        config.num_attention_layers * 2 * tokens * tokens * config.num_attention_heads * config.head_dim
    )
    return linear + attention
