"""Split Nemotron output into reasoning and answer at `</think>` (MODEL_SPEC.md §6).

The chat template's generation prompt decides where the output starts (processing/reasoning.py:
`<think>\\n` means the model is already reasoning, `<think></think>` means reasoning is off and everything
is the answer). A model may also open its output with `<think>` itself; that tag is dropped and
reasoning begins.

Newlines are kept exactly as generated, as vLLM's DeepSeek-R1 parser does: the newline before
`</think>` stays at the end of the reasoning and the blank line after it at the start of the content.
Stripping them would make streamed and whole-text results disagree whenever the newline and the tag
arrive in different chunks. Empty results are None, so `"</think>"` alone gives (None, None).
"""

from __future__ import annotations

from glimpse.processing.reasoning import THINK_END, THINK_START, prompt_ends_in_reasoning


def partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (what a stream must hold)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _none_if_empty(text: str) -> str | None:
    return text or None


class ReasoningParser:
    """Whole-text `parse` and chunked `feed`/`finish` over one output; streamed pieces join to `parse`.

    One instance per output sequence (per choice when n > 1): the streaming methods keep state.
    """

    def __init__(self, starts_in_reasoning: bool = True) -> None:
        self.starts_in_reasoning = starts_in_reasoning
        self._state = "start"  # "start": a leading <think> may still come; then "reasoning" or "content"
        self._buf = ""

    @classmethod
    def for_prompt(cls, prompt: str) -> ReasoningParser:
        """The parser for output that continues `prompt` (the rendered chat template)."""
        return cls(starts_in_reasoning=prompt_ends_in_reasoning(prompt))

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output. Does not touch the streaming state."""
        in_reasoning = self.starts_in_reasoning
        if text.startswith(THINK_START):
            text = text[len(THINK_START) :]
            in_reasoning = True
        if not in_reasoning:
            return None, _none_if_empty(text)
        reasoning, found, content = text.partition(THINK_END)
        if not found:
            return _none_if_empty(text), None  # never closed: all reasoning (e.g. cut by max_tokens)
        return _none_if_empty(reasoning), _none_if_empty(content)

    def feed(self, delta: str) -> tuple[str | None, str | None]:
        """Take the next piece of output; return the (reasoning, content) that is now certain.

        Holds back only a suffix that could still grow into a tag, so a tag split at any position
        never leaks into either field.
        """
        self._buf += delta
        reasoning: list[str] = []
        content: list[str] = []
        if self._state == "start":
            if self._buf.startswith(THINK_START):
                self._buf = self._buf[len(THINK_START) :]
                self._state = "reasoning"
            elif THINK_START.startswith(self._buf):
                return None, None  # still could be a leading <think>
            else:
                self._state = "reasoning" if self.starts_in_reasoning else "content"
        if self._state == "reasoning":
            before, found, after = self._buf.partition(THINK_END)
            if found:
                reasoning.append(before)
                self._buf = after
                self._state = "content"
            else:
                keep = partial_tag_suffix(self._buf, THINK_END)
                cut = len(self._buf) - keep
                reasoning.append(self._buf[:cut])
                self._buf = self._buf[cut:]
        if self._state == "content":
            content.append(self._buf)
            self._buf = ""
        return _none_if_empty("".join(reasoning)), _none_if_empty("".join(content))

    def finish(self) -> tuple[str | None, str | None]:
        """The output ended: release what was held back (a partial tag is plain text after all)."""
        held, self._buf = self._buf, ""
        state, self._state = self._state, "content"
        if state == "start":
            state = "reasoning" if self.starts_in_reasoning else "content"
        if state == "reasoning":
            return _none_if_empty(held), None
        return None, _none_if_empty(held)
