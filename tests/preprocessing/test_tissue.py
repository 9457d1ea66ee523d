"""Tissue detection on thumbnails and tissue contours as GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from preprocessing.contours import mask_polygons, signed_area, tissue_geojson
from preprocessing.slide import open_slide
from preprocessing.synthetic import blank, tissue_blobs
from preprocessing.tissue import (
    FLUORESCENCE_BLUR_UM,
    TissueSettings,
    detect_tissue,
    otsu_threshold,
    pen_mark_mask,
    saturation,
)

BUNDLED_SLIDES = Path(__file__).resolve().parents[2] / "tests" / "data" / "slides"
SIZE = (600, 450)  # thumbnail width, height
THUMB_MPP = 8.0


def _render(pattern, width: int = SIZE[0], height: int = SIZE[1]) -> np.ndarray:  # type: ignore[no-untyped-def]
    return pattern(np.arange(width) + 0.5, np.arange(height) + 0.5)[..., :3]


def _truth(width: int = SIZE[0], height: int = SIZE[1]) -> np.ndarray:
    return _render(tissue_blobs(width, height)).min(axis=2) < 250


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_otsu_splits_two_modes() -> None:
    values = np.concatenate([np.full(1000, 20), np.full(500, 200)]).astype(np.uint8)
    threshold = otsu_threshold(values)
    assert 20 <= threshold < 200
    assert otsu_threshold(np.full(10, 7, np.uint8)) == 0.0


def test_saturation_of_greys_is_zero() -> None:
    rgb = np.array([[[0, 0, 0], [128, 128, 128], [255, 0, 0], [200, 100, 100]]], dtype=np.uint8)
    assert saturation(rgb).tolist() == [[0, 0, 255, 127]]


def test_brightfield_blobs_found() -> None:
    thumbnail = _render(tissue_blobs(*SIZE))
    result = detect_tissue(thumbnail, THUMB_MPP, TissueSettings())
    assert result.method == "saturation"
    assert _iou(result.mask, _truth()) > 0.95


def test_blank_glass_has_no_tissue() -> None:
    result = detect_tissue(_render(blank(noise=6)), THUMB_MPP, TissueSettings(method="saturation"))
    assert not result.mask.any()
    assert result.threshold >= TissueSettings().min_threshold


def test_blank_grey_glass_auto_finds_nothing() -> None:
    result = detect_tissue(_render(blank(noise=6)), THUMB_MPP, TissueSettings())
    assert result.method == "darkness"
    assert not result.mask.any()


def test_grey_thumbnail_uses_darkness() -> None:
    rng = np.random.default_rng(0)
    grey = np.full((SIZE[1], SIZE[0]), 240, dtype=np.uint8)
    grey[100:300, 150:450] = rng.integers(60, 180, (200, 300), dtype=np.uint8)
    thumbnail = np.repeat(grey[..., None], 3, axis=2)
    truth = np.zeros(grey.shape, dtype=bool)
    truth[100:300, 150:450] = True

    result = detect_tissue(thumbnail, THUMB_MPP, TissueSettings())

    assert result.method == "darkness"
    assert _iou(result.mask, truth) > 0.95


def test_fluorescence_uses_brightness() -> None:
    truth = _truth()
    thumbnail = np.zeros((*truth.shape, 3), dtype=np.uint8)
    thumbnail[..., 2][truth] = 90  # DAPI-like blue signal on black
    thumbnail[..., 2] += np.random.default_rng(0).integers(0, 6, truth.shape).astype(np.uint8)
    result = detect_tissue(thumbnail, THUMB_MPP, TissueSettings())
    assert result.method == "brightness"
    # The blur moves a sharp edge outwards by about one sigma (2 px here), and the closing
    # fills some concave corners a little further out.
    margin = round(FLUORESCENCE_BLUR_UM / THUMB_MPP) + 2
    assert result.mask[ndimage.binary_erosion(truth, iterations=margin)].all()
    assert not result.mask[~ndimage.binary_dilation(truth, iterations=margin)].any()


def test_scattered_nuclei_form_one_section() -> None:
    # Nuclei (2 px = 16 µm wide) about 24 µm apart on a faint section, as DAPI shows tissue.
    rng = np.random.default_rng(1)
    truth = _truth()
    brightness = np.where(truth, 12, 3).astype(np.float64)
    nuclei = truth & (rng.random(truth.shape) < 0.1)
    brightness[ndimage.binary_dilation(nuclei)] = 220
    brightness += rng.integers(0, 3, truth.shape)
    thumbnail = np.zeros((*truth.shape, 3), dtype=np.uint8)
    thumbnail[..., 2] = np.clip(brightness, 0, 255).astype(np.uint8)
    result = detect_tissue(thumbnail, THUMB_MPP, TissueSettings())
    assert result.method == "brightness"
    assert result.threshold < 220
    assert _iou(result.mask, truth) > 0.85


def test_dark_blank_has_no_tissue() -> None:
    rng = np.random.default_rng(2)
    # Empty fluorescence scan: noise plus illumination that falls off towards the corners.
    ys, xs = np.mgrid[0 : SIZE[1], 0 : SIZE[0]]
    falloff = 2.0 * np.hypot(xs / SIZE[0] - 0.5, ys / SIZE[1] - 0.5)
    values = 6 - 3 * falloff + rng.integers(0, 6, falloff.shape)
    thumbnail = np.repeat(np.clip(values, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    result = detect_tissue(thumbnail, THUMB_MPP, TissueSettings())
    assert result.method == "brightness"
    assert not result.mask.any()


def _bundled_thumbnail(name: str, mpp: float) -> np.ndarray:
    path = BUNDLED_SLIDES / name
    if not path.is_file():
        pytest.skip(f"bundled slide {name} is absent")
    with open_slide(path) as slide:
        return slide.get_downsampled(mpp / slide.require_mpp())


def test_dapi_covers_section_like_tritc() -> None:
    # Two channels of one section: TRITC shows the whole tissue, DAPI mostly nuclei.
    dapi = detect_tissue(_bundled_thumbnail("test3-DAPI-2-387.ndpi", 4.0), 4.0, TissueSettings())
    tritc = detect_tissue(_bundled_thumbnail("test3-TRITC-2-560.ndpi", 4.0), 4.0, TissueSettings())
    assert (dapi.method, tritc.method) == ("brightness", "brightness")
    assert tritc.mask.mean() > 0.75
    assert dapi.mask.mean() > 0.7
    assert (dapi.mask & tritc.mask).sum() / tritc.mask.sum() > 0.8


def test_region_limits_search_to_bounds() -> None:
    thumbnail = _render(tissue_blobs(*SIZE))
    region = np.zeros(thumbnail.shape[:2], dtype=bool)
    region[:, : SIZE[0] // 2] = True
    result = detect_tissue(thumbnail, THUMB_MPP, TissueSettings(), region=region)
    assert not result.mask[:, SIZE[0] // 2 :].any()
    assert result.mask[:, : SIZE[0] // 2].any()


def test_small_fragments_dropped_and_small_holes_filled() -> None:
    thumbnail = np.full((200, 200, 3), 240, dtype=np.uint8)
    pink = (200, 90, 160)
    thumbnail[20:120, 20:120] = pink  # 800 x 800 µm section
    thumbnail[60:63, 60:63] = 240  # 24 x 24 µm hole: filled
    thumbnail[80:110, 80:110] = 240  # 240 x 240 µm hole: kept
    thumbnail[160:165, 160:165] = pink  # 40 x 40 µm speck: dropped
    settings = TissueSettings(smoothing_um=8.0, min_tissue_area_um2=10_000, min_hole_area_um2=2_500)
    mask = detect_tissue(thumbnail, THUMB_MPP, settings).mask
    assert mask[61, 61]
    assert not mask[95, 95]
    assert not mask[162, 162]
    assert mask[40, 40]


def test_pen_marks_removed_on_request() -> None:
    thumbnail = _render(tissue_blobs(*SIZE))
    thumbnail[10:30, 50:550] = (30, 150, 60)  # green pen stroke across the top
    assert pen_mark_mask(thumbnail)[20, 300]
    kept = detect_tissue(thumbnail, THUMB_MPP, TissueSettings()).mask
    removed = detect_tissue(thumbnail, THUMB_MPP, TissueSettings(remove_pen_marks=True)).mask
    assert kept[20, 300]
    assert not removed[20, 300]
    assert _iou(removed, _truth()) > 0.95


def test_method_none_keeps_region() -> None:
    region = np.ones((10, 12), dtype=bool)
    result = detect_tissue(
        np.zeros((10, 12, 3), np.uint8), THUMB_MPP, TissueSettings(method="none"), region
    )
    assert result.mask.all()
    assert result.method == "none"


def test_polygons_cover_mask_exactly() -> None:
    geometry = pytest.importorskip("shapely.geometry")
    validation = pytest.importorskip("shapely.validation")

    rng = np.random.default_rng(3)
    mask = ndimage.binary_opening(rng.random((60, 80)) > 0.45)
    mask[10:30, 10:30] = True
    mask[15:20, 15:20] = False  # a hole
    mask[40, 40] = mask[41, 41] = True  # diagonal neighbours
    mask[40, 41] = mask[41, 40] = False
    polygons = mask_polygons(mask)
    total = 0.0
    for polygon in polygons:
        exterior, holes = polygon[0], polygon[1:]
        assert exterior[0] == exterior[-1]
        assert signed_area(exterior) > 0
        assert all(signed_area(hole) < 0 for hole in holes)
        shape = geometry.Polygon(exterior, holes)
        assert shape.is_valid, validation.explain_validity(shape)
        total += shape.area
    assert total == pytest.approx(mask.sum())
    labels, count = ndimage.label(mask)
    assert len(polygons) == count


@pytest.mark.parametrize("seed", range(8))
def test_polygons_valid_on_noisy_masks(seed: int) -> None:
    geometry = pytest.importorskip("shapely.geometry")
    ops = pytest.importorskip("shapely.ops")
    mask = np.random.default_rng(seed).random((40, 50)) > 0.5
    shapes = [geometry.Polygon(polygon[0], polygon[1:]) for polygon in mask_polygons(mask)]
    assert all(shape.is_valid for shape in shapes)
    assert sum(shape.area for shape in shapes) == pytest.approx(mask.sum())
    assert ops.unary_union(shapes).area == pytest.approx(mask.sum())


def test_geojson_in_level0_pixels() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 2:6] = True
    geojson = tissue_geojson(mask_polygons(mask), (16.0, 16.0), 0.25, {"slide_id": "s1"})
    json.dumps(geojson, allow_nan=False)
    assert geojson["type"] == "FeatureCollection"
    feature = geojson["features"][0]
    ring = feature["geometry"]["coordinates"][0]
    xs = [point[0] for point in ring]
    ys = [point[1] for point in ring]
    assert (min(xs), max(xs), min(ys), max(ys)) == (32.0, 96.0, 80.0, 160.0)
    assert feature["properties"]["slide_id"] == "s1"
    assert feature["properties"]["measurements"]["area_um2"] == pytest.approx(
        4 * 5 * 16 * 16 * 0.0625
    )
