"""`slidemil heatmap`: attention overlays, QuPath GeoJSON and top-tile galleries per slide."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cli.logs import console

PANEL_INPUT = "Input and output"
PANEL_LOOK = "Overlay"
PANEL_EXPORT = "GeoJSON and gallery"
PANEL_RUN = "Batch"


# The choices mirror the enums of mil.heatmap so that `--help` does not import the rendering
# stack; a test checks that they agree.


class NormalizationChoice(StrEnum):
    """Normalisation choices of `mil.heatmap.Normalization`."""

    percentile = "percentile"
    minmax = "minmax"
    raw = "raw"


class ColormapChoice(StrEnum):
    """Colour map choices of `mil.heatmap.Colormap`."""

    viridis = "viridis"
    inferno = "inferno"
    coolwarm = "coolwarm"
    jet = "jet"


class OriginChoice(StrEnum):
    """GeoJSON frame choices of `mil.heatmap.GeoJsonOrigin`."""

    bounds = "bounds"
    level0 = "level0"


class ObjectTypeChoice(StrEnum):
    """QuPath object type of each tile polygon."""

    tile = "tile"
    detection = "detection"


def command(
    attention_dir: Annotated[
        Path,
        typer.Option(exists=True, help="Folder of <slide_id>.h5 attention stores from "
                     "`slidemil predict`, one such file, or a folder containing attention/.",
                     rich_help_panel=PANEL_INPUT),
    ],
    output_dir: Annotated[
        Path,
        typer.Option("--output-dir", "-o", file_okay=False, help="Output folder of "
                     "<slide_id>.png, .geojson, .top_tiles.png and manifest.csv.",
                     rich_help_panel=PANEL_INPUT),
    ],
    slides: Annotated[
        str | None,
        typer.Option(help="Folder, glob or CSV of slides, used instead of the slide_path stored "
                     "in each attention store (for moved slides).", rich_help_panel=PANEL_INPUT),
    ] = None,
    slide_id: Annotated[
        list[str] | None,
        typer.Option("--slide-id", help="Only this slide; repeat for several. Default: every "
                     "store.", rich_help_panel=PANEL_INPUT),
    ] = None,
    max_size: Annotated[
        int,
        typer.Option(min=16, max=8192, help="Longest side of the thumbnail, in pixels.",
                     rich_help_panel=PANEL_LOOK),
    ] = 2048,
    downsample: Annotated[
        float | None,
        typer.Option(min=0.001, help="Level-0 pixels per thumbnail pixel; "
                     "overrides --max-size.", rich_help_panel=PANEL_LOOK),
    ] = None,
    normalization: Annotated[
        NormalizationChoice,
        typer.Option(help="Colour scale: percentile rank within the slide, min-max within the "
                     "slide, or raw scores over --raw-min..--raw-max.",
                     rich_help_panel=PANEL_LOOK),
    ] = NormalizationChoice.percentile,
    raw_min: Annotated[
        float, typer.Option(help="Score at the bottom of the colour bar for --normalization "
                            "raw.", rich_help_panel=PANEL_LOOK),
    ] = 0.0,
    raw_max: Annotated[
        float, typer.Option(help="Score at the top of the colour bar for --normalization raw.",
                            rich_help_panel=PANEL_LOOK),
    ] = 1.0,
    colormap: Annotated[
        ColormapChoice, typer.Option(help="Colour map.", rich_help_panel=PANEL_LOOK),
    ] = ColormapChoice.viridis,
    opacity: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Weight of the score colour over tissue, 0 to 1.",
                     rich_help_panel=PANEL_LOOK),
    ] = 0.5,
    per_head: Annotated[
        bool,
        typer.Option(help="Also write one map per attention head or branch.",
                     rich_help_panel=PANEL_LOOK),
    ] = True,
    top_k: Annotated[
        int,
        typer.Option(min=0, max=256, help="Tiles in each of the highest and lowest groups of "
                     "the gallery; 0 writes no gallery.", rich_help_panel=PANEL_EXPORT),
    ] = 8,
    gallery_tile_px: Annotated[
        int,
        typer.Option(min=32, max=2048, help="Side of each gallery tile, in pixels.",
                     rich_help_panel=PANEL_EXPORT),
    ] = 192,
    geojson: Annotated[
        bool,
        typer.Option(help="Write <slide_id>.geojson for QuPath.", rich_help_panel=PANEL_EXPORT),
    ] = True,
    geojson_origin: Annotated[
        OriginChoice,
        typer.Option(help="GeoJSON frame: 'bounds' subtracts the slide's bounds origin "
                     "(matches QuPath for MRXS and other slides with bounds; no change for "
                     "others), 'level0' keeps OpenSlide level-0 pixels.",
                     rich_help_panel=PANEL_EXPORT),
    ] = OriginChoice.bounds,
    geojson_object_type: Annotated[
        ObjectTypeChoice,
        typer.Option(help="QuPath object type of each tile polygon.",
                     rich_help_panel=PANEL_EXPORT),
    ] = ObjectTypeChoice.tile,
    overwrite: Annotated[
        bool, typer.Option(help="Redo slides whose outputs are complete.",
                           rich_help_panel=PANEL_RUN),
    ] = False,
    skip_errors: Annotated[
        bool, typer.Option(help="Continue with the next slide when one fails.",
                           rich_help_panel=PANEL_RUN),
    ] = True,
    shard: Annotated[
        str | None,
        typer.Option(help="Process part i of n (zero-based, 'i/n'); default: "
                     "SLURM_ARRAY_TASK_ID if set, else all.", rich_help_panel=PANEL_RUN),
    ] = None,
) -> None:
    """Write attention overlays (PNG), QuPath GeoJSON and top-tile galleries per slide."""
    from pydantic import ValidationError

    from cli.options import format_option_errors
    from mil.heatmap import Colormap, GeoJsonOrigin, HeatmapConfig, Normalization, run_heatmaps
    from preprocessing.errors import SlidemilError

    try:
        cfg = HeatmapConfig(
            attention_dir=attention_dir,
            output_dir=output_dir,
            slides=slides,
            slide_ids=slide_id or None,
            max_size=max_size,
            downsample=downsample,
            normalization=Normalization(normalization.value),
            raw_range=(raw_min, raw_max),
            colormap=Colormap(colormap.value),
            opacity=opacity,
            per_head=per_head,
            top_k=top_k,
            gallery_tile_px=gallery_tile_px,
            geojson=geojson,
            geojson_origin=GeoJsonOrigin(geojson_origin.value),
            geojson_object_type=geojson_object_type.value,
            overwrite=overwrite,
            skip_errors=skip_errors,
            shard=shard,
        )
        result = run_heatmaps(cfg)
    except ValidationError as err:
        console.print(f"[red]error:[/red] invalid heatmap options:\n{format_option_errors(err)}")
        raise typer.Exit(code=2) from err
    except SlidemilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=1) from err

    console.print(result.summary("rendered"))
    if result.n_failed:
        raise typer.Exit(code=1)
