"""The per-slide runner: shards, locks, manifest rows, resume and error handling."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from preprocessing.errors import ConfigError, MissingMppError, SlideOpenError
from preprocessing.inputs import SlideInput
from preprocessing.jobs import (
    ManifestRow,
    Shard,
    SlideLock,
    SlideOutcome,
    StageResult,
    check_shard,
    parse_shard,
    run_slides,
    select_shard,
    state_dir,
    write_row,
)


def _slides(count: int) -> list[SlideInput]:
    return [SlideInput(f"slide-{i:02d}", Path(f"/data/slide-{i:02d}.svs")) for i in range(count)]


def _manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_parse_shard() -> None:
    assert parse_shard("2/4", environ={}) == (2, 4)
    assert parse_shard(None, environ={}) == (0, 1)
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_shard(None, environ=slurm) == (2, 4)
    assert parse_shard("0/2", environ=slurm) == (0, 2)


@pytest.mark.parametrize("shard", ["4/4", "-1/3", "1", "a/b", "1/0"])
def test_parse_shard_rejects(shard: str) -> None:
    with pytest.raises(ConfigError, match="shard"):
        parse_shard(shard, environ={})


@pytest.mark.parametrize("shard", ["2/0", "0/0", "0/-3"])
def test_shard_count_below_one_explained(shard: str) -> None:
    with pytest.raises(ConfigError, match="number of shards n must be at least 1") as raised:
        parse_shard(shard, environ={})
    assert "index must be" not in str(raised.value)


def test_slurm_array_with_step() -> None:
    # --array=0-6:2 runs tasks 0, 2, 4 and 6, which are shards 0 to 3 of 4.
    slurm = {
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_COUNT": "4",
        "SLURM_ARRAY_TASK_STEP": "2",
    }
    indexes = [
        parse_shard(None, environ={**slurm, "SLURM_ARRAY_TASK_ID": str(task)})
        for task in (0, 2, 4, 6)
    ]
    assert indexes == [(0, 4), (1, 4), (2, 4), (3, 4)]
    shifted = {**slurm, "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_ID": "14"}
    assert parse_shard(None, environ=shifted) == (2, 4)


def test_slurm_task_off_the_step_rejected() -> None:
    slurm = {
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_COUNT": "4",
        "SLURM_ARRAY_TASK_STEP": "2",
    }
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID=3.*not min \\+ k \\* step"):
        parse_shard(None, environ=slurm)


@pytest.mark.parametrize("shard", ["3/2", "2/2", "x/2", "1-2"])
def test_check_shard_rejects(shard: str) -> None:
    with pytest.raises(ValueError, match=shard):
        check_shard(shard)
    assert check_shard("1/2") == "1/2"
    assert check_shard(None) is None


def test_shard_type_validates_configs() -> None:
    class StageConfig(BaseModel):
        shard: Shard = None

    assert StageConfig(shard="1/2").shard == "1/2"
    assert StageConfig().shard is None
    with pytest.raises(ValidationError, match="'3/2' asks for shard 3 of 2"):
        StageConfig(shard="3/2")


def test_bad_shard_makes_no_folder(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    with pytest.raises(ConfigError, match="--shard"):
        run_slides(
            _slides(2),
            lambda slide: SlideOutcome(),
            stage="extract",
            output_dir=output_dir,
            is_done=lambda s: False,
            shard="3/2",
            progress=False,
        )
    assert not output_dir.exists()


def test_output_folder_that_is_a_file(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    output_dir.write_text("not a folder")

    with pytest.raises(ConfigError, match="cannot create the output folder") as caught:
        run_slides(
            _slides(1),
            lambda slide: SlideOutcome(),
            stage="extract",
            output_dir=output_dir,
            is_done=lambda s: False,
            progress=False,
        )

    assert str(output_dir) in str(caught.value)
    assert output_dir.read_text() == "not a folder"


def test_summary_pluralises() -> None:
    manifest = Path("out/manifest.csv")
    one = StageResult(manifest, 1, 0, 2, "tile")
    assert one.summary("tiled") == f"tile: 1 slide tiled, 0 failed, 2 skipped; manifest {manifest}"
    none = StageResult(manifest, 0, 1, 0, "heatmap")
    assert none.summary("rendered").startswith("heatmap: 0 slides rendered, 1 failed")
    assert str(StageResult(manifest, 3, 0, 0)).startswith("3 slides processed")


def test_interrupt_logs_the_slide(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def process(slide: SlideInput) -> SlideOutcome:
        if slide.slide_id == "slide-01":
            raise KeyboardInterrupt
        return SlideOutcome("ok", 3)

    with pytest.raises(KeyboardInterrupt):
        run_slides(
            _slides(3),
            process,
            stage="tile",
            output_dir=tmp_path,
            is_done=lambda s: False,
            progress=False,
        )
    assert "interrupted while processing slide-01" in caplog.text
    assert "slide-01 will be redone on the next run" in caplog.text
    assert [row["id"] for row in _manifest(tmp_path / "manifest.csv")] == ["slide-00"]
    assert not list((state_dir(tmp_path, "tile") / "locks").iterdir())


def test_slurm_without_count_rejected() -> None:
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_COUNT"):
        parse_shard(None, environ={"SLURM_ARRAY_TASK_ID": "0"})


def test_shards_partition_the_list() -> None:
    slides = _slides(11)
    shards = [select_shard(slides, i, 3) for i in range(3)]
    ids = [s.slide_id for shard in shards for s in shard]
    assert sorted(ids) == [s.slide_id for s in slides]
    assert len(set(ids)) == len(ids)
    assert [len(shard) for shard in shards] == [4, 4, 3]


def test_lock_is_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "a.lock"
    first, second = SlideLock(path), SlideLock(path)
    assert first.acquire()
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid()
    assert holder["host"] == socket.gethostname()
    assert "time" in holder
    assert not second.acquire()
    first.release()
    assert not path.exists()
    assert second.acquire()
    second.release()


def test_lock_of_dead_process_is_broken(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(finished.stdout)
    path = tmp_path / "a.lock"
    path.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "token": "x"}))
    lock = SlideLock(path)
    assert lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_of_other_host_waits_until_stale(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "x"}))
    assert not SlideLock(path, stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    lock = SlideLock(path, stale_after_s=60)
    assert lock.acquire()
    lock.release()


def test_release_keeps_a_lock_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    lock = SlideLock(path)
    assert lock.acquire()
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "other"}))
    lock.release()
    assert path.exists()


def test_heartbeat_refreshes_lock(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    lock = SlideLock(path, stale_after_s=0.4)
    assert lock.acquire()
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.35)
    assert time.time() - path.stat().st_mtime < 1.0
    lock.release()


def test_manifest_rows_and_counts(tmp_path: Path) -> None:
    def process(slide: SlideInput) -> SlideOutcome:
        if slide.slide_id == "slide-01":
            raise MissingMppError(f"{slide.path}: no resolution")
        if slide.slide_id == "slide-02":
            raise SlideOpenError(f"{slide.path}: not a slide,\nsecond line")
        if slide.slide_id == "slide-03":
            raise RuntimeError("bug")
        if slide.slide_id == "slide-04":
            return SlideOutcome("no_tissue", 0, "empty")
        return SlideOutcome("ok", 7)

    result = run_slides(
        _slides(6),
        process,
        stage="tile",
        output_dir=tmp_path,
        is_done=lambda s: False,
        progress=False,
    )
    assert (result.n_ok, result.n_failed, result.n_skipped) == (3, 3, 0)
    assert not result.ok
    rows = {row["id"]: row for row in _manifest(result.manifest_path)}
    assert list(rows["slide-00"].keys()) == [
        "id",
        "path",
        "stage",
        "status",
        "error_type",
        "message",
        "n_tiles",
        "seconds",
    ]
    assert rows["slide-00"]["status"] == "ok"
    assert rows["slide-00"]["n_tiles"] == "7"
    assert rows["slide-00"]["stage"] == "tile"
    assert float(rows["slide-00"]["seconds"]) >= 0
    assert (rows["slide-01"]["status"], rows["slide-01"]["error_type"]) == ("no_mpp", "no_mpp")
    assert (rows["slide-02"]["status"], rows["slide-02"]["error_type"]) == ("failed", "unreadable")
    assert "\n" not in rows["slide-02"]["message"]
    assert (rows["slide-03"]["status"], rows["slide-03"]["error_type"]) == (
        "failed",
        "RuntimeError",
    )
    assert rows["slide-04"]["status"] == "no_tissue"
    assert not list((state_dir(tmp_path, "tile") / "locks").iterdir())


def test_stop_on_first_error(tmp_path: Path) -> None:
    calls: list[str] = []

    def process(slide: SlideInput) -> SlideOutcome:
        calls.append(slide.slide_id)
        if slide.slide_id == "slide-01":
            raise SlideOpenError(f"{slide.path}: broken")
        return SlideOutcome()

    with pytest.raises(SlideOpenError, match="broken"):
        run_slides(
            _slides(4),
            process,
            stage="tile",
            output_dir=tmp_path,
            is_done=lambda s: False,
            skip_errors=False,
            progress=False,
        )
    assert calls == ["slide-00", "slide-01"]
    rows = _manifest(tmp_path / "manifest.csv")
    assert [row["status"] for row in rows] == ["ok", "failed"]


def test_resume_skips_done_and_retries_failures(tmp_path: Path) -> None:
    done: set[str] = set()
    attempts: dict[str, int] = {}

    def process(slide: SlideInput) -> SlideOutcome:
        attempts[slide.slide_id] = attempts.get(slide.slide_id, 0) + 1
        if slide.slide_id == "slide-02" and attempts[slide.slide_id] == 1:
            raise SlideOpenError("transient")
        done.add(slide.slide_id)
        return SlideOutcome(n_tiles=1)

    def run() -> object:
        return run_slides(
            _slides(4),
            process,
            stage="tile",
            output_dir=tmp_path,
            is_done=lambda s: s.slide_id in done,
            progress=False,
        )

    first, second = run(), run()
    assert (first.n_ok, first.n_failed, first.n_skipped) == (3, 1, 0)  # type: ignore[attr-defined]
    assert (second.n_ok, second.n_failed, second.n_skipped) == (1, 0, 3)  # type: ignore[attr-defined]
    assert attempts == {"slide-00": 1, "slide-01": 1, "slide-02": 2, "slide-03": 1}
    rows = _manifest(tmp_path / "manifest.csv")
    assert len(rows) == 4
    assert all(row["status"] == "ok" for row in rows)


def test_outputs_made_elsewhere_get_skipped_rows(tmp_path: Path) -> None:
    result = run_slides(
        _slides(2),
        lambda s: SlideOutcome(),
        stage="extract",
        output_dir=tmp_path,
        is_done=lambda s: True,
        progress=False,
    )
    assert result.n_skipped == 2
    assert [row["status"] for row in _manifest(result.manifest_path)] == ["skipped", "skipped"]


def test_skip_keeps_row_of_other_worker(tmp_path: Path) -> None:
    def finished_by_other_worker(slide: SlideInput) -> bool:
        # Another worker wrote this row after this run had started.
        write_row(tmp_path, ManifestRow(slide.slide_id, str(slide.path), "tile", "ok",
                                        n_tiles=7, seconds=1.5))
        return True

    result = run_slides(
        _slides(2),
        lambda s: SlideOutcome(),
        stage="tile",
        output_dir=tmp_path,
        is_done=finished_by_other_worker,
        progress=False,
    )

    assert result.n_skipped == 2
    rows = _manifest(result.manifest_path)
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert [row["n_tiles"] for row in rows] == ["7", "7"]


def test_slide_held_by_live_process_is_skipped(tmp_path: Path) -> None:
    lock_path = state_dir(tmp_path, "tile") / "locks" / "slide-00.lock"
    holder = SlideLock(lock_path)
    assert holder.acquire()
    try:
        result = run_slides(
            _slides(2),
            lambda s: SlideOutcome(),
            stage="tile",
            output_dir=tmp_path,
            is_done=lambda s: False,
            progress=False,
        )
    finally:
        holder.release()
    assert (result.n_ok, result.n_skipped) == (1, 1)


def test_shard_runs_its_part_only(tmp_path: Path) -> None:
    seen: list[str] = []

    def process(slide: SlideInput) -> SlideOutcome:
        seen.append(slide.slide_id)
        return SlideOutcome()

    run_slides(
        _slides(5),
        process,
        stage="tile",
        output_dir=tmp_path,
        is_done=lambda s: False,
        shard="1/2",
        progress=False,
    )
    assert seen == ["slide-01", "slide-03"]
