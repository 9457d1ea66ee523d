"""Score normalisation and colour maps."""

from __future__ import annotations

import numpy as np
import pytest

from mil.heatmap.colormap import Colormap, apply_colormap, colormap_lut
from mil.heatmap.normalize import Normalization, normalize_scores


def test_percentile_ranks_within_slide() -> None:
    result = normalize_scores(np.array([0.3, 0.1, 0.9, 0.5, 0.7]))
    np.testing.assert_allclose(result.values, [0.25, 0.0, 1.0, 0.5, 0.75])
    assert result.method is Normalization.percentile
    assert "percentile" in result.label


def test_percentile_ties_share_average_rank() -> None:
    result = normalize_scores(np.array([0.0, 0.0, 0.0, 1.0]))
    np.testing.assert_allclose(result.values, [1 / 3, 1 / 3, 1 / 3, 1.0])


def test_percentile_ignores_scale() -> None:
    scores = np.random.default_rng(0).random(50)
    small = normalize_scores(scores * 1e-6).values
    large = normalize_scores(scores * 1e3 + 7).values
    np.testing.assert_allclose(small, large)


def test_minmax_spans_slide_range() -> None:
    result = normalize_scores(np.array([2.0, 4.0, 3.0]), "minmax")
    np.testing.assert_allclose(result.values, [0.0, 1.0, 0.5])
    assert result.tick_labels == ("2", "3", "4")


def test_raw_uses_fixed_range_and_clips() -> None:
    result = normalize_scores(np.array([-1.0, 0.25, 3.0]), "raw", raw_range=(0.0, 0.5))
    np.testing.assert_allclose(result.values, [0.0, 0.5, 1.0])
    assert result.tick_labels == ("0", "0.25", "0.5")


@pytest.mark.parametrize("method", list(Normalization))
def test_constant_scores_map_to_middle(method: Normalization) -> None:
    result = normalize_scores(np.full(4, 0.5), method)
    np.testing.assert_allclose(result.values, 0.5)


def test_nan_scores_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        normalize_scores(np.array([0.1, np.nan]))


def test_empty_raw_range_rejected() -> None:
    with pytest.raises(ValueError, match="raw_range"):
        normalize_scores(np.array([0.1]), "raw", raw_range=(1.0, 1.0))


@pytest.mark.parametrize("name", list(Colormap))
def test_colormap_ends_and_shape(name: Colormap) -> None:
    lut = colormap_lut(name)
    assert lut.shape == (256, 3)
    assert lut.dtype == np.uint8
    colors = apply_colormap(np.array([[0.0, 1.0], [-5.0, 5.0]]), name)
    assert colors.shape == (2, 2, 3)
    np.testing.assert_array_equal(colors[0, 0], lut[0])
    np.testing.assert_array_equal(colors[0, 1], lut[255])
    np.testing.assert_array_equal(colors[1, 0], lut[0])
    np.testing.assert_array_equal(colors[1, 1], lut[255])


def test_viridis_ends_match_published_colours() -> None:
    lut = colormap_lut(Colormap.viridis)
    np.testing.assert_array_equal(lut[0], [0x44, 0x01, 0x54])
    np.testing.assert_array_equal(lut[255], [0xFD, 0xE7, 0x25])
