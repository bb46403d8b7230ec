"""AsyncLLM: the engine on its own thread behind async streams, as the server uses it."""

from __future__ import annotations

import asyncio

import pytest

from glimpse import SamplingParams
from glimpse.engine.async_llm import AsyncLLM
from glimpse.engine.config import EngineConfig
from glimpse.engine.engine import LLMEngine
from glimpse.errors import InvalidRequestError


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM(LLMEngine(EngineConfig.from_kwargs("tiny", max_model_len=512, max_num_seqs=16)))
    yield engine
    engine.shutdown()


async def collect(llm: AsyncLLM, prompt, params, rid=None):
    outs = []
    async for out in llm.generate(prompt, params, rid):
        outs.append(out)
    return outs


def test_concurrent_streams_match_sync_results(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(30, 30 + n))} for n in (5, 17, 40, 3, 22)]

    async def main():
        return await asyncio.gather(*(collect(llm, p, params) for p in prompts))

    streams = asyncio.run(main())
    for stream in streams:
        assert stream[-1].finished and len(stream[-1].outputs[0].token_ids) == 12
        # cumulative: each output extends the previous one
        tokens = [len(o.outputs[0].token_ids) for o in stream]
        assert tokens == sorted(tokens)
    # same answers as one at a time
    alone = [asyncio.run(collect(llm, p, params))[-1].outputs[0].token_ids for p in prompts]
    assert alone == [s[-1].outputs[0].token_ids for s in streams]


def test_leaving_the_stream_early_aborts_and_frees_memory(llm):
    async def main():
        agen = llm.generate(
            {"prompt_token_ids": list(range(30, 90))}, SamplingParams(max_tokens=400, ignore_eos=True)
        )
        seen = 0
        async for _ in agen:
            seen += 1
            if seen == 3:
                break
        await agen.aclose()
        for _ in range(200):
            if llm.is_idle():
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_errors_reach_the_caller_and_the_engine_keeps_serving(llm):
    async def main():
        with pytest.raises(InvalidRequestError, match="context"):
            await collect(llm, {"prompt_token_ids": [40] * 600}, SamplingParams(max_tokens=2))
        ok = await collect(llm, "still here", SamplingParams(max_tokens=3))
        return ok[-1]

    assert asyncio.run(main()).finished
