"""The heatmap stage on a bundled Aperio slide read through OpenSlide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mil.heatmap import HeatmapConfig, run_heatmaps
from preprocessing.slide import open_slide
from preprocessing.stores import write_attention_store

SLIDE = Path(__file__).resolve().parents[2] / "data" / "slides" / "cmu-1-small-region.svs"
TILE_PX_LEVEL0 = 224.0


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, int]:
    if not SLIDE.exists():
        pytest.skip(f"bundled slide {SLIDE} is absent")
    folder = tmp_path_factory.mktemp("real")
    with open_slide(SLIDE) as slide:
        width, height = slide.dimensions
    xs = np.arange(0, width - TILE_PX_LEVEL0, 224, dtype=np.int64)
    ys = np.arange(0, height - TILE_PX_LEVEL0, 224, dtype=np.int64)
    coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    attention = np.linspace(0.0, 1.0, len(coords), dtype=np.float32)[::-1].copy()
    hot_row = 0
    write_attention_store(folder / "attention" / f"{SLIDE.stem}.h5", attention, coords, {
        "slide_id": SLIDE.stem, "slide_path": str(SLIDE), "tile_px_level0": TILE_PX_LEVEL0,
        "level0_width": width, "level0_height": height, "predicted_class": "tumour",
        "probability": 0.7, "classes": '["normal", "tumour"]', "model": "abmil",
    })
    result = run_heatmaps(HeatmapConfig(attention_dir=folder / "attention",
                                        output_dir=folder / "out", max_size=512, top_k=2,
                                        gallery_tile_px=64))
    assert (result.n_ok, result.n_failed) == (1, 0)
    return folder / "out", coords, hot_row


def test_gallery_tile_is_slide_pixels(rendered: tuple[Path, np.ndarray, int]) -> None:
    out, coords, hot_row = rendered
    with open(out / f"{SLIDE.stem}.top_tiles.csv", newline="") as handle:
        first = next(csv.DictReader(handle))
    x, y = coords[hot_row]
    assert (int(first["x"]), int(first["y"])) == (x, y)
    gallery = np.asarray(Image.open(out / f"{SLIDE.stem}.top_tiles.png").convert("RGB"))
    with open_slide(SLIDE) as slide:
        expected = slide.read_tile(int(x), int(y), TILE_PX_LEVEL0, 0, 64)
    # The first tile of the first block: find it by matching the expected pixels.
    window = np.lib.stride_tricks.sliding_window_view(gallery, (64, 64, 3))[..., 0, :, :, :]
    matches = np.argwhere(np.all(window == expected, axis=(-3, -2, -1)))
    assert len(matches) >= 1


def test_overlay_covers_thumbnail(rendered: tuple[Path, np.ndarray, int]) -> None:
    out, _, _ = rendered
    summary = json.loads((out / f"{SLIDE.stem}.summary.json").read_text())
    width, height = summary["thumbnail_size"]
    assert max(width, height) == 512
    figure = Image.open(out / f"{SLIDE.stem}.png")
    assert figure.width > width
    assert figure.height > height


def test_geojson_inside_slide(rendered: tuple[Path, np.ndarray, int]) -> None:
    out, coords, _ = rendered
    features = json.loads((out / f"{SLIDE.stem}.geojson").read_text())["features"]
    assert len(features) == len(coords)
    with open_slide(SLIDE) as slide:
        width, height = slide.dimensions
    rings = np.array([feature["geometry"]["coordinates"][0] for feature in features])
    assert rings.min() >= 0
    assert rings[..., 0].max() <= width
    assert rings[..., 1].max() <= height
