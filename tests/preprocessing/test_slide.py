"""Slide reading: real slides, synthetic pyramids, pixel formats, bad files."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from preprocessing.errors import MissingMppError, SlideOpenError, TileReadError
from preprocessing.slide import open_slide
from preprocessing.synthetic import checkerboard, tissue_blobs, write_synthetic_slide

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiling_helpers import CMU, DAPI, TCGA, bundled, corrupt_tile, shared_slide  # noqa: E402

SQUARE = 64
RED, BLUE = 220, 40  # red channel of the two checkerboard colours


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6000 x 4500 checkerboard whose second level has downsample ~3.7 (rounded sizes)."""
    path = tmp_path_factory.mktemp("checker") / "checker.tif"
    return write_synthetic_slide(
        path, 6000, 4500, checkerboard(SQUARE), downsamples=(1.0, 3.7), supersample=3, tile=512
    )


def _crossings(profile: np.ndarray) -> np.ndarray:
    """Sub-pixel positions (pixel index units) where a two-level profile crosses its middle."""
    centred = profile - (float(profile.max()) + float(profile.min())) / 2
    index = np.nonzero(np.sign(centred[:-1]) != np.sign(centred[1:]))[0]
    return index + centred[index] / (centred[index] - centred[index + 1])


def _expected_crossings(origin: int, pixel: float, count: int) -> np.ndarray:
    """Tile pixel positions of the checkerboard edges inside [origin, origin + count * pixel)."""
    first = int(np.ceil(origin / SQUARE))
    edges = np.arange(first, first + count) * SQUARE
    edges = edges[(edges > origin + pixel) & (edges < origin + (count - 1) * pixel)]
    return (edges - origin) / pixel - 0.5


@pytest.mark.parametrize("reader", ["openslide", "tifffile"])
def test_far_edge_tiles_land_on_pixels(checker: Path, reader: str) -> None:
    tile_px, tile_px_level0 = 64, 256.0
    with open_slide(checker, reader=reader) as slide:  # type: ignore[arg-type]
        assert slide.reader == reader
        assert slide.level_count == 2
        assert slide.level_downsamples[1] == pytest.approx(3.7, abs=2e-3)
        read_level = slide.best_level_for_mpp(1.0)
        assert read_level == 1
        pixel = tile_px_level0 / tile_px
        for x0, y0 in [(6000 - 256 - 5, 4500 - 256 - 7), (5003, 4101), (13, 29)]:
            tile = slide.read_tile(x0, y0, tile_px_level0, read_level, tile_px)
            assert tile.shape == (tile_px, tile_px, 3)
            # A row whose centre sits in the middle of a square band, away from horizontal edges.
            rows = [r for r in range(tile_px) if 16 < (y0 + (r + 0.5) * pixel) % SQUARE < 48]
            profile = tile[rows[0], :, 0].astype(np.float64)
            found = _crossings(profile)
            expected = _expected_crossings(x0, pixel, tile_px)
            assert len(found) == len(expected), (x0, y0, found, expected)
            np.testing.assert_allclose(found, expected, atol=0.35)


def test_read_tile_level0_matches_region(checker: Path) -> None:
    with open_slide(checker) as slide:
        tile = slide.read_tile(5951, 4433, 64.0, 0, 64)
        region = slide.read_region((5951, 4433), 0, (64, 64))
    np.testing.assert_array_equal(tile, region)
    # The region runs past the right and bottom edges: that part is white.
    assert (region[:, 6000 - 5951 :] == 255).all()
    assert (region[4500 - 4433 :, :] == 255).all()


def test_thumbnail_has_level0_aspect(checker: Path) -> None:
    with open_slide(checker) as slide:
        thumbnail = slide.get_thumbnail(400)
        downsampled = slide.get_downsampled(15.0)
    assert thumbnail.shape == (300, 400, 3)
    assert thumbnail.dtype == np.uint8
    assert downsampled.shape == (300, 400, 3)


def test_bundled_svs_metadata() -> None:
    with open_slide(bundled(CMU)) as slide:
        assert slide.slide_id == "cmu-1-small-region"
        assert slide.reader == "openslide"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "openslide.mpp-x"
        assert slide.bounds == (0, 0, 2220, 2967)
        region = slide.read_region((100, 200), 0, (50, 40))
        assert region.shape == (40, 50, 3)
        assert region.dtype == np.uint8
        assert slide.read_tile(100, 200, 448.9, 0, 224).shape == (224, 224, 3)


def test_missing_mpp_needs_override() -> None:
    path = bundled(TCGA)
    with open_slide(path) as slide:
        assert slide.mpp is None
        assert slide.mpp_source is None
        with pytest.raises(MissingMppError, match="tcga-cr-7395-01a-01-ts1.*--mpp"):
            slide.require_mpp()
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5
        assert slide.mpp_source == "override"
        assert slide.level_mpp(1) == pytest.approx(0.5 * 2.0005, rel=1e-4)
    with open_slide(path, default_mpp=0.25) as slide:
        assert slide.mpp == 0.25


def test_default_mpp_never_replaces_metadata() -> None:
    with open_slide(bundled(CMU), default_mpp=0.25) as slide:
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "openslide.mpp-x"


def test_ndpi_level_choice_uses_mpp() -> None:
    with open_slide(bundled(DAPI)) as slide:
        assert slide.level_count == 7
        assert slide.mpp == pytest.approx(0.22818, rel=1e-4)
        assert slide.best_level_for_mpp(1.0) == 2  # 0.913 µm/px; level 3 is 1.83
        assert slide.best_level_for_mpp(0.87) == 2  # 0.913 is within 5% of 0.87
        assert slide.best_level_for_mpp(0.87, tolerance=0.0) == 1
        assert slide.best_level_for_mpp(0.1) == 0  # finer than level 0: upsample level 0


def test_rgba_background_becomes_white(tmp_path: Path) -> None:
    pattern = tissue_blobs(1200, 900, alpha_background=True)
    for layout in ("pages", "subifds"):
        path = write_synthetic_slide(
            tmp_path / f"rgba_{layout}.tif",
            1200,
            900,
            pattern,
            downsamples=(1.0, 4.0),
            layout=layout,
        )
        reader = "openslide" if layout == "pages" else "tifffile"
        with open_slide(path, reader=reader) as slide:  # type: ignore[arg-type]
            corner = slide.read_region((0, 0), 0, (20, 20))
            thumbnail = slide.get_thumbnail(300)
        assert (corner == 255).all(), layout
        assert thumbnail.shape[2] == 3
        assert (thumbnail.min(axis=2) < 200).mean() > 0.05, layout


def test_grey_16bit_scaled_by_real_range(tmp_path: Path) -> None:
    def grey(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return checkerboard(SQUARE)(xs, ys)[..., :1]

    path = write_synthetic_slide(
        tmp_path / "grey16.tif", 640, 480, grey, downsamples=(1.0, 2.0), dtype="uint16", mpp=None
    )
    with tifffile.TiffFile(path) as tiff:
        assert tiff.pages.first.dtype == np.uint16
    with open_slide(path) as slide:
        assert slide.reader == "tifffile"
        region = slide.read_region((0, 0), 0, (128, 128))
    assert region.dtype == np.uint8
    assert region.shape == (128, 128, 3)
    # Samples RED * 257 and BLUE * 257 span the real range, so they map to 255 and 0.
    assert set(np.unique(region).tolist()) == {0, 255}
    assert (region[..., 0] == region[..., 1]).all()


def test_more_than_three_channels_rejected(tmp_path: Path) -> None:
    def five_channels(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return np.zeros((len(ys), len(xs), 5), dtype=np.uint8)

    path = write_synthetic_slide(
        tmp_path / "multiplex.tif",
        256,
        256,
        five_channels,
        downsamples=(1.0,),
        photometric="minisblack",
        layout="subifds",
    )
    with pytest.raises(SlideOpenError, match="multiplex.tif.*5 channels"):
        open_slide(path)


def test_resolution_tags_in_inches(tmp_path: Path) -> None:
    path = tmp_path / "inch.tif"
    image = np.full((300, 400, 3), 200, dtype=np.uint8)
    tifffile.imwrite(path, image, resolution=(50_800, 50_800), resolutionunit="INCH")
    with open_slide(path) as slide:
        assert slide.reader == "tifffile"
        assert slide.mpp == pytest.approx(0.5)
        assert slide.mpp_source == "tiff.XResolution"


def test_default_72_dpi_is_not_a_resolution(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "screen.tif"
    tifffile.imwrite(
        path, np.zeros((64, 64, 3), np.uint8), resolution=(72, 72), resolutionunit="INCH"
    )
    with caplog.at_level(logging.WARNING), open_slide(path) as slide:
        assert slide.mpp is None
    assert "352.778" in caplog.text


def test_corrupt_tile_raises_and_slide_recovers(tmp_path: Path) -> None:
    path = write_synthetic_slide(
        tmp_path / "corrupt.tif", 1024, 1024, checkerboard(SQUARE), downsamples=(1.0, 4.0), tile=256
    )
    corrupt_tile(path, tile_index=5)  # row 1, column 1 of level 0
    with open_slide(path) as slide:
        with pytest.raises(TileReadError, match=r"corrupt.tif.*\(256, 256\)"):
            slide.read_region((256, 256), 0, (256, 256))
        good = slide.read_region((0, 0), 0, (256, 256))
        assert good.shape == (256, 256, 3)
        assert slide.get_thumbnail(64).shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("relative", "match"),
    [
        ("histolab-fixtures/broken.svs", "broken.svs: not a readable slide"),
        ("openslide-python-fixtures/unopenable.tiff", "unopenable.tiff.*compression"),
        ("pathml-testdata/small_dicom.dcm", "small_dicom.dcm.*ImageType"),
    ],
)
def test_unreadable_files_raise_slide_open_error(relative: str, match: str) -> None:
    with pytest.raises(SlideOpenError, match=match):
        open_slide(shared_slide(relative))


def test_corrupt_svs_tile_raises_tile_read_error() -> None:
    with open_slide(shared_slide("openslide-python-fixtures/unreadable.svs")) as slide:
        with pytest.raises(TileReadError, match="unreadable.svs"):
            slide.read_region((0, 0), 0, (16, 16))


def test_truncated_slide_fails_cleanly(tmp_path: Path) -> None:
    data = bundled(CMU).read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises((SlideOpenError, TileReadError), match="truncated.svs"):
        with open_slide(truncated) as slide:
            slide.get_thumbnail(128)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match="not found"):
        open_slide(tmp_path / "absent.svs")
    with pytest.raises(SlideOpenError, match="is a folder"):
        open_slide(tmp_path)


@pytest.mark.parametrize(
    ("relative", "reader", "mpp"),
    [
        ("histolab-fixtures/kidney-48-5.tif", "tifffile", None),
        ("pathml-testdata/small_vectra.qptiff", "tifffile", 0.4965),
        ("pathml-testdata/smalltif.tif", "tifffile", None),
        ("openslide-python-fixtures/boxes_0.dcm", "openslide", 0.499),
        ("slideio-tutorial-ndpi/test3-TRITC-2-560.ndpi", "openslide", 0.2282),
    ],
)
def test_shared_slides_open_as_rgb(relative: str, reader: str, mpp: float | None) -> None:
    with open_slide(shared_slide(relative)) as slide:
        assert slide.reader == reader
        if mpp is None:
            assert slide.mpp is None
        else:
            assert slide.mpp == pytest.approx(mpp, rel=1e-3)
        thumbnail = slide.get_thumbnail(128)
    assert thumbnail.dtype == np.uint8
    assert thumbnail.ndim == 3
    assert thumbnail.shape[2] == 3


def test_banded_thumbnail_matches_single_band(
    checker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_slide(checker) as slide:
        whole = slide.get_downsampled(7.0)
        monkeypatch.setattr("preprocessing.slide.BAND_PIXELS", 6000 * 50)  # many thin bands
        banded = slide.get_downsampled(7.0)
    assert whole.shape == banded.shape == (643, 857, 3)
    # OpenSlide starts each band at a level-0 row, up to 0.5 / 3.7 level pixels off the band's
    # level row, and interpolates; that shifts edges by a fraction of a pixel and no more.
    difference = np.abs(whole.astype(int) - banded.astype(int))
    assert difference.mean() < 0.5
    assert difference.max() <= 40


def test_single_level_thumbnail_in_bands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_synthetic_slide(
        tmp_path / "flat.tif", 1000, 700, checkerboard(SQUARE), downsamples=(1.0,), tile=128
    )
    with open_slide(path) as slide:
        whole = slide.get_downsampled(8.0)
        monkeypatch.setattr("preprocessing.slide.BAND_PIXELS", 1000 * 16)
        banded = slide.get_downsampled(8.0)
    np.testing.assert_array_equal(whole, banded)
    # Each 8 x 8 block lies inside one 64-pixel square, so block means are the pure colours.
    assert set(np.unique(whole[..., 0]).tolist()) == {RED, BLUE}


def _truncated_copy(folder: Path, fraction: float = 0.8) -> Path:
    """A copy of the bundled SVS cut at `fraction` of its size (level 0 stays complete)."""
    data = bundled(CMU).read_bytes()
    path = folder / "truncated.svs"
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def test_truncated_svs_logged_with_slide_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _truncated_copy(tmp_path)

    with caplog.at_level(logging.WARNING), open_slide(path, slide_id="case-7") as slide:
        problems = list(slide.problems)

    assert any("invalid page offset" in problem for problem in problems)
    damage = [record for record in caplog.records if "invalid page offset" in record.getMessage()]
    assert damage
    assert all(record.name != "tifffile" for record in damage)
    assert all(record.getMessage().startswith("case-7: ") for record in damage)


def test_intact_svs_has_no_problems() -> None:
    with open_slide(bundled(CMU)) as slide:
        assert slide.problems == []
