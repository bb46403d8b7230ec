"""Efficient Video Sampling (EVS): drop video tokens that barely change from the previous frame.

API.md pins every detail (scores in float32, frame 0 scores 255, the count in Python floats, a stable
descending sort) so that the same video gives the same prompt on every device and in every dtype; the
golden vectors in shared/reference/evs.json check it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FIRST_FRAME_SCORE = 255.0  # above any 1 - cos (at most 2): frame 0 is always kept


def validate_pruning_rate(pruning_rate: float) -> float:
    """Return q as a float if 0 <= q < 1, else raise a ValueError that says what is allowed."""
    try:
        q = float(pruning_rate)
    except (TypeError, ValueError):
        raise ValueError(f"video_pruning_rate must be a number in [0, 1), got {pruning_rate!r}") from None
    if not 0.0 <= q < 1.0:  # also refuses NaN
        raise ValueError(f"video_pruning_rate must be in [0, 1) (0 turns pruning off), got {pruning_rate!r}")
    return q


def retained_count(num_frames: int, tokens_per_frame: int, pruning_rate: float) -> int:
    """Tokens EVS keeps: max(H*W, int(H*W*T*(1-q))) in Python floats (so 2560 at q=0.8 keeps 511)."""
    q = validate_pruning_rate(pruning_rate)
    return max(tokens_per_frame, int(tokens_per_frame * num_frames * (1 - q)))


def dissimilarity_scores(embeddings: torch.Tensor) -> torch.Tensor:
    """[T, H, W] float32 scores: 1 - cos(E[t], E[t-1]) per position, 255 for frame 0."""
    if embeddings.dim() != 4:
        raise ValueError(f"embeddings must be [T, H, W, D], got shape {tuple(embeddings.shape)}")
    e = embeddings.float()
    scores = torch.full(e.shape[:3], FIRST_FRAME_SCORE, dtype=torch.float32, device=e.device)
    if e.shape[0] > 1:
        scores[1:] = 1 - F.cosine_similarity(e[1:], e[:-1], dim=-1)
    return scores


def retention_mask(embeddings: torch.Tensor, pruning_rate: float) -> torch.Tensor:
    """BoolTensor [T, H, W] of the positions to keep for a video's projector outputs [T, H, W, D].

    Keeps the `retained_count` highest scores; equal scores go to the lower flat index (stable sort).
    q == 0 keeps everything without scoring, so pruning off is bit-exact off.
    """
    q = validate_pruning_rate(pruning_rate)
    if embeddings.dim() != 4:
        raise ValueError(f"embeddings must be [T, H, W, D], got shape {tuple(embeddings.shape)}")
    t, h, w = embeddings.shape[:3]
    if q == 0.0:
        return torch.ones((t, h, w), dtype=torch.bool, device=embeddings.device)
    count = retained_count(t, h * w, q)
    scores = dissimilarity_scores(embeddings).flatten()
    order = torch.argsort(scores, descending=True, stable=True)
    keep = torch.zeros(t * h * w, dtype=torch.bool, device=embeddings.device)
    keep[order[:count]] = True
    return keep.view(t, h, w)


def tokens_per_frame(mask: torch.Tensor) -> list[int]:
    """Kept tokens per frame, for rebuilding the per-frame prompt (a frame may keep 0)."""
    return mask.flatten(1).sum(dim=1).tolist()


def apply_retention(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The kept rows of [T*H*W, D] (or [T, H, W, D]) embeddings, in their original order."""
    flat = embeddings.reshape(-1, embeddings.shape[-1])
    keep = mask.reshape(-1)
    if keep.numel() != flat.shape[0]:
        raise ValueError(f"mask has {keep.numel()} positions but embeddings have {flat.shape[0]} rows")
    return flat[keep.to(flat.device)]
