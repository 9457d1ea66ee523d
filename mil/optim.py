"""Optimiser, learning-rate schedule and early stopping of a training run."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from mil.metrics import is_better

logger = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on weight matrices only.

    Biases and normalisation parameters (tensors with fewer than two dimensions) are not
    decayed, because shrinking them towards 0 only shifts activations.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [
        {"params": params, "weight_decay": decay_value}
        for params, decay_value in ((decay, weight_decay), (no_decay, 0.0))
        if params
    ]
    # The fused kernel updates every parameter in one call per group; on a CPU it made an ABMIL
    # step about 2.6 times faster than the default per-tensor loop.
    devices = {parameter.device.type for parameter in decay + no_decay}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based).

    Rises linearly from 1/warmup_steps to 1 over `warmup_steps` steps, then follows a half
    cosine from 1 down to `min_lr_ratio` at `total_steps`, and stays there afterwards.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up then cosine decay over `epochs` epochs of `steps_per_epoch` steps.

    NOTE: packs are re-planned every epoch, so the number of steps per epoch can vary a
    little; the schedule uses the first epoch's count and stays at the floor after its end.
    """
    total = max(steps_per_epoch * epochs, 1)
    warmup = round(warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup, total, min_lr_ratio)
    )


@dataclass
class EarlyStopping:
    """Early stopping state: the best validation value and its epoch.

    Attributes:
        metric: metric name; `loss` is minimised, every other metric maximised.
        patience: epochs without improvement after which training stops.
        min_epochs: never stop before this many epochs.
        best: best value so far (None before the first validation).
        best_epoch: 1-based epoch of the best value (0 before the first validation).
    """

    metric: str
    patience: int
    min_epochs: int = 0
    best: float | None = None
    best_epoch: int = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record the value of 1-based `epoch`; True when it is the best so far."""
        if is_better(self.metric, value, self.best):
            self.best, self.best_epoch = value, epoch
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        """Return whether `patience` epochs passed since the best one and `min_epochs` are done."""
        if epoch < self.min_epochs or self.best_epoch == 0:
            return False
        return epoch - self.best_epoch >= self.patience
