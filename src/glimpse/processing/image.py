"""Image tiling for the vision encoder (MODEL_SPEC §4): pick a grid, cut 512² tiles, add a thumbnail.

Everything here is pure and deterministic so that prompt lengths (256 tokens per tile) can be computed
before any pixels are touched, and so that the golden vectors in shared/reference/tiles.json pin it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

TILE_SIZE = 512
TOKENS_PER_TILE = 256  # (512 / 16)² patches, pixel shuffle 0.5 -> 16 x 16 tokens
DEFAULT_MAX_NUM_TILES = 12


@dataclass
class ProcessedImage:
    """One image ready for the encoder: tiles (thumbnail last when present) and the grid they came from."""

    pixel_values: torch.Tensor  # [num_tiles, 3, tile_size, tile_size] float32, normalised
    num_tiles: int  # including the thumbnail
    grid: tuple[int, int]  # (cols, rows), thumbnail not counted


@lru_cache(maxsize=64)
def _candidate_grids(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with 1 <= cols*rows <= max_num_tiles, ordered by cols*rows, then by cols.

    The secondary order never changes a result: two grids with the same area never tie on aspect
    distance, because some other candidate ratio (at least 1 or an integer k/1) always lies between
    them (checked for every max_num_tiles up to 100). InternVL orders them as a Python set happens to
    iterate; cols ascending is the readable equivalent.
    """
    grids = [
        (cols, rows) for cols in range(1, max_num_tiles + 1) for rows in range(1, max_num_tiles // cols + 1)
    ]
    return tuple(sorted(grids, key=lambda g: (g[0] * g[1], g[0])))


def tile_grid(
    width: int, height: int, max_num_tiles: int = DEFAULT_MAX_NUM_TILES, tile_size: int = TILE_SIZE
) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to width/height (InternVL's rule).

    Distances are compared in Python floats, as the reference does: exact fractions pick a different
    grid for some sizes (e.g. 280x480). On an exact tie the later (larger) grid wins when the image has
    more than half that grid's pixels, so large images get more tiles.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_num_tiles < 1:
        raise ValueError(f"max_num_tiles must be at least 1, got {max_num_tiles}")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(max_num_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_count(
    width: int,
    height: int,
    max_num_tiles: int = DEFAULT_MAX_NUM_TILES,
    tile_size: int = TILE_SIZE,
    use_thumbnail: bool = True,
) -> int:
    """Tiles the encoder will see for an image of this size, thumbnail included, without resizing it."""
    cols, rows = tile_grid(width, height, max_num_tiles, tile_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def image_token_count(num_tiles: int, tokens_per_tile: int = TOKENS_PER_TILE) -> int:
    """LLM placeholder tokens for an image of `num_tiles` tiles (thumbnail included)."""
    return num_tiles * tokens_per_tile


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def tile_image(
    image: Image.Image,
    max_num_tiles: int = DEFAULT_MAX_NUM_TILES,
    tile_size: int = TILE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Resize to the chosen grid with PIL bicubic and cut it row-major; thumbnail of the whole image last."""
    image = _to_rgb(image)
    cols, rows = tile_grid(image.width, image.height, max_num_tiles, tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def resize_square(image: Image.Image | np.ndarray, tile_size: int = TILE_SIZE) -> Image.Image | np.ndarray:
    """Squash a video frame to one tile_size² tile (no aspect fit, no thumbnail), PIL bicubic. A frame
    array that is already tile-sized comes back as it is."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a frame array must be HxWx3 uint8, got shape {image.shape} {image.dtype}")
        if image.shape[:2] == (tile_size, tile_size):
            return image  # already a tile: PIL's same-size resize would only copy it
        image = Image.fromarray(np.ascontiguousarray(image))
    return _to_rgb(image).resize((tile_size, tile_size), Image.Resampling.BICUBIC)


def tiles_to_tensor(
    tiles: list[Image.Image],
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """Stack tiles into [N, 3, H, W] float32: RGB scaled to [0, 1], then (x - mean) / std per channel.

    The arithmetic follows torchvision's ToTensor + Normalize (divide by 255 in float32, subtract,
    divide) so values match a reference pipeline bit for bit.
    """
    if not tiles:
        raise ValueError("no tiles to stack")
    arrays = np.stack([np.asarray(_to_rgb(t), dtype=np.uint8) for t in tiles])  # [N, H, W, 3]
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub(mean_t).div(std_t).contiguous()


def process_image(
    image: Image.Image,
    max_num_tiles: int = DEFAULT_MAX_NUM_TILES,
    tile_size: int = TILE_SIZE,
    use_thumbnail: bool = True,
) -> ProcessedImage:
    """Tile and normalise one image for the encoder."""
    image = _to_rgb(image)
    grid = tile_grid(image.width, image.height, max_num_tiles, tile_size)
    tiles = tile_image(image, max_num_tiles, tile_size, use_thumbnail)
    return ProcessedImage(pixel_values=tiles_to_tensor(tiles), num_tiles=len(tiles), grid=grid)
