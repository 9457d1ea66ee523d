"""`slidemil tile`: detect tissue and write level-0 tile coordinates for every slide."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cli.logs import console

_GRID = "Tile grid"
_TISSUE = "Tissue detection"
_RESOLUTION = "Resolution"
_BATCH = "Batch"


class TissueMethodChoice(StrEnum):
    """Tissue detector: `auto` picks brightness for dark (fluorescence) slides and darkness for
    slides without colour."""

    auto = "auto"
    saturation = "saturation"
    brightness = "brightness"
    darkness = "darkness"
    none = "none"


def command(
    slides: Annotated[
        str,
        typer.Argument(
            metavar="SLIDES",
            help="Slides to tile: a folder, a glob pattern (quote it, e.g. 'data/*.svs') or a "
            "CSV with a 'path' column and optional 'slide_id' and 'mpp' columns.",
            show_default=False,
        ),
    ],
    output_dir: Annotated[
        Path,
        typer.Option(
            "--output-dir",
            "-o",
            file_okay=False,
            help="Folder for <slide_id>.h5 coords stores, qc/, tissue/ and manifest.csv.",
        ),
    ],
    target_mpp: Annotated[
        float,
        typer.Option(
            min=0.01, help="Tile resolution in µm per pixel (0.5 ≈ 20x).", rich_help_panel=_GRID
        ),
    ] = 0.5,
    tile_px: Annotated[
        int, typer.Option(min=8, help="Tile side in pixels at --target-mpp.", rich_help_panel=_GRID)
    ] = 224,
    overlap_px: Annotated[
        int,
        typer.Option(
            min=0,
            help="Overlap of neighbouring tiles in pixels at --target-mpp.",
            rich_help_panel=_GRID,
        ),
    ] = 0,
    min_tissue_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Keep tiles whose area is at least this fraction tissue.",
            rich_help_panel=_GRID,
        ),
    ] = 0.25,
    level_tolerance: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.99,
            help="Read from a level up to this fraction coarser than --target-mpp (0.05 = 5%).",
            rich_help_panel=_GRID,
        ),
    ] = 0.05,
    mpp: Annotated[
        float | None,
        typer.Option(
            help="µm per level-0 pixel for slides whose files carry none (0.01 to 20); slides "
            "with their own value keep it.",
            rich_help_panel=_RESOLUTION,
        ),
    ] = None,
    mpp_csv: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help="CSV with columns slide_id,mpp (µm per level-0 pixel); overrides file metadata.",
            rich_help_panel=_RESOLUTION,
        ),
    ] = None,
    tissue_method: Annotated[
        TissueMethodChoice,
        typer.Option(
            help="Tissue detector; 'none' keeps the whole scanned area.", rich_help_panel=_TISSUE
        ),
    ] = TissueMethodChoice.auto,
    tissue_threshold: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=255,
            help="Fixed threshold on 0..255 saturation (brightfield) or blurred brightness "
            "(fluorescence); default Otsu.",
            rich_help_panel=_TISSUE,
        ),
    ] = None,
    tissue_mpp: Annotated[
        float,
        typer.Option(
            min=0.01,
            help="Resolution of the detection thumbnail in µm per pixel.",
            rich_help_panel=_TISSUE,
        ),
    ] = 4.0,
    smoothing_um: Annotated[
        float,
        typer.Option(
            min=0, help="Radius in µm of the closing/opening disk.", rich_help_panel=_TISSUE
        ),
    ] = 16.0,
    min_tissue_area_um2: Annotated[
        float,
        typer.Option(
            min=0,
            help="Drop tissue fragments smaller than this area in µm².",
            rich_help_panel=_TISSUE,
        ),
    ] = 10_000.0,
    min_hole_area_um2: Annotated[
        float,
        typer.Option(
            min=0,
            help="Fill holes in tissue smaller than this area in µm².",
            rich_help_panel=_TISSUE,
        ),
    ] = 2_500.0,
    remove_pen_marks: Annotated[
        bool,
        typer.Option(
            help="Remove green and blue pen strokes (brightfield).", rich_help_panel=_TISSUE
        ),
    ] = False,
    verify_tiles: Annotated[
        bool,
        typer.Option(
            help="Decode every kept tile now and drop unreadable ones (slower).",
            rich_help_panel=_BATCH,
        ),
    ] = False,
    max_bad_tile_fraction: Annotated[
        float,
        typer.Option(
            min=0,
            max=1,
            help="Mark a slide 'partial' above this fraction of unreadable tiles.",
            rich_help_panel=_BATCH,
        ),
    ] = 0.05,
    recursive: Annotated[
        bool,
        typer.Option(
            help="List slides in sub-folders of a folder input too.", rich_help_panel=_BATCH
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Re-tile slides that already have a complete store.", rich_help_panel=_BATCH
        ),
    ] = False,
    skip_errors: Annotated[
        bool,
        typer.Option(
            help="Record a failing slide in manifest.csv and continue with the next.",
            rich_help_panel=_BATCH,
        ),
    ] = True,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Process shard i/n of the slide list (0-based); default SLURM_ARRAY_TASK_ID.",
            rich_help_panel=_BATCH,
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option(help="Show a progress bar.", rich_help_panel=_BATCH)
    ] = True,
) -> None:
    """Detect tissue and write level-0 tile coordinates for every slide."""
    from pydantic import ValidationError
    from rich.markup import escape

    from cli.options import format_option_errors
    from preprocessing.errors import SlidemilError
    from preprocessing.tiling import TilingConfig, run_tiling

    try:
        cfg = TilingConfig(
            slides=slides,
            output_dir=output_dir,
            target_mpp=target_mpp,
            tile_px=tile_px,
            overlap_px=overlap_px,
            mpp=mpp,
            mpp_csv=mpp_csv,
            level_tolerance=level_tolerance,
            tissue_method=tissue_method.value,
            tissue_threshold=tissue_threshold,
            tissue_mpp=tissue_mpp,
            smoothing_um=smoothing_um,
            min_tissue_area_um2=min_tissue_area_um2,
            min_hole_area_um2=min_hole_area_um2,
            remove_pen_marks=remove_pen_marks,
            min_tissue_fraction=min_tissue_fraction,
            verify_tiles=verify_tiles,
            max_bad_tile_fraction=max_bad_tile_fraction,
            recursive=recursive,
            overwrite=overwrite,
            skip_errors=skip_errors,
            shard=shard,
            progress=progress,
        )
        result = run_tiling(cfg)
    except ValidationError as err:
        message = escape(format_option_errors(err))
        console.print(f"[red]error:[/red] invalid tiling options:\n{message}")
        raise typer.Exit(code=2) from err
    except SlidemilError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(code=1) from err

    console.print(result.summary("tiled"))
    if result.n_failed:
        raise typer.Exit(code=1)
