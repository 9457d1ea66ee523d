"""Slide lists from folders, globs and CSVs; slide ids; mpp override tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocessing.errors import ConfigError, DuplicateSlideIdError
from preprocessing.inputs import list_slides, read_mpp_csv, slide_id_from_path


@pytest.mark.parametrize(
    ("name", "slide_id"),
    [
        (
            "TCGA-AA-3512-01Z-00-DX1.5dcf1b5f-9a6a-4a93-8e1e-9b1c9d2b3c4d.svs",
            "TCGA-AA-3512-01Z-00-DX1.5dcf1b5f-9a6a-4a93-8e1e-9b1c9d2b3c4d",
        ),
        ("case.01.ndpi", "case.01"),
        ("UPPER.SVS", "UPPER"),
        ("scan.ome.tiff", "scan.ome"),
        ("slide.mrxs", "slide"),
        ("notes.txt", "notes.txt"),
    ],
)
def test_slide_id_from_path(name: str, slide_id: str) -> None:
    assert slide_id_from_path(Path("/data") / name) == slide_id


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_folder_lists_slide_files_only(tmp_path: Path) -> None:
    _touch(tmp_path, "b.svs", "a.ndpi", "readme.txt", "labels.csv", "sub/c.svs")
    slides = list_slides(tmp_path)
    assert [s.slide_id for s in slides] == ["a", "b"]
    assert all(s.path.is_absolute() for s in slides)
    assert [s.slide_id for s in list_slides(tmp_path, recursive=True)] == ["a", "b", "c"]


def test_glob_pattern(tmp_path: Path) -> None:
    _touch(tmp_path, "x1.svs", "x2.svs", "y.ndpi", "x3.txt")
    slides = list_slides(str(tmp_path / "x*"))
    assert [s.slide_id for s in slides] == ["x1", "x2"]


def test_csv_with_relative_paths_ids_and_mpp(tmp_path: Path) -> None:
    _touch(tmp_path, "slides/one.svs", "slides/two.tiff")
    table = tmp_path / "cohort.csv"
    table.write_text("path,slide_id,mpp\nslides/one.svs,,0.25\nslides/two.tiff,patient-2,\n")
    slides = list_slides(table)
    assert [(s.slide_id, s.mpp) for s in slides] == [("one", 0.25), ("patient-2", None)]
    assert slides[0].path == (tmp_path / "slides" / "one.svs").resolve()


def test_csv_slide_id_must_be_a_file_name(tmp_path: Path) -> None:
    table = tmp_path / "cohort.csv"
    table.write_text("path,slide_id\na.svs,site/a\n")
    with pytest.raises(ConfigError, match="line 2.*invalid slide_id 'site/a'"):
        list_slides(table)


def test_csv_without_path_column(tmp_path: Path) -> None:
    table = tmp_path / "cohort.csv"
    table.write_text("file,label\na.svs,1\n")
    with pytest.raises(ConfigError, match="cohort.csv.*path"):
        list_slides(table)


def test_csv_with_bad_mpp(tmp_path: Path) -> None:
    table = tmp_path / "cohort.csv"
    table.write_text("path,mpp\na.svs,fast\n")
    with pytest.raises(ConfigError, match="line 2.*invalid mpp 'fast'"):
        list_slides(table)


def test_csv_with_implausible_mpp(tmp_path: Path) -> None:
    table = tmp_path / "cohort.csv"
    table.write_text("path,mpp\na.svs,0.25\nb.svs,0.005\n")
    with pytest.raises(ConfigError, match="line 3: mpp 0.005 .* outside the plausible range"):
        list_slides(table)


def test_duplicate_ids_rejected_with_all_paths(tmp_path: Path) -> None:
    _touch(tmp_path, "site1/case.svs", "site2/case.svs", "site2/other.svs")
    with pytest.raises(DuplicateSlideIdError) as info:
        list_slides(tmp_path, recursive=True)
    message = str(info.value)
    assert "'case'" in message
    assert "site1" in message
    assert "site2" in message
    assert "slide_id" in message


def test_duplicate_ids_across_extensions(tmp_path: Path) -> None:
    _touch(tmp_path, "case.svs", "case.ndpi")
    with pytest.raises(DuplicateSlideIdError, match="'case'"):
        list_slides(tmp_path)


def test_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No slides found"):
        list_slides(tmp_path)
    with pytest.raises(ConfigError, match="neither a folder"):
        list_slides(tmp_path / "missing")


def test_mpp_csv(tmp_path: Path) -> None:
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\na,0.25\nb,0.5\n")
    assert read_mpp_csv(table) == {"a": 0.25, "b": 0.5}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("slide,mpp\na,0.25\n", "missing columns"),
        ("slide_id,mpp\na,0\n", "line 2, slide 'a': mpp 0.0 .* outside the plausible range"),
        ("slide_id,mpp\na,50\n", "line 2, slide 'a': mpp 50.0 .*Correct this row"),
        ("slide_id,mpp\na,fast\n", "line 2, slide 'a': invalid mpp 'fast'"),
        ("slide_id,mpp\na,0.25\na,0.5\n", "line 3.*listed twice"),
        ("slide_id,mpp\n,0.5\n", "empty slide_id"),
    ],
)
def test_mpp_csv_errors(tmp_path: Path, content: str, match: str) -> None:
    table = tmp_path / "mpp.csv"
    table.write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_mpp_csv(table)
