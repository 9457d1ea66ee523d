"""Layout of a run directory and the files training and prediction write into it.

    <run_dir>/config.yaml                   resolved training config
    <run_dir>/inputs.json                   digest of the label CSV and the feature stores
    <run_dir>/classes.json                  label -> class index
    <run_dir>/labels_join.json              how the label CSV matched the feature stores
    <run_dir>/splits/<split>.csv            slide_id, case_id, label, split of each fold
    <run_dir>/<split>/seed_<s>/checkpoint.pt        best epoch on validation (or last epoch)
    <run_dir>/<split>/seed_<s>/checkpoint_last.pt   last epoch
    <run_dir>/<split>/seed_<s>/log.csv              one row per epoch
    <run_dir>/<split>/seed_<s>/metrics.json         validation and test metrics with 95% CIs
    <run_dir>/<split>/seed_<s>/predictions_<val|test>.csv
    <run_dir>/metrics.json                  mean ± std over folds and seeds
    <run_dir>/predictions.csv, predictions.json, prediction_metrics.json, attention/
                                            written by `slidemil predict`

`<split>` is `fold_<i>` for k-fold cross-validation and `fixed` for a single split.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mil.metrics import predict_classes


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs.json"

    @property
    def classes(self) -> Path:
        return self.root / "classes.json"

    @property
    def join_report(self) -> Path:
        return self.root / "labels_join.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def member(self, split_name: str, seed: int) -> Path:
        """Folder of one trained model: one fold (or the fixed split) and one seed."""
        return self.root / split_name / f"seed_{seed}"

    def checkpoints(self) -> list[Path]:
        """Best-epoch checkpoints of every fold and seed, sorted by path."""
        return sorted(self.root.glob("*/seed_*/checkpoint.pt"))


def write_json(path: Path, content: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prediction_rows(
    bag_ids: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
    threshold: float = 0.5,
    labels: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Build one CSV row per slide: id, true label (when known), predicted class, its
    probability and the probability of every class (columns `prob_<class>`)."""
    predicted = predict_classes(probs, threshold)
    rows = []
    for index, slide_id in enumerate(bag_ids):
        row: dict[str, Any] = {"slide_id": slide_id}
        if labels is not None:
            row["label"] = classes[int(labels[index])]
        row["predicted_class"] = classes[int(predicted[index])]
        row["probability"] = float(probs[index, predicted[index]])
        for class_index, name in enumerate(classes):
            row[f"prob_{name}"] = float(probs[index, class_index])
        rows.append(row)
    return rows


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
              ) -> None:
    """Write rows as CSV atomically; columns default to the keys of the first row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is not None:
        header = list(columns)
    else:
        header = list(rows[0]) if rows else []
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _format_cell(value) for key, value in row.items()})
    os.replace(tmp, path)


def _format_cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.6g}"
    return value


class EpochLog:
    """CSV log with one row per epoch, flushed after every row so a crash keeps the history."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one epoch; the first row fixes the columns."""
        if self.columns is None:
            self.columns = list(row)
            with self.path.open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerow(self.columns)
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            writer.writerow({key: _format_cell(value) for key, value in row.items()})
