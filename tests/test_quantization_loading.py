"""Quantised tiny checkpoints (FP8 and NVFP4, text and VL) load, keep the layers their exclusion list
names in full precision, and compute what their tensors say.

The reference is independent of the loader and of kernels/: the BF16 twin checkpoint (same seed, so the
same tensors before quantisation) loaded in float32, each quantised layer's weight replaced by its
checkpoint tensors decoded here (E4M3 through torch's own float8 dtype, E2M1 through a table), and for
FP8 the activations quantised by a forward pre-hook with the layer's static input_scale.

Tolerances (the logits of the tiny models reach about 1.5), as fractions of the largest logit:
- NVFP4 (weight-only), and FP8 dequantised at load (the CPU default, activations not quantised): the same
  values multiplied in another order: 1e-5 (measured: 0).
- FP8 kept packed (`keep_packed=True`; Fp8Linear's reference path), activations quantised in both: float32
  sums in another order could move a value across an E4M3 rounding boundary in a later layer (one step
  is 1/16 of the value): 2e-3 (measured: 3e-7). Without quantising the activations the reference is 4%
  away, so the test does see them.
- Against the unquantised twin, a sanity check that only the quantisation error separates them: 10%
  (FP8; measured 6%) and 30% (NVFP4; measured 17%). Random tiny weights through 8 layers amplify it; an
  unrelated model is 100% or more away.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from glimpse.errors import CheckpointError
from glimpse.loader import checkpoint_files
from glimpse.model.loading import load_model
from glimpse.model.quant_linear import QUANTIZABLE_LINEARS, Fp8Linear, Nvfp4Linear
from glimpse.model.tiny import make_tiny
from tests.model.nemotron_reference import new_cache, run_chunks

IDS = [5, 17, 42, 99, 250, 7, 31, 64, 128, 300, 11, 23, 404, 56, 89, 144, 233, 377, 61, 2]
SEED = 5
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
QUANT_CLASSES = {"fp8": Fp8Linear, "nvfp4": Nvfp4Linear}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(vl, quantization or None) -> a tiny checkpoint of seed SEED; made on first use."""
    root = tmp_path_factory.mktemp("quantised")
    made = {}

    def get(vl: bool, quantization: str | None):
        key = (vl, quantization)
        if key not in made:
            name = f"{'vl' if vl else 'text'}-{quantization or 'bf16'}"
            made[key] = make_tiny(root / name, vl=vl, seed=SEED, quantization=quantization, shards=2)
        return made[key]

    return get


def checkpoint_state(ckpt) -> dict[str, torch.Tensor]:
    state = {}
    for f in checkpoint_files(ckpt):
        state.update(load_file(f))
    return state


def decode(state: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """The float32 weight of a quantised layer, from its checkpoint tensors."""
    w = state[layer + ".weight"]
    if w.dtype == torch.float8_e4m3fn:
        return w.float() * state[layer + ".weight_scale"].float()
    codes = torch.stack((w % 16, w // 16), dim=-1).flatten(-2).long()  # the low nibble is the first element
    scales = state[layer + ".weight_scale"].float().repeat_interleave(16, dim=-1)
    return torch.tensor(E2M1)[codes] * scales * state[layer + ".weight_scale_2"].float()


def quantise_activations(scale: torch.Tensor):
    def hook(module, args):
        x = args[0]
        return ((x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale,)

    return hook


def reference_model(checkpoints, vl: bool, quantization: str, activations: bool) -> torch.nn.Module:
    """The BF16 twin in float32 with the quantised checkpoint's weights decoded in; FP8 activations
    quantised with each layer's input_scale when `activations`."""
    model = load_model(checkpoints(vl, None), "cpu", torch.float32)
    state = checkpoint_state(checkpoints(vl, quantization))
    layers = sorted(n[: -len(".weight_scale")] for n in state if n.endswith(".weight_scale"))
    assert layers
    with torch.no_grad():
        for layer in layers:
            linear = model.get_submodule(layer)
            assert type(linear) is torch.nn.Linear
            linear.weight.copy_(decode(state, layer))
            if activations and quantization == "fp8":
                linear.register_forward_pre_hook(quantise_activations(state[layer + ".input_scale"].float()))
    return model


def logits(model) -> torch.Tensor:
    lm = model.language_model if hasattr(model, "language_model") else model
    with torch.no_grad():
        return run_chunks(lm, new_cache(lm.config), IDS, [12, 8], 0, torch.arange(16))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("vl", [False, True], ids=["text", "vl"])
@pytest.mark.parametrize("quantization", ["fp8", "nvfp4"])
def test_quantised_checkpoint_computes_what_its_tensors_say(checkpoints, vl, quantization, caplog):
    ckpt = checkpoints(vl, quantization)
    with caplog.at_level(logging.INFO, logger="glimpse.model.loading"):
        dequantised = load_model(ckpt, "cpu", torch.float32)  # the CPU default
        packed = load_model(ckpt, "cpu", torch.float32, keep_packed=True)
    algo = quantization.upper()
    assert f"loaded {algo} weights dequantised to float32:" in caplog.text
    assert f"loaded {algo} weights:" in caplog.text

    weights_only = logits(reference_model(checkpoints, vl, quantization, activations=False))
    assert relative_error(logits(dequantised), weights_only) < 1e-5
    if quantization == "nvfp4":  # weight-only: the packed layers compute the same
        assert relative_error(logits(packed), weights_only) < 1e-5
    else:
        with_activations = logits(reference_model(checkpoints, vl, quantization, activations=True))
        assert relative_error(logits(packed), with_activations) < 2e-3
    twin = logits(load_model(checkpoints(vl, None), "cpu", torch.float32))
    assert relative_error(logits(packed), twin) < (0.1 if quantization == "fp8" else 0.3)


@pytest.mark.parametrize("quantization", ["fp8", "nvfp4"])
def test_exclusion_list_is_honoured(checkpoints, quantization):
    """Vision tower, mlp1, conv1d, lm_head, embeddings and norms stay bf16; the language model's linears
    load packed (on disk and in the model)."""
    ckpt = checkpoints(True, quantization)
    on_disk = checkpoint_state(ckpt)
    for name, t in on_disk.items():
        if (
            name.startswith(("vision_model.", "mlp1."))
            or "conv1d" in name
            or "lm_head" in name
            or "norm" in name
        ):
            assert t.dtype in (torch.bfloat16, torch.float32), name
    model = load_model(ckpt, "cpu", torch.bfloat16, keep_packed=True)
    cls = QUANT_CLASSES[quantization]
    quantised = 0
    for name, module in model.named_modules():
        if type(module) in QUANTIZABLE_LINEARS:
            for leaf in QUANTIZABLE_LINEARS[type(module)]:
                assert type(getattr(module, leaf)) is cls, f"{name}.{leaf}"
                quantised += 1
        elif name.startswith(("vision_model", "mlp1")) or name.endswith(("conv1d", "lm_head", "embeddings")):
            assert not isinstance(module, (Fp8Linear, Nvfp4Linear)), name
            for pname, p in module.named_parameters():
                assert p.dtype == torch.bfloat16, f"{name}.{pname}"
    assert quantised == sum(n.endswith(".weight_scale") for n in on_disk)
    lm = model.language_model
    assert type(lm.lm_head) is torch.nn.Linear
    layer = lm.backbone.layers[0].mixer
    assert layer.in_proj.weight.dtype == (torch.float8_e4m3fn if quantization == "fp8" else torch.uint8)
    assert layer.in_proj.weight_scale.dtype == (
        torch.float32 if quantization == "fp8" else torch.float8_e4m3fn
    )
    assert layer.A_log.dtype == torch.float32 and layer.conv1d.weight.dtype == torch.bfloat16


def test_packed_weights_take_less_memory(checkpoints):
    from glimpse.loader import weight_memory_bytes

    def linear_bytes(model):
        return sum(
            weight_memory_bytes(model.get_submodule(n))
            for n, m in model.named_modules()
            if n.endswith("_proj")
        )

    bf16 = linear_bytes(load_model(checkpoints(False, None), "cpu", torch.bfloat16))
    fp8 = linear_bytes(load_model(checkpoints(False, "fp8"), "cpu", torch.bfloat16, keep_packed=True))
    nvfp4 = linear_bytes(load_model(checkpoints(False, "nvfp4"), "cpu", torch.bfloat16, keep_packed=True))
    # FP8: 1 byte a weight; NVFP4: half a byte plus one E4M3 scale per 16 (plus a few scalars each)
    assert abs(fp8 / bf16 - 0.5) < 0.01
    assert abs(nvfp4 / bf16 - (0.5 + 1 / 16) / 2) < 0.01


def test_flags_that_contradict_the_files_are_refused(checkpoints):
    with pytest.raises(CheckpointError, match="asks for an NVFP4 checkpoint, but this checkpoint is FP8"):
        load_model(checkpoints(False, "fp8"), "cpu", torch.float32, "modelopt_fp4")
    with pytest.raises(
        CheckpointError, match="asks for an FP8 checkpoint, but this checkpoint is not quantised"
    ):
        load_model(checkpoints(True, None), "cpu", torch.float32, "modelopt")
    with pytest.raises(ValueError, match="'fp4' is not supported"):
        load_model(checkpoints(False, "nvfp4"), "cpu", torch.float32, "fp4")
    model = load_model(checkpoints(False, "nvfp4"), "cpu", torch.float32, "modelopt_fp4", keep_packed=True)
    assert isinstance(model.backbone.layers[0].mixer.in_proj, Nvfp4Linear)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("keep_packed", [False, True])
def test_config_that_disagrees_with_the_tensors_is_named(checkpoints, tmp_path, keep_packed):
    """An NVFP4 config over bf16 tensors; an FP8 checkpoint with one layer left in bf16 that its
    exclusion list does not name."""
    ckpt = _copy(checkpoints(False, None), tmp_path / "bf16")
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    with pytest.raises(CheckpointError, match="(not quantised|bfloat16 on disk).*disagree"):
        load_model(ckpt, "cpu", torch.float32, keep_packed=keep_packed)

    fp8 = _copy(checkpoints(False, "fp8"), tmp_path / "fp8")
    layer = "backbone.layers.2.mixer.in_proj"
    for f in checkpoint_files(fp8):
        state = load_file(f)
        if layer + ".weight" in state:
            state[layer + ".weight"] = state[layer + ".weight"].to(torch.bfloat16)
            save_file(state, f)
    with pytest.raises(
        CheckpointError,
        match=r"(not quantised: \['backbone\.layers\.2|layers\.2\.mixer\.in_proj\.weight' is torch\.bfloat16 on disk)",
    ):
        load_model(fp8, "cpu", torch.float32, keep_packed=keep_packed)


@pytest.mark.parametrize("keep_packed", [False, True])
def test_a_quantised_layer_the_list_excludes_loads_dequantised(checkpoints, tmp_path, keep_packed):
    fp8 = _copy(checkpoints(False, "fp8"), tmp_path / "fp8")
    quant = json.loads((fp8 / "hf_quant_config.json").read_text())
    quant["quantization"]["exclude_modules"].append("*.layers.2.mixer.in_proj")
    (fp8 / "hf_quant_config.json").write_text(json.dumps(quant))
    model = load_model(fp8, "cpu", torch.float32, keep_packed=keep_packed)
    assert type(model.backbone.layers[2].mixer.in_proj) is torch.nn.Linear
    assert type(model.backbone.layers[0].mixer.in_proj) is (Fp8Linear if keep_packed else torch.nn.Linear)
    want = decode(checkpoint_state(fp8), layer := "backbone.layers.2.mixer.in_proj")
    torch.testing.assert_close(model.get_submodule(layer).weight, want, rtol=0, atol=0)


def test_scales_missing_from_the_checkpoint_are_named(checkpoints, tmp_path):
    ckpt = _copy(checkpoints(False, "fp8"), tmp_path / "fp8")
    victim = "backbone.layers.0.mixer.in_proj.input_scale"
    for f in checkpoint_files(ckpt):
        state = load_file(f)
        if victim in state:
            del state[victim]
            save_file(state, f)
            index = json.loads((ckpt / "model.safetensors.index.json").read_text())
            del index["weight_map"][victim]
            (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing.*in_proj\.input_scale"):
        load_model(ckpt, "cpu", torch.float32, keep_packed=True)
    load_model(ckpt, "cpu", torch.float32)  # dequantising needs only weight_scale


def test_config_json_quantization_config_loads(checkpoints, tmp_path):
    """modelopt's other spelling: config.json `quantization_config` with `ignore`."""
    ckpt = _copy(checkpoints(True, "nvfp4"), tmp_path / "nvfp4")
    section = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    (ckpt / "hf_quant_config.json").unlink()
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "ignore": section["exclude_modules"],
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    model = load_model(ckpt, "cpu", torch.float32, "modelopt_fp4", keep_packed=True)
    assert isinstance(model.language_model.backbone.layers[3].mixer.q_proj, Nvfp4Linear)


def test_engine_generates_from_a_quantised_checkpoint(checkpoints):
    from glimpse.engine.llm import LLM
    from glimpse.sampling_params import SamplingParams

    llm = LLM(str(checkpoints(False, "fp8")), max_num_seqs=2, max_model_len=256)
    out = llm.generate(["The chart shows"], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_other_one_byte_floats_are_refused(checkpoints, tmp_path):
    ckpt = _copy(checkpoints(False, "fp8"), tmp_path / "e5m2")
    victim = "backbone.layers.1.mixer.up_proj.weight"
    for f in checkpoint_files(ckpt):
        state = load_file(f)
        if victim in state:
            state[victim] = state[victim].float().to(torch.float8_e5m2)
            save_file(state, f)
    with pytest.raises(CheckpointError, match=r"up_proj\.weight' is torch\.float8_e5m2: not a format"):
        load_model(ckpt, "cpu", torch.float32)


def _logits_on(model, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Logits of every position of IDS, one prefill on `device` with caches in `dtype`."""
    from glimpse.engine.cache import allocate_cache_tensors
    from glimpse.model.batch import ForwardBatch

    lm = model.language_model if hasattr(model, "language_model") else model
    cache = allocate_cache_tensors(lm.config, 2, 16, 4, dtype, torch.float32, device)
    cache.conv_state.zero_()
    cache.ssm_state.zero_()
    n = len(IDS)
    batch = ForwardBatch(
        [n], [0], torch.tensor([0], device=device), torch.arange(8, device=device).view(1, -1)
    )
    ids = torch.tensor(IDS, device=device)
    with torch.no_grad():
        return lm(batch, cache, input_ids=ids, logits_indices=torch.arange(n, device=device)).float().cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vl", [False, True], ids=["text", "vl"])
@pytest.mark.parametrize("quantization", ["fp8", "nvfp4"])
def test_cuda_keeps_the_packed_weights_and_computes_the_same(checkpoints, vl, quantization):
    """On CUDA the quantised layers are the default (cuBLASLt FP8 / the Triton NVFP4 kernel): their
    logits in bf16 against the CPU's packed float32 path (the kernels' references), as fractions of the
    largest logit: NVFP4 3%, FP8 10% (on the CPU, bf16 against float32 is 1.1% for the bf16 twin, 0.7%
    for NVFP4 and 4% for FP8, whose activations' E4M3 rounding flips with bf16's)."""
    ckpt = checkpoints(vl, quantization)
    model = load_model(ckpt, "cuda", torch.bfloat16)
    cls = QUANT_CLASSES[quantization]
    quantised = [m for m in model.modules() if isinstance(m, cls)]
    assert quantised and all(m.weight.is_cuda and m.weight.element_size() == 1 for m in quantised)
    reference = load_model(ckpt, "cpu", torch.float32, keep_packed=True)
    want = _logits_on(reference, "cpu", torch.float32)
    got = _logits_on(model, "cuda", torch.bfloat16)
    assert relative_error(got, want) < (0.1 if quantization == "fp8" else 0.03)
