"""The sampler: greedy, distributions, filters, penalties, masks, seeds, logprobs, forced tokens."""

from __future__ import annotations

import math

import pytest
import torch

from glimpse.engine.sampler import (
    Sampler,
    SequenceSamplingState,
    make_generator,
    process_logits,
    sample,
)
from glimpse.sampling_params import SamplingParams

EOS = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def state(prompt: list[int] | None = None, output: list[int] | None = None, child: int = 0, **kw):
    """A state whose generator (if seeded) is made lazily on the logits' device."""
    params = SamplingParams(**kw)
    return SequenceSamplingState(params, prompt or [], list(output or []), child_index=child)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax_with_ties_to_lowest_id(device):
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    logits[3, 7] = logits[3, 30] = 100.0  # tie
    out = sample(logits.to(device), [state(temperature=0) for _ in range(8)], [EOS])
    expected = logits.argmax(-1).tolist()
    expected[3] = 7
    assert out.token_ids == expected


def test_bf16_logits_are_accepted(device):
    logits = torch.randn(3, 40).to(torch.bfloat16)
    out = sample(logits.to(device), [state(temperature=0, logprobs=2) for _ in range(3)], [EOS])
    assert out.token_ids == logits.float().argmax(-1).tolist()


LOGITS5 = torch.tensor([1.0, 0.5, 0.0, -0.5, -2.0])


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_sampling_matches_softmax(seeded: bool, device):
    temperature = 0.7
    rows = 3000 if seeded else 20000
    states = [state(temperature=temperature, seed=i if seeded else None) for i in range(rows)]
    out = Sampler(seed=1234)(LOGITS5.expand(rows, 5).to(device), states, [])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).float()
    # df = 4: P(chi2 > 25) is about 5e-5, and the draws are seeded, so this never flakes.
    assert chi_square(counts, torch.softmax(LOGITS5 / temperature, -1)) < 25


PROBS8 = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.01])


@pytest.mark.parametrize(
    "kw,allowed",
    [
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_k": 1}, {0}),
        ({"top_p": 0.6}, {0, 1}),
        ({"top_p": 0.7}, {0, 1, 2}),
        ({"top_p": 0.3}, {0}),
        ({"min_p": 0.3}, {0, 1, 2}),  # p >= 0.12
        ({"min_p": 0.5}, {0, 1}),  # p >= 0.2
        # top_k 5 renormalises (0.4/0.95...), top_p keeps 4 (mass before the 4th: 0.84), min_p 0.2 of
        # the renormalised max (0.4/0.9) drops nothing more.
        ({"top_k": 5, "top_p": 0.85, "min_p": 0.2}, {0, 1, 2, 3}),
        ({"top_k": 5, "top_p": 0.85, "min_p": 0.3}, {0, 1, 2}),
        ({"top_k": 0}, set(range(8))),
    ],
)
def test_filters_never_pick_excluded_tokens(kw, allowed, device):
    rows = 4000
    states = [state(**kw) for _ in range(rows)]
    out = Sampler(seed=7)(PROBS8.log().expand(rows, 8).to(device), states, [])
    assert set(out.token_ids) == allowed  # nothing outside, and every allowed token shows up


def test_top_p_follows_temperature(device):
    # At temperature 3 the distribution flattens, so top_p 0.6 needs more tokens than at 1.
    rows = 4000
    states = [state(temperature=3.0, top_p=0.6) for _ in range(rows)]
    out = Sampler(seed=3)(PROBS8.log().expand(rows, 8).to(device), states, [])
    hot = torch.softmax(PROBS8.log() / 3.0, -1)
    before = torch.cumsum(hot, 0) - hot
    assert set(out.token_ids) == {i for i in range(8) if before[i] < 0.6}


def test_penalties_exact_values_and_incremental_counts(device):
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, -2.0, 3.0]])
    st = state(
        prompt=[1, 2],
        output=[2, 3, 3],
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    got = process_logits(logits.to(device), [st], []).cpu()
    # seen (prompt + output) = {1, 2, 3}; output counts: 2 -> 1, 3 -> 2
    expected = torch.tensor([[1.0, 2.0 / 2, -1.0 * 2 - 0.5 - 0.25, 0.5 / 2 - 1.0 - 0.25, -2.0, 3.0]])
    torch.testing.assert_close(got, expected)
    st.output_token_ids.append(5)  # the engine appends; the cached counts catch up
    got = process_logits(logits.to(device), [st], []).cpu()
    expected[0, 5] = 3.0 / 2 - 0.5 - 0.25
    torch.testing.assert_close(got, expected)
    plain = state(prompt=[1, 2], output=[2, 3, 3])
    torch.testing.assert_close(process_logits(logits.to(device), [plain], []).cpu(), logits)


def test_penalties_only_touch_their_rows(device):
    logits = torch.randn(3, 10)
    states = [state(output=[1, 1]), state(output=[1, 1], frequency_penalty=1.0), state(output=[1])]
    got = process_logits(logits.to(device), states, []).cpu()
    torch.testing.assert_close(got[[0, 2]], logits[[0, 2]])
    assert got[1, 1] == pytest.approx(float(logits[1, 1]) - 2.0)


def test_min_tokens_blocks_eos_and_stop_tokens(device):
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 10.0
    logits[0, 6] = 9.0
    logits[0, 8] = 8.0
    st = state(temperature=0, min_tokens=2, stop_token_ids=[6])
    got = process_logits(logits.to(device), [st], [EOS]).cpu()
    assert got[0, EOS] == -math.inf and got[0, 6] == -math.inf
    assert sample(logits.to(device), [st], [EOS]).token_ids == [8]
    st.output_token_ids = [8, 8]  # min_tokens reached
    assert sample(logits.to(device), [st], [EOS]).token_ids == [EOS]
    # ignore_eos: EOS is no stop token (vLLM), so only stop_token_ids are held off.
    st = state(temperature=0, min_tokens=2, stop_token_ids=[6], ignore_eos=True)
    assert sample(logits.to(device), [st], [EOS]).token_ids == [EOS]


def test_min_tokens_yields_to_a_grammar_that_only_allows_eos(device):
    logits = torch.randn(1, 10)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, EOS] = True
    assert sample(logits.to(device), [state(min_tokens=5)], [EOS], mask.to(device)).token_ids == [EOS]


def test_allowed_token_mask_is_respected(device):
    torch.manual_seed(1)
    rows, vocab = 64, 30
    logits = torch.randn(rows, vocab) * 3
    mask = torch.rand(rows, vocab) < 0.3
    mask[:, 0] = False
    logits[:, 0] = 50.0  # the model's favourite is never allowed
    mask[torch.arange(rows), torch.randint(1, vocab, (rows,))] = True
    states = [state(temperature=0 if i % 2 else 1.0, top_k=5 if i % 3 == 0 else 0) for i in range(rows)]
    for _ in range(5):
        out = sample(logits.to(device), states, [EOS], mask.to(device))
        assert all(mask[i, t] for i, t in enumerate(out.token_ids))
    greedy_rows = [i for i in range(rows) if i % 2]
    masked = logits.masked_fill(~mask, -math.inf)
    assert [out.token_ids[i] for i in greedy_rows] == masked[greedy_rows].argmax(-1).tolist()


def test_dead_end_mask_does_not_produce_nan(device):
    logits = torch.randn(2, 10)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 3] = True
    out = sample(logits.to(device), [state(), state()], [EOS], mask.to(device))
    assert out.token_ids[1] == 3 and 0 <= out.token_ids[0] < 10
    assert all(math.isfinite(lp) for lp in out.sampled_logprobs)


def _run_seeded(
    batches: list[list[SequenceSamplingState]], target: SequenceSamplingState, steps: int, device: str
) -> list[int]:
    """Sample `steps` tokens; at step t the target sits inside batches[t % len(batches)]."""
    gen = torch.Generator().manual_seed(99)
    tokens = []
    for t in range(steps):
        row = torch.randn(1, 200, generator=gen) * 2  # the target's logits: the same in every run
        others = batches[t % len(batches)]
        pos = t % (len(others) + 1)
        states = others[:pos] + [target] + others[pos:]
        logits = torch.randn(len(states), 200)  # the neighbours' logits differ run to run
        logits[pos] = row[0]
        out = Sampler()(logits.to(device), states, [EOS])
        tokens.append(out.token_ids[pos])
        target.output_token_ids.append(out.token_ids[pos])
    return tokens


def test_seeded_rows_do_not_depend_on_the_batch(device):
    kw = {"seed": 1234, "temperature": 0.9, "top_p": 0.95, "repetition_penalty": 1.1}
    alone = _run_seeded([[]], state(**kw), 25, device)
    torch.manual_seed(5)
    crowd = [
        [state(seed=1), state(), state(temperature=0)],
        [state(top_k=3)],
        [state(seed=1234, child=1), state(min_p=0.2), state(), state(seed=9, logprobs=3)],
    ]
    assert _run_seeded(crowd, state(**kw), 25, device) == alone
    assert _run_seeded([[state(seed=5)], [state(), state()]], state(**kw), 25, device) == alone
    assert _run_seeded([[]], state(**{**kw, "seed": 1235}), 25, device) != alone  # the seed does matter


def test_children_differ_but_are_reproducible(device):
    def children() -> list[list[int]]:
        states = [state(seed=42, child=c) for c in range(4)]
        logits = torch.zeros(4, 1000)  # uniform: collisions would be a coincidence
        seqs = [[] for _ in states]
        for _ in range(10):
            out = sample(logits.to(device), states, [EOS])
            for c, t in enumerate(out.token_ids):
                seqs[c].append(t)
        return seqs

    first = children()
    assert first == children()
    assert len({tuple(s) for s in first}) == 4


def test_make_generator():
    assert make_generator(None, 0, "cpu") is None
    draw = lambda g: torch.rand(4, generator=g).tolist()  # noqa: E731
    assert draw(make_generator(3, 0, "cpu")) == draw(make_generator(3, 0, "cpu"))
    assert draw(make_generator(3, 0, "cpu")) != draw(make_generator(3, 1, "cpu"))
    assert draw(make_generator(3, 1, "cpu")) != draw(make_generator(4, 0, "cpu"))
    assert make_generator(-1, 0, "cpu") is not None


class _FakeTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


def test_logprobs_are_raw_with_ranks(device):
    torch.manual_seed(2)
    logits = torch.randn(4, 40) * 2
    logits[2, 11] = logits[2, 12] = 9.0  # tie at the top: both rank 1
    states = [
        state(logprobs=5, temperature=0.5, repetition_penalty=1.5, output=[1, 2, 3]),
        state(),
        state(logprobs=3, temperature=0),
        state(logprobs=0, temperature=1.3, top_k=10),
    ]
    out = sample(logits.to(device), states, [EOS], tokenizer=_FakeTokenizer())
    raw = torch.log_softmax(logits, -1)
    for i, tok in enumerate(out.token_ids):
        assert out.sampled_logprobs[i] == pytest.approx(float(raw[i, tok]), abs=1e-5)
    assert out.logprobs[1] is None
    for i in (0, 2, 3):
        k = states[i].params.logprobs
        entry = out.logprobs[i]
        tok = out.token_ids[i]
        assert next(iter(entry)) == tok  # the sampled token comes first
        assert entry[tok].rank == 1 + int((logits[i] > logits[i, tok]).sum())
        assert entry[tok].decoded_token == f"<{tok}>"
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(float(raw[i, t]), abs=1e-5)
            assert lp.rank == 1 + int((logits[i] > logits[i, t]).sum())
        expected_top = sorted(range(40), key=lambda t: (-float(logits[i, t]), t))[:k]
        assert set(entry) == set(expected_top) | {tok}
        # after the sampled token, the top k in rank order (ties by id)
        assert [t for t in entry if t != tok] == [t for t in expected_top if t != tok]
    assert out.logprobs[2][11].rank == 1 and out.logprobs[2][12].rank == 1
    assert out.token_ids[2] == 11
    assert list(out.logprobs[2])[:2] == [11, 12]
    assert len(out.logprobs[3]) == 1


def test_forced_tokens(device):
    logits = torch.zeros(2, 20)
    logits[:, 3] = 10.0
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, 3] = True
    forced = state(forced_token_ids=[5, 7], logprobs=1, temperature=0, min_tokens=5, stop_token_ids=[5])
    other = state(temperature=0)
    tokens = []
    for _ in range(3):
        out = sample(logits.to(device), [forced, other], [EOS], mask.to(device))
        assert out.token_ids[1] == 3
        tokens.append(out.token_ids[0])
        lp = out.logprobs[0][out.token_ids[0]]
        assert lp.logprob == pytest.approx(
            float(torch.log_softmax(logits[0], -1)[out.token_ids[0]]), abs=1e-6
        )
        forced.output_token_ids.append(out.token_ids[0])
    assert tokens == [5, 7, 3]  # past the list the row samples normally
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(logits.to(device), [state(forced_token_ids=[99]), other], [EOS])


def test_create_and_lazy_generators_agree(device):
    logits = torch.randn(1, 500).to(device)
    params = SamplingParams(seed=11, temperature=1.0)
    made = SequenceSamplingState.create(params, [], child_index=2, device=device)
    lazy = SequenceSamplingState(params, [], child_index=2)  # generator made on first use
    assert made.generator is not None and lazy.generator is None
    for _ in range(5):
        assert sample(logits, [made], []).token_ids == sample(logits, [lazy], []).token_ids
    assert lazy.generator is not None


def test_mask_narrower_than_padded_vocab(device):
    logits = torch.zeros(1, 16)
    logits[0, 12:] = 100.0  # padding ids the tokenizer (and the grammar) does not know
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 2] = mask[0, 5] = True
    for _ in range(20):
        assert sample(logits.to(device), [state()], [], mask.to(device)).token_ids[0] in (2, 5)
