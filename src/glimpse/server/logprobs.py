"""The engine's log-probabilities (CompletionOutput.token_ids / .logprobs) -> OpenAI's two logprobs
shapes: chat's per-token entries and completions' parallel lists."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from glimpse.outputs import Logprob
from glimpse.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

# Log-probabilities of -inf have no JSON spelling; vLLM sends this instead.
_MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB) if not math.isnan(logprob) else _MIN_LOGPROB


def _token_text(token_id: int, entry: Logprob | None) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return f"token_id:{token_id}"  # vLLM's spelling when a token has no text


def _ranked(step: Mapping[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely of one step's entries (the sampled token is in `step` even when not top-k)."""
    order = sorted(step.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0, -kv[1].logprob))
    return order[:k]


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[Mapping[int, Logprob]], top_logprobs: int
) -> ChatLogprobs:
    """OpenAI chat logprobs from CompletionOutput.token_ids/.logprobs (one dict per generated token)."""
    content = []
    for token_id, step in zip(token_ids, logprobs):
        entry = step.get(token_id)
        text = _token_text(token_id, entry)
        tops = [
            TopLogprob(token=(t := _token_text(i, lp)), logprob=_finite(lp.logprob), bytes=list(t.encode()))
            for i, lp in _ranked(step, top_logprobs)
        ]
        content.append(
            TokenLogprob(
                token=text,
                logprob=_finite(entry.logprob) if entry is not None else _MIN_LOGPROB,
                bytes=list(text.encode()),
                top_logprobs=tops,
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[Mapping[int, Logprob]],
    top_logprobs: int,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """OpenAI completions logprobs; `text_offset` is where this text starts (stream position, echo)."""
    out = CompletionLogprobs()
    offset = text_offset
    for token_id, step in zip(token_ids, logprobs):
        entry = step.get(token_id)
        text = _token_text(token_id, entry)
        out.tokens.append(text)
        out.token_logprobs.append(_finite(entry.logprob) if entry is not None else None)
        out.top_logprobs.append(
            {_token_text(i, lp): _finite(lp.logprob) for i, lp in _ranked(step, top_logprobs)}
            if top_logprobs
            else None
        )
        out.text_offset.append(offset)
        offset += len(text)
    return out
