"""QC thumbnail: the slide with its tissue outline and the kept tile grid drawn on top."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from preprocessing.contours import Ring

TISSUE_COLOUR = (0, 170, 0)
TILE_COLOUR = (255, 140, 0)
#: QC images smaller than this on their longer side are enlarged so tiles stay visible.
MIN_QC_SIDE = 768


def draw_qc(
    thumbnail: np.ndarray,
    polygons: list[list[Ring]],
    coords: np.ndarray,
    tile_px_level0: float,
    scale: tuple[float, float],
) -> Image.Image:
    """Draw tissue contours and tile outlines on a copy of the thumbnail.

    Args:
        thumbnail: uint8 RGB [h, w, 3] covering the level-0 extent.
        polygons: tissue polygons in thumbnail pixels (`contours.mask_polygons`).
        coords: int [N, 2] level-0 (x, y) of the kept tiles.
        tile_px_level0: tile footprint side at level 0.
        scale: level-0 pixels per thumbnail pixel along x and y.
    """
    height, width = thumbnail.shape[:2]
    zoom = max(1, int(np.ceil(MIN_QC_SIDE / max(height, width))))
    image = Image.fromarray(thumbnail).convert("RGB")
    if zoom > 1:
        image = image.resize((width * zoom, height * zoom), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)

    sx, sy = scale[0] / zoom, scale[1] / zoom
    tile_w, tile_h = tile_px_level0 / sx, tile_px_level0 / sy
    for x, y in np.asarray(coords).tolist():
        left, top = x / sx, y / sy
        draw.rectangle((left, top, left + tile_w, top + tile_h), outline=TILE_COLOUR, width=1)
    line_width = max(2, zoom)
    for polygon in polygons:
        for ring in polygon:
            points = [(x * zoom, y * zoom) for x, y in ring]
            draw.line(points, fill=TISSUE_COLOUR, width=line_width, joint="curve")
    return image


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG", optimize=False)
    os.replace(tmp, path)
