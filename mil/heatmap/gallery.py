"""Galleries of the tiles with the highest and the lowest attention, read from the slide."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
#: Colour of the 1-pixel frame around each tile, which shows its full square footprint even
#: where the footprint reaches past the slide edge and is white.
FRAME_COLOR = (140, 150, 170)
#: Colour of the slide outside level 0, as the slide readers return it.
OUTSIDE_COLOR = (255, 255, 255)


class TileSource(Protocol):
    """Slide interface the gallery reads tiles through (`preprocessing.slide.Slide` fits)."""

    def read_tile(
        self, x: int, y: int, tile_px_level0: float, read_level: int, tile_px: int
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class GalleryTile:
    """One tile of the gallery.

    Attributes:
        group: "highest" or "lowest".
        rank: 1 for the most (group "highest") or least (group "lowest") attended tile.
        row: row of the tile in the attention store.
        x: level-0 x of the top-left corner.
        y: level-0 y of the top-left corner.
        score: attention score as stored.
        normalized: score after normalisation, in [0, 1].
    """

    group: str
    rank: int
    row: int
    x: int
    y: int
    score: float
    normalized: float


def select_extreme_tiles(
    scores: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the k highest (descending) and k lowest (ascending) scores.

    Ties keep store order. When the slide has fewer than 2k tiles the two groups share rows.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    k = max(0, min(int(k), scores.shape[0]))
    descending = np.argsort(-scores, kind="stable")
    ascending = np.argsort(scores, kind="stable")
    return descending[:k], ascending[:k]


def gallery_tiles(
    coords: np.ndarray,
    scores: np.ndarray,
    normalized: np.ndarray,
    rows: np.ndarray,
    group: str,
    store_rows: np.ndarray | None = None,
) -> list[GalleryTile]:
    """Describe the tiles at `rows` of the given arrays; `store_rows` maps to store rows."""
    out = []
    for rank, row in enumerate(np.asarray(rows).tolist(), start=1):
        out.append(
            GalleryTile(
                group=group,
                rank=rank,
                row=int(store_rows[row]) if store_rows is not None else int(row),
                x=int(coords[row, 0]),
                y=int(coords[row, 1]),
                score=float(scores[row]),
                normalized=float(normalized[row]),
            )
        )
    return out


def square_tile(
    pixels: np.ndarray,
    x: int,
    y: int,
    tile_px_level0: float,
    tile_px: int,
    level0_size: tuple[int, int] | None,
) -> np.ndarray:
    """Return the tile as uint8 RGB [tile_px, tile_px, 3], white wherever it lies past the slide.

    The slide readers already return white outside level 0. A tile that comes back smaller
    than `tile_px` (a reader that crops at the edge) is placed at its top-left corner on white.
    With `level0_size`, the part of the footprint past the slide's right or bottom edge is set
    to white whatever the reader returned there.
    """
    square = np.empty((tile_px, tile_px, 3), dtype=np.uint8)
    square[:] = OUTSIDE_COLOR
    rgb = np.asarray(pixels)[..., :3]
    height, width = min(rgb.shape[0], tile_px), min(rgb.shape[1], tile_px)
    square[:height, :width] = rgb[:height, :width]
    if level0_size is not None:
        scale = tile_px / tile_px_level0
        inside_x = math.ceil((level0_size[0] - x) * scale - 1e-6)
        inside_y = math.ceil((level0_size[1] - y) * scale - 1e-6)
        square[:, max(0, inside_x):] = OUTSIDE_COLOR
        square[max(0, inside_y):, :] = OUTSIDE_COLOR
    return square


def crosses_edge(tile: GalleryTile, tile_px_level0: float, level0_size: tuple[int, int]) -> bool:
    """True when the tile's footprint reaches past the right or bottom edge of level 0."""
    return (
        tile.x + tile_px_level0 > level0_size[0] or tile.y + tile_px_level0 > level0_size[1]
    )


def render_gallery(
    slide: TileSource,
    tiles: Sequence[GalleryTile],
    tile_px_level0: float,
    tile_px: int = 192,
    read_level: int = 0,
    columns: int = 8,
    title: str = "",
    normalized_label: str = "percentile",
) -> Image.Image:
    """Read each tile from the slide and lay them out in a labelled grid.

    Tiles are read at `read_level` (0 = full resolution) over their level-0 footprint and
    resized to `tile_px` pixels, so memory is bounded by one footprint at a time. Every tile is
    drawn square at its full footprint inside a thin frame. The part of a footprint past the
    slide edge is white, and the title notes it when a tile has such a part.

    Args:
        slide: reader with `read_tile`; its `dimensions` (level-0 width, height), when
            present, mark the part of edge tiles past the slide.
        tiles: tiles in display order; each group starts a new block of rows.
        tile_px_level0: tile side in level-0 pixels.
        tile_px: side of each tile in the gallery, in pixels.
        read_level: pyramid level the pixels are read from.
        columns: tiles per row.
        title: line of text above the grid.
        normalized_label: short name of the normalised value printed under each tile;
            "percentile" prints it in percent.

    Returns:
        RGB image.
    """
    font_px = max(11, tile_px // 14)
    font = ImageFont.load_default(size=font_px)
    pad = max(4, font_px // 2)
    label_height = 3 * (font_px + 2)
    cell_width = tile_px + pad
    cell_height = tile_px + label_height + pad
    groups: dict[str, list[GalleryTile]] = {}
    for tile in tiles:
        groups.setdefault(tile.group, []).append(tile)
    dimensions = getattr(slide, "dimensions", None)
    level0_size = (int(dimensions[0]), int(dimensions[1])) if dimensions is not None else None
    if title and level0_size is not None and any(
        crosses_edge(tile, tile_px_level0, level0_size) for tile in tiles
    ):
        title += " (white: past the slide edge)"
    columns = max(1, min(columns, max((len(members) for members in groups.values()), default=1)))

    header = font_px + 2 * pad
    block_rows = [max(1, -(-len(members) // columns)) for members in groups.values()]
    width = pad + columns * cell_width
    height = (header if title else 0) + sum(header + n * cell_height for n in block_rows) + pad
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    top = pad
    if title:
        draw.text((pad, top), title, fill=TEXT_COLOR, font=font)
        top += header
    for (group, members), n_rows in zip(groups.items(), block_rows, strict=True):
        draw.text((pad, top), f"{group} attention", fill=TEXT_COLOR, font=font)
        top += header
        for index, tile in enumerate(members):
            left = pad + (index % columns) * cell_width
            cell_top = top + (index // columns) * cell_height
            pixels = square_tile(
                slide.read_tile(tile.x, tile.y, tile_px_level0, read_level, tile_px),
                tile.x, tile.y, tile_px_level0, tile_px, level0_size,
            )
            image.paste(Image.fromarray(pixels), (left, cell_top))
            draw.rectangle(
                (left - 1, cell_top - 1, left + tile_px, cell_top + tile_px), outline=FRAME_COLOR
            )
            if normalized_label == "percentile":
                normalized_text = f"percentile {100 * tile.normalized:.1f}"
            else:
                normalized_text = f"{normalized_label} {tile.normalized:.3f}"
            lines = (f"#{tile.rank}  score {tile.score:.4g}", normalized_text,
                     f"x={tile.x} y={tile.y}")
            for line_index, line in enumerate(lines):
                draw.text(
                    (left, cell_top + tile_px + 2 + line_index * (font_px + 2)),
                    line, fill=TEXT_COLOR, font=font,
                )
        top += n_rows * cell_height
    return image


def write_gallery_csv(path: Path, tiles: Sequence[GalleryTile], tile_px_level0: float) -> None:
    """Write the gallery's tiles with level-0 boxes to a CSV file, atomically."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                ["group", "rank", "row", "x", "y", "tile_px_level0", "score", "normalized"]
            )
            for tile in tiles:
                writer.writerow([
                    tile.group, tile.rank, tile.row, tile.x, tile.y, f"{tile_px_level0:g}",
                    f"{tile.score:.6g}", f"{tile.normalized:.6f}",
                ])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
