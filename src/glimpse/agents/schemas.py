"""JSON schemas: what the model must write (enforced while decoding) and what the agents write out.

Schemas for decoding bound every string, array and number, so even a weak (or random) model ends its
JSON within its token budget: times the model writes are whole seconds (a decoder bounds an integer's
digits by its range, but not a fraction's). Users' schemas are copied for decoding with only the keywords the decoder
understands; the full schema still validates the result.
"""

from __future__ import annotations

import math
from typing import Any

# Keywords kept for decoding; anything else (formats, uniqueItems, examples, ...) is left to validation.
_DECODING_KEYWORDS = {
    "type", "properties", "required", "items", "prefixItems", "additionalProperties", "enum", "const",
    "anyOf", "oneOf", "allOf", "minLength", "maxLength", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "$ref", "$defs", "definitions",
}  # fmt: skip
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def decoding_schema(schema: Any, max_string: int | None = None, max_items: int | None = None) -> Any:
    """A copy for the decoder: unknown keywords dropped; objects closed to their listed properties;
    strings and arrays without a bound get `max_string` / `max_items` when given."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key not in _DECODING_KEYWORDS:
            continue
        if key in _SUBSCHEMA_LISTS:
            value = [decoding_schema(v, max_string, max_items) for v in value]
        elif key in _SUBSCHEMA_MAPS:
            value = {k: decoding_schema(v, max_string, max_items) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = decoding_schema(value, max_string, max_items)
        out[key] = value
    types = out.get("type")
    types = types if isinstance(types, list) else [types]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False  # else the model may invent keys, unbounded strings
    if (
        "string" in types
        and max_string
        and "maxLength" not in out
        and "enum" not in out
        and "pattern" not in out
    ):
        out["maxLength"] = max_string
    if "array" in types and max_items and "maxItems" not in out:
        out["maxItems"] = max_items
    return out


def _closed(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object", "properties": properties, "required": list(properties),
        "additionalProperties": False,
    }  # fmt: skip


def seconds_schema(hi: float) -> dict[str, Any]:
    """Whole seconds from 0 to `hi` (rounded up)."""
    return {"type": "integer", "minimum": 0, "maximum": max(1, math.ceil(hi))}


def span_schema(hi: float, max_chars: int) -> dict[str, Any]:
    """`{"start", "end", "text"}` with times in whole seconds from 0 to `hi`."""
    time = seconds_schema(hi)
    return _closed({"start": time, "end": time, "text": {"type": "string", "maxLength": max_chars}})


def notes_schema(clip_seconds: float, max_chars: int, max_items: int) -> dict[str, Any]:
    """What the model writes about one clip: times are seconds from the clip's first frame."""
    span = span_schema(clip_seconds, max_chars)
    items = {"type": "array", "items": span, "maxItems": max_items}
    return _closed({
        "summary": {"type": "string", "maxLength": 2 * max_chars},
        "events": items, "people": items, "on_screen_text": items,
    })  # fmt: skip


def frame_schema(max_chars: int, max_items: int) -> dict[str, Any]:
    text = {"type": "string", "maxLength": max_chars}
    return _closed({"description": {"type": "string", "maxLength": 2 * max_chars},
                    "text": {"type": "array", "items": text, "maxItems": max_items}})  # fmt: skip


def cited_text_schema(duration: float, max_chars: int, max_citations: int = 8) -> dict[str, Any]:
    """An answer or a summary: text and the time ranges it rests on."""
    time = seconds_schema(duration)
    citation = _closed({"start": time, "end": time})
    return _closed({
        "text": {"type": "string", "maxLength": max_chars},
        "citations": {"type": "array", "items": citation, "maxItems": max_citations},
    })  # fmt: skip


def chapters_schema(duration: float, max_chars: int, max_chapters: int = 12) -> dict[str, Any]:
    time = seconds_schema(duration)
    chapter = _closed({
        "start": time, "end": time, "title": {"type": "string", "maxLength": max(16, max_chars // 4)},
        "summary": {"type": "string", "maxLength": max_chars},
    })  # fmt: skip
    return _closed({"chapters": {"type": "array", "items": chapter, "minItems": 1, "maxItems": max_chapters}})


# --------------------------------------------------------------------------------- what agents write

_RANGE = {"start": {"type": "number", "minimum": 0}, "end": {"type": "number", "minimum": 0}}
_TIME_RANGE = {"type": "object", "properties": _RANGE, "required": ["start", "end"]}
_NOTE = {
    "type": "object", "properties": {**_RANGE, "text": {"type": "string"}},
    "required": ["start", "end", "text"], "additionalProperties": False,
}  # fmt: skip
_CITED = {
    "type": ["object", "null"],
    "properties": {
        "text": {"type": "string"}, "citations": {"type": "array", "items": _TIME_RANGE},
        "steps": {"type": "array"}, "stopped": {"type": "string"}, "error": {"type": ["string", "null"]},
    },
    "required": ["text", "citations"],
}  # fmt: skip

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "glimpse video report",
    "type": "object",
    "required": [
        "version",
        "file",
        "duration",
        "model",
        "sampling",
        "segments",
        "question",
        "answer",
        "summary",
        "chapters",
        "usage",
    ],  # fmt: skip
    "properties": {
        "version": {"const": 1},
        "file": {"type": "string"},
        "duration": {"type": "number", "minimum": 0},
        "model": {"type": "string"},
        "sampling": {
            "type": "object",
            "required": ["segment_seconds", "fps", "frames_per_segment", "video_pruning_rate"],
            "properties": {
                "segment_seconds": {"type": "number"},
                "fps": {"type": "number"},
                "frames_per_segment": {"type": "integer"},
                "video_pruning_rate": {"type": "number"},
            },
        },  # fmt: skip
        "scene_changes": {"type": "array", "items": {"type": "number", "minimum": 0}},
        "segments": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "index",
                    "start",
                    "end",
                    "frames",
                    "summary",
                    "events",
                    "people",
                    "on_screen_text",
                ],
                "properties": {
                    **_RANGE,
                    "index": {"type": "integer"},
                    "scene_cut": {"type": "boolean"},
                    "frames": {"type": "array", "items": {"type": "number", "minimum": 0}},
                    "fps": {"type": "number"},
                    "keyframe": {"type": ["number", "null"]},
                    "summary": {"type": "string"},
                    "events": {"type": "array", "items": _NOTE},
                    "people": {"type": "array", "items": _NOTE},
                    "on_screen_text": {"type": "array", "items": _NOTE},
                    "error": {"type": ["string", "null"]},
                },
            },  # fmt: skip
        },
        "question": {"type": ["string", "null"]},
        "answer": _CITED,
        "summary": _CITED,
        "chapters": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "required": ["start", "end", "title", "summary"],
                "properties": {**_RANGE, "title": {"type": "string"}, "summary": {"type": "string"}},
            },
        },  # fmt: skip
        "usage": {
            "type": "object",
            "required": ["requests", "prompt_tokens", "completion_tokens"],
            "properties": {
                k: {"type": "integer", "minimum": 0}
                for k in ("requests", "prompt_tokens", "completion_tokens")
            },
        },  # fmt: skip
    },
}

EXTRACT_LINE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "glimpse extract result (one JSON line per input file)",
    "type": "object",
    "required": ["file", "data", "pages", "error"],
    "additionalProperties": False,
    "properties": {
        "file": {"type": "string"},
        "data": {"type": ["object", "null"]},
        "pages": {
            "type": ["object", "null"],
            "additionalProperties": {"type": ["integer", "null"], "minimum": 1},
        },
        "error": {"type": ["string", "null"]},
        # each field's confidence: the lowest probability of its value's tokens (null: not known)
        "confidence": {
            "type": "object",
            "additionalProperties": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        },
    },
}
