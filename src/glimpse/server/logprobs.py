"""The engine's log-probabilities (CompletionOutput.token_ids / .logprobs, RequestOutput.prompt_logprobs)
-> OpenAI's two logprobs shapes: chat's per-token entries and completions' parallel lists; and each
token's own bytes, which chat reports beside its text."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

from glimpse.engine.detokenizer import IncrementalDetokenizer
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


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's spelling of bytes as characters (GPT-2's table): the printable Latin-1 bytes stand
    for themselves, the other 68 bytes are the characters from U+0100 on, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in kept}
    moved = [b for b in range(256) if b not in set(kept)]
    table.update({chr(0x100 + i): b for i, b in enumerate(moved)})
    return table


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


class TokenBytes:
    """A token's own bytes, from the tokenizer's spelling of it rather than its decoded text: a token that
    holds part of a multi-byte character has those bytes (decoding it alone gives U+FFFD instead).

    Byte-level BPE tokens map back through GPT-2's byte table; SentencePiece byte tokens (`<0xE6>`) are
    that byte and its word marker is a space; added tokens (special or not) are their text. A token the
    tokenizer can't spell falls back to its decoded text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        self._added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = backend.decoder if backend is not None else None
        self._table = (
            _byte_level_table() if decoder is not None and b'"ByteLevel"' in decoder.__getstate__() else None
        )

    def __call__(self, token_id: int, text: str) -> bytes:
        """The bytes of `token_id`, whose decoded text is `text`."""
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._spell(token_id, text)
        return found

    def _spell(self, token_id: int, text: str) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        try:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
        except (IndexError, OverflowError, TypeError, ValueError):
            piece = None
        if not isinstance(piece, str) or not piece:
            return text.encode()
        if self._table is not None:
            if all(c in self._table for c in piece):
                return bytes(self._table[c] for c in piece)
            return text.encode()
        if m := _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


def _ranked(step: Mapping[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely of one step's entries (the sampled token is in `step` even when not top-k)."""
    order = sorted(step.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0, -kv[1].logprob))
    return order[:k]


def chat_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[Mapping[int, Logprob]],
    top_logprobs: int,
    token_bytes: Callable[[int, str], bytes] | None = None,
) -> ChatLogprobs:
    """OpenAI chat logprobs from CompletionOutput.token_ids/.logprobs (one dict per generated token);
    `token_bytes` (a TokenBytes) gives each token's real bytes, else they are its text's UTF-8."""

    def raw(token_id: int, text: str) -> list[int]:
        return list(token_bytes(token_id, text) if token_bytes is not None else text.encode())

    content = []
    for token_id, step in zip(token_ids, logprobs):
        entry = step.get(token_id)
        text = _token_text(token_id, entry)
        tops = [
            TopLogprob(token=(t := _token_text(i, lp)), logprob=_finite(lp.logprob), bytes=raw(i, t))
            for i, lp in _ranked(step, top_logprobs)
        ]
        content.append(
            TokenLogprob(
                token=text,
                logprob=_finite(entry.logprob) if entry is not None else _MIN_LOGPROB,
                bytes=raw(token_id, text),
                top_logprobs=tops,
            )
        )
    return ChatLogprobs(content=content)


def text_pieces(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decode of `token_ids` (special tokens kept): the pieces join to
    that decode, a token that leaves a character unfinished adding "" and the one completing it the whole
    character (an echoed prompt's `tokens`)."""
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    pieces = [detok.add_tokens([t]) for t in token_ids]
    if pieces:
        pieces[-1] += detok.flush()
    return pieces


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[Mapping[int, Logprob] | None],
    top_logprobs: int,
    text_offset: int = 0,
    texts: Sequence[str] | None = None,
) -> CompletionLogprobs:
    """OpenAI completions logprobs; `text_offset` is where this text starts (stream position, echo).

    `texts` are the tokens' pieces of the choice's text (CompletionOutput.token_texts, `text_pieces`), so
    that `tokens` join to the text and `text_offset` points into it; without them each token is its text
    decoded alone. A step of None (an echoed prompt's first token: nothing scores it) has a null logprob
    and null top logprobs."""
    out = CompletionLogprobs()
    offset = text_offset
    for n, (token_id, step) in enumerate(zip(token_ids, logprobs)):
        entry = step.get(token_id) if step is not None else None
        text = texts[n] if texts is not None else _token_text(token_id, entry)
        out.text_offset.append(offset)
        offset += len(text)
        out.tokens.append(text)
        if step is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(entry.logprob) if entry is not None else None)
        out.top_logprobs.append(
            {_token_text(i, lp): _finite(lp.logprob) for i, lp in _ranked(step, top_logprobs)}
            if top_logprobs
            else None
        )
    return out
