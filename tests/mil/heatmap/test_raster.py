"""Painting tile scores at their exact level-0 footprint."""

from __future__ import annotations

import numpy as np
import pytest

from mil.heatmap.raster import rasterize_tiles, tile_boxes


def test_tile_boxes_from_coords() -> None:
    boxes = tile_boxes(np.array([[10, 20], [0, 5]]), 12.5)
    np.testing.assert_allclose(boxes, [[10, 20, 22.5, 32.5], [0, 5, 12.5, 17.5]])


def test_tile_boxes_reject_bad_size() -> None:
    with pytest.raises(ValueError, match="tile_px_level0"):
        tile_boxes(np.zeros((1, 2)), 0)


def test_coverage_equals_scaled_tile_area() -> None:
    coords = np.array([[13, 7], [400, 300], [1000, 50]])
    size = 97.3
    level0, canvas = (1234, 777), (101, 53)
    raster = rasterize_tiles(np.ones(3), tile_boxes(coords, size), level0, canvas)
    scale_x, scale_y = canvas[0] / level0[0], canvas[1] / level0[1]
    expected = 3 * (size * scale_x) * (size * scale_y)
    assert raster.coverage.sum() == pytest.approx(expected, rel=1e-6)
    assert raster.coverage.max() <= 1.0 + 1e-9
    assert raster.scale_xy == (scale_x, scale_y)


def test_partial_pixels_get_area_fractions() -> None:
    # One tile covering thumbnail x in [1.25, 3.5) and y in [0.5, 1.0).
    raster = rasterize_tiles(np.ones(1), np.array([[1.25, 0.5, 3.5, 1.0]]), (10, 10), (10, 10))
    expected = np.zeros((10, 10))
    expected[0, 1:4] = [0.75 * 0.5, 0.5, 0.5 * 0.5]
    np.testing.assert_allclose(raster.coverage, expected, atol=1e-9)


def test_overlapping_tiles_average_per_pixel() -> None:
    boxes = np.array([[0, 0, 6, 4], [3, 0, 9, 4]], dtype=float)
    raster = rasterize_tiles(np.array([1.0, 0.0]), boxes, (10, 4), (10, 4))
    mean = raster.mean[..., 0]
    np.testing.assert_allclose(mean[:, 0:3], 1.0)
    np.testing.assert_allclose(mean[:, 3:6], 0.5)
    np.testing.assert_allclose(mean[:, 6:9], 0.0)
    np.testing.assert_allclose(raster.coverage[:, 3:6], 2.0)
    np.testing.assert_allclose(raster.coverage[:, 9], 0.0)


def test_scales_x_and_y_separately() -> None:
    # Level 0 is 1000 x 500 but the canvas 100 x 100: y is stretched twice as much as x.
    boxes = tile_boxes(np.array([[500, 250]]), 100)
    raster = rasterize_tiles(np.ones(1), boxes, (1000, 500), (100, 100))
    rows, cols = np.nonzero(raster.coverage > 0.5)
    assert (cols.min(), cols.max() + 1) == (50, 60)
    assert (rows.min(), rows.max() + 1) == (50, 70)


def test_tiles_outside_canvas_are_clipped() -> None:
    boxes = np.array([[-50, -50, 20, 20], [95, 95, 200, 200]], dtype=float)
    raster = rasterize_tiles(np.array([0.2, 0.8]), boxes, (100, 100), (10, 10))
    assert raster.coverage[0:2, 0:2].min() == pytest.approx(1.0)
    assert raster.coverage[9, 9] == pytest.approx(0.25)
    np.testing.assert_allclose(raster.mean[0, 0, 0], 0.2, rtol=1e-6)
    np.testing.assert_allclose(raster.mean[9, 9, 0], 0.8, rtol=1e-6)


def test_channels_painted_independently() -> None:
    values = np.array([[0.1, 0.9], [0.3, 0.7]])
    boxes = np.array([[0, 0, 5, 5], [5, 0, 10, 5]], dtype=float)
    raster = rasterize_tiles(values, boxes, (10, 5), (10, 5))
    assert raster.mean.shape == (5, 10, 2)
    np.testing.assert_allclose(raster.mean[2, 2], [0.1, 0.9], rtol=1e-6)
    np.testing.assert_allclose(raster.mean[2, 7], [0.3, 0.7], rtol=1e-6)


def test_mismatched_rows_rejected() -> None:
    with pytest.raises(ValueError, match="2 score rows for 1 tile boxes"):
        rasterize_tiles(np.ones(2), np.zeros((1, 4)), (10, 10), (10, 10))
