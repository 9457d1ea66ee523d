"""Pixel readers behind `Slide`: OpenSlide first, tifffile for TIFFs that OpenSlide rejects.

Both readers return regions as 8-bit RGB arrays in (row, column, channel) order, so nothing past
this module sees alpha, greyscale, planar channels or 16-bit samples:

- RGBA is composited on white using its alpha (transparent MRXS/DICOM background becomes white);
- greyscale is replicated into three channels;
- 16-bit and float samples are scaled linearly from the slide's real value range (measured once
  on the smallest level) to 0..255;
- more than three colour channels (multiplex fluorescence) raise `SlideOpenError`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import openslide
import tifffile

from preprocessing.errors import SlideOpenError, TileReadError

logger = logging.getLogger(__name__)

#: Pixels per band when a whole level is scanned (value range, thumbnails); bounds peak memory.
BAND_PIXELS = 8_000_000


class Reader(Protocol):
    """Interface of the pixel readers behind `Slide`; `location` is always level-0 (x, y)."""

    name: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]
    #: Damage found while opening the file (for example data past its end), one line each.
    problems: list[str]

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray: ...

    def level_origin(self, location: tuple[int, int], level: int) -> tuple[float, float]:
        """Level-space (x, y) of the first pixel `read_region(location, level, ...)` returns."""
        ...

    def close(self) -> None: ...


def composite_rgba_on_white(rgba: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """Composite RGBA uint8 [H, W, 4] on a white background, returning RGB uint8 [H, W, 3]."""
    alpha = rgba[..., 3:4]
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint32)
    transparent = 255 - alpha.astype(np.uint32)
    # Integer arithmetic in 1/255 units; + 127 rounds to nearest.
    if premultiplied:
        out = rgb + transparent
    else:
        out = (rgb * alpha + 255 * transparent + 127) // 255
    return np.minimum(out, 255).astype(np.uint8)


def to_rgb8(
    pixels: np.ndarray,
    *,
    value_range: tuple[float, float] | None = None,
    alpha: str | None = None,
    source: str = "slide",
) -> np.ndarray:
    """Convert a region to 8-bit RGB.

    Args:
        pixels: [H, W] or [H, W, C] with C in 1..4, any integer or float dtype.
        value_range: (low, high) sample values mapped to 0 and 255 for non-uint8 input; the
            dtype's full range when None.
        alpha: ``"unassociated"`` or ``"associated"`` when the last of 2 or 4 channels is alpha,
            None when there is no alpha channel.
        source: slide path for error messages.

    Returns:
        uint8 [H, W, 3].
    """
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[2]
    has_alpha = alpha is not None and channels in (2, 4)
    colour_channels = channels - 1 if has_alpha else channels
    if colour_channels not in (1, 3):
        raise SlideOpenError(
            f"{source}: {colour_channels} colour channels per pixel; slidemil reads greyscale or "
            "RGB slides only. Convert multiplex images to RGB (pick 3 channels) before tiling."
        )

    colour = _scale_to_uint8(pixels[..., :colour_channels], value_range)
    if colour_channels == 1:
        colour = np.repeat(colour, 3, axis=2)
    if not has_alpha:
        return np.ascontiguousarray(colour)
    alpha_u8 = _scale_to_uint8(pixels[..., channels - 1 :], None)
    rgba = np.concatenate([colour, alpha_u8], axis=2)
    return composite_rgba_on_white(rgba, premultiplied=alpha == "associated")


def _scale_to_uint8(samples: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    if samples.dtype == np.uint8:
        return samples
    if value_range is None:
        if np.issubdtype(samples.dtype, np.integer):
            info = np.iinfo(samples.dtype)
            value_range = (float(info.min), float(info.max))
        else:
            value_range = (0.0, 1.0)
    low, high = value_range
    scale = 255.0 / (high - low) if high > low else 0.0
    scaled = (samples.astype(np.float32) - np.float32(low)) * np.float32(scale)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


class OpenSlideReader:
    """Reader over openslide-python (every format OpenSlide supports)."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._handle: openslide.OpenSlide | None = openslide.OpenSlide(str(path))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._handle.level_downsamples)
        self.properties: Mapping[str, str] = dict(self._handle.properties)
        self.problems: list[str] = []

    def _slide(self) -> openslide.OpenSlide:
        # OpenSlide errors are sticky: after one failed read every call on the handle fails,
        # so a handle that raised is dropped and the file opened again for the next read.
        if self._handle is None:
            self._handle = openslide.OpenSlide(str(self._path))
        return self._handle

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        try:
            image = self._slide().read_region(location, level, size)
        except openslide.OpenSlideError as err:
            self.close()
            raise TileReadError(
                f"{self._path}: OpenSlide failed to decode the region at level-0 {location}, "
                f"level {level}, size {size}: {err}. The file is probably corrupt at this spot; "
                "re-export or re-scan the slide if many regions fail."
            ) from err
        return composite_rgba_on_white(np.asarray(image))

    def level_origin(self, location: tuple[int, int], level: int) -> tuple[float, float]:
        # OpenSlide divides by the downsample and paints at the fractional position, with
        # bilinear interpolation.
        downsample = self.level_downsamples[level]
        return (location[0] / downsample, location[1] / downsample)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class TiffReader:
    """Reader over tifffile for plain, strip-based or non-pyramidal TIFFs.

    Uses the first image series and its pyramid levels (SubIFDs or reduced pages). Regions are
    read through tifffile's Zarr view, so only the strips or tiles under a region are decoded.
    """

    name = "tifffile"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._tiff = tifffile.TiffFile(str(path))
        try:
            self._init_levels()
            self.problems: list[str] = _data_past_end_of_file(self._tiff, path)
        except Exception:
            self._tiff.close()
            raise

    def _init_levels(self) -> None:
        import zarr  # imported here: only the tifffile reader needs it, and it loads slowly

        series = self._tiff.series[0]
        page = series.keyframe
        self._axes_order, self._channels = _yxc_axes(series.axes, series.shape, self._path)
        extra_samples = tuple(np.atleast_1d(page.extrasamples)) if page.extrasamples else ()
        self._alpha = {1: "associated", 2: "unassociated"}.get(
            int(extra_samples[0]) if extra_samples else 0
        )
        if self._alpha is None and self._channels in (2, 4):
            # ExtraSamples "unspecified" (0) on a 4th channel is how most writers store RGBA.
            self._alpha = "unassociated" if extra_samples or self._channels == 2 else None

        self._levels: list[Any] = []
        dimensions: list[tuple[int, int]] = []
        for level_series, index in self._pyramid(series):
            level = level_series.levels[index]
            order, _ = _yxc_axes(level.axes, level.shape, self._path)
            if order != self._axes_order:
                raise SlideOpenError(
                    f"{self._path}: pyramid levels store their axes differently "
                    f"({series.axes!r} and {level.axes!r}); re-export the slide."
                )
            dimensions.append((int(level.shape[order[1]]), int(level.shape[order[0]])))
            self._levels.append(zarr.open(level_series.aszarr(level=index), mode="r"))
        self.level_dimensions = tuple(dimensions)
        width0, height0 = dimensions[0]
        self.level_downsamples = tuple((width0 / w + height0 / h) / 2.0 for w, h in dimensions)
        self.properties: Mapping[str, str] = _tiff_properties(page)
        self._value_range: tuple[float, float] | None = None
        if np.dtype(series.dtype) != np.uint8:
            self._value_range = self._measure_value_range()
            logger.info(
                "%s: %s samples scaled from their range %s to 0..255",
                self._path,
                series.dtype,
                self._value_range,
            )

    def _pyramid(self, series: Any) -> list[tuple[Any, int]]:
        """(series, level index) of each pyramid level, finest first.

        tifffile groups levels itself for most layouts, but not for reduced pages or SubIFDs
        with non-integer downsamples. In that case, later series flagged as reduced-resolution
        images with level 0's axes and aspect ratio become further levels.
        """
        levels = [(series, index) for index in range(len(series.levels))]
        if len(levels) > 1:
            return levels
        height0, width0 = (series.shape[series.axes.index(a)] for a in "YX")
        previous_width = width0
        for other in self._tiff.series[1:]:
            if other.axes != series.axes or not other.keyframe.subfiletype & 1:
                continue
            if [n for a, n in zip(other.axes, other.shape, strict=True) if a not in "YX"] != [
                n for a, n in zip(series.axes, series.shape, strict=True) if a not in "YX"
            ]:
                continue
            height, width = (other.shape[other.axes.index(a)] for a in "YX")
            if width >= previous_width or abs(width / height - width0 / height0) > 0.02 * (
                width0 / height0
            ):
                continue
            levels.append((other, 0))
            previous_width = width
        return levels

    def _raw_region(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Samples of level `level` inside [x0, x1) x [y0, y1), as [H, W, C] (C may be 1)."""
        array = self._levels[level]
        index: list[Any] = [0] * array.ndim
        order = self._axes_order
        index[order[0]] = slice(y0, y1)
        index[order[1]] = slice(x0, x1)
        if len(order) == 3:
            index[order[2]] = slice(None)
        data = np.asarray(array[tuple(index)])
        sliced_axes = [axis for axis in range(array.ndim) if isinstance(index[axis], slice)]
        data = np.transpose(data, [sliced_axes.index(axis) for axis in order])
        return data if data.ndim == 3 else data[..., None]

    def _measure_value_range(self) -> tuple[float, float]:
        # NOTE: a single-level wide-sample TIFF is decoded once in full here (in bands).
        level = len(self._levels) - 1
        width, height = self.level_dimensions[level]
        rows = max(1, BAND_PIXELS // max(width, 1))
        low, high = math.inf, -math.inf
        colour = self._channels - (1 if self._alpha else 0)
        for y0 in range(0, height, rows):
            band = self._raw_region(level, 0, y0, width, min(height, y0 + rows))[..., :colour]
            finite = band[np.isfinite(band)] if band.dtype.kind == "f" else band
            if finite.size:
                low = min(low, float(finite.min()))
                high = max(high, float(finite.max()))
        if not math.isfinite(low):
            return (0.0, 1.0)
        return (low, high)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        width, height = size
        level_width, level_height = self.level_dimensions[level]
        origin_x, origin_y = self.level_origin(location, level)
        x0, y0 = int(origin_x), int(origin_y)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + width, level_width), min(y0 + height, level_height)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        try:
            raw = self._raw_region(level, cx0, cy0, cx1, cy1)
        except Exception as err:  # noqa: BLE001 - codecs raise many unrelated types
            raise TileReadError(
                f"{self._path}: tifffile failed to decode the region at level-0 {location}, "
                f"level {level}, size {size}: {type(err).__name__}: {err}. The file is probably "
                "corrupt or uses an unsupported compression; re-export it as a tiled TIFF."
            ) from err
        rgb = to_rgb8(raw, value_range=self._value_range, alpha=self._alpha, source=str(self._path))
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = rgb
        return out

    def level_origin(self, location: tuple[int, int], level: int) -> tuple[float, float]:
        # Whole level pixels only: the region starts at the floor of location / downsample.
        downsample = self.level_downsamples[level]
        return (
            float(math.floor(location[0] / downsample)),
            float(math.floor(location[1] / downsample)),
        )

    def close(self) -> None:
        self._tiff.close()


def _data_past_end_of_file(tiff: tifffile.TiffFile, path: Path) -> list[str]:
    """Describe each parsed page whose tiles or strips end past the end of the file."""
    file_size = os.path.getsize(path)
    problems: list[str] = []
    for index, page in enumerate(tiff.pages):
        offsets = np.asarray(getattr(page, "dataoffsets", ()), dtype=np.int64)
        counts = np.asarray(getattr(page, "databytecounts", ()), dtype=np.int64)
        if offsets.size == 0 or offsets.shape != counts.shape:
            continue
        past_end = int(np.count_nonzero(offsets + counts > file_size))
        if past_end:
            problems.append(
                f"page {index}: {past_end} of {offsets.size} tiles or strips end past the end "
                f"of the file ({file_size} bytes); the file is probably truncated"
            )
    return problems


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def capture_tifffile_messages() -> Iterator[list[str]]:
    """Collect tifffile's warnings and errors instead of logging them without a slide id.

    tifffile logs damage it meets while parsing (such as ``invalid page offset`` on a truncated
    file) to its own logger. The caller logs the collected messages with the slide id.
    NOTE: the tifffile logger stops propagating while the block runs, so messages of other
    threads that read TIFFs at that time are collected here too.
    """
    tiff_logger = logging.getLogger("tifffile")
    handler = _ListHandler()
    propagate = tiff_logger.propagate
    tiff_logger.addHandler(handler)
    tiff_logger.propagate = False
    try:
        yield handler.messages
    finally:
        tiff_logger.removeHandler(handler)
        tiff_logger.propagate = propagate


def _yxc_axes(axes: str, shape: tuple[int, ...], path: Path) -> tuple[tuple[int, ...], int]:
    """Positions of the Y, X and channel axes of a tifffile series, and the channel count.

    Axes of length 1 are ignored; any other axis (Z, T, a second channel axis) is rejected.
    """
    if "Y" not in axes or "X" not in axes:
        raise SlideOpenError(f"{path}: TIFF series axes {axes!r} lack Y and X; not an image.")
    channel_axes = [i for i, a in enumerate(axes) if a in "CS" and shape[i] > 1]
    other = [a for i, a in enumerate(axes) if a not in "YXCS" and shape[i] > 1]
    if other or len(channel_axes) > 1:
        raise SlideOpenError(
            f"{path}: TIFF series has axes {axes!r} with shape {shape}; slidemil reads one 2-D "
            "plane with up to 4 samples per pixel. Export a single focal plane and time point."
        )
    order = (axes.index("Y"), axes.index("X"), *channel_axes)
    channels = shape[channel_axes[0]] if channel_axes else 1
    if channels > 4:
        raise SlideOpenError(
            f"{path}: {channels} channels per pixel; slidemil reads greyscale or RGB slides only. "
            "Convert multiplex images to RGB (pick 3 channels) before tiling."
        )
    return order, channels


def _tiff_properties(page: Any) -> dict[str, str]:
    """Level-0 TIFF tags under the names OpenSlide uses (``tiff.XResolution``, ...)."""
    properties: dict[str, str] = {"openslide.vendor": "tifffile"}
    tags = page.tags
    if "XResolution" in tags:
        numerator, denominator = tags["XResolution"].value
        if denominator:
            properties["tiff.XResolution"] = repr(numerator / denominator)
    if "ResolutionUnit" in tags:
        properties["tiff.ResolutionUnit"] = str(int(tags["ResolutionUnit"].value))
    if page.description:
        properties["tiff.ImageDescription"] = page.description
    return properties


_GENERIC_HINT = (
    "Check that the file is complete (size, checksum) and in a format OpenSlide reads; "
    "convert other formats to a pyramidal TIFF."
)
_DICOM_HINT = (
    "OpenSlide 4 reads DICOM VL Whole Slide Microscopy series whose instances carry ImageType "
    "and sit in one folder; re-export the slide with a WSI DICOM converter or as a pyramidal TIFF."
)


ReaderChoice = Literal["auto", "openslide", "tifffile"]


def open_reader(path: Path, reader: ReaderChoice = "auto") -> Reader:
    """Open `path` with OpenSlide, or with tifffile when OpenSlide rejects a TIFF.

    With ``reader="auto"``, generic TIFFs with more than 8 bits per sample also go to tifffile,
    because OpenSlide keeps only the high byte of each sample, while tifffile scales by the
    slide's real value range.

    Raises:
        SlideOpenError: the file cannot be opened by the chosen reader(s); the message carries
            every reason.
    """
    if reader == "tifffile":
        return _open_with_tifffile(path, "not tried (tifffile requested)")
    try:
        opened = OpenSlideReader(path)
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as err:
        if reader == "openslide":
            raise SlideOpenError(
                f"{path}: OpenSlide cannot open the file ({type(err).__name__}: {err}). "
                f"{_DICOM_HINT if path.suffix.lower() == '.dcm' else _GENERIC_HINT}"
            ) from err
        return _open_with_tifffile(path, f"{type(err).__name__}: {err}")

    if reader == "auto" and opened.properties.get("openslide.vendor") == "generic-tiff":
        reason = _lossy_in_openslide(path)
        if reason is not None:
            opened.close()
            return _open_with_tifffile(path, reason)
    return opened


def _lossy_in_openslide(path: Path) -> str | None:
    """Why OpenSlide would convert a generic TIFF's samples lossily, or None if it would not.

    OpenSlide reads generic TIFFs through libtiff's RGBA interface, which keeps the high byte
    of wide samples and silently drops channels beyond RGB(A).
    """
    try:
        with tifffile.TiffFile(str(path)) as tiff:
            page = tiff.pages.first
            dtype, samples = np.dtype(page.dtype), int(page.samplesperpixel)
            has_extra = bool(page.extrasamples)
    except (tifffile.TiffFileError, OSError, ValueError, TypeError):
        return None
    if dtype != np.uint8:
        return f"{dtype} samples"
    if samples > 4 or (samples == 4 and not has_extra):
        return f"{samples} samples per pixel"
    return None


def _open_with_tifffile(path: Path, openslide_reason: str) -> Reader:
    """Open `path` with `TiffReader`, reporting `openslide_reason` if that fails too."""
    try:
        reader = TiffReader(path)
    except SlideOpenError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as err:
        hint = _DICOM_HINT if path.suffix.lower() == ".dcm" else _GENERIC_HINT
        raise SlideOpenError(
            f"{path}: not a readable slide. OpenSlide: {openslide_reason}. tifffile: "
            f"{type(err).__name__}: {err}. {hint}"
        ) from err

    # Opening parses headers only. Decoding one region now reports an unsupported compression
    # as an unreadable slide instead of a failure on every tile later.
    smallest = len(reader.level_dimensions) - 1
    try:
        reader.read_region((0, 0), smallest, (1, 1))
    except TileReadError as err:
        reader.close()
        raise SlideOpenError(
            f"{path}: OpenSlide did not read the file ({openslide_reason}) and tifffile cannot "
            f"decode its pixels ({err.__cause__}). Re-export it as a tiled TIFF with JPEG, "
            "LZW or deflate compression."
        ) from err
    logger.info("%s: read with tifffile (OpenSlide: %s)", path, openslide_reason)
    return reader
