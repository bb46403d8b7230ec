"""The agents' pieces on their own: tool-call parsing, scene cuts, frame times, clips, search, schemas, cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from glimpse.agents import media
from glimpse.agents.cache import ResultCache, file_key
from glimpse.agents.confidence import member_confidences, span_confidence, value_spans
from glimpse.agents.media import Clip, Thumbnail
from glimpse.agents.notes import clock, file_times, search
from glimpse.agents.scenes import cut_segments, scene_changes
from glimpse.agents.schemas import decoding_schema, notes_schema
from glimpse.agents.toolcalls import parse_tool_calls


def test_tool_calls_are_parsed_from_the_models_format():
    text, calls = parse_tool_calls(
        'Let me look.<TOOLCALL>[{"name": "inspect", "arguments": {"start": 1, "end": 2}}, '
        '{"name": "frame", "arguments": "{\\"t\\": 5}"}]</TOOLCALL>'
    )
    assert text == "Let me look."
    assert [(c.name, c.arguments) for c in calls] == [
        ("inspect", {"start": 1, "end": 2}),
        ("frame", {"t": 5}),
    ]
    assert calls[0].id != calls[1].id and json.loads(calls[0].to_openai()["function"]["arguments"]) == {
        "start": 1, "end": 2
    }  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["<TOOLCALL>not json</TOOLCALL>", '<TOOLCALL>[{"arguments": {}}]</TOOLCALL>', "<TOOLCALL>[1]</TOOLCALL>"],
)
def test_broken_tool_calls_stay_in_the_text(text):
    assert parse_tool_calls(text) == (text, [])


def test_an_unclosed_block_with_complete_json_counts():
    text, calls = parse_tool_calls('<TOOLCALL>{"name": "search_notes", "parameters": {"query": "dog"}}')
    assert text == "" and calls[0].name == "search_notes" and calls[0].arguments == {"query": "dog"}


def _thumb(t, colour):
    return Thumbnail(t, np.full((12, 16, 3), colour, np.uint8))


def test_scene_changes_and_segments_snap_to_them():
    thumbs = [_thumb(t, (200, 0, 0) if t < 47 else (0, 0, 200)) for t in range(0, 100, 2)]
    assert scene_changes(thumbs) == [48]
    segments = cut_segments(100.0, [48.0], target=30)
    expected = [(0, 30, False), (30, 48, False), (48, 78, True), (78, 100, False)]
    assert [(s.start, s.end, s.scene_cut) for s in segments] == expected  # 48 s: the cut nearest 60 s
    # no cuts: even steps; the tail joins the last segment; none shorter than half a target
    assert [(s.start, s.end) for s in cut_segments(100.0, [], target=30)] == [(0, 30), (30, 60), (60, 100)]
    assert [(s.start, s.end) for s in cut_segments(12.0, [], target=30)] == [(0, 12)]


def test_frames_come_with_their_true_times(video_file):
    info = media.probe(video_file)
    assert info.duration == pytest.approx(200.0) and (info.width, info.height) == (160, 120)
    times, rate = media.evenly_spaced(30.0, 60.0, 0.3, 8)
    assert rate == pytest.approx(1000 / 3750) and times == [30 + 3.75 * k for k in range(8)]
    frames = media.frames_at(video_file, [0.0, 12.3, 12.4, 41.0, 199.99, 250.0])
    assert [t for t, _ in frames] == [
        0.0,
        12.25,
        12.5,
        41.0,
        199.75,
        199.75,
    ]  # the frame showing at each time
    assert frames[0][1].shape == (512, 512, 3)
    # scene 0 is red, scene 1 (from 40 s) green: the decoded pixels agree with the times
    assert frames[1][1][5, 5, 0] > 150 and frames[3][1][5, 5, 1] > 120
    (full,) = media.frames_at(video_file, [5.0], size=None)
    assert full[1].shape == (120, 160, 3)


def test_a_clip_for_a_server_samples_back_to_the_same_frames(video_file):
    """What the HTTP client sends: the server, asked for 2x the clip's rate and its frame count, samples
    every frame, labelled with the times the in-process frame list gets."""
    from glimpse.processing.video import separators_for_frame_list
    from glimpse.processing.video_decode import decode_video

    clip = media.read_clip(video_file, 30.0, 60.0, 0.3, 8)
    assert clip.times == [30 + 3.75 * k for k in range(8)]
    sampled = decode_video(media.encode_clip(clip), 2 * clip.fps, len(clip.frames), size=512)
    assert sampled.frame_indices == list(range(8))
    assert sampled.separators == separators_for_frame_list(8, clip.fps)
    diff = np.abs(np.stack(sampled.frames).astype(int) - np.stack(clip.frames).astype(int)).mean()
    assert diff < 4


def test_notes_times_become_file_times_inside_the_segment():
    raw = {"summary": "s", "events": [{"start": 3, "end": 1, "text": "e"}], "people": [
        {"start": 0, "end": 99, "text": "p"}], "on_screen_text": []}  # fmt: skip
    notes = file_times(raw, clip_start=30.0, lo=30.0, hi=60.0)
    assert notes["events"] == [{"start": 31.0, "end": 33.0, "text": "e"}]
    assert notes["people"] == [{"start": 30.0, "end": 60.0, "text": "p"}]
    assert clock(3725) == "1:02:05" and clock(65) == "1:05"


def test_search_prefers_rare_words():
    segs = [{"start": 0, "end": 10, "summary": "a man walks a dog", "events": [], "people": [],
             "on_screen_text": [{"start": 2, "end": 3, "text": "EXIT sign"}]},
            {"start": 10, "end": 20, "summary": "a man sits", "events": [], "people": [], "on_screen_text": []}]  # fmt: skip
    hits = search(segs, "dog man")
    assert hits[0]["text"] == "a man walks a dog" and len(hits) == 2
    assert search(segs, "exit")[0] == {"kind": "on_screen_text", "start": 2, "end": 3, "text": "EXIT sign"}
    assert search(segs, "") == []


def test_decoding_schemas_are_bounded():
    user = {"type": "object", "title": "t", "properties": {"a": {"type": "string", "format": "date"},
            "b": {"type": "array", "uniqueItems": True, "items": {"type": "string"}}}}  # fmt: skip
    assert decoding_schema(user, 10, 3) == {"type": "object", "additionalProperties": False, "properties": {
        "a": {"type": "string", "maxLength": 10}, "b": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                                        "maxItems": 3}}}  # fmt: skip
    times = notes_schema(12.5, 20, 4)["properties"]["events"]["items"]["properties"]["start"]
    assert times == {"type": "integer", "minimum": 0, "maximum": 13}


def test_cache_is_keyed_by_content_and_parameters(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"x" * 99 + b"y")
    assert file_key(a) != file_key(b)
    cache = ResultCache(tmp_path / "c", "video", file_key(a), {"fps": 1})
    assert cache.get("s") is None
    cache.put("s", {"v": 1})
    assert cache.get("s") == {"v": 1}
    assert ResultCache(tmp_path / "c", "video", file_key(a), {"fps": 2}).get("s") is None
    assert not list((tmp_path / "c").rglob("*.tmp"))
    assert ResultCache(None, "video", "k", {}).get("s") is None


def test_clip_requests_bound_evs_on_short_clips():
    from glimpse.agents.notes import notes_request

    clip = Clip([np.zeros((4, 4, 3), np.uint8)] * 2, [0.0, 1.0], 1.0)
    assert (
        notes_request(clip, 0, 2, max_chars=4, max_items=1, max_tokens=8, pruning_rate=0.7).video_pruning_rate
        == 0
    )
    clip = Clip([np.zeros((4, 4, 3), np.uint8)] * 4, [0.0, 1.0, 2.0, 3.0], 1.0)
    assert (
        notes_request(clip, 0, 4, max_chars=4, max_items=1, max_tokens=8, pruning_rate=0.7).video_pruning_rate
        == 0.5
    )


def test_value_spans_and_confidences():
    text = '{"a": {"value": "x y", "page": 2}, "b" : null,\n "c": {"value": [1, {"d": 2}], "page": 1}}'
    spans = value_spans(text)
    assert text[slice(*spans[("a", "value")])] == '"x y"' and text[slice(*spans[("b",)])] == "null"
    assert text[slice(*spans[("c", "value")])] == '[1, {"d": 2}]' and ("c", "value", "d") not in spans
    assert text[slice(*spans[("a",)])] == '{"value": "x y", "page": 2}'
    with pytest.raises(ValueError):
        value_spans('{"a": 1} extra')
    with pytest.raises(ValueError):
        value_spans('{"a" 1}')
    tokens = [("ab", math.log(0.9)), ("cd", math.log(0.3)), ("ef", math.log(0.6))]
    assert span_confidence(tokens, 0, 2) == pytest.approx(0.9)  # one token
    assert span_confidence(tokens, 1, 5) == pytest.approx(0.3)  # the weakest of three
    assert span_confidence(tokens, 4, 5) == pytest.approx(0.6) and span_confidence(tokens, 6, 8) is None
    pieces = ['{"', "a", '": {"', "value", '": "', "x", " y", '", "page": 2}}']
    probs = [0.99, 0.9, 0.99, 0.99, 0.99, 0.4, 0.7, 0.95]
    tokens = [(p, math.log(q)) for p, q in zip(pieces, probs)]
    text = "".join(pieces)
    got = member_confidences(text, tokens, {"a": ("a", "value"), "z": ("z", "value")})
    assert got["a"] == pytest.approx(0.4) and got["z"] is None  # '": "' opens the string: 0.99 > 0.4
    assert member_confidences(text, tokens[:-1], {"a": ("a", "value")}) == {
        "a": None
    }  # tokens don't spell it
    assert member_confidences(text, None, {"a": ("a", "value")}) == {"a": None}
    reasoned = [("thinking</think>", math.log(0.01)), *tokens]  # a server's logprobs cover its reasoning too
    assert member_confidences(text, reasoned, {"a": ("a", "value")})["a"] == pytest.approx(0.4)
