"""Shared test set-up: data locations and the `gpu` marker."""

from __future__ import annotations

import logging
from collections.abc import Iterator
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


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo the CLI's logging set-up after each test.

    `setup_logging` adds a rich handler to the root logger and sets the package levels. Left in
    place, the handler would capture later tests' progress bars, and a quiet level would hide
    their logs.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    packages = {name: logging.getLogger(name).level for name in ("cli", "mil", "preprocessing")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, package_level in packages.items():
        logging.getLogger(name).setLevel(package_level)
