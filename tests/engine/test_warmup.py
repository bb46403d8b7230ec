"""The start-up warm-up (engine/warmup.py) walks its shapes and leaves no trace: afterwards the engine is
idle with every block and slot free, the /metrics counters read zero, and requests give the same tokens
and log-probabilities as on an engine that never warmed up. (On the CPU the engine skips it: nothing
compiles there; the test forces it.)"""

from __future__ import annotations

import pytest

from glimpse.engine.llm import LLM
from glimpse.engine.warmup import warm_up
from glimpse.sampling_params import SamplingParams


@pytest.mark.parametrize("model", ["tiny", "tiny-vl"])
def test_warm_up_leaves_no_trace(model):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=2, ignore_eos=True)
    prompts = ["The chart shows", "Once upon a time, in a land far away, there lived"]
    kw = dict(max_num_seqs=4, max_model_len=512, max_num_batched_tokens=256)

    cold = LLM(model, **kw)
    expected = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in cold.generate(prompts, params)]

    warm = LLM(model, **kw)
    engine = warm.engine
    assert engine.cfg.scheduler.warmup and engine.startup_seconds["warmup"] == 0.0  # skipped on the CPU
    assert warm_up(engine, any_device=True) > 0
    assert engine.runner.num_forward_tokens == 0 and engine.prefix_cache.queries == 0
    assert engine.all_memory_free() and not engine.has_unfinished()
    got = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in warm.generate(prompts, params)]
    assert got == expected
