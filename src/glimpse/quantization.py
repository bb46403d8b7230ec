"""Which quantisation a checkpoint holds (NVIDIA modelopt: FP8 or NVFP4) and which modules it leaves alone.

modelopt writes its settings in one of two places (MODEL_SPEC.md §7):
- `hf_quant_config.json`: `{"quantization": {"quant_algo", "kv_cache_quant_algo", "group_size",
  "exclude_modules"}}`;
- `config.json`: `"quantization_config": {"quant_method": "modelopt", "quant_algo", "ignore", "group_size"}`.

The exclusion lists name modules by the exporter's paths, which need not be ours: the Nano VL FP8
checkpoint lists `model.layers.vision_model*` for our `vision_model.*` and `model.layers.*.conv1d*` for our
`language_model.backbone.layers.N.mixer.conv1d`. So patterns are matched by suffix and wildcard, never as
full paths (`QuantConfig.is_excluded`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from glimpse.errors import CheckpointError

QuantAlgo = Literal["FP8", "NVFP4"]
ALGOS: tuple[QuantAlgo, ...] = ("FP8", "NVFP4")

METHODS: dict[str, QuantAlgo] = {"modelopt": "FP8", "modelopt_fp4": "NVFP4"}
"""The `quantization=` / `--quantization` names (vLLM's) and the checkpoint format each one means."""

NANO_VL_FP8_EXCLUDE = (
    "model.layers.language_model.lm_head",
    "model.layers.mlp1*",
    "model.layers.*.conv1d*",
    "model.layers.vision_model*",
    "lm_head",
)
"""The exclusion list of NVIDIA's published Nemotron Nano 2 VL FP8 checkpoint, exactly as written there
(vision tower, projector, conv1d and lm_head stay bf16); our tiny quantised checkpoints use it too."""

_WILDCARDS = frozenset("*?[")


@dataclass(frozen=True)
class QuantConfig:
    """A modelopt checkpoint's quantisation: the format of its quantised linear layers, the group size
    (NVFP4: 16 elements of K share one scale), the modules left in full precision, and the KV cache's
    format (recorded only: Glimpse keeps the KV cache in the model dtype)."""

    algo: QuantAlgo
    group_size: int | None = None
    exclude: tuple[str, ...] = ()
    kv_cache_algo: str | None = None

    @property
    def method(self) -> str:
        """The vLLM name of this format (`modelopt`, `modelopt_fp4`)."""
        return next(name for name, algo in METHODS.items() if algo == self.algo)

    def is_excluded(self, module_name: str) -> bool:
        """True when an exclusion pattern names this module or a module above it."""
        return any(module_matches(pattern, module_name) for pattern in self.exclude)

    def to_hf_quant_config(self) -> dict[str, Any]:
        """The `hf_quant_config.json` modelopt writes for this quantisation."""
        section: dict[str, Any] = {"quant_algo": self.algo, "kv_cache_quant_algo": self.kv_cache_algo}
        if self.group_size is not None:
            section["group_size"] = self.group_size
        section["exclude_modules"] = list(self.exclude)
        return {"producer": {"name": "modelopt"}, "quantization": section}


def module_matches(pattern: str, module_name: str) -> bool:
    """Whether `pattern` (a dotted path, `*`/`?` wildcards allowed) names `module_name` or a module above it.

    The pattern may sit under a root our names lack (`model.layers.vision_model*`) and the name under one
    the pattern lacks (`language_model.lm_head` for `lm_head`): some run of the name's components must
    match (fnmatch) the pattern less some of its leading plain-word components. Dropping stops at a
    wildcard or a layer number, so `backbone.layers.4.mixer*` keeps meaning layer 4 only."""
    parts = module_name.split(".")
    runs = [".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    pattern_parts = pattern.split(".")
    for i, part in enumerate(pattern_parts):
        tail = ".".join(pattern_parts[i:])
        if any(fnmatchcase(run, tail) for run in runs):
            return True
        if part.isdigit() or _WILDCARDS & set(part):
            return False
    return False


def read_quant_config(model_dir: str | Path) -> QuantConfig | None:
    """The checkpoint's quantisation, or None for a full-precision checkpoint. A quantisation Glimpse
    does not serve is a CheckpointError naming it."""
    model_dir = Path(model_dir)
    hf_quant = model_dir / "hf_quant_config.json"
    if hf_quant.is_file():
        section = _read_json(hf_quant).get("quantization") or {}
        return _parse(section, section.get("exclude_modules"), hf_quant)
    config = model_dir / "config.json"
    if config.is_file():
        section = _read_json(config).get("quantization_config")
        if not section:
            return None
        method = section.get("quant_method")
        if method != "modelopt":
            raise CheckpointError(
                f"{config} has quantization_config.quant_method {method!r}; Glimpse serves NVIDIA modelopt "
                f"checkpoints (FP8, NVFP4) and full-precision ones"
            )
        return _parse(section, section.get("ignore", section.get("exclude_modules")), config)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _parse(section: dict[str, Any], exclude: list[str] | None, source: Path) -> QuantConfig:
    algo = str(section.get("quant_algo") or "").upper()
    if algo not in ALGOS:
        raise CheckpointError(
            f"{source} gives quant_algo {section.get('quant_algo')!r}; Glimpse serves modelopt FP8 and NVFP4 "
            f"checkpoints (and full-precision ones)"
        )
    group_size = section.get("group_size")
    return QuantConfig(
        algo=algo,  # type: ignore[arg-type]  # checked against ALGOS just above
        group_size=int(group_size) if group_size is not None else None,
        exclude=tuple(exclude or ()),
        kv_cache_algo=section.get("kv_cache_quant_algo"),
    )


def resolve_quantization(requested: str | None, found: QuantConfig | None) -> QuantConfig | None:
    """The quantisation to load: what the checkpoint holds (`found`), checked against what the user asked
    for (`requested`: `modelopt`, `modelopt_fp4`, or None to take the checkpoint's). A flag that
    contradicts the files is an error, never a silent reinterpretation."""
    if requested is None:
        return found
    if requested not in METHODS:
        raise ValueError(
            f"quantization {requested!r} is not supported; use 'modelopt' (FP8), 'modelopt_fp4' (NVFP4) or "
            f"leave it out to follow the checkpoint"
        )
    want = METHODS[requested]
    if found is None:
        raise CheckpointError(
            f"quantization {requested!r} asks for an {want} checkpoint, but this checkpoint is not quantised "
            f"(no hf_quant_config.json, no quantization_config in config.json); leave the option out"
        )
    if found.algo != want:
        raise CheckpointError(
            f"quantization {requested!r} asks for an {want} checkpoint, but this checkpoint is {found.algo}; "
            f"pass {found.method!r} or leave the option out"
        )
    return found
