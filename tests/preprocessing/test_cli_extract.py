"""`slidemil extract` through Typer's test runner."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from cli.extract import command
from preprocessing.stores import open_feature_store

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_extract import SMALL_MODEL, _find_slide, _write_coords  # noqa: E402


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def _arguments(coords_dir: Path, output_dir: Path) -> list[str]:
    return [
        "--coords-dir",
        str(coords_dir),
        "-o",
        str(output_dir),
        "--backbone",
        SMALL_MODEL,
        "--weights",
        "random",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--batch-size",
        "2",
        "--format",
        "zarr",
        "--dtype",
        "float32",
        "--no-progress",
    ]


def test_extract_command_writes_stores(tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", _find_slide("cmu-1-small-region.svs"), "cmu", n_tiles=3)

    result = CliRunner().invoke(_app(), _arguments(tmp_path / "tiles", tmp_path / "features"))

    assert result.exit_code == 0, result.output
    assert "1 slide extracted, 0 failed" in result.output
    with open_feature_store(tmp_path / "features" / SMALL_MODEL / "cmu.zarr") as store:
        assert store.n_tiles == 3
        assert store.read_features().dtype == "float32"


def test_extract_command_fails_on_bad_slide(tmp_path: Path) -> None:
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "broken.h5").write_bytes(b"not an HDF5 file")

    result = CliRunner().invoke(_app(), _arguments(tiles, tmp_path / "features"))

    assert result.exit_code == 1
    assert "0 slides extracted, 1 failed" in result.output


def test_extract_command_rejects_unknown_backbone(tmp_path: Path) -> None:
    (tmp_path / "tiles").mkdir()
    arguments = _arguments(tmp_path / "tiles", tmp_path / "features")
    arguments[arguments.index(SMALL_MODEL)] = "resnet5O"

    result = CliRunner().invoke(_app(), arguments)

    assert result.exit_code == 1
    assert "Close matches" in result.output


def test_extract_command_overwrite_redoes_store(tmp_path: Path) -> None:
    _write_coords(tmp_path / "tiles", _find_slide("cmu-1-small-region.svs"), "cmu", n_tiles=2)
    arguments = _arguments(tmp_path / "tiles", tmp_path / "features")
    CliRunner().invoke(_app(), arguments)

    skipped = CliRunner().invoke(_app(), arguments)
    redone = CliRunner().invoke(_app(), [*arguments, "--overwrite"])

    assert "0 slides extracted, 0 failed, 1 skipped" in skipped.output
    assert redone.exit_code == 0, redone.output
    assert "1 slide extracted, 0 failed, 0 skipped" in redone.output
