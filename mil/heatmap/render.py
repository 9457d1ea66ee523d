"""Render all heatmap outputs of one slide from its attention store and the slide itself."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from mil.heatmap.config import MAX_THUMBNAIL_PX, GeoJsonOrigin, HeatmapConfig
from mil.heatmap.gallery import (
    gallery_tiles,
    render_gallery,
    select_extreme_tiles,
    write_gallery_csv,
)
from mil.heatmap.geojson import write_tile_geojson
from mil.heatmap.maps import (
    ScoreMap,
    check_store,
    predicted_class_name,
    score_maps,
    tile_px_level0_of,
)
from mil.heatmap.normalize import Normalization, NormalizedScores, normalize_scores
from mil.heatmap.overlay import blend_scores, render_figure
from mil.heatmap.raster import rasterize_tiles, tile_boxes
from preprocessing.errors import ConfigError, StoreFormatError
from preprocessing.stores import AttentionStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputPaths:
    """Files of one slide in the stage's output folder, all named `<slide_id>.<kind>`.

    Attributes:
        folder: the stage's output folder.
        slide_id: the slide.
    """

    folder: Path
    slide_id: str

    def _path(self, suffix: str) -> Path:
        return self.folder / f"{self.slide_id}{suffix}"

    @property
    def overlay(self) -> Path:
        """Slide map: `<slide_id>.png`."""
        return self._path(".png")

    def head_overlay(self, head: str) -> Path:
        """Map of one head or branch: `<slide_id>.<head>.png`."""
        return self._path(f".{head}.png")

    @property
    def geojson(self) -> Path:
        """Tile polygons for QuPath: `<slide_id>.geojson`."""
        return self._path(".geojson")

    @property
    def gallery(self) -> Path:
        """Top-tile gallery: `<slide_id>.top_tiles.png`."""
        return self._path(".top_tiles.png")

    @property
    def gallery_csv(self) -> Path:
        """Top-tile table: `<slide_id>.top_tiles.csv`."""
        return self._path(".top_tiles.csv")

    @property
    def summary(self) -> Path:
        """Summary written last: `<slide_id>.summary.json`."""
        return self._path(".summary.json")


class HeatmapSlide(Protocol):
    """Slide interface used by rendering (`preprocessing.slide.Slide` fits)."""

    @property
    def dimensions(self) -> tuple[int, int]: ...

    def get_thumbnail(self, max_size: int) -> np.ndarray: ...

    def read_tile(
        self, x: int, y: int, tile_px_level0: float, read_level: int, tile_px: int
    ) -> np.ndarray: ...


def geojson_frame(
    slide: object, level0_size: tuple[int, int], origin: GeoJsonOrigin
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Origin and image extent of the GeoJSON frame, from the slide's `bounds`.

    Returns:
        The level-0 point that becomes (0, 0), and the image extent (x0, y0, x1, y1) in the
        output frame: the bounds rectangle for `bounds`, all of level 0 for `level0`. A slide
        without `bounds` has bounds (0, 0, W0, H0).
    """
    width, height = level0_size
    if origin is GeoJsonOrigin.level0:
        return (0, 0), (0, 0, width, height)
    bounds = getattr(slide, "bounds", None)
    x, y, bounds_width, bounds_height = (0, 0, width, height) if bounds is None else (
        int(value) for value in tuple(bounds)[:4]
    )
    return (x, y), (0, 0, bounds_width, bounds_height)


def _save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _lap(seconds: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - start, 4)
    return now


def _check_slide_size(store: AttentionStore, slide: HeatmapSlide) -> tuple[int, int]:
    width, height = (int(v) for v in slide.dimensions)
    stored = (store.attrs.get("level0_width"), store.attrs.get("level0_height"))
    if all(isinstance(v, (int, np.integer)) for v in stored) and (
        (int(stored[0]), int(stored[1])) != (width, height)  # type: ignore[arg-type]
    ):
        raise StoreFormatError(
            f"{store.path}: the store was made from a slide of {stored[0]}x{stored[1]} level-0 "
            f"pixels but {getattr(slide, 'path', 'the slide')} is {width}x{height}; pass the "
            "slide the attention was computed on (--slides)."
        )
    return width, height


def thumbnail_max_size(level0_size: tuple[int, int], cfg: HeatmapConfig,
                       slide_id: str = "") -> int:
    """Longest thumbnail side in pixels from `downsample` if set, else `max_size`.

    Raises:
        ConfigError: `downsample` gives a thumbnail side above `MAX_THUMBNAIL_PX`.
    """
    if cfg.downsample is None:
        return cfg.max_size
    side = max(1, round(max(level0_size) / cfg.downsample))
    if side > MAX_THUMBNAIL_PX:
        minimum = max(level0_size) / MAX_THUMBNAIL_PX
        raise ConfigError(
            f"slide {slide_id}: downsample {cfg.downsample:g} of a {level0_size[0]}x"
            f"{level0_size[1]} slide gives a {side} px thumbnail, above the limit of "
            f"{MAX_THUMBNAIL_PX} px; use --downsample {minimum:.2f} or more, or --max-size."
        )
    return side


def _caption(
    slide_id: str, store: AttentionStore, score_map: ScoreMap, normalized: NormalizedScores,
    n_tiles: int, n_dropped: int,
) -> list[str]:
    predicted = predicted_class_name(store.attrs)
    probability = store.attrs.get("probability")
    line = f"slide {slide_id}"
    if predicted is not None:
        line += f"  |  predicted: {predicted}"
        if isinstance(probability, (int, float)) and math.isfinite(probability):
            line += f" (p = {probability:.3f})"
    if store.attrs.get("model"):
        line += f"  |  model: {store.attrs['model']}"
    tiles = f"{n_tiles} tiles" + (f", {n_dropped} NaN dropped" if n_dropped else "")
    return [line, f"map: {score_map.title}  |  {tiles}",
            f"colour: {normalized.label}"]


def _write_overlays(
    paths: OutputPaths,
    thumbnail: np.ndarray,
    coords: np.ndarray,
    tile_px_level0: float,
    level0_size: tuple[int, int],
    maps: list[ScoreMap],
    normalized: list[NormalizedScores],
    captions: list[list[str]],
    cfg: HeatmapConfig,
) -> dict[str, str]:
    """Paint every map on the thumbnail and save one figure per map; returns file names."""
    thumb_height, thumb_width = thumbnail.shape[:2]
    raster = rasterize_tiles(
        np.stack([norm.values for norm in normalized], axis=1),
        tile_boxes(coords, tile_px_level0),
        level0_size,
        (thumb_width, thumb_height),
    )
    files: dict[str, str] = {}
    for index, (score_map, norm) in enumerate(zip(maps, normalized, strict=True)):
        blended = blend_scores(thumbnail, raster.mean[..., index], raster.coverage,
                               cfg.colormap, cfg.opacity)
        figure = render_figure(blended, norm, cfg.colormap, captions[index])
        path = paths.overlay if index == 0 else paths.head_overlay(score_map.name)
        _save_png(figure, path)
        files[score_map.name] = path.name
    return files


def _write_geojson(
    paths: OutputPaths,
    coords: np.ndarray,
    tile_px_level0: float,
    maps: list[ScoreMap],
    normalized: list[NormalizedScores],
    frame: tuple[tuple[int, int], tuple[int, int, int, int]],
    cfg: HeatmapConfig,
) -> int:
    """Write the QuPath GeoJSON of the slide map and every head; returns the feature count."""
    origin, extent = frame
    measurements = {"attention": maps[0].scores}
    scale = 100.0 if cfg.normalization is Normalization.percentile else 1.0
    measurements[f"attention {cfg.normalization.value}"] = normalized[0].values * scale
    for score_map in maps[1:]:
        measurements[score_map.title] = score_map.scores
    n_features = write_tile_geojson(
        paths.geojson, coords, tile_px_level0, measurements,
        normalized[0].values, cfg.colormap, origin_xy=origin, clip_box=extent,
        object_type=cfg.geojson_object_type,
    )
    if n_features < len(coords):
        logger.warning("%s: %d of %d tiles lie outside the image extent %s of the GeoJSON "
                       "frame and were left out of %s", paths.slide_id,
                       len(coords) - n_features, len(coords), extent, paths.geojson)
    return n_features


def _write_gallery(
    paths: OutputPaths,
    slide: HeatmapSlide,
    coords: np.ndarray,
    store_rows: np.ndarray,
    tile_px_level0: float,
    score_map: ScoreMap,
    normalized: NormalizedScores,
    cfg: HeatmapConfig,
) -> None:
    """Read the top_k highest and lowest tiles of the slide map and save the gallery and CSV."""
    high, low = select_extreme_tiles(score_map.scores, cfg.top_k)
    tiles = gallery_tiles(coords, score_map.scores, normalized.values, high, "highest",
                          store_rows)
    tiles += gallery_tiles(coords, score_map.scores, normalized.values, low, "lowest",
                           store_rows)
    gallery = render_gallery(
        slide, tiles, tile_px_level0, tile_px=cfg.gallery_tile_px,
        title=f"slide {paths.slide_id}: {cfg.top_k} highest and lowest attention tiles",
        normalized_label=cfg.normalization.value,
    )
    _save_png(gallery, paths.gallery)
    write_gallery_csv(paths.gallery_csv, tiles, tile_px_level0)


def render_slide(
    store: AttentionStore,
    slide: HeatmapSlide,
    output_dir: Path,
    cfg: HeatmapConfig,
    slide_id: str | None = None,
) -> dict[str, Any]:
    """Write the overlays, GeoJSON, gallery and summary of one slide into `output_dir`.

    Files are named `<slide_id>.png`, `<slide_id>.<head>.png`, `<slide_id>.geojson`,
    `<slide_id>.top_tiles.png|csv` and `<slide_id>.summary.json` (see `OutputPaths`).

    Args:
        store: the slide's attention [N] or [N, H] with level-0 coords [N, 2].
        slide: the open slide the attention was computed on.
        output_dir: the stage's output folder; the summary is written last.
        cfg: stage settings.
        slide_id: name in captions; the store's `slide_id` attribute by default.

    Returns:
        The summary written to `<slide_id>.summary.json`.
    """
    slide_id = slide_id or str(store.attrs.get("slide_id") or store.path.stem)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    keep, n_dropped = check_store(store)
    tile_px_level0 = tile_px_level0_of(store)
    level0_size = _check_slide_size(store, slide)
    coords = store.coords[keep]
    n_tiles = int(coords.shape[0])
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = OutputPaths(output_dir, slide_id)

    max_side = thumbnail_max_size(level0_size, cfg, slide_id)
    thumbnail = np.asarray(slide.get_thumbnail(max_side))[..., :3]
    thumb_height, thumb_width = thumbnail.shape[:2]
    clock = _lap(seconds, "thumbnail", clock)

    maps = score_maps(store, keep, cfg.per_head)
    normalized = [normalize_scores(m.scores, cfg.normalization, cfg.raw_range) for m in maps]
    captions = [_caption(slide_id, store, score_map, norm, n_tiles, n_dropped)
                for score_map, norm in zip(maps, normalized, strict=True)]
    files = _write_overlays(paths, thumbnail, coords, tile_px_level0, level0_size, maps,
                            normalized, captions, cfg)
    clock = _lap(seconds, "maps", clock)

    frame = geojson_frame(slide, level0_size, cfg.geojson_origin)
    n_features = 0
    if cfg.geojson:
        n_features = _write_geojson(paths, coords, tile_px_level0, maps, normalized, frame, cfg)
        files["geojson"] = paths.geojson.name
        clock = _lap(seconds, "geojson", clock)

    if cfg.top_k > 0:
        _write_gallery(paths, slide, coords, np.flatnonzero(keep), tile_px_level0, maps[0],
                       normalized[0], cfg)
        files["gallery"] = paths.gallery.name
        files["gallery_csv"] = paths.gallery_csv.name
        clock = _lap(seconds, "gallery", clock)

    summary: dict[str, Any] = {
        "slide_id": slide_id,
        "attention_path": str(store.path),
        "slide_path": str(getattr(slide, "path", store.attrs.get("slide_path", ""))),
        "n_tiles": n_tiles,
        "n_dropped_nan": n_dropped,
        "n_heads": 1 if store.attention.ndim == 1 else int(store.attention.shape[1]),
        "tile_px_level0": tile_px_level0,
        "level0_size": list(level0_size),
        "thumbnail_size": [thumb_width, thumb_height],
        "scale_xy": [thumb_width / level0_size[0], thumb_height / level0_size[1]],
        "map_box_px": [0, 0, thumb_width, thumb_height],
        "normalization": cfg.normalization.value,
        "colormap": cfg.colormap.value,
        "geojson_origin": list(frame[0]),
        "geojson_features": n_features,
        "predicted_class": predicted_class_name(store.attrs),
        "probability": store.attrs.get("probability"),
        "maps": [m.title for m in maps],
        "attention_sha256": attention_digest(store),
        "render_settings": render_settings(cfg),
        "files": files,
        "seconds": seconds,
        "complete": True,
    }
    _write_json(summary, paths.summary)
    return summary


#: HeatmapConfig fields that change the rendered files. A summary whose recorded values differ
#: from the current config is out of date, so the slide is rendered again.
RENDER_SETTING_FIELDS = frozenset({
    "max_size", "downsample", "normalization", "raw_range", "colormap", "opacity", "per_head",
    "top_k", "gallery_tile_px", "geojson", "geojson_origin", "geojson_object_type",
})


def render_settings(cfg: HeatmapConfig) -> dict[str, Any]:
    """Return the rendering settings of `cfg` as JSON values, as recorded in the summary."""
    settings: dict[str, Any] = cfg.model_dump(mode="json", include=set(RENDER_SETTING_FIELDS))
    return settings


#: Store attributes left out of `attention_digest`: they do not change the rendered outputs.
DIGEST_EXCLUDED_ATTRS = frozenset({"complete", "slide_path"})


def attention_digest(store: AttentionStore) -> str:
    """Return the sha256 of a store's attention, coords and attributes, as hex.

    Shapes and dtypes are hashed with the bytes. Of the attributes, `slide_path` is left out
    because moved slides are passed with --slides and do not change the content.
    """
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(store.attention), np.ascontiguousarray(store.coords)):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    attrs = {k: v for k, v in store.attrs.items() if k not in DIGEST_EXCLUDED_ATTRS}
    digest.update(json.dumps(attrs, sort_keys=True, default=_json_default).encode())
    return digest.hexdigest()


def _json_default(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def read_summary(output_dir: Path, slide_id: str) -> dict[str, Any]:
    """Return the slide's `<slide_id>.summary.json`, or an empty dict when it is unreadable."""
    path = OutputPaths(Path(output_dir), slide_id).summary
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def is_complete_output(output_dir: Path, slide_id: str) -> bool:
    """True when `output_dir` contains the summary of a finished `render_slide` of the slide."""
    return bool(read_summary(output_dir, slide_id).get("complete"))


