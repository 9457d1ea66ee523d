"""Resolution (µm per pixel) of a slide's level 0, looked up through one fallback chain.

The chain, first hit wins:

1. an explicit per-slide override (``open_slide(path, mpp=...)``, a row of the mpp CSV);
2. the OpenSlide properties ``openslide.mpp-x`` / ``openslide.mpp-y``;
3. the TIFF resolution tags ``XResolution`` + ``ResolutionUnit`` (centimeter or inch);
4. vendor keys (Aperio ``MPP``, Philips pixel spacing, MIRAX, Ventana, OME ``PhysicalSizeX``);
5. a default override for slides that carry none (``--mpp``).

Metadata values outside ``PLAUSIBLE_MPP_RANGE`` are skipped with a warning: TIFF writers put 72
or 96 dots per inch into files that never had a physical resolution, which reads as 352.8 or
264.6 µm per pixel. User values outside it are rejected with an error. Objective power is never
used, because one nominal magnification maps to different resolutions on different scanners.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: Level-0 resolutions (µm per pixel) accepted from slide metadata. Brightfield and fluorescence
#: scanners write 0.1 to 2 µm per pixel at level 0; 20 is a generous upper bound for overview scans.
PLAUSIBLE_MPP_RANGE = (0.01, 20.0)

#: `mpp_source` of a value supplied by the user rather than read from the file.
OVERRIDE_SOURCE = "override"

#: µm per resolution unit, keyed by the TIFF ResolutionUnit as number or as OpenSlide spells it.
_UM_PER_UNIT: dict[str, float] = {
    "2": 25_400.0,
    "inch": 25_400.0,
    "3": 10_000.0,
    "centimeter": 10_000.0,
}

_APERIO_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_OME_PHYSICAL_SIZE = re.compile(r'PhysicalSizeX="([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"')
_OME_PHYSICAL_UNIT = re.compile(r'PhysicalSizeXUnit="([^"]+)"')
_OME_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}


@dataclass(frozen=True)
class MppResult:
    """Level-0 resolution of a slide and where it came from.

    Attributes:
        mpp: µm per level-0 pixel along x, or None when no source had a usable value.
        source: property or tag name that supplied `mpp` (`override` for user values).
        rejected: human-readable notes on values that were found but skipped.
    """

    mpp: float | None
    source: str | None
    rejected: tuple[str, ...] = ()


def resolve_mpp(
    properties: Mapping[str, str],
    *,
    override: float | None = None,
    default: float | None = None,
) -> MppResult:
    """Look up the level-0 mpp of a slide through the fallback chain.

    Args:
        properties: slide metadata as OpenSlide names it (``openslide.*``, ``tiff.*``, vendor
            prefixes). The tifffile reader fills the same keys from the TIFF tags.
        override: per-slide value that wins over the file's metadata.
        default: value used only when neither the override nor the file supplies one.

    Returns:
        The first plausible value and its source; ``mpp=None`` when nothing was found.
    """
    found = _mpp_from_metadata(properties)
    if override is not None:
        mpp = validate_user_mpp(override, "mpp override")
        if found.mpp is not None and abs(found.mpp - mpp) / found.mpp > 0.05:
            # The override still wins, because it is the user's explicit correction, but a
            # disagreement is worth a line in the log.
            logger.warning(
                "mpp override %g µm/px replaces %g µm/px read from %s",
                mpp,
                found.mpp,
                found.source,
            )
        return MppResult(mpp, OVERRIDE_SOURCE)
    if found.mpp is not None:
        return found

    rejected = list(found.rejected)
    if default is not None:
        mpp = validate_user_mpp(default, "default mpp")
        return MppResult(mpp, OVERRIDE_SOURCE, tuple(rejected))
    return MppResult(None, None, tuple(rejected))


def _mpp_from_metadata(properties: Mapping[str, str]) -> MppResult:
    """First plausible value of the metadata part of the chain (OpenSlide, TIFF, vendor)."""
    rejected: list[str] = []
    for source, lookup in _METADATA_CHAIN:
        try:
            value = lookup(properties)
        except ValueError as err:
            rejected.append(f"{source}: unreadable value ({err})")
            continue
        if value is None:
            continue
        if not (math.isfinite(value) and PLAUSIBLE_MPP_RANGE[0] <= value <= PLAUSIBLE_MPP_RANGE[1]):
            rejected.append(f"{source}={value:g} µm/px is outside {PLAUSIBLE_MPP_RANGE}")
            continue
        return MppResult(value, source, tuple(rejected))
    return MppResult(None, None, tuple(rejected))


def validate_user_mpp(value: float, name: str) -> float:
    """Return `value` as float, raising ValueError unless it lies in `PLAUSIBLE_MPP_RANGE`.

    User values get the same range as metadata, because a typo such as 50 for 0.50 would
    otherwise tile the slide into thousands of tiles a few level-0 pixels wide.

    Args:
        value: µm per level-0 pixel supplied by the user.
        name: where the value came from, for the message (``--mpp``, a CSV row).
    """
    mpp = float(value)
    low, high = PLAUSIBLE_MPP_RANGE
    if not (math.isfinite(mpp) and low <= mpp <= high):
        raise ValueError(
            f"{name} {value!r} µm per pixel is outside the plausible range {low:g} to {high:g} "
            "µm per level-0 pixel. Scanners write about 0.25 (40x) or 0.5 (20x); check the "
            "value for a misplaced decimal point."
        )
    return mpp


def magnification_from_mpp(mpp: float) -> float:
    """Convert µm per pixel to the nominal objective magnification (10 µm / mpp; 0.25 → 40x).

    Only for display and for readers that expect a magnification; levels are always chosen by mpp.
    """
    return 10.0 / mpp


def _openslide_mpp(properties: Mapping[str, str]) -> float | None:
    mpp_x = properties.get("openslide.mpp-x")
    if mpp_x is None:
        return None
    value = float(mpp_x)
    mpp_y = properties.get("openslide.mpp-y")
    if mpp_y is not None and value > 0 and abs(float(mpp_y) - value) / value > 0.02:
        logger.warning(
            "Pixels are not square (mpp-x %s, mpp-y %s); slidemil uses mpp-x for both axes",
            mpp_x,
            mpp_y,
        )
    return value


def _tiff_resolution_mpp(properties: Mapping[str, str]) -> float | None:
    resolution = properties.get("tiff.XResolution")
    unit = properties.get("tiff.ResolutionUnit")
    if resolution is None or unit is None:
        return None
    um_per_unit = _UM_PER_UNIT.get(unit.strip().lower())
    if um_per_unit is None:
        # ResolutionUnit "none" (1) gives an aspect ratio, not a physical size.
        return None
    pixels_per_unit = float(resolution)
    if pixels_per_unit <= 0:
        raise ValueError(f"XResolution {resolution!r} is not positive")
    return um_per_unit / pixels_per_unit


def _aperio_mpp(properties: Mapping[str, str]) -> float | None:
    if "aperio.MPP" in properties:
        return float(properties["aperio.MPP"])
    match = _APERIO_MPP.search(properties.get("tiff.ImageDescription", ""))
    return float(match.group(1)) if match else None


def _philips_mpp(properties: Mapping[str, str]) -> float | None:
    spacing = properties.get("philips.DICOM_PIXEL_SPACING")
    if spacing is None:
        return None
    # Row spacing first, in millimetres, often quoted: '"0.000243" "0.000243"'.
    values = [float(part.strip('"')) for part in spacing.split() if part.strip('"')]
    return values[-1] * 1000.0 if values else None


def _mirax_mpp(properties: Mapping[str, str]) -> float | None:
    value = properties.get("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X")
    return float(value) if value is not None else None


def _ventana_mpp(properties: Mapping[str, str]) -> float | None:
    value = properties.get("ventana.ScanRes")
    return float(value) if value is not None else None


def _ome_mpp(properties: Mapping[str, str]) -> float | None:
    description = properties.get("tiff.ImageDescription", "")
    match = _OME_PHYSICAL_SIZE.search(description)
    if match is None:
        return None
    unit_match = _OME_PHYSICAL_UNIT.search(description)
    unit = unit_match.group(1) if unit_match else "µm"
    if unit not in _OME_UNIT_TO_UM:
        raise ValueError(f"unknown OME PhysicalSizeXUnit {unit!r}")
    return float(match.group(1)) * _OME_UNIT_TO_UM[unit]


_METADATA_CHAIN: tuple[tuple[str, Callable[[Mapping[str, str]], float | None]], ...] = (
    ("openslide.mpp-x", _openslide_mpp),
    ("tiff.XResolution", _tiff_resolution_mpp),
    ("aperio.MPP", _aperio_mpp),
    ("philips.DICOM_PIXEL_SPACING", _philips_mpp),
    ("mirax.MICROMETER_PER_PIXEL_X", _mirax_mpp),
    ("ventana.ScanRes", _ventana_mpp),
    ("ome.PhysicalSizeX", _ome_mpp),
)
