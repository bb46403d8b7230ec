"""How sure the model was of each value it wrote, from its own token log-probabilities.

A schema-bound answer is JSON text; each sampled token comes with its log-probability (requested with
`ModelRequest.logprobs`). A value's confidence is the probability of the least likely token that
overlaps the value's characters in the text (quotes included): one doubtful digit makes a whole invoice
number doubtful, so the weakest token speaks for the value. The probabilities are the engine's raw ones
(before the schema's mask), as the OpenAI API reports them.
"""

from __future__ import annotations

import json
import math
import re

TokenLogprobs = list[tuple[str, float]]  # (the text the token added, its log-probability), in order

_SPACE = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


def value_spans(text: str) -> dict[tuple[str, ...], tuple[int, int]]:
    """The character span [start, end) of every object member's value in the JSON `text`, by its key
    path, e.g. ("total", "value"); arrays and scalars are one span each. ValueError when `text` isn't JSON."""
    spans: dict[tuple[str, ...], tuple[int, int]] = {}

    def skip(i: int) -> int:
        return _SPACE.match(text, i).end()

    def value(i: int, path: tuple[str, ...]) -> int:
        if text[i : i + 1] != "{":
            try:
                return _DECODER.raw_decode(text, i)[1]
            except json.JSONDecodeError as e:
                raise ValueError(str(e)) from None
        i = skip(i + 1)
        if text[i : i + 1] == "}":
            return i + 1
        while True:
            try:
                key, i = _DECODER.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise ValueError(str(e)) from None
            i = skip(i)
            if not isinstance(key, str) or text[i : i + 1] != ":":
                raise ValueError(f"expected a key and ':' at {i}")
            start = skip(i + 1)
            end = value(start, (*path, key))
            spans[(*path, key)] = (start, end)
            i = skip(end)
            if text[i : i + 1] == ",":
                i = skip(i + 1)
            elif text[i : i + 1] == "}":
                return i + 1
            else:
                raise ValueError(f"expected ',' or '}}' at {i}")

    end = value(skip(0), ())
    if skip(end) != len(text):
        raise ValueError("extra text after the JSON value")
    return spans


def span_confidence(tokens: TokenLogprobs, start: int, end: int) -> float | None:
    """The lowest probability among the tokens overlapping text[start:end]; None when none does."""
    lowest, at = None, 0
    for piece, logprob in tokens:
        lo, at = at, at + len(piece)
        if at > start and lo < end and math.isfinite(logprob):
            lowest = logprob if lowest is None else min(lowest, logprob)
        elif lo >= end:
            break
    return None if lowest is None else math.exp(lowest)


def member_confidences(
    text: str, tokens: TokenLogprobs | None, paths: dict[str, tuple[str, ...]]
) -> dict[str, float | None]:
    """Confidence of each named value (name -> its key path in `text`); all None when the tokens are
    missing or do not end with `text` (then nothing can be placed). The tokens may spell more before
    `text`: a server's logprobs also cover the reasoning it took out of the content."""
    joined = "".join(piece for piece, _ in tokens or [])
    if not tokens or not text or not joined.endswith(text):
        return {name: None for name in paths}
    try:
        spans = value_spans(text)
    except ValueError:
        return {name: None for name in paths}
    shift = len(joined) - len(text)
    return {name: span_confidence(tokens, spans[path][0] + shift, spans[path][1] + shift) if path in spans
            else None for name, path in paths.items()}  # fmt: skip
