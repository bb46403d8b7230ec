"""Nemotron tool-call parsing: whole text, and streams split anywhere that join to the same result."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from glimpse.server.reasoning import ReasoningParser
from glimpse.server.tool_parser import ToolCallStreamParser, parse_tool_calls

WEATHER = '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]</TOOLCALL>'


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def stream(pieces: list[str]) -> tuple[str | None, list[tuple[str, dict]], ToolCallStreamParser]:
    parser = ToolCallStreamParser()
    deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
    content, calls = [], []
    for d in deltas:
        assert (d.content is None) != (d.tool_calls is None), "one kind per delta"
        if d.content is not None:
            assert d.content != ""
            content.append(d.content)
        for tc in d.tool_calls or []:
            # The whole call arrives in one delta: OpenAI's id/type/name/arguments.
            assert tc.index == len(calls)
            assert re.fullmatch(r"call_[0-9a-f]{24}", tc.id)
            assert tc.type == "function"
            calls.append((tc.function.name, json.loads(tc.function.arguments)))
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == calls
    return "".join(content) or None, calls, parser


# (text, expected content, expected [(name, arguments)])
CASES = [
    (WEATHER, None, [("get_weather", {"city": "Paris", "unit": "C"})]),
    ("plain answer, no tools", "plain answer, no tools", []),
    (
        'Let me check.\n<TOOLCALL>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</TOOLCALL>',
        "Let me check.\n",
        [("a", {"x": 1}), ("b", {})],
    ),
    (f"before {WEATHER} after", "before  after", [("get_weather", {"city": "Paris", "unit": "C"})]),
    (
        '<TOOLCALL>[{"name": "a", "arguments": "{\\"q\\": \\"x y\\"}"}]</TOOLCALL>',  # arguments as a JSON string
        None,
        [("a", {"q": "x y"})],
    ),
    ('<TOOLCALL>[{"name": "noargs"}]</TOOLCALL>', None, [("noargs", {})]),
    ('<TOOLCALL>[{"name": "p", "parameters": {"k": [1, 2]}}]</TOOLCALL>', None, [("p", {"k": [1, 2]})]),
    ('<TOOLCALL>{"name": "single", "arguments": {}}</TOOLCALL>', None, [("single", {})]),
    (
        '<TOOLCALL>[{"name": "a", "arguments": {}}]</TOOLCALL>\n<TOOLCALL>[{"name": "b", "arguments": {}}]</TOOLCALL>',
        None,
        [("a", {}), ("b", {})],
    ),
    (
        "\n\n" + WEATHER + "\n",
        None,
        [("get_weather", {"city": "Paris", "unit": "C"})],
    ),  # whitespace only: None
    # Broken blocks stay in the content verbatim, tags and all.
    (
        '<TOOLCALL>[{"name": "a", "arguments": {</TOOLCALL>',
        '<TOOLCALL>[{"name": "a", "arguments": {</TOOLCALL>',
        [],
    ),
    ('x <TOOLCALL>[{"arguments": {}}]</TOOLCALL>', 'x <TOOLCALL>[{"arguments": {}}]</TOOLCALL>', []),
    (
        '<TOOLCALL>[{"name": "a", "arguments": "not json"}]</TOOLCALL>',
        '<TOOLCALL>[{"name": "a", "arguments": "not json"}]</TOOLCALL>',
        [],
    ),
    ("<TOOLCALL>42</TOOLCALL>", "<TOOLCALL>42</TOOLCALL>", []),
    (
        f"<TOOLCALL>oops</TOOLCALL> then {WEATHER}",
        "<TOOLCALL>oops</TOOLCALL> then ",
        [("get_weather", {"city": "Paris", "unit": "C"})],
    ),
    # Unclosed blocks (max_tokens, stop strings): complete JSON still counts.
    ('<TOOLCALL>[{"name": "a", "arguments": {"x": 1}}]', None, [("a", {"x": 1})]),
    ('<TOOLCALL>[{"name": "a", "argum', '<TOOLCALL>[{"name": "a", "argum', []),
    ("answer <TOOLCA", "answer <TOOLCA", []),
    ("<TOOLCALL>", "<TOOLCALL>", []),
    ("<TOOLCALL>[]</TOOLCALL>", None, []),
    (" <TOOLCALL>[]</TOOLCALL> ", "  ", []),  # no calls: whitespace is the content
    ("< TOOLCALL> <TOOLCALL <TOOLCALLx", "< TOOLCALL> <TOOLCALL <TOOLCALLx", []),
    ('<TOOLCALL>[{"name": "ü", "arguments": {"t": "☃ 🙂"}}]</TOOLCALL>', None, [("ü", {"t": "☃ 🙂"})]),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_parse(text, content, calls):
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert calls_of(got_calls) == calls


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_stream_every_split_matches_parse(text, content, calls):
    for i in range(len(text) + 1):
        got_content, got_calls, _ = stream([text[:i], text[i:]])
        assert (got_content, got_calls) == (content, calls), i
    assert stream(list(text))[:2] == (content, calls)


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_stream_three_piece_splits_match_parse(text, content, calls):
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        assert stream([text[:i], text[i:j], text[j:]])[:2] == (content, calls), (i, j)


def test_stream_random_texts_and_splits():
    rng = random.Random(0)
    pieces = [
        "<TOOLCALL>",
        "</TOOLCALL>",
        "<TOOL",
        "CALL>",
        '[{"name": "f", "arguments": {"a": 1}}]',
        "[",
        "{",
        "x",
        " ",
        "\n",
    ]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        content, calls = parse_tool_calls(text)
        for _ in range(5):
            cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
            split = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            assert stream(split)[:2] == (content, calls_of(calls)), (text, split)


def test_ids_are_unique_openai_style():
    _, calls = parse_tool_calls('<TOOLCALL>[{"name": "a"}, {"name": "a"}]</TOOLCALL>')
    assert len({c.id for c in calls}) == 2
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    message = calls[0].to_openai().model_dump()
    assert message == {"id": calls[0].id, "type": "function", "function": {"name": "a", "arguments": "{}"}}


def test_arguments_string_is_kept_as_sent():
    raw = '{"q":1}'
    _, calls = parse_tool_calls('<TOOLCALL>[{"name": "a", "arguments": ' + json.dumps(raw) + "}]</TOOLCALL>")
    assert calls[0].arguments == raw


def test_content_streams_before_a_call_and_tag_is_never_leaked():
    parser = ToolCallStreamParser()
    assert [d.content for d in parser.feed("Sure. <TOOL")] == ["Sure. "]
    assert parser.feed('CALL>[{"name": "f", "argu') == []
    (delta,) = parser.feed('ments": {"x": 2}}]</TOOLCALL>')
    assert delta.model_dump() == {
        "tool_calls": [
            {
                "index": 0,
                "id": parser.calls[0].id,
                "type": "function",
                "function": {"name": "f", "arguments": '{"x": 2}'},
            }
        ]
    }
    assert parser.finish() == []


def test_leading_whitespace_is_held_until_content_follows():
    parser = ToolCallStreamParser()
    assert parser.feed("\n\n") == []
    assert [d.content for d in parser.feed("Hi")] == ["\n\nHi"]
    assert [d.content for d in parser.feed("\n")] == ["\n"]


def test_reasoning_then_tool_call_pipeline_every_split():
    """The server's order: reasoning parser first, its content through the tool parser."""
    text = "The user wants weather.\n</think>\n\n" + WEATHER
    for i in range(len(text) + 1):
        rp, tp = ReasoningParser(True), ToolCallStreamParser()
        reasoning, deltas = [], []
        for piece in (text[:i], text[i:]):
            r, c = rp.feed(piece)
            reasoning.append(r or "")
            deltas += tp.feed(c or "")
        r, c = rp.finish()
        reasoning.append(r or "")
        deltas += tp.feed(c or "") + tp.finish()
        assert "".join(reasoning) == "The user wants weather.\n"
        assert all(d.content is None for d in deltas), i
        assert [(c.name, json.loads(c.arguments)) for c in tp.calls] == [
            ("get_weather", {"city": "Paris", "unit": "C"})
        ]
