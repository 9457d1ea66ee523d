"""Contiguous groups of rows inside each bag: Nyström landmarks, agent tokens, sparse regions.

A grouping splits every bag of a pack into runs of consecutive rows and never lets a run cross a
bag boundary. It is itself a `Segments` over the same pack (one segment per group, padding
unchanged), so the pooling primitives turn it into per-group means in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

from mil.kernels.cache import pack_cache
from mil.kernels.segments import Segments


@dataclass(frozen=True, eq=False)
class BagGroups:
    """Groups of consecutive rows, per bag.

    Attributes:
        rows: one segment per group over the pack's T rows (padding stays padding).
        per_bag: one segment per bag over the G groups, i.e. which groups belong to which bag.
    """

    rows: Segments
    per_bag: Segments

    @property
    def num_groups(self) -> int:
        """Number of groups G in the pack."""
        return self.rows.num_segments


def _build(segments: Segments, group_lengths_per_bag: list[list[int]]) -> BagGroups:
    flat = [n for bag in group_lengths_per_bag for n in bag]
    rows = Segments.from_lengths(flat, total=segments.total, device=segments.device)
    per_bag = Segments.from_lengths(
        [len(bag) for bag in group_lengths_per_bag], total=len(flat), device=segments.device
    )
    return BagGroups(rows=rows, per_bag=per_bag)


def groups_by_count(segments: Segments, num_groups: int) -> BagGroups:
    """Split each bag of n rows into min(num_groups, n) runs whose sizes differ by at most 1.

    The first `n % m` runs get one extra row. An empty bag gets no group. Built once per pack.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    cache = pack_cache(segments)
    cache_key = ("groups_by_count", num_groups)
    if cache_key in cache:
        return cache[cache_key]
    lengths = []
    for n in segments.lengths:
        m = min(num_groups, n)
        lengths.append([n // m + (1 if i < n % m else 0) for i in range(m)] if m else [])
    cache[cache_key] = groups = _build(segments, lengths)
    return groups


def groups_by_size(segments: Segments, size: int) -> BagGroups:
    """Split each bag into runs of `size` rows; the last run of a bag may be shorter."""
    if size < 1:
        raise ValueError(f"group size must be >= 1, got {size}")
    cache = pack_cache(segments)
    cache_key = ("groups_by_size", size)
    if cache_key in cache:
        return cache[cache_key]
    lengths = [[min(size, n - start) for start in range(0, n, size)] for n in segments.lengths]
    cache[cache_key] = groups = _build(segments, lengths)
    return groups
