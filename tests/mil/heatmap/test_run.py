"""Batch mode: manifest rows for good and bad slides, resume, slide overrides."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mil.heatmap import HeatmapConfig, run_heatmaps
from preprocessing.errors import ConfigError
from preprocessing.stores import read_attention_store, write_attention_store

if TYPE_CHECKING:
    from conftest import SyntheticCase


def _manifest(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def _config(attention: Path, out: Path, **options: object) -> HeatmapConfig:
    settings: dict[str, object] = {"max_size": 128, "top_k": 2, "gallery_tile_px": 32}
    settings.update(options)
    return HeatmapConfig(attention_dir=attention, output_dir=out,
                         **settings)  # type: ignore[arg-type]


def test_batch_writes_outputs_and_manifest(
    tmp_path: Path, make_case: Callable[..., SyntheticCase]
) -> None:
    attention = tmp_path / "attention"
    make_case(attention, "slide-a")
    make_case(attention, "slide.b.v2")
    missing = make_case(attention, "slide-c")
    missing.slide_path.unlink()

    result = run_heatmaps(_config(attention, tmp_path / "out"))
    assert (result.n_ok, result.n_failed, result.n_skipped) == (2, 1, 0)
    rows = _manifest(result.manifest_path)
    assert rows["slide-a"]["status"] == "ok"
    assert int(rows["slide-a"]["n_tiles"]) == 260
    assert rows["slide-c"]["status"] == "failed"
    assert rows["slide-c"]["error_type"] == "unreadable"
    assert "slide-c.tif" in rows["slide-c"]["message"]
    for suffix in (".png", ".geojson", ".top_tiles.png", ".top_tiles.csv", ".summary.json"):
        assert (tmp_path / "out" / f"slide.b.v2{suffix}").exists()
    assert not (tmp_path / "out" / "slide-c.summary.json").exists()


def test_rerun_skips_complete_slides(tmp_path: Path,
                                     make_case: Callable[..., SyntheticCase]) -> None:
    attention = tmp_path / "attention"
    make_case(attention, "slide-a")
    first = run_heatmaps(_config(attention, tmp_path / "out"))
    assert first.n_ok == 1
    second = run_heatmaps(_config(attention, tmp_path / "out"))
    assert (second.n_ok, second.n_skipped) == (0, 1)
    third = run_heatmaps(_config(attention, tmp_path / "out", overwrite=True))
    assert third.n_ok == 1


def test_missing_attention_file_is_manifest_row(
    tmp_path: Path, make_case: Callable[..., SyntheticCase]
) -> None:
    attention = tmp_path / "attention"
    make_case(attention, "slide-a")
    result = run_heatmaps(_config(attention, tmp_path / "out",
                                  slide_ids=["slide-a", "slide-x"]))
    assert (result.n_ok, result.n_failed) == (1, 1)
    row = _manifest(result.manifest_path)["slide-x"]
    assert row["error_type"] == "bad_store"
    assert "slide-x.h5" in row["message"]
    assert "not found" in row["message"]
    assert "--slide-id slide-x" in row["message"]
    assert "slide_ids" not in row["message"]


def test_single_store_and_slide_override(tmp_path: Path,
                                         make_case: Callable[..., SyntheticCase]) -> None:
    case = make_case(tmp_path / "attention", "slide-a")
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(case.slide_path, moved / case.slide_path.name)

    failed = run_heatmaps(_config(case.store_path, tmp_path / "out"))
    assert failed.n_failed == 1
    result = run_heatmaps(_config(case.store_path, tmp_path / "out", slides=str(moved)))
    assert result.n_ok == 1
    assert (tmp_path / "out" / "slide-a.summary.json").exists()


def test_run_folder_with_attention_subfolder(
    tmp_path: Path, make_case: Callable[..., SyntheticCase]
) -> None:
    make_case(tmp_path / "run" / "attention", "slide-a")
    result = run_heatmaps(_config(tmp_path / "run", tmp_path / "out"))
    assert result.n_ok == 1


def test_no_stores_is_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no attention stores") as raised:
        run_heatmaps(_config(tmp_path / "empty", tmp_path / "out"))
    assert "--attention-dir" in str(raised.value)
    assert "attention_dir" not in str(raised.value).replace("--attention-dir", "")


def test_missing_folder_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        run_heatmaps(_config(tmp_path / "nowhere", tmp_path / "out"))


def test_no_skip_errors_stops_batch(tmp_path: Path,
                                    make_case: Callable[..., SyntheticCase]) -> None:
    attention = tmp_path / "attention"
    make_case(attention, "slide-a").slide_path.unlink()
    make_case(attention, "slide-b")
    with pytest.raises(Exception, match="slide-a.tif"):
        run_heatmaps(_config(attention, tmp_path / "out", skip_errors=False))
    rows = _manifest(tmp_path / "out" / "manifest.csv")
    assert rows["slide-a"]["status"] == "failed"
    assert "slide-b" not in rows


def test_shard_selects_part(tmp_path: Path, make_case: Callable[..., SyntheticCase]) -> None:
    attention = tmp_path / "attention"
    make_case(attention, "slide-a")
    make_case(attention, "slide-b")
    result = run_heatmaps(_config(attention, tmp_path / "out", shard="1/2"))
    assert result.n_ok == 1
    assert (tmp_path / "out" / "slide-b.summary.json").exists()
    assert not (tmp_path / "out" / "slide-a.png").exists()


def _rewrite_store(path: Path, attention_scale: float = 1.0) -> None:
    """Write the store again, as a rerun of predict does, with a later modification time."""
    store = read_attention_store(path)
    write_attention_store(path, store.attention * attention_scale, store.coords, store.attrs)
    later = path.stat().st_mtime + 60
    os.utime(path, (later, later))


def test_rerun_skips_rewritten_identical_store(
    tmp_path: Path, make_case: Callable[..., SyntheticCase]
) -> None:
    case = make_case(tmp_path / "attention", "slide-a")
    run_heatmaps(_config(case.store_path.parent, tmp_path / "out"))
    _rewrite_store(case.store_path)

    again = run_heatmaps(_config(case.store_path.parent, tmp_path / "out"))

    assert (again.n_ok, again.n_skipped) == (0, 1)


def test_rerun_renders_changed_attention(
    tmp_path: Path, make_case: Callable[..., SyntheticCase]
) -> None:
    case = make_case(tmp_path / "attention", "slide-a")
    run_heatmaps(_config(case.store_path.parent, tmp_path / "out"))
    _rewrite_store(case.store_path, attention_scale=0.5)

    again = run_heatmaps(_config(case.store_path.parent, tmp_path / "out"))

    assert (again.n_ok, again.n_skipped) == (1, 0)


def test_summary_without_digest_rendered_again(
    tmp_path: Path, make_case: Callable[..., SyntheticCase]
) -> None:
    case = make_case(tmp_path / "attention", "slide-a")
    run_heatmaps(_config(case.store_path.parent, tmp_path / "out"))
    summary = tmp_path / "out" / "slide-a.summary.json"
    summary.write_text(summary.read_text().replace("attention_sha256", "other_key"))

    again = run_heatmaps(_config(case.store_path.parent, tmp_path / "out"))

    assert again.n_ok == 1


def test_rerun_renders_changed_settings(
    tmp_path: Path, make_case: Callable[..., SyntheticCase]
) -> None:
    case = make_case(tmp_path / "attention", "slide-a")
    run_heatmaps(_config(case.store_path.parent, tmp_path / "out"))

    again = run_heatmaps(_config(case.store_path.parent, tmp_path / "out", colormap="jet",
                                 normalization="minmax", top_k=3))

    assert (again.n_ok, again.n_skipped) == (1, 0)
    summary = json.loads((tmp_path / "out" / "slide-a.summary.json").read_text())
    assert summary["colormap"] == "jet"
    assert summary["normalization"] == "minmax"
    assert summary["render_settings"]["top_k"] == 3


def test_rerun_same_settings_skips(
    tmp_path: Path, make_case: Callable[..., SyntheticCase]
) -> None:
    case = make_case(tmp_path / "attention", "slide-a")
    run_heatmaps(_config(case.store_path.parent, tmp_path / "out", colormap="jet"))

    again = run_heatmaps(_config(case.store_path.parent, tmp_path / "out", colormap="jet"))

    assert (again.n_ok, again.n_skipped) == (0, 1)
