"""Image tiling against the golden vectors (shared/reference/tiles.json) and its own edge cases."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from glimpse.processing.image import (
    CLIP_MEAN,
    CLIP_STD,
    image_token_count,
    process_image,
    resize_square,
    tile_count,
    tile_grid,
    tile_image,
    tiles_to_tensor,
)
from tests.golden import golden_cases

CASES = golden_cases("tiles.json")


def _id(case: dict) -> str:
    return f"{case['width']}x{case['height']}-max{case['max_num_tiles']}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_golden_tiles(case: dict) -> None:
    w, h, mx = case["width"], case["height"], case["max_num_tiles"]
    assert tile_grid(w, h, mx) == (case["cols"], case["rows"])
    n = tile_count(w, h, mx)
    assert n == case["tiles_with_thumbnail"]
    assert image_token_count(n) == case["image_tokens"]


def test_golden_file_covers_float_cases() -> None:
    if CASES[0] is None or not isinstance(CASES[0], dict):
        pytest.skip("shared/reference/tiles.json not found")
    assert len(CASES) >= 100
    assert any("note" in c for c in CASES)


def _exact_fraction_grid(w: int, h: int, mx: int) -> tuple[int, int]:
    """The same rule in exact fractions: what the reference does NOT do."""
    grids = sorted(
        ((c, r) for c in range(1, mx + 1) for r in range(1, mx + 1) if c * r <= mx),
        key=lambda g: (g[0] * g[1], g[0]),
    )
    best, best_diff = (1, 1), None
    for c, r in grids:
        diff = abs(Fraction(w, h) - Fraction(c, r))
        if best_diff is None or diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and w * h > 0.5 * 512 * 512 * c * r:
            best = (c, r)
    return best


def test_280x480_uses_float_comparison() -> None:
    assert tile_grid(280, 480) == (2, 3)
    assert _exact_fraction_grid(280, 480, 12) != (2, 3)


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((512, 512), (1, 1)),
        ((1024, 1024), (2, 2)),
        ((2048, 512), (4, 1)),
        ((512, 2048), (1, 4)),
        ((1536, 512), (3, 1)),
        ((10000, 10), (12, 1)),
        ((10, 10000), (1, 12)),
        ((1, 1), (1, 1)),
    ],
)
def test_aspect_ratios(size: tuple[int, int], grid: tuple[int, int]) -> None:
    assert tile_grid(*size) == grid


def test_tie_rule_prefers_larger_grid_only_for_large_images() -> None:
    # Square images tie between 1x1, 2x2 and 3x3; the later grid wins when the image has more
    # than half its pixels.
    assert tile_grid(100, 100) == (1, 1)
    assert tile_grid(362, 362) == (1, 1)  # 131044 < 0.5 * 512² * 4 = 524288
    assert tile_grid(725, 725) == (2, 2)  # 525625 > 524288
    assert tile_grid(724, 724) == (1, 1)  # 524176 < 524288
    assert tile_grid(1086, 1086) == (2, 2)  # 1179396 < 0.5 * 512² * 9 = 1179648
    assert tile_grid(1087, 1087) == (3, 3)  # 1181569 > 1179648
    assert tile_grid(1200, 1200) == (3, 3)


def test_tie_threshold_uses_tile_size() -> None:
    assert tile_grid(300, 300, tile_size=256) == (1, 1)  # 90000 < 0.5 * 256² * 4 = 131072
    assert tile_grid(400, 400, tile_size=256) == (2, 2)  # 160000 > 131072, < 294912 (3x3)
    assert tile_grid(600, 600, tile_size=256) == (3, 3)  # 360000 > 294912


def test_max_num_tiles_one_is_single_tile_without_thumbnail() -> None:
    image = Image.new("RGB", (1920, 1080), (10, 20, 30))
    tiles = tile_image(image, max_num_tiles=1)
    assert len(tiles) == 1
    assert tiles[0].size == (512, 512)
    assert tile_count(1920, 1080, 1) == 1


@pytest.mark.parametrize("size", [(512, 512), (1024, 512), (640, 480), (100, 3000), (1700, 2200)])
def test_thumbnail_present_iff_more_than_one_tile(size: tuple[int, int]) -> None:
    cols, rows = tile_grid(*size)
    tiles = tile_image(Image.new("RGB", size), max_num_tiles=12)
    expected = cols * rows + (1 if cols * rows > 1 else 0)
    assert len(tiles) == expected == tile_count(*size)
    assert all(t.size == (512, 512) for t in tiles)
    assert len(tile_image(Image.new("RGB", size), use_thumbnail=False)) == cols * rows


def test_tiles_are_row_major_and_thumbnail_last() -> None:
    # 1024x512 -> 2x1 grid; left half red, right half blue.
    arr = np.zeros((512, 1024, 3), dtype=np.uint8)
    arr[:, :512] = (255, 0, 0)
    arr[:, 512:] = (0, 0, 255)
    tiles = tile_image(Image.fromarray(arr))
    assert len(tiles) == 3
    assert np.asarray(tiles[0])[256, 256].tolist() == [255, 0, 0]
    assert np.asarray(tiles[1])[256, 256].tolist() == [0, 0, 255]
    thumb = np.asarray(tiles[2])
    assert thumb[256, 10].tolist() == [255, 0, 0] and thumb[256, 500].tolist() == [0, 0, 255]

    # 512x1024 -> 1x2 grid: rows go top to bottom.
    tiles = tile_image(Image.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2))))
    assert np.asarray(tiles[0])[256, 256].tolist() == [255, 0, 0]
    assert np.asarray(tiles[1])[256, 256].tolist() == [0, 0, 255]


def test_resize_is_pil_bicubic() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 700, 3), dtype=np.uint8))
    cols, rows = tile_grid(700, 300)
    tiles = tile_image(image)
    resized = np.asarray(image.resize((512 * cols, 512 * rows), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(tiles[0]), resized[:512, :512])
    assert np.array_equal(
        np.asarray(tiles[-1]), np.asarray(image.resize((512, 512), Image.Resampling.BICUBIC))
    )


@pytest.mark.parametrize("tile_size", [224, 448, 512])
def test_tile_sizes(tile_size: int) -> None:
    tiles = tile_image(Image.new("RGB", (2000, 1000)), max_num_tiles=6, tile_size=tile_size)
    assert all(t.size == (tile_size, tile_size) for t in tiles)
    assert tiles_to_tensor(tiles).shape == (len(tiles), 3, tile_size, tile_size)


def test_non_rgb_input_is_converted() -> None:
    tiles = tile_image(Image.new("L", (512, 512), 128))
    assert tiles[0].mode == "RGB"
    assert np.asarray(tiles[0])[0, 0].tolist() == [128, 128, 128]


def test_normalisation_of_a_known_pixel() -> None:
    tile = Image.new("RGB", (512, 512), (255, 0, 128))
    x = tiles_to_tensor([tile])
    assert x.dtype == torch.float32 and x.shape == (1, 3, 512, 512)
    expected = [
        (1.0 - CLIP_MEAN[0]) / CLIP_STD[0],
        (0.0 - CLIP_MEAN[1]) / CLIP_STD[1],
        (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2],
    ]
    assert x[0, :, 100, 200].tolist() == pytest.approx(expected, abs=1e-6)
    # Exactly the torchvision-style arithmetic: /255, then - mean, then / std, all in float32.
    value = torch.tensor(128, dtype=torch.uint8).float().div(255)
    manual = value.sub(torch.tensor(CLIP_MEAN[2])).div(torch.tensor(CLIP_STD[2]))
    assert x[0, 2, 0, 0].item() == manual.item()


def test_process_image() -> None:
    out = process_image(Image.new("RGB", (1920, 1080)))
    assert out.grid == (4, 2)
    assert out.num_tiles == 9
    assert out.pixel_values.shape == (9, 3, 512, 512)


def test_resize_square_squashes() -> None:
    frame = np.zeros((360, 640, 3), dtype=np.uint8)
    frame[:, :320] = 255
    out = resize_square(frame)
    assert out.size == (512, 512) and out.mode == "RGB"
    assert np.asarray(out)[256, 10].tolist() == [255, 255, 255]
    assert np.asarray(out)[256, 500].tolist() == [0, 0, 0]
    assert resize_square(Image.new("RGBA", (100, 50)), tile_size=224).size == (224, 224)
    with pytest.raises(ValueError):
        resize_square(np.zeros((10, 10), dtype=np.uint8))


@pytest.mark.parametrize(("w", "h", "mx"), [(0, 10, 12), (10, -1, 12), (10, 10, 0)])
def test_invalid_arguments(w: int, h: int, mx: int) -> None:
    with pytest.raises(ValueError):
        tile_grid(w, h, mx)
