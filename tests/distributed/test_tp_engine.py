"""`LLM(..., tensor_parallel_size=N)` on the CPU (gloo, one process per rank) gives the greedy tokens of
`tensor_parallel_size=1` and log-probabilities within 1e-4: single prompts, packed batches, chunked
prefill, prefix-cache hits, async decode steps, images and a video with EVS, FP8 and NVFP4 checkpoints.
A follower rank killed mid-request makes the engine fail with the reason, in bounded time."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from glimpse import LLM, SamplingParams
from glimpse.distributed.workers import WorkerLostError
from glimpse.model.tiny import make_tiny

TOLERANCE = 1e-4
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
# On the CPU (gloo, float32) whatever the machine has; small steps, so a long prompt is prefilled in
# chunks and several prompts share a step.
ENGINE = {"device": "cpu", "max_num_seqs": 4, "max_num_batched_tokens": 48}

LONG = "The chart shows revenue growing every quarter of the year. " * 6  # ~70 tokens: two chunks or more
IMAGE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
PROMPTS = ["Hello", "What is the total on the invoice?", LONG, "Summarise the page in three sentences."]


def assert_same(want, got) -> None:
    """Same greedy tokens, and each step's top log-probabilities within TOLERANCE."""
    for w, g in zip(want, got, strict=True):
        for wc, gc in zip(w.outputs, g.outputs, strict=True):
            assert gc.token_ids == wc.token_ids
            for wl, gl in zip(wc.logprobs, gc.logprobs, strict=True):
                assert wl.keys() == gl.keys()
                assert max(abs(wl[t].logprob - gl[t].logprob) for t in wl) < TOLERANCE


def pair(model: str, size: int = 2, **kwargs):
    """The same model unsplit and split `size` ways, with the same engine settings."""
    whole = LLM(model, **ENGINE, **kwargs)
    split = LLM(model, **ENGINE, **kwargs, tensor_parallel_size=size)
    return whole, split


@pytest.fixture(scope="class")
def text():
    """One split engine for the class (a process holds one tensor-parallel group at a time)."""
    whole, split = pair("tiny")
    yield whole, split
    split.engine.close()


class TestText:
    def test_single_prompt_packed_batch_and_chunked_prefill(self, text):
        whole, split = text
        assert_same(whole.generate(PROMPTS[:1], GREEDY), split.generate(PROMPTS[:1], GREEDY))
        # four prompts in one run: packed steps, the long one prefilled in chunks of 48 tokens
        assert_same(whole.generate(PROMPTS, GREEDY), split.generate(PROMPTS, GREEDY))
        assert split.engine.stats()["state_slots_total"] == whole.engine.stats()["state_slots_total"]

    def test_prefix_cache_hit(self, text):
        whole, split = text
        prompt = LONG + "And the second half?"
        assert_same(whole.generate(prompt, GREEDY), split.generate(prompt, GREEDY))
        before = split.engine.stats()["prefix_cache_hit_tokens"]
        again = split.generate(prompt, GREEDY)  # its blocks and a Mamba snapshot come from the cache
        assert split.engine.stats()["prefix_cache_hit_tokens"] > before
        assert_same(whole.generate(prompt, GREEDY), again)

    def test_async_decode_steps(self, text):
        whole, split = text
        split.engine.async_scheduling = True  # off by default without CUDA graphs; the eager launch path
        try:
            params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
            steps = split.engine.num_async_steps
            got = split.generate(PROMPTS[:2], params)
            assert split.engine.num_async_steps > steps
        finally:
            split.engine.async_scheduling = False
        want = whole.generate(PROMPTS[:2], params)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]

    def test_a_second_split_engine_in_the_process_is_refused(self, text):
        with pytest.raises(RuntimeError, match="already running in this process"):
            LLM("tiny", device="cpu", tensor_parallel_size=2)


def frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    first = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = [first]
    for _ in range(n - 1):  # small changes, so EVS has something to prune
        nxt = out[-1].copy()
        nxt[rng.integers(0, 64), :] = rng.integers(0, 256, (64, 3), dtype=np.uint8)
        out.append(nxt)
    return out


def test_vl_image_and_video_with_evs():
    whole, split = pair("tiny-vl")
    try:
        prompts = [
            {"prompt": "<image>What is in the picture?", "multi_modal_data": {"image": IMAGE}},
            {
                "prompt": "<video>What changed?",
                "multi_modal_data": {"video": frames(2)},
                "video_pruning_rate": 0.5,
            },
        ]
        want, got = whole.generate(prompts, GREEDY), split.generate(prompts, GREEDY)
        assert got[1].video_tokens["kept"] < got[1].video_tokens["total"]
        assert_same(want, got)
    finally:
        split.engine.close()


@pytest.mark.parametrize("quantization", ["fp8", "nvfp4"])
def test_quantised_checkpoints(tmp_path_factory, quantization):
    model = str(make_tiny(tmp_path_factory.mktemp(quantization), vl=True, quantization=quantization))
    whole, split = pair(model)
    try:
        assert_same(whole.generate(PROMPTS[:2], GREEDY), split.generate(PROMPTS[:2], GREEDY))
    finally:
        split.engine.close()


def test_four_ranks(tiny4_vl):
    """The VL model (4 Mamba groups) split four ways: 2 KV heads, so each is held by two ranks."""
    whole, split = pair(tiny4_vl, 4)
    try:
        prompts = [
            PROMPTS[2],
            {"prompt": "<image>What is in the picture?", "multi_modal_data": {"image": IMAGE}},
        ]
        assert_same(whole.generate(prompts, GREEDY), split.generate(prompts, GREEDY))
    finally:
        split.engine.close()


def test_a_size_the_model_cannot_take_is_refused():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not fit this model: n_groups \(2\)"):
        LLM("tiny", device="cpu", tensor_parallel_size=4)


def test_a_dead_rank_fails_the_request_with_the_reason():
    llm = LLM("tiny", **ENGINE, tensor_parallel_size=2)
    follower = llm.engine.tp_leader.followers.procs[0]
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            llm.generate("Hello", SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True))
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(1.0)  # mid-request: it decodes for much longer than this
    assert thread.is_alive()
    killed = time.monotonic()
    os.kill(follower.pid, signal.SIGKILL)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the engine hung on a dead rank"
    assert time.monotonic() - killed < 30
    assert len(errors) == 1 and isinstance(errors[0], WorkerLostError), errors
    assert "tensor-parallel rank 1" in str(errors[0]) and "exited with code -9" in str(errors[0])
    assert llm.engine.fatal_error is not None
    with pytest.raises(WorkerLostError, match="rank 1"):  # and every later request is told the same
        llm.generate("Hello", GREEDY)
    llm.engine.close()
