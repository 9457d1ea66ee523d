"""Patient-level splits: k-fold, held-out test set, split column and split files."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from mil.data.labels import ClassMap, LabelRow, read_labels
from mil.data.splits import (
    Split,
    check_split,
    hold_out_test,
    kfold_splits,
    load_splits,
    read_split,
    save_splits,
    splits_from_column,
    train_val_split,
)
from preprocessing.errors import ConfigError


def make_rows(n_patients: int = 40, slides_per_patient: int = 2) -> list[LabelRow]:
    """Patients p0.. with 1-2 slides each; every third patient is class "1"."""
    rows = []
    for patient in range(n_patients):
        label = "1" if patient % 3 == 0 else "0"
        for slide in range(1 + patient % slides_per_patient):
            slide_id = f"p{patient}_s{slide}"
            rows.append(LabelRow(slide_id=slide_id, label=label, case_id=f"p{patient}"))
    return rows


def case_of(rows: list[LabelRow]) -> dict[str, str]:
    return {row.slide_id: row.case_id for row in rows}


def labels_of(rows: list[LabelRow]) -> dict[str, str]:
    return {row.slide_id: str(row.label) for row in rows}


def test_kfold_keeps_patients_together() -> None:
    rows = make_rows()
    cases = case_of(rows)
    splits = kfold_splits(rows, k=5, seed=3)

    assert len(splits) == 5
    val_cases = [{cases[s] for s in split.val} for split in splits]
    for split, cases_in_val in zip(splits, val_cases, strict=True):
        train_cases = {cases[s] for s in split.train}
        assert not train_cases & cases_in_val
        assert sorted(split.train + split.val) == sorted(cases)
    all_val = [slide for split in splits for slide in split.val]
    assert sorted(all_val) == sorted(cases)


def test_kfold_is_stratified() -> None:
    rows = make_rows(60)
    labels = labels_of(rows)
    for split in kfold_splits(rows, k=3, seed=0):
        counts = Counter(labels[s] for s in split.val)
        assert counts["1"] >= 5
        assert counts["0"] >= 10


def test_kfold_independent_of_row_order() -> None:
    rows = make_rows()
    first = kfold_splits(rows, k=4, seed=1)
    second = kfold_splits(list(reversed(rows)), k=4, seed=1)
    assert [s.val for s in first] == [s.val for s in second]
    other_seed = kfold_splits(rows, k=4, seed=2)
    assert [s.val for s in first] != [s.val for s in other_seed]


def test_kfold_with_held_out_test() -> None:
    rows = make_rows()
    cases = case_of(rows)
    splits = kfold_splits(rows, k=3, seed=0, test_fraction=0.2)

    test = splits[0].test
    assert test
    assert all(split.test == test for split in splits)
    test_cases = {cases[s] for s in test}
    for split in splits:
        assert not {cases[s] for s in split.train + split.val} & test_cases
    assert 0.1 < len(test_cases) / 40 < 0.3


def test_fixed_test_ids_take_whole_patients(caplog: pytest.LogCaptureFixture) -> None:
    rows = make_rows()
    with caplog.at_level(logging.WARNING, logger="mil.data.splits"):
        split = train_val_split(rows, val_fraction=0.25, seed=0, test_ids=["p1_s1", "nope"])
    assert split.test == ["p1_s0", "p1_s1"]
    assert "p1_s0" not in split.train + split.val
    assert "nope" in caplog.text


def test_too_many_folds_raise() -> None:
    with pytest.raises(ConfigError, match="only 3 patients"):
        kfold_splits(make_rows(3), k=5)


def test_hold_out_test_rejects_bad_fraction() -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        hold_out_test(make_rows(), 1.5)


def test_check_split_missing_class_raises(caplog: pytest.LogCaptureFixture) -> None:
    labels = {"a": "0", "b": "1", "c": "0", "d": "0"}
    split = Split(name="fold_0", train=["a", "b"], val=["c", "d"])
    with caplog.at_level(logging.INFO, logger="mil.data.splits"), pytest.raises(
            ConfigError, match=r"val part of split 'fold_0' has no slide of class\(es\) \['1'\]"):
        check_split(split, labels, ClassMap(["0", "1"]))
    assert "fold_0" in caplog.text
    assert "train" in caplog.text


def test_check_split_patient_in_two_parts() -> None:
    labels = {"a": "0", "b": "1", "c": "0", "d": "1"}
    split = Split(name="fixed", train=["a", "b"], val=["c", "d"])
    with pytest.raises(ConfigError, match="patient p1"):
        check_split(split, labels, ClassMap(["0", "1"]),
                    case_ids={"a": "p1", "b": "p2", "c": "p1", "d": "p3"})


def test_check_split_slide_twice_and_unknown() -> None:
    classes = ClassMap(["0"])
    with pytest.raises(ConfigError, match="both train and val"):
        check_split(Split("x", train=["a"], val=["a"]), {"a": "0"}, classes)
    with pytest.raises(ConfigError, match="no label"):
        check_split(Split("x", train=["a", "z"]), {"a": "0"}, classes)
    with pytest.raises(ConfigError, match="no training slides"):
        check_split(Split("x", train=[]), {"a": "0"}, classes)


def test_splits_from_column(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label,split\na,0,train\nb,1,train\nc,0,val\nd,1,test\ne,1,\n")
    split = splits_from_column(read_labels(path).rows)
    assert split.train == ["a", "b"]
    assert split.val == ["c"]
    assert split.test == ["d"]


def test_save_load_round_trip(tmp_path: Path) -> None:
    rows = make_rows(12)
    splits = kfold_splits(rows, k=3, seed=0)
    paths = save_splits(splits, tmp_path / "run" / "splits", labels_of(rows), case_of(rows))

    assert [p.name for p in paths] == ["fold_0.csv", "fold_1.csv", "fold_2.csv"]
    loaded = load_splits(tmp_path / "run" / "splits")
    assert [(s.name, s.train, s.val, s.test) for s in loaded] == [
        (s.name, s.train, s.val, s.test) for s in splits
    ]
    header = paths[0].read_text().splitlines()[0]
    assert header == "slide_id,case_id,label,split"


def test_fold_files_sorted_numerically(tmp_path: Path) -> None:
    for index in (10, 2, 0):
        save_splits([Split(f"fold_{index}", train=["a"])], tmp_path)
    assert [s.name for s in load_splits(tmp_path)] == ["fold_0", "fold_2", "fold_10"]


def test_read_split_needs_columns(tmp_path: Path) -> None:
    path = tmp_path / "fixed.csv"
    path.write_text("slide,part\na,train\n")
    with pytest.raises(ConfigError, match="slide_id and split"):
        read_split(path)
    with pytest.raises(ConfigError, match="no split files"):
        load_splits(tmp_path / "empty")
