"""Paint per-tile scores onto a thumbnail-sized grid at each tile's exact level-0 footprint.

A tile with top-left corner (x, y) and side `tile_px_level0` covers the level-0 box
[x, x + tile_px_level0) x [y, y + tile_px_level0). A thumbnail of size (W, H) of a slide of
level-0 size (W0, H0) scales the box by W / W0 along x and by H / H0 along y. The two scales
differ slightly because thumbnail sizes are rounded per axis.

Each thumbnail pixel receives the area-weighted mean of the scores of the tiles that overlap
it, and a coverage equal to the summed overlap fraction: 1 inside tissue, fractional on tile
edges, 0 outside. Sums are accumulated with a 2-D difference array, so the cost is O(N + W*H)
whatever the tile size, and memory stays at a few float64 planes of the thumbnail size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoreRaster:
    """Tile scores painted on a grid of H x W thumbnail pixels.

    Attributes:
        mean: float32 [H, W, C] area-weighted mean score of the tiles over each pixel; 0 where
            no tile covers the pixel.
        coverage: float32 [H, W] summed fraction of the pixel covered by tiles; can exceed 1
            where tiles overlap.
        scale_xy: thumbnail pixels per level-0 pixel along x and along y.
    """

    mean: np.ndarray
    coverage: np.ndarray
    scale_xy: tuple[float, float]

    @property
    def tissue(self) -> np.ndarray:
        """Bool [H, W]: pixels at least half covered by tiles."""
        return self.coverage >= 0.5


def tile_boxes(coords: np.ndarray, tile_px_level0: float) -> np.ndarray:
    """Level-0 boxes float64 [N, 4] as (x0, y0, x1, y1) of tiles at `coords` [N, 2] (x, y)."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    size = float(tile_px_level0)
    if not (np.isfinite(size) and size > 0):
        raise ValueError(f"tile_px_level0 must be a positive number, got {tile_px_level0}")
    return np.concatenate([coords, coords + size], axis=1)


def _axis_steps(low: np.ndarray, high: np.ndarray, n_pixels: int) -> tuple[np.ndarray, ...]:
    """Steps of the coverage profile of intervals [low, high) given in pixel units.

    Pixel i is covered by the fraction of [i, i + 1) inside the interval: w_first on the first
    pixel, 1 in between, w_last on the last. The profile is the cumulative sum of 4 steps: at
    first (+w_first), first + 1 (1 - w_first), last (w_last - 1) and last + 1 (-w_last). For an
    interval inside one pixel the steps are +w and -w. Step positions are clipped to
    [0, n_pixels], so steps left of the canvas still count and steps right of it land in a
    spare column that is dropped.

    Returns:
        position int64 [N, 4] and step float64 [N, 4].
    """
    first = np.floor(low)
    last = np.floor(high)
    single = last == first
    w_first = np.where(single, high - low, first + 1 - low)
    w_last = np.where(single, 0.0, high - last)
    position = np.stack([first, first + 1, last, last + 1], axis=1)
    step = np.stack(
        [w_first, np.where(single, -w_first, 1 - w_first), w_last - np.where(single, 0.0, 1.0),
         -w_last],
        axis=1,
    )
    position = np.clip(position, 0, n_pixels).astype(np.int64)
    return position, step


def rasterize_tiles(
    values: np.ndarray,
    boxes_level0: np.ndarray,
    level0_size: tuple[int, int],
    canvas_size: tuple[int, int],
) -> ScoreRaster:
    """Paint `values` of tiles onto a canvas, averaging overlapping tiles per pixel.

    Args:
        values: float [N] or [N, C] scores (usually normalised to [0, 1]).
        boxes_level0: float [N, 4] level-0 (x0, y0, x1, y1) boxes, see `tile_boxes`.
        level0_size: (W0, H0) level-0 size of the slide in pixels.
        canvas_size: (W, H) size of the canvas (the thumbnail) in pixels.

    Returns:
        The raster; `mean` has C channels (1 for [N] input).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    boxes = np.asarray(boxes_level0, dtype=np.float64).reshape(-1, 4)
    if values.shape[0] != boxes.shape[0]:
        raise ValueError(f"{values.shape[0]} score rows for {boxes.shape[0]} tile boxes")
    width, height = int(canvas_size[0]), int(canvas_size[1])
    scale_x = width / float(level0_size[0])
    scale_y = height / float(level0_size[1])
    n_channels = values.shape[1]

    x_position, x_step = _axis_steps(boxes[:, 0] * scale_x, boxes[:, 2] * scale_x, width)
    y_position, y_step = _axis_steps(boxes[:, 1] * scale_y, boxes[:, 3] * scale_y, height)

    # A tile's coverage is the outer product of its x and y profiles. So its 2-D difference
    # array is the outer product of its 4 x steps and 4 y steps, 16 entries per tile, and the
    # 2-D cumulative sum of all entries paints every tile at once.
    stride = width + 1
    cells = (y_position[:, :, None] * stride + x_position[:, None, :]).reshape(-1)
    steps = (y_step[:, :, None] * x_step[:, None, :]).reshape(-1)
    n_cells = (height + 1) * stride

    def integrate(cell_weights: np.ndarray) -> np.ndarray:
        plane = np.bincount(cells, weights=cell_weights, minlength=n_cells)
        plane = plane.reshape(height + 1, stride)
        np.cumsum(plane, axis=0, out=plane)
        np.cumsum(plane, axis=1, out=plane)
        return plane[:height, :width]

    coverage = integrate(steps)
    # Cumulative sums leave rounding residue of order 1e-12 on uncovered pixels.
    covered = coverage > 1e-6
    mean = np.zeros((height, width, n_channels), dtype=np.float32)
    for channel in range(n_channels):
        total = integrate(steps * np.repeat(values[:, channel], 16))
        mean[..., channel][covered] = total[covered] / coverage[covered]
    coverage = np.where(covered, coverage, 0.0).astype(np.float32)
    return ScoreRaster(mean=mean, coverage=coverage, scale_xy=(scale_x, scale_y))
