"""Slides and files shared by the tiling tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = REPO_ROOT / "tests" / "data" / "slides"
SHARED_SLIDES = REPO_ROOT / ".." / "shared" / "data" / "slides"

CMU = BUNDLED / "cmu-1-small-region.svs"
TCGA = BUNDLED / "tcga-cr-7395-01a-01-ts1.svs"
DAPI = BUNDLED / "test3-DAPI-2-387.ndpi"


def shared_slide(relative: str) -> Path:
    """A slide from the shared data folder beside the checkout; skips the test if absent."""
    path = SHARED_SLIDES / relative
    if not path.is_file():
        pytest.skip(f"shared slide {relative} is absent")
    return path


def bundled(path: Path) -> Path:
    """A bundled slide; skips the test if the file was not checked out."""
    if not path.is_file():
        pytest.skip(f"bundled slide {path.name} is absent")
    return path


def corrupt_tile(path: Path, tile_index: int, page: int = 0) -> None:
    """Overwrite the middle of one compressed tile of `page` with garbage bytes."""
    with tifffile.TiffFile(path) as tiff:
        offset = tiff.pages[page].dataoffsets[tile_index]
        count = tiff.pages[page].databytecounts[tile_index]
    with path.open("r+b") as handle:
        handle.seek(offset + 2)
        handle.write(bytes(np.random.default_rng(0).integers(0, 256, max(1, count - 4), np.uint8)))


def copy_slide(source: Path, folder: Path, name: str | None = None) -> Path:
    """Copy a slide into `folder` (optionally renamed) and return the copy."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or source.name)
    shutil.copy(source, target)
    return target
