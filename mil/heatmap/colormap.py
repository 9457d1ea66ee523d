"""Colour maps as 256-entry lookup tables built from evenly spaced anchor colours."""

from __future__ import annotations

from enum import StrEnum
from functools import cache

import numpy as np


class Colormap(StrEnum):
    """Colour maps for scores in [0, 1]; the first colour is the lowest score."""

    viridis = "viridis"
    inferno = "inferno"
    coolwarm = "coolwarm"
    jet = "jet"


# Evenly spaced samples of each map, from low to high. The lookup table interpolates linearly
# between them, which is close enough to the published maps for a heatmap overlay.
_ANCHORS: dict[Colormap, tuple[str, ...]] = {
    Colormap.viridis: (
        "440154", "482878", "3e4989", "31688e", "26828e",
        "1f9e89", "35b779", "6ece58", "b5de2b", "fde725",
    ),
    Colormap.inferno: (
        "000004", "1b0c41", "4a0c6b", "781c6d", "a52c60",
        "cf4446", "ed6925", "fb9b06", "f7d13d", "fcffa4",
    ),
    Colormap.coolwarm: (
        "3b4cc0", "6788ee", "9abbff", "c9d7f0", "dddddd",
        "edd1c2", "f7a889", "e26952", "b40426",
    ),
    Colormap.jet: (
        "00007f", "0000ff", "007fff", "00ffff", "7fff7f",
        "ffff00", "ff7f00", "ff0000", "7f0000",
    ),
}


@cache
def colormap_lut(name: Colormap | str) -> np.ndarray:
    """Lookup table uint8 [256, 3] (RGB) of colour map `name`."""
    anchors = np.array(
        [[int(code[i : i + 2], 16) for i in (0, 2, 4)] for code in _ANCHORS[Colormap(name)]],
        dtype=np.float64,
    )
    positions = np.linspace(0.0, 1.0, len(anchors))
    samples = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(samples, positions, anchors[:, c]) for c in range(3)], axis=1)
    lut = np.rint(lut).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def apply_colormap(values: np.ndarray, name: Colormap | str) -> np.ndarray:
    """Colour `values` in [0, 1] of any shape S; returns uint8 [*S, 3] RGB.

    Values outside [0, 1] are clipped; NaN takes the lowest colour.
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    index = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.intp)
    return colormap_lut(name)[index]


def color_hex(rgb: np.ndarray | tuple[int, int, int]) -> str:
    """'#rrggbb' of one RGB colour."""
    red, green, blue = (int(channel) for channel in rgb)
    return f"#{red:02x}{green:02x}{blue:02x}"
