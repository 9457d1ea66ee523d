"""Paint per-tile scores onto a thumbnail-sized grid at each tile's exact level-0 footprint.

A tile with top-left corner (x, y) and side `tile_px_level0` covers the level-0 box
[x, x + tile_px_level0) x [y, y + tile_px_level0). On a thumbnail of size (W, H) of a slide of
level-0 size (W0, H0) the box is scaled by W / W0 along x and by H / H0 along y, separately,
because thumbnail sizes are rounded per axis and the two scales differ slightly.

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


def _axis_spans(low: np.ndarray, high: np.ndarray, n_pixels: int) -> tuple[np.ndarray, ...]:
    """Split intervals [low, high) in pixel units into 3 pixel spans with constant overlap.

    Span 0 is the first (partly covered) pixel, span 1 the fully covered pixels, span 2 the last
    (partly covered) pixel. Returns start, stop (int64 [N, 3], clipped to [0, n_pixels]) and
    weight (float64 [N, 3]: the covered fraction of each pixel of the span).
    """
    first = np.floor(low)
    last = np.floor(high)
    single = last == first
    start = np.stack([first, first + 1, last], axis=1)
    stop = np.stack([first + 1, np.maximum(last, first + 1), last + 1], axis=1)
    weight = np.stack(
        [
            np.where(single, high - low, first + 1 - low),
            np.ones_like(low),
            np.where(single, 0.0, high - last),
        ],
        axis=1,
    )
    start = np.clip(start, 0, n_pixels).astype(np.int64)
    stop = np.clip(stop, 0, n_pixels).astype(np.int64)
    return start, stop, weight


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

    x_start, x_stop, x_weight = _axis_spans(boxes[:, 0] * scale_x, boxes[:, 2] * scale_x, width)
    y_start, y_stop, y_weight = _axis_spans(boxes[:, 1] * scale_y, boxes[:, 3] * scale_y, height)

    # Each tile is the sum of 3 x 3 rectangles of constant weight; each rectangle adds +w at
    # its top-left and bottom-right corners and -w at the other two in a difference array whose
    # 2-D cumulative sum is the painted plane.
    stride = width + 1
    corner_index: list[np.ndarray] = []
    corner_weight: list[np.ndarray] = []
    for i in range(3):
        for j in range(3):
            weight = x_weight[:, i] * y_weight[:, j]
            keep = (
                (weight > 0)
                & (x_stop[:, i] > x_start[:, i])
                & (y_stop[:, j] > y_start[:, j])
            )
            if not keep.any():
                continue
            x0, x1 = x_start[keep, i], x_stop[keep, i]
            y0, y1 = y_start[keep, j], y_stop[keep, j]
            w = weight[keep]
            tiles = np.flatnonzero(keep)
            for index, sign in ((y0 * stride + x0, 1.0), (y0 * stride + x1, -1.0),
                                (y1 * stride + x0, -1.0), (y1 * stride + x1, 1.0)):
                corner_index.append(np.stack([index, tiles], axis=1))
                corner_weight.append(sign * w)

    n_cells = (height + 1) * stride
    if corner_index:
        pairs = np.concatenate(corner_index)
        signed = np.concatenate(corner_weight)
        cells, tiles = pairs[:, 0], pairs[:, 1]
    else:
        cells = np.zeros(0, dtype=np.int64)
        tiles = np.zeros(0, dtype=np.int64)
        signed = np.zeros(0)

    def integrate(cell_weights: np.ndarray) -> np.ndarray:
        plane = np.bincount(cells, weights=cell_weights, minlength=n_cells)
        plane = plane.reshape(height + 1, stride)
        np.cumsum(plane, axis=0, out=plane)
        np.cumsum(plane, axis=1, out=plane)
        return plane[:height, :width]

    coverage = integrate(signed)
    # Cumulative sums leave rounding residue of order 1e-12 on uncovered pixels.
    covered = coverage > 1e-6
    mean = np.zeros((height, width, n_channels), dtype=np.float32)
    for channel in range(n_channels):
        total = integrate(signed * values[tiles, channel])
        mean[..., channel][covered] = total[covered] / coverage[covered]
    coverage = np.where(covered, coverage, 0.0).astype(np.float32)
    return ScoreRaster(mean=mean, coverage=coverage, scale_xy=(scale_x, scale_y))
