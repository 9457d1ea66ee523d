"""Time every registered MIL model on one pack vs the same bags one at a time.

Synthetic features (no data needed). For each model: forward + backward of one pack of
`--bags` bags with log-uniform lengths, and of the same bags run one per step, as the reference
ACMIL, CLAM and TransMIL training scripts do. Prints a Markdown table.

    .venv/bin/python benchmarks/models.py --bags 16 --min-tiles 200 --max-tiles 4000 --dim 1024
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable
from functools import partial

import torch

import mil.models
from mil.batch import PackedBatch
from mil.kernels.segments import Segments
from mil.models import MILModel


def make_bags(
    n_bags: int, min_tiles: int, max_tiles: int, dim: int, seed: int
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    low, high = math.log(min_tiles), math.log(max_tiles)
    lengths = torch.exp(low + (high - low) * torch.rand(n_bags, generator=generator))
    return [torch.randn(int(n), dim, generator=generator) for n in lengths.round()]


def pack(bags: list[torch.Tensor], labels: torch.Tensor) -> PackedBatch:
    return PackedBatch(
        features=torch.cat(bags),
        segments=Segments.from_lengths([bag.shape[0] for bag in bags]),
        labels=labels,
    )


def train_step(model: MILModel, batch: PackedBatch) -> None:
    output = model(batch)
    assert batch.labels is not None
    loss = torch.nn.functional.cross_entropy(output.logits, batch.labels)
    loss = loss + sum(output.aux_losses.values(), torch.zeros(()))
    loss.backward()


def train_each(model: MILModel, batches: list[PackedBatch]) -> None:
    for batch in batches:
        train_step(model, batch)


def best_time(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=16)
    parser.add_argument("--min-tiles", type=int, default=200)
    parser.add_argument("--max-tiles", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=mil.models.list_models())
    args = parser.parse_args()

    bags = make_bags(args.bags, args.min_tiles, args.max_tiles, args.dim, seed=0)
    labels = torch.arange(len(bags)) % 2
    packed = pack(bags, labels)
    singles = [pack([bag], labels[i : i + 1]) for i, bag in enumerate(bags)]
    n_tiles = sum(bag.shape[0] for bag in bags)
    print(
        f"{len(bags)} bags, {n_tiles} tiles, D = {args.dim}, float32, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; forward + backward, best of {args.repeats}\n"
    )
    print("| model | packed (s) | one bag per step (s) | ratio |")
    print("|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = mil.models.create_model(name, in_dim=args.dim, n_classes=2).train()
        packed_s = best_time(partial(train_step, model, packed), args.repeats)
        looped_s = best_time(partial(train_each, model, singles), args.repeats)
        print(f"| {name} | {packed_s:.3f} | {looped_s:.3f} | {looped_s / packed_s:.1f}× |")


if __name__ == "__main__":
    main()
