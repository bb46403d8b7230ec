"""Incremental detokenisation against a real byte-level BPE tokenizer: deltas, UTF-8 splits, stop strings."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from glimpse.engine.detokenizer import IncrementalDetokenizer

SENTENCES = [
    "héllo wörld 你好 🙂",
    "the quick brown fox jumps over the lazy dog",
    "stop here please, hello world!",
    "naïve café déjà vu 日本語 テキスト 👍🏽 ok",
    "<think>reasoning</think> answer: 42",
]
CHARS = list("abcdefgh  xyz,.!\n") + list("éöüß你好日本語テキ") + ["🙂", "👍🏽", "🚀"]


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to chars from U+0100 up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<s>", "</s>", "<img>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(SENTENCES * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=["<img>"],
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="session")
def byte_ids(tok) -> dict[int, int]:
    """Token id of every single byte: encoding text byte by byte splits each multi-byte character."""
    table = _bytes_to_unicode()
    ids = {b: tok.convert_tokens_to_ids(c) for b, c in table.items()}
    assert len(set(ids.values())) == 256
    return ids


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(CHARS) for _ in range(n))


def encode_bytes(text: str, byte_ids: dict[int, int]) -> list[int]:
    return [byte_ids[b] for b in text.encode()]


def chunks(rng: random.Random, ids: list[int]) -> list[list[int]]:
    """Split ids into add_tokens calls of 1-3 tokens (mostly 1, as a decode step gives)."""
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        out.append(ids[i : i + n])
        i += n
    return out


def stream(detok: IncrementalDetokenizer, calls: list[list[int]]) -> list[str]:
    deltas = [detok.add_tokens(c) for c in calls]
    deltas.append(detok.flush())
    return deltas


def test_text_split_byte_by_byte_streams_exactly(tok, byte_ids):
    rng = random.Random(0)
    for _ in range(60):
        text = random_text(rng, rng.randint(1, 30))
        ids = (
            encode_bytes(text, byte_ids) if rng.random() < 0.5 else tok.encode(text, add_special_tokens=False)
        )
        assert tok.decode(ids) == text
        deltas = stream(IncrementalDetokenizer(tok, []), chunks(rng, ids))
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)  # never a broken character


def test_prompt_context_and_text_property(tok, byte_ids):
    rng = random.Random(1)
    prompt = tok.encode("naïve café 你好", add_special_tokens=False)
    for _ in range(20):
        text = random_text(rng, 20)
        detok = IncrementalDetokenizer(tok, prompt)
        emitted = ""
        for c in chunks(rng, encode_bytes(text, byte_ids)):
            emitted += detok.add_tokens(c)
            assert detok.text == emitted
        emitted += detok.flush()
        assert emitted == text == detok.text
        assert detok.output_token_ids == encode_bytes(text, byte_ids)
        assert detok.stopped_by is None


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_ids(tok, skip):
    """Arbitrary ids (invalid UTF-8, special tokens anywhere): the deltas still add up to decode()."""
    rng = random.Random(2 if skip else 3)
    vocab = len(tok)
    checked = 0
    for _ in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 25))]
        if rng.random() < 0.5:
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        else:
            prompt = tok.encode(random_text(rng, 8), add_special_tokens=False)
        deltas = stream(IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip), chunks(rng, ids))
        full = tok.decode(ids, skip_special_tokens=skip)
        prompt_text = tok.decode(prompt, skip_special_tokens=skip)
        if prompt_text.endswith("\ufffd"):
            continue  # a prompt ending inside a character changes how the first output bytes decode
        assert "".join(deltas) == full
        if any("\ufffd" in d for d in deltas):
            assert "\ufffd" in full
        checked += 1
    assert checked >= 100


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = tok.encode("héllo <img> wörld</s> 你好<s>", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<img>") in ids
    rng = random.Random(4)
    text = "".join(stream(IncrementalDetokenizer(tok, [], skip_special_tokens=skip), chunks(rng, ids)))
    assert text == tok.decode(ids, skip_special_tokens=skip)
    assert ("<img>" in text) is not skip and ("</s>" in text) is not skip


def test_window_stays_short(tok, byte_ids):
    """Each step decodes a few tokens, not the whole output."""

    class Counting:
        longest = 0

        def decode(self, ids, **kw):
            Counting.longest = max(Counting.longest, len(ids))
            return tok.decode(ids, **kw)

    text = random_text(random.Random(5), 400)
    detok = IncrementalDetokenizer(
        Counting(), tok.encode("a prompt of some length here", add_special_tokens=False)
    )
    out = "".join(detok.add_tokens([t]) for t in encode_bytes(text, byte_ids)) + detok.flush()
    assert out == text
    assert Counting.longest <= 12  # 4-byte characters: up to 4 pending + 4 context tokens


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Text arriving one character at a time: the first stop string to complete wins."""
    for end in range(1, len(text) + 1):
        hits = [(end - len(s), s) for s in stops if text[:end].endswith(s)]
        if hits:
            start, s = min(hits)
            return (text[:end] if include else text[:start]), s
    return text, None


def test_stop_string_across_tokens_and_calls(tok):
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["fox jumps"])
    deltas = [detok.add_tokens([t]) for t in ids]
    assert detok.stopped_by == "fox jumps"
    assert detok.text == "".join(deltas) == "the quick brown "
    assert detok.add_tokens(ids[:3]) == "" and detok.flush() == ""
    assert detok.text == "the quick brown "


def test_stop_string_inside_one_token_and_include(tok):
    ids = tok.encode("hello world!", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["lo w"], include_stop_str_in_output=True)
    text = "".join(detok.add_tokens([t]) for t in ids) + detok.flush()
    assert text == detok.text == "hello w" and detok.stopped_by == "lo w"


def test_unfinished_stop_string_is_flushed(tok):
    ids = tok.encode("hello wor", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["world peace"])
    streamed = "".join(detok.add_tokens([t]) for t in ids)
    assert len(streamed) <= len("hello wor") - len("world") + 1  # "wor" may still grow into it: held
    assert streamed + detok.flush() == "hello wor"
    assert detok.stopped_by is None


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_random(tok, byte_ids, include):
    rng = random.Random(6 if include else 7)
    for _ in range(150):
        text = random_text(rng, rng.randint(5, 40))
        stops = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.7:
                a = rng.randrange(len(text))
                stops.append(text[a : a + rng.randint(1, 6)])
            else:
                stops.append(random_text(rng, rng.randint(1, 4)))
        ids = (
            encode_bytes(text, byte_ids) if rng.random() < 0.5 else tok.encode(text, add_special_tokens=False)
        )
        detok = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
        deltas = stream(detok, chunks(rng, ids))
        want_text, want_stop = reference_stop(text, stops, include)
        assert "".join(deltas) == detok.text == want_text, (text, stops)
        assert detok.stopped_by == want_stop
        assert not any("\ufffd" in d for d in deltas)
        if not include:
            assert not any(s in detok.text for s in stops)


def test_stop_completed_by_the_last_bytes_is_caught_at_flush(tok, byte_ids):
    # "ab" then a token whose bytes end inside "你": the window is held, the stop shows at flush at latest.
    ids = encode_bytes("xab你", byte_ids)[:-1]
    detok = IncrementalDetokenizer(tok, [], stop=["ab"])
    streamed = "".join(detok.add_tokens([t]) for t in ids)
    assert streamed + detok.flush() == "x" and detok.stopped_by == "ab"
