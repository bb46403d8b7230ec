"""How much memory the caches get, and how it splits into Mamba state slots and attention KV blocks.

On a GPU the budget is what `gpu_memory_utilization` leaves after the weights, everyone else on the
card, and the activation peak of the largest step (measured by running one); on the CPU it is set or
sized for a few full-length sequences.
"""

from __future__ import annotations

import logging

import torch

from glimpse.config import NemotronHConfig
from glimpse.engine.cache import allocate_cache_tensors, kv_bytes_per_token, state_bytes_per_sequence
from glimpse.engine.config import EngineConfig
from glimpse.engine.prefix_cache import PrefixCache
from glimpse.model.batch import ForwardBatch

log = logging.getLogger(__name__)


def plan_memory(
    config: NemotronHConfig, cfg: EngineConfig, budget: int, dtype: torch.dtype, ssm_dtype: torch.dtype
) -> tuple[int, int, int]:
    """Split a byte budget into state slots and KV blocks: KV for at least one full-length sequence first,
    then a slot per allowed sequence while memory lasts, the rest to KV. Returns (slots, blocks, max_len)."""
    per_seq = state_bytes_per_sequence(config, dtype, ssm_dtype)
    per_block = max(1, kv_bytes_per_token(config, dtype) * cfg.cache.block_size)
    max_len = cfg.max_model_len or config.max_position_embeddings
    kv_floor = -(-max_len // cfg.cache.block_size) * per_block
    if kv_floor + per_seq > budget:  # cap the context at what memory holds
        fit = max(cfg.cache.block_size, (budget - per_seq) // per_block * cfg.cache.block_size)
        if cfg.max_model_len:
            raise ValueError(
                f"max_model_len={cfg.max_model_len} needs {kv_floor + per_seq} bytes of cache, only {budget} "
                f"are available; lower max_model_len or give more memory"
            )
        log.warning("max_model_len capped from %d to %d by cache memory", max_len, fit)
        max_len = fit
        kv_floor = -(-max_len // cfg.cache.block_size) * per_block
    # With prefix caching a few extra slots hold Mamba snapshots (running sequences take them back first).
    extra = max(2, cfg.scheduler.max_num_seqs // 8) if cfg.cache.enable_prefix_caching else 0
    slots = int(max(1, min(cfg.scheduler.max_num_seqs + extra, (budget - kv_floor) // per_seq)))
    blocks = int((budget - slots * per_seq) // per_block)
    return slots, blocks, max_len


def cache_budget(
    model: torch.nn.Module,
    cfg: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    ssm_dtype: torch.dtype,
) -> int:
    """Bytes for the state slots and KV blocks together."""
    config: NemotronHConfig = model.llm_config
    if device.type == "cuda":
        peak = profile_activation_bytes(model, cfg, device, dtype, ssm_dtype)
        free, total = torch.cuda.mem_get_info(device)
        used = total - free  # weights, the CUDA context, and anyone else on the card
        budget = int(total * cfg.cache.gpu_memory_utilization - used - peak)
        log.info("GPU memory: %.1f GiB in use, %.1f GiB peak activations, %.1f GiB for caches",
                 used / 2**30, peak / 2**30, budget / 2**30)  # fmt: skip
        if budget <= 0:
            raise ValueError(
                f"no GPU memory is left for the caches (total {total / 2**30:.1f} GiB, in use "
                f"{used / 2**30:.1f} GiB, activations {peak / 2**30:.1f} GiB); raise gpu_memory_utilization "
                f"or lower max_num_batched_tokens"
            )
        return budget
    if cfg.cache.cache_memory_bytes:
        return int(cfg.cache.cache_memory_bytes)
    # CPU default: a slot per allowed sequence and KV for a few full-length sequences, at most 2 GiB.
    max_len = cfg.max_model_len or config.max_position_embeddings
    want = (cfg.scheduler.max_num_seqs + 2 + cfg.scheduler.max_num_seqs // 8) * state_bytes_per_sequence(
        config, dtype, ssm_dtype
    )
    want += 4 * max_len * kv_bytes_per_token(config, dtype)
    return int(min(want, 2 << 30))


@torch.inference_mode()
def profile_activation_bytes(
    model: torch.nn.Module,
    cfg: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    ssm_dtype: torch.dtype,
) -> int:
    """Peak memory a full step needs beside the weights: run one forward pass of a full token budget
    (and, for a VL model, one micro-batch of tiles through the vision encoder) and measure it."""
    config: NemotronHConfig = model.llm_config
    n = cfg.scheduler.max_num_batched_tokens
    bs = cfg.cache.block_size
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    scratch = allocate_cache_tensors(config, 1, -(-n // bs), bs, dtype, ssm_dtype, device)
    scratch.conv_state.zero_()
    scratch.ssm_state.zero_()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(0, config.vocab_size, (n,), device=device)
    table = torch.arange(-(-n // bs), device=device).view(1, -1)
    batch = ForwardBatch([n], [0], torch.tensor([0], device=device), table)
    rows = torch.arange(n - min(n, cfg.scheduler.max_num_seqs), n, device=device)
    model(batch, scratch, input_ids=ids, logits_indices=rows)
    peak = torch.cuda.max_memory_allocated(device) - base
    if model.is_multimodal:
        tiles = model.vision_model.max_batch
        size = model.config.force_image_size
        torch.cuda.reset_peak_memory_stats(device)
        model.encode_images(torch.randn(tiles, 3, size, size, device=device))
        peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
    del scratch, ids, batch
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return int(peak * 1.1) + (256 << 20)  # headroom for the sampler and fragmentation


def prefix_cache_bytes(
    prefix_cache: PrefixCache | None, config: NemotronHConfig, block_size: int, dtype: torch.dtype,
    ssm_dtype: torch.dtype,
) -> int:  # fmt: skip
    """Bytes the prefix cache keeps: cached KV blocks plus Mamba state snapshots."""
    if prefix_cache is None:
        return 0
    block = kv_bytes_per_token(config, dtype) * block_size
    state = state_bytes_per_sequence(config, dtype, ssm_dtype)
    return len(prefix_cache.block_by_hash) * block + len(prefix_cache.snapshots) * state
