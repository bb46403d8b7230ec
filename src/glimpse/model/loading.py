"""Which model a checkpoint holds, built and loaded: text-only NemotronH or the VL model."""

from __future__ import annotations

from pathlib import Path

import torch

from glimpse.config import is_vl_config, read_config_json


def load_model(model_dir: Path, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    if is_vl_config(read_config_json(model_dir)):
        from glimpse.model.vlm import load_vl_model

        return load_vl_model(model_dir, device, dtype)
    from glimpse.loader import load_language_model

    return load_language_model(model_dir, device, dtype)
