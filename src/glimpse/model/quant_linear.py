"""The language model's quantised linear layers: they hold a modelopt checkpoint's packed weights and
multiply with them (kernels/quant_linear.py), so no full-precision copy of those weights ever exists.

Which layers: Mamba in_proj/out_proj, attention q/k/v/o and MLP up/down, less those the checkpoint's
exclusion list names (glimpse.quantization). The tensor names are the checkpoint's (`X.weight`,
`X.weight_scale`, `X.input_scale`, `X.weight_scale_2`), so the loader fills them as it finds them.

Our in_proj is one tensor on disk with one weight_scale and one input_scale for its five parts (z, x, B,
C, dt), and q/k/v are separate layers: no layer here runs parts with different scales as one matmul.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from glimpse.errors import CheckpointError
from glimpse.kernels.quant_formats import NVFP4_GROUP, dequantize_fp8, dequantize_nvfp4
from glimpse.kernels.quant_linear import fp8_linear, nvfp4_linear
from glimpse.model.attention import Attention
from glimpse.model.mamba2 import Mamba2Mixer
from glimpse.model.nemotron_h import MLP
from glimpse.quantization import NANO_VL_FP8_EXCLUDE, QuantAlgo, QuantConfig

QUANTIZABLE_LINEARS: dict[type[nn.Module], tuple[str, ...]] = {
    Mamba2Mixer: ("in_proj", "out_proj"),
    Attention: ("q_proj", "k_proj", "v_proj", "o_proj"),
    MLP: ("up_proj", "down_proj"),
}
"""The linear layers of each language-model block that a modelopt checkpoint may quantise."""


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _QuantLinear(nn.Module):
    """y = x @ Wᵀ (+ bias) with W packed; the bias, when there is one, stays in the model dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype)) if bias else None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


class Fp8Linear(_QuantLinear):
    """modelopt FP8: weight float8_e4m3fn [out, in], one fp32 weight_scale, one static fp32 input_scale:
    y = (fp8(x / s_in) @ e4m3(W)ᵀ) · s_in · s_w."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.weight = _frozen(torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.weight_scale = _frozen(torch.ones((), dtype=torch.float32))
        self.input_scale = _frozen(torch.ones((), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(fp8_linear(x, self.weight, self.weight_scale, self.input_scale))


class Nvfp4Linear(_QuantLinear):
    """modelopt NVFP4, served weight-only: weight uint8 [out, in/2] (two E2M1 codes a byte), weight_scale
    float8_e4m3fn [out, in/16], weight_scale_2 fp32; W = e2m1 · weight_scale · weight_scale_2, y = x @ Wᵀ.
    input_scale (for FP4 activations, which Hopper cannot multiply) is kept but not used."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        if in_features % NVFP4_GROUP:
            raise CheckpointError(f"NVFP4 needs in_features a multiple of {NVFP4_GROUP}, got {in_features}")
        groups = in_features // NVFP4_GROUP
        self.weight = _frozen(torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.weight_scale = _frozen(torch.zeros(out_features, groups, dtype=torch.float8_e4m3fn))
        self.weight_scale_2 = _frozen(torch.ones((), dtype=torch.float32))
        self.input_scale = _frozen(torch.ones((), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(nvfp4_linear(x, self.weight, self.weight_scale, self.weight_scale_2))


QUANT_LINEARS: dict[str, type[_QuantLinear]] = {"FP8": Fp8Linear, "NVFP4": Nvfp4Linear}

Quantization = Literal["fp8", "nvfp4"]
"""The formats a model can be made in (tiny checkpoints, the benchmark's random weights)."""
QUANT_ALGOS: dict[str, QuantAlgo] = {"fp8": "FP8", "nvfp4": "NVFP4"}


def published_quant_config(quantization: Quantization) -> QuantConfig:
    """The quantisation NVIDIA publishes Nano VL in, for making models like it: the FP8 checkpoint's
    exclusion list (its NVFP4 list was not found; the same one is assumed), NVFP4 in groups of 16."""
    algo = QUANT_ALGOS[quantization]
    return QuantConfig(algo, NVFP4_GROUP if algo == "NVFP4" else None, NANO_VL_FP8_EXCLUDE)


def check_group_size(quant: QuantConfig) -> None:
    if quant.algo == "NVFP4" and quant.group_size not in (None, NVFP4_GROUP):
        raise CheckpointError(
            f"NVFP4 with group_size {quant.group_size} is not supported (only {NVFP4_GROUP})"
        )


def quantized_linear_names(model: nn.Module, quant: QuantConfig, prefix: str = "") -> list[str]:
    """Names (in `model`) of the linear layers the checkpoint quantises: every quantisable one that its
    exclusion list does not name; `prefix` is `model`'s own name in the checkpoint's model, if any."""
    names = []
    for owner, module in model.named_modules():
        for leaf in QUANTIZABLE_LINEARS.get(type(module), ()):
            name = f"{owner}.{leaf}" if owner else leaf
            if not quant.is_excluded(prefix + name):
                names.append(name)
    return names


def replace_quantized_linears(model: nn.Module, quant: QuantConfig) -> list[str]:
    """Put an Fp8Linear / Nvfp4Linear (on the same device, meta included) in the place of each nn.Linear
    the checkpoint quantises, before its weights are loaded. Returns their names."""
    check_group_size(quant)
    cls = QUANT_LINEARS[quant.algo]
    names = quantized_linear_names(model, quant)
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        linear = getattr(owner, leaf)
        bias = linear.bias is not None
        with torch.device(linear.weight.device):
            quantized = cls(
                linear.in_features, linear.out_features, bias, linear.weight.dtype if bias else None
            )
        setattr(owner, leaf, quantized)
    return names


def dequantize_weight(
    ckpt_name: str, packed: torch.Tensor, read_beside: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    """A packed weight in fp32 (loading into a full-precision layer: on the CPU, or a layer the exclusion
    list keeps): FP8 with its weight_scale, NVFP4 with weight_scale and weight_scale_2."""
    if packed.dtype == torch.float8_e4m3fn:
        return dequantize_fp8(packed, read_beside("weight_scale"))
    if packed.dtype == torch.uint8:
        return dequantize_nvfp4(packed, read_beside("weight_scale"), read_beside("weight_scale_2"))
    raise CheckpointError(f"tensor {ckpt_name!r} has dtype {packed.dtype}, not an FP8 or NVFP4 weight")


def weight_precision(model: nn.Module) -> str:
    """How the model's linear weights are held: `FP8` / `NVFP4` when it has quantised layers, else the
    language model head's dtype (`bfloat16`, `float32`)."""
    kinds = {type(m) for m in model.modules()}
    for algo, cls in QUANT_LINEARS.items():
        if cls in kinds:
            return algo
    head = next(m for name, m in model.named_modules() if name.endswith("lm_head"))
    return str(head.weight.dtype).removeprefix("torch.")
