"""`slidemil tile` through Typer's test runner."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from cli.tile import command

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiling_helpers import CMU, bundled, copy_slide  # noqa: E402


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def test_tile_command_writes_stores(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    copy_slide(bundled(CMU), slides)
    output_dir = tmp_path / "tiles"
    result = CliRunner().invoke(
        _app(),
        [
            str(slides),
            "-o",
            str(output_dir),
            "--target-mpp",
            "1.0",
            "--tile-px",
            "112",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (output_dir / "cmu-1-small-region.h5").exists()
    assert "1 slides tiled, 0 failed" in result.output


def test_tile_command_fails_when_a_slide_fails(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    copy_slide(bundled(CMU), slides)
    (slides / "broken.svs").write_bytes(b"not a slide at all")
    output_dir = tmp_path / "tiles"
    result = CliRunner().invoke(
        _app(), [str(slides), "-o", str(output_dir), "--target-mpp", "1.0", "--no-progress"]
    )
    assert result.exit_code == 1
    with (output_dir / "manifest.csv").open(newline="") as handle:
        statuses = {row["id"]: row["status"] for row in csv.DictReader(handle)}
    assert statuses == {"broken": "failed", "cmu-1-small-region": "ok"}


def test_tile_command_rejects_bad_options(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    copy_slide(bundled(CMU), slides)
    result = CliRunner().invoke(
        _app(), [str(slides), "-o", str(tmp_path / "t"), "--tile-px", "64", "--overlap-px", "64"]
    )
    assert result.exit_code == 2
    assert "overlap_px" in result.output
    result = CliRunner().invoke(_app(), [str(slides), "-o", str(tmp_path / "t"), "--shard", "3/2"])
    assert result.exit_code == 1
    assert "shard" in result.output


def test_tile_help_states_units() -> None:
    result = CliRunner().invoke(_app(), ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "µm per pixel" in result.output
    assert "--mpp-csv" in result.output
