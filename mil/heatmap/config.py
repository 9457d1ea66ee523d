"""Configuration of the heatmap stage (`slidemil heatmap`, YAML section `heatmap`)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mil.heatmap.colormap import Colormap
from mil.heatmap.normalize import Normalization
from preprocessing.jobs import Shard

#: Largest thumbnail side in pixels. Rendering holds several float planes of the thumbnail size:
#: benchmarks/heatmap.py measured 50 to 75 bytes per thumbnail pixel at 2048 and 4096 px, so
#: 8192 x 8192 needs an estimated 3.5 to 5 GB.
MAX_THUMBNAIL_PX = 8192


class GeoJsonOrigin(StrEnum):
    """Frame of the GeoJSON coordinates.

    `level0`: the slide's level-0 frame as OpenSlide reads it, the frame of the stored coords.
    `bounds`: level-0 minus the slide's bounds origin (`openslide.bounds-x/-y`), the frame of
    viewers that crop a slide to its bounds, such as QuPath's OpenSlide reader for MRXS.
    Slides without bounds have origin (0, 0), so both frames agree for them.
    """

    level0 = "level0"
    bounds = "bounds"


class HeatmapConfig(BaseModel):
    """Settings of the heatmap stage; files named `<slide_id>.*` are written to `output_dir`.

    Attributes:
        attention_dir: folder of `<slide_id>.h5` attention stores, a single store (one-slide
            mode), or a run/predict folder that contains `attention/`.
        output_dir: destination of `<slide_id>.png`, `.geojson`, ... and `manifest.csv`.
        slides: folder, glob or CSV of slides that overrides each store's `slide_path`
            attribute (for slides moved since prediction). Matched by slide id.
        slide_ids: only these slides; all stores by default.
        max_size: longest side of the thumbnail in pixels, at most `MAX_THUMBNAIL_PX`.
        downsample: level-0 pixels per thumbnail pixel; overrides `max_size` when set. A slide
            whose thumbnail would exceed `MAX_THUMBNAIL_PX` pixels fails with ConfigError.
        normalization: percentile rank within the slide, min-max within the slide, or raw.
        raw_range: scores mapped to the two ends of the colour bar by `raw`.
        colormap: colour map of the scores.
        opacity: weight of the score colour over fully covered thumbnail pixels.
        per_head: also write one map per attention head or branch of [N, H] attention.
        top_k: tiles in each of the highest and lowest groups of the gallery; 0 writes none.
        gallery_tile_px: side of each gallery tile in pixels (read at level 0, then resized).
        geojson: write the QuPath GeoJSON.
        geojson_origin: frame of the GeoJSON coordinates (see `GeoJsonOrigin`).
        geojson_object_type: QuPath object type of each tile polygon.
        overwrite: redo slides whose outputs are already complete.
        skip_errors: continue with the next slide when one fails (it becomes a manifest row).
        shard: "i/n" to process only the i-th of n interleaved parts of the slide list.
    """

    model_config = ConfigDict(extra="forbid")

    attention_dir: Path
    output_dir: Path
    slides: str | None = None
    slide_ids: list[str] | None = None
    max_size: int = Field(2048, ge=16, le=MAX_THUMBNAIL_PX)
    downsample: float | None = Field(None, gt=0)
    normalization: Normalization = Normalization.percentile
    raw_range: tuple[float, float] = (0.0, 1.0)
    colormap: Colormap = Colormap.viridis
    opacity: float = Field(0.5, ge=0.0, le=1.0)
    per_head: bool = True
    top_k: int = Field(8, ge=0, le=256)
    gallery_tile_px: int = Field(192, ge=32, le=2048)
    geojson: bool = True
    geojson_origin: GeoJsonOrigin = GeoJsonOrigin.bounds
    geojson_object_type: Literal["tile", "detection"] = "tile"
    overwrite: bool = False
    skip_errors: bool = True
    shard: Shard = None

    @model_validator(mode="after")
    def _check_raw_range(self) -> HeatmapConfig:
        low, high = self.raw_range
        if not high > low:
            raise ValueError(
                f"raw_range (--raw-min, --raw-max) must be (low, high) with low < high, got "
                f"{self.raw_range}"
            )
        return self
