"""Notes on video segments: the request that writes them, their times in the file, and search over them."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from glimpse.agents.client import ModelRequest
from glimpse.agents.media import Clip
from glimpse.agents.schemas import notes_schema

NOTE_KINDS = ("events", "people", "on_screen_text")
NOTES_SYSTEM = (
    "/no_think\nYou watch clips of a long video and take notes that others will search later. "
    "Write only what is visible. Be specific and brief."
)


def clock(seconds: float) -> str:
    """1:02:03 or 2:03 (whole seconds, rounded down)."""
    s = int(max(0.0, seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def notes_request(
    clip: Clip, start: float, end: float, *, max_chars: int, max_items: int, max_tokens: int,
    pruning_rate: float, focus: str | None = None, temperature: float = 0.0,
) -> ModelRequest:  # fmt: skip
    """Ask for notes on `clip`, which shows [start, end] of the file."""
    clip_seconds = max(end - start, clip.times[-1] - clip.times[0])
    text = (
        f"This clip shows {clock(start)}-{clock(end)} of the video ({start:.1f} s to {end:.1f} s). Its frames "
        "are labelled with seconds from the clip's first frame. Write notes as JSON: summary (what happens), "
        "events (what happens, in order), people (who appears: look, clothes, actions), on_screen_text "
        "(visible text, verbatim). Give each item's start and end in seconds from the clip's first frame."
    )
    if focus:
        text += f"\nPay special attention to: {focus}"
    n = len(clip.frames)
    # EVS keeps max(1 frame, q of all) tokens: on a short clip it would keep only the first frame, so the
    # rate is capped to keep at least two frames' worth (agents.md: late events in short clips vanish).
    q = 0.0 if n <= 2 else min(pruning_rate, 1 - 2 / n)
    return ModelRequest(
        messages=[
            {"role": "system", "content": NOTES_SYSTEM},
            {"role": "user", "content": [{"type": "clip", "clip": clip}, {"type": "text", "text": text}]},
        ],
        json_schema=notes_schema(clip_seconds, max_chars, max_items),
        max_tokens=max_tokens, video_pruning_rate=q, temperature=temperature,
    )  # fmt: skip


def _span(lo: float, hi: float, a: Any, b: Any) -> tuple[float, float]:
    def clamp(x: Any) -> float:
        x = float(x) if isinstance(x, int | float) and math.isfinite(x) else lo
        return round(min(hi, max(lo, x)), 3)

    a, b = clamp(a), clamp(b)
    return (a, b) if a <= b else (b, a)


def file_times(notes: dict[str, Any], clip_start: float, lo: float, hi: float) -> dict[str, Any]:
    """The model's notes with clip times turned into file times, kept inside [lo, hi]."""
    out: dict[str, Any] = {"summary": str(notes.get("summary", ""))}
    for kind in NOTE_KINDS:
        items = []
        for item in notes.get(kind) or []:
            start, end = _span(lo, hi, clip_start + item.get("start", 0), clip_start + item.get("end", 0))
            items.append({"start": start, "end": end, "text": str(item.get("text", ""))})
        out[kind] = items
    return out


def empty_notes() -> dict[str, Any]:
    return {"summary": "", **{kind: [] for kind in NOTE_KINDS}}


def clamp_range(lo: float, hi: float, start: Any, end: Any) -> tuple[float, float]:
    return _span(lo, hi, start, end)


def overview(segments: list[dict[str, Any]], max_chars: int) -> str:
    """The notes as compact lines, one per segment; only summaries when all of it would not fit."""

    def line(seg: dict[str, Any], full: bool) -> str:
        head = f"[{seg['start']:.1f}-{seg['end']:.1f} s] {seg['summary']}"
        if not full:
            return head
        parts = [head]
        for kind in NOTE_KINDS:
            if seg[kind]:
                items = "; ".join(f"{i['text']} ({i['start']:.1f}-{i['end']:.1f})" for i in seg[kind])
                parts.append(f"{kind.replace('_', ' ')}: {items}")
        return " | ".join(parts)

    for full in (True, False):
        text = "\n".join(line(s, full) for s in segments)
        if len(text) <= max_chars:
            return text
    return text[:max_chars] + "\n(the notes go on: use search_notes or read_notes)"


_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def note_items(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = []
    for seg in segments:
        items.append({"kind": "summary", "start": seg["start"], "end": seg["end"], "text": seg["summary"]})
        for kind in NOTE_KINDS:
            items += [{"kind": kind, **item} for item in seg[kind]]
    return items


def search(segments: list[dict[str, Any]], query: str, limit: int = 8) -> list[dict[str, Any]]:
    """Notes that share words with the query, best first (each shared word weighted by its rarity)."""
    items = note_items(segments)
    terms = set(_words(query))
    if not terms or not items:
        return []
    bags = [Counter(_words(i["text"])) for i in items]
    df = Counter(w for bag in bags for w in set(bag) if w in terms)
    n = len(items)
    scored = []
    for item, bag in zip(items, bags):
        score = sum(math.log(1 + n / df[w]) * (1 + math.log(bag[w])) for w in terms if bag.get(w))
        if score > 0:
            scored.append((score, item))
    scored.sort(key=lambda x: (-x[0], x[1]["start"]))
    return [item for _, item in scored[:limit]]
