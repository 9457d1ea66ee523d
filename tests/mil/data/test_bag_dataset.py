"""BagDataset: lazy reads from slidemil and imported stores, validation and the tile cap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from data_stores import grid_coords, store_features

from mil.data.dataset import BagDataset, find_feature_stores
from preprocessing.errors import (
    ConfigError,
    DuplicateSlideIdError,
    IncompleteStoreError,
    StoreFormatError,
)

StoreFactory = Callable[..., Path]


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_reads_bag_from_store(make_store: StoreFactory, tmp_path: Path, fmt: str) -> None:
    make_store("a", 25, dim=6, fmt=fmt)
    dataset = BagDataset(tmp_path / "features", labels={"a": 1})

    bag = dataset[0]
    assert bag.slide_id == "a"
    assert bag.label == 1
    assert bag.features.dtype == torch.float32
    assert bag.features.shape == (25, 6)
    np.testing.assert_array_equal(bag.features.numpy(), store_features("a", 25, 6))
    np.testing.assert_array_equal(bag.coords.numpy(), grid_coords(25))
    assert bag.coords.dtype == torch.int64
    np.testing.assert_array_equal(bag.tile_index.numpy(), np.arange(25))


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
@pytest.mark.parametrize("point_read_cost", [1, 1 << 20], ids=["selection", "full-read"])
def test_read_rows_in_given_order(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str,
    point_read_cost: int,
) -> None:
    monkeypatch.setattr("mil.data.dataset.POINT_READ_COST_BYTES", point_read_cost)
    n_rows = 40
    make_store("a", 200, fmt=fmt)
    dataset = BagDataset(tmp_path / "features")
    rows = np.random.default_rng(0).choice(200, n_rows, replace=False)

    features, coords, tile_index = dataset.read_arrays(0, rows)
    np.testing.assert_array_equal(features, store_features("a", 200, 4)[rows])
    np.testing.assert_array_equal(coords, grid_coords(200)[rows])
    np.testing.assert_array_equal(tile_index, rows)


def test_cap_is_seeded_per_epoch(make_store: StoreFactory, tmp_path: Path) -> None:
    make_store("a", 100)
    dataset = BagDataset(tmp_path / "features", max_tiles=10, seed=5)
    first = dataset[0].tile_index
    assert first is not None
    assert len(first) == 10
    assert len(set(first.tolist())) == 10
    assert torch.equal(dataset[0].tile_index, first)
    again = BagDataset(tmp_path / "features", max_tiles=10, seed=5)
    assert torch.equal(again[0].tile_index, first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0].tile_index, first)
    assert dataset.read(0).n_tiles == 100


def test_nan_rejected_naming_slide_and_row(tmp_path: Path) -> None:
    folder = tmp_path / "features"
    folder.mkdir()
    features = np.ones((8, 4), dtype=np.float32)
    features[5, 2] = np.nan
    with h5py.File(folder / "bad_slide.h5", "w") as handle:
        handle.create_dataset("features", data=features)
        handle.create_dataset("coords", data=grid_coords(8))
        handle.attrs["backbone"] = "test"
        handle.attrs["complete"] = True
    dataset = BagDataset(folder)

    with pytest.raises(StoreFormatError, match=r"slide bad_slide: .*bad_slide\.h5.*row 5"):
        dataset[0]
    with pytest.raises(StoreFormatError, match="row 5"):
        dataset.read_arrays(0, np.array([1, 5]))


def test_nan_in_selected_rows_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mil.data.dataset.POINT_READ_COST_BYTES", 1)
    folder = tmp_path / "features"
    folder.mkdir()
    features = np.ones((8, 4), dtype=np.float32)
    features[6, 0] = np.inf
    with h5py.File(folder / "s.h5", "w") as handle:
        handle.create_dataset("features", data=features)
        handle.create_dataset("coords", data=grid_coords(8))
        handle.attrs["backbone"] = "test"
        handle.attrs["complete"] = True
    dataset = BagDataset(folder)

    assert dataset.read_arrays(0, np.array([0, 2]))[0].shape == (2, 4)
    with pytest.raises(StoreFormatError, match="first at row 6"):
        dataset.read_arrays(0, np.array([2, 6, 7]))


def test_cache_keeps_features(make_store: StoreFactory, tmp_path: Path) -> None:
    path = make_store("a", 12)
    dataset = BagDataset(tmp_path / "features", cache=True)
    expected = dataset[0].features.clone()
    path.unlink()
    assert torch.equal(dataset[0].features, expected)
    assert torch.equal(dataset.read(0, np.array([3, 1])).features, expected[[3, 1]])


def test_dimension_mismatch_rejected(make_store: StoreFactory, tmp_path: Path) -> None:
    make_store("a", 3, dim=4)
    make_store("b", 3, dim=8)
    with pytest.raises(StoreFormatError, match=r"different dimensions \[4, 8\]"):
        BagDataset(tmp_path / "features")


def test_incomplete_store_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "features"
    folder.mkdir()
    with h5py.File(folder / "half.h5", "w") as handle:
        handle.create_dataset("features", data=np.zeros((2, 4), np.float32))
        handle.create_dataset("coords", data=grid_coords(2))
        handle.attrs["backbone"] = "test"
        handle.attrs["complete"] = False
    with pytest.raises((IncompleteStoreError, StoreFormatError), match="half.h5"):
        BagDataset(folder)


def test_missing_slide_and_labels(make_store: StoreFactory, tmp_path: Path) -> None:
    make_store("a", 3)
    folder = tmp_path / "features"
    with pytest.raises(StoreFormatError, match="zz"):
        BagDataset(folder, slide_ids=["a", "zz"])
    with pytest.raises(ConfigError, match="no label"):
        BagDataset(folder, labels={"b": 0})
    with pytest.raises(ConfigError, match="not a class index"):
        BagDataset(folder, labels=["tumor"])  # type: ignore[list-item]


def test_find_feature_stores(make_store: StoreFactory, tmp_path: Path) -> None:
    folder = tmp_path / "features"
    make_store("b", 2)
    make_store("a.dots.in.id", 2)
    (folder / "c.h5.tmp-99").write_bytes(b"")
    (folder / "b.pt").write_bytes(b"")
    assert list(find_feature_stores(folder)) == ["a.dots.in.id", "b"]
    make_store("b", 2, fmt="zarr")
    with pytest.raises(DuplicateSlideIdError, match="slide b"):
        find_feature_stores(folder)
    with pytest.raises(StoreFormatError, match="not found"):
        find_feature_stores(tmp_path / "absent")


def test_reads_clam_h5_files_folder(tmp_path: Path) -> None:
    folder = tmp_path / "clam" / "h5_files"
    folder.mkdir(parents=True)
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    with h5py.File(folder / "slide1.h5", "w") as handle:
        handle.create_dataset("features", data=features)
        coords = handle.create_dataset("coords", data=grid_coords(3))
        coords.attrs["patch_size"] = 256
        coords.attrs["patch_level"] = 0
    dataset = BagDataset(tmp_path / "clam")
    assert dataset.formats == ["clam"]
    bag = dataset[0]
    np.testing.assert_array_equal(bag.features.numpy(), features)
    np.testing.assert_array_equal(bag.coords.numpy(), grid_coords(3))


def test_reads_stamp_without_pixel_coords(tmp_path: Path) -> None:
    folder = tmp_path / "stamp"
    folder.mkdir()
    with h5py.File(folder / "s.h5", "w") as handle:
        handle.create_dataset("feats", data=np.ones((4, 3), np.float16))
        handle.create_dataset("coords", data=np.ones((4, 2)) * 112.0)
        handle.attrs["unit"] = "um"
    bag = BagDataset(folder, labels=[0])[0]
    assert bag.features.shape == (4, 3)
    assert bag.coords.tolist() == [[-1, -1]] * 4


def test_clam_file_without_features_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "clam"
    folder.mkdir()
    with h5py.File(folder / "s.h5", "w") as handle:
        handle.create_dataset("features", data=np.ones((2, 3, 4), np.float32))
        handle.create_dataset("coords", data=grid_coords(2))
    with pytest.raises(StoreFormatError, match=r"s\.h5.*shape \(N, D\)"):
        BagDataset(folder)


def test_empty_slide_has_length_zero(make_store: StoreFactory, tmp_path: Path) -> None:
    make_store("a", 0)
    make_store("b", 4)
    dataset = BagDataset(tmp_path / "features")
    assert dataset.lengths.tolist() == [0, 4]
    assert dataset.dim == 4
    assert dataset[0].n_tiles == 0
