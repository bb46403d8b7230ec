"""Prompt log-probabilities (SamplingParams.prompt_logprobs): each prompt token's logprob and the top k at
its position, checked against log_softmax of one direct forward pass over the whole prompt, and shown
the same whatever the engine does on the way (chunked prefill, batching, preemption, prefix caching)."""

from __future__ import annotations

import random

import pytest
import torch

from glimpse import SamplingParams
from glimpse.engine import sampler
from glimpse.engine.cache import BlockPool, CacheManager, SlotPool, allocate_cache_tensors
from glimpse.engine.config import EngineConfig
from glimpse.engine.engine import LLMEngine
from glimpse.engine.prefix_cache import PrefixCache, prompt_block_hashes, snapshot_points
from glimpse.engine.request import Request, Sequence
from glimpse.model.batch import ForwardBatch
from glimpse.outputs import Logprob, RequestOutput

# Both sides run the same float32 model on the CPU; only the packing of the tokens into steps differs
# (chunks, batch neighbours), which changes the order of some sums: differences stay around 1e-6.
ATOL = 1e-4
K = 3


def make_engine(**kw) -> LLMEngine:
    base = dict(model="tiny", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=2048,
                enable_prefix_caching=False)  # fmt: skip
    return LLMEngine(EngineConfig.from_kwargs(**(base | kw)))


def scoring(k: int = K, max_tokens: int = 2, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=k, n=n)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert engine.all_memory_free()
    return done


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(20, 480) for _ in range(n)]


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return make_engine()


def direct_logprobs(engine: LLMEngine, tokens: list[int]) -> torch.Tensor:
    """log_softmax (float32) of the model's logits at every position of `tokens`, from one forward pass
    over fresh caches: row i scores token i + 1."""
    config, bs = engine.config, engine.cfg.cache.block_size
    blocks = -(-len(tokens) // bs)
    cache = allocate_cache_tensors(config, 1, blocks, bs, engine.dtype, engine.ssm_dtype, engine.device)
    cache.conv_state.zero_()
    cache.ssm_state.zero_()
    batch = ForwardBatch([len(tokens)], [0], torch.tensor([0]), torch.arange(blocks).view(1, -1))
    with torch.inference_mode():
        logits = engine.model(batch, cache, input_ids=torch.tensor(tokens),
                              logits_indices=torch.arange(len(tokens)))  # fmt: skip
    return torch.log_softmax(logits.float(), dim=-1)


def assert_same(got: list[dict[int, Logprob] | None], want: list[dict[int, Logprob] | None]) -> None:
    assert len(got) == len(want) and got[0] is None and want[0] is None
    for i, (g, w) in enumerate(zip(got[1:], want[1:]), start=1):
        assert list(g) == list(w), f"position {i}: tokens {list(g)} != {list(w)}"
        for tid in g:
            assert g[tid].rank == w[tid].rank, f"position {i}, token {tid}"
            assert g[tid].logprob == pytest.approx(w[tid].logprob, abs=ATOL), f"position {i}, token {tid}"
            assert g[tid].decoded_token == w[tid].decoded_token


def test_prompt_logprobs_are_log_softmax_of_a_direct_forward(engine: LLMEngine):
    tokens = prompt(70, seed=1)
    out = run(engine, {"a": (tokens, scoring())})["a"]
    lp = direct_logprobs(engine, tokens)
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(tokens) and got[0] is None
    for i in range(1, len(tokens)):
        row, token = lp[i - 1], tokens[i]
        entry = got[i]
        assert list(entry)[0] == token, "the prompt token comes first"
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=ATOL)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        assert entry[token].decoded_token == engine.tokenizer.decode([token])
        top = row.topk(K)
        ranked = {tid: lp for tid, lp in entry.items() if lp.rank <= K}
        assert set(top.indices.tolist()) <= set(entry), f"position {i}: the top {K} are all there"
        for value, tid in zip(top.values.tolist(), top.indices.tolist()):
            assert ranked[tid].logprob == pytest.approx(value, abs=ATOL)
        assert len(entry) in (K, K + 1)  # the prompt token may be one of the top k
    # the output tokens are those of the same request without prompt logprobs
    plain = run(engine, {"b": (tokens, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))})["b"]
    assert plain.prompt_logprobs is None
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids


def test_k_zero_holds_only_the_prompt_token(engine: LLMEngine):
    tokens = prompt(12, seed=2)
    out = run(engine, {"a": (tokens, scoring(k=0))})["a"]
    assert [list(e) for e in out.prompt_logprobs[1:]] == [[t] for t in tokens[1:]]


def test_a_one_token_prompt_has_one_none(engine: LLMEngine):
    out = run(engine, {"a": ([42], scoring())})["a"]
    assert out.prompt_logprobs == [None]


def test_chunked_prefill_equals_one_pass(engine: LLMEngine):
    """A budget of 16 tokens cuts the prompts into chunks and packs them beside other requests (one of
    them decoding, one without prompt logprobs): each chunk scores its own positions."""
    work = {f"r{i}": (prompt(n, seed=10 + i), scoring(k=2 + i % 2)) for i, n in enumerate((70, 33, 17, 5))}
    work["plain"] = (prompt(40, seed=9), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    alone = {rid: run(engine, {rid: item})[rid] for rid, item in work.items()}
    chunked = run(make_engine(max_num_batched_tokens=16), work)
    for rid in work:
        assert chunked[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids
        if rid == "plain":
            assert chunked[rid].prompt_logprobs is None
        else:
            assert_same(chunked[rid].prompt_logprobs, alone[rid].prompt_logprobs)


def test_the_chunk_cap_for_scored_prompts(engine: LLMEngine, monkeypatch):
    """A scored prompt's chunks stay within PROMPT_LOGPROBS_CHUNK_TOKENS (the logits of a chunk are
    tokens x vocab), and the answer is the same."""
    from glimpse.engine import scheduler

    tokens = prompt(50, seed=3)
    want = run(engine, {"a": (tokens, scoring())})["a"]
    monkeypatch.setattr(scheduler, "PROMPT_LOGPROBS_CHUNK_TOKENS", 7)
    capped = make_engine()
    sizes: list[int] = []
    schedule = capped.scheduler.schedule

    def recording() -> scheduler.SchedulerOutput:
        out = schedule()
        sizes.extend(c.num_tokens for c in out.chunks if c.seq.is_prefilling)
        return out

    capped.scheduler.schedule = recording
    got = run(capped, {"a": (tokens, scoring())})["a"]
    assert max(sizes) == 7 and sum(sizes) == len(tokens)
    assert_same(got.prompt_logprobs, want.prompt_logprobs)


def test_preemption_equals_one_pass(engine: LLMEngine):
    """A cache too small for every request preempts some mid-prompt; recomputed, their prompt logprobs
    are neither lost nor doubled."""
    work = {f"r{i}": (prompt(60 + 7 * i, seed=20 + i), scoring(max_tokens=20)) for i in range(6)}
    alone = {rid: run(engine, {rid: item})[rid] for rid, item in work.items()}
    small = make_engine(max_num_batched_tokens=24, cache_memory_bytes=360_000, max_model_len=256)
    got = run(small, work)
    assert small.scheduler.num_preemptions > 0, "the cache was meant to be too small for all requests"
    for rid in work:
        assert got[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids
        assert_same(got[rid].prompt_logprobs, alone[rid].prompt_logprobs)


def test_prefix_caching_on_equals_off(engine: LLMEngine):
    """With prefix caching, a request that scores its prompt takes no hit for the positions it needs (the
    logits were never kept), so it equals the engine without a cache; requests that don't, still hit."""
    tokens = prompt(120, seed=4)
    cached = make_engine(enable_prefix_caching=True)
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    run(cached, {"warm": (tokens, plain)})  # the whole prompt is now in the cache
    got = run(cached, {"a": (tokens, scoring())})["a"]
    assert got.num_cached_tokens == 0
    assert_same(got.prompt_logprobs, run(engine, {"a": (tokens, scoring())})["a"].prompt_logprobs)
    again = run(cached, {"b": (tokens, plain)})["b"]
    assert again.num_cached_tokens > 0, "requests without prompt logprobs still use the cache"


def test_n_children_share_one_prompt_logprobs(engine: LLMEngine):
    tokens = prompt(40, seed=7)
    want = run(engine, {"a": (tokens, scoring())})["a"]
    cached = make_engine(enable_prefix_caching=True)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=3, ignore_eos=True, prompt_logprobs=K, n=3)
    got = run(cached, {"a": (tokens, params)})["a"]
    assert len(got.outputs) == 3
    assert_same(got.prompt_logprobs, want.prompt_logprobs)


# ------------------------------------------------------------------------------- the pieces on their own


def test_sampler_slices_give_the_same_answer(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(37, 50) * 4
    targets = torch.randint(0, 50, (37,)).tolist()
    whole = sampler.prompt_logprobs(logits, targets, 4)
    monkeypatch.setattr(sampler, "PROMPT_LOGPROBS_SLICE_ELEMENTS", 50 * 5)  # 5 rows at a time
    sliced = sampler.prompt_logprobs(logits, targets, 4)
    assert sliced == whole
    lp = torch.log_softmax(logits, dim=-1)
    for i, entry in enumerate(whole):
        assert entry[targets[i]].logprob == pytest.approx(lp[i, targets[i]].item(), abs=1e-6)
        assert entry[targets[i]].rank == int((lp[i] > lp[i, targets[i]]).sum()) + 1


def test_prompt_logprobs_are_validated():
    for bad in (-1, 1.5, "3"):  # no upper bound: a server caps it with --max-logprobs
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_prefix_match_stops_before_owed_positions():
    """The cache lookup of a scoring sequence covers no prompt position whose logits it still owes; once
    the prompt is scored (a preempted sequence readmitted), the hit is allowed again."""
    bs = 4
    tokens = list(range(1, 30))
    manager = CacheManager(BlockPool(32, bs), SlotPool(4), PrefixCache(), lambda s, d: None)

    def seq_for(params: SamplingParams) -> Sequence:
        req = Request("r", None, list(tokens), params, arrival=0)
        req.block_hashes = prompt_block_hashes(tokens, [], bs)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        seq = Sequence(0, req, 0, snapshot_points=snapshot_points(len(tokens), [], bs))
        req.sequences.append(seq)
        return seq

    warm = seq_for(SamplingParams())
    assert manager.admit(warm)
    for upto in (28, len(tokens)):  # the state exists only at chunk ends: a chunk ends at the snapshot
        assert manager.grow(warm, upto)
        warm.num_computed_tokens = upto
        manager.on_computed(warm)  # blocks, and a snapshot at the last full block (28 tokens)
    manager.free(warm)

    scoring_seq = seq_for(SamplingParams(prompt_logprobs=1))
    assert scoring_seq.max_cached_tokens == 0
    assert manager.admit(scoring_seq) and scoring_seq.num_computed_tokens == 0
    manager.free(scoring_seq)

    scored = seq_for(SamplingParams(prompt_logprobs=1))
    scored.request.prompt_logprobs += [{t: Logprob(0.0)} for t in tokens[1:]]  # already scored
    assert scored.prompt_logprobs_from is None and scored.max_cached_tokens == len(tokens) - 1
    assert manager.admit(scored) and scored.num_computed_tokens == 28
    manager.free(scored)


def test_token_texts_join_to_the_text(engine: LLMEngine):
    """With logprobs, CompletionOutput.token_texts is each output token's piece of `text`: sampled from the
    random model, outputs split characters and emit special tokens that the text skips."""
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, logprobs=0, n=8)
    out = run(engine, {"a": (prompt(10, seed=8), params)})["a"]
    pieces = [piece for c in out.outputs for piece in c.token_texts]
    for c in out.outputs:
        assert len(c.token_texts) == len(c.token_ids) and "".join(c.token_texts) == c.text
    assert "" in pieces, "some token added no text (a split character or a skipped special token)"
