"""FP8 and NVFP4 on the GPU against the same weights dequantised to bf16, and how many long sequences each
precision holds: the accuracy and capacity figures of the quantised checkpoints.

For each precision the full-size model is built with random weights quantised as the published
checkpoints are (bench/random_model.py), then a second copy of it whose quantised linears are replaced by
bf16 linears holding the dequantised weights (every other tensor identical). FP8's static activation
scales are first calibrated on the reference's activations for the same prompts (amax / 448 per layer,
as modelopt calibrates), so the figure measures the format, not a guessed scale. Both run the same prompts
through the engine, greedy, eager (no CUDA graphs, so a hook sees every step's logits):
- agreement: per prompt, how many of the `steps` generated tokens match before the first difference, and
  the share of identical tokens;
- logit error: max |logits_q - logits_ref| / max |logits_ref| over every step both saw the same context
  (the prompt and the steps before the first difference).
Capacity: the cache budget the engine would get at gpu_memory_utilization 0.9 (weights, activation peak
and the CUDA context taken out), divided by what one `--seq-len`-token sequence holds (Mamba state + KV).

    python -m glimpse.bench.quant_accuracy --precisions bf16 fp8 nvfp4 --steps 128 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from torch import nn

from glimpse.bench.random_model import random_model
from glimpse.engine.cache import kv_bytes_per_token, state_bytes_per_sequence
from glimpse.engine.config import EngineConfig
from glimpse.engine.engine import LLMEngine
from glimpse.engine.memory import cache_budget
from glimpse.kernels.quant_formats import dequantize_fp8, dequantize_nvfp4
from glimpse.loader import weight_memory_bytes
from glimpse.model.quant_linear import Fp8Linear, Nvfp4Linear
from glimpse.sampling_params import SamplingParams


def dequantised_(model: nn.Module) -> nn.Module:
    """Replace every quantised linear of `model` by a bf16 nn.Linear holding its dequantised weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Fp8Linear):
            w = dequantize_fp8(module.weight, module.weight_scale)
        elif isinstance(module, Nvfp4Linear):
            w = dequantize_nvfp4(module.weight, module.weight_scale, module.weight_scale_2)
        else:
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=w.device, dtype=torch.bfloat16)  # fmt: skip
        with torch.no_grad():
            linear.weight.copy_(w)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        owner_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner_name) if owner_name else model, leaf, linear)
    return model


def _engine(model: nn.Module, **kw) -> LLMEngine:
    device = str(next(model.parameters()).device)
    cfg = EngineConfig.from_kwargs("<bench>", device=device, dtype="bfloat16", enable_prefix_caching=False,
                                   seed=0, **kw)  # fmt: skip
    return LLMEngine(cfg, model=model)


def greedy_with_logits(model: nn.Module, prompts: list[list[int]], steps: int) -> tuple[list, list]:
    """Greedy tokens of each prompt and the logits of every step ([steps + 1, vocab] per prompt: the prompt's
    last position, then each generated token's)."""
    head = next(m for name, m in model.named_modules() if name.endswith("lm_head"))
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float().cpu()))
    engine = _engine(model, max_num_seqs=len(prompts), enforce_eager=True, max_model_len=4096,
                     max_num_batched_tokens=8192)  # fmt: skip
    try:
        params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, detokenize=False)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    tokens[out.request_id] = list(out.outputs[0].token_ids)
    finally:
        hook.remove()
        engine.close()
    # every step ran all prompts (same lengths, admitted together): row i of each capture is prompt i
    logits = [
        torch.stack([c[i] for c in captured if c.shape[0] == len(prompts)]) for i in range(len(prompts))
    ]
    return [tokens[str(i)] for i in range(len(prompts))], logits


@torch.no_grad()
def calibrate_input_scales_(quant: nn.Module, ref: nn.Module, prompts: list[list[int]]) -> int:
    """Set each FP8 layer's static input_scale to amax / 448 of what its input holds when the dequantised
    reference reads `prompts` (what modelopt's calibration does; the random model's default scale would
    clamp or waste range). Returns the number of layers calibrated."""
    amax: dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in quant.named_modules() if isinstance(m, Fp8Linear)}

    def record(name):
        def hook(_module, inputs, _out):
            seen = inputs[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], seen) if name in amax else seen

        return hook

    hooks = [ref.get_submodule(name).register_forward_hook(record(name)) for name in layers]
    try:
        greedy_with_logits(ref, prompts, 1)
    finally:
        for h in hooks:
            h.remove()
    for name, layer in layers.items():
        layer.input_scale.copy_((amax[name] / 448.0).clamp(min=1e-12))
    return len(layers)


def compare(quant: nn.Module, ref: nn.Module, prompts: list[list[int]], steps: int) -> dict:
    q_tokens, q_logits = greedy_with_logits(quant, prompts, steps)
    r_tokens, r_logits = greedy_with_logits(ref, prompts, steps)
    first_diff, same, rel = [], [], 0.0
    for qt, rt, ql, rl in zip(q_tokens, r_tokens, q_logits, r_logits, strict=True):
        diff = next((i for i, (a, b) in enumerate(zip(qt, rt, strict=True)) if a != b), len(rt))
        first_diff.append(diff)
        same.append(sum(a == b for a, b in zip(qt, rt, strict=True)) / len(rt))
        shared = diff + 1  # logits of the prompt's last position and of the steps before the difference
        rel = max(rel, ((ql[:shared] - rl[:shared]).abs().max() / rl[:shared].abs().max()).item())
    return {
        "steps": steps, "prompts": len(prompts), "tokens_before_first_difference": first_diff,
        "identical_token_share": round(sum(same) / len(same), 4), "max_relative_logit_error": rel,
    }  # fmt: skip


def sequences_that_fit(model: nn.Module, seq_len: int, ssm_dtype: torch.dtype) -> dict:
    device = next(model.parameters()).device
    cfg = EngineConfig.from_kwargs("<bench>", device=str(device), dtype="bfloat16", max_model_len=seq_len,
                                   max_num_batched_tokens=8192, mamba_ssm_cache_dtype=str(ssm_dtype)[6:])  # fmt: skip
    budget = cache_budget(model, cfg, device, torch.bfloat16, ssm_dtype)
    config = model.llm_config
    per_seq = state_bytes_per_sequence(config, torch.bfloat16, ssm_dtype) + seq_len * kv_bytes_per_token(
        config, torch.bfloat16
    )
    return {"seq_len": seq_len, "ssm_dtype": str(ssm_dtype)[6:], "cache_GiB": round(budget / 2**30, 2),
            "bytes_per_sequence": per_seq, "sequences": budget // per_seq}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--precisions", nargs="+", default=["bf16", "fp8", "nvfp4"], choices=["bf16", "fp8", "nvfp4"]
    )
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=8192, help="sequence length for the capacity figure")
    ap.add_argument(
        "--arch", default="nemotron-nano-12b-v2", help="a random-weight preset of bench/random_model"
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for precision in args.precisions:
        quantization = None if precision == "bf16" else precision
        t0 = time.perf_counter()
        model = random_model(args.arch, args.device, torch.bfloat16, quantization=quantization)
        vocab = model.llm_config.vocab_size
        prompts = torch.randint(10, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
        row = {"precision": precision, "weight_GiB": round(weight_memory_bytes(model) / 2**30, 2),
               "build_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        row["capacity"] = [
            sequences_that_fit(model, args.seq_len, d) for d in (torch.float32, torch.bfloat16)
        ]
        if quantization:
            ref = dequantised_(
                random_model(args.arch, args.device, torch.bfloat16, quantization=quantization)
            )
            if quantization == "fp8":
                row["calibrated_input_scales"] = calibrate_input_scales_(model, ref, prompts)
            row["against_dequantised_bf16"] = compare(model, ref, prompts, args.steps)
            del ref
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            name = torch.cuda.get_device_name(0) if args.device == "cuda" else args.device
            json.dump({"device": name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
