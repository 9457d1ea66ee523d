"""`slidemil tile` through Typer's test runner."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from cli.tile import command

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiling_helpers import CMU, TCGA, bundled, copy_slide  # noqa: E402


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
    assert "tile: 1 slide tiled, 0 failed, 0 skipped" in result.output
    assert result.output.count("skipped") == 1  # one summary line
    assert "processed" not in result.output


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
        _app(),
        [str(slides), "-o", str(tmp_path / "t"), "--tile-px", "64", "--overlap-px", "64"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2
    assert "set --overlap-px below --tile-px" in result.output
    assert "overlap_px" not in result.output
    result = CliRunner().invoke(
        _app(), [str(slides), "-o", str(tmp_path / "t"), "--shard", "3/2"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert "--shard: '3/2' asks for shard 3 of 2" in result.output
    assert not (tmp_path / "t").exists()


def test_tile_command_rejects_implausible_mpp(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    copy_slide(bundled(CMU), slides)
    result = CliRunner().invoke(
        _app(), [str(slides), "-o", str(tmp_path / "t"), "--mpp", "50"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert "--mpp: mpp 50.0 µm per pixel is outside the plausible range" in result.output
    assert not (tmp_path / "t").exists()


def test_tile_command_rerun_with_other_mpp(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    copy_slide(bundled(TCGA), slides)  # no resolution in the file
    base = [str(slides), "-o", str(tmp_path / "t"), "--target-mpp", "4", "--no-progress"]
    first = CliRunner().invoke(_app(), [*base, "--mpp", "0.25"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(_app(), [*base, "--mpp", "0.5"], env={"COLUMNS": "200"})
    assert second.exit_code == 1
    assert "0.25 µm/px from override in the store, 0.5 µm/px from override now" in second.output
    assert "Rerun with --overwrite" in second.output
    third = CliRunner().invoke(_app(), [*base, "--mpp", "0.5", "--overwrite"])
    assert third.exit_code == 0, third.output
    assert "1 slide tiled" in third.output


def test_tile_help_states_units() -> None:
    result = CliRunner().invoke(_app(), ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "µm per pixel" in result.output
    assert "--mpp-csv" in result.output
    assert "[OPTIONS] {SLIDES}" in result.output  # Typer puts a required argument in braces
    assert "{slides}" not in result.output
