"""End-to-end extraction throughput vs the backbone alone, side by side on the same tiles.

Run from the repository root:

    .venv/bin/python benchmarks/extract.py                         # CPU, EfficientNet-Lite0
    .venv/bin/python benchmarks/extract.py --device cuda --batch-size 256 --num-workers 8 \\
        --tiles 4096                                               # a GPU
    .venv/bin/python benchmarks/extract.py --json out.json         # also write the numbers

Both measurements use the same tiles, batch size, device, precision and
:class:`preprocessing.extract.TileEmbedder`:

- backbone only: the tiles are decoded once into a uint8 tensor in (pinned) host memory before
  timing, then every batch goes through ``TileEmbedder.embed``. That is the host-to-device copy,
  normalisation and forward pass, with a device synchronisation at the end.
- end to end: ``stream_slide_features`` reads and decodes the tiles from the slide with
  DataLoader workers, embeds them and appends each batch to an HDF5 store, which is then
  committed. This is one slide's work in ``slidemil extract`` without building the backbone.

The tiles are a grid over the slide at ``--target-mpp`` (no tissue detection, so the count is
exact), repeated in row order until there are ``--tiles`` of them. Each case runs
``--repeats`` times after one warm-up batch, alternating with the other case. The table gives
the ratio of the two median rates and the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from preprocessing.backbones import create_backbone  # noqa: E402
from preprocessing.extract import (  # noqa: E402
    TileEmbedder,
    TileGrid,
    resolve_autocast_dtype,
    resolve_device,
    resolve_num_workers,
    stream_slide_features,
)
from preprocessing.slide import open_slide  # noqa: E402
from preprocessing.stores import FeatureStoreWriter  # noqa: E402

DEFAULT_SLIDE = REPO_ROOT / "tests" / "data" / "slides" / "cmu-1-small-region.svs"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE, help="Slide file to read.")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="Backbone name.")
    parser.add_argument("--weights", default=None, help="pretrained (default), random or PATH.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i].")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=32, help="Tiles per forward pass.")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers; default: the stage's automatic choice.")
    parser.add_argument("--tiles", type=int, default=256, help="Tiles per measurement.")
    parser.add_argument("--target-mpp", type=float, default=0.5, help="Tile µm per pixel.")
    parser.add_argument("--tile-px", type=int, default=224, help="Tile side in pixels.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per case.")
    parser.add_argument("--compile", action="store_true", help="Use torch.compile.")
    parser.add_argument("--json", type=Path, default=None, help="Also write results here.")
    return parser.parse_args()


def make_grid(args: argparse.Namespace) -> TileGrid:
    """Tile grid over the whole slide at the target resolution, read from the best level."""
    with open_slide(args.slide) as slide:
        slide_mpp = slide.require_mpp()
        read_level = slide.best_level_for_mpp(args.target_mpp)
        width, height = slide.dimensions
    tile_px_level0 = args.tile_px * args.target_mpp / slide_mpp
    xs = np.arange(0, width - tile_px_level0 + 1, tile_px_level0)
    ys = np.arange(0, height - tile_px_level0 + 1, tile_px_level0)
    grid = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)
    repeats = -(-args.tiles // len(grid))
    coords = np.tile(grid, (repeats, 1))[: args.tiles]
    return TileGrid(
        slide_id=args.slide.stem,
        slide_path=args.slide.resolve(),
        slide_mpp=slide_mpp,
        coords=coords,
        tile_px_level0=float(tile_px_level0),
        read_level=read_level,
        tile_px=args.tile_px,
    )


def decode_all(grid: TileGrid, pin: bool) -> torch.Tensor:
    """Decode all tiles once, before timing, into uint8 [N, 3, H, W] channels-last."""
    with open_slide(grid.slide_path, mpp=grid.slide_mpp) as slide:
        tiles = [
            slide.read_tile(int(x), int(y), grid.tile_px_level0, grid.read_level, grid.tile_px)
            for x, y in grid.coords
        ]
    batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
    return batch.pin_memory() if pin else batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backbone_only(
    embedder: TileEmbedder, tiles: torch.Tensor, batch_size: int
) -> float:
    start = time.perf_counter()
    for part in tiles.split(batch_size):
        embedder.embed(part)
    synchronize(embedder.device)
    return time.perf_counter() - start


def time_end_to_end(
    embedder: TileEmbedder, grid: TileGrid, args: argparse.Namespace, out_dir: Path, run: int
) -> float:
    start = time.perf_counter()
    writer = FeatureStoreWriter.appending(
        out_dir / f"run{run}.h5", embedder.embedding_dim, {"benchmark": True}
    )
    with writer:
        stream_slide_features(
            grid, embedder, writer, batch_size=args.batch_size, num_workers=args.num_workers
        )
    return time.perf_counter() - start


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    args.num_workers = resolve_num_workers(args.num_workers, device)
    autocast_dtype = resolve_autocast_dtype(args.precision, device)
    backbone = create_backbone(args.backbone, args.weights)
    embedder = TileEmbedder(
        backbone, device, autocast_dtype=autocast_dtype, compile=args.compile
    )
    grid = make_grid(args)
    tiles = decode_all(grid, pin=device.type == "cuda")

    embedder.embed(tiles[: args.batch_size])  # warm-up: kernels, allocator, compile
    synchronize(device)

    backbone_s: list[float] = []
    end_to_end_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.repeats):
            # Alternate the two cases so that drifting machine load affects both alike.
            backbone_s.append(time_backbone_only(embedder, tiles, args.batch_size))
            end_to_end_s.append(time_end_to_end(embedder, grid, args, Path(tmp), run))

    n_tiles = len(grid.coords)
    backbone_rate = n_tiles / statistics.median(backbone_s)
    end_to_end_rate = n_tiles / statistics.median(end_to_end_s)
    # Each repeat times both cases back to back, so the ratio within a repeat is less exposed
    # to load drifting between repeats than the ratio of the two medians.
    paired_ratios = [
        backbone / end_to_end for backbone, end_to_end in zip(backbone_s, end_to_end_s, strict=True)
    ]
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "backbone": backbone.preset.name,
        "device": str(device),
        "precision": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "fp32",
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "tiles": n_tiles,
        "tile_px": args.tile_px,
        "read_level": grid.read_level,
        "backbone_only_tiles_per_s": round(backbone_rate, 1),
        "end_to_end_tiles_per_s": round(end_to_end_rate, 1),
        "ratio": round(end_to_end_rate / backbone_rate, 3),
        "paired_ratio_median": round(statistics.median(paired_ratios), 3),
        "backbone_only_s": [round(value, 3) for value in backbone_s],
        "end_to_end_s": [round(value, 3) for value in end_to_end_s],
    }

    print(
        "| backbone | device | precision | batch | workers | tiles | backbone only (tiles/s) "
        "| end to end (tiles/s) | end to end / backbone | median paired ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {results['backbone']} | {results['device']} | {results['precision']} "
        f"| {args.batch_size} | {args.num_workers} | {n_tiles} "
        f"| {results['backbone_only_tiles_per_s']} | {results['end_to_end_tiles_per_s']} "
        f"| {results['ratio']} | {results['paired_ratio_median']} |"
    )
    print(f"\nmachine: {results['machine']}; torch {results['torch']}; {results['date']}")
    print(f"timed runs (s): backbone only {backbone_s}, end to end {end_to_end_s}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
