"""`slidemil heatmap` options and exit codes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import typer
from typer.testing import CliRunner

from cli import heatmap
from mil.heatmap import Colormap, GeoJsonOrigin, Normalization

if TYPE_CHECKING:
    from conftest import SyntheticCase

app = typer.Typer()
app.command()(heatmap.command)


@pytest.mark.parametrize(
    ("choice", "library"),
    [
        (heatmap.NormalizationChoice, Normalization),
        (heatmap.ColormapChoice, Colormap),
        (heatmap.OriginChoice, GeoJsonOrigin),
    ],
)
def test_choices_match_library(choice: type, library: type) -> None:
    assert {item.value for item in choice} == {item.value for item in library}


def test_command_renders_and_exits_zero(tmp_path: Path,
                                        make_case: Callable[..., SyntheticCase]) -> None:
    make_case(tmp_path / "attention", "slide-a")
    result = CliRunner().invoke(app, [
        "--attention-dir", str(tmp_path / "attention"), "--output-dir", str(tmp_path / "out"),
        "--max-size", "128", "--top-k", "1", "--normalization", "minmax",
        "--colormap", "jet", "--geojson-origin", "level0",
    ])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "slide-a.png").exists()
    assert (tmp_path / "out" / "manifest.csv").exists()


def test_command_exits_one_on_failed_slide(tmp_path: Path,
                                           make_case: Callable[..., SyntheticCase]) -> None:
    make_case(tmp_path / "attention", "slide-a").slide_path.unlink()
    result = CliRunner().invoke(app, [
        "--attention-dir", str(tmp_path / "attention"), "--output-dir", str(tmp_path / "out"),
    ])
    assert result.exit_code == 1


def test_command_rejects_empty_raw_range(tmp_path: Path,
                                         make_case: Callable[..., SyntheticCase]) -> None:
    make_case(tmp_path / "attention", "slide-a")
    result = CliRunner().invoke(app, [
        "--attention-dir", str(tmp_path / "attention"), "--output-dir", str(tmp_path / "out"),
        "--raw-min", "1", "--raw-max", "1",
    ])
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_command_accepts_short_output_option(
    tmp_path: Path, make_case: Callable[..., SyntheticCase]
) -> None:
    make_case(tmp_path / "attention", "slide-a")
    result = CliRunner().invoke(app, [
        "--attention-dir", str(tmp_path / "attention"), "-o", str(tmp_path / "out"),
        "--max-size", "128", "--top-k", "1",
    ])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "slide-a.summary.json").exists()


def test_empty_raw_range_message_names_options(tmp_path: Path,
                                               make_case: Callable[..., SyntheticCase]) -> None:
    make_case(tmp_path / "attention", "slide-a")
    result = CliRunner().invoke(app, [
        "--attention-dir", str(tmp_path / "attention"), "-o", str(tmp_path / "out"),
        "--raw-min", "2", "--raw-max", "1",
    ])
    assert result.exit_code == 2
    assert "--raw-min" in result.output
