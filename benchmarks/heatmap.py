"""Time and peak memory of `slidemil heatmap` on one large synthetic slide (CPU).

Builds a pyramidal JPEG TIFF of 150,000 x 100,000 level-0 pixels whose tiles within a level are
all the same encoded bytes, so the file is small and fast to write. The attention store has
`--tiles` tiles of 380.8 level-0 pixels with random scores, 0.1 % of them NaN. The heatmap
stage then runs in a child process, so its peak resident memory (ru_maxrss) excludes the
set-up. Prints a Markdown table row and the per-phase seconds from the slide's summary file.

    .venv/bin/python benchmarks/heatmap.py --tiles 100000 --max-size 2048 --top-k 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LEVEL0 = (150_000, 100_000)
TILE_PX_LEVEL0 = 380.8
STEP = 380
TIFF_TILE = 1024
DOWNSAMPLES = (1, 4, 16, 64)


def describe_machine() -> str:
    """CPU model, core count and load average, for the results table."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} cores, {platform.system()}, load {load:.1f}"


def write_constant_pyramid(path: Path, size: tuple[int, int]) -> None:
    """Write a tiled JPEG TIFF pyramid whose tiles all hold one tissue-like colour."""
    import imagecodecs
    import tifffile

    tile = np.empty((TIFF_TILE, TIFF_TILE, 3), dtype=np.uint8)
    tile[:] = (226, 190, 214)
    encoded = imagecodecs.jpeg_encode(tile, level=90)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, downsample in enumerate(DOWNSAMPLES):
            width, height = size[0] // downsample, size[1] // downsample
            count = -(-width // TIFF_TILE) * -(-height // TIFF_TILE)
            tif.write(
                (encoded for _ in range(count)), shape=(height, width, 3), dtype="uint8",
                tile=(TIFF_TILE, TIFF_TILE), compression="jpeg", photometric="rgb",
                subfiletype=1 if index else 0,
                resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER",
            )


def write_attention(path: Path, slide_path: Path, n_tiles: int, seed: int) -> None:
    """Attention store of `n_tiles` grid tiles with softmax-like scores and 0.1 % NaN."""
    from preprocessing.stores import write_attention_store

    xs = np.arange(0, LEVEL0[0] - TILE_PX_LEVEL0, STEP, dtype=np.int64)
    ys = np.arange(0, LEVEL0[1] - TILE_PX_LEVEL0, STEP, dtype=np.int64)
    coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    if len(coords) < n_tiles:
        raise SystemExit(f"the synthetic slide fits {len(coords)} tiles, fewer than {n_tiles}")
    rng = np.random.default_rng(seed)
    coords = coords[np.sort(rng.choice(len(coords), n_tiles, replace=False))]
    logits = rng.normal(size=n_tiles)
    attention = np.exp(logits) / np.exp(logits).sum()
    attention[rng.choice(n_tiles, max(1, n_tiles // 1000), replace=False)] = np.nan
    write_attention_store(path, attention, coords, {
        "slide_id": path.stem, "slide_path": str(slide_path), "tile_px_level0": TILE_PX_LEVEL0,
        "level0_width": LEVEL0[0], "level0_height": LEVEL0[1], "predicted_class": "tumour",
        "probability": 0.91, "classes": '["normal", "tumour"]', "model": "abmil",
    })


def measure(store: Path, output_dir: Path, max_size: int, top_k: int) -> None:
    """Child process: run the stage once and print seconds and peak memory as JSON."""
    from mil.heatmap import HeatmapConfig, run_heatmaps

    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = HeatmapConfig(attention_dir=store, output_dir=output_dir, max_size=max_size,
                        top_k=top_k, overwrite=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = run_heatmaps(cfg)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if result.n_failed or not result.n_ok:
        raise SystemExit(f"heatmap stage failed, see {result.manifest_path}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": peak_mib,
                      "baseline_mib": baseline_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=100_000, help="tiles in the slide")
    parser.add_argument("--max-size", type=int, default=2048, help="thumbnail side, pixels")
    parser.add_argument("--top-k", type=int, default=8, help="gallery tiles per group")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the synthetic slide and outputs (default: temporary)")
    parser.add_argument("--child", nargs=2, type=Path, metavar=("STORE", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child[0], args.child[1], args.max_size, args.top_k)
        return

    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        slide_path = workdir / "synthetic-100k.tif"
        store = workdir / "attention" / "synthetic-100k.h5"
        write_constant_pyramid(slide_path, LEVEL0)
        write_attention(store, slide_path, args.tiles, args.seed)

        runs = []
        for _ in range(args.repeats):
            output = subprocess.run(
                [sys.executable, __file__, "--child", str(store), str(workdir / "out"),
                 "--max-size", str(args.max_size), "--top-k", str(args.top_k)],
                check=True, capture_output=True, text=True,
            )
            runs.append(json.loads(output.stdout.strip().splitlines()[-1]))
        summary = json.loads((workdir / "out" / f"{store.stem}.summary.json").read_text())

    best = min(runs, key=lambda run: run["seconds"])
    peak = max(run["peak_mib"] for run in runs)
    machine = describe_machine()
    print(f"| tiles | thumbnail | top-k | wall s (best of {args.repeats}) | CPU s | "
          "peak RSS MiB (after imports) | machine |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {summary['n_tiles'] + summary['n_dropped_nan']:,} | "
          f"{summary['thumbnail_size'][0]}x{summary['thumbnail_size'][1]} | {args.top_k} | "
          f"{best['seconds']:.2f} | {best['cpu_seconds']:.2f} | {peak:.0f} "
          f"({best['baseline_mib']:.0f}) | {machine} |")
    print("phases of the last run (s):", json.dumps(summary["seconds"]))


if __name__ == "__main__":
    main()
