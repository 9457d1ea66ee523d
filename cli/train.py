"""`slidemil train`: train a MIL model on feature stores; options override the YAML config."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.logs import console

_INPUT = "Input and output"
_MODEL = "Model"
_SPLIT = "Splits and seeds"
_OPTIM = "Optimisation"
_PACK = "Packing"
_SELECT = "Model selection"
_COMPUTE = "Compute"


class SplitChoice(StrEnum):
    """Source of the train, validation and test split."""

    auto = "auto"
    column = "column"
    kfold = "kfold"
    holdout = "holdout"
    files = "files"


class BalanceChoice(StrEnum):
    """Remedy for class imbalance."""

    class_weights = "class_weights"
    sampler = "sampler"
    none = "none"


class MonitorChoice(StrEnum):
    """Validation metric for early stopping and the best checkpoint."""

    loss = "loss"
    accuracy = "accuracy"
    balanced_accuracy = "balanced_accuracy"
    auroc = "auroc"
    f1_macro = "f1_macro"
    qwk = "qwk"


class ThresholdChoiceOption(StrEnum):
    """Binary decision threshold."""

    fixed = "fixed"
    youden = "youden"


def _parse_model_options(items: list[str] | None) -> dict[str, Any]:
    """Turn KEY=VALUE strings into a dict, reading each value as YAML (numbers, booleans)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items or []:
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise typer.BadParameter(f"--model-option {item!r} must look like KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _parse_class_order(text: str | None) -> list[str] | None:
    """Split a comma-separated class order, rejecting blank and repeated names."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise typer.BadParameter(f"--class-order {text!r} must list each class once, "
                                 "comma-separated, e.g. low,intermediate,high")
    return names


def command(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", exists=True, dir_okay=False, readable=True,
            help="YAML with the training fields (flat, or a pipeline file's `train:` section). "
            "Options given on the command line override it.",
            rich_help_panel=_INPUT,
        ),
    ] = None,
    features_dir: Annotated[
        Path | None,
        typer.Option(exists=True, file_okay=False,
                     help="Folder of <slide_id>.h5|.zarr feature stores. Required unless "
                     "--config sets features_dir.",
                     rich_help_panel=_INPUT),
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(file_okay=False, help="Run directory to write (checkpoints, metrics, logs). "
                     "Required unless --config sets run_dir.",
                     rich_help_panel=_INPUT),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False,
                     help="Label CSV with slide_id and label, optional case_id and split. "
                     "Required unless --config sets labels.",
                     rich_help_panel=_INPUT),
    ] = None,
    slide_column: Annotated[
        str | None,
        typer.Option(help="Slide id column of the label CSV; default slide_id, slide, ...",
                     rich_help_panel=_INPUT),
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option(help="Label column of the label CSV; default label, target or class.",
                     rich_help_panel=_INPUT),
    ] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option(help="Replace a run directory that contains another run.",
                     rich_help_panel=_INPUT),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Registered model name (abmil, acmil, ...) or a model preset YAML. "
                     "Default: abmil.",
                     rich_help_panel=_MODEL),
    ] = None,
    model_option: Annotated[
        list[str] | None,
        typer.Option(help="Model constructor option KEY=VALUE overriding the preset; repeatable.",
                     rich_help_panel=_MODEL),
    ] = None,
    ordinal: Annotated[
        bool | None,
        typer.Option(help="Classes are ordered grades; reports quadratic weighted kappa. Text "
                     "grades need --class-order.", rich_help_panel=_MODEL),
    ] = None,
    class_order: Annotated[
        str | None,
        typer.Option(help="Class names in index order, comma-separated (ordinal grades from "
                     "lowest to highest, e.g. low,intermediate,high). Default: numbers by "
                     "value, text alphabetically.", rich_help_panel=_MODEL),
    ] = None,
    split: Annotated[
        SplitChoice | None,
        typer.Option(help="auto: the label CSV's split column if present, else kfold; column: "
                     "the split column; kfold: patient-level stratified k-fold; holdout: one "
                     "train/val split; files: split CSVs from --splits-dir. Default: auto.",
                     rich_help_panel=_SPLIT),
    ] = None,
    folds: Annotated[
        int | None, typer.Option(min=2, help="Folds of patient-level stratified k-fold. "
                                 "Default: 5.",
                                 rich_help_panel=_SPLIT)
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of patients in validation (holdout "
                                   "split), between 0 and 1. Default: 0.2.",
                                   rich_help_panel=_SPLIT)
    ] = None,
    test_fraction: Annotated[
        float | None, typer.Option(help="Share of patients held out as a test set, "
                                   "0 to below 1. Default: 0.",
                                   rich_help_panel=_SPLIT)
    ] = None,
    splits_dir: Annotated[
        Path | None, typer.Option(exists=True, file_okay=False,
                                  help="Folder of split CSVs (slide_id, split) for --split files.",
                                  rich_help_panel=_SPLIT)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the first model. Default: 0.",
                                             rich_help_panel=_SPLIT)] = None,
    n_seeds: Annotated[
        int | None, typer.Option(min=1, help="Models per split, with seeds seed, seed+1, ... "
                                 "Default: 1.",
                                 rich_help_panel=_SPLIT)
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Maximum epochs. Default: 50.",
                                               rich_help_panel=_OPTIM)] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of AdamW, above 0. "
                                             "Default: 2e-4.",
                                             rich_help_panel=_OPTIM)] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay. Default: 0.01.",
                                                       rich_help_panel=_OPTIM)] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option(help="Linear warm-up length in epochs. "
                                   "Default: 1.",
                                   rich_help_panel=_OPTIM)
    ] = None,
    grad_clip: Annotated[
        float | None, typer.Option(help="Maximum gradient norm; 0 disables clipping. "
                                   "Default: 1.",
                                   rich_help_panel=_OPTIM)
    ] = None,
    packs_per_step: Annotated[
        int | None, typer.Option(min=1, help="Packs accumulated per optimizer step. "
                                 "Default: 1.",
                                 rich_help_panel=_OPTIM)
    ] = None,
    balance: Annotated[
        BalanceChoice | None,
        typer.Option(help="Inverse-frequency class weights, a balanced sampler, or none. "
                     "Default: class_weights.", rich_help_panel=_OPTIM),
    ] = None,
    amp: Annotated[bool | None, typer.Option(help="bf16 autocast on CUDA. Default: on.",
                                             rich_help_panel=_OPTIM)] = None,
    pack_len: Annotated[
        int | None, typer.Option(min=1, help="Tiles per pack, padding included. "
                                 "Default: 16384.",
                                 rich_help_panel=_PACK)
    ] = None,
    main_fraction: Annotated[
        float | None, typer.Option(help="Share of each shuffled bag in its main part; 1.0 turns "
                                   "hyperslides off. Default: 0.8.", rich_help_panel=_PACK)
    ] = None,
    max_tiles_per_bag: Annotated[
        int | None, typer.Option(min=1, help="Cap on tiles of a main part or hyperslide. "
                                 "Default: no cap.",
                                 rich_help_panel=_PACK)
    ] = None,
    residual_loss_weight: Annotated[
        float | None, typer.Option(help="Weight of the hyperslide loss terms "
                                   "(task and auxiliary). Default: 0.1.",
                                   rich_help_panel=_PACK)
    ] = None,
    monitor: Annotated[
        MonitorChoice | None,
        typer.Option(help="Validation metric for early stopping and the best checkpoint. "
                     "Default: loss.", rich_help_panel=_SELECT),
    ] = None,
    patience: Annotated[
        int | None, typer.Option(min=1, help="Epochs without improvement before "
                                 "stopping. Default: 10.",
                                 rich_help_panel=_SELECT)
    ] = None,
    threshold: Annotated[
        ThresholdChoiceOption | None,
        typer.Option(help="Binary decision threshold: 0.5 (fixed) or Youden's J on validation. "
                     "Default: fixed.", rich_help_panel=_SELECT),
    ] = None,
    n_bootstrap: Annotated[
        int | None, typer.Option(min=0, help="Bootstrap resamples for 95% CIs. "
                                 "Default: 1000.",
                                 rich_help_panel=_SELECT)
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda or cuda:<index>. Default: auto.",
                                 rich_help_panel=_COMPUTE)
    ] = None,
    num_workers: Annotated[
        int | None, typer.Option(min=0, help="Processes reading packs from the stores. "
                                 "Default: 0.",
                                 rich_help_panel=_COMPUTE)
    ] = None,
    deterministic: Annotated[
        bool | None, typer.Option(help="Deterministic torch kernels (slower on "
                                  "GPU). Default: off.",
                                  rich_help_panel=_COMPUTE)
    ] = None,
    progress: Annotated[
        bool | None, typer.Option(help="Show a progress bar. Default: on.",
                                  rich_help_panel=_COMPUTE)
    ] = None,
) -> None:
    """Train one model per fold and seed; under `torchrun --no-python slidemil train` with DDP."""
    from pydantic import ValidationError

    from mil.distributed import cleanup_distributed
    from mil.train import TrainConfig, load_train_config, run_training, validation_messages
    from preprocessing.errors import SlidemilError

    fields: dict[str, Any] = {
        "features_dir": features_dir, "run_dir": run_dir, "labels": labels,
        "slide_column": slide_column, "label_column": label_column, "overwrite": overwrite,
        "model": model, "ordinal": ordinal, "class_order": _parse_class_order(class_order),
        "split": split.value if split else None, "folds": folds, "val_fraction": val_fraction,
        "test_fraction": test_fraction, "splits_dir": splits_dir, "seed": seed,
        "n_seeds": n_seeds, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs, "packs_per_step": packs_per_step,
        "balance": balance.value if balance else None, "amp": amp,
        "monitor": monitor.value if monitor else None, "patience": patience,
        "threshold": threshold.value if threshold else None, "n_bootstrap": n_bootstrap,
        "device": device, "num_workers": num_workers, "deterministic": deterministic,
        "progress": progress,
    }
    overrides = {key: value for key, value in fields.items() if value is not None}
    if grad_clip is not None:
        overrides["grad_clip"] = grad_clip if grad_clip > 0 else None
    packing = {"pack_len": pack_len, "main_fraction": main_fraction,
               "max_tiles_per_bag": max_tiles_per_bag,
               "residual_loss_weight": residual_loss_weight}
    packing = {key: value for key, value in packing.items() if value is not None}
    if packing:
        overrides["packing"] = packing
    options = _parse_model_options(model_option)
    if options:
        overrides["model_options"] = options

    try:
        cfg = (load_train_config(config, overrides) if config is not None
               else TrainConfig.model_validate(overrides))
        result = run_training(cfg)
    except ValidationError as err:
        cleanup_distributed()
        for line in validation_messages(err):
            console.print(f"[red]error:[/red] {line}", soft_wrap=True)
        raise typer.Exit(code=2) from err
    except SlidemilError as err:
        cleanup_distributed()
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=1) from err
    cleanup_distributed(wait_for_peers=True)

    import os

    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for every process
    if result.reused:
        console.print(f"train: reused the finished run in {result.run_dir}")
    console.print(f"train: {result}")
