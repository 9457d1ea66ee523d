"""Assemble the bags of one pack into a `PackedBatch`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mil.batch import PackedBatch
from mil.kernels.segments import Segments


@dataclass
class PackedBag:
    """Rows of one bag of a pack, in pack order.

    Attributes:
        bag_id: slide id, or the member slide ids joined with "+" for a hyperslide.
        features: [n, D] features as stored (converted to float32 by `collate`).
        coords: int64 [n, 2] level-0 (x, y) of each tile.
        tile_index: int64 [n] row of each tile in its slide's feature store.
        label: class index; or float [C] class probabilities (a hyperslide); or None.
        is_residual: True for a hyperslide built from residual parts.
    """

    bag_id: str
    features: np.ndarray
    coords: np.ndarray
    tile_index: np.ndarray
    label: int | np.ndarray | None = None
    is_residual: bool = False

    @property
    def n_tiles(self) -> int:
        return int(self.features.shape[0])


def one_hot(label: int, n_classes: int) -> np.ndarray:
    """Float32 [C] vector with 1 at `label`."""
    if not 0 <= label < n_classes:
        raise ValueError(f"class index {label} outside 0..{n_classes - 1}")
    vector = np.zeros(n_classes, dtype=np.float32)
    vector[label] = 1.0
    return vector


def mix_labels(labels: Sequence[int], tile_counts: Sequence[int], n_classes: int) -> np.ndarray:
    """Soft label of a hyperslide: member labels weighted by their share of its tiles, [C]."""
    total = float(sum(tile_counts))
    if total <= 0:
        raise ValueError("a hyperslide needs at least one tile")
    mixed = np.zeros(n_classes, dtype=np.float64)
    for label, count in zip(labels, tile_counts, strict=True):
        mixed += one_hot(label, n_classes) * (count / total)
    return mixed.astype(np.float32)


def collate(
    bags: Sequence[PackedBag],
    pack_len: int | None = None,
    n_classes: int | None = None,
    soft_labels: bool = False,
    dim: int | None = None,
) -> PackedBatch:
    """Concatenate `bags` and pad to `pack_len` rows.

    Args:
        bags: bags in pack order.
        pack_len: rows T of the pack; default: the bags' total (no padding).
        n_classes: C, needed for soft labels.
        soft_labels: return labels [B, C] float (one-hot for plain bags, mixed for hyperslides);
            otherwise labels [B] int64, which requires every label to be a class index.
        dim: D when `bags` is empty.

    Returns:
        The batch: features float32 [T, D] with zero padding rows, coords int64 [T, 2] (zero on
        padding), tile_index int64 [T] (-1 on padding), is_residual bool [B], and labels None
        when any bag has none.
    """
    lengths = [bag.n_tiles for bag in bags]
    valid = sum(lengths)
    total = valid if pack_len is None else pack_len
    if total < valid:
        raise ValueError(f"bags of {valid} rows do not fit a pack of {total} rows")
    if bags:
        dim = int(bags[0].features.shape[1])
    if dim is None:
        raise ValueError("collate of an empty pack needs `dim`")

    # Only the padding rows are zeroed; copy_ converts float16 stores to float32 in place.
    features = torch.empty((total, dim), dtype=torch.float32)
    features[valid:].zero_()
    coords = torch.zeros((total, 2), dtype=torch.int64)
    tile_index = torch.full((total,), -1, dtype=torch.int64)
    row = 0
    for bag in bags:
        stop = row + bag.n_tiles
        features[row:stop].copy_(torch.from_numpy(np.ascontiguousarray(bag.features)))
        coords[row:stop] = torch.from_numpy(np.asarray(bag.coords, dtype=np.int64))
        tile_index[row:stop] = torch.from_numpy(np.asarray(bag.tile_index, dtype=np.int64))
        row = stop

    return PackedBatch(
        features=features,
        segments=Segments.from_lengths(lengths, total=total),
        labels=collate_labels([bag.label for bag in bags], n_classes, soft_labels,
                              [bag.bag_id for bag in bags]),
        bag_ids=[bag.bag_id for bag in bags],
        coords=coords,
        is_residual=torch.tensor([bag.is_residual for bag in bags], dtype=torch.bool),
        tile_index=tile_index,
    )


def collate_labels(
    labels: Sequence[int | np.ndarray | None],
    n_classes: int | None,
    soft_labels: bool,
    bag_ids: Sequence[str] | None = None,
) -> torch.Tensor | None:
    """Labels of a pack: [B, C] float when `soft_labels`, else [B] int64; None if any is missing.

    Args:
        labels: per bag a class index, or float [C] class probabilities (a hyperslide).
        n_classes: C, needed for soft labels.
        soft_labels: turn class indices into one-hot rows and return [B, C].
        bag_ids: bag ids, named in errors.
    """
    if any(label is None for label in labels):
        return None
    if soft_labels:
        if n_classes is None:
            raise ValueError("soft labels need n_classes")
        rows = []
        for label in labels:
            if isinstance(label, int | np.integer):
                rows.append(one_hot(int(label), n_classes))
            else:
                rows.append(np.asarray(label, dtype=np.float32))
        if not rows:
            return torch.zeros((0, n_classes), dtype=torch.float32)
        return torch.from_numpy(np.stack(rows))
    hard = []
    for index, label in enumerate(labels):
        if not isinstance(label, int | np.integer):
            bag = bag_ids[index] if bag_ids is not None else str(index)
            raise ValueError(f"bag {bag} has a soft label; collate it with soft_labels=True")
        hard.append(int(label))
    return torch.tensor(hard, dtype=torch.int64)
