"""QC thumbnail: the slide with its tissue outline, the kept tile grid and a caption."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from preprocessing.contours import Ring

TISSUE_COLOUR = (0, 170, 0)
TILE_COLOUR = (255, 140, 0)
CAPTION_BACKGROUND = (255, 255, 255)
CAPTION_TEXT = (0, 0, 0)
#: QC images smaller than this on their longer side are enlarged so tiles stay visible.
MIN_QC_SIDE = 768
#: Percentiles of the brightest channel mapped to black and white by `stretch_contrast`.
STRETCH_PERCENTILES = (1.0, 99.5)
CAPTION_FONT_PX = 14
CAPTION_MARGIN_PX = 6


def stretch_contrast(thumbnail: np.ndarray) -> np.ndarray:
    """Stretch a dark uint8 RGB [h, w, 3] image linearly for display; returns uint8 [h, w, 3].

    The `STRETCH_PERCENTILES` of the brightest channel become 0 and 255, and all channels are
    scaled alike, so hues are kept. Fluorescence scans use a few percent of the 0..255 range
    and look black otherwise. Only the QC image is stretched; tissue detection sees raw values.
    """
    brightness = thumbnail.max(axis=2)
    low, high = np.percentile(brightness, STRETCH_PERCENTILES)
    if high <= low:
        return thumbnail.copy()
    scaled = (thumbnail.astype(np.float32) - float(low)) * (255.0 / float(high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def draw_qc(
    thumbnail: np.ndarray,
    polygons: list[list[Ring]],
    coords: np.ndarray,
    tile_px_level0: float,
    scale: tuple[float, float],
    caption: str = "",
) -> Image.Image:
    """Draw tissue contours and tile outlines on a copy of the thumbnail, with a caption below.

    Args:
        thumbnail: uint8 RGB [h, w, 3] covering the level-0 extent, already contrast-stretched
            if it should be (`stretch_contrast`).
        polygons: tissue polygons in thumbnail pixels (`contours.mask_polygons`).
        coords: int [N, 2] level-0 (x, y) of the kept tiles.
        tile_px_level0: tile footprint side at level 0.
        scale: level-0 pixels per thumbnail pixel along x and y.
        caption: text written in a white strip under the image; no strip when empty.
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
    return add_caption(image, caption) if caption else image


def add_caption(image: Image.Image, caption: str) -> Image.Image:
    """Return `image` with `caption` in a white strip below it, wrapped to the image width."""
    font = ImageFont.load_default(size=CAPTION_FONT_PX)
    lines = _wrap(caption, font, image.width - 2 * CAPTION_MARGIN_PX)
    line_height = CAPTION_FONT_PX + 4
    strip_height = len(lines) * line_height + 2 * CAPTION_MARGIN_PX
    canvas = Image.new("RGB", (image.width, image.height + strip_height), CAPTION_BACKGROUND)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        top = image.height + CAPTION_MARGIN_PX + index * line_height
        draw.text((CAPTION_MARGIN_PX, top), line, fill=CAPTION_TEXT, font=font)
    return canvas


def _wrap(
    text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, max_width: int
) -> list[str]:
    """Split `text` at spaces into lines that fit `max_width` pixels (a longer word stays whole)."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and font.getlength(candidate) > max_width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG", optimize=False)
    os.replace(tmp, path)
