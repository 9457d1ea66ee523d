"""Shared test set-up: data locations and the `gpu` marker."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_SLIDES = REPO_ROOT / "tests" / "data" / "slides"
# Data that may not be redistributed lives beside the checkout; tests using it skip without it.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def bundled_slides() -> Path:
    """Folder of the four sample slides shipped with the repository."""
    return BUNDLED_SLIDES


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder beside the checkout; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA
