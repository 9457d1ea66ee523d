"""Tile grids in level-0 pixels and tissue fractions."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.grid import GridGeometry, grid_geometry, tile_grid, tissue_fractions


def test_geometry_from_mpp() -> None:
    geometry = grid_geometry(tile_px=224, overlap_px=32, target_mpp=0.5, slide_mpp=0.2281)
    assert geometry.tile_px_level0 == pytest.approx(224 * 0.5 / 0.2281)
    assert geometry.stride_level0 == pytest.approx(192 * 0.5 / 0.2281)


@pytest.mark.parametrize("overlap", [-1, 224, 300])
def test_geometry_rejects_bad_overlap(overlap: int) -> None:
    with pytest.raises(ValueError, match=f"--overlap-px {overlap} must be .* below --tile-px 224"):
        grid_geometry(224, overlap, 0.5, 0.25)


def test_geometry_rejects_subpixel_stride() -> None:
    with pytest.raises(ValueError, match="stride of 0.100 level-0 pixels.*Increase --tile-px"):
        grid_geometry(8, 7, 0.1, 1.0)


@pytest.mark.parametrize(
    ("bounds", "tile", "stride"),
    [
        ((0, 0, 40_000, 30_000), 438.4, 438.4),
        ((0, 0, 40_000, 30_000), 438.4, 383.6),
        ((1234, 567, 10_001, 7_003), 255.99, 200.5),
        ((0, 0, 100, 80), 448.0, 448.0),
    ],
)
def test_grid_reaches_far_edge_without_duplicates(
    bounds: tuple[int, int, int, int], tile: float, stride: float
) -> None:
    coords = tile_grid(bounds, GridGeometry(tile, stride))
    x0, y0, width, height = bounds
    xs, ys = np.unique(coords[:, 0]), np.unique(coords[:, 1])
    assert coords.dtype == np.int64
    assert len(np.unique(coords, axis=0)) == len(coords)
    assert xs[0] == x0
    assert ys[0] == y0
    assert xs[-1] + tile >= x0 + width - 0.5
    assert ys[-1] + tile >= y0 + height - 0.5
    # One tile fewer would leave the far edge uncovered.
    if len(xs) > 1:
        assert xs[-2] + tile < x0 + width
    # Positions follow the float stride without drift.
    np.testing.assert_allclose(xs, x0 + np.arange(len(xs)) * stride, atol=0.5)
    assert len(coords) == len(xs) * len(ys)


def _brute_force_fraction(mask: np.ndarray, x: float, y: float, tile: float, scale: float) -> float:
    """Tissue fraction by supersampling the tile footprint 64 x 64 times."""
    samples = (np.arange(64) + 0.5) / 64 * tile
    cols = np.floor((x + samples) / scale).astype(int)
    rows = np.floor((y + samples) / scale).astype(int)
    inside_c = (cols >= 0) & (cols < mask.shape[1])
    inside_r = (rows >= 0) & (rows < mask.shape[0])
    values = np.zeros((64, 64))
    sub = mask[np.clip(rows, 0, mask.shape[0] - 1)][:, np.clip(cols, 0, mask.shape[1] - 1)]
    values[np.ix_(inside_r, inside_c)] = sub[np.ix_(inside_r, inside_c)]
    return float(values.mean())


def test_tissue_fractions_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((37, 53)) > 0.6
    scale = 7.3  # level-0 pixels per mask pixel
    tile = 19.7 * 1.0
    coords = np.stack(
        [rng.integers(-10, 53 * 7, 200), rng.integers(-10, 37 * 7, 200)], axis=1
    ).astype(np.int64)
    fractions = tissue_fractions(coords, tile, mask, (scale, scale))
    expected = [_brute_force_fraction(mask, x, y, tile, scale) for x, y in coords.tolist()]
    np.testing.assert_allclose(fractions, expected, atol=1.5 / 64)


def test_tissue_fraction_outside_mask_is_background() -> None:
    mask = np.ones((10, 10), dtype=bool)
    fractions = tissue_fractions(np.array([[0, 0], [50, 0], [100, 100]]), 100.0, mask, (10.0, 10.0))
    np.testing.assert_allclose(fractions, [1.0, 0.5, 0.0])
    assert tissue_fractions(np.zeros((0, 2), np.int64), 10.0, mask, (1.0, 1.0)).shape == (0,)
