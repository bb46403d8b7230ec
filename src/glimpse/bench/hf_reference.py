"""transformers' NemotronHForCausalLM as a reference point for `glimpse bench` (its own process):
decode tokens/s at batch 1 after a short prompt, and prefill tokens/s. Prints one JSON line each."""

from __future__ import annotations

import argparse
import json
import math

import torch

from glimpse.bench.timing import time_eager


def build(arch: str | None, device: torch.device, dtype: torch.dtype):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from glimpse.bench.random_model import PRESETS
    from glimpse.model.tiny import tiny_text_config

    ours = PRESETS[arch]() if arch else tiny_text_config()
    d = ours.to_dict("transformers") | {"time_step_limit": (0.0, math.inf)}
    with torch.device(device):
        model = NemotronHForCausalLM(NemotronHConfig(**d)).to(dtype).eval()
    return model, ours


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--random-weights", default=None)
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, cfg = build(a.random_weights, device, dtype)
    ids = torch.randint(10, cfg.vocab_size, (1, a.prompt), device=device)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        seconds = time_eager(
            lambda: model.generate(ids, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=False),
            reps=1, warmup=0, device=device,
        ).seconds  # fmt: skip
        print(json.dumps({"scenario": "hf-reference-decode", "batch": 1, "prompt_len": a.prompt,
                          "tokens": a.decode, "tokens_per_s": a.decode / seconds}), flush=True)  # fmt: skip
        long = torch.randint(10, cfg.vocab_size, (1, a.prefill), device=device)
        model(long[:, :256])
        seconds = time_eager(lambda: model(long, logits_to_keep=1), reps=1, warmup=0, device=device).seconds
        print(json.dumps({"scenario": "hf-reference-prefill", "tokens": a.prefill, "seconds": seconds,
                          "tokens_per_s": a.prefill / seconds}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
