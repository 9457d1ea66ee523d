"""Whole slide image access in level-0 coordinates: `open_slide` and `Slide`.

All coordinates are level-0 pixels, top-left corner, (x, y) with x along the slide width.
Downsamples are floats as the file states them (2.0005 is not 2). Every pixel array returned
is 8-bit RGB [H, W, 3]; see `preprocessing.readers` for how other pixel formats are converted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from preprocessing.errors import MissingMppError, SlideOpenError
from preprocessing.inputs import slide_id_from_path
from preprocessing.mpp import MppResult, resolve_mpp
from preprocessing.readers import (
    BAND_PIXELS,
    Reader,
    ReaderChoice,
    capture_tifffile_messages,
    open_reader,
)

logger = logging.getLogger(__name__)

#: Resampling filter for tiles and thumbnails (antialiased when shrinking).
RESAMPLE = Image.Resampling.BICUBIC


class Slide:
    """An open slide. Use `open_slide` to create one; close it or use it as a context manager.

    Attributes:
        slide_id: file name minus its slide extension (or the id given to `open_slide`).
        path: slide file.
        reader: ``"openslide"`` or ``"tifffile"``.
        dimensions: (width, height) of level 0 in pixels.
        level_count: number of pyramid levels.
        level_dimensions: (width, height) per level.
        level_downsamples: level-0 pixels per level pixel, per level (floats).
        mpp: µm per level-0 pixel, or None when the fallback chain found nothing.
        mpp_source: property or tag that supplied `mpp`, ``override`` for user values.
        bounds: (x, y, width, height) of the scanned area in level-0 pixels (MIRAX and others
            state it; the whole level 0 otherwise).
        properties: reader metadata (OpenSlide property names; tifffile fills ``tiff.*``).
        problems: damage found while opening the file (tifffile warnings, data past the end of
            the file), one line each; empty for an intact file.
    """

    def __init__(self, reader: Reader, path: Path, slide_id: str, mpp: MppResult) -> None:
        self._reader = reader
        self.path = path
        self.slide_id = slide_id
        self.reader = reader.name
        self.level_dimensions = reader.level_dimensions
        self.level_downsamples = reader.level_downsamples
        self.level_count = len(reader.level_dimensions)
        self.dimensions = reader.level_dimensions[0]
        self.properties = reader.properties
        self.mpp = mpp.mpp
        self.mpp_source = mpp.source
        self.bounds = _bounds(reader.properties, self.dimensions)
        # Readers made outside this package may lack `problems`: none known then.
        self.problems: list[str] = list(getattr(reader, "problems", []))

    # Context manager -------------------------------------------------------------------------

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the file handle."""
        self._reader.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.slide_id!r}, reader={self.reader}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={self.mpp} from {self.mpp_source})"
        )

    # Resolution ------------------------------------------------------------------------------

    def require_mpp(self) -> float:
        """Return `mpp`, raising `MissingMppError` with the fixes when it is unknown."""
        if self.mpp is None:
            raise MissingMppError(
                f"{self.path}: no resolution found (checked openslide.mpp-x, TIFF "
                "XResolution/ResolutionUnit and vendor keys). Pass the µm per level-0 pixel "
                f"with --mpp, or add a row '{self.slide_id},<mpp>' to the --mpp-csv file."
            )
        return self.mpp

    def level_mpp(self, level: int) -> float:
        """µm per pixel of `level`."""
        return self.require_mpp() * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float, tolerance: float = 0.05) -> int:
        """Return the coarsest level whose mpp is at most `target_mpp * (1 + tolerance)`.

        That is the finest-enough level to read from before resizing to the target. When the
        target is finer than level 0, level 0 is returned (the tiles will be upsampled).
        """
        slide_mpp = self.require_mpp()
        limit = target_mpp * (1.0 + tolerance)
        candidates = [
            level
            for level, downsample in enumerate(self.level_downsamples)
            if slide_mpp * downsample <= limit
        ]
        return max(candidates, key=lambda level: self.level_downsamples[level], default=0)

    # Pixels ----------------------------------------------------------------------------------

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a region in OpenSlide's convention.

        Args:
            location: top-left (x, y) in level-0 pixels.
            level: pyramid level to read from.
            size: (width, height) in pixels of `level`.

        Returns:
            uint8 RGB [height, width, 3]; pixels outside the slide are white.

        Raises:
            TileReadError: the region cannot be decoded (the slide stays usable).
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} not in 0..{self.level_count - 1}")
        return self._reader.read_region(
            (int(location[0]), int(location[1])), level, (int(size[0]), int(size[1]))
        )

    def level_scale(self, level: int) -> tuple[float, float]:
        """Level-0 pixels per pixel of `level` along x and along y.

        Level sizes are rounded, so the two differ slightly from each other and from the single
        `level_downsamples` value (OpenSlide averages them). At the far edge of a 100,000-pixel
        slide that difference reaches a whole level pixel, so tile geometry uses these.
        """
        width, height = self.dimensions
        level_width, level_height = self.level_dimensions[level]
        return (width / level_width, height / level_height)

    def read_tile(
        self, x: int, y: int, tile_px_level0: float, read_level: int, tile_px: int
    ) -> np.ndarray:
        """Read the square tile whose level-0 footprint is [x, x + tile_px_level0) in x and y.

        The footprint is read from `read_level` and resized to `tile_px`. Its position in the
        level is computed per axis with sub-pixel precision, so tiles land on the right pixels
        at any float downsample, also at the far edge of a large slide.

        Returns:
            uint8 RGB [tile_px, tile_px, 3].
        """
        scale_x, scale_y = self.level_scale(read_level)
        downsample = self.level_downsamples[read_level]
        start_x, start_y = x / scale_x, y / scale_y  # footprint start in level pixels
        # Level-0 location whose region starts at or just before the footprint.
        location = (math.floor(start_x * downsample), math.floor(start_y * downsample))
        origin_x, origin_y = self._reader.level_origin(location, read_level)
        offset_x, offset_y = max(0.0, start_x - origin_x), max(0.0, start_y - origin_y)
        size_x, size_y = tile_px_level0 / scale_x, tile_px_level0 / scale_y
        width = max(1, math.ceil(offset_x + size_x - 1e-9))
        height = max(1, math.ceil(offset_y + size_y - 1e-9))
        region = self.read_region(location, read_level, (width, height))

        if offset_x == offset_y == 0.0 and width == height == tile_px:
            return region
        box = (offset_x, offset_y, offset_x + size_x, offset_y + size_y)
        image = Image.fromarray(region).resize((tile_px, tile_px), RESAMPLE, box=box)
        return np.asarray(image)

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """Return the whole level-0 extent shrunk so that its longer side is `max_size` pixels.

        Level-0 pixels per thumbnail pixel are ``dimensions[0] / thumbnail.shape[1]``.

        Returns:
            uint8 RGB [h, w, 3] with max(h, w) == max_size (or the level-0 size if smaller).
        """
        width, height = self.dimensions
        downsample = max(1.0, max(width, height) / max_size)
        return self.get_downsampled(downsample)

    def get_downsampled(self, downsample: float) -> np.ndarray:
        """Return the whole level-0 extent at `downsample` level-0 pixels per output pixel.

        Reads the coarsest level at or below `downsample` in bands, block-averages each band by
        the integer part of the remaining factor and resizes the result, so peak memory stays
        near `BAND_PIXELS` even on single-level slides.

        Returns:
            uint8 RGB [round(height / downsample), round(width / downsample), 3] (at least 1x1).
        """
        width, height = self.dimensions
        out_size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        level = max(
            (i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-6)),
            key=lambda i: self.level_downsamples[i],
            default=0,
        )
        level_width, level_height = self.level_dimensions[level]
        factor = max(1, int(downsample / self.level_downsamples[level]))
        rows = max(factor, (BAND_PIXELS // max(level_width, 1)) // factor * factor)
        level_ds = self.level_downsamples[level]

        bands = []
        for y0 in range(0, level_height, rows):
            band_rows = min(rows, level_height - y0)
            band = self.read_region((0, round(y0 * level_ds)), level, (level_width, band_rows))
            bands.append(_block_mean(band, factor))
        reduced = np.concatenate(bands, axis=0)
        if (reduced.shape[1], reduced.shape[0]) == out_size:
            return reduced
        return np.asarray(Image.fromarray(reduced).resize(out_size, RESAMPLE))


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Average `factor` x `factor` blocks of uint8 [H, W, 3]; edge blocks average their pixels."""
    if factor == 1:
        return image
    return np.asarray(Image.fromarray(image).reduce(factor))


def _bounds(
    properties: Mapping[str, str], dimensions: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Scanned area (x, y, width, height) in level-0 pixels from ``openslide.bounds-*``."""
    width, height = dimensions
    try:
        x = int(properties.get("openslide.bounds-x", 0))
        y = int(properties.get("openslide.bounds-y", 0))
        w = int(properties.get("openslide.bounds-width", width))
        h = int(properties.get("openslide.bounds-height", height))
    except ValueError:
        logger.warning("Ignoring unreadable openslide.bounds-* properties: %s", properties)
        return (0, 0, width, height)
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        return (0, 0, width, height)
    return (x0, y0, x1 - x0, y1 - y0)


def open_slide(
    path: str | Path,
    mpp: float | None = None,
    *,
    default_mpp: float | None = None,
    slide_id: str | None = None,
    reader: ReaderChoice = "auto",
) -> Slide:
    """Open a whole slide image with OpenSlide, falling back to tifffile for plain TIFFs.

    Args:
        path: slide file.
        mpp: µm per level-0 pixel that overrides the file's metadata (``mpp_source="override"``).
        default_mpp: µm per level-0 pixel used only when the file carries none.
        slide_id: id for messages and outputs; the file name minus its slide extension if None.
        reader: ``auto`` (OpenSlide, tifffile for TIFFs OpenSlide rejects or reads lossily),
            ``openslide`` or ``tifffile``.

    Returns:
        An open `Slide`. Its `mpp` is None when nothing was found; `Slide.require_mpp` raises.

    Raises:
        SlideOpenError: the file is missing, unsupported or unreadable.
    """
    slide_path = Path(path)
    if not slide_path.exists():
        raise SlideOpenError(f"{slide_path}: file not found. Check the path in the slide list.")
    if slide_path.is_dir():
        raise SlideOpenError(
            f"{slide_path}: is a folder, not a slide file. For DICOM pass one .dcm file of the "
            "series; for MIRAX pass the .mrxs file."
        )
    name = slide_id or slide_id_from_path(slide_path)
    with capture_tifffile_messages() as tifffile_messages:
        try:
            pixel_reader = open_reader(slide_path, reader)
        finally:
            for message in tifffile_messages:
                logger.warning("%s: %s: tifffile: %s", name, slide_path, message)
    for problem in pixel_reader.problems:
        logger.warning("%s: %s: %s", name, slide_path, problem)
    try:
        mpp_result = resolve_mpp(pixel_reader.properties, override=mpp, default=default_mpp)
    except ValueError as err:
        pixel_reader.close()
        raise SlideOpenError(f"{slide_path}: {err}") from err
    for note in mpp_result.rejected:
        logger.warning("%s: skipped resolution metadata: %s", slide_path, note)
    opened = Slide(pixel_reader, slide_path, name, mpp_result)
    opened.problems = [f"tifffile: {message}" for message in tifffile_messages] + opened.problems
    return opened
