"""Tiling speed and memory: seconds per slide, tiles per second, peak memory, on one core.

Run from the repository root:

    .venv/bin/python benchmarks/tiling.py                    # bundled slides + 40,000 x 30,000
    .venv/bin/python benchmarks/tiling.py --skip-large       # bundled slides only
    .venv/bin/python benchmarks/tiling.py --json out.json    # also write the numbers

Each slide is tiled in a fresh child process pinned to one CPU core (where the OS allows it),
with one thread for numpy's libraries. So the numbers are single-core, and the peak resident
memory (``ru_maxrss``) belongs to that slide alone. The child runs the stage's per-slide function
(`preprocessing.tiling.tile_slide`: thumbnail, tissue detection, tile grid, QC PNG, GeoJSON
and coords store) ``--repeats`` times and reports the median, split into phases.

The large slide is a synthetic JPEG pyramid (levels at downsample 1, 4, 16, 64; 0.25 µm/px,
so 10 x 7.5 mm) written by `preprocessing.synthetic` into ``--work-dir`` and reused if present.
Writing it takes a few minutes once.

``read tiles/s`` decodes ``--read-tiles`` kept tiles with ``Slide.read_tile`` at the stage's
read level, the same call `slidemil extract` makes per tile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BUNDLED = REPO_ROOT / "tests" / "data" / "slides"
BUNDLED_MPP = {"tcga-cr-7395-01a-01-ts1": 0.499}  # its file carries no resolution
LARGE_SIZE = (40_000, 30_000)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "slidemil-bench"
    )
    parser.add_argument("--target-mpp", type=float, default=0.5, help="Tile µm per pixel.")
    parser.add_argument("--tile-px", type=int, default=224, help="Tile side in pixels.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per slide; median reported.")
    parser.add_argument("--read-tiles", type=int, default=300, help="Tiles decoded per slide.")
    parser.add_argument("--skip-large", action="store_true", help="Only the bundled slides.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--child", nargs=2, metavar=("SLIDE", "MPP"), help=argparse.SUPPRESS)
    return parser.parse_args()


def large_slide(work_dir: Path) -> Path:
    """Write (once) the 40,000 x 30,000 synthetic pyramid and return its path."""
    from preprocessing.synthetic import tissue_blobs, write_synthetic_slide

    path = work_dir / "synthetic-40000x30000.tif"
    if path.exists():
        return path
    width, height = LARGE_SIZE
    print(f"writing {path} (once) ...", file=sys.stderr)
    start = time.perf_counter()
    partial = path.with_suffix(".partial.tif")
    write_synthetic_slide(
        partial,
        width,
        height,
        tissue_blobs(width, height, count=12, seed=7),
        downsamples=(1.0, 4.0, 16.0, 64.0),
        mpp=0.25,
        tile=512,
        compression="jpeg",
    )
    partial.rename(path)
    print(f"  written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def run_child(slide_path: Path, mpp: float | None, args: argparse.Namespace) -> dict[str, Any]:
    """Tile one slide in a child process pinned to one core; return its measurements."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(slide_path),
        str(mpp or 0),
        "--work-dir",
        str(args.work_dir),
        "--target-mpp",
        str(args.target_mpp),
        "--tile-px",
        str(args.tile_px),
        "--repeats",
        str(args.repeats),
        "--read-tiles",
        str(args.read_tiles),
    ]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(args: argparse.Namespace) -> None:
    """Measure one slide in this process (called through `run_child`)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    import numpy as np

    from preprocessing import tiling
    from preprocessing.inputs import SlideInput, slide_id_from_path
    from preprocessing.slide import open_slide
    from preprocessing.stores import read_coords_store

    slide_path, mpp_text = Path(args.child[0]), args.child[1]
    mpp = float(mpp_text) or None
    slide_input = SlideInput(slide_id_from_path(slide_path), slide_path)
    output_dir = args.work_dir / "tiles"
    cfg = tiling.TilingConfig(
        slides=str(slide_path),
        output_dir=output_dir,
        target_mpp=args.target_mpp,
        tile_px=args.tile_px,
        progress=False,
    )

    phases: dict[str, list[float]] = {"thumbnail": [], "tissue": [], "total": []}
    original_thumbnail, original_detect = tiling._detection_thumbnail, tiling.detect_tissue

    def timed(name: str, function: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            result = function(*a, **k)
            phases[name].append(time.perf_counter() - start)
            return result

        return wrapper

    tiling._detection_thumbnail = timed("thumbnail", original_thumbnail)
    tiling.detect_tissue = timed("tissue", original_detect)
    outcome = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        outcome = tiling.tile_slide(slide_input, cfg, mpp_override=mpp)
        phases["total"].append(time.perf_counter() - start)
    assert outcome is not None

    store = read_coords_store(tiling.coords_store_path(output_dir, slide_input.slide_id))
    attrs = store.attrs
    read_seconds = 0.0
    n_read = min(args.read_tiles, store.n_tiles)
    if n_read:
        picks = np.linspace(0, store.n_tiles - 1, n_read).astype(int)
        with open_slide(slide_path, mpp=mpp) as slide:
            start = time.perf_counter()
            for x, y in store.coords[picks].tolist():
                slide.read_tile(x, y, attrs["tile_px_level0"], attrs["read_level"], args.tile_px)
            read_seconds = time.perf_counter() - start

    median = {name: statistics.median(values) for name, values in phases.items()}
    result = {
        "slide": slide_input.slide_id,
        "level0": [attrs["level0_width"], attrs["level0_height"]],
        "n_tiles": store.n_tiles,
        "n_grid_tiles": attrs["n_grid_tiles"],
        "read_level": attrs["read_level"],
        "seconds": median["total"],
        "thumbnail_s": median["thumbnail"],
        "tissue_s": median["tissue"],
        "grid_and_outputs_s": median["total"] - median["thumbnail"] - median["tissue"],
        "tiles_per_s": store.n_tiles / median["total"],
        "read_tiles_per_s": n_read / read_seconds if read_seconds else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "status": outcome.status,
    }
    print(json.dumps(result))


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo on Linux, else what `platform` reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)

    slides: list[tuple[Path, float | None]] = [
        (path, BUNDLED_MPP.get(path.stem))
        for path in sorted(BUNDLED.glob("*"))
        if path.suffix in (".svs", ".ndpi")
    ]
    if not args.skip_large:
        slides.append((large_slide(args.work_dir), None))

    results = [run_child(path, mpp, args) for path, mpp in slides]
    header = (
        "| slide | level 0 (px) | tiles kept / grid | read level | s per slide | thumbnail s "
        "| tissue s | grid + outputs s | tiles/s | read tiles/s | peak RSS MB |"
    )
    print(
        f"\nTiling benchmark, {datetime.date.today()}, {cpu_name()}, one core, target "
        f"{args.target_mpp} µm/px, {args.tile_px} px tiles, median of {args.repeats}\n"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in results:
        read_rate = f"{r['read_tiles_per_s']:.0f}" if r["read_tiles_per_s"] else "-"
        print(
            f"| {r['slide']} | {r['level0'][0]} x {r['level0'][1]} | {r['n_tiles']} / "
            f"{r['n_grid_tiles']} | {r['read_level']} | {r['seconds']:.2f} | "
            f"{r['thumbnail_s']:.2f} | {r['tissue_s']:.2f} | {r['grid_and_outputs_s']:.2f} | "
            f"{r['tiles_per_s']:.0f} | {read_rate} | {r['peak_rss_mb']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"date": str(datetime.date.today()), "results": results}))


if __name__ == "__main__":
    main()
