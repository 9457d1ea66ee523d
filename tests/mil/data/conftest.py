"""Tiny feature stores written with the real store writer."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from preprocessing.stores import FeatureStoreWriter

# The store helpers live beside the tests; make them importable as `data_stores`.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_stores import grid_coords, store_features  # noqa: E402

StoreFactory = Callable[..., Path]


@pytest.fixture
def make_store(tmp_path: Path) -> StoreFactory:
    """Write `<folder>/<slide_id>.h5|.zarr` with `n_tiles` rows of `store_features`."""

    def factory(slide_id: str, n_tiles: int, dim: int = 4, fmt: str = "h5",
                folder: Path | None = None) -> Path:
        folder = folder or tmp_path / "features"
        path = folder / f"{slide_id}.{fmt}"
        attrs = {"backbone": "test", "slide_mpp": 0.5, "tile_px": 224}
        with FeatureStoreWriter(path, n_tiles, dim, grid_coords(n_tiles), attrs,
                                dtype="float32") as writer:
            if n_tiles:
                writer.write(0, store_features(slide_id, n_tiles, dim))
        return path

    return factory


@pytest.fixture
def feature_dir(make_store: StoreFactory, tmp_path: Path) -> Callable[[Sequence[int]], Path]:
    """Folder with stores `s0`, `s1`, ... of the given tile counts."""

    def factory(lengths: Sequence[int], dim: int = 4) -> Path:
        for index, n_tiles in enumerate(lengths):
            make_store(f"s{index}", n_tiles, dim)
        return tmp_path / "features"

    return factory
