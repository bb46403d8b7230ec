"""The vLLM-style offline API on the built-in tiny model: shapes of inputs and outputs, and the
engine's greedy tokens equal a plain loop over the model."""

from __future__ import annotations

import pytest
import torch

from glimpse import LLM, SamplingParams
from glimpse.model.batch import ForwardBatch
from tests.model.nemotron_reference import new_cache


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", max_num_seqs=8, max_model_len=2048)


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = new_cache(model.config, slots=1, blocks=64, block_size=16)
    table = torch.arange(64).view(1, -1)
    tokens, out = list(prompt), []
    with torch.no_grad():
        logits = model(
            ForwardBatch([len(tokens)], [0], torch.tensor([0]), table), cache, input_ids=torch.tensor(tokens)
        )
        for _ in range(n):
            nxt = int(logits[0].argmax())
            out.append(nxt)
            logits = model(
                ForwardBatch([1], [len(tokens)], torch.tensor([0]), table),
                cache,
                input_ids=torch.tensor([nxt]),
            )
            tokens.append(nxt)
    return out


def test_generate_returns_a_list_in_order(llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = ["The chart shows", "A", "Please extract the name and the date from this form"]
    outs = llm.generate(prompts, params)
    assert [o.prompt for o in outs] == prompts
    tok = llm.get_tokenizer()
    for o, p in zip(outs, prompts):
        assert o.finished and o.prompt_token_ids == tok.encode(p)
        c = o.outputs[0]
        assert c.index == 0 and len(c.token_ids) == 10 and c.finish_reason == "length"
        assert c.token_ids == plain_greedy(llm.engine.model, o.prompt_token_ids, 10)
    one = llm.generate("The chart shows", params)
    assert isinstance(one, list) and one[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_token_id_prompts_and_per_prompt_params(llm):
    outs = llm.generate(
        [{"prompt_token_ids": [40, 41, 42]}, {"prompt_token_ids": [50, 51]}],
        [
            SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        ],
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    assert outs[0].prompt_token_ids == [40, 41, 42]


def test_chat_renders_the_template_with_the_reasoning_switch(llm):
    params = SamplingParams(temperature=0, max_tokens=4)
    think = llm.chat([{"role": "user", "content": "Hi"}], params)[0]
    no_think = llm.chat(
        [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Hi"}], params
    )[0]
    kwarg_off = llm.chat(
        [{"role": "user", "content": "Hi"}], params, chat_template_kwargs={"enable_thinking": False}
    )[0]
    tok = llm.get_tokenizer()
    assert tok.decode(think.prompt_token_ids).endswith("<SPECIAL_11>Assistant\n<think>\n")
    assert tok.decode(no_think.prompt_token_ids).endswith("<SPECIAL_11>Assistant\n<think></think>")
    assert "/no_think" not in tok.decode(no_think.prompt_token_ids)
    assert tok.decode(kwarg_off.prompt_token_ids) == tok.decode(no_think.prompt_token_ids)
    many = llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], params)
    assert len(many) == 2


def test_prompt_over_the_context_is_refused_and_engine_stays_clean(llm):
    from glimpse.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="context is 2048 tokens"):
        llm.generate({"prompt_token_ids": [40] * 2048})
    assert llm.engine.all_memory_free()
    assert llm.generate("ok", SamplingParams(max_tokens=2))[0].finished


def test_max_tokens_stops_at_the_context(llm):
    out = llm.generate({"prompt_token_ids": [40] * 2040}, SamplingParams(max_tokens=None, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 8
