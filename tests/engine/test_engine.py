"""The engine under load: batching, chunking, preemption, prefix caching and memory accounting,
each checked against the same requests served alone (greedy, so outputs must be identical)."""

from __future__ import annotations

import random

import pytest

from glimpse import SamplingParams
from glimpse.engine.config import EngineConfig
from glimpse.engine.engine import LLMEngine


def make_engine(**kw) -> LLMEngine:
    base = dict(model="tiny", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=2048)
    return LLMEngine(EngineConfig.from_kwargs(**(base | kw)))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def run_alone(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("alone", prompt, params)
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    return out.outputs[0].token_ids


def random_prompts(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(20, 480) for _ in range(rng.randint(3, 120))], rng.randint(1, 40)) for _ in range(n)
    ]


@pytest.fixture(scope="module")
def reference_engine():
    return make_engine(enable_prefix_caching=False)


def serve_together(engine: LLMEngine, work: list[tuple[list[int], int]], seed: int) -> dict[str, list[int]]:
    """Requests arrive a few at a time while others run; returns every request's tokens."""
    rng = random.Random(seed)
    pending = list(enumerate(work))
    done: dict[str, list[int]] = {}
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                i, (prompt, n) = pending.pop(0)
                engine.add_request(f"r{i}", prompt, greedy(n))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def test_batched_chunked_preempted_equals_alone(reference_engine):
    work = random_prompts(14, seed=1)
    expected = {f"r{i}": run_alone(reference_engine, p, greedy(n)) for i, (p, n) in enumerate(work)}
    # a tiny token budget forces chunked prefill; a tiny cache forces preemption
    engine = make_engine(max_num_batched_tokens=24, cache_memory_bytes=360_000, max_model_len=256,
                         enable_prefix_caching=False)  # fmt: skip
    got = serve_together(engine, work, seed=2)
    assert got == expected
    assert engine.scheduler.num_preemptions > 0, "the cache was meant to be too small for all requests"
    assert engine.all_memory_free()


def test_prefix_cache_equals_no_cache_and_saves_compute(reference_engine):
    rng = random.Random(3)
    system = [rng.randrange(20, 480) for _ in range(100)]  # a shared "system prompt" of 100 tokens
    prompts = [system + [rng.randrange(20, 480) for _ in range(rng.randint(1, 30))] for _ in range(5)]
    prompts.append(list(prompts[0]))  # and an exact repeat
    expected = [run_alone(reference_engine, p, greedy(8)) for p in prompts]

    engine = make_engine(enable_prefix_caching=True)
    got, computed = [], []
    for i, p in enumerate(prompts):
        before = engine.runner.num_forward_tokens
        engine.add_request(f"p{i}", p, greedy(8))
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    got.append(o.outputs[0].token_ids)
                    cached = o.num_cached_tokens
        computed.append((engine.runner.num_forward_tokens - before, cached))
    assert got == expected
    first_cost = computed[0][0]
    assert computed[0][1] == 0
    # The second prompt finds 6 shared blocks (96 tokens) but no state snapshot there: it computes everything
    # and snapshots at 96; the next ones resume from it. The exact repeat resumes at the first prompt's own
    # last full block.
    assert computed[1][1] == 0
    for cost, cached in computed[2:5]:
        assert cached == 96 and cost < first_cost - 80
    assert computed[5][1] == (len(prompts[0]) - 1) // 16 * 16
    assert engine.all_memory_free()
    stats = engine.stats()
    assert (
        stats["prefix_cache_hit_tokens"] == 3 * 96 + computed[5][1] and stats["prefix_cache_snapshots"] >= 2
    )
    assert stats["prefix_cache_bytes"] > 0


def test_prefix_cache_under_memory_pressure_stays_correct(reference_engine):
    """Cached blocks and snapshots are evicted when running sequences need the memory; outputs unchanged."""
    rng = random.Random(4)
    shared = [rng.randrange(20, 480) for _ in range(40)]
    work = [
        (shared + [rng.randrange(20, 480) for _ in range(rng.randint(1, 60))], rng.randint(1, 30))
        for _ in range(12)
    ]
    expected = {f"r{i}": run_alone(reference_engine, p, greedy(n)) for i, (p, n) in enumerate(work)}
    engine = make_engine(max_num_batched_tokens=32, cache_memory_bytes=400_000, max_model_len=256)
    assert serve_together(engine, work, seed=5) == expected
    assert engine.all_memory_free()


def test_abort_frees_memory_at_once():
    engine = make_engine()
    for i in range(4):
        engine.add_request(f"a{i}", list(range(30, 90)), greedy(50))
    engine.step()
    engine.step()
    outs = [engine.abort(f"a{i}") for i in range(4)]
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert engine.all_memory_free() and not engine.has_unfinished()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    engine = make_engine()
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)

    def run(extra: int) -> list[int]:
        engine.add_request("seeded", list(range(40, 60)), params)
        for i in range(extra):  # other, unseeded requests around it
            engine.add_request(f"noise{i}", list(range(100, 100 + 5 + i)), SamplingParams(max_tokens=30 - i))
        result = None
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == "seeded" and o.finished:
                    result = o.outputs[0].token_ids
        return result

    alone = run(0)
    assert run(3) == alone and run(6) == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    a = run_alone(engine, list(range(40, 60)), unseeded)
    b = run_alone(engine, list(range(40, 60)), unseeded)
    assert a != b  # unseeded draws continue one stream


def test_n_children_stop_strings_and_logprobs():
    engine = make_engine()
    tok = engine.tokenizer
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, logprobs=2, ignore_eos=True)
    engine.add_request("n", tok.encode("The chart shows"), params)
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) == 12
        for tid, lp in zip(c.token_ids, c.logprobs):
            assert tid in lp and len(lp) in (2, 3)  # the sampled token plus the top 2
            assert all(v.logprob <= 0 and v.rank >= 1 for v in lp.values())
        assert c.cumulative_logprob == pytest.approx(
            sum(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs))
        )

    # a stop string taken from what greedy decoding produces: the text ends right before it
    free = run_alone(engine, tok.encode("Summarise the page"), greedy(30))
    text = tok.decode(free)
    stop = text[10:14]
    assert stop and stop.strip()
    engine.add_request(
        "s", tok.encode("Summarise the page"), SamplingParams(temperature=0, max_tokens=30, stop=[stop])
    )
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[: text.index(stop)] and stop not in c.text
    assert engine.all_memory_free()


def test_stop_token_ids_and_min_tokens():
    engine = make_engine()
    free = run_alone(engine, list(range(40, 60)), greedy(20))
    target = free[5]
    engine.add_request(
        "t", list(range(40, 60)), SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[target])
    )
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    c = out.outputs[0]
    first = free.index(target)
    assert c.finish_reason == "stop" and c.stop_reason == target and c.token_ids == free[: first + 1]


def test_structured_output_json_schema_and_regex():
    import json
    import re

    import jsonschema

    engine = make_engine()
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "name": {"type": "string", "maxLength": 8},
            "kind": {"enum": ["invoice", "receipt"]},
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 99},
                "maxItems": 3,
            },
        },
        "required": ["ok", "name", "kind", "items"],
        "additionalProperties": False,
    }
    tok = engine.tokenizer
    for seed in range(4):
        engine.add_request(f"j{seed}", tok.encode("JSON please"),
                           SamplingParams(temperature=1.0, seed=seed, max_tokens=120, json_schema=schema))  # fmt: skip
        engine.add_request(f"r{seed}", tok.encode("code"),
                           SamplingParams(temperature=1.0, seed=seed, max_tokens=40, regex=r"[0-9]{3}-[a-z]{2,4}"))  # fmt: skip
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o.outputs[0]
    for seed in range(4):
        j, r = outs[f"j{seed}"], outs[f"r{seed}"]
        assert j.finish_reason == "stop"
        jsonschema.validate(json.loads(j.text), schema)
        assert r.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", r.text), r.text
    assert engine.all_memory_free()


def test_constraint_starts_after_the_reasoning_closes():
    import re

    engine = make_engine()
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True), add_special_tokens=False)  # fmt: skip
    assert tok.decode(prompt).endswith("<think>\n")
    thinking = tok.encode("let me see</think>", add_special_tokens=False)
    params = SamplingParams(
        temperature=1.0, seed=3, max_tokens=60, regex=r"[a-c]{5}", forced_token_ids=thinking
    )
    engine.add_request("t", prompt, params)
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o.outputs[0]
    reasoning, _, answer = out.text.partition("</think>")
    assert reasoning == "let me see" and re.fullmatch(r"[a-c]{5}", answer), out.text


def test_invalid_schema_is_a_400():
    from glimpse.errors import InvalidRequestError

    engine = make_engine()
    with pytest.raises(InvalidRequestError):
        engine.add_request(
            "bad", [40, 41], SamplingParams(json_schema={"type": "integer", "minimum": 5, "maximum": 1})
        )
    assert not engine.has_unfinished() and engine.all_memory_free()
