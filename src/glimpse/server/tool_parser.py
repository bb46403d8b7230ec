"""Nemotron tool calls: `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>` (MODEL_SPEC.md §6).

A block whose JSON is a list of `{"name", "arguments"}` objects becomes tool calls; anything else
(broken JSON, a call without a name, arguments that are not JSON) stays in the content verbatim, tags
and all, so a model's mistake is visible rather than lost. A block the output never closes (cut by
max_tokens or a stop string) still counts if its JSON is complete. When calls were found and the text
left around them is only whitespace, content is None, as OpenAI returns it.

Streaming emits each call whole, in one delta (id, type, name and arguments together), once its block
closes: a block is only known to be valid when it is complete, and a call the stream had already sent
can't be taken back. Content outside blocks streams as it comes, holding back only a suffix that could
still become `<TOOLCALL>`, and leading whitespace until it is known whether any content will follow.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from glimpse.server.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ResponseFunctionCall,
    ResponseToolCall,
)
from glimpse.server.reasoning import partial_tag_suffix

TOOLCALL_START = "<TOOLCALL>"
TOOLCALL_END = "</TOOLCALL>"


def tool_call_id() -> str:
    """`call_` and 24 hex digits: the shape of OpenAI's ids, unique per call."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON string, as OpenAI sends it
    id: str = field(default_factory=tool_call_id)

    def to_openai(self) -> ResponseToolCall:
        """The `message.tool_calls[]` entry of a chat completion."""
        return ResponseToolCall(
            id=self.id, function=ResponseFunctionCall(name=self.name, arguments=self.arguments)
        )

    def to_delta(self, index: int) -> DeltaToolCall:
        """The whole call as one streamed `delta.tool_calls[]` entry."""
        return DeltaToolCall(
            index=index,
            id=self.id,
            type="function",
            function=DeltaFunctionCall(name=self.name, arguments=self.arguments),
        )


def _arguments_json(value: Any) -> str | None:
    """Arguments as a JSON string: an object is dumped, a string must already be JSON; else None."""
    if value is None:
        return "{}"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return None
        return value
    return None


def parse_block(inner: str) -> list[ToolCall] | None:
    """The calls in the JSON between the tags, or None when it is not a valid list of calls."""
    try:
        data = json.loads(inner)
    except ValueError:
        return None
    if isinstance(data, dict):  # a lone object instead of a one-item list
        data = [data]
    if not isinstance(data, list):
        return None
    calls = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        # Some fine-tunes say "parameters"; OpenAI says "arguments".
        arguments = _arguments_json(item["arguments"] if "arguments" in item else item.get("parameters"))
        if arguments is None:
            return None
        calls.append(ToolCall(name=item["name"], arguments=arguments))
    return calls


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content without the call blocks, calls) of a whole output."""
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(TOOLCALL_START, pos)) != -1:
        content.append(text[pos:start])
        inner_start = start + len(TOOLCALL_START)
        end = text.find(TOOLCALL_END, inner_start)
        inner, pos = (
            (text[inner_start:], len(text)) if end == -1 else (text[inner_start:end], end + len(TOOLCALL_END))
        )
        found = parse_block(inner)
        if found is None:
            content.append(text[start:pos])
        else:
            calls.extend(found)
    content.append(text[pos:])
    joined = "".join(content)
    if calls and not joined.strip():
        return None, calls
    return joined or None, calls


class ToolCallStreamParser:
    """Chunked counterpart of `parse_tool_calls`: what `feed`/`finish` return joins to the same result.

    One instance per output sequence. `calls` lists the calls emitted so far (finish_reason "tool_calls").
    """

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._in_block = False
        self._seen_text = False  # any non-whitespace content sent yet
        self._held_space = ""  # leading whitespace, sent once real content follows

    def feed(self, delta: str) -> list[DeltaMessage]:
        """Take the next piece of (post-reasoning) output; return the deltas now certain, in order."""
        self._buf += delta
        out: list[DeltaMessage] = []
        while True:
            if self._in_block:
                end = self._buf.find(TOOLCALL_END)
                if end == -1:
                    break  # a block is judged only when whole
                inner, self._buf = self._buf[:end], self._buf[end + len(TOOLCALL_END) :]
                self._in_block = False
                self._close_block(inner, TOOLCALL_END, out)
            else:
                start = self._buf.find(TOOLCALL_START)
                if start == -1:
                    cut = len(self._buf) - partial_tag_suffix(self._buf, TOOLCALL_START)
                    self._content(self._buf[:cut], out)
                    self._buf = self._buf[cut:]
                    break
                self._content(self._buf[:start], out)
                self._buf = self._buf[start + len(TOOLCALL_START) :]
                self._in_block = True
        return out

    def finish(self) -> list[DeltaMessage]:
        """The output ended: judge an unclosed block, release held text."""
        out: list[DeltaMessage] = []
        held, self._buf = self._buf, ""
        if self._in_block:
            self._in_block = False
            self._close_block(held, "", out)
        else:
            self._content(held, out)
        if self._held_space and not self.calls:
            self._emit(self._held_space, out)
        self._held_space = ""
        return out

    def _close_block(self, inner: str, end_tag: str, out: list[DeltaMessage]) -> None:
        found = parse_block(inner)
        if found is None:
            self._content(TOOLCALL_START + inner + end_tag, out)
            return
        for call in found:
            out.append(DeltaMessage(tool_calls=[call.to_delta(len(self.calls))]))
            self.calls.append(call)

    def _content(self, text: str, out: list[DeltaMessage]) -> None:
        if not text:
            return
        if self._seen_text:
            self._emit(text, out)
            return
        self._held_space += text
        if self._held_space.strip():
            self._seen_text = True
            text, self._held_space = self._held_space, ""
            self._emit(text, out)

    @staticmethod
    def _emit(text: str, out: list[DeltaMessage]) -> None:
        if out and out[-1].content is not None:
            out[-1].content += text
        else:
            out.append(DeltaMessage(content=text))
