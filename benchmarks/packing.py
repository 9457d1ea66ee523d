"""Padding of first-fit-decreasing against next-fit packing, and packed loader throughput.

Padding: bag lengths are drawn log-uniform from 200 to 200,000 tiles (1,000 slides per draw);
bags longer than the pack are subsampled to the pack length, as training does. Each packer
fills packs of 4k, 16k and 64k rows:

- next-fit: bags in the (random) order of the data set, a new pack whenever the next bag does
  not fit;
- FFD: first-fit-decreasing on the same capped bags;
- PackMIL: the training plan of `mil.data.packing` (main parts plus residual hyperslides,
  main_fraction 0.8, 4 slides per hyperslide), packed with FFD.

Loader (`--loader`): tiles per second delivered by `build_train_loader` on synthetic float16
feature stores, with 0 and 2 DataLoader workers and with the in-memory `FeatureCache`.

Usage:
    python benchmarks/packing.py                 # padding table, markdown
    python benchmarks/packing.py --loader        # also loader throughput
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mil.data.binpack import first_fit_decreasing, next_fit
from mil.data.packing import PackingConfig, plan_train_packs

PACK_LENS = (4096, 16384, 65536)
MIN_TILES, MAX_TILES = 200, 200_000


def log_uniform_lengths(n_slides: int, seed: int) -> np.ndarray:
    """Tiles per slide, log-uniform in [MIN_TILES, MAX_TILES], int64 [n_slides]."""
    generator = np.random.default_rng(seed)
    log_lengths = generator.uniform(np.log(MIN_TILES), np.log(MAX_TILES), n_slides)
    return np.exp(log_lengths).astype(np.int64)


def padding_of(packer: Callable[[list[int], int], list[list[int]]], lengths: list[int],
               pack_len: int) -> tuple[float, int, float]:
    """Padding ratio, pack count and seconds of packing capped `lengths` with `packer`."""
    started = time.perf_counter()
    packs = packer(lengths, pack_len)
    seconds = time.perf_counter() - started
    return 1.0 - sum(lengths) / (len(packs) * pack_len), len(packs), seconds


def packmil_padding(
    lengths: np.ndarray, pack_len: int, seed: int
) -> tuple[float, int, float, int]:
    """Padding ratio, pack count, seconds and bag count of the PackMIL training plan."""
    started = time.perf_counter()
    plan = plan_train_packs(lengths, PackingConfig(pack_len=pack_len), seed=seed)
    seconds = time.perf_counter() - started
    stats = plan.stats
    return stats.padding_ratio, stats.n_packs, seconds, stats.n_bags


def run_padding(n_slides: int, seeds: int) -> str:
    rows = ["| pack length | packer | padding % (mean ± sd) | packs | bags per pack | "
            "plan time (ms) |", "|---|---|---|---|---|---|"]
    for pack_len in PACK_LENS:
        results: dict[str, list[tuple[float, int, float]]] = {
            "next-fit": [], "FFD": [], "PackMIL (FFD)": []}
        bags: dict[str, list[int]] = {"next-fit": [], "FFD": [], "PackMIL (FFD)": []}
        for seed in range(seeds):
            lengths = log_uniform_lengths(n_slides, seed)
            capped = np.minimum(lengths, pack_len).tolist()
            results["next-fit"].append(padding_of(next_fit, capped, pack_len))
            results["FFD"].append(padding_of(first_fit_decreasing, capped, pack_len))
            padding, n_packs, seconds, n_bags = packmil_padding(lengths, pack_len, seed)
            results["PackMIL (FFD)"].append((padding, n_packs, seconds))
            bags["next-fit"].append(n_slides)
            bags["FFD"].append(n_slides)
            bags["PackMIL (FFD)"].append(n_bags)
        for name, values in results.items():
            padding = np.array([v[0] for v in values]) * 100
            packs = np.array([v[1] for v in values])
            per_pack = np.array(bags[name]) / packs
            millis = np.array([v[2] for v in values]) * 1000
            rows.append(
                f"| {pack_len // 1024}k | {name} | {padding.mean():.2f} ± {padding.std():.2f} | "
                f"{packs.mean():.0f} | {per_pack.mean():.1f} | {millis.mean():.0f} |"
            )
    return "\n".join(rows)


def write_stores(folder: Path, n_slides: int, dim: int, seed: int) -> None:
    from preprocessing.stores import FeatureStoreWriter

    generator = np.random.default_rng(seed)
    lengths = np.exp(generator.uniform(np.log(200), np.log(20_000), n_slides)).astype(int)
    for index, n_tiles in enumerate(lengths.tolist()):
        coords = np.zeros((n_tiles, 2), dtype=np.int64)
        with FeatureStoreWriter(folder / f"slide{index:03d}.h5", n_tiles, dim, coords,
                                {"backbone": "benchmark"}) as writer:
            writer.write(0, generator.standard_normal((n_tiles, dim), dtype=np.float32))


def run_loader(n_slides: int, dim: int, pack_len: int) -> str:
    import torch

    from mil.data.dataset import BagDataset
    from mil.data.feature_cache import FeatureCache
    from mil.data.packing import build_train_loader

    rows = ["| source | workers | packs | tiles/s | packs/s |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_stores(folder, n_slides, dim, seed=0)
        dataset = BagDataset(folder, labels=[i % 2 for i in range(n_slides)])
        cfg = PackingConfig(pack_len=pack_len)
        settings: list[tuple[str, int, FeatureCache | None]] = [
            ("HDF5 stores", 0, None), ("HDF5 stores", 2, None)]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        settings.append((f"FeatureCache ({device})", 0, FeatureCache(dataset, device)))
        for name, workers, cache in settings:
            loader = build_train_loader(dataset, cfg, 2, seed=0, num_workers=workers,
                                        feature_cache=cache)
            started = time.perf_counter()
            tiles = 0
            for batch in loader:
                tiles += batch.segments.num_valid
            seconds = time.perf_counter() - started
            rows.append(f"| {name} | {workers} | {len(loader)} | {tiles / seconds:,.0f} | "
                        f"{len(loader) / seconds:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=1000, help="slides per draw")
    parser.add_argument("--seeds", type=int, default=5, help="number of length draws")
    parser.add_argument("--loader", action="store_true", help="also time the packed loader")
    parser.add_argument("--loader-slides", type=int, default=48)
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension (loader)")
    parser.add_argument("--pack-len", type=int, default=16384, help="pack length (loader)")
    args = parser.parse_args()

    header = (f"Machine: {platform.processor() or platform.machine()}, "
              f"{platform.python_implementation()} {platform.python_version()}; "
              f"date {datetime.now(UTC):%Y-%m-%d}; {args.slides} slides log-uniform "
              f"{MIN_TILES}..{MAX_TILES} tiles, {args.seeds} draws")
    print(header)
    print()
    print(run_padding(args.slides, args.seeds))
    if args.loader:
        print()
        print(f"Loader: {args.loader_slides} slides log-uniform 200..20,000 tiles, D={args.dim} "
              f"float16, pack length {args.pack_len}")
        print()
        print(run_loader(args.loader_slides, args.dim, args.pack_len))


if __name__ == "__main__":
    main()
