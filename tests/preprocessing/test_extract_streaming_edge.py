"""Appending feature store writer and streamed extraction with bad and unusual input."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mil.data.dataset import BagDataset
from preprocessing import stores
from preprocessing.errors import SlidemilError, StoreFormatError
from preprocessing.extract import ExtractConfig, run_extraction
from preprocessing.jobs import read_rows
from preprocessing.slide import open_slide
from preprocessing.stores import FeatureStoreWriter, open_feature_store, write_coords_store

REPO_ROOT = Path(__file__).resolve().parents[2]
SLIDE = REPO_ROOT / "tests" / "data" / "slides" / "cmu-1-small-region.svs"
SMALL_MODEL = "test_vit.r160_in1k"
FORMATS = [".h5", ".zarr"]


def leftovers(folder: Path) -> list[str]:
    """Names of temporary stores left in `folder`."""
    return sorted(path.name for path in folder.glob("*.tmp-*"))


@pytest.mark.parametrize("suffix", FORMATS)
def test_coords_stacked_as_rows_rejected(tmp_path: Path, suffix: str) -> None:
    # np.stack([x, y]) has shape (2, n); a reshape to (n, 2) would mix x and y values.
    path = tmp_path / f"slide{suffix}"
    x = np.array([0, 224, 448])
    y = np.array([1000, 1000, 1224])

    with pytest.raises(StoreFormatError, match=r"shape \(2, 3\), expected \(n, 2\)"):
        with FeatureStoreWriter.appending(path, 4, {}) as writer:
            writer.append(np.ones((3, 4)), np.stack([x, y]))

    assert not path.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("coords", [[[0.5, 0.0]], [[np.nan, 0.0]], [[np.inf, 0.0]], [4, 8]])
def test_invalid_appended_coords_rejected(tmp_path: Path, coords: list[object]) -> None:
    path = tmp_path / "slide.h5"

    with pytest.raises(StoreFormatError, match="slide.h5: appended coords"):
        with FeatureStoreWriter.appending(path, 4, {}) as writer:
            writer.append(np.ones((1, 4)), np.array(coords))

    assert not path.exists()


def test_whole_float_coords_accepted(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"

    with FeatureStoreWriter.appending(path, 4, {}) as writer:
        writer.append(np.ones((2, 4)), np.array([[224.0, 0.0], [448.0, 224.0]]))

    with open_feature_store(path) as store:
        np.testing.assert_array_equal(store.coords, [[224, 0], [448, 224]])
        assert store.coords.dtype == np.int64


@pytest.mark.parametrize("rows", [np.full((1, 4), "a"), np.full((1, 4), 1 + 2j),
                                  np.ones((1, 4), dtype=bool)])
def test_non_numeric_rows_rejected(tmp_path: Path, rows: np.ndarray) -> None:
    path = tmp_path / "slide.zarr"

    with pytest.raises(StoreFormatError, match=f"feature rows of dtype {rows.dtype}"):
        with FeatureStoreWriter.appending(path, 4, {}) as writer:
            writer.append(rows, np.zeros((1, 2), dtype=np.int64))

    assert not path.exists()


@pytest.mark.parametrize("suffix", FORMATS)
def test_append_after_commit_rejected(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"slide{suffix}"
    writer = FeatureStoreWriter.appending(path, 4, {})
    with writer:
        writer.append(np.ones((2, 4)), np.zeros((2, 2), dtype=np.int64))

    with pytest.raises(ValueError, match="after the writer's `with` block ended"):
        writer.append(np.ones((3, 4)), np.zeros((3, 2), dtype=np.int64))

    with open_feature_store(path) as store:
        assert store.n_tiles == 2
    assert writer.n_rows_written == 2
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("appending", [True, False])
def test_writer_reuse_rejected(tmp_path: Path, appending: bool) -> None:
    # A second `with` would recreate the temporary store and replace the committed one.
    path = tmp_path / "slide.h5"
    if appending:
        writer = FeatureStoreWriter.appending(path, 4, {})
    else:
        writer = FeatureStoreWriter(path, 2, 4, np.zeros((2, 2), dtype=np.int64), {})
    with writer:
        if appending:
            writer.append(np.ones((2, 4)), np.zeros((2, 2), dtype=np.int64))
        else:
            writer.write(0, np.ones((2, 4)))

    with pytest.raises(ValueError, match="already ended"):
        with writer:
            pass

    with open_feature_store(path) as store:
        np.testing.assert_array_equal(store.read_features(), np.ones((2, 4)))


def test_zero_dimension_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="embedding dimension must be >= 1, got 0"):
        FeatureStoreWriter.appending(tmp_path / "slide.h5", 0, {})


@pytest.mark.parametrize("suffix", FORMATS)
def test_failed_chunk_write_names_store(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"slide{suffix}"

    def full_disk(self: object, whole_chunks_only: bool = False) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stores._ChunkAppender, "flush", full_disk)

    with pytest.raises(SlidemilError, match="No space left on device") as caught:
        with FeatureStoreWriter.appending(path, 4, {}) as writer:
            writer.append(np.ones((2, 4)), np.zeros((2, 2), dtype=np.int64))

    assert str(path) in str(caught.value)
    assert "Check free space and write permission" in str(caught.value)
    assert caught.value.error_type == "write_failed"
    assert not path.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", FORMATS)
def test_unwritable_folder_names_store(tmp_path: Path, suffix: str) -> None:
    # A file where the output folder should be; root ignores read-only folder permissions.
    (tmp_path / "features").touch()
    path = tmp_path / "features" / f"slide{suffix}"

    with pytest.raises(SlidemilError, match="writing the temporary store") as caught:
        with FeatureStoreWriter.appending(path, 4, {}):
            pass

    assert str(path) in str(caught.value)
    assert "File exists" in str(caught.value)


def test_failed_close_at_commit_removes_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HDF5 writes its cached chunks when the file closes, so a full disk may first fail there.
    path = tmp_path / "slide.h5"
    real_close = FeatureStoreWriter._close_handle

    def close_then_fail(self: FeatureStoreWriter) -> None:
        real_close(self)
        raise RuntimeError("Can't decrement id ref count (file write failed, errno = 28)")

    monkeypatch.setattr(FeatureStoreWriter, "_close_handle", close_then_fail)

    with pytest.raises(SlidemilError, match="slide.h5: writing the temporary store"):
        with FeatureStoreWriter.appending(path, 4, {}) as writer:
            writer.append(np.ones((2, 4)), np.zeros((2, 2), dtype=np.int64))

    assert not path.exists()
    assert leftovers(tmp_path) == []


def test_failed_close_keeps_block_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "slide.h5"
    real_close = FeatureStoreWriter._close_handle

    def close_then_fail(self: FeatureStoreWriter) -> None:
        real_close(self)
        raise RuntimeError("file write failed")

    monkeypatch.setattr(FeatureStoreWriter, "_close_handle", close_then_fail)

    with pytest.raises(KeyError, match="raised in the block"):
        with FeatureStoreWriter.appending(path, 4, {}) as writer:
            writer.append(np.ones((2, 4)), np.zeros((2, 2), dtype=np.int64))
            raise KeyError("raised in the block")

    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", FORMATS)
def test_appended_stores_read_by_bag_dataset(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((700, 8)).astype(np.float32)
    coords = rng.integers(0, 10**6, (700, 2))
    full, empty = tmp_path / f"full{suffix}", tmp_path / f"empty{suffix}"
    with FeatureStoreWriter.appending(full, 8, {}, dtype="float32") as writer:
        for start in range(0, 700, 33):
            writer.append(rows[start:start + 33], coords[start:start + 33])
    with FeatureStoreWriter.appending(empty, 8, {}, dtype="float32"):
        pass

    dataset = BagDataset({"full": full, "empty": empty}, labels={"full": 1, "empty": 0})
    bag = dataset.read(dataset.index_of("full"))

    np.testing.assert_array_equal(bag.features.numpy(), rows)
    np.testing.assert_array_equal(dataset.lengths, [0, 700])
    assert dataset.read(dataset.index_of("empty")).features.shape == (0, 8)


def write_coords(coords_dir: Path, n_tiles: int) -> None:
    """Coords store of `n_tiles` 96 px tiles at 1 µm per pixel from the top of the slide."""
    with open_slide(SLIDE) as slide:
        slide_mpp = slide.require_mpp()
        width, height = slide.dimensions
    tile_px_level0 = 96 / slide_mpp
    coords = np.array([[round(i * tile_px_level0), 0] for i in range(n_tiles)], dtype=np.int64)
    attrs = {
        "slide_id": "cmu", "slide_path": str(SLIDE), "slide_mpp": slide_mpp,
        "mpp_source": "openslide.mpp-x", "target_mpp": 1.0, "tile_px": 96,
        "tile_px_level0": tile_px_level0, "read_level": 0, "level0_width": width,
        "level0_height": height, "overlap_px": 0, "status": "ok",
        "patch_size_level0": round(tile_px_level0),
    }
    write_coords_store(coords_dir / "cmu.h5", coords, attrs)


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_stage_full_disk_fails_slide_cleanly(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not SLIDE.is_file():
        pytest.skip(f"sample slide {SLIDE.name} is absent")
    (tmp_path / "tiles").mkdir()
    write_coords(tmp_path / "tiles", n_tiles=3)

    def full_disk(self: object, whole_chunks_only: bool = False) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stores._ChunkAppender, "flush", full_disk)
    cfg = ExtractConfig(
        coords_dir=tmp_path / "tiles", output_dir=tmp_path / "features", backbone=SMALL_MODEL,
        weights="random", device="cpu", batch_size=2, num_workers=0, progress=False,
        format=fmt,
    )

    result = run_extraction(cfg)

    out_dir = tmp_path / "features" / SMALL_MODEL
    row = read_rows(out_dir, "extract")["cmu"]
    assert result.n_failed == 1
    assert row.status == "failed"
    assert f"cmu.{fmt}: writing the temporary store" in row.message
    assert not (out_dir / f"cmu.{fmt}").exists()
    assert leftovers(out_dir) == []


FILE_SIZE_LIMIT_SCRIPT = """
import resource, sys
from pathlib import Path
import numpy as np
from preprocessing.errors import SlidemilError
from preprocessing.stores import FeatureStoreWriter

# Files may not grow beyond 256 KiB, as on a full disk. Python ignores SIGXFSZ.
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
path = Path(sys.argv[1])
try:
    with FeatureStoreWriter.appending(path, 512, {}, dtype="float32") as writer:
        for _ in range(20):
            writer.append(np.ones((256, 512)), np.zeros((256, 2), dtype=np.int64))
except SlidemilError as err:
    print("raised:", err)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE behaviour checked on Linux")
def test_h5_file_size_limit_exits_cleanly(tmp_path: Path) -> None:
    # Dirty HDF5 chunks left by a failed close crash the interpreter at exit (exit code -11).
    path = tmp_path / "slide.h5"

    completed = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False,
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "raised:" in completed.stdout
    assert "writing the temporary store" in completed.stdout
    assert not path.exists()
    assert leftovers(tmp_path) == []


def test_stage_removes_moved_aside_store(tmp_path: Path) -> None:
    # A job killed between the two renames of a zarr commit leaves `<store>.old-<pid>`.
    if not SLIDE.is_file():
        pytest.skip(f"sample slide {SLIDE.name} is absent")
    (tmp_path / "tiles").mkdir()
    write_coords(tmp_path / "tiles", n_tiles=2)
    out_dir = tmp_path / "features" / SMALL_MODEL
    (out_dir / "cmu.zarr.old-999999").mkdir(parents=True)
    (out_dir / "cmu.zarr.tmp-999999").mkdir()
    cfg = ExtractConfig(
        coords_dir=tmp_path / "tiles", output_dir=tmp_path / "features", backbone=SMALL_MODEL,
        weights="random", device="cpu", batch_size=2, num_workers=0, progress=False,
        format="zarr",
    )

    result = run_extraction(cfg)

    assert result.n_failed == 0
    assert sorted(path.name for path in out_dir.glob("cmu.zarr*")) == ["cmu.zarr"]
