"""Tiling worker for the multiprocess lock test.

Usage: python tiling_worker.py SLIDES OUTPUT_DIR EVENT_LOG DELAY_S

Runs the tiling stage like `slidemil tile` and appends "start <id> <pid>" and
"finish <id> <pid>" lines to EVENT_LOG around each slide, waiting DELAY_S seconds after the start
line so that a test can kill the process while it holds a slide's lock.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import preprocessing.tiling as tiling


def _event(log: Path, kind: str, slide_id: str) -> None:
    with log.open("a") as handle:
        handle.write(f"{kind} {slide_id} {os.getpid()}\n")


def main() -> None:
    slides, output_dir, log_text, delay_text = sys.argv[1:5]
    log, delay = Path(log_text), float(delay_text)
    tile_slide = tiling.tile_slide

    def traced(slide_input, cfg, mpp_override=None):  # type: ignore[no-untyped-def]
        _event(log, "start", slide_input.slide_id)
        time.sleep(delay)
        outcome = tile_slide(slide_input, cfg, mpp_override=mpp_override)
        _event(log, "finish", slide_input.slide_id)
        return outcome

    tiling.tile_slide = traced
    config = tiling.TilingConfig(
        slides=slides, output_dir=Path(output_dir), target_mpp=1.0, tile_px=64, progress=False
    )
    result = tiling.run_tiling(config)
    sys.exit(1 if result.n_failed else 0)


if __name__ == "__main__":
    main()
