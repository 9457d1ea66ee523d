"""The whole pipeline on the bundled slides through the command line, checked store by store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from preprocessing.stores import open_feature_store, read_attention_store, read_coords_store

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_SLIDES = REPO_ROOT / "tests" / "data" / "slides"

SLIDE_IDS = sorted(
    path.stem for path in BUNDLED_SLIDES.iterdir() if path.suffix in {".svs", ".ndpi"}
)


@pytest.fixture(scope="module")
def pipeline_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the demo config once for this module, with a short training."""
    out = tmp_path_factory.mktemp("e2e")
    config = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    config["output_dir"] = str(out / "output")
    config["tile"]["slides"] = str(BUNDLED_SLIDES)
    config["tile"]["mpp_csv"] = str(REPO_ROOT / "configs" / "demo" / "mpp.csv")
    config["train"]["labels"] = str(REPO_ROOT / "configs" / "demo" / "labels.csv")
    config["train"]["epochs"] = 3
    config_path = out / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(config))

    result = CliRunner().invoke(app, ["run", str(config_path)])
    assert result.exit_code == 0, result.output
    assert "Outputs:" in result.output
    return out / "output"


def test_coords_inside_slides(pipeline_output: Path) -> None:
    for slide_id in SLIDE_IDS:
        store = read_coords_store(pipeline_output / "tiles" / f"{slide_id}.h5")
        width, height = store.attrs["level0_width"], store.attrs["level0_height"]
        with openslide.OpenSlide(store.attrs["slide_path"]) as slide:
            assert (width, height) == slide.dimensions
        assert store.n_tiles > 0, slide_id
        assert (store.coords >= 0).all()
        assert (store.coords[:, 0] < width).all()
        assert (store.coords[:, 1] < height).all()
        assert len(np.unique(store.coords, axis=0)) == store.n_tiles


def test_features_match_coords(pipeline_output: Path) -> None:
    for slide_id in SLIDE_IDS:
        coords = read_coords_store(pipeline_output / "tiles" / f"{slide_id}.h5").coords
        path = pipeline_output / "features" / "efficientnet_lite0" / f"{slide_id}.h5"
        with open_feature_store(path) as store:
            features = store.read_features()
            assert features.shape == (len(coords), 1280)
            assert np.isfinite(features).all()
            np.testing.assert_array_equal(store.coords, coords)


def test_attention_aligned_with_features(pipeline_output: Path) -> None:
    for slide_id in SLIDE_IDS:
        attention = read_attention_store(
            pipeline_output / "runs" / "demo" / "attention" / f"{slide_id}.h5"
        )
        path = pipeline_output / "features" / "efficientnet_lite0" / f"{slide_id}.h5"
        with open_feature_store(path) as store:
            np.testing.assert_array_equal(attention.coords, store.coords)
        assert attention.attention.shape[0] == len(attention.coords)
        assert np.isfinite(attention.attention).all()
        np.testing.assert_allclose(attention.attention.sum(axis=0), 1.0, rtol=1e-4)


def test_predictions_cover_every_slide(pipeline_output: Path) -> None:
    predictions = (pipeline_output / "runs" / "demo" / "predictions.csv").read_text()
    for slide_id in SLIDE_IDS:
        assert slide_id in predictions
    classes = json.loads((pipeline_output / "runs" / "demo" / "classes.json").read_text())
    assert set(classes) >= {"brightfield", "fluorescence"}


def test_heatmaps_match_thumbnails(pipeline_output: Path) -> None:
    heatmaps = pipeline_output / "heatmaps"
    for slide_id in SLIDE_IDS:
        overlays = sorted(heatmaps.glob(f"{slide_id}*.png"))
        assert overlays, f"no heatmap PNG for {slide_id} in {heatmaps}"
        geojson_path = heatmaps / f"{slide_id}.geojson"
        collection = json.loads(geojson_path.read_text())
        assert collection["type"] == "FeatureCollection"
        store = read_coords_store(pipeline_output / "tiles" / f"{slide_id}.h5")
        width, height = store.attrs["level0_width"], store.attrs["level0_height"]
        assert len(collection["features"]) == store.n_tiles
        for feature in collection["features"]:
            ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=float)
            assert (ring[0] == ring[-1]).all()
            assert (ring >= 0).all()
            assert (ring[:, 0] <= width).all() and (ring[:, 1] <= height).all()
        summary = json.loads((heatmaps / f"{slide_id}.summary.json").read_text())
        with openslide.OpenSlide(summary["slide_path"]) as slide:
            thumbnail_size = slide.get_thumbnail((2048, 2048)).size
        assert tuple(summary["thumbnail_size"]) == thumbnail_size
        left, top, right, bottom = summary["map_box_px"]
        assert (right - left, bottom - top) == thumbnail_size
        with Image.open(heatmaps / summary["files"]["attention"]) as image:
            assert image.size[0] >= right and image.size[1] >= bottom


def test_rerun_reuses_finished_stages(pipeline_output: Path, tmp_path: Path) -> None:
    config_path = pipeline_output.parent / "pipeline.yaml"
    stamps = {
        path: path.stat().st_mtime_ns
        for stage in ("tiles", "features")
        for path in (pipeline_output / stage).rglob("*")
        if path.is_file()
    }
    assert any(path.name == "manifest.csv" for path in stamps)
    result = CliRunner().invoke(app, ["run", str(config_path), "--stages", "tile,extract"])
    assert result.exit_code == 0, result.output
    for path, stamp in stamps.items():
        assert path.stat().st_mtime_ns == stamp, f"{path} was rewritten"
    shutil.rmtree(tmp_path, ignore_errors=True)
