"""One slide end to end: overlay alignment, GeoJSON of the hottest tile, gallery, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box, shape

from mil.heatmap.colormap import apply_colormap
from mil.heatmap.config import HeatmapConfig
from mil.heatmap.render import render_slide
from preprocessing.errors import ConfigError, StoreFormatError
from preprocessing.slide import open_slide
from preprocessing.stores import AttentionStore, read_attention_store

if TYPE_CHECKING:
    from conftest import SyntheticCase

# The case (see conftest.py): level 0 is 3001 x 1999, tiles of 150.4 level-0 pixels on a grid
# of step 150, attention 1 on the tile at (1950, 1200) over a dark mark, 0 elsewhere.
LEVEL0 = (3001, 1999)
TILE_PX_LEVEL0 = 150.4
HOT_TILE = (1950, 1200)
HOT_BOX = (1950, 1200, 2100, 1350)
MARK_RGB = (40, 20, 90)
TISSUE_RGB = (232, 196, 218)


def _render(case: SyntheticCase, out: Path, store: AttentionStore | None = None,
            **options: object) -> dict:
    cfg = HeatmapConfig(attention_dir=case.store_path, output_dir=out, max_size=250,
                        **options)  # type: ignore[arg-type]
    with open_slide(case.slide_path) as slide:
        return render_slide(store or read_attention_store(case.store_path), slide, out, cfg)


def _nearest_reference(map_rgb: np.ndarray, references: list[np.ndarray]) -> np.ndarray:
    """Index [H, W] of the reference colour nearest to each pixel (L1 distance)."""
    distances = [np.abs(map_rgb.astype(int) - np.asarray(ref, dtype=int)).sum(axis=-1)
                 for ref in references]
    return np.argmin(np.stack(distances), axis=0)


def test_hot_spot_aligned_at_four_corners(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    summary = _render(synthetic_case, tmp_path, opacity=1.0, top_k=0)
    width, height = summary["thumbnail_size"]
    assert max(width, height) == 250
    assert LEVEL0[0] / width != int(LEVEL0[0] / width)

    figure = np.asarray(Image.open(tmp_path / "synthetic.png").convert("RGB"))
    map_rgb = figure[:height, :width]
    n_tiles = len(synthetic_case.coords)
    cold_percentile = (n_tiles - 2) / 2 / (n_tiles - 1)
    hot_color = apply_colormap(np.array(1.0), "viridis")
    cold_color = apply_colormap(np.array(cold_percentile), "viridis")
    tissue_color = np.array(TISSUE_RGB)
    nearest = _nearest_reference(map_rgb, [hot_color, cold_color, tissue_color])
    rows, cols = np.nonzero(nearest == 0)

    scale_x, scale_y = width / LEVEL0[0], height / LEVEL0[1]
    x0, y0 = HOT_TILE[0] * scale_x, HOT_TILE[1] * scale_y
    x1, y1 = (HOT_TILE[0] + TILE_PX_LEVEL0) * scale_x, (HOT_TILE[1] + TILE_PX_LEVEL0) * scale_y
    # Pixel edges of the detected hot spot against the exact scaled footprint.
    assert abs(cols.min() - x0) <= 1.0
    assert abs(cols.max() + 1 - x1) <= 1.0
    assert abs(rows.min() - y0) <= 1.0
    assert abs(rows.max() + 1 - y1) <= 1.0
    # The hot spot is one connected box: every pixel inside the detected box is hot.
    assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_hot_spot_lies_on_slide_mark(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    summary = _render(synthetic_case, tmp_path, opacity=0.0, top_k=0)
    width, height = summary["thumbnail_size"]
    figure = np.asarray(Image.open(tmp_path / "synthetic.png").convert("RGB"))
    dark = figure[:height, :width].astype(int).sum(axis=-1) < 400
    rows, cols = np.nonzero(dark)
    scale_x, scale_y = summary["scale_xy"]
    assert abs(cols.min() - HOT_BOX[0] * scale_x) <= 1.0
    assert abs(cols.max() + 1 - HOT_BOX[2] * scale_x) <= 1.0
    assert abs(rows.min() - HOT_BOX[1] * scale_y) <= 1.0
    assert abs(rows.max() + 1 - HOT_BOX[3] * scale_y) <= 1.0


def test_outside_tissue_keeps_thumbnail(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    summary = _render(synthetic_case, tmp_path, opacity=1.0, top_k=0)
    width, height = summary["thumbnail_size"]
    figure = np.asarray(Image.open(tmp_path / "synthetic.png").convert("RGB"))
    # The grid of 150.4 px tiles ends at y = 1950.4, leaving a strip without tiles at the bottom.
    last_y = synthetic_case.coords[:, 1].max() + TILE_PX_LEVEL0
    first_free_row = int(np.ceil(last_y * summary["scale_xy"][1])) + 1
    assert first_free_row < height
    strip = figure[first_free_row:height, :width]
    with open_slide(synthetic_case.slide_path) as slide:
        thumbnail = slide.get_thumbnail(250)
    np.testing.assert_array_equal(strip, thumbnail[first_free_row:height])
    # Inside the tiled area no pixel keeps the plain thumbnail colour.
    inside = figure[: first_free_row - 2, :width]
    assert not np.all(inside == TISSUE_RGB, axis=-1).any()


def test_geojson_hottest_tile_covers_region(synthetic_case: SyntheticCase,
                                            tmp_path: Path) -> None:
    _render(synthetic_case, tmp_path, top_k=0)
    features = json.loads((tmp_path / "synthetic.geojson").read_text())["features"]
    assert len(features) == len(synthetic_case.coords)
    hottest = max(features, key=lambda f: f["properties"]["measurements"]["attention"])
    polygon = shape(hottest["geometry"])
    assert polygon.is_valid
    assert polygon.covers(box(*HOT_BOX))
    assert hottest["properties"]["measurements"]["attention percentile"] == 100
    assert hottest["properties"]["classification"]["name"] == "attention 90-100%"


def test_gallery_lists_hot_tile_first(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    summary = _render(synthetic_case, tmp_path, top_k=3, gallery_tile_px=64)
    with open(tmp_path / "synthetic.top_tiles.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["group"] for row in rows] == ["highest"] * 3 + ["lowest"] * 3
    first = rows[0]
    assert (int(first["x"]), int(first["y"])) == HOT_TILE
    assert int(first["row"]) == synthetic_case.hot_row
    gallery = np.asarray(Image.open(tmp_path / "synthetic.top_tiles.png").convert("RGB"))
    # The first tile of the highest group is the dark mark, read from the slide.
    is_mark = np.all(np.abs(gallery.astype(int) - MARK_RGB) < 12, axis=-1)
    assert is_mark.sum() > 0.8 * 64 * 64
    assert summary["files"]["gallery"] == "synthetic.top_tiles.png"


def test_caption_and_summary(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    summary = _render(synthetic_case, tmp_path, top_k=0)
    assert summary["predicted_class"] == "tumour"
    assert summary["probability"] == pytest.approx(0.875)
    assert summary["normalization"] == "percentile"
    saved = json.loads((tmp_path / "synthetic.summary.json").read_text())
    assert saved["complete"] is True
    figure = Image.open(tmp_path / "synthetic.png")
    width, height = summary["thumbnail_size"]
    assert figure.width > width
    assert figure.height > height


def test_nan_scores_dropped_and_counted(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    store = read_attention_store(synthetic_case.store_path)
    store.attention[[0, 5, 9]] = np.nan
    store.attention[7] = np.inf
    summary = _render(synthetic_case, tmp_path, store=store, top_k=0)
    assert summary["n_dropped_nan"] == 4
    assert summary["n_tiles"] == len(synthetic_case.coords) - 4
    features = json.loads((tmp_path / "synthetic.geojson").read_text())["features"]
    assert len(features) == len(synthetic_case.coords) - 4


def test_length_mismatch_names_both(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    store = read_attention_store(synthetic_case.store_path)
    store.attention = store.attention[:-3]
    n = len(synthetic_case.coords)
    with pytest.raises(StoreFormatError, match=f"{n - 3} rows but coords has {n}"):
        _render(synthetic_case, tmp_path, store=store)
    assert not (tmp_path / "synthetic.summary.json").exists()


def test_all_nan_rejected(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    store = read_attention_store(synthetic_case.store_path)
    store.attention[:] = np.nan
    with pytest.raises(StoreFormatError, match="finite"):
        _render(synthetic_case, tmp_path, store=store)


def test_wrong_slide_size_rejected(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    store = read_attention_store(synthetic_case.store_path)
    store.attrs["level0_width"] = LEVEL0[0] + 10
    with pytest.raises(StoreFormatError, match="3011x1999"):
        _render(synthetic_case, tmp_path, store=store)


def test_per_head_maps(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    store = read_attention_store(synthetic_case.store_path)
    second = np.zeros_like(store.attention)
    second[0] = 1.0
    store.attention = np.stack([store.attention, second], axis=1)
    summary = _render(synthetic_case, tmp_path, store=store, top_k=0)
    assert summary["n_heads"] == 2
    assert (tmp_path / "synthetic.branch_0.png").exists()
    assert (tmp_path / "synthetic.branch_1.png").exists()
    measurements = json.loads((tmp_path / "synthetic.geojson").read_text())["features"][0][
        "properties"]["measurements"]
    assert measurements["attention, branch 1"] == 1.0
    assert measurements["attention"] == pytest.approx(0.5)


def test_per_class_heads_use_predicted_class(synthetic_case: SyntheticCase,
                                             tmp_path: Path) -> None:
    store = read_attention_store(synthetic_case.store_path)
    other = np.zeros_like(store.attention)
    other[0] = 1.0
    store.attention = np.stack([other, store.attention], axis=1)
    store.attrs["attention_per_class"] = True
    summary = _render(synthetic_case, tmp_path, store=store, top_k=1, per_head=False)
    assert summary["maps"] == ["attention of predicted class tumour"]
    with open(tmp_path / "synthetic.top_tiles.csv", newline="") as handle:
        first = next(csv.DictReader(handle))
    assert int(first["row"]) == synthetic_case.hot_row


class _OffsetSlide:
    """A slide whose viewer frame starts at a bounds origin, as MRXS slides do."""

    def __init__(self, slide: object, origin: tuple[int, int]) -> None:
        self._slide = slide
        width, height = slide.dimensions  # type: ignore[attr-defined]
        self.bounds = (origin[0], origin[1], width - origin[0], height - origin[1])

    def __getattr__(self, name: str) -> object:
        return getattr(self._slide, name)


@pytest.mark.parametrize(("origin", "expected"), [("bounds", (120, 45)), ("level0", (0, 0))])
def test_geojson_bounds_origin(synthetic_case: SyntheticCase, tmp_path: Path, origin: str,
                               expected: tuple[int, int]) -> None:
    cfg = HeatmapConfig(attention_dir=synthetic_case.store_path, output_dir=tmp_path,
                        max_size=250, top_k=0, per_head=False,
                        geojson_origin=origin)  # type: ignore[arg-type]
    store = read_attention_store(synthetic_case.store_path)
    with open_slide(synthetic_case.slide_path) as slide:
        summary = render_slide(store, _OffsetSlide(slide, (120, 45)), tmp_path, cfg)
    assert summary["geojson_origin"] == list(expected)
    features = json.loads((tmp_path / "synthetic.geojson").read_text())["features"]
    hottest = max(features, key=lambda f: f["properties"]["measurements"]["attention"])
    shifted = (HOT_BOX[0] - expected[0], HOT_BOX[1] - expected[1],
               HOT_BOX[2] - expected[0], HOT_BOX[3] - expected[1])
    assert shape(hottest["geometry"]).covers(box(*shifted))
    x0, y0 = hottest["geometry"]["coordinates"][0][0]
    assert (x0, y0) == (HOT_TILE[0] - expected[0], HOT_TILE[1] - expected[1])


def test_single_column_attention_is_one_map(synthetic_case: SyntheticCase,
                                            tmp_path: Path) -> None:
    store = read_attention_store(synthetic_case.store_path)
    store.attention = store.attention[:, None]
    summary = _render(synthetic_case, tmp_path, store=store, top_k=0)
    assert summary["maps"] == ["attention"]
    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["synthetic.png"]


def test_edge_tile_clipped_to_slide(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    store = read_attention_store(synthetic_case.store_path)
    store.coords = store.coords.copy()
    store.coords[0] = (LEVEL0[0] - 50, LEVEL0[1] - 20)
    summary = _render(synthetic_case, tmp_path, store=store, top_k=0)
    assert summary["geojson_features"] == len(synthetic_case.coords)
    features = json.loads((tmp_path / "synthetic.geojson").read_text())["features"]
    ring = features[0]["geometry"]["coordinates"][0]
    assert ring[0] == [LEVEL0[0] - 50, LEVEL0[1] - 20]
    assert ring[2] == [LEVEL0[0], LEVEL0[1]]


def test_downsample_sets_thumbnail_size(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    summary = _render(synthetic_case, tmp_path, downsample=20.5, top_k=0)
    assert max(summary["thumbnail_size"]) == round(LEVEL0[0] / 20.5)


def test_too_large_thumbnail_rejected(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    cfg = HeatmapConfig(attention_dir=synthetic_case.store_path, output_dir=tmp_path,
                        downsample=0.25)
    with open_slide(synthetic_case.slide_path) as slide, pytest.raises(
        ConfigError, match="--downsample 0.37 or more"
    ):
        render_slide(read_attention_store(synthetic_case.store_path), slide, tmp_path, cfg)


def test_clam_patch_size_attribute_accepted(synthetic_case: SyntheticCase,
                                            tmp_path: Path) -> None:
    store = read_attention_store(synthetic_case.store_path)
    store.attrs["patch_size_level0"] = store.attrs.pop("tile_px_level0")
    summary = _render(synthetic_case, tmp_path, store=store, top_k=0)
    assert summary["tile_px_level0"] == pytest.approx(TILE_PX_LEVEL0)


def test_missing_tile_size_rejected(synthetic_case: SyntheticCase, tmp_path: Path) -> None:
    store = read_attention_store(synthetic_case.store_path)
    del store.attrs["tile_px_level0"]
    with pytest.raises(StoreFormatError, match="tile_px_level0 is missing"):
        _render(synthetic_case, tmp_path, store=store)
