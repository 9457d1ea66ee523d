"""Tile scores as a GeoJSON FeatureCollection that QuPath (0.4 or later) imports as objects.

Each tile is one Feature: a closed, counter-clockwise square Polygon in level-0 pixels (x to
the right, y down, origin at the top-left of the image as the viewer shows it), and
properties in QuPath's layout: `objectType` ("tile" or "detection"), `classification`
({"name", "color": [r, g, b]}) so tiles are coloured by score bin as soon as they load, and
`measurements` ({name: number}) for QuPath's measurement maps and tables. QuPath's GeoJSON
reader (qupath.lib.io.PathObjectTypeAdapters) reads exactly these keys.

The file is written feature by feature, so memory does not grow with the number of tiles.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mil.heatmap.colormap import Colormap, apply_colormap
from mil.heatmap.raster import tile_boxes


def score_bin_names(n_bins: int, prefix: str = "attention") -> list[str]:
    """Classification names of `n_bins` equal bins of the normalised score, low to high."""
    edges = [round(100 * i / n_bins) for i in range(n_bins + 1)]
    return [f"{prefix} {edges[i]}-{edges[i + 1]}%" for i in range(n_bins)]


def _number(value: float) -> str:
    """JSON text of a finite number: integers without a fraction, others to 1e-3 or 6 digits."""
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    if abs(value) >= 1:
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return f"{value:.6g}"


def write_tile_geojson(
    path: Path,
    coords: np.ndarray,
    tile_px_level0: float,
    measurements: Mapping[str, np.ndarray],
    normalized: np.ndarray,
    colormap: Colormap | str = Colormap.viridis,
    origin_xy: tuple[float, float] = (0.0, 0.0),
    clip_box: tuple[float, float, float, float] | None = None,
    n_bins: int = 10,
    object_type: str = "tile",
    class_prefix: str = "attention",
) -> int:
    """Write one square Polygon Feature per tile, atomically.

    Args:
        path: destination `.geojson`; written to a temporary name and moved into place.
        coords: int [N, 2] level-0 (x, y) top-left corners.
        tile_px_level0: tile side in level-0 pixels.
        measurements: name -> float [N] finite values stored under `properties.measurements`.
        normalized: float [N] scores in [0, 1]; they choose each tile's classification bin and
            its colour.
        colormap: colour map for the classification colours.
        origin_xy: level-0 point subtracted from every coordinate; (bounds_x, bounds_y) puts
            tiles in the frame of viewers that crop the slide to its bounds.
        clip_box: (x0, y0, x1, y1) image extent in the output frame. Polygons are clipped to
            it, because edge tiles may reach past the image, and tiles left with no area are
            not written.
        n_bins: number of classification bins of the normalised score.
        object_type: QuPath object type, "tile" or "detection" (both are detection objects).
        class_prefix: first word of the classification names.

    Returns:
        The number of features written: N less the tiles entirely outside `clip_box`.

    Raises:
        ValueError: shapes disagree or a coordinate or measurement is NaN or infinite.
    """
    path = Path(path)
    boxes = tile_boxes(coords, tile_px_level0)
    boxes -= np.array([origin_xy[0], origin_xy[1], origin_xy[0], origin_xy[1]], dtype=np.float64)
    count = boxes.shape[0]
    normalized = np.asarray(normalized, dtype=np.float64).reshape(-1)
    if normalized.shape[0] != count:
        raise ValueError(f"{path}: {normalized.shape[0]} normalised scores for {count} tiles")
    columns: list[tuple[str, np.ndarray]] = []
    for name, values in measurements.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape[0] != count:
            raise ValueError(f"{path}: measurement {name!r} has {values.shape[0]} values for "
                             f"{count} tiles")
        columns.append((json.dumps(name), values))
    for name, values in [("coordinates", boxes), ("normalised scores", normalized)] + [
        (json.loads(key), values) for key, values in columns
    ]:
        if not np.isfinite(values).all():
            raise ValueError(f"{path}: {name} contain NaN or inf; drop those tiles first")

    if clip_box is not None:
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], clip_box[0], clip_box[2])
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], clip_box[1], clip_box[3])
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not inside.all():
            boxes, normalized = boxes[inside], normalized[inside]
            columns = [(name, values[inside]) for name, values in columns]
            count = boxes.shape[0]

    bins = np.minimum((np.clip(normalized, 0.0, 1.0) * n_bins).astype(np.int64), n_bins - 1)
    bin_colors = apply_colormap((np.arange(n_bins) + 0.5) / n_bins, colormap)
    classifications = [
        json.dumps({"name": name, "color": [int(c) for c in color]}, separators=(",", ":"))
        for name, color in zip(score_bin_names(n_bins, class_prefix), bin_colors, strict=True)
    ]
    object_type_json = json.dumps(object_type)

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write('{"type":"FeatureCollection","features":[\n')
            box_rows = boxes.tolist()
            value_rows = [values.tolist() for _, values in columns]
            names = [name for name, _ in columns]
            bin_list = bins.tolist()
            for row in range(count):
                x0, y0, x1, y1 = (_number(v) for v in box_rows[row])
                ring = (f"[[{x0},{y0}],[{x1},{y0}],[{x1},{y1}],[{x0},{y1}],[{x0},{y0}]]")
                values_json = ",".join(
                    f"{name}:{_number(values[row])}"
                    for name, values in zip(names, value_rows, strict=True)
                )
                handle.write(
                    f'{"," if row else ""}{{"type":"Feature","geometry":{{"type":"Polygon",'
                    f'"coordinates":[{ring}]}},"properties":{{"objectType":{object_type_json},'
                    f'"classification":{classifications[bin_list[row]]},'
                    f'"measurements":{{{values_json}}}}}}}\n'
                )
            handle.write("]}\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def read_tile_geojson(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """Read tiles written by `write_tile_geojson` (or square polygons exported by QuPath).

    Returns:
        boxes float64 [N, 4] as (x0, y0, x1, y1) in the file's frame, measurements as
        name -> float64 [N] (NaN where a feature lacks one), and each feature's classification
        name ("" when it has none).
    """
    data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    features = data.get("features", [])
    corners: list[tuple[float, float, float, float]] = []
    names: list[str] = []
    table: dict[str, np.ndarray] = {}
    for row, feature in enumerate(features):
        ring = feature["geometry"]["coordinates"][0]
        xs = [point[0] for point in ring]
        ys = [point[1] for point in ring]
        corners.append((min(xs), min(ys), max(xs), max(ys)))
        properties = feature.get("properties", {})
        names.append(str(properties.get("classification", {}).get("name", "")))
        for name, value in properties.get("measurements", {}).items():
            column = table.setdefault(name, np.full(len(features), math.nan))
            column[row] = float(value)
    boxes = np.asarray(corners, dtype=np.float64).reshape(-1, 4)
    return boxes, table, names
