"""`slidemil extract`: embed every tile of every coords store into a feature store."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cli.logs import console

_INPUT = "Input and output"
_MODEL = "Backbone"
_COMPUTE = "Compute"
_BATCH = "Batch"

PRESET_HELP = (
    "Preset (efficientnet_lite0, resnet50_trunc, uni, uni2_h, virchow2, prov_gigapath, "
    "h_optimus_0, h_optimus_1), any timm model name, or an hf-hub:owner/repo id."
)


class PrecisionChoice(StrEnum):
    """Autocast precision; `auto` is bf16 (or fp16) on CUDA and fp32 on the CPU."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class FormatChoice(StrEnum):
    """Feature store format."""

    h5 = "h5"
    zarr = "zarr"


class DtypeChoice(StrEnum):
    """Stored feature type."""

    float16 = "float16"
    float32 = "float32"


class StartMethodChoice(StrEnum):
    """Start method of the DataLoader worker processes."""

    fork = "fork"
    spawn = "spawn"
    forkserver = "forkserver"


def command(
    coords_dir: Annotated[
        Path,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Folder of <slide_id>.h5 coords stores written by `slidemil tile`.",
            rich_help_panel=_INPUT,
        ),
    ],
    output_dir: Annotated[
        Path,
        typer.Option(
            "--output-dir",
            "-o",
            file_okay=False,
            help="Root folder of feature stores; writes <output-dir>/<backbone>/<slide_id>.h5 "
            "and manifest.csv.",
            rich_help_panel=_INPUT,
        ),
    ],
    slides: Annotated[
        str | None,
        typer.Option(
            help="Folder, glob or CSV of the slides expected and where they are now; each path "
            "replaces the slide_path recorded in the coords store (for slides moved after "
            "tiling), and a slide without a coords store is reported as failed. Default: every "
            "coords store in --coords-dir, read from its recorded slide_path.",
            rich_help_panel=_INPUT,
        ),
    ] = None,
    backbone: Annotated[str, typer.Option(help=PRESET_HELP, rich_help_panel=_MODEL)] = (
        "efficientnet_lite0"
    ),
    weights: Annotated[
        str | None,
        typer.Option(
            help="'pretrained' (the preset's weights; hub presets need network access), "
            "'random', or the path of a checkpoint file (loaded strictly, sha256 recorded).",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    tta_flips: Annotated[
        bool,
        typer.Option(
            help="Average embeddings over horizontal and vertical flips (4x compute).",
            rich_help_panel=_MODEL,
        ),
    ] = False,
    device: Annotated[
        str,
        typer.Option(help="auto, cpu, cuda or cuda:<index>.", rich_help_panel=_COMPUTE),
    ] = "auto",
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Tiles per forward pass; halved automatically on CUDA out-of-memory.",
            rich_help_panel=_COMPUTE,
        ),
    ] = 64,
    num_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Processes decoding tiles; 0 decodes in the main process. Default: 0 on the "
            "CPU, on CUDA one per available core minus one, at most 4.",
            rich_help_panel=_COMPUTE,
        ),
    ] = None,
    worker_start_method: Annotated[
        StartMethodChoice | None,
        typer.Option(
            help="How decoding processes start; default: the platform's default.",
            rich_help_panel=_COMPUTE,
        ),
    ] = None,
    prefetch_factor: Annotated[
        int,
        typer.Option(min=1, help="Batches each worker decodes ahead.", rich_help_panel=_COMPUTE),
    ] = 4,
    precision: Annotated[
        PrecisionChoice,
        typer.Option(
            help="Autocast precision; auto is bf16 (fp16 on older GPUs) on CUDA and fp32 on "
            "the CPU.",
            rich_help_panel=_COMPUTE,
        ),
    ] = PrecisionChoice.auto,
    channels_last: Annotated[
        bool,
        typer.Option(help="Run the network in channels-last layout.", rich_help_panel=_COMPUTE),
    ] = True,
    compile: Annotated[
        bool,
        typer.Option(
            help="Compile the network with torch.compile (slow start, faster batches).",
            rich_help_panel=_COMPUTE,
        ),
    ] = False,
    format: Annotated[
        FormatChoice, typer.Option(help="Feature store format.", rich_help_panel=_INPUT)
    ] = FormatChoice.h5,
    dtype: Annotated[
        DtypeChoice, typer.Option(help="Stored feature type.", rich_help_panel=_INPUT)
    ] = DtypeChoice.float16,
    max_failed_tile_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Fail a slide when more than this fraction of its tiles cannot be decoded; "
            "fewer are skipped and the slide is marked 'partial'.",
            rich_help_panel=_BATCH,
        ),
    ] = 0.05,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Process shard i/n of the slides (0-based); default SLURM_ARRAY_TASK_ID.",
            rich_help_panel=_BATCH,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Recompute feature stores that are already complete, also those made with "
            "other settings or in the other --format (that store is removed); only the "
            "processed slides' stores are replaced.",
            rich_help_panel=_BATCH,
        ),
    ] = False,
    skip_errors: Annotated[
        bool,
        typer.Option(
            help="Record a failing slide in manifest.csv and continue with the next.",
            rich_help_panel=_BATCH,
        ),
    ] = True,
    progress: Annotated[
        bool,
        typer.Option(
            help="Show a progress bar of the slides and, on a terminal, one of the current "
            "slide's tiles with tiles per second.",
            rich_help_panel=_BATCH,
        ),
    ] = True,
) -> None:
    """Embed every tile listed in the coords stores with a pretrained backbone."""
    from pydantic import ValidationError

    from cli.options import format_option_errors
    from preprocessing.errors import SlidemilError
    from preprocessing.extract import ExtractConfig, run_extraction

    try:
        cfg = ExtractConfig(
            coords_dir=coords_dir,
            output_dir=output_dir,
            slides=slides,
            backbone=backbone,
            weights=weights,
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            worker_start_method=worker_start_method.value if worker_start_method else None,
            prefetch_factor=prefetch_factor,
            precision=precision.value,
            channels_last=channels_last,
            compile=compile,
            tta_flips=tta_flips,
            format=format.value,
            dtype=dtype.value,
            max_failed_tile_fraction=max_failed_tile_fraction,
            shard=shard,
            overwrite=overwrite,
            skip_errors=skip_errors,
            progress=progress,
        )
        result = run_extraction(cfg)
    except ValidationError as err:
        console.print(f"[red]error:[/red] invalid extract options:\n{format_option_errors(err)}")
        raise typer.Exit(code=2) from err
    except SlidemilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=1) from err

    console.print(result.summary("extracted"))
    if result.n_failed:
        raise typer.Exit(code=1)
