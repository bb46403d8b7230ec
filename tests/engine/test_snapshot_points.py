"""Where the prefix cache keeps Mamba snapshots: few points, since each one ends a prompt chunk."""

from __future__ import annotations

from glimpse.engine.prefix_cache import snapshot_points
from glimpse.inputs import MediaSpan


def _span(start: int, length: int, key: str) -> MediaSpan:
    return MediaSpan(start=start, embeddings=None, length=length, content_hash=key)


def test_a_video_is_one_item_however_many_frames():
    spans, at = [], 40
    for t in range(32):  # frames of one video: 30 separator tokens, 256 placeholders each
        spans.append(_span(at + 30, 256, f"video:abc:{t}:0.0"))
        at += 286
    image = _span(at + 10, 256, "image:def")
    total = image.end + 50
    points = snapshot_points(total, spans + [image], 16)
    assert points == {spans[-1].end // 16 * 16, image.end // 16 * 16, (total - 1) // 16 * 16}


def test_only_the_last_media_items_and_small_ones_are_skipped():
    spans = [_span(100 + 400 * i, 300, f"image:{i}") for i in range(5)] + [_span(2200, 20, "image:small")]
    total = 2400
    points = snapshot_points(total, spans, 16)
    assert points == {spans[3].end // 16 * 16, spans[4].end // 16 * 16, (total - 1) // 16 * 16}
