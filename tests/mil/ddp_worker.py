"""Train a small ABMIL on fixed synthetic packs; run alone or under torchrun.

Usage: python ddp_worker.py OUT.pt PACKS_PER_STEP. Under torchrun each process trains on its
interleaved share of the packs, so every global step sees the same packs as one process does
with PACKS_PER_STEP * WORLD_SIZE packs per step. Rank 0 saves the final state dict to OUT.pt.
"""

from __future__ import annotations

import sys

import torch

from mil.batch import PackedBatch
from mil.distributed import cleanup_distributed, init_distributed, shard, wrap_model
from mil.engine import train_epoch
from mil.kernels.segments import Segments
from mil.models import create_model


def make_packs(n_packs: int = 8, dim: int = 12) -> list[PackedBatch]:
    """Packs with different bag counts, padding and one hyperslide with soft labels each."""
    generator = torch.Generator().manual_seed(123)
    packs = []
    for index in range(n_packs):
        lengths = [3 + (index + b) % 5 for b in range(1 + index % 3)] + [4]
        total = sum(lengths) + 2
        features = torch.zeros(total, dim)
        features[: sum(lengths)] = torch.randn(sum(lengths), dim, generator=generator)
        hard = torch.randint(0, 2, (len(lengths) - 1,), generator=generator)
        labels = torch.nn.functional.one_hot(hard, 2).float()
        soft = torch.rand(1, generator=generator)
        labels = torch.cat([labels, torch.stack([soft, 1 - soft], dim=1)])
        is_residual = torch.tensor([False] * (len(lengths) - 1) + [True])
        packs.append(PackedBatch(
            features=features,
            segments=Segments.from_lengths(lengths, total=total),
            labels=labels,
            bag_ids=[f"p{index}b{b}" for b in range(len(lengths))],
            is_residual=is_residual,
        ))
    return packs


def main() -> None:
    out_path, packs_per_step = sys.argv[1], int(sys.argv[2])
    context = init_distributed("cpu")
    torch.manual_seed(0)
    model = wrap_model(create_model("abmil", in_dim=12, n_classes=2, dropout=0.0), context)
    # SGD, because Adam rescales the float rounding noise of gradients that are zero in exact
    # arithmetic (the attention score bias, which the softmax cancels) into full-size steps.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    packs = shard(make_packs(), context.rank, context.world_size)
    for _ in range(2):
        train_epoch(model, packs, optimizer, device=context.device,
                    class_weights=torch.tensor([1.0, 2.0]), residual_weight=0.3,
                    packs_per_step=packs_per_step, grad_clip=0.5)
    if context.is_main:
        inner = getattr(model, "module", model)
        torch.save(inner.state_dict(), out_path)
    cleanup_distributed(wait_for_peers=True)


if __name__ == "__main__":
    main()
