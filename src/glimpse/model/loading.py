"""Which model a name means and which model a checkpoint holds: the directory found (built-in models made
on first use), then text-only NemotronH or the VL model built on the meta device and loaded."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from glimpse.config import NemotronHConfig, VLConfig, is_vl_config, read_config_json
from glimpse.config_radio import RadioConfig
from glimpse.distributed.group import SINGLE, TPGroup
from glimpse.errors import CheckpointError
from glimpse.loader import (
    checkpoint_files,
    find_checkpoint,
    llm_name_map,
    load_weights,
    tensor_shapes,
    vl_name_map,
    weight_memory_bytes,
)
from glimpse.model.nemotron_h import NemotronHForCausalLM
from glimpse.model.parallel import model_splits, tp_refusal
from glimpse.model.quant_linear import (
    check_group_size,
    dequantize_weight,
    quantized_linear_names,
    replace_quantized_linears,
    weight_precision,
)
from glimpse.model.tiny import BUILTIN_MODELS, ensure_builtin
from glimpse.model.vlm import NemotronVLModel
from glimpse.quantization import QuantConfig, read_quant_config, resolve_quantization

log = logging.getLogger(__name__)


def resolve_model_path(
    model: str | os.PathLike, *, revision: str | None = None, download_dir: str | None = None
) -> Path:
    """A local directory, a built-in name (`tiny`, `tiny-vl`: made on first use under $GLIMPSE_CACHE),
    or a hub id (downloaded when online, at `revision` into `download_dir` when given)."""
    builtin = dict.fromkeys(BUILTIN_MODELS, ensure_builtin)
    return find_checkpoint(model, builtin, revision=revision, download_dir=download_dir)


def load_model(
    model_dir: Path,
    device: torch.device | str,
    dtype: torch.dtype,
    quantization: str | None = None,
    *,
    keep_packed: bool | None = None,
    tp: TPGroup = SINGLE,
) -> torch.nn.Module:
    """The checkpoint's model on `device`, its full-precision tensors in `dtype`.

    `quantization` (`modelopt` = FP8, `modelopt_fp4` = NVFP4, None = whatever the checkpoint holds) must
    agree with the checkpoint. Quantised layers keep their packed weights (`keep_packed`; default: on
    CUDA) or are dequantised to `dtype` as they load (default on the CPU, which has no FP8/FP4 matmul).
    With tensor parallelism (`tp`), this rank's share of the language model only is read."""
    if is_vl_config(read_config_json(model_dir)):
        return load_vl_model(model_dir, device, dtype, quantization, keep_packed=keep_packed, tp=tp)
    return load_language_model(model_dir, device, dtype, quantization, keep_packed=keep_packed, tp=tp)


def check_tensor_parallel_size(model_dir: Path, size: int) -> None:
    """A ValueError saying why, when the checkpoint's language model cannot split `size` ways."""
    d = read_config_json(model_dir)
    _refuse(VLConfig.from_dict(d).llm if is_vl_config(d) else NemotronHConfig.from_dict(d), size)


def load_language_model(
    model_dir: Path,
    device: torch.device | str,
    dtype: torch.dtype,
    quantization: str | None = None,
    *,
    keep_packed: bool | None = None,
    tp: TPGroup = SINGLE,
) -> NemotronHForCausalLM:
    """The text-only NemotronH checkpoint (`NemotronHForCausalLM`)."""
    quant = resolve_quantization(quantization, read_quant_config(model_dir))
    config = NemotronHConfig.from_dict(read_config_json(model_dir))
    _refuse(config, tp.size)
    with torch.device("meta"):
        model = NemotronHForCausalLM(config, tp)
    _load(model, checkpoint_files(model_dir), llm_name_map(), device, dtype, quant, keep_packed, tp)
    model.tie_weights()
    return model.eval()


def load_vl_model(
    model_dir: Path,
    device: torch.device | str,
    dtype: torch.dtype,
    quantization: str | None = None,
    *,
    keep_packed: bool | None = None,
    tp: TPGroup = SINGLE,
) -> NemotronVLModel:
    """The VL checkpoint (`NemotronH_Nano_VL_V2`); the ViT's shape is read with its tensors' shapes."""
    quant = resolve_quantization(quantization, read_quant_config(model_dir))
    config = VLConfig.from_dict(read_config_json(model_dir))
    _refuse(config.llm, tp.size)
    files = checkpoint_files(model_dir)
    vision = RadioConfig.from_checkpoint(config.vision_config, tensor_shapes(files))
    with torch.device("meta"):
        model = NemotronVLModel(config, vision, tp)
    _load(model, files, vl_name_map, device, dtype, quant, keep_packed, tp)
    model.language_model.tie_weights()
    return model.eval()


def _refuse(config: NemotronHConfig, size: int) -> None:
    """A ValueError saying why, when `config`'s language model cannot split `size` ways."""
    why = tp_refusal(config, size)
    if why is not None:
        raise ValueError(why)


def _load(
    model: torch.nn.Module,
    files: list[Path],
    map_name: Callable[[str], str | None],
    device: torch.device | str,
    dtype: torch.dtype,
    quant: QuantConfig | None,
    keep_packed: bool | None,
    tp: TPGroup = SINGLE,
) -> None:
    """Fill the meta-device `model`; with a quantised checkpoint, first swap in the quantised layers (when
    kept packed) so their packed tensors load straight into them."""
    packed = keep_packed if keep_packed is not None else torch.device(device).type == "cuda"
    if quant is not None:
        check_group_size(quant)
        if quant.kv_cache_algo:
            log.info("%s KV-cache scales not used: the KV cache stays in %s", quant.kv_cache_algo, dtype)
        if packed:
            replace_quantized_linears(model, quant)
    splits = model_splits(model) if tp.is_parallel else None  # this rank reads its share only
    dequantized = load_weights(
        model, files, map_name, device, dtype, dequantize_weight if quant else None, splits
    )
    if quant is not None and not packed:  # the packed path checks this as the tensors load
        plain = sorted(n for n in quantized_linear_names(model, quant) if n + ".weight" not in dequantized)
        if plain:
            raise CheckpointError(
                f"the checkpoint says its linear layers are {quant.algo}, but these weights are not quantised: "
                f"{plain[:5]} (the exclusion list and the tensors disagree)"
            )
    precision = weight_precision(model)
    if quant is not None and precision != quant.algo:
        precision = f"{quant.algo} weights dequantised to {precision}"
    else:
        precision += " weights"
    size = weight_memory_bytes(model)
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**27 else f"{size / 2**20:.1f} MiB"
    log.info("loaded %s: %s on %s", precision, shown, device)
