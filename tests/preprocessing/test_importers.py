"""Tests of the readers for CLAM, TRIDENT, STAMP and slidemil feature files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from preprocessing.errors import StoreFormatError
from preprocessing.importers import (
    detect_feature_format,
    list_feature_files,
    read_feature_file,
)
from preprocessing.stores import FeatureStoreWriter

N_TILES = 5
DIM = 8


def _features(dtype: str = "float32") -> np.ndarray:
    return np.arange(N_TILES * DIM, dtype=dtype).reshape(N_TILES, DIM) / 10


def _pixel_coords() -> np.ndarray:
    return np.array([[0, 0], [512, 0], [1024, 0], [0, 512], [512, 512]], dtype=np.int64)


def _write_clam(path: Path) -> None:
    with h5py.File(path, "w") as handle:
        handle["features"] = _features()
        coords = handle.create_dataset("coords", data=_pixel_coords())
        coords.attrs["patch_size"] = 256
        coords.attrs["patch_level"] = 1
        coords.attrs["downsample"] = np.array([2.0, 2.0])
        coords.attrs["name"] = "slide"


def _write_trident(path: Path) -> None:
    with h5py.File(path, "w") as handle:
        handle["features"] = _features()
        coords = handle.create_dataset("coords", data=_pixel_coords())
        coords.attrs["patch_size"] = 256
        coords.attrs["patch_size_level0"] = 512
        coords.attrs["level0_magnification"] = 40
        coords.attrs["target_magnification"] = 20
        coords.attrs["overlap"] = 0


def _write_stamp(path: Path, unit: str | None = "um") -> None:
    with h5py.File(path, "w") as handle:
        handle["feats"] = _features("float16")
        handle["coords"] = _pixel_coords().astype(np.float32) * 0.25  # µm at 0.25 µm/px
        handle.attrs["extractor"] = "ctranspath"
        handle.attrs["tile_size_um"] = 128.0
        handle.attrs["tile_size_px"] = 224
        if unit is not None:
            handle.attrs["unit"] = unit


def test_clam_h5_read_as_is(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    _write_clam(path)

    imported = read_feature_file(path)

    assert detect_feature_format(path) == "clam"
    assert imported.source_format == "clam"
    np.testing.assert_array_equal(imported.features, _features())
    assert imported.coords is not None
    np.testing.assert_array_equal(imported.coords, _pixel_coords())
    assert imported.coords.dtype == np.int64
    assert imported.tile_px_level0 == 512.0
    assert imported.attrs["patch_level"] == 1
    assert imported.n_tiles == N_TILES
    assert imported.dim == DIM


def test_clam_pt_has_no_coords(tmp_path: Path) -> None:
    path = tmp_path / "slide.pt"
    torch.save(torch.from_numpy(_features()), path)

    imported = read_feature_file(path)

    assert imported.source_format == "clam_pt"
    np.testing.assert_array_equal(imported.features, _features())
    assert imported.coords is None


def test_trident_read_as_is(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    _write_trident(path)

    imported = read_feature_file(path)

    assert imported.source_format == "trident"
    assert imported.coords is not None
    np.testing.assert_array_equal(imported.coords, _pixel_coords())
    assert imported.tile_px_level0 == 512.0
    assert imported.attrs["target_magnification"] == 20


def test_stamp_keeps_um_without_mpp(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    _write_stamp(path)

    imported = read_feature_file(path)

    assert imported.source_format == "stamp"
    assert imported.features.dtype == np.float16
    assert imported.coords is None
    assert imported.coords_um is not None
    np.testing.assert_allclose(imported.coords_um, _pixel_coords() * 0.25)
    assert imported.tile_px_level0 is None
    assert imported.attrs["extractor"] == "ctranspath"


def test_stamp_um_to_level0_pixels(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    _write_stamp(path)

    imported = read_feature_file(path, slide_mpp=0.25)

    assert imported.coords is not None
    np.testing.assert_array_equal(imported.coords, _pixel_coords())
    assert imported.tile_px_level0 == 512.0


def test_stamp_pixel_unit_read_as_pixels(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    with h5py.File(path, "w") as handle:
        handle["feats"] = _features()
        handle["coords"] = _pixel_coords()
        handle.attrs["unit"] = "px"

    imported = read_feature_file(path)

    assert imported.coords is not None
    np.testing.assert_array_equal(imported.coords, _pixel_coords())
    assert imported.coords_um is None


def test_stamp_invalid_mpp_rejected(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    _write_stamp(path)

    with pytest.raises(StoreFormatError, match="slide_mpp must be positive"):
        read_feature_file(path, slide_mpp=0.0)


def test_slidemil_store_detected(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    attrs = {"backbone": "efficientnet_lite0", "tile_px_level0": 448.0}
    with FeatureStoreWriter(path, N_TILES, DIM, _pixel_coords(), attrs) as writer:
        writer.write(0, _features())

    imported = read_feature_file(path)

    assert imported.source_format == "slidemil"
    assert imported.features.dtype == np.float16
    np.testing.assert_allclose(imported.features, _features(), rtol=1e-3)
    assert imported.tile_px_level0 == 448.0


def test_length_mismatch_rejected(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    with h5py.File(path, "w") as handle:
        handle["features"] = _features()
        handle["coords"] = _pixel_coords()[:3]

    with pytest.raises(StoreFormatError, match="5 feature rows but 3 coords"):
        read_feature_file(path)


def test_nan_row_named(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    features = _features()
    features[3, 2] = np.nan
    with h5py.File(path, "w") as handle:
        handle["features"] = features
        handle["coords"] = _pixel_coords()

    with pytest.raises(StoreFormatError, match="first at row 3") as raised:
        read_feature_file(path)

    assert str(path) in str(raised.value)


def test_unknown_layout_rejected(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    with h5py.File(path, "w") as handle:
        handle["embeddings"] = _features()

    with pytest.raises(StoreFormatError, match="neither a slidemil, CLAM"):
        read_feature_file(path)


def test_truncated_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    _write_clam(path)
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(StoreFormatError, match="not a readable HDF5 file"):
        read_feature_file(path)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(StoreFormatError, match="feature file not found"):
        read_feature_file(tmp_path / "absent.h5")


def test_list_prefers_h5_and_skips_tmp(tmp_path: Path) -> None:
    _write_clam(tmp_path / "a.h5")
    torch.save(torch.zeros(2, 3), tmp_path / "a.pt")
    torch.save(torch.zeros(2, 3), tmp_path / "b.pt")
    (tmp_path / "c.h5.tmp-123").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")

    found = list_feature_files(tmp_path)

    assert found == {"a": tmp_path / "a.h5", "b": tmp_path / "b.pt"}
