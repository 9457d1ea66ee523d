"""Training time per epoch: packed batches vs one bag per optimizer step.

The same model, data, optimizer and number of epochs are trained three ways:

- `one_bag`: one whole slide per optimizer step, as the CLAM and ACMIL training loops do;
- `packed`: slidemil's packed loader with every tile of every bag (no cap, no residual split),
  several bags per step, so only the batching differs from `one_bag`;
- `packmil`: the PackMIL recipe (each epoch a fresh random draw of every bag: main parts
  capped at `--max-tiles-per-bag` tiles, residual parts merged into hyperslides with soft
  labels and a loss weight of 0.1) in packs of `--packmil-pack-len` rows, which trains on
  fewer tile rows per epoch. Validation always reads every tile of every bag.

Data: synthetic bags whose lengths are log-uniform between 200 and 20,000 tiles, D = 1024
float16 features written to feature stores and held in memory (BagDataset cache) by every
mode, so disk reads are not timed. Positive bags hold a few tiles shifted along one direction.
Reported: seconds per epoch (median over epochs after the first, which also fills the cache),
the ratio to `one_bag`, and validation AUROC and balanced accuracy after the last epoch.

Run:
    python benchmarks/train_speed.py              # 48 training + 64 validation bags, 10 epochs
    python benchmarks/train_speed.py --quick      # 16 + 8 bags, 2 epochs
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mil.batch import PackedBatch  # noqa: E402
from mil.data import BagDataset, PackingConfig, build_eval_loader, build_train_loader  # noqa: E402
from mil.engine import predict_bags, train_epoch  # noqa: E402
from mil.kernels.segments import Segments  # noqa: E402
from mil.metrics import evaluate_predictions  # noqa: E402
from mil.models import create_model  # noqa: E402
from mil.optim import build_optimizer  # noqa: E402
from mil.seed import seed_everything  # noqa: E402
from preprocessing.stores import FeatureStoreWriter  # noqa: E402


def write_synthetic_stores(folder: Path, n_bags: int, dim: int, min_tiles: int, max_tiles: int,
                           positive_fraction: float, shift: float, seed: int) -> dict[str, int]:
    """Write `n_bags` float16 feature stores; returns slide id -> label (alternating 0/1)."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    lengths = np.exp(rng.uniform(np.log(min_tiles), np.log(max_tiles), size=n_bags)).astype(int)
    labels = {}
    for index, n_tiles in enumerate(lengths.tolist()):
        slide_id = f"synthetic-{index:03d}"
        label = index % 2
        features = rng.standard_normal(size=(n_tiles, dim), dtype=np.float32)
        if label:
            n_positive = max(1, round(positive_fraction * n_tiles))
            rows = rng.choice(n_tiles, size=n_positive, replace=False)
            features[rows] += shift * direction
        coords = np.stack([np.arange(n_tiles) % 256, np.arange(n_tiles) // 256], 1) * 224
        with FeatureStoreWriter(folder / f"{slide_id}.h5", n_tiles, dim, coords,
                                {"backbone": "synthetic"}, dtype="float16") as writer:
            writer.write(0, features)
        labels[slide_id] = label
    return labels


def one_bag_batches(dataset: BagDataset, seed: int, epoch: int) -> list[PackedBatch]:
    """Put every bag alone in a batch, in a seeded random order (all tiles, no padding)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
    batches = []
    for index in order.tolist():
        bag = dataset.read(index)
        batches.append(PackedBatch(
            features=bag.features, segments=Segments.from_lengths([bag.n_tiles]),
            labels=torch.tensor([bag.label]), bag_ids=[bag.slide_id],
        ))
    return batches


def run_mode(mode: str, train: BagDataset, val: BagDataset, args: argparse.Namespace
             ) -> dict[str, Any]:
    """Train one mode from the same initial weights; time each epoch, validate at the end."""
    seed_everything(args.seed)
    model = create_model(args.model, in_dim=train.dim, n_classes=2)
    optimizer = build_optimizer(model, args.lr, 1e-2)
    device = torch.device("cpu")
    packing = None
    if mode == "packed":
        packing = PackingConfig(pack_len=args.pack_len, main_fraction=1.0,
                                max_tiles_per_bag=None)
    elif mode == "packmil":
        packing = PackingConfig(pack_len=args.packmil_pack_len, main_fraction=0.8,
                                max_tiles_per_bag=args.max_tiles_per_bag)

    seconds, rows_trained = [], []
    for epoch in range(args.epochs):
        started = time.perf_counter()
        if packing is None:
            batches: Any = one_bag_batches(train, args.seed, epoch)
        else:
            batches = build_train_loader(train, packing, 2, seed=args.seed, epoch=epoch)
            rows_trained.append(sum(bag.length for pack in batches.plan.packs for bag in pack))
        stats = train_epoch(model, batches, optimizer, device=device, grad_clip=1.0,
                            residual_weight=0.1)
        seconds.append(time.perf_counter() - started)
        print(f"{mode:8s} epoch {epoch + 1}: {seconds[-1]:.1f} s, {stats.n_steps} steps, "
              f"loss {stats.loss:.4f}", file=sys.stderr, flush=True)

    loader = build_eval_loader(val, args.pack_len)
    predictions = predict_bags(model, loader, device=device, keep_attention=False)
    assert predictions.labels is not None
    report = evaluate_predictions(predictions.labels, predictions.probs, context=mode,
                                  n_bootstrap=1000, seed=args.seed)
    timed = seconds[1:] if len(seconds) > 1 else seconds
    return {
        "seconds_per_epoch": statistics.median(timed),
        "epoch_seconds": seconds,
        "tile_rows_per_epoch": (int(np.mean(rows_trained)) if rows_trained
                                else int(train.lengths.sum())),
        "val_auroc": report.metrics["auroc"],
        "val_auroc_ci": report.ci95.get("auroc", (float("nan"), float("nan"))),
        "val_balanced_accuracy": report.metrics["balanced_accuracy"],
        "val_balanced_accuracy_ci": report.ci95.get("balanced_accuracy",
                                                    (float("nan"), float("nan"))),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-bags", type=int, default=48)
    parser.add_argument("--val-bags", type=int, default=64)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--min-tiles", type=int, default=200)
    parser.add_argument("--max-tiles", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="abmil")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pack-len", type=int, default=20480,
                        help="tiles per pack of the `packed` mode; at least --max-tiles so it "
                             "keeps every tile")
    parser.add_argument("--packmil-pack-len", type=int, default=2048,
                        help="tiles per pack of the `packmil` mode")
    parser.add_argument("--max-tiles-per-bag", type=int, default=384,
                        help="cap on a main part or hyperslide in the `packmil` mode")
    parser.add_argument("--positive-fraction", type=float, default=0.05)
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--modes", nargs="+", default=["one_bag", "packed", "packmil"],
                        choices=["one_bag", "packed", "packmil"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="16 + 8 bags, 2 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_bags, args.val_bags, args.epochs = 16, 8, 2
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="slidemil-speed-") as tmp:
        folder = Path(tmp)
        labels = write_synthetic_stores(
            folder, args.train_bags + args.val_bags, args.dim, args.min_tiles, args.max_tiles,
            args.positive_fraction, args.shift, args.seed)
        ids = sorted(labels)
        train_ids, val_ids = ids[: args.train_bags], ids[args.train_bags:]
        train = BagDataset(folder, slide_ids=train_ids, labels=labels, cache=True)
        val = BagDataset(folder, slide_ids=val_ids, labels=labels, cache=True)
        results = {mode: run_mode(mode, train, val, args) for mode in args.modes}
        n_tiles = int(train.lengths.sum())

    baseline = results.get("one_bag", {}).get("seconds_per_epoch")
    print(f"\nTraining speed, {args.model}, {args.train_bags} training bags ({n_tiles} tiles, "
          f"log-uniform {args.min_tiles}..{args.max_tiles}), D = {args.dim}, {args.epochs} "
          f"epochs, {args.threads} CPU thread(s), {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {datetime.now(UTC):%Y-%m-%d}\n")
    print("| mode | s / epoch | speed-up vs one_bag | tile rows / epoch | val AUROC (95% CI) | "
          "val balanced acc. (95% CI) |")
    print("|---|---|---|---|---|---|")
    for mode, result in results.items():
        ratio = baseline / result["seconds_per_epoch"] if baseline else float("nan")
        low, high = result["val_auroc_ci"]
        acc_low, acc_high = result["val_balanced_accuracy_ci"]
        print(f"| {mode} | {result['seconds_per_epoch']:.2f} | {ratio:.2f}x | "
              f"{result['tile_rows_per_epoch']} | {result['val_auroc']:.3f} "
              f"({low:.3f}-{high:.3f}) | {result['val_balanced_accuracy']:.3f} "
              f"({acc_low:.3f}-{acc_high:.3f}) |")


if __name__ == "__main__":
    main()
