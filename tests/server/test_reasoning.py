"""ReasoningParser: whole-text results, and streamed pieces that join to them under any split."""

from __future__ import annotations

import itertools
import random

import pytest

from glimpse.server.reasoning import ReasoningParser, partial_tag_suffix, prompt_ends_in_reasoning


def stream(parser: ReasoningParser, pieces: list[str]) -> tuple[str | None, str | None]:
    reasoning, content = [], []
    for piece in pieces:
        r, c = parser.feed(piece)
        assert r != "" and c != "", "empty deltas are None"
        reasoning.append(r or "")
        content.append(c or "")
    r, c = parser.finish()
    reasoning.append(r or "")
    content.append(c or "")
    return "".join(reasoning) or None, "".join(content) or None


def splits_in_two(text: str):
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


def splits_in_three(text: str):
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        yield [text[:i], text[i:j], text[j:]]


def random_splits(text: str, rng: random.Random, count: int = 50):
    for _ in range(count):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


# (text, starts_in_reasoning, expected (reasoning, content))
CASES = [
    ("Let me think.\n</think>\n\nThe answer is 4.", True, ("Let me think.\n", "\n\nThe answer is 4.")),
    ("The answer is 4.", False, (None, "The answer is 4.")),
    ("still thinking when max_tokens hit", True, ("still thinking when max_tokens hit", None)),
    ("<think>\nplan</think>done", True, ("\nplan", "done")),
    ("<think>plan</think>done", False, ("plan", "done")),  # the model opened reasoning itself
    ("</think>", True, (None, None)),
    ("</think>answer only", True, (None, "answer only")),
    ("reasoning only</think>", True, ("reasoning only", None)),
    ("a</think>b</think>c", True, ("a", "b</think>c")),  # a second end tag is just content
    ("text with </think> inside", False, (None, "text with </think> inside")),
    ("x <think> y", False, (None, "x <think> y")),  # <think> only counts at the very start
    ("x <think> y</think>z", True, ("x <think> y", "z")),
    ("ends with a partial tag </thi", True, ("ends with a partial tag </thi", None)),
    ("<thi", True, ("<thi", None)),
    ("<thi", False, (None, "<thi")),
    ("<thinking>x</think>y", True, ("<thinking>x", "y")),
    ("<thinking>x</think>y", False, (None, "<thinking>x</think>y")),
    ("<<think>>", True, ("<<think>>", None)),
    ("<</think>>", True, ("<", ">")),
    ("", True, (None, None)),
    ("", False, (None, None)),
    ("<think>", True, (None, None)),
    ("<think>", False, (None, None)),
    ("naïve ☃ 推理</think>答案 🙂", True, ("naïve ☃ 推理", "答案 🙂")),
]


@pytest.mark.parametrize(("text", "mode", "expected"), CASES)
def test_parse(text, mode, expected):
    assert ReasoningParser(mode).parse(text) == expected


@pytest.mark.parametrize(("text", "mode", "expected"), CASES)
def test_stream_every_split_matches_parse(text, mode, expected):
    for pieces in itertools.chain(splits_in_two(text), splits_in_three(text)):
        assert stream(ReasoningParser(mode), pieces) == expected, pieces
    assert stream(ReasoningParser(mode), list(text)) == expected  # one character at a time


@pytest.mark.parametrize(("text", "mode", "expected"), CASES)
def test_stream_random_splits_match_parse(text, mode, expected):
    rng = random.Random(text)
    for pieces in random_splits(text, rng):
        assert stream(ReasoningParser(mode), pieces) == expected, pieces


def test_long_output_random_splits():
    rng = random.Random(0)
    words = ["<", "/", "think", ">", "</think>", "<think>", "</thi", "nk>", " ", "\n", "x", "y"]
    for _ in range(200):
        text = "".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        for mode in (True, False):
            expected = ReasoningParser(mode).parse(text)
            for pieces in random_splits(text, rng, count=5):
                assert stream(ReasoningParser(mode), pieces) == expected, (text, pieces)


def test_holds_back_only_a_possible_partial_tag():
    p = ReasoningParser(True)
    assert p.feed("abc</th") == ("abc", None)  # "</th" might be the end tag
    assert p.feed("x") == ("</thx", None)  # it was not
    assert p.feed("<") == (None, None)
    assert p.feed("/think>\n\nHi") == (None, "\n\nHi")
    assert p.feed(" there") == (None, " there")
    assert p.finish() == (None, None)


def test_reasoning_streams_before_end_tag():
    p = ReasoningParser(True)
    assert p.feed("Okay, ") == ("Okay, ", None)
    assert p.feed("so") == ("so", None)
    assert p.feed("") == (None, None)
    assert p.finish() == (None, None)


def test_leading_think_is_held_until_decided():
    p = ReasoningParser(False)
    assert p.feed("<th") == (None, None)
    assert p.feed("ink>") == (None, None)
    assert p.feed("hmm</think>ok") == ("hmm", "ok")


def test_off_mode_streams_content_at_once():
    p = ReasoningParser(False)
    assert p.feed("Hello") == (None, "Hello")
    assert p.feed(" </think> world") == (None, " </think> world")


def test_parse_does_not_touch_stream_state():
    p = ReasoningParser(True)
    assert p.feed("abc</th") == ("abc", None)
    assert p.parse("x</think>y") == ("x", "y")
    assert p.feed("ink>z") == (None, "z")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<SPECIAL_11>Assistant\n<think>\n", True),
        ("<SPECIAL_11>Assistant\n<think>", True),
        ("<SPECIAL_11>Assistant\n<think></think>", False),
        ("<SPECIAL_11>Assistant\n<think></think>\n", False),
        ("<think>old</think> turns <SPECIAL_11>Assistant\n<think>\n", True),
        ("<SPECIAL_11>Assistant\n", False),
        ("", False),
    ],
)
def test_mode_from_prompt(prompt, expected):
    assert prompt_ends_in_reasoning(prompt) is expected
    assert ReasoningParser.for_prompt(prompt).starts_in_reasoning is expected


@pytest.mark.parametrize(
    ("text", "tag", "n"),
    [
        ("abc", "</think>", 0),
        ("abc<", "</think>", 1),
        ("abc</think", "</think>", 7),
        ("abc</think>", "</think>", 0),  # a whole tag is not a partial one
        ("<</", "</think>", 2),
        ("", "</think>", 0),
        ("<TOOL", "<TOOLCALL>", 5),
    ],
)
def test_partial_tag_suffix(text, tag, n):
    assert partial_tag_suffix(text, tag) == n
