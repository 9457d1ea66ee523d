"""One training epoch and one evaluation pass over packed batches.

Both functions take any iterable of `PackedBatch`, so the same code trains on feature stores
(`mil.data` loaders), in-memory benchmark tables and synthetic bags.

Loss of one optimizer step over the bags of all its packs (and all DDP processes):

    L = Σ_main w_y·CE(bag) / n_main + residual_weight · Σ_residual w_y·CE(hyperslide) / n_residual
        + Σ_packs ((main bags + residual_weight · hyperslides in pack) / bags in step)
                  · aux_losses(pack)

where w_y is the class weight of the bag's label (soft labels mix the weights) and the counts
are over the whole step. Hyperslides count at `residual_weight` in the auxiliary term as in the
task term. Models return one auxiliary value per pack, so a pack's share is weighted by its mix
of main bags and hyperslides. Each pack contributes its share of the sums before its backward pass,
so accumulating k packs in one process gives the same gradient as k DDP processes with one pack
each.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mil.batch import PackedBatch
from mil.distributed import all_reduce_sum, is_distributed
from mil.kernels.segments import Segments

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]


@dataclass
class EpochStats:
    """Summary of one training epoch.

    Attributes:
        loss: mean step loss (task + auxiliary).
        aux_loss: mean step auxiliary loss.
        n_bags: training bags seen (main parts and hyperslides, this process only).
        n_steps: optimizer steps taken.
        seconds: wall-clock time of the epoch.
    """

    loss: float
    aux_loss: float
    n_bags: int
    n_steps: int
    seconds: float

    @property
    def bags_per_second(self) -> float:
        return self.n_bags / self.seconds if self.seconds > 0 else math.nan


@dataclass
class BagPredictions:
    """Per-bag outputs of an evaluation pass, in the order the bags were seen.

    Attributes:
        bag_ids: slide id of each bag.
        probs: float64 [B, C] softmax class probabilities.
        labels: int64 [B] true classes, or None when the batches carry no labels.
        attention: per bag, float32 [n_b] or [n_b, H] attention in the bag's feature-store row
            order (rows sorted by `tile_index` when the batches carry it).
        tile_index: per bag, int64 [n_b] feature-store rows of the attention values.
        loss: mean cross-entropy over bags (NaN without labels).
    """

    bag_ids: list[str] = field(default_factory=list)
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    labels: np.ndarray | None = None
    attention: list[np.ndarray] = field(default_factory=list)
    tile_index: list[np.ndarray] = field(default_factory=list)
    loss: float = math.nan


def autocast_context(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA when `amp` is set; a no-op elsewhere (CPU runs stay in fp32)."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def per_bag_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Class-weighted cross-entropy of each bag, [B], for hard [B] or soft [B, C] labels.

    Args:
        logits: [B, C] bag logits.
        labels: [B] int64 class indices or [B, C] float class probabilities.
        class_weights: [C] weight per class, or None for 1.
    """
    logits = logits.float()
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels.long(), weight=class_weights, reduction="none")
    soft = labels.to(logits.dtype)
    loss = -(soft * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    if class_weights is not None:
        loss = loss * (soft @ class_weights.to(logits.dtype))
    return loss


def drop_padding(batch: PackedBatch) -> PackedBatch:
    """The batch without its padding rows (T becomes the number of valid rows).

    Padding contributes exactly 0 to every output, so this changes no result. The fixed pack
    length only helps on CUDA, where compiled kernels want static shapes. On the CPU the
    padding rows would still go through every linear layer, so the CPU paths drop them.
    """
    segments = batch.segments
    valid = segments.num_valid
    if valid == segments.total:
        return batch

    def cut(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[:valid]

    return replace(
        batch,
        features=batch.features[:valid],
        segments=Segments.from_lengths(segments.lengths, device=segments.device),
        coords=cut(batch.coords),
        tile_index=cut(batch.tile_index),
    )


def prepare_batch(batch: PackedBatch, device: torch.device) -> PackedBatch:
    """Move a batch to `device`, dropping its padding rows there unless it is CUDA."""
    if device.type != "cuda":
        batch = drop_padding(batch)
    return batch.to(device, non_blocking=True)


def _count_residual(batch: PackedBatch) -> int:
    """Count the hyperslides in `batch`, with no device sync while it is still on the CPU."""
    if batch.is_residual is None:
        return 0
    return int(batch.is_residual.detach().to("cpu", torch.bool).sum())


def _residual_float(batch: PackedBatch, like: torch.Tensor) -> torch.Tensor:
    """Return 1.0 for each hyperslide and 0.0 for each main bag, as [B] on the device of `like`."""
    if batch.is_residual is None:
        return torch.zeros(batch.num_bags, dtype=like.dtype, device=like.device)
    return batch.is_residual.to(like.device, like.dtype, non_blocking=True)


def _groups(packs: Iterable[PackedBatch], size: int) -> Iterator[list[PackedBatch]]:
    group: list[PackedBatch] = []
    for pack in packs:
        group.append(pack)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def train_epoch(
    model: nn.Module,
    packs: Iterable[PackedBatch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    device: torch.device,
    class_weights: torch.Tensor | None = None,
    residual_weight: float = 0.1,
    packs_per_step: int = 1,
    grad_clip: float | None = 1.0,
    amp: bool = False,
    on_bags: ProgressCallback | None = None,
) -> EpochStats:
    """Train for one pass over `packs`, taking one optimizer step per `packs_per_step` packs.

    Args:
        model: the MIL model, or its DistributedDataParallel wrapper.
        packs: training batches; hyperslides are flagged by `is_residual` and carry soft labels.
        optimizer: stepped once per group of packs.
        scheduler: stepped after each optimizer step.
        device: where the model lives; packs are moved there.
        class_weights: [C] loss weight per class (on `device`), or None.
        residual_weight: weight of the hyperslide loss term relative to the main term.
        packs_per_step: packs whose gradients are accumulated into one step (per process).
        grad_clip: max global gradient norm, or None to skip clipping.
        amp: bf16 autocast on CUDA.
        on_bags: called with the number of bags after each pack (progress bars).

    Returns:
        Loss and throughput of the epoch.
    """
    model.train()
    world_size = torch.distributed.get_world_size() if is_distributed() else 1
    started = time.perf_counter()
    # Sums stay on the device until the end of the epoch, so no step waits for a sync.
    total_loss = torch.zeros((), device=device)
    total_aux = torch.zeros((), device=device)
    n_steps, n_bags = 0, 0

    for group in _groups(packs, packs_per_step):
        # The loader builds packs on the CPU, so these counts cost no device sync.
        residual_counts = [_count_residual(pack) for pack in group]
        n_residual_local = sum(residual_counts)
        n_bags_local = sum(pack.num_bags for pack in group)
        counts = torch.tensor(
            [n_bags_local - n_residual_local, n_residual_local, n_bags_local], dtype=torch.float64
        )
        n_main, n_residual, n_step_bags = all_reduce_sum(counts, device).tolist()
        optimizer.zero_grad(set_to_none=True)

        for index, (pack, n_pack_residual) in enumerate(zip(group, residual_counts, strict=True)):
            pack = prepare_batch(pack, device)
            if pack.labels is None:
                raise ValueError(f"training batch of {pack.bag_ids} has no labels")
            sync = index == len(group) - 1
            no_sync = getattr(model, "no_sync", None)
            context = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
            with context:
                with autocast_context(device, amp):
                    output = model(pack)
                losses = per_bag_loss(output.logits, pack.labels, class_weights)  # [B]
                residual_float = _residual_float(pack, losses)  # [B]
                loss = (losses * (1.0 - residual_float)).sum() / max(n_main, 1.0)
                if n_residual > 0:
                    loss = loss + residual_weight * (losses * residual_float).sum() / n_residual
                aux = sum(output.aux_losses.values(), torch.zeros((), device=losses.device))
                aux_bags = (pack.num_bags - n_pack_residual) + residual_weight * n_pack_residual
                aux = aux.float() * (aux_bags / max(n_step_bags, 1.0))
                # DDP averages gradients over processes; scaling by the world size turns that
                # average back into the sum over the step that the formula above defines.
                (world_size * (loss + aux)).backward()
            total_loss += (loss + aux).detach()
            total_aux += aux.detach()
            n_bags += pack.num_bags
            if on_bags is not None:
                on_bags(pack.num_bags)

        if grad_clip is not None and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n_steps += 1

    if n_steps == 0:
        raise ValueError("the training loader yielded no batches; check the training split")
    return EpochStats(
        loss=float(total_loss) / n_steps,
        aux_loss=float(total_aux) / n_steps,
        n_bags=n_bags,
        n_steps=n_steps,
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def predict_bags(
    model: nn.Module,
    packs: Iterable[PackedBatch],
    *,
    device: torch.device,
    amp: bool = False,
    keep_attention: bool = True,
    on_bags: ProgressCallback | None = None,
) -> BagPredictions:
    """Run the model in eval mode over `packs` and collect per-bag probabilities and attention.

    Every tile of a bag is used: the batches must hold whole bags (evaluation loaders never
    subsample), and a bag id seen twice raises, because that means it was split across packs.
    """
    model.eval()
    bag_ids: list[str] = []
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    attention: list[np.ndarray] = []
    tile_index: list[np.ndarray] = []
    loss_sum, loss_count = 0.0, 0
    has_labels = True

    for pack in packs:
        pack = prepare_batch(pack, device)
        with autocast_context(device, amp):
            output = model(pack)
        logits = output.logits.float()
        probs.append(torch.softmax(logits, dim=-1).cpu().double().numpy())
        bag_ids.extend(pack.bag_ids)
        if pack.labels is not None and pack.labels.dim() == 1:
            labels.append(pack.labels.cpu().numpy().astype(np.int64))
            loss_sum += float(F.cross_entropy(logits, pack.labels.long(), reduction="sum"))
            loss_count += pack.num_bags
        else:
            has_labels = False
        if keep_attention:
            _collect_attention(pack, output.attention, attention, tile_index)
        if on_bags is not None:
            on_bags(pack.num_bags)

    twice = sorted(bag_id for bag_id, count in Counter(bag_ids).items() if count > 1)
    if twice:
        raise ValueError(
            f"bags {twice[:5]} appear in more than one evaluation batch; evaluation loaders "
            "must keep every bag whole"
        )
    n_classes = probs[0].shape[1] if probs else 0
    return BagPredictions(
        bag_ids=bag_ids,
        probs=np.concatenate(probs) if probs else np.zeros((0, n_classes)),
        labels=np.concatenate(labels) if (has_labels and labels) else None,
        attention=attention,
        tile_index=tile_index,
        loss=loss_sum / loss_count if loss_count else math.nan,
    )


def _collect_attention(
    pack: PackedBatch,
    attention: torch.Tensor,
    out_attention: list[np.ndarray],
    out_index: list[np.ndarray],
) -> None:
    """Split [T] or [T, H] attention per bag and sort each bag's rows by store row."""
    values = attention.detach().float().cpu()
    per_bag = pack.segments.split(values)
    if pack.tile_index is not None:
        rows = pack.segments.split(pack.tile_index.detach().cpu())
    else:
        rows = [torch.arange(n) for n in pack.segments.lengths]
    for bag_values, bag_rows in zip(per_bag, rows, strict=True):
        order = torch.argsort(bag_rows)
        out_attention.append(bag_values[order].numpy())
        out_index.append(bag_rows[order].numpy().astype(np.int64))
