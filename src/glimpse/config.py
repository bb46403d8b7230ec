"""Checkpoint config.json -> typed dataclasses.

NVIDIA's checkpoints and `transformers` spell the same fields differently (MODEL_SPEC.md §1, "Spellings"),
so every reader here accepts both and every writer can produce either.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from glimpse.errors import CheckpointError

LayerKind = Literal["mamba", "attention", "mlp"]

# Pattern letters (hybrid_override_pattern) and list names (layers_block_type) -> our layer kinds.
_LETTER_TO_KIND: dict[str, LayerKind] = {"M": "mamba", "*": "attention", "-": "mlp"}
_KIND_TO_LETTER = {v: k for k, v in _LETTER_TO_KIND.items()}
_LIST_TO_KIND: dict[str, LayerKind] = {
    "linear_attention": "mamba",
    "mamba": "mamba",
    "full_attention": "attention",
    "attention": "attention",
    "mlp": "mlp",
}
_KIND_TO_LIST = {"mamba": "linear_attention", "attention": "full_attention", "mlp": "mlp"}

# (our name, other spellings in order of preference)
_ALIASES: dict[str, tuple[str, ...]] = {
    "n_groups": ("mamba_n_groups",),
    "conv_kernel": ("mamba_d_conv",),
    "chunk_size": ("mamba_chunk_size",),
    "time_step_limit": ("mamba_dt_limit",),
    "use_conv_bias": ("mamba_conv_bias",),
    "layer_norm_epsilon": ("rms_norm_eps", "norm_eps"),
}


def _json_float(value: Any) -> float:
    """Read a float that JSON could not spell: transformers writes {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    if isinstance(value, str):
        return float(value.lower().replace("infinity", "inf"))
    return float(value)


def _pick(d: dict[str, Any], name: str, default: Any = None) -> Any:
    for key in (name, *_ALIASES.get(name, ())):
        if key in d and d[key] is not None:
            return d[key]
    return default


def parse_layer_kinds(d: dict[str, Any]) -> list[LayerKind]:
    """The block pattern from either `hybrid_override_pattern` (a string) or `layers_block_type` (a list)."""
    if d.get("layers_block_type") is not None:
        raw = d["layers_block_type"]
        unknown = sorted({name for name in raw if name not in _LIST_TO_KIND})
        if unknown:
            raise CheckpointError(
                f"layers_block_type has unsupported block types {unknown}; Glimpse supports "
                f"{sorted(_LIST_TO_KIND)} (mixture-of-experts 'moe' blocks belong to other NemotronH models)"
            )
        return [_LIST_TO_KIND[name] for name in raw]
    pattern = d.get("hybrid_override_pattern")
    if not pattern:
        raise CheckpointError("config has neither 'hybrid_override_pattern' nor 'layers_block_type'")
    bad = sorted({c for c in pattern if c not in _LETTER_TO_KIND})
    if bad:
        hint = " ('E' is a mixture-of-experts block, used by other NemotronH models)" if "E" in bad else ""
        raise CheckpointError(
            f"hybrid_override_pattern has unsupported letters {bad}{hint}; supported: 'M' Mamba2, "
            f"'*' attention, '-' MLP"
        )
    return [_LETTER_TO_KIND[c] for c in pattern]


@dataclass
class NemotronHConfig:
    """The language model (NemotronH): every field a forward pass needs, nothing else."""

    vocab_size: int
    hidden_size: int
    layer_kinds: list[LayerKind]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    ssm_state_size: int
    conv_kernel: int = 4
    use_conv_bias: bool = True
    chunk_size: int = 128
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    mlp_hidden_act: str = "relu2"
    attention_bias: bool = False
    mlp_bias: bool = False
    mamba_proj_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if self.mlp_hidden_act != "relu2":
            raise CheckpointError(f"mlp_hidden_act {self.mlp_hidden_act!r} is not supported (only 'relu2')")
        if self.mamba_num_heads % self.n_groups:
            raise CheckpointError(
                f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def num_mamba_layers(self) -> int:
        return self.layer_kinds.count("mamba")

    @property
    def num_attention_layers(self) -> int:
        return self.layer_kinds.count("attention")

    @property
    def pattern(self) -> str:
        return "".join(_KIND_TO_LETTER[k] for k in self.layer_kinds)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # Reading and writing -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NemotronHConfig:
        try:
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            limit = _pick(d, "time_step_limit", (0.0, math.inf))
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                layer_kinds=parse_layer_kinds(d),
                num_attention_heads=num_heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or d.get("attention_head_dim") or hidden // num_heads),
                intermediate_size=int(d["intermediate_size"]),
                mamba_num_heads=int(d["mamba_num_heads"]),
                mamba_head_dim=int(d["mamba_head_dim"]),
                n_groups=int(_pick(d, "n_groups", 8)),
                ssm_state_size=int(d["ssm_state_size"]),
                conv_kernel=int(_pick(d, "conv_kernel", 4)),
                use_conv_bias=bool(_pick(d, "use_conv_bias", True)),
                chunk_size=int(_pick(d, "chunk_size", 128)),
                time_step_limit=(_json_float(limit[0]), _json_float(limit[1])),
                layer_norm_epsilon=float(_pick(d, "layer_norm_epsilon", 1e-5)),
                max_position_embeddings=int(d.get("max_position_embeddings") or 131072),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                mlp_hidden_act=str(d.get("mlp_hidden_act", "relu2")),
                attention_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                mamba_proj_bias=bool(d.get("mamba_proj_bias", d.get("use_bias", False))),
                bos_token_id=d.get("bos_token_id", 1),
                eos_token_id=d.get("eos_token_id", 2),
                pad_token_id=d.get("pad_token_id", 0),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks the field {e.args[0]!r}") from None

    def to_dict(self, style: Literal["nvidia", "legacy", "transformers"] = "nvidia") -> dict[str, Any]:
        """A config.json in NVIDIA's spelling, the older `mamba_*` spelling, or as transformers >= 5.24 writes it."""
        common = {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "mlp_hidden_act": self.mlp_hidden_act,
            "mamba_num_heads": self.mamba_num_heads,
            "mamba_head_dim": self.mamba_head_dim,
            "ssm_state_size": self.ssm_state_size,
            "use_conv_bias": self.use_conv_bias,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "use_bias": self.mamba_proj_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "bfloat16",
        }
        upper = self.time_step_limit[1]
        if style == "transformers":
            return common | {
                "layers_block_type": [_KIND_TO_LIST[k] for k in self.layer_kinds],
                "num_hidden_layers": None,
                "n_groups": self.n_groups,
                "conv_kernel": self.conv_kernel,
                "chunk_size": self.chunk_size,
                "time_step_limit": [
                    self.time_step_limit[0],
                    upper if math.isfinite(upper) else {"__float__": "Infinity"},
                ],
            }
        # NVIDIA's files: the pattern string, and Python's json writes the limit as a bare Infinity.
        nvidia = common | {
            "hybrid_override_pattern": self.pattern,
            "num_hidden_layers": self.num_layers,
            "mamba_hidden_act": "silu",
            "expand": 2,
        }
        if style == "legacy":  # the older mamba_* field names some NemotronH configs use
            return nvidia | {
                "mamba_n_groups": self.n_groups,
                "mamba_d_conv": self.conv_kernel,
                "mamba_chunk_size": self.chunk_size,
                "mamba_dt_limit": list(self.time_step_limit),
            }
        return nvidia | {
            "n_groups": self.n_groups,
            "conv_kernel": self.conv_kernel,
            "chunk_size": self.chunk_size,
            "time_step_limit": list(self.time_step_limit),
        }


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def llm_config_dict(d: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config: the whole thing for a text checkpoint, `llm_config`
    (or `text_config`) for a VL one."""
    for key in ("llm_config", "text_config"):
        if isinstance(d.get(key), dict):
            return d[key]
    return d


def is_vl_config(d: dict[str, Any]) -> bool:
    return "vision_config" in d and any(isinstance(d.get(k), dict) for k in ("llm_config", "text_config"))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VLConfig:
    """The VL checkpoint (`NemotronH_Nano_VL_V2`): the language model plus the image/video geometry.

    The vision encoder's own config is read with the checkpoint's tensor shapes (config_radio.py)."""

    llm: NemotronHConfig
    vision_config: dict[str, Any]
    force_image_size: int = 512
    patch_size: int = 16
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    projector_hidden_size: int = 20480
    vit_hidden_size: int = 1280
    norm_mean: tuple[float, float, float] = CLIP_MEAN
    norm_std: tuple[float, float, float] = CLIP_STD
    use_thumbnail: bool = True
    max_num_tiles: int = 12
    img_context_token: str = "<image>"
    img_start_token: str = "<img>"
    img_end_token: str = "</img>"

    @property
    def tokens_per_tile(self) -> int:
        side = int(self.force_image_size // self.patch_size * self.downsample_ratio)
        return side * side

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLConfig:
        if d.get("ps_version", "v2") != "v2":
            raise CheckpointError(f"ps_version {d['ps_version']!r} is not supported (only 'v2')")
        return cls(
            llm=NemotronHConfig.from_dict(llm_config_dict(d)),
            vision_config=dict(d.get("vision_config") or {}),
            force_image_size=int(d.get("force_image_size") or 512),
            patch_size=int(d.get("patch_size") or 16),
            downsample_ratio=float(d.get("downsample_ratio") or 0.5),
            ps_version=str(d.get("ps_version", "v2")),
            projector_hidden_size=int(d.get("projector_hidden_size") or 20480),
            vit_hidden_size=int(d.get("vit_hidden_size") or 1280),
            norm_mean=tuple(d.get("norm_mean") or CLIP_MEAN),
            norm_std=tuple(d.get("norm_std") or CLIP_STD),
            use_thumbnail=bool(d.get("use_thumbnail", True)),
            max_num_tiles=int(d.get("max_num_tiles") or d.get("max_dynamic_patch") or 12),
            img_context_token=str(d.get("img_context_token") or "<image>"),
            img_start_token=str(d.get("img_start_token") or "<img>"),
            img_end_token=str(d.get("img_end_token") or "</img>"),
        )

    def to_dict(self, style: Literal["nvidia", "legacy", "transformers"] = "nvidia") -> dict[str, Any]:
        llm = self.llm.to_dict(style)
        return {
            "architectures": ["NemotronH_Nano_VL_V2"],
            "model_type": "NemotronH_Nano_VL_V2",
            "llm_config": llm,
            "vision_config": self.vision_config,
            "force_image_size": self.force_image_size,
            "patch_size": self.patch_size,
            "downsample_ratio": self.downsample_ratio,
            "ps_version": self.ps_version,
            "projector_hidden_size": self.projector_hidden_size,
            "vit_hidden_size": self.vit_hidden_size,
            "norm_mean": list(self.norm_mean),
            "norm_std": list(self.norm_std),
            "use_thumbnail": self.use_thumbnail,
            "max_num_tiles": self.max_num_tiles,
            "img_context_token": self.img_context_token,
            "img_start_token": self.img_start_token,
            "img_end_token": self.img_end_token,
            "torch_dtype": "bfloat16",
        }
