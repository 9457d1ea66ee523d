"""Helpers that describe the content of the test feature stores."""

from __future__ import annotations

import numpy as np


def grid_coords(n_tiles: int, tile_px: int = 224) -> np.ndarray:
    """Level-0 (x, y) of `n_tiles` tiles on a 10-column grid, int64 [N, 2]."""
    index = np.arange(n_tiles)
    return np.stack([index % 10 * tile_px, index // 10 * tile_px], axis=1).astype(np.int64)


def store_features(slide_id: str, n_tiles: int, dim: int) -> np.ndarray:
    """Float32 [N, D] features whose column c of row r is `r + c / 4 + a per-slide offset`.

    Every row is distinct, so a test can tell from a feature row which store row it came from.
    """
    offset = (sum(map(ord, slide_id)) % 97) / 1024
    rows = np.arange(n_tiles, dtype=np.float32)[:, None] + offset
    return np.repeat(rows, dim, axis=1) + np.arange(dim, dtype=np.float32) / 4
