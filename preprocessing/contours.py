"""Tissue masks to polygons and GeoJSON (QuPath reads the FeatureCollection as annotations).

Contours follow pixel edges of the mask, so a polygon covers exactly the mask's pixels. Each
4-connected tissue region becomes one Polygon: its exterior ring is counterclockwise and its
holes clockwise in the (x, y) plane of the coordinates (RFC 7946 winding), rings are closed,
and coordinates are level-0 pixels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from scipy import ndimage

Ring = list[tuple[float, float]]


def mask_polygons(mask: np.ndarray) -> list[list[Ring]]:
    """Trace the boundary of every 4-connected region of a bool mask.

    Args:
        mask: bool [h, w]; pixel (row, col) covers [col, col+1) x [row, row+1).

    Returns:
        One polygon per region: ``[exterior, *holes]``, each ring a closed list of (x, y)
        vertices in mask pixel units, with collinear vertices removed.
    """
    padded = np.pad(mask.astype(bool), 1)
    labels, count = ndimage.label(padded)
    if count == 0:
        return []

    edges = _boundary_edges(padded, labels)
    exteriors: dict[int, list[Ring]] = defaultdict(list)
    holes: dict[int, list[Ring]] = defaultdict(list)
    for label, traced in _chain_edges(edges):
        for loop in _split_at_repeated_vertices(traced):
            ring = _drop_collinear([(x - 1.0, y - 1.0) for x, y in loop])
            (exteriors if signed_area(ring) > 0 else holes)[label].append(ring)

    polygons: list[list[Ring]] = []
    for label in sorted(exteriors):
        rings = exteriors[label]
        members: list[list[Ring]] = [[ring] for ring in rings]
        for hole in holes[label]:
            # A hole's edge midpoint lies strictly inside the exterior that contains it.
            (x0, y0), (x1, y1) = hole[0], hole[1]
            point = ((x0 + x1) / 2, (y0 + y1) / 2)
            owner = next((i for i, ring in enumerate(rings) if _contains(ring, point)), 0)
            members[owner].append(hole)
        polygons.extend(members)
    return polygons


def signed_area(ring: Ring) -> float:
    """Shoelace area of a closed ring; positive when counterclockwise in the (x, y) plane."""
    total = 0.0
    for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False):
        total += x0 * y1 - x1 * y0
    return total / 2.0


def _boundary_edges(padded: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Directed unit edges between tissue and background, tissue on the right-hand side.

    Returns int64 [E, 5]: start x, start y, end x, end y, region label. Walking a region's
    edges goes clockwise on screen (y down), which is counterclockwise in the (x, y) plane.
    """
    rows, cols = np.nonzero(padded)
    region = labels[rows, cols]
    parts = []
    # (neighbour offset, edge start offset, edge end offset) for top, right, bottom, left sides.
    sides = (
        ((-1, 0), (0, 0), (1, 0)),
        ((0, 1), (1, 0), (1, 1)),
        ((1, 0), (1, 1), (0, 1)),
        ((0, -1), (0, 1), (0, 0)),
    )
    for (d_row, d_col), (sx, sy), (ex, ey) in sides:
        open_side = ~padded[rows + d_row, cols + d_col]
        r, c, lab = rows[open_side], cols[open_side], region[open_side]
        parts.append(np.stack([c + sx, r + sy, c + ex, r + ey, lab], axis=1))
    return np.concatenate(parts).astype(np.int64)


def _chain_edges(edges: np.ndarray) -> list[tuple[int, Ring]]:
    """Join directed edges into closed rings.

    At a vertex where two regions touch diagonally, two edges leave; the walk takes the right
    turn, which keeps diagonal neighbours in separate rings (4-connectivity).
    """
    outgoing: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (x0, y0, _, _, _) in enumerate(edges.tolist()):
        outgoing[(x0, y0)].append(index)
    used = np.zeros(len(edges), dtype=bool)
    edge_list = edges.tolist()

    rings: list[tuple[int, Ring]] = []
    for first in range(len(edge_list)):
        if used[first]:
            continue
        label = edge_list[first][4]
        ring: Ring = []
        current = first
        while True:
            used[current] = True
            x0, y0, x1, y1, _ = edge_list[current]
            ring.append((float(x0), float(y0)))
            candidates = outgoing[(x1, y1)]
            if len(candidates) == 1:
                current = candidates[0]
            else:
                current = _right_turn(edge_list, (x1 - x0, y1 - y0), candidates)
            if current == first or used[current]:
                break
        ring.append(ring[0])
        rings.append((label, ring))
    return rings


def _split_at_repeated_vertices(ring: Ring) -> list[Ring]:
    """Split a closed ring that passes a vertex twice into simple closed loops.

    A region whose boundary touches itself at a corner is traced as one ring through that
    corner twice. This happens when two of its pixels meet only diagonally around an enclosed
    background area. OGC validity needs that as an exterior plus a hole touching it at a point.
    """
    loops: list[Ring] = []
    stack: Ring = []
    position: dict[tuple[float, float], int] = {}
    for vertex in ring:
        if vertex in position:
            start = position[vertex]
            loop = [*stack[start:], vertex]
            for removed in stack[start + 1 :]:
                del position[removed]
            del stack[start + 1 :]
            if len(loop) >= 4:
                loops.append(loop)
        else:
            position[vertex] = len(stack)
            stack.append(vertex)
    return loops


def _contains(ring: Ring, point: tuple[float, float]) -> bool:
    """Even-odd ray casting test of a point against a closed ring."""
    x, y = point
    inside = False
    for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def _right_turn(
    edge_list: list[list[int]], direction: tuple[int, int], candidates: list[int]
) -> int:
    dx, dy = direction
    right = (-dy, dx)  # screen coordinates, y down
    for index in candidates:
        x0, y0, x1, y1, _ = edge_list[index]
        if (x1 - x0, y1 - y0) == right:
            return index
    return candidates[0]


def _drop_collinear(ring: Ring) -> Ring:
    """Remove vertices in the middle of straight runs; the ring stays closed."""
    points = ring[:-1]
    if len(points) < 4:
        return ring
    kept = []
    count = len(points)
    for i, (x, y) in enumerate(points):
        px, py = points[i - 1]
        nx, ny = points[(i + 1) % count]
        if (x - px) * (ny - y) - (y - py) * (nx - x) != 0:
            kept.append((x, y))
    kept.append(kept[0])
    return kept


def tissue_geojson(
    polygons: list[list[Ring]],
    scale: tuple[float, float],
    mpp: float | None,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """GeoJSON FeatureCollection of tissue polygons in level-0 pixels.

    Args:
        polygons: output of `mask_polygons` (mask pixel units).
        scale: level-0 pixels per mask pixel along x and y.
        mpp: µm per level-0 pixel, for the `area_um2` measurement; None leaves it out.
        properties: extra properties copied to every feature (slide id, method).
    """
    sx, sy = scale
    features = []
    for index, polygon in enumerate(polygons):
        rings = [[[x * sx, y * sy] for x, y in ring] for ring in polygon]
        area_px = signed_area(polygon[0]) + sum(signed_area(hole) for hole in polygon[1:])
        feature_properties: dict[str, Any] = {
            "objectType": "annotation",
            "classification": {"name": "Tissue", "color": [0, 160, 0]},
            "name": f"tissue {index + 1}",
            **(properties or {}),
        }
        if mpp is not None:
            area_um2 = area_px * sx * sy * mpp * mpp
            feature_properties["measurements"] = {"area_um2": round(area_um2, 1)}
        features.append(
            {
                "type": "Feature",
                "id": f"tissue-{index + 1}",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": feature_properties,
            }
        )
    return {"type": "FeatureCollection", "features": features}
