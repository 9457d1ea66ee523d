"""Classical tissue detection on a slide thumbnail.

Brightfield (H&E, IHC): tissue is coloured and the glass is white or grey, so a pixel is tissue
when its HSV saturation exceeds an Otsu threshold. Fluorescence: the background is dark, so the
brightest channel is thresholded instead. A nuclear stain such as DAPI lights up nuclei and
leaves the cytoplasm and stroma between them almost as dark as the glass, so the brightest
channel is first blurred with a Gaussian of `FLUORESCENCE_BLUR_UM`, which turns scattered nuclei
into one continuous signal, and Otsu's threshold is taken on the logarithm of that signal, where
glass, faint tissue and bright nuclei are spaced evenly enough for Otsu to split glass from
tissue rather than nuclei from everything else. Greyscale brightfield (a single-channel scan,
stored as RGB with equal channels): saturation is 0 everywhere, so a pixel is tissue when its
grey level is darker than an Otsu threshold (``darkness``). ``method="auto"`` picks fluorescence
when the median brightness of the thumbnail is below `DARK_BACKGROUND_LEVEL`, else darkness when
the thumbnail has no colour (see `GREY_MAX_CHANNEL_SPREAD`), else saturation. The raw mask is
then smoothed (closing, then opening, with a disk of `smoothing_um`), fragments smaller than
`min_tissue_area_um2` are dropped and holes smaller than `min_hole_area_um2` are filled.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

TissueMethod = Literal["auto", "saturation", "brightness", "darkness", "none"]

#: Median brightest-channel value (0..255) below which `auto` treats a slide as fluorescence.
DARK_BACKGROUND_LEVEL = 64.0

#: Largest difference between the brightest and darkest channel (0..255) of 99 % of the
#: thumbnail pixels for `auto` to treat a thumbnail as greyscale. Above 0 so that rounding in
#: lossy compression of a grey image still counts as grey.
GREY_MAX_CHANNEL_SPREAD = 3

#: Pen-mark hue ranges in degrees (green to cyan, and blue) that H&E stains never reach.
#: Red and black pen are not removed: red overlaps eosin, and black is unsaturated already.
PEN_HUE_RANGES_DEG = ((70.0, 185.0), (190.0, 250.0))
PEN_MIN_SATURATION = 0.30

#: Gaussian sigma in µm applied to the fluorescence signal before thresholding. Nuclei are about
#: 10 µm apart in most tissues, so this bridges the dark gaps between them but not the wider
#: gaps between a section and the glass around it.
FLUORESCENCE_BLUR_UM = 16.0
#: The median tissue signal must be at least this many times the median glass signal (both
#: plus one, on the 0..255 scale); below that the Otsu cut lies inside noise and there is no tissue.
MIN_FLUORESCENCE_CONTRAST = 1.5


@dataclass(frozen=True)
class TissueSettings:
    """Parameters of `detect_tissue`; areas and lengths are physical so they hold at any mpp.

    Attributes:
        method: ``auto``, ``saturation`` (brightfield), ``brightness`` (fluorescence),
            ``darkness`` (greyscale brightfield) or ``none`` (the whole scanned area is tissue).
        threshold: fixed threshold on the 0..255 saturation, on the blurred brightness of
            `fluorescence_signal`, or on the darkness (255 minus the grey level); Otsu when None.
        min_threshold: lower bound on the saturation Otsu threshold (0..255), so blank glass,
            whose Otsu threshold falls inside the noise, yields no tissue. For ``darkness`` it is
            the smallest difference in grey level between the medians of tissue and glass.
            Fluorescence uses `MIN_FLUORESCENCE_CONTRAST` instead.
        smoothing_um: radius in µm of the disk used to close gaps and remove specks.
        min_tissue_area_um2: tissue fragments smaller than this are dropped.
        min_hole_area_um2: holes inside tissue smaller than this are filled.
        remove_pen_marks: drop green and blue pen strokes (brightfield only).
    """

    method: TissueMethod = "auto"
    threshold: float | None = None
    min_threshold: float = 15.0
    smoothing_um: float = 16.0
    min_tissue_area_um2: float = 10_000.0
    min_hole_area_um2: float = 2_500.0
    remove_pen_marks: bool = False


@dataclass(frozen=True)
class TissueMask:
    """Result of `detect_tissue`.

    Attributes:
        mask: bool [h, w] in thumbnail pixels; True is tissue.
        method: method actually used (``saturation``, ``brightness``, ``darkness`` or
            ``none``).
        threshold: threshold applied on the 0..255 channel (NaN for ``none``).
    """

    mask: np.ndarray
    method: str
    threshold: float


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the cut that maximises the between-class variance.

    Returns the cut t such that ``values > t`` is the upper class; 0 for constant input.
    """
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = histogram.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(histogram)
    weight_high = total - weight_low
    mean_low_sum = np.cumsum(histogram * levels)
    mean_total = mean_low_sum[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_total * weight_low - total * mean_low_sum) ** 2 / (weight_low * weight_high)
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of uint8 RGB [h, w, 3] as uint8 [h, w] (0 for black pixels)."""
    high = rgb.max(axis=2).astype(np.int32)
    low = rgb.min(axis=2).astype(np.int32)
    out = np.zeros(high.shape, dtype=np.uint8)
    nonzero = high > 0
    out[nonzero] = ((high[nonzero] - low[nonzero]) * 255 // high[nonzero]).astype(np.uint8)
    return out


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue of uint8 RGB [h, w, 3] in degrees [0, 360) as float32 [h, w] (0 for greys)."""
    data = rgb.astype(np.float32)
    red, green, blue = data[..., 0], data[..., 1], data[..., 2]
    high = data.max(axis=2)
    delta = high - data.min(axis=2)
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(
        high == red,
        ((green - blue) / safe) % 6.0,
        np.where(high == green, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
    )
    return np.where(delta > 0, hue * 60.0, 0.0).astype(np.float32)


def pen_mark_mask(rgb: np.ndarray) -> np.ndarray:
    """bool [h, w]: saturated green-to-cyan or blue pixels (pen strokes on brightfield slides)."""
    hue = hue_degrees(rgb)
    strong = saturation(rgb) >= PEN_MIN_SATURATION * 255
    in_range = np.zeros(hue.shape, dtype=bool)
    for low, high in PEN_HUE_RANGES_DEG:
        in_range |= (hue >= low) & (hue <= high)
    return strong & in_range


def disk(radius: int) -> np.ndarray:
    """bool [2r+1, 2r+1] disk structuring element."""
    span = np.arange(-radius, radius + 1)
    return (span[:, None] ** 2 + span[None, :] ** 2) <= radius * radius


def detect_tissue(
    thumbnail: np.ndarray,
    thumbnail_mpp: float,
    settings: TissueSettings,
    region: np.ndarray | None = None,
) -> TissueMask:
    """Detect tissue on a thumbnail.

    Args:
        thumbnail: uint8 RGB [h, w, 3] covering the slide's level-0 extent.
        thumbnail_mpp: µm per thumbnail pixel (level-0 mpp times the thumbnail downsample).
        settings: detection parameters.
        region: bool [h, w], True inside the scanned area (MIRAX bounds); tissue is searched
            only there. None means the whole thumbnail.

    Returns:
        The cleaned mask and the method and threshold used.
    """
    if region is None:
        region = np.ones(thumbnail.shape[:2], dtype=bool)
    if settings.method == "none":
        return TissueMask(region.copy(), "none", math.nan)

    method: TissueMethod = settings.method
    if method == "auto":
        method = _auto_method(thumbnail, region)
    if method == "saturation":
        raw, threshold = _brightfield_raw_mask(thumbnail, settings, region)
    elif method == "darkness":
        raw, threshold = _greyscale_raw_mask(thumbnail, settings, region)
    else:
        raw, threshold = _fluorescence_raw_mask(thumbnail, thumbnail_mpp, settings, region)

    mask = clean_mask(raw, thumbnail_mpp, settings) & region
    logger.debug(
        "Tissue: method %s, threshold %.1f, %.1f%% of the thumbnail",
        method,
        threshold,
        100.0 * mask.mean() if mask.size else 0.0,
    )
    return TissueMask(mask, method, threshold)


def _auto_method(thumbnail: np.ndarray, region: np.ndarray) -> TissueMethod:
    """Choose ``brightness`` on a dark background, ``darkness`` on grey, else ``saturation``."""
    if not region.any():
        return "brightness"
    inside = thumbnail[region]
    if float(np.median(inside.max(axis=1))) < DARK_BACKGROUND_LEVEL:
        return "brightness"
    spread = inside.max(axis=1).astype(np.int16) - inside.min(axis=1).astype(np.int16)
    if float(np.percentile(spread, 99)) <= GREY_MAX_CHANNEL_SPREAD:
        return "darkness"
    return "saturation"


def _greyscale_raw_mask(
    thumbnail: np.ndarray, settings: TissueSettings, region: np.ndarray
) -> tuple[np.ndarray, float]:
    """Darkness (255 minus the mean of the channels) above Otsu's threshold or the fixed one.

    Tissue absorbs light, so on a brightfield scan it is darker than the glass. Without a fixed
    threshold, a split whose two classes differ by less than `settings.min_threshold` grey levels
    is noise on blank glass and yields no tissue. The returned threshold is on the darkness.
    """
    darkness = 255 - np.rint(thumbnail.mean(axis=2)).astype(np.uint8)
    if settings.threshold is not None:
        threshold = float(settings.threshold)
        return (darkness > threshold) & region, threshold
    inside = darkness[region]
    if inside.size == 0:
        return np.zeros(darkness.shape, dtype=bool), math.nan

    threshold = otsu_threshold(inside)
    tissue = inside[inside > threshold]
    glass = inside[inside <= threshold]
    if tissue.size == 0 or glass.size == 0:
        return np.zeros(darkness.shape, dtype=bool), threshold
    contrast = float(np.median(tissue)) - float(np.median(glass))
    if contrast < settings.min_threshold:
        logger.debug(
            "Greyscale: tissue/glass contrast %.1f grey levels is below %.1f; no tissue",
            contrast,
            settings.min_threshold,
        )
        return np.zeros(darkness.shape, dtype=bool), threshold
    return (darkness > threshold) & region, threshold


def fluorescence_signal(thumbnail: np.ndarray, thumbnail_mpp: float) -> np.ndarray:
    """Brightest channel of uint8 RGB [h, w, 3], blurred by `FLUORESCENCE_BLUR_UM`: float32 [h, w].

    Values stay on the 0..255 scale of the input.
    """
    brightness = thumbnail.max(axis=2).astype(np.float32)
    sigma_px = FLUORESCENCE_BLUR_UM / thumbnail_mpp
    if sigma_px < 0.5:
        return brightness
    return ndimage.gaussian_filter(brightness, sigma_px, mode="nearest")


def _brightfield_raw_mask(
    thumbnail: np.ndarray, settings: TissueSettings, region: np.ndarray
) -> tuple[np.ndarray, float]:
    """Saturation above Otsu's threshold (or the fixed one), minus pen marks on request."""
    channel = saturation(thumbnail)
    if settings.threshold is not None:
        threshold = float(settings.threshold)
    else:
        inside = channel[region]
        threshold = max(otsu_threshold(inside) if inside.size else 0.0, settings.min_threshold)
    raw = (channel > threshold) & region
    if settings.remove_pen_marks:
        pen = pen_mark_mask(thumbnail)
        raw &= ~ndimage.binary_dilation(pen, structure=disk(1))
    return raw, threshold


def _fluorescence_raw_mask(
    thumbnail: np.ndarray, thumbnail_mpp: float, settings: TissueSettings, region: np.ndarray
) -> tuple[np.ndarray, float]:
    """Blurred brightness above a log-scale Otsu threshold (or the fixed one).

    The returned threshold is on the 0..255 scale of `fluorescence_signal`.
    """
    signal = fluorescence_signal(thumbnail, thumbnail_mpp)
    if settings.threshold is not None:
        threshold = float(settings.threshold)
        return (signal > threshold) & region, threshold
    inside = signal[region]
    if inside.size == 0:
        return np.zeros(signal.shape, dtype=bool), math.nan

    log_max = math.log1p(255.0)
    log_levels = np.rint(np.log1p(np.clip(inside, 0.0, 255.0)) * (255.0 / log_max))
    cut = otsu_threshold(log_levels.astype(np.uint8))
    threshold = float(math.expm1((cut + 0.5) * log_max / 255.0))

    tissue = inside[inside > threshold]
    glass = inside[inside <= threshold]
    if tissue.size == 0:
        return np.zeros(signal.shape, dtype=bool), threshold
    if glass.size:
        contrast = (float(np.median(tissue)) + 1.0) / (float(np.median(glass)) + 1.0)
        if contrast < MIN_FLUORESCENCE_CONTRAST:
            logger.debug(
                "Fluorescence: tissue/glass contrast %.2f is below %.1f; no tissue",
                contrast,
                MIN_FLUORESCENCE_CONTRAST,
            )
            return np.zeros(signal.shape, dtype=bool), threshold
    return (signal > threshold) & region, threshold


def clean_mask(raw: np.ndarray, mpp: float, settings: TissueSettings) -> np.ndarray:
    """Smooth a raw mask, drop small fragments and fill small holes (sizes in µm at `mpp`)."""
    radius = max(1, round(settings.smoothing_um / mpp))
    element = disk(radius)
    # Pad so that closing does not erode tissue touching the thumbnail border.
    padded = np.pad(raw, radius, mode="edge")
    padded = ndimage.binary_closing(padded, structure=element)
    padded = ndimage.binary_opening(padded, structure=element)
    mask = padded[radius:-radius, radius:-radius]

    pixel_area = mpp * mpp
    min_tissue_px = settings.min_tissue_area_um2 / pixel_area
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count:
        areas = np.bincount(labels.ravel())
        keep = areas >= min_tissue_px
        keep[0] = False
        mask = keep[labels]

    min_hole_px = settings.min_hole_area_um2 / pixel_area
    holes = ndimage.binary_fill_holes(mask) & ~mask
    hole_labels, hole_count = ndimage.label(holes)
    if hole_count:
        hole_areas = np.bincount(hole_labels.ravel())
        fill = hole_areas < min_hole_px
        fill[0] = False
        mask = mask | fill[hole_labels]
    return mask
