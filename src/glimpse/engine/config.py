"""How an engine is configured: `EngineConfig` and its sub-configs, each setting declared once.

Every field carries its help and what it allows (glimpse.settings); `__post_init__` checks them, so a
config that exists is valid. `EngineConfig.from_kwargs(model, **kwargs)` takes the flat names of
`LLM(...)` (API.md), and the command line's engine flags are generated from the same fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from glimpse.settings import POSITIVE, Rule, check_settings, from_flat, setting, to_flat

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SSM_CACHE_DTYPES = ("float32", "bfloat16")
QUANTIZATION_METHODS = ("modelopt", "modelopt_fp4")  # vLLM's names for NVIDIA modelopt's FP8 and NVFP4


def _is_device(name: str) -> bool:
    if name == "auto":
        return True
    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


DEVICE = Rule("'auto' or a torch device such as 'cpu', 'cuda', 'cuda:1'", _is_device)


@dataclass(frozen=True)
class CacheConfig:
    """Memory for KV blocks, Mamba states and vision embeddings."""

    block_size: int = setting(16, help="tokens per KV-cache block", rule=POSITIVE)
    enable_prefix_caching: bool = setting(True, help="reuse the cache of prompt prefixes seen before")
    mamba_ssm_cache_dtype: str = setting(
        "float32", help="dtype of the Mamba SSM state cache", choices=SSM_CACHE_DTYPES
    )
    gpu_memory_utilization: float = setting(
        0.9,
        help="share of the GPU's memory the engine may use (the cache pools get what the model leaves)",
        rule=Rule("in (0, 1]", lambda v: 0 < v <= 1),
    )
    cache_memory_bytes: int | None = setting(
        None, help="CPU: bytes for the cache pools (default: enough for max_num_seqs full sequences)",
        rule=POSITIVE,
    )  # fmt: skip
    encoder_cache_bytes: int | None = setting(
        None, help="bytes of vision embeddings kept for reuse (default 2 GiB on GPU, 512 MiB on CPU)",
        rule=POSITIVE,
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class SchedulerConfig:
    """What runs in each step."""

    max_num_batched_tokens: int = setting(
        8192, help="tokens per forward step (prefill chunks)", rule=POSITIVE
    )
    max_num_seqs: int = setting(256, help="sequences running at once", rule=POSITIVE)
    async_scheduling: bool | None = setting(
        None, help="launch each decode step before the last one's tokens are read back, so host work "
        "(scheduling, stop checks, detokenising, streaming) overlaps the GPU (default: on with CUDA graphs)",
    )  # fmt: skip
    enforce_eager: bool = setting(False, help="no CUDA graphs for decode steps")
    warmup: bool = setting(
        True, help="on a GPU, run a few synthetic requests of the shapes a server meets before it is ready, "
        "so that no user's request waits for a kernel to compile",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class MediaConfig:
    """Media defaults of every request: video pruning, and which sources may be read."""

    video_pruning_rate: float = setting(
        0.0, help="EVS: share of video tokens pruned, per request unless it sets its own",
        rule=Rule("in [0, 1)", lambda v: 0 <= v < 1),
    )  # fmt: skip
    allowed_local_media_path: str | None = setting(
        None, help="local media files are allowed inside DIR only (Python API: None allows any; "
        "server: None allows none)", metavar="DIR",
    )  # fmt: skip
    allow_private_media_urls: bool = setting(
        True, help="allow media URLs on loopback, private and link-local addresses"
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class EngineConfig:
    """The model and how it runs."""

    model: str = setting(help="a local checkpoint directory, a hub id, or the built-in 'tiny' / 'tiny-vl'")
    tokenizer: str | None = setting(
        None, help="where the tokenizer comes from, as MODEL is given (default: MODEL's own)", metavar="MODEL"
    )
    revision: str | None = setting(
        None, help="the branch, tag or commit of a hub model to download (default: its main branch)"
    )
    download_dir: str | None = setting(
        None, help="where hub models are downloaded (default: the Hugging Face cache)", metavar="DIR"
    )
    chat_template: str | None = setting(
        None, help="the chat template, in place of the checkpoint's: a file, or the Jinja text itself "
        "(default: the checkpoint's)", metavar="TEMPLATE",
    )  # fmt: skip
    quantization: str | None = setting(
        None, help="the checkpoint's quantisation: modelopt (FP8) or modelopt_fp4 (NVFP4) (default: read "
        "from the checkpoint)", choices=QUANTIZATION_METHODS,
    )  # fmt: skip
    dtype: str = setting(
        "auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16",
        choices=("auto", *DTYPES),
    )  # fmt: skip
    device: str = setting(
        "auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N",
        rule=DEVICE,
    )  # fmt: skip
    max_model_len: int | None = setting(
        None, help="longest sequence, prompt and output (default: the model's, capped by memory)",
        rule=POSITIVE,
    )  # fmt: skip
    seed: int = setting(0, help="random seed: sampling without a seed of its own is reproducible from it")
    tensor_parallel_size: int = setting(
        1, help="split the model across this many GPUs of this host (or CPU processes), one process each",
        rule=POSITIVE,
    )  # fmt: skip
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    media: MediaConfig = field(default_factory=MediaConfig)

    def __post_init__(self) -> None:
        check_settings(self)

    @classmethod
    def from_kwargs(cls, model: str | os.PathLike[str], **kwargs: Any) -> EngineConfig:
        """From the flat names of `LLM(model, **kwargs)`, e.g. `max_num_seqs=8` -> `scheduler.max_num_seqs`;
        an unknown name is a TypeError naming it."""
        return from_flat(cls, model=str(model), **kwargs)

    def to_kwargs(self) -> dict[str, Any]:
        """The flat names and values (`from_kwargs(**cfg.to_kwargs())` rebuilds the config)."""
        return to_flat(self)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


__all__ = ["EngineConfig", "CacheConfig", "SchedulerConfig", "MediaConfig", "DTYPES", "SSM_CACHE_DTYPES"]
