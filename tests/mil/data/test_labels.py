"""Label CSV reading, the join report with features, and the class map."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from mil.data.labels import (
    ClassMap,
    LabelTable,
    join_labels,
    normalize_label,
    read_labels,
    strip_slide_extension,
)
from preprocessing.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"), (0.0, "0"), ("0", "0"), (" 0.00 ", "0"), ("1e1", "10"), (True, "1"),
        ("2.5", "2.5"), ("12345678901234567890", "12345678901234567890"),
        (" Tumor ", "Tumor"), ("", None), ("NA", None), ("nan", None),
        (float("nan"), None), (None, None),
    ],
)
def test_normalize_label(value: object, expected: str | None) -> None:
    assert normalize_label(value) == expected


def test_strip_slide_extension_keeps_inner_dots() -> None:
    assert strip_slide_extension("TCGA-A1-DX1.1234-abcd.svs") == "TCGA-A1-DX1.1234-abcd"
    assert strip_slide_extension("TCGA-A1-DX1.1234-abcd") == "TCGA-A1-DX1.1234-abcd"
    assert strip_slide_extension("slide.H5") == "slide"


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_labels_columns_and_aliases(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "labels.csv",
                     "\ufeffSlide;Target;patient_id;Split;grade\n"
                     "a;1;p1;training;3\n"
                     "b;0.0;;VAL;2\n"
                     ";1;p9;test;1\n"
                     "\n")
    table = read_labels(path)

    assert [row.slide_id for row in table.rows] == ["a", "b"]
    assert [row.label for row in table.rows] == ["1", "0"]
    assert [row.case_id for row in table.rows] == ["p1", "b"]
    assert [row.split for row in table.rows] == ["train", "val"]
    assert table.rows[0].extras == {"grade": "3"}
    assert table.has_case_ids
    assert table.has_splits
    assert table.extra_columns == ("grade",)


def test_read_labels_missing_label_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "labels.csv", "slide_id,diagnosis\na,1\n")
    with pytest.raises(ConfigError, match="no label column"):
        read_labels(path)
    assert read_labels(path, label_column="diagnosis").rows[0].label == "1"


def test_read_labels_bad_split_value(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "labels.csv", "slide_id,label,split\na,1,training\nb,0,dev\n")
    with pytest.raises(ConfigError, match="line 3"):
        read_labels(path)


def test_read_labels_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_labels(tmp_path / "absent.csv")


FAULTY_CSV = (
    "slide_id,label,case_id,grade\n"
    "ok1,0,p1,1\n"
    "ok2,1.0,p2,2\n"
    "no_features,1,p3,1\n"
    "blank,,p4,1\n"
    "conflict,0,p5,1\n"
    "conflict,1,p5,1\n"
    "repeated,1,p6,3\n"
    "repeated,1.0,p6,3\n"
    "with_ext.svs,0,p7,1\n"
)
FEATURE_IDS = ["ok1", "ok2", "blank", "conflict", "repeated", "with_ext", "unlabelled"]


def test_join_report_lists_every_fault(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = read_labels(write_csv(tmp_path / "labels.csv", FAULTY_CSV))

    with caplog.at_level(logging.WARNING, logger="mil.data.labels"):
        report = join_labels(table, FEATURE_IDS)

    assert report.slide_ids == ["ok1", "ok2", "repeated", "with_ext"]
    assert report.labels == {"ok1": "0", "ok2": "1", "repeated": "1", "with_ext": "0"}
    assert report.missing_features == ["no_features"]
    assert report.blank_labels == ["blank"]
    assert report.conflicting_duplicates == {"conflict": ["0", "1"]}
    assert report.duplicate_rows == ["repeated"]
    assert report.extension_ids == {"with_ext.svs": "with_ext"}
    assert report.unlabeled_features == ["unlabelled"]
    assert report.case_ids["with_ext"] == "p7"
    assert report.extra("grade") == {"ok1": "1", "ok2": "2", "repeated": "3", "with_ext": "1"}
    with pytest.raises(ConfigError, match="no column 'stage'"):
        report.extra("stage")
    assert report.n_excluded == 3
    assert not report.is_clean
    assert "no_features" in caplog.text
    summary = report.summary()
    for fault in ("without features", "blank labels", "conflicting", "without a label",
                  "duplicate rows", "file extension"):
        assert fault in summary
    json.dumps(report.to_dict())


def test_join_strict_raises_naming_the_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "labels.csv", FAULTY_CSV)
    with pytest.raises(ConfigError, match="labels.csv") as info:
        join_labels(read_labels(path), FEATURE_IDS, strict=True)
    assert "no_features" in str(info.value)


def test_join_strict_accepts_clean_table() -> None:
    table = LabelTable.from_mapping({"a": 0, "b": 1})
    report = join_labels(table, ["a", "b"], strict=True)
    assert report.is_clean
    assert report.slide_ids == ["a", "b"]


def test_join_case_defaults_to_resolved_id(tmp_path: Path) -> None:
    table = read_labels(write_csv(tmp_path / "l.csv", "slide_id,label\nx.ndpi,a\n"))
    report = join_labels(table, ["x"])
    assert report.case_ids == {"x": "x"}


def test_join_without_any_match_raises() -> None:
    table = LabelTable.from_mapping({"a": 0})
    with pytest.raises(ConfigError, match="no slide"):
        join_labels(table, ["b"])


def test_join_reads_feature_folder(tmp_path: Path, make_store: Callable[..., Path]) -> None:
    folder = tmp_path / "features"
    make_store("a", 3, folder=folder)
    make_store("b", 2, folder=folder)
    (folder / "c.h5.tmp-123").write_bytes(b"")
    report = join_labels(LabelTable.from_mapping({"a": 1, "c": 0}), folder)
    assert report.slide_ids == ["a"]
    assert report.missing_features == ["c"]
    assert report.unlabeled_features == ["b"]


def test_class_map_stable_under_row_order(tmp_path: Path) -> None:
    rows = ["slide_id,label"] + [f"s{i},{value}" for i, value in
                                 enumerate(["10", "2", "0", "2.0", "0.0", "10", " 2 "])]
    maps = []
    for seed in range(5):
        shuffled = rows[1:]
        random.Random(seed).shuffle(shuffled)
        path = write_csv(tmp_path / f"labels{seed}.csv", "\n".join([rows[0], *shuffled]))
        maps.append(ClassMap.from_labels(row.label for row in read_labels(path).rows))
    assert all(class_map == maps[0] for class_map in maps)
    assert maps[0].names == ("0", "2", "10")
    assert maps[0].index(2.0) == 1
    assert maps[0].index("10") == 2


def test_class_map_text_labels_sorted() -> None:
    class_map = ClassMap.from_labels(["tumor", "normal", "tumor", None, ""])
    assert class_map.names == ("normal", "tumor")
    assert len(class_map) == 2


def test_class_map_explicit_order() -> None:
    class_map = ClassMap.from_labels(["high", "low"], order=["low", "mid", "high"])
    assert class_map.names == ("low", "mid", "high")
    with pytest.raises(ConfigError, match="not in the class order"):
        ClassMap.from_labels(["low", "other"], order=["low", "high"])


def test_class_map_unknown_label() -> None:
    with pytest.raises(ConfigError, match="not one of the classes"):
        ClassMap(["a", "b"]).index("c")


def test_class_map_rejects_repeated_values() -> None:
    with pytest.raises(ConfigError, match="one class"):
        ClassMap([0, "0.0"])


def test_class_map_save_load(tmp_path: Path) -> None:
    class_map = ClassMap.from_labels([3, 1, 2])
    path = tmp_path / "run" / "classes.json"
    class_map.save(path)

    assert json.loads(path.read_text()) == {"1": 0, "2": 1, "3": 2}
    assert ClassMap.load(path) == class_map
    (tmp_path / "list.json").write_text('["b", "a"]')
    assert ClassMap.load(tmp_path / "list.json").names == ("b", "a")


@pytest.mark.parametrize(
    ("content", "match"),
    [("{not json", "not valid JSON"), ('{"a": 0, "b": 2}', "indices"), ("3", "JSON object")],
)
def test_class_map_load_rejects_bad_files(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "classes.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        ClassMap.load(path)


def test_class_map_load_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        ClassMap.load(tmp_path / "classes.json")
