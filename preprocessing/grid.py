"""Tile grids in level-0 pixels and the tissue fraction under each tile.

A tile is `tile_px` pixels at `target_mpp`; its level-0 footprint is
``tile_px * target_mpp / slide_mpp`` pixels (a float). Neighbouring tiles start
``(tile_px - overlap_px) * target_mpp / slide_mpp`` level-0 pixels apart. The grid starts at
the top-left corner of the scanned area and continues until a tile reaches its bottom-right
edge. Tiles that stick out past the slide edge are read with white padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GridGeometry:
    """Tile size and spacing in level-0 pixels for one slide.

    Attributes:
        tile_px_level0: side of a tile's footprint at level 0.
        stride_level0: distance between the top-left corners of neighbouring tiles at level 0.
    """

    tile_px_level0: float
    stride_level0: float


def grid_geometry(
    tile_px: int, overlap_px: int, target_mpp: float, slide_mpp: float
) -> GridGeometry:
    """Level-0 footprint and stride of `tile_px` tiles at `target_mpp`.

    Raises:
        ValueError: `overlap_px` is not in [0, tile_px) or the stride is below one level-0 pixel.
    """
    if not 0 <= overlap_px < tile_px:
        raise ValueError(
            f"--overlap-px {overlap_px} must be at least 0 and below --tile-px {tile_px}"
        )
    scale = target_mpp / slide_mpp
    geometry = GridGeometry(tile_px * scale, (tile_px - overlap_px) * scale)
    if geometry.stride_level0 < 1.0:
        raise ValueError(
            f"A stride of {geometry.stride_level0:.3f} level-0 pixels would repeat tiles. "
            "Increase --tile-px or --target-mpp, or reduce --overlap-px."
        )
    return geometry


def tile_grid(bounds: tuple[int, int, int, int], geometry: GridGeometry) -> np.ndarray:
    """Top-left corners of every tile over the scanned area.

    Args:
        bounds: (x, y, width, height) of the scanned area in level-0 pixels.
        geometry: tile footprint and stride.

    Returns:
        int64 [N, 2] level-0 (x, y), rows in raster order (y, then x), without duplicates.
    """
    x0, y0, width, height = bounds
    xs = _axis_starts(x0, width, geometry)
    ys = _axis_starts(y0, height, geometry)
    grid_x, grid_y = np.meshgrid(xs, ys)
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.int64)


def _axis_starts(start: int, length: int, geometry: GridGeometry) -> np.ndarray:
    tile, stride = geometry.tile_px_level0, geometry.stride_level0
    count = 1 if length <= tile else math.ceil((length - tile) / stride - 1e-9) + 1
    # Positions come from the index, not by accumulating the stride, so no error builds up.
    positions = np.rint(start + np.arange(count) * stride).astype(np.int64)
    return np.unique(positions)


def tissue_fractions(
    coords: np.ndarray,
    tile_px_level0: float,
    mask: np.ndarray,
    scale: tuple[float, float],
) -> np.ndarray:
    """Fraction of each tile's footprint covered by tissue, with sub-pixel accuracy.

    Uses the summed-area table of the mask. The mask is constant on each pixel, so bilinear
    interpolation of that table gives the exact covered area of any box.

    Args:
        coords: int [N, 2] level-0 (x, y) top-left corners.
        tile_px_level0: footprint side at level 0.
        mask: bool [h, w] tissue mask covering the level-0 extent.
        scale: level-0 pixels per mask pixel along x and y.

    Returns:
        float64 [N] in [0, 1]; parts of a tile outside the mask count as background.
    """
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float64)
    height, width = mask.shape
    table = np.zeros((height + 1, width + 1), dtype=np.float64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)

    sx, sy = scale
    left = coords[:, 0] / sx
    top = coords[:, 1] / sy
    right = (coords[:, 0] + tile_px_level0) / sx
    bottom = (coords[:, 1] + tile_px_level0) / sy
    covered = (
        _area_before(table, right, bottom)
        - _area_before(table, left, bottom)
        - _area_before(table, right, top)
        + _area_before(table, left, top)
    )
    footprint = (tile_px_level0 / sx) * (tile_px_level0 / sy)
    return np.clip(covered / footprint, 0.0, 1.0)


def _area_before(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask area in [0, x) x [0, y), by bilinear interpolation of the summed-area table."""
    height, width = table.shape[0] - 1, table.shape[1] - 1
    x = np.clip(x, 0.0, width)
    y = np.clip(y, 0.0, height)
    x0 = np.minimum(np.floor(x).astype(np.int64), width - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), height - 1)
    fx, fy = x - x0, y - y0
    top = table[y0, x0] * (1 - fx) + table[y0, x0 + 1] * fx
    bottom = table[y0 + 1, x0] * (1 - fx) + table[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy
