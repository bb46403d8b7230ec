"""The model's tool-call format: `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>`.

An OpenAI-compatible server parses these into `tool_calls` itself; in-process the agents parse the
text. A block that is not a valid list of calls is left in the text (the model answered, badly); a
block cut off by the token limit counts when its JSON is complete.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

TOOLCALL_START = "<TOOLCALL>"
TOOLCALL_END = "</TOOLCALL>"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        """The assistant message's `tool_calls[]` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


def parse_arguments(raw: Any) -> dict[str, Any] | None:
    """Arguments as a dict: an object as is, a JSON string decoded, nothing as {}; else None."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return None
    return raw if isinstance(raw, dict) else None


def _parse_block(inner: str) -> list[ToolCall] | None:
    try:
        data = json.loads(inner)
    except ValueError:
        return None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return None
    calls = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        arguments = parse_arguments(item.get("arguments", item.get("parameters")))
        if arguments is None:
            return None
        calls.append(ToolCall(item["name"], arguments))
    return calls


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(the text outside valid call blocks, stripped; the calls in order)."""
    kept: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(TOOLCALL_START, pos)) != -1:
        kept.append(text[pos:start])
        inner_start = start + len(TOOLCALL_START)
        end = text.find(TOOLCALL_END, inner_start)
        stop = len(text) if end == -1 else end
        pos = len(text) if end == -1 else end + len(TOOLCALL_END)
        found = _parse_block(text[inner_start:stop])
        if found is None:
            kept.append(text[start:pos])
        else:
            calls.extend(found)
    kept.append(text[pos:])
    return "".join(kept).strip(), calls


def function_spec(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict:
    """An OpenAI `tools[]` entry."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }
