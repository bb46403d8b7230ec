"""EVS retention against the golden vectors (shared/reference/evs.json) and constructed cases."""

from __future__ import annotations

import pytest
import torch

from glimpse.processing.evs import (
    apply_retention,
    dissimilarity_scores,
    retained_count,
    retention_mask,
    tokens_per_frame,
)
from tests.golden import golden_cases

CASES = golden_cases("evs.json")


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{'x'.join(map(str, c['shape']))}-q{c['pruning_rate']}"
)
def test_golden_masks(case: dict) -> None:
    dtype = getattr(torch, case.get("dtype", "float32"))
    embeddings = torch.tensor(case["embeddings"], dtype=dtype).view(*case["shape"])
    mask = retention_mask(embeddings, case["pruning_rate"])
    t, h, w, _ = case["shape"]
    assert mask.dtype == torch.bool and mask.shape == (t, h, w)
    assert mask.flatten().int().tolist() == case["mask"]
    assert int(mask.sum()) == case["kept"]


def test_count_formula_in_python_floats() -> None:
    assert retained_count(10, 256, 0.8) == 511  # int(2560 * 0.19999999999999996)
    assert retained_count(128, 256, 0.75) == 8192
    assert retained_count(2, 256, 0.9) == 256  # never below one frame
    assert retained_count(1, 256, 0.5) == 256
    assert retained_count(3, 4, 0.0) == 12


@pytest.mark.parametrize("q", [-0.1, 1.0, 1.5, float("nan"), "x", None])
def test_invalid_pruning_rate(q: object) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        retention_mask(torch.zeros(2, 2, 2, 3), q)  # type: ignore[arg-type]


def test_q_zero_keeps_everything() -> None:
    embeddings = torch.randn(4, 3, 3, 8)
    mask = retention_mask(embeddings, 0.0)
    assert mask.all() and mask.shape == (4, 3, 3)
    assert tokens_per_frame(mask) == [9, 9, 9, 9]
    assert torch.equal(apply_retention(embeddings.reshape(-1, 8), mask), embeddings.reshape(-1, 8))


def test_exactly_the_changed_positions_are_kept() -> None:
    g = torch.Generator().manual_seed(0)
    t, h, w, d = 5, 4, 4, 16
    base = torch.randn(h, w, d, generator=g)
    embeddings = base.expand(t, h, w, d).clone()
    changed = {(1, 0, 3), (2, 2, 2), (2, 3, 0), (4, 1, 1)}
    for ti, hi, wi in changed:
        embeddings[ti, hi, wi] = torch.randn(d, generator=g)
    # Frames after a change differ from their predecessor at that position too.
    changed |= {(ti + 1, hi, wi) for ti, hi, wi in changed if ti + 1 < t}
    keep = h * w + len(changed)
    q = 1 - (keep + 0.5) / (h * w * t)  # int(H*W*T*(1-q)) == keep
    assert retained_count(t, h * w, q) == keep
    mask = retention_mask(embeddings, q)
    expected = torch.zeros(t, h, w, dtype=torch.bool)
    expected[0] = True
    for ti, hi, wi in changed:
        expected[ti, hi, wi] = True
    assert torch.equal(mask, expected)
    assert tokens_per_frame(mask) == [16, 1, 3, 2, 1]


def test_ties_resolve_to_the_lower_index() -> None:
    # Every frame equals the previous one: all of frames 1.. score 0, so the extra tokens are the
    # first ones in flat order.
    embeddings = torch.ones(3, 2, 2, 4)
    mask = retention_mask(embeddings, 0.5)  # count = int(12 * 0.5) = 6
    assert mask.flatten().int().tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_a_frame_may_keep_zero_tokens() -> None:
    embeddings = torch.randn(3, 2, 2, 4)
    embeddings[1] = embeddings[0]  # frame 1 identical: scores 0
    mask = retention_mask(embeddings, 1 - 8 / 12)
    assert tokens_per_frame(mask) == [4, 0, 4]


def test_frame_zero_always_kept_and_scores_255() -> None:
    embeddings = torch.randn(4, 2, 3, 5)
    scores = dissimilarity_scores(embeddings)
    assert scores.dtype == torch.float32 and torch.all(scores[0] == 255)
    assert torch.all(scores[1:] <= 2)
    mask = retention_mask(embeddings, 0.95)
    assert mask[0].all() and int(mask.sum()) == 6


def test_zero_vectors_score_one() -> None:
    embeddings = torch.zeros(2, 1, 2, 3)
    embeddings[0, 0, 1] = 1.0
    scores = dissimilarity_scores(embeddings)
    assert scores[1].flatten().tolist() == [1.0, 1.0]


def test_bf16_is_scored_in_float32() -> None:
    embeddings = torch.randn(4, 3, 3, 8).to(torch.bfloat16)
    mask = retention_mask(embeddings, 0.6)
    assert torch.equal(mask, retention_mask(embeddings.float(), 0.6))
    assert dissimilarity_scores(embeddings).dtype == torch.float32


def test_single_frame() -> None:
    mask = retention_mask(torch.randn(1, 2, 2, 3), 0.9)
    assert mask.all()


def test_apply_retention_keeps_original_order() -> None:
    embeddings = torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 2, 2, 1).expand(3, 2, 2, 3)
    mask = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 1], dtype=torch.bool).view(3, 2, 2)
    kept = apply_retention(embeddings.reshape(12, 3), mask)
    assert kept[:, 0].tolist() == [0, 1, 2, 3, 5, 8, 11]
    assert torch.equal(apply_retention(embeddings, mask), kept)
    with pytest.raises(ValueError):
        apply_retention(torch.zeros(5, 3), mask)


def test_wrong_rank_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[T, H, W, D\]"):
        retention_mask(torch.zeros(2, 4, 3), 0.5)


def _device_cases() -> list[tuple[torch.Tensor, float]]:
    g = torch.Generator().manual_seed(1)
    shapes = [(8, 16, 16, 64, 0.75), (5, 4, 4, 8, 0.7), (3, 16, 16, 1024, 0.5)]
    cases = [(torch.randn(t, h, w, d, generator=g), q) for t, h, w, d, q in shapes]
    for case in CASES:
        if isinstance(case, dict):
            cases.append((torch.tensor(case["embeddings"]).view(*case["shape"]), case["pruning_rate"]))
    return cases


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    for embeddings, q in _device_cases():
        e = embeddings.to(dtype)
        on_gpu = retention_mask(e.cuda(), q)
        assert on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.cpu(), retention_mask(e, q)), (tuple(e.shape), q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_nearly_static_video_is_deterministic() -> None:
    """Scores of a nearly static video are rounding noise: CUDA and CPU may order them differently
    (different reduction order), but each device repeats itself and keeps the same count."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(1, 16, 16, 256, generator=g)
    e = (base + 1e-3 * torch.randn(16, 16, 16, 256, generator=g)).cuda()
    first, second = retention_mask(e, 0.5), retention_mask(e, 0.5)
    assert torch.equal(first, second)
    assert int(first.sum()) == int(retention_mask(e.cpu(), 0.5).sum()) == retained_count(16, 256, 0.5)
    assert first[0].all()
