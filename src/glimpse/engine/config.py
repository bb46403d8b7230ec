"""How an engine is configured: one dataclass, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    mamba_ssm_cache_dtype: str = "float32"
    gpu_memory_utilization: float = 0.9
    cache_memory_bytes: int | None = None
    block_size: int = 16
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    # Launch each decode step before reading back the last one's tokens, so the host's work (scheduling,
    # stop checks, detokenising, streaming) overlaps the GPU's. None: on with CUDA graphs.
    async_scheduling: bool | None = None
    encoder_cache_bytes: int | None = (
        None  # vision embeddings kept for reuse (default 2 GiB GPU, 512 MiB CPU)
    )
    video_pruning_rate: float = 0.0
    allowed_local_media_path: str | None = None
    allow_private_media_urls: bool = True
    seed: int = 0

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {list(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]
