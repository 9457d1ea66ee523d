"""Synthetic pyramidal TIFF slides with attention stores for the heatmap tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from preprocessing.stores import write_attention_store

TISSUE_RGB = (232, 196, 218)
MARK_RGB = (40, 20, 90)


@dataclass
class SyntheticCase:
    """A slide with one dark mark and a store whose attention is 1 on the tile over the mark.

    Level 0 is non-square and the tile side is not an integer number of level-0 pixels, so a
    thumbnail of at most 250 px has a non-integer downsample along both axes.
    """

    slide_path: Path
    store_path: Path
    coords: np.ndarray
    hot_row: int
    level0: tuple[int, int] = (3001, 1999)
    tile_px_level0: float = 150.4
    hot_tile: tuple[int, int] = (1950, 1200)
    hot_box: tuple[int, int, int, int] = (1950, 1200, 2100, 1350)
    mark_rgb: tuple[int, int, int] = MARK_RGB
    attrs: dict[str, Any] = field(default_factory=dict)


def write_pyramid_tiff(path: Path, image: np.ndarray, n_levels: int = 3) -> Path:
    """Write uint8 RGB [H, W, 3] as a tiled TIFF whose levels halve the size each time."""
    with tifffile.TiffWriter(path) as tif:
        level = image
        for index in range(n_levels):
            tif.write(
                level, tile=(128, 128), photometric="rgb", subfiletype=1 if index else 0,
                resolution=(40000.0, 40000.0), resolutionunit="CENTIMETER",
            )
            height, width = level.shape[:2]
            level = np.asarray(
                Image.fromarray(level).resize((width // 2, height // 2), Image.Resampling.BOX)
            )
    return path


def grid_coords(size: tuple[int, int], step: int, tile_px_level0: float) -> np.ndarray:
    """Level-0 (x, y) int64 [N, 2] of a regular grid of tiles that fit inside `size`."""
    xs = np.arange(0, size[0] - tile_px_level0 + 1, step, dtype=np.int64)
    ys = np.arange(0, size[1] - tile_px_level0 + 1, step, dtype=np.int64)
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def build_case(folder: Path, name: str = "synthetic", **attrs: Any) -> SyntheticCase:
    """Write `<name>.tif` and `<name>.h5` into `folder`; `attrs` override store attributes."""
    level0, tile_px_level0 = (3001, 1999), 150.4
    hot_tile, hot_box = (1950, 1200), (1950, 1200, 2100, 1350)
    image = np.empty((level0[1], level0[0], 3), dtype=np.uint8)
    image[:] = TISSUE_RGB
    image[hot_box[1]:hot_box[3], hot_box[0]:hot_box[2]] = MARK_RGB
    folder.mkdir(parents=True, exist_ok=True)
    slide_path = write_pyramid_tiff(folder / f"{name}.tif", image)

    coords = grid_coords(level0, 150, tile_px_level0)
    hot_row = int(np.flatnonzero((coords == hot_tile).all(axis=1))[0])
    attention = np.zeros(len(coords), dtype=np.float32)
    attention[hot_row] = 1.0
    store_attrs: dict[str, Any] = {
        "slide_id": name,
        "slide_path": str(slide_path),
        "tile_px_level0": tile_px_level0,
        "level0_width": level0[0],
        "level0_height": level0[1],
        "predicted_class": "tumour",
        "probability": 0.875,
        "classes": '["normal", "tumour"]',
        "model": "abmil",
        **attrs,
    }
    store_path = folder / f"{name}.h5"
    write_attention_store(store_path, attention, coords, store_attrs)
    return SyntheticCase(slide_path, store_path, coords, hot_row, attrs=store_attrs)


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCase:
    """One synthetic slide and its attention store, shared by the tests of a module."""
    return build_case(tmp_path_factory.mktemp("slide"))


@pytest.fixture
def make_case() -> Callable[..., SyntheticCase]:
    """Factory `make_case(folder, name, **store_attrs)` for extra synthetic slides."""
    return build_case
