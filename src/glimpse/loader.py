"""Checkpoints -> modules: find the files, map the names, load shard by shard onto the target device.

The model is built on the meta device (no memory), then each tensor is read from its shard straight to
the target device and dtype and put in place, so peak host memory is about one tensor, not the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Split:
    """The part of a tensor one tensor-parallel rank reads: along `dim`, the concatenation of `pieces`
    (start, length), given in units of a dimension `full` long. A packed tensor stored shorter along
    `dim` (NVFP4: two codes a byte, one scale per 16) is read in its own units, which must not cut one
    of its elements. `zero`: this rank holds zeros of its shape instead (a bias added by rank 0 only)."""

    dim: int
    pieces: tuple[tuple[int, int], ...]
    full: int
    zero: bool = False


def _read(f, name: str, split: Split | None, ckpt_name: str) -> torch.Tensor:
    """Tensor `name` of an open shard, or only `split`'s part of it (read piece by piece from the file)."""
    if split is None:
        return f.get_tensor(name)
    handle = f.get_slice(name)
    shape = tuple(handle.get_shape())
    if len(shape) <= split.dim or math.prod(shape) == 1:  # a per-tensor scale: every rank reads it whole
        return f.get_tensor(name)
    stored = shape[split.dim]
    if split.full % stored:
        raise CheckpointError(f"tensor {ckpt_name!r} has {stored} entries along dim {split.dim}, not a divisor "
                              f"of the {split.full} the model splits")  # fmt: skip
    per = split.full // stored  # model units per stored entry (1, or 2 / 16 for NVFP4 codes / scales)
    parts = []
    for start, length in split.pieces:
        if start % per or length % per:
            raise CheckpointError(
                f"tensor {ckpt_name!r}: this tensor-parallel split ({start}..{start + length} of {split.full}) "
                f"would cut one of its entries, which cover {per} each (an NVFP4 scale group); choose a "
                f"tensor_parallel_size that keeps the split on a multiple of {per}"
            )
        index = (slice(None),) * split.dim + (slice(start // per, (start + length) // per),)
        parts.append(handle[index])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=split.dim)


def iter_tensors(
    files: list[Path], device: torch.device | str
) -> Iterator[tuple[str, Callable[..., torch.Tensor], tuple]]:
    """(name, load-function, shape) for every tensor, shard by shard; loading reads only that tensor,
    or only the part a `Split` passed to the load-function names."""
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
                yield name, (lambda split=None, f=f, name=name: _read(f, name, split, name)), shape


def _header(path: Path) -> dict[str, dict]:
    """A shard's tensor entries (dtype, shape, offsets), read from its header alone."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the shard headers alone (no data read): configs leave some counts
    unsaid, the shapes tell them."""
    return {name: tuple(info["shape"]) for path in files for name, info in _header(path).items()}


def tensor_locations(files: list[Path]) -> dict[str, Path]:
    """The shard holding each tensor, from the headers alone."""
    return {name: path for path in files for name in _header(path)}


def read_tensor(
    path: Path, name: str, device: torch.device | str, split: Split | None = None
) -> torch.Tensor:
    """One tensor of one shard (or `split`'s part of it), read straight to `device`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return _read(f, name, split, name)


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


# How quantised checkpoints (NVIDIA modelopt, glimpse.quantization) store a linear layer `X`: `X.weight`
# packed in one of these dtypes (FP8: float8_e4m3fn; NVFP4: uint8, two codes a byte), its scales beside it.
PACKED_DTYPES = (torch.float8_e4m3fn, torch.uint8)
QUANT_SCALES = (".weight_scale", ".weight_scale_2", ".input_scale")
# The KV cache's scales (`kv_cache_quant_algo`): unused, Glimpse keeps the KV cache in the model dtype.
KV_CACHE_SCALES = (".k_scale", ".v_scale")

Dequantize = Callable[[str, torch.Tensor, Callable[[str], torch.Tensor]], torch.Tensor]
"""(checkpoint name of a packed weight, the packed tensor, read_beside) -> the weight in fp32, where
read_beside("weight_scale") reads the tensor of that name stored beside the weight."""


def load_weights(
    module: nn.Module,
    files: list[Path],
    map_name: Callable[[str], str | None],
    device: torch.device | str,
    dtype: torch.dtype,
    dequantize: Dequantize | None = None,
    splits: Mapping[str, Split] | None = None,
) -> set[str]:
    """Fill `module` (built on the meta device) from the shards. `map_name` turns a checkpoint name into
    the module's name, or None for tensors we knowingly don't use. Errors name every offending tensor.
    `splits` (tensor parallelism) names, by our names, the tensors of which only a part is read.

    Quantised checkpoints: a tensor whose place in `module` has a packed dtype (a quantised layer's
    weight) or is a quantisation scale loads as stored; a packed weight whose place is full precision is
    dequantised by `dequantize` (None: the checkpoint declares no quantisation, so that is an error), and
    the scales beside it are read for that and not loaded. Returns the names (ours) of the weights it
    dequantised."""
    expected = dict(module.named_parameters()) | dict(module.named_buffers())
    loaded: set[str] = set()
    dequantized: set[str] = set()
    unexpected: list[str] = []
    locations: dict[str, Path] | None = None

    splits = splits or {}

    def read_beside(ckpt_name: str, leaf: str, split: Split | None) -> torch.Tensor:
        nonlocal locations
        locations = locations if locations is not None else tensor_locations(files)
        name = ckpt_name.rsplit(".", 1)[0] + "." + leaf
        if name not in locations:
            raise CheckpointError(f"quantised tensor {ckpt_name!r} has no {name} beside it")
        return read_tensor(locations[name], name, device, split)  # the weight's part, in the scale's units

    for ckpt_name, load, shape in iter_tensors(files, device):
        name = map_name(ckpt_name)
        if name is None:
            continue
        if name not in expected:
            if not name.endswith(QUANT_SCALES + KV_CACHE_SCALES):  # scales of a dequantised weight: used
                unexpected.append(ckpt_name)
            continue
        target = expected[name]
        want_dtype = _target_dtype(name, target, dtype)
        split = splits.get(name)
        if split is not None and split.zero:
            _set_tensor(module, name, torch.zeros(target.shape, dtype=want_dtype, device=device))
            loaded.add(name)
            continue
        tensor = load(split)
        if tensor.is_floating_point() and tensor.element_size() == 1 and tensor.dtype not in PACKED_DTYPES:
            raise CheckpointError(f"tensor {ckpt_name!r} is {tensor.dtype}: not a format Glimpse reads")
        if tensor.dtype in PACKED_DTYPES and want_dtype != tensor.dtype:
            if want_dtype in PACKED_DTYPES or not want_dtype.is_floating_point:
                raise CheckpointError(
                    f"tensor {ckpt_name!r} is {tensor.dtype} on disk, its layer holds {want_dtype}"
                )
            if dequantize is None:
                raise CheckpointError(
                    f"tensor {ckpt_name!r} is {tensor.dtype} but the checkpoint declares no quantisation "
                    f"(hf_quant_config.json or config.json's quantization_config)"
                )
            try:
                tensor = dequantize(
                    ckpt_name, tensor, lambda leaf, n=ckpt_name, s=split: read_beside(n, leaf, s)
                )
            except ValueError as e:  # scales whose shape disagrees with the weight
                raise CheckpointError(f"cannot dequantise {ckpt_name!r}: {e}") from None
            dequantized.add(name)
        elif want_dtype in PACKED_DTYPES and tensor.dtype != want_dtype:
            raise CheckpointError(
                f"tensor {ckpt_name!r} is {tensor.dtype} on disk, but the checkpoint's quantisation config "
                f"makes its layer quantised ({want_dtype}): the exclusion list and the tensors disagree"
            )
        want = tuple(target.shape)
        if tuple(tensor.shape) != want:
            if not (tensor.numel() == 1 and target.numel() == 1):  # a scale stored as [] or [1]
                raise CheckpointError(
                    f"tensor {ckpt_name!r} has shape {list(shape)}, the model expects {list(want)}"
                )
            tensor = tensor.reshape(want)
        if tensor.is_floating_point():
            tensor = tensor.to(want_dtype)
        _set_tensor(module, name, tensor.to(device))
        loaded.add(name)
    if unexpected:
        raise CheckpointError(f"unexpected tensors in the checkpoint: {sorted(unexpected)[:20]}")
    missing = sorted(set(expected) - loaded - _tied(module))
    if missing:
        raise CheckpointError(f"tensors missing from the checkpoint: {missing[:20]}")
    return dequantized


def _target_dtype(name: str, target: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is kept in: a quantised layer's own (packed weights, scales), fp32 for the
    precision-critical SSM parameters, else the model dtype."""
    if target.dtype in PACKED_DTYPES or name.endswith(QUANT_SCALES):
        return target.dtype
    return torch.float32 if name.endswith(FP32_SUFFIXES) else dtype


def weight_memory_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (tied ones once): what its weights occupy."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


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
