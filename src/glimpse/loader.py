"""Checkpoints -> modules: find the files, map the names, load shard by shard onto the target device.

The model is built on the meta device (no memory), then each tensor is read from its shard straight to
the target device and dtype and put in place, so peak host memory is about one tensor, not the model.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from glimpse.errors import CheckpointError

log = logging.getLogger(__name__)

# Parameters kept in fp32 whatever the model dtype: tiny, and the SSM's decay rates are precision-critical.
FP32_SUFFIXES = (".A_log", ".D", ".dt_bias")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]


def find_checkpoint(
    model: str | os.PathLike,
    builtin_models: Mapping[str, Callable[[str], Path]] | None = None,
    *,
    revision: str | None = None,
    download_dir: str | None = None,
) -> Path:
    """A local directory, a name in `builtin_models` (whose maker returns its directory), or a hub id
    (downloaded when online, at `revision` into `download_dir` when given), in that order."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    builtin_models = builtin_models or {}
    if name in builtin_models:
        return builtin_models[name](name)
    if name.count("/") != 1 or name.startswith((".", "/")):
        also = f", a built-in model {tuple(builtin_models)}," if builtin_models else ""
        raise CheckpointError(f"model {name!r} is not a directory{also} or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(name, allow_patterns=_HUB_PATTERNS, revision=revision, cache_dir=download_dir)
        )
    except Exception as e:  # offline, unknown repo, gated, ...: one clear message
        raise CheckpointError(
            f"could not get {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). Offline? Download it "
            f"elsewhere and pass the local directory instead."
        ) from None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors shards: those named by model.safetensors.index.json, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{model_dir}: shards named in the index are missing: {absent}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} has no *.safetensors weights")
    return files


def _check_not_truncated(path: Path) -> None:
    """Name the first tensor whose bytes lie past the end of the file (safetensors would only say
    the file is incomplete)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated: no safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated inside its header")
        header = json.loads(f.read(header_len))
    data_size = size - 8 - header_len
    for name, info in sorted(
        header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0] if kv[0] != "__metadata__" else -1
    ):
        if name == "__metadata__":
            continue
        end = info["data_offsets"][1]
        if end > data_size:
            raise CheckpointError(
                f"{path.name} is truncated: tensor {name!r} needs bytes up to {end} but the data ends at {data_size}"
            )


def iter_tensors(
    files: list[Path], device: torch.device | str
) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple]]:
    """(name, load-function, shape) for every tensor, shard by shard; loading reads only that tensor."""
    from safetensors import safe_open

    for path in files:
        _check_not_truncated(path)
        try:
            handle = safe_open(str(path), framework="pt", device=str(device))
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        with handle as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                yield name, (lambda f=f, name=name: f.get_tensor(name)), shape


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the shard headers alone (no data read): configs leave some counts
    unsaid, the shapes tell them."""
    shapes = {}
    for path in files:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def load_weights(
    module: nn.Module,
    files: list[Path],
    map_name: Callable[[str], str | None],
    device: torch.device | str,
    dtype: torch.dtype,
    weight_scales: dict[str, torch.Tensor] | None = None,
) -> None:
    """Fill `module` (built on the meta device) from the shards. `map_name` turns a checkpoint name into
    the module's name, or None for tensors we knowingly don't use. Errors name every offending tensor."""
    expected = dict(module.named_parameters()) | dict(module.named_buffers())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for ckpt_name, load, shape in iter_tensors(files, device):
        name = map_name(ckpt_name)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(ckpt_name)
            continue
        want = tuple(expected[name].shape)
        if shape != want:
            raise CheckpointError(
                f"tensor {ckpt_name!r} has shape {list(shape)}, the model expects {list(want)}"
            )
        tensor = load()
        if tensor.dtype in _FP8_DTYPES:  # an FP8 linear weight: back to full precision with its scale
            scale = (weight_scales or {}).get(ckpt_name)
            if scale is None:
                raise CheckpointError(f"FP8 tensor {ckpt_name!r} has no {ckpt_name}_scale beside it")
            tensor = tensor.float() * scale.to(tensor.device)
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if name.endswith(FP32_SUFFIXES) else dtype)
        _set_tensor(module, name, tensor.to(device))
        loaded.add(name)
    if unexpected:
        raise CheckpointError(f"unexpected tensors in the checkpoint: {sorted(unexpected)[:20]}")
    missing = sorted(set(expected) - loaded - _tied(module))
    if missing:
        raise CheckpointError(f"tensors missing from the checkpoint: {missing[:20]}")


def _tied(module: nn.Module) -> set[str]:
    """Parameter names that share storage with another name (tied embeddings): loaded once, seen twice."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen[id(p)] = name
    return tied


# VL checkpoint tensors the model knowingly does not use: pixels arrive normalised, cls outputs are dropped.
_VL_UNUSED = ("vision_model.radio_model.input_conditioner.", "vision_model.radio_model.summary_idxs")


def vl_name_map(name: str) -> str | None:
    """Checkpoint names of the VL model -> ours: the language model under `language_model.backbone.`."""
    if name.startswith(_VL_UNUSED):
        return None
    if name.startswith("language_model.model."):
        return "language_model.backbone." + name[len("language_model.model.") :]
    return name


def llm_name_map(prefix: str = "") -> Callable[[str], str | None]:
    """Checkpoint names of the language model -> ours (`backbone.*`, `lm_head.weight`), under `prefix`.

    Accepts `backbone.` (NVIDIA, and transformers on disk) and `model.` (transformers in memory)."""

    def map_name(name: str) -> str | None:
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix) :]
        if rest.startswith("model."):
            rest = "backbone." + rest[len("model.") :]
        return prefix + rest

    return map_name


def quantization_algo(model_dir: Path) -> str | None:
    """The modelopt quantisation of a checkpoint (hf_quant_config.json, or config.json's quantization_config)."""
    quant = model_dir / "hf_quant_config.json"
    if quant.is_file():
        return json.loads(quant.read_text()).get("quantization", {}).get("quant_algo") or "unknown"
    config = model_dir / "config.json"
    if config.is_file():
        q = json.loads(config.read_text()).get("quantization_config") or {}
        return q.get("quant_algo") or q.get("quant_method")
    return None


def check_supported_quantization(model_dir: Path) -> str | None:
    """BF16 checkpoints load as they are; FP8 ones load with their weights dequantised to the model dtype
    (per-tensor scales: exact, but no memory or speed gain yet). NVFP4 and others are refused plainly."""
    algo = quantization_algo(model_dir)
    if algo is None or str(algo).upper() == "FP8":
        return None if algo is None else "FP8"
    raise CheckpointError(
        f"{model_dir} is a quantised checkpoint ({algo}); Glimpse loads BF16 and FP8 checkpoints (FP8 "
        f"dequantised to bf16); {algo} is not supported yet"
    )


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Scales an FP8 (modelopt) checkpoint stores beside its weights; the dequantised model needs only weight_scale.
_FP8_SIDECARS = (".weight_scale", ".input_scale", ".k_scale", ".v_scale")


def fp8_name_map(inner: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """Skip the FP8 scale tensors (weight_scale is read separately, to dequantise its weight)."""
    return lambda name: None if name.endswith(_FP8_SIDECARS) else inner(name)


def read_weight_scales(files: list[Path]) -> dict[str, torch.Tensor]:
    """`X.weight_scale` of every quantised linear layer, keyed by `X.weight` (small: one number each)."""
    from safetensors import safe_open

    scales = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(".weight_scale"):
                    scales[name[: -len("_scale")]] = f.get_tensor(name).float()
    return scales
