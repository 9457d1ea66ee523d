"""Train/validation/test splits at patient level.

Slides of one patient (`case_id`) always land in the same split, so a model is never validated
or tested on a patient it was trained on. Splits come from patient-level stratified k-fold, from
a `split` column of the label CSV, or from split files; each is written to and read from the
`splits/` folder of a run directory as `<name>.csv` with the columns slide_id, case_id, label,
split.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from mil.data.labels import ClassMap, LabelRow, normalize_label, normalize_split
from preprocessing.errors import ConfigError

logger = logging.getLogger(__name__)

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


@dataclass
class Split:
    """Slide ids of the train, validation and test parts of one fold.

    Attributes:
        name: `fold_<i>` for k-fold, `fixed` for a split column or file; the file stem in `splits/`.
        train: slide ids to train on.
        val: slide ids for early stopping and model selection.
        test: held-out slide ids, the same in every fold of a k-fold run (may be empty).
    """

    name: str
    train: list[str]
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def ids(self, split: str) -> list[str]:
        """Slide ids of `split` (`train`, `val` or `test`)."""
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        ids: list[str] = getattr(self, split)
        return ids

    def split_of(self) -> dict[str, str]:
        """Slide id → split name."""
        return {slide_id: name for name in SPLIT_NAMES for slide_id in self.ids(name)}


def _sorted_rows(rows: Sequence[LabelRow]) -> list[LabelRow]:
    labelled = [row for row in rows if row.label is not None]
    return sorted(labelled, key=lambda row: row.slide_id)


def _stratified_group_folds(
    rows: Sequence[LabelRow], n_splits: int, seed: int, purpose: str
) -> list[np.ndarray]:
    """Indices into `rows` of each of `n_splits` patient-level stratified folds."""
    n_cases = len({row.case_id for row in rows})
    if n_cases < n_splits:
        raise ConfigError(
            f"cannot make {n_splits} patient-level folds for {purpose}: only {n_cases} patients "
            f"({len(rows)} slides); use fewer --folds or a smaller held-out fraction"
        )
    labels = [row.label for row in rows]
    groups = [row.case_id for row in rows]
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    placeholder = np.zeros(len(rows))
    try:
        return [fold for _, fold in splitter.split(placeholder, labels, groups)]
    except ValueError as err:
        raise ConfigError(f"patient-level stratified split for {purpose} failed: {err}") from err


def hold_out_test(
    rows: Sequence[LabelRow], test_fraction: float, seed: int = 0
) -> tuple[list[LabelRow], list[str]]:
    """Set aside about `test_fraction` of the patients, stratified by label, as the test set.

    Returns:
        The remaining rows (sorted by slide id) and the test slide ids.
    """
    rows = _sorted_rows(rows)
    if test_fraction <= 0:
        return rows, []
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_splits = max(2, round(1 / test_fraction))
    test_indices = set(_stratified_group_folds(rows, n_splits, seed, "the test set")[0].tolist())
    rest = [row for i, row in enumerate(rows) if i not in test_indices]
    test = [rows[i].slide_id for i in sorted(test_indices)]
    return rest, test


def kfold_splits(
    rows: Sequence[LabelRow],
    k: int,
    seed: int = 0,
    test_fraction: float = 0.0,
    test_ids: Iterable[str] = (),
) -> list[Split]:
    """Patient-level stratified k-fold: fold i validates on the i-th part, trains on the rest.

    Args:
        rows: matched label rows (`JoinReport.matched`); their order does not matter.
        k: number of folds, at least 2.
        seed: seed of the patient shuffle; the same rows and seed give the same folds.
        test_fraction: fraction of patients held out as a test set shared by all folds.
        test_ids: slide ids held out as the test set (added to the patients of those slides).
    """
    if k < 2:
        raise ConfigError(f"k-fold needs k >= 2 folds, got {k}; use train_val_split for one split")
    rest, test = _held_out(rows, seed, test_fraction, test_ids)
    if len({row.case_id for row in rest}) >= k:
        _check_patients_per_class(rest, k)
    folds = _stratified_group_folds(rest, k, seed, "cross-validation")
    splits = []
    for fold_index, val_indices in enumerate(folds):
        val_set = set(val_indices.tolist())
        splits.append(Split(
            name=f"fold_{fold_index}",
            train=[row.slide_id for i, row in enumerate(rest) if i not in val_set],
            val=[rest[i].slide_id for i in sorted(val_set)],
            test=list(test),
        ))
    return splits


def _check_patients_per_class(rows: Sequence[LabelRow], k: int) -> None:
    """Reject k folds when a class has fewer than k patients, so some fold would lack it."""
    patients: dict[str, set[str]] = {}
    for row in rows:
        if row.label is not None:
            patients.setdefault(row.label, set()).add(row.case_id)
    too_few = {label: len(cases) for label, cases in sorted(patients.items()) if len(cases) < k}
    if too_few:
        shown = ", ".join(f"{label!r} has {count}" for label, count in too_few.items())
        fewest = min(too_few.values())
        remedy = (f"Lower --folds to at most {fewest}, or give" if fewest >= 2
                  else "Add patients of that class, or give")
        raise ConfigError(
            f"cannot make {k} patient-level folds with every class in each validation fold: "
            f"class {shown} patient(s). {remedy} the label CSV a split column (train/val/test "
            "per slide) and use --split column"
        )


def train_val_split(
    rows: Sequence[LabelRow],
    val_fraction: float,
    seed: int = 0,
    test_fraction: float = 0.0,
    test_ids: Iterable[str] = (),
) -> Split:
    """One patient-level stratified split with about `val_fraction` of the patients in `val`."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rest, test = _held_out(rows, seed, test_fraction, test_ids)
    n_splits = max(2, round(1 / val_fraction))
    val_set = set(_stratified_group_folds(rest, n_splits, seed, "the validation set")[0].tolist())
    return Split(
        name="fixed",
        train=[row.slide_id for i, row in enumerate(rest) if i not in val_set],
        val=[rest[i].slide_id for i in sorted(val_set)],
        test=test,
    )


def _held_out(
    rows: Sequence[LabelRow], seed: int, test_fraction: float, test_ids: Iterable[str]
) -> tuple[list[LabelRow], list[str]]:
    """Split rows into the rest and the test ids; a patient with one test slide is all test."""
    fixed = set(test_ids)
    if fixed:
        if test_fraction > 0:
            raise ConfigError("give either test_fraction or test ids for the test set, not both")
        unknown = sorted(fixed - {row.slide_id for row in rows})
        if unknown:
            logger.warning("%d test slide id(s) are not among the matched slides and are "
                           "ignored: %s", len(unknown), ", ".join(unknown[:10]))
        test_cases = {row.case_id for row in rows if row.slide_id in fixed}
        sorted_rows = _sorted_rows(rows)
        test = [row.slide_id for row in sorted_rows if row.case_id in test_cases]
        rest = [row for row in sorted_rows if row.case_id not in test_cases]
        return rest, test
    return hold_out_test(rows, test_fraction, seed)


def splits_from_column(rows: Sequence[LabelRow]) -> Split:
    """The split given by the `split` column of the label CSV; blank cells are left out."""
    split = Split(name="fixed", train=[])
    for row in _sorted_rows(rows):
        if row.split is not None:
            split.ids(row.split).append(row.slide_id)
    unassigned = sum(1 for row in rows if row.split is None)
    if unassigned:
        logger.warning("%d labelled slides have a blank split cell and are in no split",
                       unassigned)
    return split


def class_counts(split: Split, labels: Mapping[str, object]) -> dict[str, Counter[str]]:
    """Split name → label → number of slides."""
    return {
        name: Counter(str(normalize_label(labels[slide_id])) for slide_id in split.ids(name))
        for name in SPLIT_NAMES
    }


def format_class_counts(split: Split, labels: Mapping[str, object], class_map: ClassMap) -> str:
    """Table of slides per class and split, one line per split."""
    counts = class_counts(split, labels)
    width = max(6, *(len(name) for name in class_map.names)) + 2
    header = f"{split.name:<8}" + "".join(f"{name:>{width}}" for name in class_map.names)
    lines = [header + f"{'total':>8}"]
    for name in SPLIT_NAMES:
        cells = "".join(f"{counts[name][c]:>{width}}" for c in class_map.names)
        lines.append(f"{name:<8}{cells}{sum(counts[name].values()):>8}")
    return "\n".join(lines)


def check_split(
    split: Split,
    labels: Mapping[str, object],
    class_map: ClassMap,
    case_ids: Mapping[str, str] | None = None,
    fix_hint: str | None = None,
) -> None:
    """Validate a split and log its class counts.

    Args:
        split: the split to check.
        labels: slide id -> label of every matched slide.
        class_map: the run's classes.
        case_ids: slide id -> patient id, to keep each patient in one part.
        fix_hint: what the user should change when a part lacks a class. The default suits
            generated splits (folds, fraction, seed); a split the user wrote needs an edit.

    Raises:
        ConfigError: the train part is empty; a slide is in two parts or has no label; a
            non-empty part lacks a class; or one patient has slides in two parts.
    """
    if not split.train:
        raise ConfigError(f"split {split.name!r} has no training slides; check the split "
                          "column or file")
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for slide_id in split.ids(name):
            if slide_id in seen:
                raise ConfigError(f"slide {slide_id} is in both {seen[slide_id]} and {name} of "
                                  f"split {split.name!r}; list each slide once")
            if slide_id not in labels:
                raise ConfigError(f"slide {slide_id} of split {split.name!r} ({name}) has no "
                                  "label or no features; remove it from the split file")
            seen[slide_id] = name

    if case_ids is not None:
        case_split: dict[str, str] = {}
        for slide_id, name in seen.items():
            case = case_ids.get(slide_id, slide_id)
            if case_split.setdefault(case, name) != name:
                raise ConfigError(
                    f"patient {case} has slides in both {case_split[case]} and {name} of split "
                    f"{split.name!r} (slide {slide_id}); keep each patient in one split"
                )

    logger.info("class counts of %s:\n%s", split.name, format_class_counts(split, labels,
                                                                            class_map))
    counts = class_counts(split, labels)
    for name in SPLIT_NAMES:
        if not split.ids(name):
            continue
        missing = [c for c in class_map.names if counts[name][c] == 0]
        if missing:
            hint = fix_hint or (f"use fewer --folds, a larger --{name}-fraction or another "
                                "--split-seed")
            slides = split.ids(name)
            shown = ", ".join(slides[:10]) + (", ..." if len(slides) > 10 else "")
            raise ConfigError(
                f"the {name} part of split {split.name!r} has no slide of class(es) {missing} "
                f"(its {len(slides)} slide(s): {shown}; counts: {dict(counts[name])}); {hint}"
            )


def write_split(
    split: Split,
    directory: str | os.PathLike[str],
    labels: Mapping[str, object] | None = None,
    case_ids: Mapping[str, str] | None = None,
) -> Path:
    """Write `<directory>/<split.name>.csv` with the columns slide_id, case_id, label, split."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{split.name}.csv"
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "case_id", "label", "split"])
        for name in SPLIT_NAMES:
            for slide_id in split.ids(name):
                case = case_ids.get(slide_id, slide_id) if case_ids else slide_id
                label = normalize_label(labels.get(slide_id)) if labels else None
                writer.writerow([slide_id, case, label or "", name])
    os.replace(tmp, path)
    return path


def read_split(path: str | os.PathLike[str]) -> Split:
    """Read a split file: a CSV with at least the columns slide_id and split."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [name.strip().lower() for name in reader.fieldnames or []]
            if "slide_id" not in fields or "split" not in fields:
                raise ConfigError(f"split file {path} needs the columns slide_id and split; "
                                  f"it has {reader.fieldnames}")
            split = Split(name=path.stem, train=[])
            for line, record in enumerate(reader, start=2):
                cells = {key.strip().lower(): (value or "") for key, value in record.items()
                         if key is not None}
                slide_id = cells["slide_id"].strip()
                part = normalize_split(cells["split"], path, line)
                if slide_id and part is not None:
                    split.ids(part).append(slide_id)
    except FileNotFoundError as err:
        raise ConfigError(f"split file {path} not found") from err
    return split


def save_splits(splits: Sequence[Split], directory: str | os.PathLike[str],
                labels: Mapping[str, object] | None = None,
                case_ids: Mapping[str, str] | None = None) -> list[Path]:
    """Write every split to `directory` (a run's `splits/` folder)."""
    return [write_split(split, directory, labels, case_ids) for split in splits]


def load_splits(directory: str | os.PathLike[str]) -> list[Split]:
    """Read every `*.csv` split file of `directory`, k-fold files in fold order."""
    directory = Path(directory)
    paths = sorted(directory.glob("*.csv"), key=_split_sort_key)
    if not paths:
        raise ConfigError(f"no split files (*.csv) in {directory}")
    return [read_split(path) for path in paths]


def _split_sort_key(path: Path) -> tuple[int, str]:
    stem = path.stem
    if stem.startswith("fold_") and stem[5:].isdigit():
        return (int(stem[5:]), stem)
    return (1 << 30, stem)
