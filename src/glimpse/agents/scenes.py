"""Cutting a video into segments: by time, moved to nearby scene changes found on small thumbnails."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glimpse.agents.media import Thumbnail

HIST_BINS = 8  # per channel: a joint 8x8x8 colour histogram


@dataclass(frozen=True)
class Segment:
    index: int
    start: float
    end: float
    scene_cut: bool  # True when `start` was moved to a scene change

    @property
    def length(self) -> float:
        return self.end - self.start


def _histogram(image: np.ndarray) -> np.ndarray:
    q = (image.astype(np.int32) * HIST_BINS) // 256
    codes = (q[..., 0] * HIST_BINS + q[..., 1]) * HIST_BINS + q[..., 2]
    hist = np.bincount(codes.ravel(), minlength=HIST_BINS**3).astype(np.float64)
    return hist / max(1.0, hist.sum())


def scene_changes(thumbs: list[Thumbnail], threshold: float = 0.4) -> list[float]:
    """Times where the colour distribution jumps: half the L1 distance of consecutive thumbnails'
    histograms (0 = same colours, 1 = disjoint) above `threshold`. The time is the later thumbnail's."""
    cuts = []
    previous = None
    for thumb in thumbs:
        hist = _histogram(thumb.image)
        if previous is not None and 0.5 * np.abs(hist - previous).sum() > threshold:
            cuts.append(thumb.t)
        previous = hist
    return cuts


def cut_segments(duration: float, cuts: list[float], target: float = 30.0) -> list[Segment]:
    """Segments about `target` seconds long, each boundary moved to the scene change nearest to it
    when one lies within half a target of it; none shorter than half a target (the last one joins its
    neighbour instead), none longer than one and a half."""
    if duration <= 0:
        return []
    lo, hi = 0.5 * target, 1.5 * target
    bounds, snapped = [0.0], [False]
    start = 0.0
    while duration - start > hi:
        ideal = start + target
        near = [c for c in cuts if start + lo <= c <= min(start + hi, duration - lo)]
        if near:
            end = min(near, key=lambda c: abs(c - ideal))
        else:
            end = ideal
        bounds.append(end)
        snapped.append(bool(near))
        start = end
    bounds.append(duration)
    return [
        Segment(index=i, start=bounds[i], end=bounds[i + 1], scene_cut=snapped[i])
        for i in range(len(bounds) - 1)
    ]
