"""Incremental detokenisation with stop strings: the text a stream may show after each new token.

Decoding the whole output after every token costs O(length) per step, and decoding each token alone is
wrong (byte-level tokens split multi-byte characters; some decoders drop a leading space depending on
context). So we keep two offsets into the token list, as vLLM and TGI do:

    tokens[prefix_offset:read_offset]  already emitted, decoded again only as left context
    tokens[read_offset:]               not yet emitted

Each step decodes the small window `tokens[prefix_offset:]` and emits what it adds beyond the decode of
`tokens[prefix_offset:read_offset]`, unless it ends in U+FFFD (an unfinished UTF-8 sequence: the next
token may complete it); then the offsets move up. The window stays a few tokens long, so a step costs
O(window), not O(length).

Stop strings: text that could still turn out to be the start of a stop string (the last
len(longest stop) - 1 characters) is held back. When a stop string completes, the output text ends
right before it (or after it with include_stop_str_in_output) and nothing more is emitted. With several
stop strings the one whose first occurrence ENDS first wins, as if text arrived one character at a
time (ties: the one starting first); the text therefore never contains a whole stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# Prompt tokens decoded as left context for the first output tokens (vLLM uses the same 5).
INITIAL_CONTEXT_TOKENS = 5

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns the output tokens of one sequence into safe-to-show text deltas, honouring stop strings."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped_by: str | None = None

        self._tokens: list[int] = list(prompt_token_ids)
        self._num_prompt = len(self._tokens)
        self._prefix_offset = max(self._num_prompt - INITIAL_CONTEXT_TOKENS, 0)
        self._read_offset = self._num_prompt
        self._prefix_text: str | None = None  # decode of tokens[prefix:read], recomputed when they move

        self._decoded = ""  # output text decoded so far: whole characters only, cut at a stop string
        self._emitted = 0  # how much of _decoded has been handed out
        self._flushed = False
        longest = max((len(s) for s in self.stop), default=0)
        # Included stop strings are shown anyway, so nothing needs holding back for them.
        self._hold = 0 if include_stop_str_in_output else max(longest - 1, 0)

    @property
    def text(self) -> str:
        """Everything emitted so far (the concatenation of the deltas)."""
        return self._decoded[: self._emitted]

    @property
    def output_token_ids(self) -> list[int]:
        return self._tokens[self._num_prompt :]

    @property
    def finished(self) -> bool:
        """True once a stop string has appeared: the engine should end the sequence."""
        return self.stopped_by is not None

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Append new output tokens; return the new text that is safe to show (possibly empty)."""
        if self.stopped_by is not None or self._flushed:
            return ""
        pending = list(token_ids)
        for n, token_id in enumerate(pending):
            self._tokens.append(token_id)
            if self._extend(self._decode_step(final=False)):
                self._tokens.extend(pending[n + 1 :])  # kept for output_token_ids, never decoded
                break
        return self._release(final=False)

    def flush(self) -> str:
        """The sequence has ended: return the held-back text (unfinished characters decode as U+FFFD)."""
        if self.stopped_by is not None or self._flushed:
            return ""
        self._extend(self._decode_step(final=True))
        self._flushed = True
        return self._release(final=True)

    # -- internals --

    def _decode(self, token_ids: list[int]) -> str:
        # Clean-up of tokenisation spaces is not prefix-stable, so window diffs could not use it.
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_step(self, final: bool) -> str:
        """New complete text from the window, moving the offsets when some is ready."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        if self._read_offset == len(self._tokens):
            return ""
        new_text = self._decode(self._tokens[self._prefix_offset :])
        ready = len(new_text) > len(self._prefix_text) and not new_text.endswith(_REPLACEMENT)
        if not (ready or final):
            return ""  # a special token that decodes to nothing, or a character still unfinished
        piece = new_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        self._prefix_text = None
        return piece

    def _extend(self, piece: str) -> bool:
        """Add decoded text and look for a stop string ending inside it; True when one did."""
        if not piece:
            return False
        before = len(self._decoded)
        self._decoded += piece
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self.stop:
            start = self._decoded.find(s, max(before - len(s) + 1, 0))
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is None:
            return False
        end, start, s = best
        self._decoded = self._decoded[: end if self.include_stop_str_in_output else start]
        self.stopped_by = s
        return True

    def _release(self, final: bool) -> str:
        """Hand out what can no longer be part of a stop string (everything once the sequence ended)."""
        limit = len(self._decoded)
        if not final and self.stopped_by is None:
            limit = max(self._emitted, limit - self._hold)
        delta = self._decoded[self._emitted : limit]
        self._emitted = limit
        return delta
