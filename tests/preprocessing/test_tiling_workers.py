"""Several tiling processes on one slide list: every slide exactly once, even after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from preprocessing.stores import read_coords_store
from preprocessing.synthetic import tissue_blobs, write_synthetic_slide
from preprocessing.tiling import TilingConfig, run_tiling

WORKER = Path(__file__).with_name("tiling_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
SLIDE_IDS = [f"slide-{i}" for i in range(5)]


def _start(slides: Path, output_dir: Path, log: Path, delay_s: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(slides), str(output_dir), str(log), str(delay_s)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _events(log: Path) -> list[tuple[str, str, int]]:
    if not log.exists():
        return []
    return [(k, s, int(p)) for k, s, p in (line.split() for line in log.read_text().splitlines())]


def _wait_for(condition, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("worker did not reach the expected state in time")
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_worker_slide_done_once(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    for index, slide_id in enumerate(SLIDE_IDS):
        pattern = tissue_blobs(800, 600, seed=index)
        write_synthetic_slide(slides / f"{slide_id}.tif", 800, 600, pattern, downsamples=(1.0, 4.0))
    output_dir, log = tmp_path / "tiles", tmp_path / "events.log"

    # A slow worker claims the first slide; two fast workers share the rest meanwhile.
    victim = _start(slides, output_dir, log, delay_s=120.0)
    _wait_for(lambda: any(kind == "start" for kind, _, _ in _events(log)))
    helpers = [_start(slides, output_dir, log, delay_s=0.1) for _ in range(2)]
    for helper in helpers:
        assert helper.wait(timeout=120) == 0, helper.stderr.read() if helper.stderr else ""
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)

    held = [s for kind, s, pid in _events(log) if kind == "start" and pid == victim.pid]
    assert held == ["slide-0"]
    assert not (output_dir / "slide-0.h5").exists()
    assert (output_dir / ".slidemil" / "tile" / "locks" / "slide-0.lock").exists()

    # All three restarted: the dead worker's lock is broken and its slide done by one of them.
    restarted = [_start(slides, output_dir, log, delay_s=0.1) for _ in range(3)]
    for worker in restarted:
        assert worker.wait(timeout=120) == 0, worker.stderr.read() if worker.stderr else ""

    finished = Counter(s for kind, s, _ in _events(log) if kind == "finish")
    assert finished == Counter({slide_id: 1 for slide_id in SLIDE_IDS})
    assert not list((output_dir / ".slidemil" / "tile" / "locks").glob("*.lock"))

    serial_dir = tmp_path / "serial"
    serial = run_tiling(
        TilingConfig(
            slides=str(slides), output_dir=serial_dir, target_mpp=1.0, tile_px=64, progress=False
        )
    )
    assert serial.n_ok == len(SLIDE_IDS)
    for slide_id in SLIDE_IDS:
        parallel_store = read_coords_store(output_dir / f"{slide_id}.h5")
        serial_store = read_coords_store(serial_dir / f"{slide_id}.h5")
        np.testing.assert_array_equal(parallel_store.coords, serial_store.coords)
        assert parallel_store.attrs == serial_store.attrs
    manifest_lines = (output_dir / "manifest.csv").read_text().splitlines()
    assert len(manifest_lines) == 1 + len(SLIDE_IDS)
