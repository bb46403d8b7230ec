"""How the language model splits across a tensor-parallel group (docs/ARCHITECTURE.md, Tensor parallelism).

Rank r of t holds a contiguous share of every split dimension:
- attention: query heads r·H/t..; KV heads r·KV/t.. (or, with fewer KV heads than ranks, the one its
  query heads read, replicated); o_proj row-parallel (one all-reduce);
- Mamba2: heads r·H/t.. and groups r·G/t..: in_proj split per component (z | x | B | C | dt), conv1d as
  (x | B | C), A_log / D / dt_bias by head, the gated norm's weight by head (each rank normalises its own
  groups: no collective); out_proj row-parallel (one all-reduce);
- MLP: up_proj column-parallel, down_proj row-parallel (one all-reduce);
- embeddings and lm_head: vocabulary-parallel (embedding: one all-reduce; logits: one all-gather).
The vision tower and projector are replicated. A `Split` tells the loader which slice of a checkpoint
tensor this rank reads; for quantised tensors it is given in the full-precision weight's units and the
loader scales it to the packed tensor (it refuses a slice that would cut an NVFP4 scale group).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from glimpse.config import NemotronHConfig
from glimpse.loader import Split


def tp_refusal(config: NemotronHConfig, size: int) -> str | None:
    """Why the language model cannot split `size` ways, or None when it can."""
    if size < 1:
        return f"tensor_parallel_size must be at least 1, got {size}"
    rules = [
        ("num_attention_heads", config.num_attention_heads),
        ("mamba_num_heads", config.mamba_num_heads),
        ("n_groups", config.n_groups),
        ("intermediate_size", config.intermediate_size),
        ("vocab_size", config.vocab_size),
    ]
    bad = [f"{name} ({n}) is not divisible by {size}" for name, n in rules if n % size]
    kv = config.num_key_value_heads
    if kv % size and size % kv:
        bad.append(f"num_key_value_heads ({kv}) neither divides by {size} nor divides it")
    if not bad:
        return None
    return f"tensor_parallel_size={size} does not fit this model: " + "; ".join(bad)


def shard_config(config: NemotronHConfig, size: int) -> NemotronHConfig:
    """The geometry one rank holds (heads, groups, MLP width; vocabulary and hidden size stay whole):
    what its caches are sized by."""
    if size == 1:
        return config
    return replace(
        config,
        num_attention_heads=config.num_attention_heads // size,
        num_key_value_heads=max(1, config.num_key_value_heads // size),
        intermediate_size=config.intermediate_size // size,
        mamba_num_heads=config.mamba_num_heads // size,
        n_groups=config.n_groups // size,
    )


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """(first KV head, count) rank `rank` holds: a share, or the one head its query heads read."""
    if num_kv_heads >= size:
        per = num_kv_heads // size
        return rank * per, per
    return rank // (size // num_kv_heads), 1


def rows(start: int, count: int, full: int) -> Split:
    """A column-parallel weight's share: output rows start..start+count."""
    return Split(0, ((start, count),), full)


def cols(start: int, count: int, full: int) -> Split:
    """A row-parallel weight's share: input columns start..start+count."""
    return Split(1, ((start, count),), full)


def linear_splits(name: str, split: Split, rank: int, bias: bool) -> dict[str, Split]:
    """The Splits of linear layer `name`'s tensors: the weight and its NVFP4 scales (per-tensor scales
    stay whole), and a column-parallel bias alike; a row-parallel bias is whole on rank 0, zeros elsewhere."""
    out = {f"{name}.weight": split, f"{name}.weight_scale": split}
    if bias and split.dim == 0:
        out[f"{name}.bias"] = Split(0, split.pieces, split.full)
    elif bias and rank > 0:
        out[f"{name}.bias"] = Split(0, (), 0, zero=True)
    return out


def model_splits(model: nn.Module) -> dict[str, Split]:
    """Every split tensor of `model` by its name in `model`: what each module's `tp_splits()` says."""
    out: dict[str, Split] = {}
    for owner, module in model.named_modules():
        splits = getattr(module, "tp_splits", None)
        if splits is not None:
            out.update({f"{owner}.{name}" if owner else name: s for name, s in splits().items()})
    return out
