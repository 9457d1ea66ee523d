"""`slidemil predict`: predictions and attention stores from a trained run directory."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cli.logs import console

_INPUT = "Input and output"
_MODELS = "Models"
_COMPUTE = "Compute"


class CheckpointChoice(StrEnum):
    """Checkpoint used from each fold and seed."""

    best = "best"
    last = "last"


def command(
    run_dir: Annotated[
        Path,
        typer.Option(exists=True, file_okay=False,
                     help="Run directory written by `slidemil train`.", rich_help_panel=_INPUT),
    ],
    features_dir: Annotated[
        Path,
        typer.Option(exists=True, file_okay=False,
                     help="Folder of <slide_id>.h5|.zarr feature stores to predict.",
                     rich_help_panel=_INPUT),
    ],
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", file_okay=False,
                     help="Where predictions.csv and attention/ go; default: the run directory. "
                     "An existing predictions.csv keeps the rows of slides not predicted now.",
                     rich_help_panel=_INPUT),
    ] = None,
    slides: Annotated[
        list[str] | None,
        typer.Option("--slide", help="Slide id to predict; repeatable. Default: every store.",
                     rich_help_panel=_INPUT),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False,
                     help="Label CSV; adds a label column and prediction_metrics.json.",
                     rich_help_panel=_INPUT),
    ] = None,
    write_attention: Annotated[
        bool, typer.Option(help="Write attention/<slide_id>.h5 per slide.",
                           rich_help_panel=_INPUT)
    ] = True,
    folds: Annotated[
        list[str] | None,
        typer.Option("--fold", help="Split to use (fold_0, ..., or fixed); repeatable. "
                     "Default: all.", rich_help_panel=_MODELS),
    ] = None,
    seeds: Annotated[
        list[int] | None,
        typer.Option("--seed", help="Seed to use; repeatable. Default: all.",
                     rich_help_panel=_MODELS),
    ] = None,
    ensemble: Annotated[
        bool, typer.Option(help="Average all selected models; --no-ensemble needs exactly one.",
                           rich_help_panel=_MODELS)
    ] = True,
    checkpoint: Annotated[
        CheckpointChoice,
        typer.Option(help="Best validation epoch or last epoch of each model.",
                     rich_help_panel=_MODELS),
    ] = CheckpointChoice.best,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:<index>.", rich_help_panel=_COMPUTE)
    ] = "auto",
    pack_len: Annotated[
        int | None,
        typer.Option(min=1, help="Tiles per inference pack; default: the run's pack_len. "
                     "Longer slides get a pack of their own; no tile is dropped.",
                     rich_help_panel=_COMPUTE),
    ] = None,
    num_workers: Annotated[
        int, typer.Option(min=0, help="Processes reading packs from the stores.",
                          rich_help_panel=_COMPUTE)
    ] = 0,
    amp: Annotated[bool, typer.Option(help="bf16 autocast on CUDA.",
                                      rich_help_panel=_COMPUTE)] = True,
    n_bootstrap: Annotated[
        int, typer.Option(min=0, help="Bootstrap resamples for 95% CIs (with --labels).",
                          rich_help_panel=_COMPUTE)
    ] = 1000,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.",
                                           rich_help_panel=_COMPUTE)] = True,
) -> None:
    """Predict every slide with one model or the ensemble of a run's folds and seeds."""
    from pydantic import ValidationError

    from mil.predict import PredictConfig, run_prediction
    from preprocessing.errors import SlidemilError

    try:
        cfg = PredictConfig(
            run_dir=run_dir, features_dir=features_dir, output_dir=output_dir, folds=folds or None,
            seeds=seeds or None, ensemble=ensemble, checkpoint=checkpoint.value,
            slides=slides or None, labels=labels, device=device, pack_len=pack_len,
            num_workers=num_workers, amp=amp, write_attention=write_attention,
            n_bootstrap=n_bootstrap, progress=progress,
        )
        result = run_prediction(cfg)
    except ValidationError as err:
        from mil.train import validation_messages

        for line in validation_messages(err):
            console.print(f"[red]error:[/red] {line}", soft_wrap=True)
        raise typer.Exit(code=2) from err
    except SlidemilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=1) from err

    console.print(f"predict: {result}")
    if result.n_failed:
        raise typer.Exit(code=1)
