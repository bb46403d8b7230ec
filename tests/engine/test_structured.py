"""Structured output: random logits sampled under the grammar mask always give valid, finished output."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from glimpse.engine.sampler import SequenceSamplingState, sample
from glimpse.engine.structured import (
    JSON_OBJECT_SCHEMA,
    GrammarMatcher,
    StructuredOutputCompiler,
    _expand_bits,
    batch_allowed_mask,
    unpack_bitmask,
)
from glimpse.errors import InvalidRequestError
from glimpse.model.tiny import build_tokenizer
from glimpse.sampling_params import SamplingParams

MAX_STEPS = 200
SEEDS = range(12)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["invoice", "receipt", "form"]},
        "paid": {"type": "boolean"},
        "amount": {"type": "integer", "minimum": -50, "maximum": 1000},
    },
    "required": ["name", "kind", "paid", "amount"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "primary": {"type": "boolean"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "note": {"type": "string", "maxLength": 5},  # optional
    },
    "required": ["id", "address"],
    "additionalProperties": False,
}
ITEMS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "sku": {"enum": ["A1", "B2", "C3"]},
            "qty": {"type": "integer", "minimum": 1, "maximum": 9},
            "gift": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        },
        "required": ["sku", "qty"],
        "additionalProperties": False,
    },
    "minItems": 1,
    "maxItems": 3,
}
CONST = {
    "type": "object",
    "properties": {"version": {"const": 2}, "ok": {"type": "boolean"}},
    "required": ["version", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</s>")]


@pytest.fixture(scope="module")
def vocab(tokenizer) -> int:
    return (len(tokenizer) + 63) // 64 * 64  # the tiny model's padded logits width


@pytest.fixture(scope="module")
def compiler(tokenizer, vocab, eos_ids) -> StructuredOutputCompiler:
    return StructuredOutputCompiler(tokenizer, vocab, eos_ids)


def generate(compiler, tokenizer, eos_ids, params, seed, *, bias=None, check_every_step=True):
    """Sample token by token under the grammar mask from random logits; return (text, tokens)."""
    vocab = compiler.vocab_size
    matcher = compiler.matcher(params)
    assert isinstance(matcher, GrammarMatcher)
    state = SequenceSamplingState(SamplingParams(temperature=1.0, max_tokens=MAX_STEPS), [])
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(MAX_STEPS):
        mask = batch_allowed_mask([matcher], vocab, "cpu")
        assert mask is not None and mask.shape == (1, vocab) and mask.dtype == torch.bool
        if check_every_step:
            row = mask[0]
            assert not row[len(tokenizer) :].any(), "padded ids must never be allowed"
            assert bool(row[eos_ids].all()) == bool(row[eos_ids].any()) == matcher.is_accepting()
            if matcher.is_terminated():
                assert row.nonzero().view(-1).tolist() == sorted(eos_ids)
        if matcher.is_terminated():
            return tokenizer.decode(out), out
        logits = torch.randn(1, vocab, generator=gen) * 2
        if bias is not None:
            logits += bias
        token = sample(logits, [state], eos_ids, mask, generator=gen).token_ids[0]
        assert mask[0, token]
        assert matcher.accept(token)
        if token in eos_ids:
            assert matcher.is_terminated()
            return tokenizer.decode(out), out
        out.append(token)
        state.output_token_ids.append(token)
    pytest.fail(f"no end within {MAX_STEPS} tokens: {tokenizer.decode(out)!r}")


@pytest.mark.parametrize("schema", [PERSON, NESTED, ITEMS, CONST], ids=["person", "nested", "items", "const"])
def test_bounded_json_schema_always_valid(compiler, tokenizer, eos_ids, schema):
    texts = set()
    for seed in SEEDS:
        text, _ = generate(compiler, tokenizer, eos_ids, SamplingParams(json_schema=schema), seed)
        value = json.loads(text)
        jsonschema.validate(value, schema)
        texts.add(text)
    assert len(texts) > 1  # the random logits really explore


def test_schema_as_json_string(compiler, tokenizer, eos_ids):
    text, _ = generate(compiler, tokenizer, eos_ids, SamplingParams(json_schema=json.dumps(PERSON)), 0)
    jsonschema.validate(json.loads(text), PERSON)
    assert list(json.loads(text)) == list(PERSON["properties"])  # declared order


def test_json_object(compiler, tokenizer, eos_ids):
    # Free-form JSON has no bound, so push random logits towards closing quotes and brackets.
    pieces = [tokenizer.decode([i]) for i in range(compiler.vocab_size)]
    bias = torch.tensor([3.0 if any(ch in p for ch in '"]}') else 0.0 for p in pieces])
    bias[eos_ids] = 3.0
    for seed in SEEDS:
        params = SamplingParams(json_schema=JSON_OBJECT_SCHEMA)
        text, _ = generate(compiler, tokenizer, eos_ids, params, seed, bias=bias)
        assert isinstance(json.loads(text), dict)


def test_regex_always_full_match(compiler, tokenizer, eos_ids):
    pattern = r"\d{3}-[a-z]{2,4}"
    for seed in range(30):
        text, _ = generate(compiler, tokenizer, eos_ids, SamplingParams(regex=pattern), seed)
        assert re.fullmatch(pattern, text), text


def test_regex_alternatives_and_anchors(compiler, tokenizer, eos_ids):
    pattern = r"^(yes|no|maybe)!$"
    seen = set()
    for seed in range(20):
        text, _ = generate(compiler, tokenizer, eos_ids, SamplingParams(regex=pattern), seed)
        assert text in {"yes!", "no!", "maybe!"}
        seen.add(text)
    assert len(seen) > 1


def test_eos_allowed_exactly_when_complete(compiler, tokenizer, eos_ids):
    m = compiler.matcher(SamplingParams(regex=r"\d{3}-[a-z]{2,4}"))
    mask = m.allowed_mask()
    assert not mask[eos_ids].any() and not m.is_accepting() and not m.is_terminated()
    for t in tokenizer.encode("123-ab", add_special_tokens=False):
        assert not m.allowed_mask()[eos_ids].any()
        assert m.accept(t)
    mask = m.allowed_mask()  # complete but may go on ("abc", "abcd")
    assert mask[eos_ids].all() and m.is_accepting() and not m.is_terminated()
    assert mask.sum() > len(eos_ids)
    for t in tokenizer.encode("cd", add_special_tokens=False):
        assert m.accept(t)
    assert m.is_terminated()  # only EOS may follow now
    assert m.allowed_mask().nonzero().view(-1).tolist() == sorted(eos_ids)
    assert m.accept(eos_ids[0]) and m.is_terminated()


def test_accept_rejects_disallowed_without_breaking(compiler, tokenizer, eos_ids):
    m = compiler.matcher(SamplingParams(regex=r"\d{3}"))
    before = m.allowed_mask()
    x = tokenizer.encode("x", add_special_tokens=False)[0]
    assert not before[x]
    assert not m.accept(x)
    assert not m.accept(eos_ids[0])  # not complete yet
    assert not m.accept(compiler.vocab_size - 1)  # a padded id
    assert not m.accept(-1)
    assert torch.equal(m.allowed_mask(), before)  # unchanged, still usable
    for t in tokenizer.encode("123", add_special_tokens=False):
        assert m.accept(t)
    assert m.is_terminated() and m.num_accepted == len(tokenizer.encode("123", add_special_tokens=False))


def test_reset_and_rollback(compiler, tokenizer):
    m = compiler.matcher(SamplingParams(regex=r"ab(c|d)"))
    start = m.allowed_mask()
    ids = tokenizer.encode("abc", add_special_tokens=False)
    for t in ids:
        assert m.accept(t)
    assert m.is_terminated()
    m.rollback(len(ids))
    assert torch.equal(m.allowed_mask(), start) and m.num_accepted == 0
    for t in ids:
        assert m.accept(t)
    m.reset()
    assert torch.equal(m.allowed_mask(), start) and not m.is_accepting()
    with pytest.raises(ValueError):
        m.rollback(1)


def test_special_tokens_never_allowed_inside_grammar(compiler, tokenizer, eos_ids):
    m = compiler.matcher(SamplingParams(json_schema={"type": "string", "maxLength": 50}))
    assert m.accept(tokenizer.encode('"', add_special_tokens=False)[0])
    mask = m.allowed_mask()
    for name in ["<unk>", "<s>", "<img>", "<image>", "</img>", "<think>", "<TOOLCALL>"]:
        assert not mask[tokenizer.convert_tokens_to_ids(name)], name
    assert not mask[eos_ids].any()


def test_no_constraint_gives_none(compiler):
    assert compiler.matcher(SamplingParams()) is None
    assert compiler.compile(SamplingParams()) is None
    assert batch_allowed_mask([None, None], compiler.vocab_size, "cpu") is None


def test_batch_mask_matches_rows_and_leaves_others_open(compiler, tokenizer):
    a = compiler.matcher(SamplingParams(regex=r"\d+"))
    b = compiler.matcher(SamplingParams(json_schema=PERSON))
    c = compiler.matcher(SamplingParams(regex=r"[a-z]{3}"))
    for t in tokenizer.encode("ab", add_special_tokens=False):
        assert c.accept(t)
    batch = batch_allowed_mask([None, a, b, None, c], compiler.vocab_size, torch.device("cpu"))
    assert batch.shape == (5, compiler.vocab_size)
    assert batch[0].all() and batch[3].all()
    for row, m in [(1, a), (2, b), (4, c)]:
        assert torch.equal(batch[row], m.allowed_mask())
        out = torch.zeros(compiler.vocab_size, dtype=torch.bool)
        m.fill_mask(out)
        assert torch.equal(out, batch[row])


def test_padded_vocab_never_allowed(tokenizer, eos_ids):
    vocab = 1000  # wider than the tokenizer (488) and not a multiple of 32
    comp = StructuredOutputCompiler(tokenizer, vocab, eos_ids)
    assert comp.tokenizer_size == len(tokenizer)
    m = comp.matcher(SamplingParams(json_schema={"type": "object"}))
    mask = m.allowed_mask()
    assert mask.shape == (vocab,) and mask.any()
    assert not mask[len(tokenizer) :].any()
    batch = batch_allowed_mask([m, None, comp.matcher(SamplingParams(regex="a+"))], vocab, "cpu")
    assert not batch[0, len(tokenizer) :].any() and not batch[2, len(tokenizer) :].any()
    assert batch[1].all()
    # The sampler never picks a padded id even where they carry the largest logits.
    logits = torch.randn(1, vocab)
    logits[0, len(tokenizer) :] = 100.0
    state = SequenceSamplingState(SamplingParams(temperature=1.0), [])
    for _ in range(10):
        tok = sample(logits, [state], eos_ids, mask[None]).token_ids[0]
        assert tok < len(tokenizer) and mask[tok]


def test_unpack_bitmask_bit_order():
    words = torch.tensor([[1 | (1 << 5), -(1 << 31)], [0, 3]], dtype=torch.int32)
    mask = unpack_bitmask(words, 64)
    assert mask.shape == (2, 64)
    assert mask[0].nonzero().view(-1).tolist() == [0, 5, 63]
    assert mask[1].nonzero().view(-1).tolist() == [32, 33]
    assert unpack_bitmask(words, 40)[0].nonzero().view(-1).tolist() == [0, 5]
    # The torch path (used on GPUs) agrees with the numpy one.
    rand = torch.randint(
        -(2**31), 2**31 - 1, (3, 7), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(_expand_bits(rand, 200), unpack_bitmask(rand, 200))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_mask_on_cuda(compiler):
    ms = [
        None,
        compiler.matcher(SamplingParams(regex=r"\d+")),
        compiler.matcher(SamplingParams(json_schema=PERSON)),
    ]
    on_gpu = batch_allowed_mask(ms, compiler.vocab_size, "cuda")
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), batch_allowed_mask(ms, compiler.vocab_size, "cpu"))


def test_compile_cache_returns_same_object(tokenizer, vocab, eos_ids):
    comp = StructuredOutputCompiler(tokenizer, vocab, eos_ids, cache_size=2)
    g1 = comp.compile(SamplingParams(json_schema=PERSON))
    g2 = comp.compile(SamplingParams(json_schema=json.dumps(PERSON, indent=2)))  # same schema as text
    assert g1 is g2
    assert comp.cache_info()["misses"] == 1 and comp.cache_info()["hits"] == 1
    r1 = comp.compile(SamplingParams(regex="a+"))
    assert r1 is not g1 and comp.compile(SamplingParams(regex="a+")) is r1
    comp.compile(SamplingParams(regex="b+"))  # evicts PERSON (least recently used)
    assert comp.compile(SamplingParams(json_schema=PERSON)) is not g1
    # Matchers of one compiled grammar are independent.
    m1, m2 = g1.matcher(), g1.matcher()
    assert m1.accept(tokenizer.encode("{", add_special_tokens=False)[0])
    assert m1.num_accepted == 1 and m2.num_accepted == 0


def test_compile_once_across_threads(tokenizer, vocab, eos_ids):
    comp = StructuredOutputCompiler(tokenizer, vocab, eos_ids)
    results: list = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        results.append(comp.compile(SamplingParams(json_schema=NESTED)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert comp.cache_info()["misses"] == 1


@pytest.mark.parametrize(
    "params",
    [
        dict(json_schema="{not json"),
        dict(json_schema='["a list"]'),
        dict(json_schema={"type": "foo"}),
        dict(json_schema={"type": "integer", "minimum": 10, "maximum": 5}),
        dict(json_schema={"type": "string", "maxLength": "ten"}),
        dict(json_schema={"type": "array", "uniqueItems": True}),
        dict(json_schema={"$ref": "#/$defs/missing"}),
        dict(json_schema={"type": "string", "pattern": "(("}),
        dict(regex="(abc"),
        dict(regex="(?=a)b"),
        dict(regex=r"(a)\1"),
    ],
)
def test_invalid_constraint_is_400(compiler, params):
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(SamplingParams(**params))
    assert info.value.status == 400
    assert info.value.param in ("json_schema", "regex")
    assert 0 < len(info.value.message) <= 700
    # The verdict is cached too, and stays an error.
    with pytest.raises(InvalidRequestError):
        compiler.matcher(SamplingParams(**params))
