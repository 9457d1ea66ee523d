"""Synthetic feature stores and label files for training and prediction tests.

Slides of class "tumor" hold a few tiles whose features are shifted along one direction, the
others hold only background tiles, so an attention model can learn the task in a few epochs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from preprocessing.stores import FeatureStoreWriter

DIM = 8


def write_slides(
    folder: Path,
    n_slides: int = 16,
    dim: int = DIM,
    seed: int = 0,
    min_tiles: int = 6,
    max_tiles: int = 40,
) -> dict[str, str]:
    """Write `n_slides` feature stores; returns slide id -> label ("normal" or "tumor")."""
    rng = np.random.default_rng(seed)
    labels = {}
    for index in range(n_slides):
        slide_id = f"slide-{index:02d}"
        label = "tumor" if index % 2 else "normal"
        n_tiles = int(rng.integers(min_tiles, max_tiles + 1))
        features = rng.normal(size=(n_tiles, dim)).astype(np.float32)
        if label == "tumor":
            positives = rng.choice(n_tiles, size=max(1, n_tiles // 4), replace=False)
            features[positives, 0] += 3.0
        coords = np.stack([np.arange(n_tiles) % 8 * 256, np.arange(n_tiles) // 8 * 256], 1)
        attrs = {
            "slide_path": f"/slides/{slide_id}.svs", "tile_px": 224, "tile_px_level0": 256.0,
            "level0_width": 4096, "level0_height": 2048, "backbone": "synthetic",
        }
        with FeatureStoreWriter(folder / f"{slide_id}.h5", n_tiles, dim, coords, attrs,
                                dtype="float32") as writer:
            writer.write(0, features)
        labels[slide_id] = label
    return labels


def write_labels(path: Path, labels: dict[str, str], splits: dict[str, str] | None = None) -> Path:
    """Write a label CSV (slide_id, label[, split])."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label"] + (["split"] if splits else []))
        for slide_id, label in labels.items():
            writer.writerow([slide_id, label] + ([splits[slide_id]] if splits else []))
    return path
