"""RADIO's `vision_config` (NVIDIA's or transformers' spelling) and the vision tower's tensor shapes ->
`RadioConfig`, the shape of the C-RADIO ViT (model/radio.py); and back to NVIDIA's spelling.

What the real VL checkpoint's `vision_config` looks like (the file itself was not seen here; gathered from
NVlabs RADIO `hf_model.RADIOConfig`, vLLM `nano_nemotron_vl.get_vit_model_from_radio_config` and
`RadioConfig.from_hf_config`, SGLang `NemotronH_Nano_VL_V2_Config.create_radio_config`, and the config of
NVIDIA's sibling Nemotron-Parse checkpoint, whose `encoder` is the same RADIO format):
- It is the remote-code `RADIOConfig.to_dict()`: top-level `patch_size` (16; SGLang also accepts `[16]`),
  `max_resolution` (2048), `preferred_resolution` ([h, w]; vLLM takes [0] as its `image_size`),
  `version`, `adaptor_names`, `adaptor_configs`, `vitdet_window_size`, `feature_normalizer_config`,
  `inter_feature_normalizer_config`; later Omni checkpoints add `video_temporal_patch_size`,
  `separate_video_embedder`, `min_num_patches` / `max_num_patches` (dynamic resolution).
- `args` is NVlabs' training-argument dump. The fields that shape the network: `model` (a timm name,
  "vit_huge_patch16_224" → width 1280, depth 32, 16 heads, MLP 5120), `teachers` (list of
  `{"name", "use_summary", ...}`), `cls_token_per_teacher`, `register_multiple`, `cpe_num_registers`,
  `cpe_max_size` (2048), `model_norm` (a final norm is kept only when true). NVlabs counts the prefix as
  cls = number of unique teacher names if `cls_token_per_teacher` else 1, registers = `cpe_num_registers`
  if set, else `register_multiple - cls % register_multiple` if set, else 0. Nemotron-Parse has 4 teachers
  (clip, siglip, dino_v2, sam) and `register_multiple` 8: 4 + 4 = 8 prefix rows.
- The image mean/std live at the VL config's top level (`norm_mean`, `norm_std`); the checkpoint's
  `radio_model.input_conditioner.*` buffers and `radio_model.summary_idxs` are not used here.
- transformers' own `RadioConfig` spells things flat: `hidden_size`, `num_hidden_layers`,
  `num_attention_heads`, `mlp_ratio`, `layer_norm_eps`, `qkv_bias`, `max_img_size`, `num_cls_tokens`,
  `num_registers`; vLLM's flat form adds `model_name`, `cpe_max_size`, `intermediate_size`.
Uncertain, hence read from tensor shapes whenever a tensor says it: the 12B's exact key set; whether its
`args` carries `teachers` (an older vLLM read only `register_multiple`); the split of the 8 prefix rows
into 4 cls + 4 registers (only the total matters for serving); the `preferred_resolution` value. The head
count is in no tensor: it comes from explicit config fields or the timm model name, else loading fails.
Layer-scale tensors (`ls1`, `ls2`) are not expected (C-RADIO has none; vLLM skips them too), and the
Omni checkpoints' `patch_generator.video_embedder` (2-frame tubelets) is not used by this model.

`to_checkpoint_dict()` writes the fields the serving ports read (our reader, vLLM, SGLang); NVlabs' remote
code additionally needs its full training-argument dump, which is carried through unchanged when the config
came from a checkpoint (`source_config`) but is not synthesised for made-up configs.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from glimpse.errors import CheckpointError

logger = logging.getLogger(__name__)

# timm ViT names used in RADIO `args["model"]` -> (width, depth, heads, mlp width); the same table as vLLM's.
VIT_DIMS_BY_NAME: dict[str, tuple[int, int, int, int]] = {
    "vit_small_patch16_224": (384, 12, 6, 1536),
    "vit_base_patch16_224": (768, 12, 12, 3072),
    "vit_large_patch16_224": (1024, 24, 16, 4096),
    "vit_huge_patch16_224": (1280, 32, 16, 5120),
}

# The teachers of C-RADIO as Nemotron-Parse lists them; used to write 4 cls tokens the NVIDIA way.
_DEFAULT_TEACHERS = ("clip", "siglip", "dino_v2", "sam")

# Tensor names relative to the vision tower, as NVIDIA writes them and as transformers holds them.
_NVIDIA_NAMES = {
    "pos": "patch_generator.pos_embed",
    "cls": "patch_generator.cls_token.token",
    "embed": "patch_generator.embedder.weight",
    "blocks": "blocks.",
    "fc1": "mlp.fc1.weight",
    "qkv_bias": "attn.qkv.bias",
    "proj_bias": "attn.proj.bias",
    "final_norm": "norm.weight",
}
_HF_NAMES = {
    "pos": "embeddings.position_embedding",
    "cls": "embeddings.cls_register_token",
    "embed": "embeddings.patch_projection.weight",
    "blocks": "encoder.layer.",
    "fc1": "mlp.fc1.weight",
    "qkv_bias": "attention.q_proj.bias",
    "proj_bias": "attention.o_proj.bias",
    "final_norm": "layernorm.weight",
}


@dataclass
class RadioConfig:
    """Shape of the C-RADIO ViT. Defaults are the 12B VL's ViT-H/16 at 2048 px."""

    hidden_size: int = 1280
    depth: int = 32
    num_heads: int = 16
    intermediate_size: int = 5120
    patch_size: int = 16
    max_grid: int = 128  # side of the pos_embed grid: max_resolution / patch_size
    num_prefix_tokens: int = 8  # cls + registers, prepended then dropped
    num_cls_tokens: int = 4  # only for writing configs; serving needs the total alone
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    proj_bias: bool = True
    num_channels: int = 3
    # The vision_config this was read from, so writing it back keeps fields we don't model.
    source_config: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise CheckpointError(
                f"RADIO width {self.hidden_size} is not divisible by its {self.num_heads} heads"
            )
        if not 0 <= self.num_cls_tokens <= self.num_prefix_tokens:
            raise CheckpointError(
                f"RADIO num_cls_tokens {self.num_cls_tokens} is outside [0, {self.num_prefix_tokens}]"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2

    @property
    def max_resolution(self) -> int:
        return self.max_grid * self.patch_size

    @classmethod
    def from_checkpoint(
        cls,
        vision_config: Mapping[str, Any] | None,
        tensor_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> RadioConfig:
        """Read either spelling of the vision config; counts a tensor shows come from the tensor.

        `tensor_shapes` maps checkpoint names (any prefix, e.g. `vision_model.radio_model.model.`, or
        transformers' names) to shapes; only the vision tower's entries are looked at. Without tensors the
        config alone decides. A config that contradicts a tensor on the width or patch size is refused (the
        head count would be wrong); softer disagreements (depth, grid, prefix) are logged and the tensor wins.
        """
        vc: dict[str, Any] = dict(vision_config or {})
        args: dict[str, Any] = dict(vc.get("args") or {})
        shapes = _VisionShapes.find(tensor_shapes or {})

        def get(*keys: str) -> Any:
            for key in keys:
                for where in (vc, args):
                    if where.get(key) is not None:
                        return where[key]
            return None

        _refuse_unsupported(vc, args, shapes)

        model_name = get("model", "model_name")
        table = VIT_DIMS_BY_NAME.get(model_name) if isinstance(model_name, str) else None

        # Patch size: a list in some writers ([16]).
        patch = get("patch_size")
        if isinstance(patch, (list, tuple)):
            patch = patch[0]
        patch = int(patch) if patch is not None else None
        if shapes.embed is not None:
            patch_dim = shapes.embed[1]
            patch_t = math.isqrt(patch_dim // 3)
            if 3 * patch_t * patch_t != patch_dim:
                raise CheckpointError(f"RADIO embedder input {patch_dim} is not 3 x patch x patch")
            if patch is not None and patch != patch_t:
                raise CheckpointError(
                    f"vision_config patch_size {patch} but the embedder is cut for {patch_t}"
                )
            patch = patch_t
        patch = patch or 16

        width = get("hidden_size") or (table[0] if table else None)
        if shapes.width is not None:
            if width is not None and int(width) != shapes.width:
                raise CheckpointError(
                    f"vision_config says width {width} (model {model_name!r}) but the tensors are {shapes.width}"
                )
            width = shapes.width
        if width is None:
            raise CheckpointError(
                "can't tell the RADIO width: no hidden_size, no known args.model, no tensors"
            )
        width = int(width)

        heads = get("num_attention_heads", "num_heads") or (table[2] if table else None)
        if heads is None:
            raise CheckpointError(
                f"can't tell the RADIO head count: unknown model {model_name!r} and no num_attention_heads"
            )

        depth_c = get("num_hidden_layers", "depth") or (table[1] if table else None)
        depth = _prefer_tensor("depth", depth_c, shapes.depth)
        if depth is None:
            raise CheckpointError(
                "can't tell the RADIO depth: no num_hidden_layers, no known model, no blocks"
            )

        inter_c = get("intermediate_size")
        if inter_c is None and vc.get("mlp_ratio") is not None:
            inter_c = round(width * float(vc["mlp_ratio"]))
        if inter_c is None:
            inter_c = table[3] if table else 4 * width
        inter = _prefer_tensor("intermediate_size", inter_c, shapes.fc1)

        max_px = get("max_resolution", "cpe_max_size", "max_img_size")
        grid_c = round(int(max_px) / patch) if max_px is not None else None
        grid = _prefer_tensor("max_grid", grid_c, shapes.grid) or 128

        n_cls_c, prefix_c = _prefix_from_config(vc, args)
        prefix = _prefer_tensor("num_prefix_tokens", prefix_c, shapes.prefix)
        if prefix is None:
            prefix = 8
        n_cls = n_cls_c if n_cls_c is not None and n_cls_c <= prefix else min(4, prefix)

        qkv_bias = shapes.qkv_bias if shapes.qkv_bias is not None else get("qkv_bias") is not False
        proj_bias = shapes.proj_bias if shapes.proj_bias is not None else True
        eps = get("layer_norm_eps")
        return cls(
            hidden_size=width,
            depth=int(depth),
            num_heads=int(heads),
            intermediate_size=int(inter),
            patch_size=patch,
            max_grid=int(grid),
            num_prefix_tokens=int(prefix),
            num_cls_tokens=int(n_cls),
            layer_norm_eps=float(eps) if eps is not None else 1e-6,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            # Only NVIDIA's spelling is worth carrying back out (transformers' flat form is rewritten whole).
            source_config=copy.deepcopy(dict(vision_config))
            if vision_config and "args" in vision_config
            else None,
        )

    def to_checkpoint_dict(self) -> dict[str, Any]:
        """The NVIDIA-style vision_config (`args` + top-level RADIO fields) that reads back to this config."""
        out: dict[str, Any] = copy.deepcopy(self.source_config) if self.source_config else {}
        args: dict[str, Any] = dict(out.get("args") or {})
        name = next(
            (
                n
                for n, dims in VIT_DIMS_BY_NAME.items()
                if dims == (self.hidden_size, self.depth, self.num_heads, self.intermediate_size)
                and n.endswith(f"patch{self.patch_size}_224")
            ),
            None,
        )
        explicit = {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.depth,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
        }
        if name is None:
            # No timm name fits (tiny test models): spell the sizes out, as transformers does.
            args["model"] = f"glimpse_vit_w{self.hidden_size}_d{self.depth}_h{self.num_heads}"
            out.update(explicit)
        else:
            args["model"] = name
            for key in explicit:
                out.pop(key, None)
        for key in ("num_cls_tokens", "num_registers", "max_img_size", "cpe_max_size", "depth", "num_heads"):
            out.pop(key, None)  # flat spellings that would override what `args` says on reading back

        n_cls, n_reg = self.num_cls_tokens, self.num_prefix_tokens - self.num_cls_tokens
        if n_cls == 0:
            raise CheckpointError("a RADIO config with no cls token can't be written in NVIDIA's form")
        teachers = [t for t in args.get("teachers") or [] if isinstance(t, dict) and "name" in t]
        if len({t["name"] for t in teachers}) != n_cls or not args.get("cls_token_per_teacher"):
            names = (
                _DEFAULT_TEACHERS
                if n_cls == len(_DEFAULT_TEACHERS)
                else [f"teacher{i}" for i in range(n_cls)]
            )
            teachers = [{"name": n, "use_summary": True} for n in names]
        args["teachers"] = teachers
        args["cls_token_per_teacher"] = True
        args.pop("cpe_num_registers", None)
        if n_reg > 0:
            args["register_multiple"] = n_cls + n_reg  # rm - n_cls % rm == n_reg since n_cls < rm
        else:
            args.pop("register_multiple", None)
        args["cpe_max_size"] = self.max_resolution
        args["model_norm"] = False
        if self.layer_norm_eps != 1e-6:
            args["layer_norm_eps"] = self.layer_norm_eps
        else:
            args.pop("layer_norm_eps", None)
        if not self.qkv_bias:
            args["qkv_bias"] = False
        else:
            args.pop("qkv_bias", None)

        out["args"] = args
        out["patch_size"] = self.patch_size
        out["max_resolution"] = self.max_resolution
        out.setdefault("preferred_resolution", [512, 512])
        return out


def _prefer_tensor(what: str, from_config: Any, from_tensor: int | None) -> int | None:
    """The tensor's count when there is one (it is what the weights hold); say so when the config differs."""
    if from_tensor is None:
        return int(from_config) if from_config is not None else None
    if from_config is not None and int(from_config) != from_tensor:
        logger.warning(
            "RADIO %s: vision_config says %s, tensors say %s; using the tensors",
            what,
            from_config,
            from_tensor,
        )
    return from_tensor


def _prefix_from_config(vc: Mapping[str, Any], args: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(cls count, cls + registers) as the config states them, or None where it doesn't."""
    if vc.get("num_cls_tokens") is not None or vc.get("num_registers") is not None:
        n_cls = int(vc.get("num_cls_tokens") or 0)
        return n_cls, n_cls + int(vc.get("num_registers") or 0)
    teachers = args.get("teachers")
    if teachers is None and args.get("register_multiple") is None and args.get("cpe_num_registers") is None:
        return None, None
    if args.get("cls_token_per_teacher"):
        n_cls = len({t["name"] for t in teachers or [] if isinstance(t, Mapping) and "name" in t}) or 1
    else:
        n_cls = 1
    if args.get("cpe_num_registers"):
        n_reg = int(args["cpe_num_registers"])
    elif args.get("register_multiple"):
        multiple = int(args["register_multiple"])
        n_reg = multiple - n_cls % multiple  # NVlabs' rule: a full multiple when n_cls divides it
    else:
        n_reg = 0
    return n_cls, n_cls + n_reg


def _refuse_unsupported(vc: Mapping[str, Any], args: Mapping[str, Any], shapes: _VisionShapes) -> None:
    """Variants of RADIO whose maths this module does not implement: fail loudly rather than serve garbage."""
    problems = []
    if args.get("model_norm") or vc.get("model_norm") or shapes.final_norm:
        problems.append("a final norm (args.model_norm)")
    if vc.get("use_swiglu_ffn") or args.get("use_swiglu_ffn"):
        problems.append("a SwiGLU MLP")
    if vc.get("qk_normalization") or args.get("qk_normalization"):
        problems.append("qk normalization")
    if vc.get("hidden_act", "gelu") not in ("gelu", "gelu_pytorch"):
        problems.append(f"activation {vc.get('hidden_act')!r}")
    if vc.get("norm_type", "layer_norm") != "layer_norm":
        problems.append(f"norm {vc.get('norm_type')!r}")
    if vc.get("num_channels", 3) != 3:
        problems.append(f"{vc.get('num_channels')} input channels")
    if float(vc.get("layerscale_value", 1.0)) != 1.0:
        problems.append("layer scale")
    if problems:
        raise CheckpointError("unsupported RADIO variant: " + ", ".join(problems))


@dataclass
class _VisionShapes:
    """The counts the vision tower's tensors reveal (None where the tensor is absent)."""

    embed: tuple[int, int] | None = None
    width: int | None = None
    grid: int | None = None
    prefix: int | None = None
    depth: int | None = None
    fc1: int | None = None
    qkv_bias: bool | None = None
    proj_bias: bool | None = None
    final_norm: bool = False

    @classmethod
    def find(cls, tensor_shapes: Mapping[str, Sequence[int]]) -> _VisionShapes:
        names, prefix = None, None
        for spelling in (_NVIDIA_NAMES, _HF_NAMES):
            anchors = [spelling[k] for k in ("pos", "cls", "embed")]
            hits = {k[: -len(a)] for k in tensor_shapes for a in anchors if k.endswith(a)}
            if len(hits) > 1:
                raise CheckpointError(f"several RADIO towers in one checkpoint: {sorted(hits)}")
            if hits:
                names, prefix = spelling, hits.pop()
                break
        if names is None or prefix is None:
            return cls()

        def shape(key: str, rank: int, expected: str) -> tuple[int, ...] | None:
            found = tensor_shapes.get(prefix + key)
            if found is None:
                return None
            found = tuple(int(d) for d in found)
            if len(found) != rank:
                raise CheckpointError(f"{prefix}{key} has shape {list(found)}, expected {expected}")
            return found

        out = cls()
        pos = shape(names["pos"], 3, "[1, grid*grid, width]")
        token = shape(names["cls"], 2, "[prefix, width]")
        embed = shape(names["embed"], 2, "[width, 3*p*p]")
        if pos is not None:
            out.grid = math.isqrt(pos[1])
            if pos[0] != 1 or out.grid * out.grid != pos[1]:
                raise CheckpointError(f"{prefix}{names['pos']} has shape {list(pos)}, not a square grid")
        if token is not None:
            out.prefix = token[0]
        if embed is not None:
            out.embed = (embed[0], embed[1])
        widths = {k: v[-1] for k, v in ((names["pos"], pos), (names["cls"], token)) if v is not None}
        if embed is not None:
            widths[names["embed"]] = embed[0]
        if len(set(widths.values())) > 1:
            raise CheckpointError(f"RADIO tensors disagree on the width: {widths}")
        out.width = next(iter(widths.values()))
        pattern = re.compile(re.escape(prefix + names["blocks"]) + r"(\d+)\.")
        blocks = {int(m.group(1)) for k in tensor_shapes if (m := pattern.match(k))}
        if blocks:
            if blocks != set(range(max(blocks) + 1)):
                missing = sorted(set(range(max(blocks) + 1)) - blocks)
                raise CheckpointError(f"RADIO blocks {missing} are missing from the checkpoint")
            out.depth = max(blocks) + 1
            block0 = prefix + names["blocks"] + "0."
            fc1 = shape(names["blocks"] + "0." + names["fc1"], 2, "[mlp, width]")
            out.fc1 = fc1[0] if fc1 is not None else None
            out.qkv_bias = block0 + names["qkv_bias"] in tensor_shapes
            out.proj_bias = block0 + names["proj_bias"] in tensor_shapes
        out.final_norm = prefix + names["final_norm"] in tensor_shapes
        return out
