"""Attention heatmaps for pathologists: PNG overlays, QuPath GeoJSON and top-tile galleries."""

from mil.heatmap.colormap import Colormap, apply_colormap
from mil.heatmap.config import GeoJsonOrigin, HeatmapConfig
from mil.heatmap.geojson import read_tile_geojson, write_tile_geojson
from mil.heatmap.normalize import Normalization, NormalizedScores, normalize_scores
from mil.heatmap.raster import ScoreRaster, rasterize_tiles, tile_boxes
from mil.heatmap.render import OutputPaths, render_slide
from mil.heatmap.run import run_heatmaps

__all__ = [
    "Colormap",
    "GeoJsonOrigin",
    "HeatmapConfig",
    "Normalization",
    "NormalizedScores",
    "OutputPaths",
    "ScoreRaster",
    "apply_colormap",
    "normalize_scores",
    "rasterize_tiles",
    "read_tile_geojson",
    "render_slide",
    "run_heatmaps",
    "tile_boxes",
    "write_tile_geojson",
]
