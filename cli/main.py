"""The `slidemil` command: one sub-command per stage, `run` for all of them, `doctor`."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from cli import extract, heatmap, predict, tile, train
from cli.logs import console, setup_logging

app = typer.Typer(
    name="slidemil",
    help="Whole slide images to slide-level predictions and attention heatmaps.\n\n"
    "Stages: tile -> extract -> train -> predict -> heatmap; `run` chains them from one YAML.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log debug messages.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Log warnings and errors only.")
    ] = False,
) -> None:
    """Set up logging for every sub-command."""
    setup_logging(verbose=verbose, quiet=quiet)


app.command("tile", help="Detect tissue and write level-0 tile coordinates per slide.")(
    tile.command
)
app.command("extract", help="Embed every tile with a pretrained backbone into feature stores.")(
    extract.command
)
app.command("train", help="Train a MIL model on packed bags of tile features.")(train.command)
app.command("predict", help="Predict slides and write per-tile attention.")(predict.command)
app.command("heatmap", help="Write attention overlays (PNG), QuPath GeoJSON and top tiles.")(
    heatmap.command
)


@app.command("run")
def run(
    config: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True,
                       help="Pipeline YAML with output_dir and tile/extract/train/predict/heatmap "
                       "sections."),
    ],
    stages: Annotated[
        str | None,
        typer.Option(help="Comma-separated stages to run, e.g. 'predict,heatmap'. "
                     "Default: the YAML's `stages`, else all five."),
    ] = None,
) -> None:
    """Run the pipeline stages in order; finished slides and stages are reused."""
    from cli.pipeline import load_pipeline_config, run_pipeline, stage_folders
    from preprocessing.errors import SlidemilError

    selected = None
    if stages is not None:
        selected = [name.strip() for name in stages.split(",")] if stages.strip() else []
    try:
        pipeline = load_pipeline_config(config, selected)
        outcomes = run_pipeline(pipeline, source=config)
    except SlidemilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=1) from err

    folders = stage_folders(pipeline)
    console.print("\n[bold]slidemil run finished.[/bold] Outputs:")
    for outcome in outcomes:
        console.print(f"  {outcome.stage:8s} {outcome.output}")
    if "heatmap" in [outcome.stage for outcome in outcomes]:
        console.print(f"\nOpen the heatmaps in {folders['heatmaps']} "
                      "(PNG overlays; *.geojson imports into QuPath).")
    if any(outcome.failed for outcome in outcomes) or len(outcomes) < len(pipeline.stages):
        raise typer.Exit(code=1)


@app.command("doctor")
def doctor() -> None:
    """Print the versions and devices slidemil will use, to paste into bug reports."""
    import torch

    rows = [("python", sys.version.split()[0]), ("platform", platform.platform())]
    for package in ("slidemil", "torch", "timm", "openslide-python", "openslide-bin", "h5py",
                    "zarr", "numpy"):
        try:
            rows.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            rows.append((package, "not installed"))
    try:
        import openslide

        rows.append(("OpenSlide library", openslide.__library_version__))
    except (ImportError, OSError) as err:
        rows.append(("OpenSlide library", f"cannot load: {err}"))
    rows.append(("CUDA available", str(torch.cuda.is_available())))
    for index in range(torch.cuda.device_count()):
        rows.append((f"cuda:{index}", torch.cuda.get_device_name(index)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        console.print(f"{name:<{width}}  {value}")
