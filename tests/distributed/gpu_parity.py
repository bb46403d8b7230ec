"""Tensor-parallel parity and speed on GPUs (not a test: CI has none). Runs MODEL at TP=1 and at TP=N,
each in its own process, on the same prompts, and compares greedy tokens, top log-probabilities and
decode speed:

    python -m tests.distributed.gpu_parity MODEL [--tp 2] [--enforce-eager]

Greedy tokens may legitimately part after a near-tie in bf16 (the sums run in another order): the
report gives the first step where each prompt's tokens differ and the largest log-probability gap
before it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PROMPTS = [
    "Explain how a Mamba layer differs from attention, in three sentences.",
    "Write a haiku about tensor parallelism.",
    "List the first ten prime numbers and say why 1 is not one.",
    "The capital of France is",
] * 4


def run(model: str, tp: int, eager: bool, max_tokens: int) -> dict:
    from glimpse import LLM, SamplingParams

    llm = LLM(model, tensor_parallel_size=tp, enforce_eager=eager, max_num_seqs=64)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8))  # warm up
    start = time.perf_counter()
    outs = llm.generate(PROMPTS, params)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens_per_s": len(PROMPTS) * max_tokens / seconds,
        "slots": llm.engine.stats()["state_slots_total"],
        "blocks": llm.engine.stats()["kv_blocks_total"],
        "tokens": [o.outputs[0].token_ids for o in outs],
        "logprobs": [
            [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(run(a.model, a.child, a.enforce_eager, a.max_tokens)))
        return 0
    results = {}
    for tp in (1, a.tp):
        cmd = [sys.executable, "-m", "tests.distributed.gpu_parity", a.model, "--child", str(tp),
               "--max-tokens", str(a.max_tokens)] + (["--enforce-eager"] if a.enforce_eager else [])  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[tp] = json.loads(out.strip().splitlines()[-1])
    one, many = results[1], results[a.tp]
    same = sum(x == y for x, y in zip(one["tokens"], many["tokens"]))
    print(f"greedy tokens identical for {same}/{len(PROMPTS)} prompts")
    for i, (x, y) in enumerate(zip(one["tokens"], many["tokens"])):
        first = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
        gap = max(
            (abs(u - v) for u, v in zip(one["logprobs"][i][:first], many["logprobs"][i][:first])), default=0
        )
        print(f"prompt {i}: first difference at step {first if first < len(x) else '-'}, "
              f"max |logprob gap| before it {gap:.3g}")  # fmt: skip
    for tp, r in results.items():
        print(f"TP={tp}: {r['tokens_per_s']:.1f} tok/s ({len(PROMPTS)} x {a.max_tokens} tokens in "
              f"{r['seconds']:.2f} s), {r['slots']} state slots, {r['blocks']} KV blocks per GPU")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
