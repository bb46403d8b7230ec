"""Where a prompt leaves the model: inside a `<think>` block or not (MODEL_SPEC.md §6).

The chat template's generation prompt decides: `<think>\\n` means the model is already reasoning,
`<think></think>` means reasoning is off. The server splits the output text at `</think>` by this rule;
the engine starts a structured-output constraint after `</think>` by the same rule on token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

THINK_START = "<think>"
THINK_END = "</think>"


def prompt_ends_in_reasoning(
    prompt: str | Sequence[int], start: str | int = THINK_START, end: str | int = THINK_END
) -> bool:
    """True when the prompt left a `<think>` open: the later of the two tags is the opening one.

    `prompt` is text (the tags are strings) or token ids (the tags are the tokens' ids)."""
    if isinstance(prompt, str):
        return prompt.rfind(start) > prompt.rfind(end)
    for token in reversed(prompt):  # the last tag decides; a chat prompt has it near the end
        if token == start or token == end:
            return token == start
    return False


def think_token_ids(tokenizer) -> tuple[int, int] | None:
    """The ids of `<think>` and `</think>` in `tokenizer`, or None when it has no such tokens."""
    if tokenizer is None:
        return None
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in (THINK_START, THINK_END))
    if start is None or end is None or start == tokenizer.unk_token_id:
        return None
    return start, end
