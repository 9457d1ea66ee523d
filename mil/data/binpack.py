"""One-dimensional bin packing of bag lengths into packs of fixed capacity.

Packs are lists of item indices. First-fit-decreasing (FFD) sorts the items longest first and
puts each into the first pack with room; it is what training uses. Next-fit keeps a single open
pack and starts a new one whenever the next item does not fit; it exists for the padding
benchmark only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _check_lengths(lengths: Sequence[int], capacity: int) -> np.ndarray:
    if capacity < 1:
        raise ValueError(f"pack capacity must be >= 1, got {capacity}")
    array = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if array.size and array.min() < 1:
        raise ValueError(f"item lengths must be >= 1, got a length of {int(array.min())}")
    if array.size and array.max() > capacity:
        index = int(array.argmax())
        raise ValueError(
            f"item {index} has length {int(array[index])}, more than the pack capacity "
            f"{capacity}; cap or subsample it before packing"
        )
    return array


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into as few packs as first-fit-decreasing finds.

    Items are visited longest first (ties in index order, so the result is deterministic) and
    each goes into the lowest-numbered pack with enough room left.

    Args:
        lengths: length of each item, 1 <= length <= capacity.
        capacity: length of a pack.

    Returns:
        Item indices of each pack, in the order they were placed.
    """
    array = _check_lengths(lengths, capacity)
    order = np.argsort(-array, kind="stable")
    # Room left in every pack opened so far; a pack count never exceeds the item count.
    room = np.empty(len(array), dtype=np.int64)
    packs: list[list[int]] = []
    for index in order.tolist():
        length = int(array[index])
        fits = np.flatnonzero(room[: len(packs)] >= length)
        if fits.size:
            target = int(fits[0])
        else:
            target = len(packs)
            packs.append([])
            room[target] = capacity
        packs[target].append(index)
        room[target] -= length
    return packs


def next_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items in the given order, opening a new pack when the next item does not fit."""
    array = _check_lengths(lengths, capacity)
    packs: list[list[int]] = []
    room = 0
    for index, length in enumerate(array.tolist()):
        if not packs or length > room:
            packs.append([])
            room = capacity
        packs[-1].append(index)
        room -= length
    return packs


@dataclass(frozen=True)
class PackingStats:
    """Fill of a set of packs.

    Attributes:
        n_packs: number of packs.
        n_bags: bags over all packs (a hyperslide counts as one bag).
        valid_rows: rows that belong to a bag.
        total_rows: rows of all packs, padding included.
        min_bags_per_pack: fewest bags in one pack.
        max_bags_per_pack: most bags in one pack.
    """

    n_packs: int
    n_bags: int
    valid_rows: int
    total_rows: int
    min_bags_per_pack: int
    max_bags_per_pack: int

    @property
    def padding_ratio(self) -> float:
        """Share of all pack rows that are padding, in [0, 1]."""
        return 1.0 - self.valid_rows / self.total_rows if self.total_rows else 0.0

    @property
    def mean_bags_per_pack(self) -> float:
        return self.n_bags / self.n_packs if self.n_packs else 0.0

    def describe(self) -> str:
        return (f"{self.n_packs} packs, {self.n_bags} bags "
                f"({self.mean_bags_per_pack:.1f} per pack, {self.min_bags_per_pack}-"
                f"{self.max_bags_per_pack}), padding {100 * self.padding_ratio:.2f}%")


def packing_stats(
    packs: Sequence[Sequence[int]], lengths: Sequence[int], pack_lengths: Sequence[int] | int
) -> PackingStats:
    """Padding and bags per pack of `packs` (item indices into `lengths`).

    Args:
        packs: item indices of each pack.
        lengths: length of each item.
        pack_lengths: rows of each pack including padding, or one length for all packs.
    """
    if isinstance(pack_lengths, int):
        pack_lengths = [pack_lengths] * len(packs)
    counts = [len(pack) for pack in packs]
    return PackingStats(
        n_packs=len(packs),
        n_bags=sum(counts),
        valid_rows=int(sum(int(lengths[i]) for pack in packs for i in pack)),
        total_rows=int(sum(pack_lengths)),
        min_bags_per_pack=min(counts, default=0),
        max_bags_per_pack=max(counts, default=0),
    )
