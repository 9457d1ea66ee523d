"""The tiling stage end to end: coords stores, QC files, manifest, resume and bad input."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from preprocessing.errors import ConfigError, DuplicateSlideIdError, TileReadError
from preprocessing.grid import GridGeometry, tile_grid
from preprocessing.mpp import resolve_mpp
from preprocessing.qc import draw_qc
from preprocessing.readers import composite_rgba_on_white
from preprocessing.slide import Slide
from preprocessing.stores import read_coords_store
from preprocessing.synthetic import blank, tissue_blobs, write_synthetic_slide
from preprocessing.tiling import TilingConfig, run_tiling

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiling_helpers import (  # noqa: E402
    BUNDLED,
    CMU,
    DAPI,
    SHARED_SLIDES,
    TCGA,
    bundled,
    copy_slide,
    corrupt_tile,
)

DESIGN_ATTRS = {
    "slide_path",
    "slide_mpp",
    "mpp_source",
    "target_mpp",
    "tile_px",
    "tile_px_level0",
    "read_level",
    "level0_width",
    "level0_height",
    "overlap_px",
    "tissue_method",
    "status",
    "slidemil_version",
    "complete",
    "patch_size",
    "patch_size_level0",
    "target_magnification",
    "level0_magnification",
}


def _manifest(output_dir: Path) -> dict[str, dict[str, str]]:
    with (output_dir / "manifest.csv").open(newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def _config(slides: Path | str, output_dir: Path, **fields: object) -> TilingConfig:
    return TilingConfig(slides=str(slides), output_dir=output_dir, progress=False, **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tissue slide (mpp 0.25), an empty slide and a slide without resolution tags."""
    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(
        folder / "tissue.tif", 3000, 2000, tissue_blobs(3000, 2000), downsamples=(1.0, 4.0, 16.0)
    )
    write_synthetic_slide(folder / "empty.tif", 2000, 1500, blank(), downsamples=(1.0, 4.0))
    write_synthetic_slide(
        folder / "nompp.tif",
        2000,
        1500,
        tissue_blobs(2000, 1500, seed=2),
        downsamples=(1.0, 4.0),
        mpp=None,
    )
    return folder


def test_stage_outputs(synthetic_folder: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "tiles"
    # The synthetic sections are small (radius 30 to 80 µm), so the fragment filter is relaxed.
    cfg = _config(
        synthetic_folder,
        output_dir,
        target_mpp=0.5,
        tile_px=128,
        overlap_px=16,
        min_tissue_area_um2=1000,
    )
    result = run_tiling(cfg)
    assert (result.n_ok, result.n_failed, result.n_skipped) == (2, 1, 0)

    rows = _manifest(output_dir)
    assert rows["tissue"]["status"] == "ok"
    assert rows["empty"]["status"] == "no_tissue"
    assert (rows["nompp"]["status"], rows["nompp"]["error_type"]) == ("no_mpp", "no_mpp")
    assert "--mpp" in rows["nompp"]["message"]
    assert not (output_dir / "nompp.h5").exists()

    store = read_coords_store(output_dir / "tissue.h5")
    attrs = store.attrs
    assert DESIGN_ATTRS <= set(attrs)
    assert attrs["complete"]
    assert attrs["slide_mpp"] == pytest.approx(0.25)
    assert attrs["mpp_source"] == "openslide.mpp-x"  # OpenSlide reads the TIFF tags
    assert attrs["tile_px_level0"] == pytest.approx(256.0)
    assert attrs["stride_level0"] == pytest.approx(224.0)
    assert attrs["read_level"] == 0  # level 1 is 1.0 µm/px, coarser than 0.5
    assert attrs["patch_size"] == 128
    assert attrs["patch_size_level0"] == 256
    assert attrs["level0_magnification"] == pytest.approx(40.0)
    assert (attrs["level0_width"], attrs["level0_height"]) == (3000, 2000)
    assert attrs["tissue_method"] == "saturation"
    assert int(rows["tissue"]["n_tiles"]) == store.n_tiles > 20

    coords = store.coords
    assert coords.dtype == np.int64
    assert len(np.unique(coords, axis=0)) == len(coords)
    assert np.all(np.isin(coords[:, 0] % 224, [0]))  # stride 224 level-0 pixels from x = 0
    # True tissue fraction of every grid tile, by sampling the pattern 16 x 16 times per tile.
    truth = tissue_blobs(3000, 2000)
    grid = tile_grid((0, 0, 3000, 2000), GridGeometry(256.0, 224.0))
    offsets = (np.arange(16) + 0.5) * 16
    fractions = {
        (x, y): float((truth(x + offsets, y + offsets).min(axis=2) < 250).mean())
        for x, y in grid.tolist()
    }
    kept_tiles = set(map(tuple, coords.tolist()))
    assert kept_tiles <= set(fractions)
    assert min(fractions[c] for c in kept_tiles) > 0.15
    assert max(f for c, f in fractions.items() if c not in kept_tiles) < 0.35

    empty = read_coords_store(output_dir / "empty.h5")
    assert empty.n_tiles == 0
    assert empty.attrs["status"] == "no_tissue"

    geojson = json.loads((output_dir / "tissue" / "tissue.geojson").read_text())
    assert geojson["type"] == "FeatureCollection"
    assert len(geojson["features"]) >= 1
    xs = [p[0] for f in geojson["features"] for p in f["geometry"]["coordinates"][0]]
    assert min(xs) >= 0
    assert max(xs) <= 3000
    assert (output_dir / "qc" / "tissue.png").stat().st_size > 1000
    assert (output_dir / "tiling_config.yaml").exists()


def test_mpp_csv_supplies_missing_resolution(synthetic_folder: Path, tmp_path: Path) -> None:
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\nnompp,0.5\n")
    output_dir = tmp_path / "tiles"
    result = run_tiling(_config(synthetic_folder, output_dir, mpp_csv=table))
    assert result.n_failed == 0
    attrs = read_coords_store(output_dir / "nompp.h5").attrs
    assert attrs["slide_mpp"] == 0.5
    assert attrs["mpp_source"] == "override"


def test_resume_trusts_only_complete_stores(synthetic_folder: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "tiles"
    cfg = _config(synthetic_folder, output_dir, mpp=0.5)
    assert run_tiling(cfg).n_ok == 3
    before = read_coords_store(output_dir / "tissue.h5").coords

    # A store cut short by a killed job, and one never marked complete.
    data = (output_dir / "empty.h5").read_bytes()
    (output_dir / "empty.h5").write_bytes(data[: len(data) // 2])
    with h5py.File(output_dir / "nompp.h5", "r+") as handle:
        handle.attrs["complete"] = False

    again = run_tiling(cfg)
    assert (again.n_ok, again.n_failed, again.n_skipped) == (2, 0, 1)
    assert read_coords_store(output_dir / "empty.h5").attrs["complete"]
    assert read_coords_store(output_dir / "nompp.h5").attrs["complete"]
    np.testing.assert_array_equal(read_coords_store(output_dir / "tissue.h5").coords, before)


def test_changed_grid_needs_overwrite(synthetic_folder: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "tiles"
    run_tiling(_config(synthetic_folder / "tissue.tif", output_dir))
    with pytest.raises(ConfigError, match="tissue.h5.*--tile-px.*--overwrite"):
        run_tiling(_config(synthetic_folder / "tissue.tif", output_dir, tile_px=256))
    result = run_tiling(
        _config(synthetic_folder / "tissue.tif", output_dir, tile_px=256, overwrite=True)
    )
    assert result.n_ok == 1
    assert read_coords_store(output_dir / "tissue.h5").attrs["tile_px"] == 256


def test_duplicate_ids_stop_before_work(tmp_path: Path) -> None:
    source = bundled(CMU)
    copy_slide(source, tmp_path / "a", "case.svs")
    copy_slide(source, tmp_path / "b", "case.svs")
    output_dir = tmp_path / "tiles"
    with pytest.raises(DuplicateSlideIdError, match="'case'"):
        run_tiling(_config(str(tmp_path / "*" / "*.svs"), output_dir))
    assert not output_dir.exists()


def test_corrupt_tiles_dropped_and_counted(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    path = write_synthetic_slide(
        folder / "corrupt.tif",
        2048,
        2048,
        tissue_blobs(2048, 2048, count=12, seed=4),
        downsamples=(1.0, 4.0),
        tile=256,
    )
    for index in (18, 19, 26, 27):  # a 2 x 2 block of level-0 tiles in the middle
        corrupt_tile(path, tile_index=index)

    output_dir = tmp_path / "tiles"
    cfg = _config(
        folder,
        output_dir,
        target_mpp=0.25,
        tile_px=256,
        min_tissue_fraction=0.0,
        tissue_method="none",
        verify_tiles=True,
        max_bad_tile_fraction=0.05,
    )
    result = run_tiling(cfg)

    assert result.n_ok == 1
    store = read_coords_store(output_dir / "corrupt.h5")
    assert store.attrs["n_bad_tiles"] == 4
    assert store.n_tiles == 64 - 4
    assert store.attrs["status"] == "partial"  # 4 of 64 is above 5 %
    assert "4 of 64 tiles" in _manifest(output_dir)["corrupt"]["message"]
    corrupt_tiles = {(512, 512), (768, 512), (512, 768), (768, 768)}
    assert not corrupt_tiles & set(map(tuple, store.coords.tolist()))


def test_bundled_slides(tmp_path: Path) -> None:
    for path in (CMU, TCGA, DAPI):
        bundled(path)
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\ntcga-cr-7395-01a-01-ts1,0.499\n")
    output_dir = tmp_path / "tiles"
    slides = tmp_path / "slides.csv"
    slides.write_text("path\n" + "\n".join(str(p) for p in (CMU, TCGA, DAPI)) + "\n")
    result = run_tiling(_config(slides, output_dir, target_mpp=1.0, mpp_csv=table))
    assert (result.n_ok, result.n_failed) == (3, 0)
    cmu = read_coords_store(output_dir / "cmu-1-small-region.h5")
    assert cmu.attrs["mpp_source"] == "openslide.mpp-x"
    assert cmu.n_tiles > 5
    tcga = read_coords_store(output_dir / "tcga-cr-7395-01a-01-ts1.h5")
    assert tcga.attrs["read_level"] == 1  # 0.998 µm/px at level 1
    dapi = read_coords_store(output_dir / "test3-DAPI-2-387.h5")
    assert dapi.attrs["tissue_method"] == "brightness"
    assert dapi.attrs["read_level"] == 2


def test_shared_slides_never_crash(tmp_path: Path) -> None:
    if not SHARED_SLIDES.is_dir():
        pytest.skip("shared slides are absent")
    output_dir = tmp_path / "tiles"
    result = run_tiling(_config(str(SHARED_SLIDES / "*" / "*"), output_dir, target_mpp=1.0))
    rows = _manifest(output_dir)
    assert len(rows) == result.n_ok + result.n_failed == 16
    assert rows["broken"]["error_type"] == "unreadable"
    assert rows["small_dicom"]["error_type"] == "unreadable"
    assert rows["unopenable"]["error_type"] == "unreadable"
    assert rows["unreadable"]["error_type"] == "tile_read"
    assert rows["boxes"]["status"] == "no_mpp"
    assert rows["small_vectra"]["status"] == "ok"
    for row in rows.values():
        if row["status"] not in ("ok", "no_tissue"):
            assert Path(row["path"]).name in row["message"]


class _ArrayReader:
    """In-memory reader with MIRAX-style bounds, for the bounds test."""

    name = "memory"

    def __init__(self, image: np.ndarray, bounds: tuple[int, int, int, int]) -> None:
        self._image = image
        height, width = image.shape[:2]
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)
        x, y, w, h = bounds
        self.properties = {
            "openslide.mpp-x": "2.0",
            "openslide.bounds-x": str(x),
            "openslide.bounds-y": str(y),
            "openslide.bounds-width": str(w),
            "openslide.bounds-height": str(h),
        }

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        out = np.full((size[1], size[0], 4), 0, dtype=np.uint8)
        x, y = location
        crop = self._image[max(y, 0) : y + size[1], max(x, 0) : x + size[0]]
        out[: crop.shape[0], : crop.shape[1]] = crop
        return composite_rgba_on_white(out)

    def level_origin(self, location: tuple[int, int], level: int) -> tuple[float, float]:
        return (float(location[0]), float(location[1]))

    def close(self) -> None:
        pass


def test_tissue_outside_bounds_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    width, height = 1200, 900
    pattern = tissue_blobs(width, height, alpha_background=True, count=10, seed=3)
    image = pattern(np.arange(width) + 0.5, np.arange(height) + 0.5)
    bounds = (600, 0, 600, 900)
    reader = _ArrayReader(image, bounds)
    slide_path = tmp_path / "slides" / "scan.mrxs"
    slide_path.parent.mkdir()
    slide_path.write_bytes(b"")

    def fake_open(path: Path, mpp: float | None = None, **kwargs: object) -> Slide:
        return Slide(reader, Path(path), "scan", resolve_mpp(reader.properties))

    monkeypatch.setattr("preprocessing.tiling.open_slide", fake_open)
    output_dir = tmp_path / "tiles"
    result = run_tiling(_config(slide_path, output_dir, target_mpp=4.0, tile_px=32, tissue_mpp=8.0))
    assert result.n_ok == 1
    store = read_coords_store(output_dir / "scan.h5")
    assert store.n_tiles > 0
    assert store.coords[:, 0].min() >= 600
    assert store.attrs["bounds"] == [600, 0, 600, 900]


def test_target_finer_than_slide_warns(
    synthetic_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output_dir = tmp_path / "tiles"
    cfg = _config(synthetic_folder / "tissue.tif", output_dir, target_mpp=0.1, tile_px=128)
    with caplog.at_level(logging.WARNING):
        result = run_tiling(cfg)
    assert result.n_ok == 1
    assert "tiles are upsampled" in caplog.text
    attrs = read_coords_store(output_dir / "tissue.h5").attrs
    assert attrs["read_level"] == 0
    assert attrs["tile_px_level0"] == pytest.approx(51.2)


def test_corrected_mpp_needs_overwrite(synthetic_folder: Path, tmp_path: Path) -> None:
    slide = synthetic_folder / "nompp.tif"
    output_dir = tmp_path / "tiles"
    assert run_tiling(_config(slide, output_dir, mpp=0.25)).n_ok == 1
    assert run_tiling(_config(slide, output_dir, mpp=0.25)).n_skipped == 1
    with pytest.raises(
        ConfigError,
        match="nompp.h5.*0.25 µm/px from override in the store, "
        "0.5 µm/px from override now.*--overwrite",
    ):
        run_tiling(_config(slide, output_dir, mpp=0.5))

    result = run_tiling(_config(slide, output_dir, mpp=0.5, overwrite=True))
    assert result.n_ok == 1
    assert read_coords_store(output_dir / "nompp.h5").attrs["slide_mpp"] == 0.5


def test_corrected_mpp_csv_needs_overwrite(synthetic_folder: Path, tmp_path: Path) -> None:
    slide = synthetic_folder / "tissue.tif"  # its own resolution is 0.25 µm/px
    output_dir = tmp_path / "tiles"
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\ntissue,0.3\n")
    assert run_tiling(_config(slide, output_dir, mpp_csv=table)).n_ok == 1
    table.write_text("slide_id,mpp\ntissue,0.35\n")
    with pytest.raises(ConfigError, match="0.3 µm/px from override in the store, 0.35"):
        run_tiling(_config(slide, output_dir, mpp_csv=table))
    # Dropping the override brings back the file's own value, which also differs.
    with pytest.raises(ConfigError, match="0.25 µm/px from openslide.mpp-x now"):
        run_tiling(_config(slide, output_dir))


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("tissue_method", "brightness", "--tissue-method"),
        ("tissue_threshold", 30.0, "--tissue-threshold"),
        ("smoothing_um", 8.0, "--smoothing-um"),
        ("min_tissue_area_um2", 500.0, "--min-tissue-area-um2"),
        ("tissue_mpp", 8.0, "--tissue-mpp"),
    ],
)
def test_changed_tissue_settings_need_overwrite(
    synthetic_folder: Path, tmp_path: Path, field: str, value: object, option: str
) -> None:
    slide = synthetic_folder / "empty.tif"
    output_dir = tmp_path / "tiles"
    run_tiling(_config(slide, output_dir, target_mpp=2.0))
    with pytest.raises(ConfigError, match=f"{option}: .* in the store, .* now.*--overwrite"):
        run_tiling(_config(slide, output_dir, target_mpp=2.0, **{field: value}))


@pytest.mark.parametrize("mpp", [50.0, 0.005])
def test_implausible_mpp_rejected(tmp_path: Path, mpp: float) -> None:
    with pytest.raises(ValidationError, match=f"mpp {mpp}.*outside the plausible range"):
        _config(tmp_path, tmp_path / "tiles", mpp=mpp)


def test_implausible_mpp_csv_row_rejected(synthetic_folder: Path, tmp_path: Path) -> None:
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\ntissue,0.25\nnompp,50\n")
    output_dir = tmp_path / "tiles"
    with pytest.raises(ConfigError, match="mpp.csv, line 3, slide 'nompp'.*50.0.*plausible range"):
        run_tiling(_config(synthetic_folder, output_dir, mpp_csv=table))
    assert not output_dir.exists()


def test_tile_larger_than_slide_explained(synthetic_folder: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "tiles"
    # 224 px at 20 µm/px span 17,920 level-0 px of a 3000 x 2000 px slide.
    result = run_tiling(_config(synthetic_folder / "tissue.tif", output_dir, target_mpp=20.0))
    assert result.n_ok == 1
    row = _manifest(output_dir)["tissue"]
    assert row["status"] == "no_tissue"
    assert "one tile spans 17,920 level-0 px" in row["message"]
    assert "scanned area of 3000 x 2000 px" in row["message"]


def test_own_mpp_kept_over_default_logged(
    synthetic_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output_dir = tmp_path / "tiles"
    cfg = _config(synthetic_folder / "tissue.tif", output_dir, target_mpp=2.0, mpp=0.5)
    with caplog.at_level(logging.INFO, logger="preprocessing"):
        run_tiling(cfg)
    assert "tissue: uses its own resolution 0.25 µm/px from openslide.mpp-x" in caplog.text
    assert "--mpp 0.5 only fills in slides without one" in caplog.text
    assert read_coords_store(output_dir / "tissue.h5").attrs["slide_mpp"] == 0.25


def test_dense_overlap_warns(
    synthetic_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output_dir = tmp_path / "tiles"
    cfg = _config(synthetic_folder / "empty.tif", output_dir, target_mpp=8.0, tile_px=64)
    with caplog.at_level(logging.WARNING):
        run_tiling(cfg.model_copy(update={"overlap_px": 16}))
    assert "stride" not in caplog.text
    with caplog.at_level(logging.WARNING):
        run_tiling(cfg.model_copy(update={"overlap_px": 60, "overwrite": True}))
    assert "--overlap-px 60 with --tile-px 64 leaves a stride of 4 px" in caplog.text
    assert "about 256 times the tiles" in caplog.text


def test_bad_shard_stops_before_folders(
    synthetic_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output_dir = tmp_path / "tiles"
    with pytest.raises(ValidationError, match="'3/2'"):
        _config(synthetic_folder, output_dir, shard="3/2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID=5"):
        run_tiling(_config(synthetic_folder, output_dir))
    assert not output_dir.exists()


def test_fluorescence_channels_tile_alike(tmp_path: Path) -> None:
    # DAPI and TRITC scans of one section: DAPI lights only nuclei, TRITC the whole tissue.
    dapi = bundled(DAPI)
    tritc = bundled(BUNDLED / "test3-TRITC-2-560.ndpi")
    output_dir = tmp_path / "tiles"
    for path in (dapi, tritc):
        copy_slide(path, tmp_path / "slides")
    run_tiling(_config(tmp_path / "slides", output_dir, target_mpp=1.0))
    rows = _manifest(output_dir)
    dapi_tiles = int(rows["test3-DAPI-2-387"]["n_tiles"])
    tritc_tiles = int(rows["test3-TRITC-2-560"]["n_tiles"])
    assert tritc_tiles >= 15
    assert dapi_tiles >= 0.8 * tritc_tiles


def test_qc_png_stretched_and_captioned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captions: list[str] = []

    def recording_draw_qc(*args: Any, **kwargs: Any) -> Image.Image:
        captions.append(args[5])
        return draw_qc(*args, **kwargs)

    monkeypatch.setattr("preprocessing.tiling.draw_qc", recording_draw_qc)
    copy_slide(bundled(BUNDLED / "test3-TRITC-2-560.ndpi"), tmp_path / "slides")
    output_dir = tmp_path / "tiles"
    run_tiling(_config(tmp_path / "slides", output_dir, target_mpp=1.0))

    n_tiles = read_coords_store(output_dir / "test3-TRITC-2-560.h5").n_tiles
    assert captions == [
        f"test3-TRITC-2-560 | slide 0.2282 um/px (openslide.mpp-x) | target 1 um/px, 224 px "
        f"tiles | tissue: brightness | {n_tiles} tiles | ok"
    ]
    png = np.asarray(Image.open(output_dir / "qc" / "test3-TRITC-2-560.png").convert("RGB"))
    # The raw scan's brightest channel reaches only about 60 at its 99th percentile.
    assert np.percentile(png[:600].max(axis=2), 99) > 200
    assert (png[-2:] == 255).all()  # the caption strip's bottom margin
    assert (png[-30:].max(axis=2) < 100).any()  # caption text


@pytest.mark.parametrize("width", [2000, 2400])
def test_replaced_slide_file_needs_overwrite(tmp_path: Path, width: int) -> None:
    slide = tmp_path / "slides" / "case.tif"
    slide.parent.mkdir()
    write_synthetic_slide(slide, 2000, 1500, tissue_blobs(2000, 1500), downsamples=(1.0, 4.0))
    output_dir = tmp_path / "tiles"
    run_tiling(_config(slide, output_dir, target_mpp=1.0))
    stored = read_coords_store(output_dir / "case.h5").attrs
    assert stored["slide_file_size"] == slide.stat().st_size
    assert stored["slide_file_mtime_ns"] == slide.stat().st_mtime_ns

    # Another slide at the same path: same or other dimensions, other content.
    write_synthetic_slide(
        slide, width, 1500, tissue_blobs(width, 1500, seed=5), downsamples=(1.0, 4.0)
    )

    with pytest.raises(ConfigError, match="slide file .*case.tif changed.*--overwrite"):
        run_tiling(_config(slide, output_dir, target_mpp=1.0))
    result = run_tiling(_config(slide, output_dir, target_mpp=1.0, overwrite=True))
    assert result.n_ok == 1
    assert read_coords_store(output_dir / "case.h5").attrs["level0_width"] == width


def test_unchanged_slide_file_skipped(tmp_path: Path) -> None:
    slide = tmp_path / "slides" / "case.tif"
    slide.parent.mkdir()
    write_synthetic_slide(slide, 2000, 1500, tissue_blobs(2000, 1500), downsamples=(1.0, 4.0))
    run_tiling(_config(slide, tmp_path / "tiles", target_mpp=1.0))

    again = run_tiling(_config(slide, tmp_path / "tiles", target_mpp=1.0))

    assert again.n_skipped == 1


def test_greyscale_tiff_finds_tiles(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    image = np.full((2000, 3000), 240, dtype=np.uint8)
    image += rng.integers(0, 4, image.shape, dtype=np.uint8)
    image[500:1300, 800:2000] = rng.integers(60, 180, (800, 1200), dtype=np.uint8)
    slide = tmp_path / "grey.tif"
    pixels_per_cm = 1e4 / 0.5
    tifffile.imwrite(slide, image, tile=(256, 256), photometric="minisblack",
                     resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")

    result = run_tiling(_config(slide, tmp_path / "tiles"))

    assert result.n_ok == 1
    store = read_coords_store(tmp_path / "tiles" / "grey.h5")
    assert store.attrs["tissue_method"] == "darkness"
    assert store.n_tiles > 0
    x, y = store.coords[:, 0], store.coords[:, 1]
    tile_px_level0 = float(store.attrs["tile_px_level0"])
    assert (x + tile_px_level0 > 800).all() and (x < 2000).all()
    assert (y + tile_px_level0 > 500).all() and (y < 1300).all()


def _truncated_svs(folder: Path) -> Path:
    data = bundled(CMU).read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "truncated.svs"
    path.write_bytes(data[: int(len(data) * 0.8)])
    return path


def test_truncated_svs_noted_in_manifest(tmp_path: Path) -> None:
    slide = _truncated_svs(tmp_path / "slides")

    result = run_tiling(_config(slide, tmp_path / "tiles", target_mpp=1.0))

    row = _manifest(tmp_path / "tiles")["truncated"]
    assert result.n_ok == 1
    assert row["status"] == "ok"
    assert int(row["n_tiles"]) > 0
    assert "slide file damaged" in row["message"]
    assert "invalid page offset" in row["message"]


def test_truncated_svs_unreadable_tiles_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slide = _truncated_svs(tmp_path / "slides")

    def fail(self: Slide, x: int, y: int, *args: object) -> np.ndarray:
        raise TileReadError(f"{self.path}: tile ({x}, {y}) cannot be decoded")

    # verify_tiles stays off: the damaged file alone makes tiling decode every tile.
    monkeypatch.setattr(Slide, "read_tile", fail)
    run_tiling(_config(slide, tmp_path / "tiles", target_mpp=1.0))

    row = _manifest(tmp_path / "tiles")["truncated"]
    assert row["status"] == "partial"
    assert row["n_tiles"] == "0"
    assert "could not be decoded" in row["message"]
