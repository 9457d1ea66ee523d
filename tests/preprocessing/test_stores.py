"""Stores: atomic completion, format round trips and rejection of damaged files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from preprocessing.errors import IncompleteStoreError, StoreFormatError
from preprocessing.stores import (
    FeatureStoreWriter,
    is_complete_store,
    open_feature_store,
    read_attention_store,
    read_coords_store,
    replace_text,
    write_attention_store,
    write_coords_store,
)

COORDS = np.array([[0, 0], [224, 0], [448, 224]], dtype=np.int64)


def test_coords_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    write_coords_store(path, COORDS, {"slide_mpp": 0.5, "tissue": {"method": "otsu"}})
    store = read_coords_store(path)
    np.testing.assert_array_equal(store.coords, COORDS)
    assert store.attrs["slide_mpp"] == 0.5
    assert store.attrs["tissue"] == '{"method": "otsu"}'
    assert store.attrs["complete"] is True
    assert not list(tmp_path.glob("*.tmp-*"))
    with h5py.File(path, "r") as handle:
        assert handle["coords"].attrs["slide_mpp"] == 0.5


def test_coords_store_empty_grid(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5"
    write_coords_store(path, np.zeros((0, 2), dtype=np.int64), {"status": "no_tissue"})
    assert read_coords_store(path).n_tiles == 0


def test_incomplete_store_rejected(tmp_path: Path) -> None:
    path = tmp_path / "half.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("coords", data=COORDS)
    assert not is_complete_store(path)
    with pytest.raises(IncompleteStoreError, match="half.h5"):
        read_coords_store(path)


def test_truncated_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.h5"
    write_coords_store(path, COORDS, {})
    path.write_bytes(path.read_bytes()[:100])
    assert not is_complete_store(path)
    with pytest.raises(StoreFormatError, match="cut.h5"):
        read_coords_store(path)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_feature_store_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"slide{suffix}"
    features = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    with FeatureStoreWriter(path, 3, 8, COORDS, {"backbone": "test"}) as writer:
        writer.write(0, features[:2])
        writer.write(2, features[2:])
    assert is_complete_store(path)
    with open_feature_store(path) as store:
        assert store.n_tiles == 3
        assert store.dim == 8
        assert store.attrs["dtype"] == "float16"
        assert store.attrs["backbone"] == "test"
        np.testing.assert_allclose(store.read_features(), features, atol=1e-2)
        reordered = store.read_features(np.array([2, 0]))
        np.testing.assert_allclose(reordered, features[[2, 0]], atol=1e-2)
        np.testing.assert_array_equal(store.coords, COORDS)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_failed_write_leaves_nothing(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"slide{suffix}"
    with pytest.raises(RuntimeError), FeatureStoreWriter(path, 3, 4, COORDS, {}) as writer:
        writer.write(0, np.ones((1, 4)))
        raise RuntimeError("killed")
    assert not path.exists()
    assert not list(tmp_path.iterdir())


def test_unwritten_rows_block_commit(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    with pytest.raises(StoreFormatError, match="never written"), FeatureStoreWriter(
        path, 3, 4, COORDS, {}
    ) as writer:
        writer.write(0, np.ones((2, 4)))
    assert not path.exists()


def test_nan_rows_rejected(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    rows = np.ones((3, 4))
    rows[1, 2] = np.nan
    with pytest.raises(StoreFormatError, match="row 1"), FeatureStoreWriter(
        path, 3, 4, COORDS, {}
    ) as writer:
        writer.write(0, rows)


def test_zarr_store_replaced_on_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "slide.zarr"
    for value in (1.0, 2.0):
        with FeatureStoreWriter(path, 3, 2, COORDS, {}) as writer:
            writer.write(0, np.full((3, 2), value))
    with open_feature_store(path) as store:
        assert float(store.read_features()[0, 0]) == 2.0


def test_attention_round_trip_and_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "att.h5"
    attention = np.array([[0.1, 0.2], [0.3, 0.4], [0.6, 0.4]])
    write_attention_store(path, attention, COORDS, {"model": "acmil"})
    store = read_attention_store(path)
    assert store.attention.shape == (3, 2)
    assert store.attrs["model"] == "acmil"
    with pytest.raises(StoreFormatError, match="does not match 3 coords"):
        write_attention_store(tmp_path / "bad.h5", np.ones(2), COORDS, {})


# ------------------------------------------------------------------ appending feature stores


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_appended_store_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"slide{suffix}"
    dim = 1024  # 256 rows per chunk, so the 700 rows below span three chunks
    rng = np.random.default_rng(0)
    features = rng.normal(size=(700, dim)).astype(np.float32)
    coords = rng.integers(0, 10**6, size=(700, 2))
    with FeatureStoreWriter.appending(path, dim, {"backbone": "test"}) as writer:
        for start in range(0, 700, 64):
            writer.append(features[start : start + 64], coords[start : start + 64])
        writer.update_attrs({"n_failed_tiles": 3})
    with open_feature_store(path) as store:
        assert store.n_tiles == 700
        assert store.attrs["backbone"] == "test"
        assert store.attrs["n_failed_tiles"] == 3
        assert store.attrs["dtype"] == "float16"
        np.testing.assert_array_equal(store.read_features(), features.astype(np.float16))
        np.testing.assert_array_equal(store.coords, coords)
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_appending_writer_buffers_under_chunk(tmp_path: Path, suffix: str) -> None:
    dim, batch = 1024, 48
    chunk_rows = 2**20 // (dim * 4)
    rows = np.ones((batch, dim), dtype=np.float32)
    buffered = []
    on_disk = []
    with FeatureStoreWriter.appending(tmp_path / f"slide{suffix}", dim, {}) as writer:
        for index in range(40):
            writer.append(rows, np.full((batch, 2), index))
            buffered.append(writer.n_rows_buffered)
            on_disk.append(writer.n_rows_written - writer.n_rows_buffered)
    assert max(buffered) < chunk_rows
    assert on_disk[-1] == 40 * batch - buffered[-1]
    assert all(count % chunk_rows == 0 for count in on_disk)
    assert on_disk == sorted(on_disk)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_empty_appended_store_commits(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"slide{suffix}"
    with FeatureStoreWriter.appending(path, 8, {"status": "no_tissue"}):
        pass
    with open_feature_store(path) as store:
        assert store.n_tiles == 0
        assert store.dim == 8
        assert store.coords.shape == (0, 2)


def test_h5_appended_datasets_resizable(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    with FeatureStoreWriter.appending(path, 4, {}) as writer:
        writer.append(np.ones((3, 4)), COORDS)
    with h5py.File(path, "r") as handle:
        assert handle["features"].maxshape == (None, 4)
        assert handle["features"].shape == (3, 4)
        assert handle["coords"].maxshape == (None, 2)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_failed_append_leaves_nothing(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"slide{suffix}"
    with pytest.raises(RuntimeError), FeatureStoreWriter.appending(path, 4, {}) as writer:
        writer.append(np.ones((3, 4)), COORDS)
        raise RuntimeError("killed")
    assert not list(tmp_path.iterdir())


def test_appended_nan_row_names_store_row(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    bad = np.ones((3, 4))
    bad[2, 0] = np.nan
    with pytest.raises(StoreFormatError, match="first at row 5"), FeatureStoreWriter.appending(
        path, 4, {}
    ) as writer:
        writer.append(np.ones((3, 4)), COORDS)
        writer.append(bad, COORDS)
    assert not list(tmp_path.iterdir())


def test_appended_float16_overflow_rejected(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    with pytest.raises(StoreFormatError, match="non-finite"), FeatureStoreWriter.appending(
        path, 4, {}
    ) as writer:
        writer.append(np.full((3, 4), 1e5), COORDS)
    assert not path.exists()


def test_append_checks_coords_length(tmp_path: Path) -> None:
    writer = FeatureStoreWriter.appending(tmp_path / "slide.h5", 4, {})
    with pytest.raises(StoreFormatError, match="3 feature rows but 2 coords"), writer:
        writer.append(np.ones((3, 4)), COORDS[:2])


def test_writer_modes_not_mixed(tmp_path: Path) -> None:
    with FeatureStoreWriter.appending(tmp_path / "a.h5", 4, {}) as appending:
        with pytest.raises(ValueError, match="append"):
            appending.write(0, np.ones((1, 4)))
        appending.append(np.ones((3, 4)), COORDS)
    with FeatureStoreWriter(tmp_path / "b.h5", 3, 4, COORDS, {}) as fixed:
        with pytest.raises(ValueError, match="appending writer"):
            fixed.append(np.ones((3, 4)), COORDS)
        fixed.write(0, np.ones((3, 4)))
    with pytest.raises(ValueError, match="coords=None"):
        FeatureStoreWriter(tmp_path / "c.h5", None, 4, COORDS, {})


def test_replace_text_only_when_changed(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"

    assert replace_text(path, "id,status\r\na,ok\r\n")
    stamp = path.stat().st_mtime_ns
    assert not replace_text(path, "id,status\r\na,ok\r\n")
    assert path.stat().st_mtime_ns == stamp
    assert replace_text(path, "id,status\r\na,failed\r\n")

    assert path.read_bytes() == b"id,status\r\na,failed\r\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]
