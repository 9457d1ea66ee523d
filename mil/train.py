"""`slidemil train`: packed MIL training over folds and seeds, with a reproducible run directory.

One run trains one model per (split, seed): k patient-level folds or one fixed split, times
`n_seeds` seeds. Each model is trained with AdamW, a warm-up + cosine learning-rate schedule,
gradient clipping, bf16 autocast on CUDA, class weights or balanced sampling, and early stopping
on a validation metric. The best and last checkpoints, a per-epoch CSV log, validation and test
predictions and metrics with bootstrap 95% intervals are written per model, and `metrics.json`
summarises all models (mean ± std). See `mil.run_dir` for the layout.

Under `torchrun` every process trains on its share of the packs (DDP); rank 0 validates and
writes all files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mil.data.packing import PackingConfig
from mil.metrics import METRIC_NAMES, summarize
from mil.run_dir import RunLayout, write_json
from preprocessing.errors import ConfigError

logger = logging.getLogger(__name__)

SplitMode = Literal["auto", "column", "kfold", "holdout", "files"]
Balance = Literal["class_weights", "sampler", "none"]
ThresholdChoice = Literal["fixed", "youden"]


class TrainConfig(BaseModel):
    """Everything `slidemil train` needs; the resolved copy is saved as `config.yaml`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # Inputs and outputs.
    features_dir: Path = Field(description="folder of <slide_id>.h5|.zarr feature stores")
    run_dir: Path = Field(description="run directory to create (checkpoints, metrics, logs)")
    labels: Path = Field(description="label CSV: slide_id, label, optional case_id and split")
    slide_column: str | None = Field(None, description="slide id column of the label CSV")
    label_column: str | None = Field(None, description="label column of the label CSV")
    class_order: list[str] | None = Field(
        None, description="class names in index order (ordinal grades: low to high)")
    ordinal: bool = Field(False, description="classes are ordered; adds quadratic kappa")

    # Model.
    model: str = Field("abmil", description="registered model name or model preset YAML path")
    model_options: dict[str, Any] = Field(
        default_factory=dict, description="constructor options overriding the preset")

    # Splits and repeats.
    split: SplitMode = Field(
        "auto", description="auto: the label CSV's split column if present, else k-fold")
    folds: int = Field(5, ge=2, description="folds of patient-level stratified k-fold")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="validation share for holdout")
    test_fraction: float = Field(
        0.0, ge=0, lt=1, description="patients held out as a test set shared by all folds")
    splits_dir: Path | None = Field(None, description="folder of split CSVs (split: files)")
    split_seed: int = Field(0, description="seed of the patient shuffle of k-fold and holdout")
    seed: int = Field(0, description="seed of the first model")
    n_seeds: int = Field(1, ge=1, description="models per split, seeds seed..seed+n_seeds-1")

    # Optimisation.
    epochs: int = Field(50, ge=1)
    lr: float = Field(2e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(1e-2, ge=0)
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up length in epochs")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="final lr as a share of lr")
    grad_clip: float | None = Field(1.0, description="max gradient norm; null disables")
    packs_per_step: int = Field(1, ge=1, description="packs accumulated per optimizer step")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on the CPU)")
    balance: Balance = Field(
        "class_weights", description="inverse-frequency class weights, a balanced sampler, or none")
    packing: PackingConfig = Field(default_factory=PackingConfig)

    # Model selection and evaluation.
    monitor: str = Field("loss", description="validation metric for early stopping")
    patience: int = Field(10, ge=1, description="epochs without improvement before stopping")
    min_epochs: int = Field(0, ge=0, description="epochs trained before early stopping may act")
    threshold: ThresholdChoice = Field(
        "fixed", description="binary decision threshold: 0.5, or Youden's J on validation")
    n_bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for 95% CIs")

    # Execution.
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    num_workers: int = Field(0, ge=0, description="DataLoader processes reading packs")
    cache_features: bool = Field(
        True, description="keep features in memory (on the GPU when training there)")
    deterministic: bool = Field(False, description="deterministic torch kernels (slower)")
    find_unused_parameters: bool = Field(False, description="DDP option for models that skip "
                                         "parameters in some steps")
    progress: bool = Field(True, description="show a progress bar")
    overwrite: bool = Field(False, description="replace an existing run directory")

    @field_validator("monitor")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value != "loss" and value not in METRIC_NAMES:
            raise ValueError(f"monitor must be loss or one of {', '.join(METRIC_NAMES)}")
        return value

    @model_validator(mode="after")
    def _check_split_inputs(self) -> TrainConfig:
        if self.split == "files" and self.splits_dir is None:
            raise ValueError("--split files needs --splits-dir (a folder of split CSVs)")
        if self.monitor == "qwk" and not self.ordinal:
            raise ValueError("--monitor qwk needs --ordinal")
        return self

    @property
    def seeds(self) -> list[int]:
        return [self.seed + index for index in range(self.n_seeds)]


@dataclass
class MemberResult:
    """One trained model (one split, one seed).

    Attributes:
        split_name: `fold_<i>` or `fixed`.
        seed: seed of the model.
        best_epoch: epoch of the saved checkpoint (1-based).
        epochs_run: epochs trained before stopping.
        checkpoint: path of checkpoint.pt.
        val: validation report (`EvaluationReport.to_dict()`), empty without validation slides.
        test: test report, empty without test slides.
    """

    split_name: str
    seed: int
    best_epoch: int
    epochs_run: int
    checkpoint: Path
    val: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """Models and summary of one `run_training` call.

    Attributes:
        run_dir: the run directory.
        members: one entry per trained model.
        summary: content of `<run_dir>/metrics.json`.
        reused: True when an identical finished run was found and nothing was trained.
    """

    run_dir: Path
    members: list[MemberResult]
    summary: dict[str, Any]
    reused: bool = False

    def __str__(self) -> str:
        text = f"{len(self.members)} model(s) in {self.run_dir}"
        for part in ("test", "val"):
            stats = self.summary.get(part, {}).get("metrics", {})
            shown = [f"{name} {s['mean']:.3f} ± {s['std']:.3f}" for name, s in stats.items()
                     if s.get("mean") is not None and name in ("auroc", "balanced_accuracy")]
            if shown:
                return f"{text}; {part} " + ", ".join(shown)
        return text


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train every (split, seed) model of `cfg` and write the run directory.

    A finished run with the same resolved config is reused, not retrained. A run directory
    holding another config is an error unless `overwrite` is set.

    Raises:
        ConfigError: labels, splits or options are invalid, or the run directory contains
            another run.
    """
    from mil.train_loop import TrainingSession

    session = TrainingSession(cfg)
    return session.run()


def summarize_members(members: Sequence[MemberResult]) -> dict[str, Any]:
    """Mean, std, sem and count of each metric over models, for validation and test."""
    summary: dict[str, Any] = {"n_models": len(members)}
    for part in ("val", "test"):
        reports = [getattr(member, part) for member in members if getattr(member, part)]
        if not reports:
            continue
        names = sorted({name for report in reports for name in report["metrics"]})
        summary[part] = {
            "metrics": {
                name: _json_stats(summarize([_nan(report["metrics"].get(name))
                                             for report in reports]))
                for name in names
            },
            "n_models": len(reports),
        }
    summary["models"] = [
        {"split": m.split_name, "seed": m.seed, "best_epoch": m.best_epoch,
         "epochs_run": m.epochs_run, "checkpoint": str(m.checkpoint),
         "val": m.val.get("metrics", {}), "test": m.test.get("metrics", {})}
        for m in members
    ]
    return summary


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _json_stats(stats: Mapping[str, float]) -> dict[str, float | None]:
    return {key: (None if isinstance(v, float) and math.isnan(v) else v)
            for key, v in stats.items()}


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON/YAML-ready dict of a config (paths as strings)."""
    return cfg.model_dump(mode="json")


def load_train_config(path: Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a training config from YAML: a flat train section, or a pipeline file's `train:`.

    Args:
        path: the YAML file.
        overrides: fields set on top of the file (command-line options); a nested `packing`
            mapping is merged key by key.
    """
    try:
        content = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read training config ({err})") from err
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a training config must be a mapping of field: value")
    section = content.get("train", content) if "train" in content else content
    fields = dict(section)
    for key, value in (overrides or {}).items():
        if key == "packing" and isinstance(value, Mapping):
            fields["packing"] = {**dict(fields.get("packing") or {}), **value}
        elif key == "model_options" and isinstance(value, Mapping):
            fields["model_options"] = {**dict(fields.get("model_options") or {}), **value}
        else:
            fields[key] = value
    try:
        return TrainConfig.model_validate(fields)
    except ValidationError as err:
        lines = "\n".join(validation_messages(err, cli=False))
        raise ConfigError(f"{path}: invalid training config:\n{lines}") from err


def validation_messages(err: ValidationError, cli: bool = True) -> list[str]:
    """Format each invalid field as one plain line: option (or config key), value, what is allowed.

    Args:
        err: the pydantic error of a `TrainConfig` (or another stage config) validation.
        cli: name command-line options (`--lr`, `--pack-len`) instead of config keys.
    """
    lines = []
    for error in err.errors(include_url=False):
        location = [str(part) for part in error["loc"]]
        if cli and location[:1] == ["model_options"]:
            name = "--model-option"
        elif cli and location:
            # Nested packing fields are flat options on the command line (--pack-len).
            name = "--" + location[-1 if location[0] == "packing" else 0].replace("_", "-")
        else:
            name = ".".join(location) or "config"
        message = str(error["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if error["type"] == "missing":
            where = "pass it" if cli else "add it to the file"
            source = " or set it in --config" if cli else ""
            lines.append(f"{name} is required; {where}{source}")
        elif not location:
            lines.append(message)
        else:
            message = message[0].lower() + message[1:]
            lines.append(f"{name} {error['input']!r} is invalid: {message}")
    return lines


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (C * n_c) per class, [C]; absent classes get 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(float)
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """Read the resolved config.yaml of a run directory."""
    path = RunLayout(Path(run_dir)).config
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the run's config ({err}); is {run_dir} a "
                          "slidemil run directory?") from err
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: run config is not a mapping")
    return content


def write_run_config(layout: RunLayout, cfg: TrainConfig) -> None:
    """Write the resolved config as YAML."""
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.config.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def write_summary(layout: RunLayout, members: Sequence[MemberResult],
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write `<run_dir>/metrics.json` and return its content."""
    summary = summarize_members(members)
    summary.update(extra or {})
    write_json(layout.metrics, summary)
    return summary
