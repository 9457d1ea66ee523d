"""`slidemil predict`: slide predictions and per-tile attention from a trained run.

The models of a run directory (one fold and seed, or the ensemble of every fold and seed) are
applied to the feature stores of a folder. Every tile of every slide is used: bags are packed
whole, in eval mode and without gradients. An ensemble averages the class probabilities and
the per-tile attention of its members.

Outputs in `output_dir` (the run directory by default):

    predictions.csv            slide_id, [label], predicted_class, probability, prob_<class>...,
                               n_tiles, n_models; rows of slides predicted earlier into the same
                               folder by the same run and model selection are kept, and only
                               the slides predicted now are replaced
    predictions.json           the run and models behind predictions.csv (resolved run_dir,
                               model, members as <split>/seed_<s>, checkpoint choice); a
                               prediction with another run or selection is rejected
    prediction_metrics.json    metrics with bootstrap 95% CIs (only when a label CSV is given);
                               `in_training` and `in_validation` list the predicted slides that
                               a selected model trained on or was selected with
    attention/<slide_id>.h5    attention (N,) or (N, H) in the feature store's row order,
                               coords (N, 2) level-0 (x, y), and the slide's attributes; for
                               (N, H) also `head_names` (JSON list of H column names) and
                               `attention_per_class` (True when column c belongs to class c)
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mil.batch import PackedBatch
from mil.checkpoint import Checkpoint, load_checkpoint
from mil.engine import autocast_context, prepare_batch
from mil.metrics import evaluate_predictions
from mil.progress import progress_bars
from mil.run_dir import RunLayout, prediction_rows, write_csv, write_json
from preprocessing.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

#: Feature store attributes copied into each attention store, for heatmaps and provenance.
COPIED_ATTRS = (
    "slide_path", "tile_px_level0", "level0_width", "level0_height", "slide_mpp", "target_mpp",
    "tile_px", "backbone", "patch_size", "patch_size_level0",
)


class PredictConfig(BaseModel):
    """Everything `slidemil predict` needs."""

    model_config = ConfigDict(extra="forbid")

    run_dir: Path = Field(description="run directory written by `slidemil train`")
    features_dir: Path = Field(description="folder of <slide_id>.h5|.zarr feature stores")
    output_dir: Path | None = Field(None, description="where predictions go; default run_dir")
    folds: list[str] | None = Field(
        None, description="splits to use (fold_0, ... or fixed); default all")
    seeds: list[int] | None = Field(None, description="seeds to use; default all")
    ensemble: bool = Field(
        True, description="average all selected models; false requires exactly one")
    checkpoint: Literal["best", "last"] = Field(
        "best", description="best validation epoch (checkpoint.pt) or last epoch")
    slides: list[str] | None = Field(None, description="slide ids to predict; default all")
    labels: Path | None = Field(None, description="label CSV; adds labels and metrics")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    pack_len: int | None = Field(
        None, ge=1, description="tiles per inference pack; default the run's pack_len")
    num_workers: int = Field(0, ge=0, description="DataLoader processes reading packs")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on the CPU)")
    write_attention: bool = Field(True, description="write attention/<slide_id>.h5")
    n_bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for 95% CIs")
    progress: bool = Field(True, description="show a progress bar")


@dataclass
class PredictResult:
    """Outputs and counts of one `run_prediction` call.

    Attributes:
        predictions_path: the predictions CSV.
        attention_dir: folder of attention stores (None when not written).
        n_ok: slides predicted.
        n_failed: slides that could not be predicted.
        n_skipped: slides without tiles (no prediction, no attention).
        checkpoints: the models used.
        metrics: metrics report when labels were given, else empty.
    """

    predictions_path: Path
    attention_dir: Path | None
    n_ok: int
    n_failed: int = 0
    n_skipped: int = 0
    checkpoints: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        text = (f"{self.n_ok} slide(s) predicted with {len(self.checkpoints)} model(s) -> "
                f"{self.predictions_path}")
        if self.n_skipped:
            text += f"; {self.n_skipped} without tiles skipped"
        return text


def select_checkpoints(cfg: PredictConfig) -> list[Path]:
    """Checkpoint files of the run selected by `folds`, `seeds` and `checkpoint`."""
    layout = RunLayout(cfg.run_dir)
    name = "checkpoint.pt" if cfg.checkpoint == "best" else "checkpoint_last.pt"
    found = sorted(layout.root.glob(f"*/seed_*/{name}"))
    chosen = [
        path for path in found
        if (cfg.folds is None or path.parent.parent.name in cfg.folds)
        and (cfg.seeds is None or path.parent.name in {f"seed_{s}" for s in cfg.seeds})
    ]
    if not found and not any(layout.root.glob("*/seed_*/checkpoint*.pt")):
        raise CheckpointError(
            f"no trained model found in {layout.root} (no <split>/seed_<s>/{name}); run `slidemil "
            "train` with this --run-dir first"
        )
    if not chosen:
        available = sorted({f"{p.parent.parent.name}/{p.parent.name}" for p in found})
        folds = ", ".join(cfg.folds) if cfg.folds else "any"
        seeds = ", ".join(str(seed) for seed in cfg.seeds) if cfg.seeds else "any"
        raise CheckpointError(
            f"{layout.root}: no {name} matches --fold {folds} --seed {seeds} (available: "
            f"{', '.join(available) or 'none'}); change --fold, --seed or --checkpoint"
        )
    if not cfg.ensemble and len(chosen) > 1:
        names = [f"{p.parent.parent.name}/{p.parent.name}" for p in chosen]
        raise ConfigError(
            f"ensemble is off but {len(chosen)} models match ({', '.join(names)}); "
            "select one with --fold and --seed"
        )
    return chosen


def load_members(cfg: PredictConfig, paths: Sequence[Path], in_dim: int,
                 device: torch.device) -> tuple[list[Checkpoint], list[nn.Module], list[str]]:
    """Load every selected checkpoint and check it against the run's config, classes and the
    features.

    Raises:
        CheckpointError: a checkpoint contains another model than the run's config.yaml,
            another class map than its classes.json, or another feature dimension.
    """
    from mil.data import ClassMap
    from mil.train import read_run_config

    layout = RunLayout(cfg.run_dir)
    classes = list(ClassMap.load(layout.classes).names)
    run_model = read_run_config(cfg.run_dir).get("model")
    checkpoints: list[Checkpoint] = []
    for path in paths:
        checkpoint = load_checkpoint(path, expected_in_dim=in_dim)
        check_run_member(checkpoint, layout, run_model, classes)
        checkpoints.append(checkpoint)
    models = [checkpoint.build_model(device) for checkpoint in checkpoints]
    return checkpoints, models, classes


def check_run_member(checkpoint: Checkpoint, layout: RunLayout, run_model: object,
                     classes: Sequence[str]) -> None:
    """Reject a checkpoint whose model or class map differs from the run directory's.

    Raises:
        CheckpointError: naming the checkpoint file, both values and how to resolve it.
    """
    if isinstance(run_model, str) and checkpoint.model_name != run_model:
        raise CheckpointError(
            f"{checkpoint.path}: checkpoint contains model {checkpoint.model_name!r} but "
            f"{layout.config} trained {run_model!r}; this checkpoint comes from another run, so "
            f"move it out of {layout.root} or predict with the run directory that trained it"
        )
    if list(classes) != list(checkpoint.classes):
        raise CheckpointError(
            f"{checkpoint.path}: checkpoint was trained with classes {checkpoint.classes} (in "
            f"index order) but {layout.classes} lists {list(classes)}; this checkpoint comes "
            f"from another run, so move it out of {layout.root} or predict with the run "
            "directory that trained it"
        )


@torch.no_grad()
def ensemble_forward(
    models: Sequence[nn.Module], batch: PackedBatch, device: torch.device, amp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean class probabilities [B, C] and mean attention [T] or [T, H] of `models` on a batch."""
    probs_sum: torch.Tensor | None = None
    attention_sum: torch.Tensor | None = None
    for model in models:
        model.eval()
        with autocast_context(device, amp):
            output = model(batch)
        probs = torch.softmax(output.logits.float(), dim=-1)
        attention = output.attention.float()
        probs_sum = probs if probs_sum is None else probs_sum + probs
        attention_sum = attention if attention_sum is None else attention_sum + attention
    assert probs_sum is not None and attention_sum is not None
    return probs_sum / len(models), attention_sum / len(models)


def run_prediction(cfg: PredictConfig) -> PredictResult:
    """Predict every slide of `features_dir` and write predictions and attention stores.

    Raises:
        CheckpointError: no checkpoint matches, or one belongs to another model, class map or
            feature dimension.
        ConfigError: the selection or the label file is invalid.
    """
    from mil.data import BagDataset, build_eval_loader, find_feature_stores
    from mil.distributed import resolve_device

    device = resolve_device(cfg.device)
    output_dir = Path(cfg.output_dir or cfg.run_dir)
    paths = select_checkpoints(cfg)
    provenance = prediction_provenance(cfg, paths)
    check_previous_provenance(output_dir, provenance)
    read_previous_predictions(output_dir / "predictions.csv", _run_classes(cfg))
    stores = find_feature_stores(cfg.features_dir)
    slide_ids = sorted(stores) if cfg.slides is None else list(cfg.slides)
    missing = [slide_id for slide_id in slide_ids if slide_id not in stores]
    if missing:
        raise ConfigError(f"no feature store in {cfg.features_dir} for slide(s) {missing[:5]}; "
                          "run `slidemil extract` for them or leave out their --slide")
    if not slide_ids:
        raise ConfigError(f"{cfg.features_dir} contains no feature stores; run `slidemil extract`")

    dataset = BagDataset(cfg.features_dir, slide_ids=slide_ids)
    checkpoints, models, classes = load_members(cfg, paths, dataset.dim, device)
    threshold = float(np.mean([checkpoint.threshold for checkpoint in checkpoints]))
    pack_len = cfg.pack_len or int(
        checkpoints[0].train_config.get("packing", {}).get("pack_len", 16384))
    loader = build_eval_loader(dataset, pack_len, num_workers=cfg.num_workers)
    true_labels = _read_true_labels(cfg, slide_ids, classes)
    logger.info("predicting %d slide(s) with %d %s model(s) from %s", len(slide_ids),
                len(models), checkpoints[0].model_name, cfg.run_dir)

    attention_dir = output_dir / "attention" if cfg.write_attention else None
    bag_ids: list[str] = []
    probs: list[np.ndarray] = []
    n_tiles: list[int] = []
    with progress_bars(cfg.progress) as progress:
        advance = progress.start("predict", sum(len(pack) for pack in loader.plan.packs))
        for batch in loader:
            batch = prepare_batch(batch, device)
            batch_probs, attention = ensemble_forward(models, batch, device, cfg.amp)
            batch_probs_np = batch_probs.cpu().double().numpy()
            for index, (slide_id, bag_attention, rows) in enumerate(_per_bag(batch, attention)):
                bag_ids.append(slide_id)
                probs.append(batch_probs_np[index])
                n_tiles.append(len(rows))
                if attention_dir is not None:
                    _write_attention(
                        attention_dir / f"{slide_id}.h5", dataset, slide_id, bag_attention, rows,
                        batch_probs_np[index], classes, threshold, checkpoints, models[0],
                    )
            advance(batch.num_bags)

    probs_array = np.stack(probs) if probs else np.zeros((0, len(classes)))
    labels_array = (np.asarray([true_labels[s] for s in bag_ids], dtype=np.int64)
                    if true_labels is not None else None)
    rows_out = prediction_rows(bag_ids, probs_array, classes, threshold, labels_array)
    for row, count in zip(rows_out, n_tiles, strict=True):
        row["n_tiles"] = count
        row["n_models"] = len(models)
    predictions_path = output_dir / "predictions.csv"
    known_labels = read_label_names(cfg.labels) if cfg.labels is not None else None
    merge_predictions(predictions_path, rows_out, classes, known_labels)
    write_json(output_dir / PROVENANCE_NAME, provenance)

    metrics: dict[str, Any] = {}
    if labels_array is not None and len(labels_array):
        report = evaluate_predictions(labels_array, probs_array, threshold=threshold,
                                      n_bootstrap=cfg.n_bootstrap, context="predictions")
        seen = slides_seen_in_training(cfg.run_dir, paths, bag_ids)
        warn_seen_in_training(seen, len(bag_ids), output_dir / "prediction_metrics.json")
        metrics = {**report.to_dict(), "checkpoints": [str(p) for p in paths],
                   "in_training": seen["train"], "in_validation": seen["val"]}
        write_json(output_dir / "prediction_metrics.json", metrics)

    skipped = len(slide_ids) - len(bag_ids)
    result = PredictResult(predictions_path=predictions_path, attention_dir=attention_dir,
                           n_ok=len(bag_ids), n_skipped=skipped, checkpoints=list(paths),
                           metrics=metrics)
    logger.info("%s", result)
    return result


def slides_seen_in_training(run_dir: Path, paths: Sequence[Path], slide_ids: Sequence[str]
                            ) -> dict[str, list[str]]:
    """Predicted slides in the train or val part of any selected model's split.

    Each checkpoint `<run_dir>/<split>/seed_<s>/…` was trained on `<run_dir>/splits/<split>.csv`.
    Metrics over train slides are optimistic, and so are those over val slides, which chose
    the best epoch and the threshold.

    Returns:
        {"train": sorted slide ids, "val": sorted slide ids not already under "train"}.
    """
    from mil.data.splits import read_split

    predicted = set(slide_ids)
    train: set[str] = set()
    val: set[str] = set()
    splits_dir = RunLayout(Path(run_dir)).splits
    for split_name in sorted({path.parent.parent.name for path in paths}):
        split_path = splits_dir / f"{split_name}.csv"
        if not split_path.exists():
            logger.warning("%s not found, so the slides that %s trained on are unknown",
                           split_path, split_name)
            continue
        split = read_split(split_path)
        train |= predicted & set(split.train)
        val |= predicted & set(split.val)
    return {"train": sorted(train), "val": sorted(val - train)}


def warn_seen_in_training(seen: dict[str, list[str]], n_predicted: int, metrics_path: Path
                          ) -> None:
    """Warn that metrics include slides a selected model trained on or was selected with."""
    if seen["train"]:
        logger.warning(
            "%d of %d predicted slide(s) were in the training part of a selected model's split "
            "(first: %s), so the metrics are optimistic; predict held-out slides only, or select "
            "models that did not train on them with --fold (listed under in_training in %s)",
            len(seen["train"]), n_predicted, ", ".join(seen["train"][:5]), metrics_path)
    if seen["val"]:
        logger.warning(
            "%d of %d predicted slide(s) were in the validation part of a selected model's split "
            "and chose its best epoch and threshold, so the metrics are optimistic (listed under "
            "in_validation in %s)", len(seen["val"]), n_predicted, metrics_path)


#: Sidecar of predictions.csv naming the run and models that wrote it.
PROVENANCE_NAME = "predictions.json"


def prediction_provenance(cfg: PredictConfig, paths: Sequence[Path]) -> dict[str, Any]:
    """Describe the run and models behind a prediction, for predictions.json."""
    from mil.train import read_run_config

    return {
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "model": read_run_config(cfg.run_dir).get("model"),
        "members": [f"{path.parent.parent.name}/{path.parent.name}" for path in paths],
        "checkpoint": cfg.checkpoint,
    }


def check_previous_provenance(output_dir: Path, provenance: dict[str, Any]) -> None:
    """Reject predicting into a folder whose predictions.csv came from another run or models.

    A predictions.csv without predictions.json (written before the sidecar existed) is merged
    with a warning, because its origin cannot be checked.

    Raises:
        ConfigError: predictions.json names another run directory, model, member set or
            checkpoint choice, or cannot be read.
    """
    sidecar = output_dir / PROVENANCE_NAME
    if not (output_dir / "predictions.csv").exists():
        return
    if not sidecar.exists():
        logger.warning("%s has no %s, so the run behind its rows is unknown; merging into it "
                       "anyway", output_dir / "predictions.csv", PROVENANCE_NAME)
        return
    try:
        previous = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{sidecar}: cannot read the provenance of the earlier predictions "
                          f"({err}); move it and predictions.csv away or choose another "
                          "--output-dir (-o)") from err
    if previous == provenance:
        return
    differing = sorted(key for key in set(previous) | set(provenance)
                       if previous.get(key) != provenance.get(key))
    raise ConfigError(
        f"{output_dir / 'predictions.csv'} contains predictions of run {_describe(previous)} but "
        f"this prediction uses run {_describe(provenance)} (differs in: {', '.join(differing)})"
        "; choose another --output-dir (-o) so the two are not mixed in one file"
    )


def _describe(provenance: dict[str, Any]) -> str:
    members = provenance.get("members") or []
    return (f"{provenance.get('run_dir')} (model {provenance.get('model')}, "
            f"{provenance.get('checkpoint')} checkpoint of {', '.join(members) or 'no models'})")


def read_label_names(path: Path) -> dict[str, str]:
    """Slide id → label of every labelled row of a label CSV, also keyed without an extension."""
    from mil.data import read_labels
    from mil.data.labels import strip_slide_extension

    names: dict[str, str] = {}
    for row in read_labels(path).rows:
        if row.label is None:
            continue
        names[row.slide_id] = row.label
        names.setdefault(strip_slide_extension(row.slide_id), row.label)
    return names


def _run_classes(cfg: PredictConfig) -> list[str]:
    from mil.data import ClassMap

    return list(ClassMap.load(RunLayout(cfg.run_dir).classes).names)


def read_previous_predictions(path: Path, classes: Sequence[str]
                              ) -> tuple[list[str], list[dict[str, str]]]:
    """Read the header and rows of an earlier predictions.csv, or ([], []) when there is none.

    Raises:
        ConfigError: the file is unreadable or contains the probabilities of other classes, so
            its rows cannot be merged with this run's.
    """
    if not path.exists():
        return [], []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{path}: cannot read the earlier predictions ({err}); move the file "
                          "away or choose another --output-dir") from err
    if header and "slide_id" not in header:
        raise ConfigError(f"{path}: invalid predictions file, the slide_id column is missing; "
                          "move it away or choose another --output-dir")
    previous = [name[len("prob_"):] for name in header if name.startswith("prob_")]
    if header and previous != list(classes):
        raise ConfigError(
            f"{path} holds predictions for classes {previous} but this run predicts "
            f"{list(classes)}; choose another --output-dir for this run"
        )
    return header, rows


def merge_predictions(path: Path, rows: Sequence[dict[str, Any]], classes: Sequence[str],
                      known_labels: Mapping[str, str] | None = None) -> None:
    """Write `rows` into predictions.csv atomically, keeping earlier rows of other slides.

    Rows of slides in `rows` replace their earlier rows; every other earlier row is kept, so
    predicting one slide or a second cohort into the same folder adds to the file. The result
    is sorted by slide id. With `known_labels` (slide id → label from a label CSV) the `label`
    of every row the CSV names is filled in; other missing cells are left blank.
    """
    header, previous = read_previous_predictions(path, classes)
    new_ids = {str(row["slide_id"]) for row in rows}
    replaced = sorted(row["slide_id"] for row in previous if row["slide_id"] in new_ids)
    kept = [row for row in previous if row["slide_id"] not in new_ids]
    if replaced:
        logger.info("%s: replacing the earlier rows of %d slide(s) (%s%s)", path, len(replaced),
                    ", ".join(replaced[:5]), ", ..." if len(replaced) > 5 else "")
    if kept:
        logger.info("%s: keeping %d earlier row(s) of other slides", path, len(kept))

    columns = list(rows[0]) if rows else list(header)
    if "label" not in columns and any(name == "label" for name in header):
        columns.insert(1, "label")
    if known_labels is not None and "label" not in columns:
        columns.insert(1, "label")
    columns += [name for name in header if name not in columns]
    merged = sorted([*kept, *rows], key=lambda row: str(row["slide_id"]))
    if known_labels is not None:
        merged = [_with_label(row, known_labels) for row in merged]
    write_csv(path, [{name: row.get(name, "") for name in columns} for row in merged], columns)


def _with_label(row: Mapping[str, Any], known_labels: Mapping[str, str]) -> dict[str, Any]:
    label = known_labels.get(str(row["slide_id"]))
    if label is None:
        return dict(row)
    return {**row, "label": label}


def _per_bag(batch: PackedBatch, attention: torch.Tensor
             ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(slide id, attention in store row order, store rows) of every bag of an inference batch."""
    values = batch.segments.split(attention.detach().cpu())
    if batch.tile_index is None:
        raise ValueError("inference batches must carry tile_index to align attention with rows")
    rows = batch.segments.split(batch.tile_index.detach().cpu())
    out = []
    for slide_id, bag_values, bag_rows in zip(batch.bag_ids, values, rows, strict=True):
        order = torch.argsort(bag_rows)
        out.append((slide_id, bag_values[order].numpy(), bag_rows[order].numpy()))
    return out


def _write_attention(
    path: Path,
    dataset: Any,
    slide_id: str,
    attention: np.ndarray,
    rows: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    threshold: float,
    checkpoints: Sequence[Checkpoint],
    model: nn.Module,
) -> None:
    """Write one slide's attention store; every store row must have a value."""
    from mil.data.dataset import open_source
    from mil.metrics import predict_classes
    from preprocessing.stores import write_attention_store

    index = dataset.index_of(slide_id)
    n_rows = int(dataset.lengths[index])
    if len(rows) != n_rows or not np.array_equal(rows, np.arange(n_rows)):
        raise ValueError(f"slide {slide_id}: attention covers {len(rows)} of {n_rows} tiles; "
                         "inference must never drop tiles")
    with open_source(dataset.paths[index]) as store:
        store_attrs = dict(store.attrs)
        coords = np.asarray(store.coords, dtype=np.int64)
    predicted = int(predict_classes(probs[None, :], threshold)[0])
    attrs: dict[str, Any] = {key: store_attrs[key] for key in COPIED_ATTRS if key in store_attrs}
    attrs.update({
        "slide_id": slide_id,
        "predicted_class": classes[predicted],
        "probability": float(probs[predicted]),
        "probabilities": json.dumps({name: float(p) for name, p in zip(classes, probs,
                                                                         strict=True)}),
        "classes": json.dumps(list(classes)),
        "threshold": threshold,
        "model": checkpoints[0].model_name,
        "n_models": len(checkpoints),
        "checkpoints": json.dumps([str(c.path) for c in checkpoints]),
    })
    if attention.ndim == 2:
        attrs.update(attention_column_attrs(model, attention.shape[1], classes))
    write_attention_store(path, attention, coords, attrs)


def attention_column_attrs(model: nn.Module, n_columns: int, classes: Sequence[str]
                           ) -> dict[str, Any]:
    """Attention store attributes that name the H columns of [N, H] attention.

    `head_names` is a JSON list of H names; for models whose columns are classes
    (`attention_axis == "class"`) these are the class names from classes.json and
    `attention_per_class` is True.
    """
    axis = getattr(model, "attention_axis", None)
    if axis == "class" and n_columns == len(classes):
        return {"head_names": json.dumps(list(classes)), "attention_per_class": True}
    names_of = getattr(model, "attention_names", None)
    names = (list(names_of(n_columns)) if callable(names_of)
             else [f"head {index + 1}" for index in range(n_columns)])
    return {"head_names": json.dumps(names), "attention_per_class": False}


def _read_true_labels(cfg: PredictConfig, slide_ids: Sequence[str], classes: Sequence[str]
                      ) -> dict[str, int] | None:
    """Class index of each predicted slide from `cfg.labels`, or None without a label file."""
    if cfg.labels is None:
        return None
    from mil.data import ClassMap, join_labels, read_labels

    report = join_labels(read_labels(cfg.labels), slide_ids)
    class_map = ClassMap(classes)
    labels = {slide_id: class_map.index(label) for slide_id, label in report.labels.items()}
    unlabeled = [slide_id for slide_id in slide_ids if slide_id not in labels]
    if unlabeled:
        raise ConfigError(f"{cfg.labels} has no label for {len(unlabeled)} predicted slide(s), "
                          f"first {unlabeled[:5]}; add them or select slides with --slide")
    return labels
