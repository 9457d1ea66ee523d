"""The tiling stage: slides → tissue masks → level-0 tile grids in coords stores.

Per slide it writes, in `output_dir`:

- ``<slide_id>.h5``: coords store (dataset ``coords`` int64 [N, 2], level-0 top-left (x, y))
  with the attributes listed in `coords_attrs`. It is written last, so a complete store implies
  that the files below exist;
- ``qc/<slide_id>.png``: thumbnail with the tissue outline and the kept tiles;
- ``tissue/<slide_id>.geojson``: tissue polygons in level-0 pixels (QuPath annotations);

and once per run ``manifest.csv`` and ``tiling_config.yaml`` (the resolved config).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from preprocessing import jobs
from preprocessing.contours import mask_polygons, tissue_geojson
from preprocessing.errors import ConfigError, SlidemilError, TileReadError
from preprocessing.grid import GridGeometry, grid_geometry, tile_grid, tissue_fractions
from preprocessing.inputs import SlideInput, list_slides, read_mpp_csv
from preprocessing.mpp import OVERRIDE_SOURCE, magnification_from_mpp, validate_user_mpp
from preprocessing.qc import draw_qc, save_png, stretch_contrast
from preprocessing.slide import Slide, open_slide
from preprocessing.stores import (
    is_complete_store,
    read_coords_store,
    replace_text,
    write_coords_store,
)
from preprocessing.tissue import TissueMask, TissueMethod, TissueSettings, detect_tissue

logger = logging.getLogger(__name__)

STAGE = "tile"
#: Maximum side of the tissue-detection thumbnail in pixels, which bounds its memory and time.
MAX_THUMBNAIL_SIDE = 8192
#: A tile footprint spans at least this many thumbnail pixels, so tissue fractions are fine-grained.
MIN_THUMBNAIL_PX_PER_TILE = 8.0
#: Unreadable tiles logged one by one per slide; further ones go into one summary line.
MAX_LOGGED_BAD_TILES = 10
#: Store attributes that must match the config for an existing store to be reused.
GEOMETRY_ATTRS = ("target_mpp", "tile_px", "overlap_px", "min_tissue_fraction")
#: Config fields that change a store's tiles besides `GEOMETRY_ATTRS`. Their values are kept
#: as JSON in the store attribute `tiling_settings`, because the attributes `tissue_method`,
#: `tissue_threshold` and `tissue_mpp` contain the values that detection chose (e.g. the
#: Otsu threshold).
TISSUE_SETTING_FIELDS = (
    "tissue_method",
    "tissue_threshold",
    "tissue_mpp",
    "smoothing_um",
    "min_tissue_area_um2",
    "min_hole_area_um2",
    "remove_pen_marks",
    "level_tolerance",
)
#: Settings stored as plain attributes by stores written before `tiling_settings` existed.
LEGACY_TISSUE_ATTRS = (
    "smoothing_um",
    "min_tissue_area_um2",
    "min_hole_area_um2",
    "remove_pen_marks",
)
#: A stride below this fraction of `tile_px` is logged as a warning with the tile count growth.
MIN_STRIDE_FRACTION = 0.25


class TilingConfig(BaseModel):
    """Settings of `slidemil tile`; CLI options map 1:1 to these fields."""

    model_config = ConfigDict(extra="forbid")

    slides: str = Field(description="Folder, glob pattern or CSV (column 'path') of slides.")
    output_dir: Path = Field(description="Folder for coords stores, QC images and manifest.")
    target_mpp: float = Field(default=0.5, gt=0, description="µm per pixel of the tiles.")
    tile_px: int = Field(default=224, ge=8, description="Tile side in pixels at target_mpp.")
    overlap_px: int = Field(
        default=0, ge=0, description="Overlap of neighbouring tiles, px at target_mpp."
    )
    mpp: float | None = Field(
        default=None, gt=0, description="µm per level-0 pixel for slides without."
    )
    mpp_csv: Path | None = Field(
        default=None, description="CSV 'slide_id,mpp' of per-slide overrides."
    )
    level_tolerance: float = Field(
        default=0.05, ge=0, lt=1, description="Relative slack when picking the level to read from."
    )
    tissue_method: TissueMethod = "auto"
    tissue_threshold: float | None = Field(default=None, ge=0, le=255)
    tissue_mpp: float = Field(
        default=4.0, gt=0, description="µm per pixel of the detection thumbnail."
    )
    smoothing_um: float = Field(default=16.0, ge=0)
    min_tissue_area_um2: float = Field(default=10_000.0, ge=0)
    min_hole_area_um2: float = Field(default=2_500.0, ge=0)
    remove_pen_marks: bool = False
    min_tissue_fraction: float = Field(default=0.25, ge=0, le=1)
    verify_tiles: bool = Field(
        default=False, description="Decode every kept tile; drop unreadable ones."
    )
    max_bad_tile_fraction: float = Field(default=0.05, ge=0, le=1)
    recursive: bool = False
    overwrite: bool = False
    skip_errors: bool = True
    shard: jobs.Shard = None
    progress: bool = True

    @field_validator("mpp")
    @classmethod
    def _check_mpp(cls, value: float | None) -> float | None:
        if value is None:
            return None
        return validate_user_mpp(value, "mpp")

    @model_validator(mode="after")
    def _check_overlap(self) -> TilingConfig:
        if self.overlap_px >= self.tile_px:
            raise ValueError(
                f"the overlap ({self.overlap_px} px) must be smaller than the tile "
                f"({self.tile_px} px): set --overlap-px below --tile-px"
            )
        return self

    def tissue_settings(self) -> TissueSettings:
        """Return the tissue detection settings of this config."""
        return TissueSettings(
            method=self.tissue_method,
            threshold=self.tissue_threshold,
            smoothing_um=self.smoothing_um,
            min_tissue_area_um2=self.min_tissue_area_um2,
            min_hole_area_um2=self.min_hole_area_um2,
            remove_pen_marks=self.remove_pen_marks,
        )


def coords_store_path(output_dir: Path, slide_id: str) -> Path:
    """Path of a slide's coords store."""
    return output_dir / f"{slide_id}.h5"


def run_tiling(cfg: TilingConfig) -> jobs.StageResult:
    """Tile every slide of `cfg.slides`; see the module docstring for the outputs.

    Raises:
        ConfigError / DuplicateSlideIdError: before any slide is processed or any folder made.
        SlidemilError: the first failing slide's error when `cfg.skip_errors` is False.
    """
    # The SLURM variables are read here, so a bad array set-up fails before any work.
    jobs.parse_shard(cfg.shard)
    _warn_dense_overlap(cfg)
    slides = list_slides(cfg.slides, recursive=cfg.recursive)
    overrides = read_mpp_csv(cfg.mpp_csv) if cfg.mpp_csv is not None else {}
    unknown = sorted(set(overrides) - {s.slide_id for s in slides})
    if unknown:
        logger.warning(
            "mpp CSV lists %d slide ids not in the slide list: %s", len(unknown), unknown
        )
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _save_config(cfg, output_dir / "tiling_config.yaml")

    def is_done(slide: SlideInput) -> bool:
        if cfg.overwrite:
            return False
        mpp_override = overrides.get(slide.slide_id, slide.mpp)
        store_path = coords_store_path(output_dir, slide.slide_id)
        return _reusable_store(store_path, slide, cfg, mpp_override)

    def process(slide: SlideInput) -> jobs.SlideOutcome:
        mpp_override = overrides.get(slide.slide_id, slide.mpp)
        return tile_slide(slide, cfg, mpp_override=mpp_override)

    return jobs.run_slides(
        slides,
        process,
        stage=STAGE,
        output_dir=output_dir,
        is_done=is_done,
        skip_errors=cfg.skip_errors,
        shard=cfg.shard,
        progress=cfg.progress,
    )


def tile_slide(
    slide_input: SlideInput, cfg: TilingConfig, mpp_override: float | None = None
) -> jobs.SlideOutcome:
    """Detect tissue and write the coords store, QC PNG and GeoJSON of one slide."""
    output_dir = Path(cfg.output_dir)
    store_path = coords_store_path(output_dir, slide_input.slide_id)
    with open_slide(
        slide_input.path, mpp=mpp_override, default_mpp=cfg.mpp, slide_id=slide_input.slide_id
    ) as slide:
        slide_mpp = slide.require_mpp()
        if cfg.mpp is not None and mpp_override is None and slide.mpp_source != OVERRIDE_SOURCE:
            logger.info(
                "%s: uses its own resolution %g µm/px from %s; --mpp %g only fills in slides "
                "without one (use --mpp-csv to replace a slide's value)",
                slide.slide_id,
                slide_mpp,
                slide.mpp_source,
                cfg.mpp,
            )
        try:
            geometry = grid_geometry(cfg.tile_px, cfg.overlap_px, cfg.target_mpp, slide_mpp)
        except ValueError as err:
            raise ConfigError(f"{slide.path}: {err}") from err
        size_note = _tile_size_note(slide, geometry, cfg)
        read_level = slide.best_level_for_mpp(cfg.target_mpp, cfg.level_tolerance)
        if cfg.target_mpp < slide_mpp * (1 - cfg.level_tolerance):
            logger.warning(
                "%s: target %.3f µm/px is finer than the slide's %.3f µm/px; tiles are upsampled",
                slide.slide_id,
                cfg.target_mpp,
                slide_mpp,
            )

        thumbnail, scale = _detection_thumbnail(slide, geometry, cfg.tissue_mpp)
        thumbnail_mpp = slide_mpp * scale[0]
        region = _bounds_mask(slide, scale, thumbnail)
        tissue = detect_tissue(thumbnail, thumbnail_mpp, cfg.tissue_settings(), region)
        grid = tile_grid(slide.bounds, geometry)
        fractions = tissue_fractions(grid, geometry.tile_px_level0, tissue.mask, scale)
        coords = grid[fractions >= cfg.min_tissue_fraction]

        bad: list[tuple[int, int]] = []
        # A damaged file (see `Slide.problems`) has its tiles decoded even without
        # verify_tiles, so tiles that cannot be read are dropped and counted in the status.
        if (cfg.verify_tiles or slide.problems) and len(coords):
            coords, bad = _verify_tiles(slide, coords, geometry, read_level, cfg.tile_px)

        status, message = _status(len(coords), len(bad), cfg.max_bad_tile_fraction)
        if slide.problems:
            damage = f"slide file damaged: {'; '.join(slide.problems)}"
            message = f"{message}; {damage}" if message else damage
        if size_note:
            message = f"{message}; {size_note}" if message else size_note
        attrs = coords_attrs(slide, cfg, geometry, read_level, tissue, thumbnail_mpp, status)
        attrs.update(n_grid_tiles=len(grid), n_bad_tiles=len(bad))

        polygons = mask_polygons(tissue.mask)
        geojson = tissue_geojson(
            polygons, scale, slide_mpp, {"slide_id": slide.slide_id, "tissue_method": tissue.method}
        )
        _write_json(output_dir / "tissue" / f"{slide.slide_id}.geojson", geojson)
        display = stretch_contrast(thumbnail) if tissue.method == "brightness" else thumbnail
        caption = _qc_caption(slide, cfg, tissue.method, len(coords), status)
        qc = draw_qc(display, polygons, coords, geometry.tile_px_level0, scale, caption)
        save_png(qc, output_dir / "qc" / f"{slide.slide_id}.png")
        write_coords_store(store_path, coords, attrs)

    logger.info(
        "%s: %d tiles (%s), read level %d", slide_input.slide_id, len(coords), status, read_level
    )
    return jobs.SlideOutcome(status=status, n_tiles=len(coords), message=message)


def coords_attrs(
    slide: Slide,
    cfg: TilingConfig,
    geometry: GridGeometry,
    read_level: int,
    tissue: TissueMask,
    thumbnail_mpp: float,
    status: str,
) -> dict[str, Any]:
    """Coords store attributes: slidemil's names plus the TRIDENT/CLAM names that mean the same."""
    width, height = slide.dimensions
    return {
        "slide_id": slide.slide_id,
        "slide_path": str(Path(slide.path).resolve()),
        **slide_file_fingerprint(Path(slide.path)),
        "slide_mpp": float(slide.require_mpp()),
        "mpp_source": slide.mpp_source or "",
        "reader": slide.reader,
        "target_mpp": float(cfg.target_mpp),
        "tile_px": int(cfg.tile_px),
        "tile_px_level0": float(geometry.tile_px_level0),
        "stride_level0": float(geometry.stride_level0),
        "overlap_px": int(cfg.overlap_px),
        "read_level": int(read_level),
        "read_downsample": float(slide.level_downsamples[read_level]),
        "level0_width": int(width),
        "level0_height": int(height),
        "bounds": [int(v) for v in slide.bounds],
        "tissue_method": tissue.method,
        "tissue_threshold": float(tissue.threshold),
        "tissue_mpp": float(thumbnail_mpp),
        "smoothing_um": float(cfg.smoothing_um),
        "min_tissue_area_um2": float(cfg.min_tissue_area_um2),
        "min_hole_area_um2": float(cfg.min_hole_area_um2),
        "remove_pen_marks": bool(cfg.remove_pen_marks),
        "min_tissue_fraction": float(cfg.min_tissue_fraction),
        "tiling_settings": json.dumps(_tissue_settings_of(cfg), sort_keys=True),
        "status": status,
        "slidemil_version": _version(),
        # TRIDENT / CLAM names with the same meaning.
        "patch_size": int(cfg.tile_px),
        "patch_size_level0": int(round(geometry.tile_px_level0)),
        "target_magnification": magnification_from_mpp(cfg.target_mpp),
        "level0_magnification": magnification_from_mpp(slide.require_mpp()),
        "overlap": int(cfg.overlap_px),
    }


def slide_file_fingerprint(path: Path) -> dict[str, int]:
    """Size in bytes and modification time in ns of a slide file, as stored in coords stores.

    A slide file replaced at the same path has another size or modification time, so its old
    coords store is not reused. Copies that keep both values are not told apart.
    """
    info = path.stat()
    return {"slide_file_size": int(info.st_size), "slide_file_mtime_ns": int(info.st_mtime_ns)}


def _slide_file_differences(
    attrs: Mapping[str, Any], path: Path, dimensions: tuple[int, int]
) -> list[str]:
    """Describe how the slide file differs from the one the store was made from.

    Stores written before the fingerprint attributes existed are compared by level-0
    dimensions only.
    """
    current: dict[str, int] = {"level0_width": int(dimensions[0]),
                               "level0_height": int(dimensions[1])}
    if "slide_file_size" in attrs and "slide_file_mtime_ns" in attrs:
        current.update(slide_file_fingerprint(path))
    changed = [
        f"{name} {attrs.get(name)!r} in the store, {value!r} now"
        for name, value in current.items()
        if attrs.get(name) != value
    ]
    if not changed:
        return []
    return [
        f"the slide file {path} changed since it was tiled ({', '.join(changed)}); it was "
        "probably replaced by another slide"
    ]


def _tissue_settings_of(cfg: TilingConfig) -> dict[str, Any]:
    """`TISSUE_SETTING_FIELDS` of a config as JSON-ready values."""
    dumped = cfg.model_dump(mode="json")
    return {name: dumped[name] for name in TISSUE_SETTING_FIELDS}


def _warn_dense_overlap(cfg: TilingConfig) -> None:
    """Warn when the overlap leaves a stride below `MIN_STRIDE_FRACTION` of a tile."""
    stride_px = cfg.tile_px - cfg.overlap_px
    if stride_px >= MIN_STRIDE_FRACTION * cfg.tile_px:
        return
    growth = (cfg.tile_px / stride_px) ** 2
    logger.warning(
        "--overlap-px %d with --tile-px %d leaves a stride of %d px, so every slide gets about "
        "%s times the tiles of a grid without overlap. Keep the overlap below %d px unless "
        "that is intended.",
        cfg.overlap_px,
        cfg.tile_px,
        stride_px,
        f"{growth:,.0f}",
        round((1 - MIN_STRIDE_FRACTION) * cfg.tile_px),
    )


def _tile_size_note(slide: Slide, geometry: GridGeometry, cfg: TilingConfig) -> str:
    """Warn and describe the problem when one tile is wider or taller than the scanned area."""
    _, _, width, height = slide.bounds
    if geometry.tile_px_level0 <= min(width, height):
        return ""
    note = (
        f"one tile spans {geometry.tile_px_level0:,.0f} level-0 px, more than the scanned "
        f"area of {width} x {height} px; check the slide resolution "
        f"{slide.require_mpp():g} µm/px (from {slide.mpp_source}) and --target-mpp "
        f"{cfg.target_mpp:g} / --tile-px {cfg.tile_px}"
    )
    logger.warning("%s: %s", slide.slide_id, note)
    return note


def _qc_caption(slide: Slide, cfg: TilingConfig, method: str, n_tiles: int, status: str) -> str:
    # "um" rather than "µm": Pillow's built-in font has no glyph for µ.
    return (
        f"{slide.slide_id} | slide {slide.require_mpp():.4g} um/px ({slide.mpp_source}) | "
        f"target {cfg.target_mpp:g} um/px, {cfg.tile_px} px tiles | tissue: {method} | "
        f"{n_tiles} {'tile' if n_tiles == 1 else 'tiles'} | {status}"
    )


def _detection_thumbnail(
    slide: Slide, geometry: GridGeometry, tissue_mpp: float
) -> tuple[np.ndarray, tuple[float, float]]:
    """Thumbnail for tissue detection and its level-0 pixels per thumbnail pixel (x, y).

    Its resolution is `tissue_mpp`, made finer when a tile would span fewer than
    `MIN_THUMBNAIL_PX_PER_TILE` pixels and coarser when its side would exceed
    `MAX_THUMBNAIL_SIDE`. It is never finer than level 0.
    """
    width, height = slide.dimensions
    downsample = tissue_mpp / slide.require_mpp()
    downsample = min(downsample, geometry.tile_px_level0 / MIN_THUMBNAIL_PX_PER_TILE)
    downsample = max(downsample, max(width, height) / MAX_THUMBNAIL_SIDE, 1.0)
    thumbnail = slide.get_downsampled(downsample)
    scale = (width / thumbnail.shape[1], height / thumbnail.shape[0])
    return thumbnail, scale


def _bounds_mask(slide: Slide, scale: tuple[float, float], thumbnail: np.ndarray) -> np.ndarray:
    """bool [h, w]: thumbnail pixels whose centre lies inside the slide's scanned area."""
    height, width = thumbnail.shape[:2]
    bx, by, bw, bh = slide.bounds
    centres_x = (np.arange(width) + 0.5) * scale[0]
    centres_y = (np.arange(height) + 0.5) * scale[1]
    inside_x = (centres_x >= bx) & (centres_x < bx + bw)
    inside_y = (centres_y >= by) & (centres_y < by + bh)
    return inside_y[:, None] & inside_x[None, :]


def _verify_tiles(
    slide: Slide, coords: np.ndarray, geometry: GridGeometry, read_level: int, tile_px: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Decode every tile; return the readable coords and the level-0 (x, y) of the others.

    The first `MAX_LOGGED_BAD_TILES` failures are logged one by one, the rest in one summary.
    """
    keep = np.ones(len(coords), dtype=bool)
    bad: list[tuple[int, int]] = []
    for index, (x, y) in enumerate(coords.tolist()):
        try:
            slide.read_tile(x, y, geometry.tile_px_level0, read_level, tile_px)
        except TileReadError as err:
            keep[index] = False
            bad.append((x, y))
            if len(bad) <= MAX_LOGGED_BAD_TILES:
                logger.warning(
                    "%s: dropped tile at level-0 (%d, %d): %s", slide.slide_id, x, y, err
                )
    if len(bad) > MAX_LOGGED_BAD_TILES:
        logger.warning(
            "%s: %d more unreadable tiles dropped, at level-0 %s",
            slide.slide_id,
            len(bad) - MAX_LOGGED_BAD_TILES,
            bad[MAX_LOGGED_BAD_TILES:],
        )
    return coords[keep], bad


def _status(n_tiles: int, n_bad: int, max_bad_fraction: float) -> tuple[str, str]:
    if n_bad:
        fraction = n_bad / (n_tiles + n_bad)
        message = f"{n_bad} of {n_tiles + n_bad} tiles could not be decoded and were dropped"
        if n_tiles == 0 or fraction > max_bad_fraction:
            return "partial", message
        return "ok", message
    if n_tiles == 0:
        return "no_tissue", "no tile reached --min-tissue-fraction; the store is empty"
    return "ok", ""


def _reusable_store(
    path: Path, slide_input: SlideInput, cfg: TilingConfig, mpp_override: float | None
) -> bool:
    """True when a complete store with the config's settings, made from the same slide file
    (size, modification time and level-0 dimensions) with the same mpp, exists.

    The slide is opened to resolve its mpp as `tile_slide` would now, so a corrected --mpp or
    --mpp-csv value is noticed. A slide that cannot be opened is not reusable; `tile_slide`
    then records why.

    Raises:
        ConfigError: a complete store exists but was written with other settings or from
            another slide file.
    """
    if not is_complete_store(path):
        if path.exists():
            logger.warning("%s: incomplete or unreadable store; tiling the slide again", path)
        return False
    attrs = read_coords_store(path).attrs
    try:
        with open_slide(
            slide_input.path, mpp=mpp_override, default_mpp=cfg.mpp, slide_id=slide_input.slide_id
        ) as slide:
            current_mpp, current_source = slide.mpp, slide.mpp_source
            dimensions = slide.dimensions
    except SlidemilError as err:
        logger.debug("%s: cannot check the existing store against the slide: %s", path, err)
        return False

    differences = _slide_file_differences(attrs, Path(slide_input.path), dimensions)
    differences += _setting_differences(attrs, cfg)
    stored_mpp = attrs.get("slide_mpp")
    same_mpp = (
        current_mpp is not None
        and isinstance(stored_mpp, numbers.Real)
        and math.isclose(float(stored_mpp), current_mpp, rel_tol=1e-6)
        and attrs.get("mpp_source") == (current_source or "")
    )
    if not same_mpp:
        now = "none" if current_mpp is None else f"{current_mpp:g} µm/px from {current_source}"
        differences.append(
            f"slide resolution (--mpp, --mpp-csv or the file): {stored_mpp:g} µm/px from "
            f"{attrs.get('mpp_source')} in the store, {now} now"
            if isinstance(stored_mpp, numbers.Real)
            else f"slide resolution: {stored_mpp!r} in the store, {now} now"
        )
    if differences:
        raise ConfigError(
            f"{path}: the existing store was written with other settings: "
            + "; ".join(differences)
            + ". Rerun with --overwrite (overwrite: true in a pipeline YAML) to replace it, or "
            "choose another output folder."
        )
    return True


def _setting_differences(attrs: Mapping[str, Any], cfg: TilingConfig) -> list[str]:
    """Describe each grid or tissue setting of the store that differs from `cfg`."""
    stored: dict[str, Any] = {name: attrs.get(name) for name in GEOMETRY_ATTRS}
    expected: dict[str, Any] = {name: getattr(cfg, name) for name in GEOMETRY_ATTRS}
    if "tiling_settings" in attrs:
        stored.update(json.loads(str(attrs["tiling_settings"])))
        expected.update(_tissue_settings_of(cfg))
    else:
        # Stores written before `tiling_settings` existed record only these tissue settings.
        stored.update({name: attrs.get(name) for name in LEGACY_TISSUE_ATTRS})
        expected.update({name: getattr(cfg, name) for name in LEGACY_TISSUE_ATTRS})
    return [
        f"--{name.replace('_', '-')}: {stored[name]!r} in the store, {expected[name]!r} now"
        for name in expected
        if not _same_setting(stored.get(name), expected[name])
    ]


def _same_setting(stored: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        return bool(stored == expected)
    if isinstance(stored, numbers.Real) and not isinstance(stored, (bool, np.bool_)):
        return math.isclose(float(stored), float(expected), rel_tol=1e-9, abs_tol=1e-12)
    return False


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)


def _save_config(cfg: TilingConfig, path: Path) -> None:
    replace_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _version() -> str:
    try:
        return metadata.version("slidemil")
    except metadata.PackageNotFoundError:
        return "unknown"
