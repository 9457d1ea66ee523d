"""Readers for feature files written by other pipelines (CLAM, TRIDENT, STAMP), as they are.

Users with features from these tools can train on them without re-extracting or converting.
Every reader returns :class:`ImportedFeatures` in slidemil's frames: coordinates as level-0
pixels, top-left corner, (x, y).

Layouts read (HDF5 unless stated):

* **slidemil**: ``features`` [N, D] and ``coords`` [N, 2] with root attribute ``complete``.
* **CLAM** (``extract_features_fp.py``): ``features`` [N, D] and ``coords`` [N, 2] in level-0
  pixels. Tiling attributes (``patch_size`` at ``patch_level``, ``downsample``) sit on the
  ``coords`` dataset when present. CLAM's ``pt_files/<slide>.pt`` hold the features tensor
  alone, so they have no coordinates.
* **TRIDENT**: ``features`` [N, D] and ``coords`` [N, 2] in level-0 pixels, with
  ``patch_size_level0``, ``patch_size``, ``target_magnification`` and related attributes on the
  ``coords`` dataset.
* **STAMP**: ``feats`` [N, D] and ``coords`` [N, 2] in µm (attribute ``unit="um"``), with
  ``tile_size_um``, ``tile_size_px`` and ``extractor`` as root attributes. Conversion to pixels
  needs the slide's resolution, so coordinates stay in µm unless ``slide_mpp`` is given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from preprocessing.errors import StoreFormatError

logger = logging.getLogger(__name__)

FeatureFileFormat = Literal["slidemil", "clam", "trident", "stamp", "clam_pt"]
FEATURE_FILE_FORMATS: tuple[FeatureFileFormat, ...] = (
    "slidemil",
    "clam",
    "trident",
    "stamp",
    "clam_pt",
)
_FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt")


@dataclass
class ImportedFeatures:
    """Features of one slide read from a file of another pipeline.

    Attributes:
        path: The file read.
        source_format: Layout the file was read as.
        features: float16 or float32 [N, D] as stored.
        coords: int64 [N, 2] level-0 (x, y) top-left corners, or None when the file has no
            coordinates or only µm coordinates and no ``slide_mpp`` was given.
        coords_um: float64 [N, 2] (x, y) in µm when the file stores µm (STAMP), else None.
        tile_px_level0: Side of one tile in level-0 pixels when the file records it.
        attrs: Attributes of the file root and of its ``coords`` and ``features`` datasets.
    """

    path: Path
    source_format: FeatureFileFormat
    features: np.ndarray
    coords: np.ndarray | None
    coords_um: np.ndarray | None = None
    tile_px_level0: float | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tiles(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def detect_feature_format(path: Path) -> FeatureFileFormat:
    """Name the layout of a feature file from its datasets and attributes.

    Raises:
        StoreFormatError: If the file cannot be opened or matches no known layout.
    """
    path = Path(path)
    if path.suffix == ".pt":
        return "clam_pt"
    with _open_h5(path) as handle:
        root = _plain_attrs(handle.attrs)
        coords_attrs = _plain_attrs(handle["coords"].attrs) if "coords" in handle else {}
        if "feats" in handle:
            return "stamp"
        if "features" not in handle:
            raise StoreFormatError(
                f"{path}: no 'features' or 'feats' dataset, so it is neither a slidemil, CLAM, "
                f"TRIDENT nor STAMP feature file (datasets: {sorted(handle.keys())}). "
                "Re-extract features with `slidemil extract`."
            )
        if "complete" in root and "backbone" in root:
            return "slidemil"
        trident_keys = {"patch_size_level0", "level0_magnification", "target_magnification"}
        if trident_keys & (set(coords_attrs) | set(root)):
            return "trident"
        return "clam"


def read_feature_file(
    path: Path,
    source_format: FeatureFileFormat | None = None,
    slide_mpp: float | None = None,
) -> ImportedFeatures:
    """Read a slidemil, CLAM, TRIDENT or STAMP feature file without converting it on disk.

    Args:
        path: The feature file (``.h5`` or CLAM ``.pt``).
        source_format: Layout to read; detected from the file when None.
        slide_mpp: Resolution of the slide in µm per pixel at level 0. Converts STAMP µm
            coordinates to level-0 pixels; ignored for layouts that store pixels.

    Raises:
        StoreFormatError: Missing datasets, mismatched lengths, non-finite features (the
            message names the first bad row), or an unknown layout.
    """
    path = Path(path)
    if not path.exists():
        raise StoreFormatError(f"{path}: feature file not found; check the path.")
    source_format = source_format or detect_feature_format(path)
    if source_format not in FEATURE_FILE_FORMATS:
        raise StoreFormatError(
            f"{path}: unknown feature file format {source_format!r}; "
            f"choose one of {', '.join(FEATURE_FILE_FORMATS)}."
        )
    if source_format == "clam_pt":
        imported = _read_clam_pt(path)
    elif source_format == "stamp":
        imported = _read_stamp(path, slide_mpp)
    else:
        imported = _read_features_and_pixel_coords(path, source_format)
    _check_finite(imported)
    return imported


def list_feature_files(directory: Path) -> dict[str, Path]:
    """Map slide id (file name without suffix) to feature file for every file in ``directory``.

    HDF5 files win over CLAM ``.pt`` files of the same slide. Temporary files of an unfinished
    slidemil store (``.tmp-<pid>``) are ignored.

    Raises:
        StoreFormatError: If ``directory`` does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreFormatError(f"{directory}: feature folder not found; check the path.")
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in _FEATURE_SUFFIXES or ".tmp-" in path.name:
            continue
        slide_id = path.name[: -len(path.suffix)]
        if slide_id in found and path.suffix == ".pt":
            continue
        found[slide_id] = path
    return found


# --------------------------------------------------------------------------------------------


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise StoreFormatError(
            f"{path}: not a readable HDF5 file ({err}); it is probably truncated or still being "
            "copied. Copy it again or re-extract the slide."
        ) from err


def _plain_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    plain: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        plain[key] = value
    return plain


def _check_lengths(path: Path, features: np.ndarray, coords: np.ndarray | None) -> None:
    if features.ndim != 2:
        raise StoreFormatError(
            f"{path}: features have shape {features.shape}, expected (N, D); the file is not a "
            "per-tile feature file."
        )
    if coords is None:
        return
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise StoreFormatError(f"{path}: coords have shape {coords.shape}, expected (N, 2).")
    if coords.shape[0] != features.shape[0]:
        raise StoreFormatError(
            f"{path}: {features.shape[0]} feature rows but {coords.shape[0]} coords; the file "
            "is damaged. Re-extract the slide."
        )


def _check_finite(imported: ImportedFeatures) -> None:
    finite_rows = np.isfinite(imported.features).all(axis=1)
    if not finite_rows.all():
        bad = np.flatnonzero(~finite_rows)
        raise StoreFormatError(
            f"{imported.path}: {bad.size} feature rows contain NaN or inf, first at row "
            f"{int(bad[0])}. Re-extract the slide; a model cannot train on these rows."
        )


def _read_features_and_pixel_coords(
    path: Path, source_format: FeatureFileFormat
) -> ImportedFeatures:
    """Read the slidemil, CLAM and TRIDENT layouts, which all store level-0 pixel coords."""
    with _open_h5(path) as handle:
        for name in ("features", "coords"):
            if name not in handle:
                raise StoreFormatError(
                    f"{path}: no {name!r} dataset in a {source_format} feature file "
                    f"(datasets: {sorted(handle.keys())}); re-extract the slide."
                )
        features = np.asarray(handle["features"][:])
        coords_data = np.asarray(handle["coords"][:])
        attrs = _plain_attrs(handle.attrs)
        attrs.update(_plain_attrs(handle["features"].attrs))
        attrs.update(_plain_attrs(handle["coords"].attrs))
    if source_format == "slidemil" and not attrs.get("complete", False):
        raise StoreFormatError(
            f"{path}: slidemil store is incomplete (no complete=True); rerun `slidemil extract`."
        )
    features = _squeeze_batch_axis(features)
    coords = np.rint(coords_data).astype(np.int64).reshape(-1, 2)
    _check_lengths(path, features, coords)
    return ImportedFeatures(
        path=path,
        source_format=source_format,
        features=features,
        coords=coords,
        tile_px_level0=_tile_px_level0(attrs),
        attrs=attrs,
    )


def _squeeze_batch_axis(features: np.ndarray) -> np.ndarray:
    # Some CLAM forks save features as [1, N, D].
    if features.ndim == 3 and features.shape[0] == 1:
        return features[0]
    return features


def _tile_px_level0(attrs: Mapping[str, Any]) -> float | None:
    """Tile side in level-0 pixels from slidemil, TRIDENT or CLAM attributes, if recorded."""
    for key in ("tile_px_level0", "patch_size_level0"):
        if key in attrs:
            return float(attrs[key])
    if "patch_size" in attrs and "downsample" in attrs:
        downsample = attrs["downsample"]
        factor = downsample[0] if isinstance(downsample, (list, tuple)) else downsample
        return float(attrs["patch_size"]) * float(factor)
    return None


def _read_clam_pt(path: Path) -> ImportedFeatures:
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for unreadable files.
        raise StoreFormatError(
            f"{path}: not a readable CLAM .pt feature file ({err}); use the matching .h5 file."
        ) from err
    if not isinstance(loaded, torch.Tensor):
        raise StoreFormatError(
            f"{path}: contains a {type(loaded).__name__}, not a features tensor [N, D]."
        )
    features = _squeeze_batch_axis(loaded.numpy())
    _check_lengths(path, features, None)
    logger.info("%s: CLAM .pt file has no coordinates; heatmaps need the .h5 file.", path)
    return ImportedFeatures(path=path, source_format="clam_pt", features=features, coords=None)


def _read_stamp(path: Path, slide_mpp: float | None) -> ImportedFeatures:
    with _open_h5(path) as handle:
        for name in ("feats", "coords"):
            if name not in handle:
                raise StoreFormatError(
                    f"{path}: no {name!r} dataset in a STAMP feature file "
                    f"(datasets: {sorted(handle.keys())}); re-extract the slide with STAMP."
                )
        features = np.asarray(handle["feats"][:])
        coords_stored = np.asarray(handle["coords"][:], dtype=np.float64).reshape(-1, 2)
        attrs = _plain_attrs(handle.attrs)
    _check_lengths(path, features, coords_stored)

    unit = str(attrs.get("unit", "um")).lower()
    if unit in ("px", "pixel", "pixels"):
        coords = np.rint(coords_stored).astype(np.int64)
        return ImportedFeatures(
            path=path, source_format="stamp", features=features, coords=coords, attrs=attrs
        )
    if unit not in ("um", "µm", "micron", "microns"):
        raise StoreFormatError(
            f"{path}: STAMP coordinate unit {unit!r} is not supported; expected 'um' or 'px'."
        )

    coords_px: np.ndarray | None = None
    tile_px_level0: float | None = None
    if slide_mpp is not None:
        if not slide_mpp > 0:
            raise StoreFormatError(f"{path}: slide_mpp must be positive, got {slide_mpp}.")
        coords_px = np.rint(coords_stored / slide_mpp).astype(np.int64)
        if "tile_size_um" in attrs:
            tile_px_level0 = float(attrs["tile_size_um"]) / slide_mpp
    return ImportedFeatures(
        path=path,
        source_format="stamp",
        features=features,
        coords=coords_px,
        coords_um=coords_stored,
        tile_px_level0=tile_px_level0,
        attrs=attrs,
    )
