"""Helpers that build transformers' NemotronH (the numerical reference) and copy it into Glimpse."""

from __future__ import annotations

import math

import torch

from glimpse.config import NemotronHConfig
from glimpse.engine.cache import allocate_cache_tensors
from glimpse.model.batch import ForwardBatch
from glimpse.model.nemotron_h import NemotronHForCausalLM

CONFIGS = {
    # pattern, attention heads / kv heads, mamba heads / groups, chunk size: all differ between configs
    "small": dict(hybrid_override_pattern="M-M*-M*", num_attention_heads=4, num_key_value_heads=2,
                  mamba_num_heads=8, mamba_head_dim=4, n_groups=2, chunk_size=5),
    "one-group": dict(hybrid_override_pattern="*M-MM-*M", num_attention_heads=2, num_key_value_heads=1,
                      mamba_num_heads=4, mamba_head_dim=8, n_groups=1, chunk_size=7),
    "many-groups": dict(hybrid_override_pattern="MM*-M*M-", num_attention_heads=6, num_key_value_heads=3,
                        mamba_num_heads=16, mamba_head_dim=4, n_groups=4, chunk_size=16, ssm_state_size=12),
}  # fmt: skip


def hf_config_dict(name: str) -> dict:
    base = dict(vocab_size=512, hidden_size=48, head_dim=8, intermediate_size=96, ssm_state_size=8,
                conv_kernel=4, layer_norm_epsilon=1e-5, time_step_limit=(0.0, math.inf), eos_token_id=5)  # fmt: skip
    return base | CONFIGS[name]


def build_reference(name: str, seed: int = 0):
    """transformers' model with random weights large enough to give decisive logits."""
    from transformers import NemotronHConfig as HFConfig
    from transformers import NemotronHForCausalLM as HFModel

    torch.manual_seed(seed)
    model = HFModel(HFConfig(**hf_config_dict(name))).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("A_log", "dt_bias", ".D")) or "norm" in pname:
                continue
            std = 1.0 if "embeddings" in pname else 0.6 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    # the reference clamps dt at time_step_min on its prompt path only; the model does not (MODEL_SPEC §1)
    for m in model.modules():
        if hasattr(m, "time_step_limit"):
            m.time_step_limit = (0.0, math.inf)
    return model


def ours_from_reference(reference) -> NemotronHForCausalLM:
    config = NemotronHConfig.from_dict(reference.config.to_dict())
    model = NemotronHForCausalLM(config).eval()
    state = {k.replace("model.", "backbone.", 1): v for k, v in reference.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def new_cache(config: NemotronHConfig, slots: int = 8, blocks: int = 64, block_size: int = 4):
    cache = allocate_cache_tensors(config, slots, blocks, block_size, torch.float32, torch.float32, "cpu")
    cache.conv_state.zero_()
    cache.ssm_state.zero_()
    return cache


def run_chunks(
    model, cache, ids: list[int], chunks: list[int], slot: int, blocks: torch.Tensor
) -> torch.Tensor:
    """Logits of every position, computing the prompt in the given chunk sizes from one state slot."""
    out, ctx = [], 0
    for n in chunks:
        batch = ForwardBatch([n], [ctx], torch.tensor([slot]), blocks.view(1, -1))
        x = torch.tensor(ids[ctx : ctx + n])
        out.append(model(batch, cache, input_ids=x, logits_indices=torch.arange(n)))
        ctx += n
    return torch.cat(out)
