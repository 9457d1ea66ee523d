"""QuPath GeoJSON of tile scores: validity, QuPath's keys and round trip of tile boxes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from mil.heatmap.geojson import read_tile_geojson, score_bin_names, write_tile_geojson


def _write(path: Path, **overrides: object) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    coords = rng.integers(0, 50_000, size=(200, 2))
    scores = rng.random(200) * 1e-3
    arguments: dict[str, object] = {
        "path": path,
        "coords": coords,
        "tile_px_level0": 448.7,
        "measurements": {"attention": scores, "attention percentile": scores * 1e5},
        "normalized": scores / scores.max(),
    }
    arguments.update(overrides)
    write_tile_geojson(**arguments)  # type: ignore[arg-type]
    return coords, scores


def test_every_feature_is_valid_closed_polygon(tmp_path: Path) -> None:
    path = tmp_path / "tiles.geojson"
    _write(path)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    assert len(data["features"]) == 200
    for feature in data["features"]:
        assert feature["type"] == "Feature"
        geometry = shape(feature["geometry"])
        assert geometry.geom_type == "Polygon"
        assert geometry.is_valid, shapely.is_valid_reason(geometry)
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]
        assert len(ring) == 5
        assert geometry.exterior.is_ccw
        assert geometry.area == pytest.approx(448.7**2, rel=1e-5)


def test_properties_follow_qupath_layout(tmp_path: Path) -> None:
    path = tmp_path / "tiles.geojson"
    _write(path, object_type="detection")
    feature = json.loads(path.read_text())["features"][0]
    properties = feature["properties"]
    assert properties["objectType"] == "detection"
    assert set(properties["classification"]) == {"name", "color"}
    assert properties["classification"]["name"] in score_bin_names(10)
    color = properties["classification"]["color"]
    assert len(color) == 3
    assert all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    assert set(properties["measurements"]) == {"attention", "attention percentile"}


def test_all_numbers_finite(tmp_path: Path) -> None:
    path = tmp_path / "tiles.geojson"
    _write(path)

    def reject_constant(name: str) -> float:
        raise AssertionError(f"non-finite JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=reject_constant)
    for feature in data["features"]:
        for value in feature["properties"]["measurements"].values():
            assert math.isfinite(value)


def test_tile_boxes_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tiles.geojson"
    coords, scores = _write(path)
    boxes, measurements, names = read_tile_geojson(path)
    expected = np.concatenate([coords, coords + 448.7], axis=1)
    np.testing.assert_allclose(boxes, expected, atol=1e-3)
    np.testing.assert_allclose(measurements["attention"], scores, rtol=1e-5)
    assert len(names) == 200


def test_origin_is_subtracted(tmp_path: Path) -> None:
    path = tmp_path / "tiles.geojson"
    coords, _ = _write(path, origin_xy=(1000.0, 2500.0))
    boxes, _, _ = read_tile_geojson(path)
    np.testing.assert_allclose(boxes[:, 0], coords[:, 0] - 1000.0, atol=1e-3)
    np.testing.assert_allclose(boxes[:, 1], coords[:, 1] - 2500.0, atol=1e-3)


def test_classification_bins_follow_normalized_scores(tmp_path: Path) -> None:
    path = tmp_path / "tiles.geojson"
    normalized = np.array([0.0, 0.05, 0.5, 0.999, 1.0])
    write_tile_geojson(path, np.zeros((5, 2), dtype=np.int64), 10.0,
                       {"attention": normalized}, normalized)
    _, _, names = read_tile_geojson(path)
    assert names == ["attention 0-10%", "attention 0-10%", "attention 50-60%",
                     "attention 90-100%", "attention 90-100%"]


def test_nan_measurement_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tiles.geojson"
    with pytest.raises(ValueError, match="NaN"):
        write_tile_geojson(path, np.zeros((2, 2)), 10.0, {"attention": np.array([1.0, np.nan])},
                           np.array([0.0, 1.0]))
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_measurement_length_mismatch_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 values for 2 tiles"):
        write_tile_geojson(tmp_path / "t.geojson", np.zeros((2, 2)), 10.0,
                           {"attention": np.ones(3)}, np.ones(2))


def test_polygons_clipped_to_image_extent(tmp_path: Path) -> None:
    path = tmp_path / "tiles.geojson"
    coords = np.array([[0, 0], [90, 40], [200, 200]])
    scores = np.array([0.1, 0.2, 0.3])
    written = write_tile_geojson(path, coords, 20.0, {"attention": scores}, scores,
                                 clip_box=(0.0, 0.0, 100.0, 50.0))
    assert written == 2
    boxes, measurements, _ = read_tile_geojson(path)
    np.testing.assert_allclose(boxes, [[0, 0, 20, 20], [90, 40, 100, 50]])
    np.testing.assert_allclose(measurements["attention"], [0.1, 0.2])
    for feature in json.loads(path.read_text())["features"]:
        assert shape(feature["geometry"]).is_valid
