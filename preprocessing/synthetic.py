"""Synthetic pyramidal TIFF slides for tests and benchmarks.

A slide is defined by a pattern: a function from level-0 pixel-centre coordinates to colours.
Every level is rendered from the same pattern at its own pixel centres, so a level with a
non-integer downsample shows exactly what level 0 shows at that spot, which makes coordinate
errors measurable. Levels are written tile by tile, so a 40,000 x 30,000 slide needs only a
few MB of memory.

Two layouts: ``pages`` (one TIFF page per level, read by OpenSlide as a generic tiled TIFF)
and ``subifds`` (reduced levels as SubIFDs of level 0, which OpenSlide does not read, so
slidemil falls back to tifffile).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile

#: Pattern: (x centres [W], y centres [H]) in level-0 pixels → samples [H, W, C].
Pattern = Callable[[np.ndarray, np.ndarray], np.ndarray]

WHITE = (255, 255, 255)


def checkerboard(
    square_px: float,
    colours: tuple[tuple[int, int, int], tuple[int, int, int]] = ((220, 60, 60), (40, 40, 160)),
) -> Pattern:
    """Squares of `square_px` level-0 pixels; square (i, j) has colour (i + j) % 2."""
    palette = np.asarray(colours, dtype=np.uint8)

    def render(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        column_parity = (np.floor(xs / square_px) % 2).astype(np.uint8)
        row_parity = (np.floor(ys / square_px) % 2).astype(np.uint8)
        return palette.take(row_parity[:, None] ^ column_parity[None, :], axis=0)

    return render


def tissue_blobs(
    width: int, height: int, count: int = 6, seed: int = 0, alpha_background: bool = False
) -> Pattern:
    """Pink and purple ellipses with texture on white glass (RGBA with transparent glass).

    The ellipses fill about a third of the slide; they stand in for H&E tissue sections.
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform((0.15 * width, 0.15 * height), (0.85 * width, 0.85 * height), (count, 2))
    radii = rng.uniform(0.06, 0.16, (count, 2)) * min(width, height)
    stains = np.asarray([(214, 120, 170), (150, 80, 160), (190, 100, 150)], dtype=np.float32)

    def render(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        inside = np.zeros((len(ys), len(xs)), dtype=bool)
        for (cx, cy), (rx, ry) in zip(centres, radii, strict=True):
            inside |= ((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2 <= 1.0
        texture = (np.sin(xs[None, :] / 7.0) * np.cos(ys[:, None] / 5.0) + 1.0) / 2.0
        stain = stains[0] * (1 - texture[..., None]) + stains[1] * texture[..., None]
        channels = 4 if alpha_background else 3
        out = np.full((len(ys), len(xs), channels), 255, dtype=np.uint8)
        out[..., :3][inside] = stain[inside].astype(np.uint8)
        if alpha_background:
            out[..., 3] = np.where(inside, 255, 0)
            out[..., :3][~inside] = 0  # transparent glass stored as black, as MIRAX does
        return out

    return render


def blank(noise: int = 4, seed: int = 0) -> Pattern:
    """Empty glass: near-white grey with a little noise."""
    rng = np.random.default_rng(seed)

    def render(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        values = 245 + rng.integers(-noise, noise + 1, (len(ys), len(xs), 1))
        return np.repeat(values, 3, axis=2).astype(np.uint8)

    return render


def level_shapes(width: int, height: int, downsamples: Sequence[float]) -> list[tuple[int, int]]:
    """(width, height) of each level for the requested downsamples (rounded, at least 1)."""
    return [(max(1, round(width / d)), max(1, round(height / d))) for d in downsamples]


def _tiles(
    pattern: Pattern,
    level_width: int,
    level_height: int,
    scale: tuple[float, float],
    tile: int,
    dtype: np.dtype,
    supersample: int,
) -> Iterator[np.ndarray]:
    """Tiles of one level in raster order; each pixel averages supersample² pattern samples."""
    sx, sy = scale
    k = supersample
    offsets = (np.arange(tile * k) + 0.5) / k
    for y0 in range(0, level_height, tile):
        ys = (y0 + offsets) * sy
        for x0 in range(0, level_width, tile):
            xs = (x0 + offsets) * sx
            samples = pattern(xs, ys)
            if k > 1:
                channels = samples.shape[2]
                blocks = samples.reshape(tile, k, tile, k, channels).astype(np.float32)
                samples = np.rint(blocks.mean(axis=(1, 3)))
            yield samples.astype(dtype, copy=False)


def write_synthetic_slide(
    path: Path,
    width: int,
    height: int,
    pattern: Pattern,
    *,
    downsamples: Sequence[float] = (1.0, 4.0, 16.0),
    mpp: float | None = 0.25,
    tile: int = 256,
    compression: str | None = "zlib",
    layout: Literal["pages", "subifds"] = "pages",
    dtype: str = "uint8",
    photometric: str | None = None,
    supersample: int = 1,
) -> Path:
    """Write a pyramidal tiled TIFF rendered from `pattern`.

    Args:
        path: output file.
        width, height: level-0 size in pixels.
        pattern: colour function (see `Pattern`); its channel count sets the samples per pixel.
        downsamples: requested downsample per level; actual ones follow from rounded sizes.
        mpp: µm per level-0 pixel, written as XResolution in pixels per centimetre; None
            writes no resolution tags.
        tile: TIFF tile side.
        compression: tifffile compression name (``zlib``, ``jpeg``) or None.
        layout: ``pages`` for OpenSlide's generic TIFF, ``subifds`` for the tifffile reader.
        dtype: sample type written (patterns render uint8; other types are scaled by 257).
        photometric: TIFF photometric; ``rgb`` for 3 or 4 samples, ``minisblack`` otherwise.
        supersample: pixels of reduced levels average supersample x supersample pattern
            samples, so edges fall between level pixels with sub-pixel accuracy. Level 0 is
            always point-sampled at pixel centres.
    """
    probe = pattern(np.asarray([0.5]), np.asarray([0.5]))
    samples = probe.shape[2]
    photometric = photometric or ("rgb" if samples >= 3 else "minisblack")
    extrasamples = ("unassalpha",) if samples in (2, 4) else None
    sample_dtype = np.dtype(dtype)
    render: Pattern = pattern
    if sample_dtype != np.uint8:
        render = lambda xs, ys: pattern(xs, ys).astype(sample_dtype) * 257  # noqa: E731

    shapes = level_shapes(width, height, downsamples)
    resolution = None if mpp is None else (10_000.0 / mpp, 10_000.0 / mpp)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=width * height * samples > 2**31) as writer:
        for index, (level_width, level_height) in enumerate(shapes):
            scale = (width / level_width, height / level_height)
            options: dict[str, object] = {
                "shape": (level_height, level_width, samples),
                "dtype": sample_dtype,
                "tile": (tile, tile),
                "photometric": photometric,
                "planarconfig": "contig" if samples > 1 else None,
                "compression": compression,
                "extrasamples": extrasamples,
                "metadata": None,
            }
            if samples in (1, 2):
                options["shape"] = (level_height, level_width) if samples == 1 else options["shape"]
            if index == 0:
                if resolution is not None:
                    options.update(resolution=resolution, resolutionunit="CENTIMETER")
                if layout == "subifds":
                    options["subifds"] = len(shapes) - 1
            else:
                options["subfiletype"] = 1
            k = supersample if index > 0 else 1
            tiles = _tiles(render, level_width, level_height, scale, tile, sample_dtype, k)
            if samples == 1:
                tiles = (t[..., 0] for t in tiles)
            writer.write(tiles, **options)  # type: ignore[arg-type]
    return path
