"""Bag boundaries inside a packed sequence.

A pack is a [T, ...] tensor holding several bags back to back, then padding up to T rows.
`Segments` stores where each bag starts and ends. Lengths, `max_len` and the number of valid
rows are Python ints computed on the CPU when the pack is built, so kernels that need them
never force a device synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True, eq=False)
class Segments:
    """Boundaries of B bags packed into T rows; rows from `offsets[-1]` to T are padding.

    Attributes:
        offsets: int32 [B+1], `offsets[b]:offsets[b+1]` are the rows of bag b.
        lengths: rows per bag, as Python ints.
        total: T, the number of rows in the pack including padding.
    """

    offsets: torch.Tensor
    lengths: tuple[int, ...]
    total: int
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_lengths(
        cls,
        lengths: Sequence[int],
        total: int | None = None,
        device: torch.device | str | None = None,
    ) -> Segments:
        """Build segments for bags of `lengths` rows laid back to back from row 0.

        Args:
            lengths: rows per bag; a bag may have 0 rows.
            total: rows in the pack including padding; defaults to `sum(lengths)`.
            device: device of the `offsets` tensor.
        """
        lengths = tuple(int(n) for n in lengths)
        if any(n < 0 for n in lengths):
            raise ValueError(f"bag lengths must be >= 0, got {lengths}")
        valid = sum(lengths)
        total = valid if total is None else int(total)
        if total < valid:
            raise ValueError(f"pack length {total} is shorter than the {valid} rows of its bags")
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        if lengths:
            offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
        return cls(offsets=offsets.to(device) if device is not None else offsets,
                   lengths=lengths, total=total)

    @property
    def num_segments(self) -> int:
        """Number of bags B."""
        return len(self.lengths)

    @property
    def num_valid(self) -> int:
        """Rows that belong to a bag; the rest of the pack is padding."""
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        """Rows of the longest bag (0 for an empty pack)."""
        return max(self.lengths, default=0)

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """First row of each bag, as Python ints."""
        starts, row = [], 0
        for n in self.lengths:
            starts.append(row)
            row += n
        return tuple(starts)

    def segment_ids(self) -> torch.Tensor:
        """Bag index of every row, int64 [T]; padding rows get B (one past the last bag)."""
        ids = self._cache.get("segment_ids")
        if ids is None:
            ids = torch.full((self.total,), self.num_segments, dtype=torch.int64)
            ids[: self.num_valid] = torch.repeat_interleave(
                torch.arange(self.num_segments), torch.tensor(self.lengths, dtype=torch.int64)
            )
            ids = ids.to(self.device)
            self._cache["segment_ids"] = ids
        return ids

    def valid_mask(self) -> torch.Tensor:
        """Bool [T], True on rows that belong to a bag."""
        mask = self._cache.get("valid_mask")
        if mask is None:
            mask = torch.zeros(self.total, dtype=torch.bool)
            mask[: self.num_valid] = True
            mask = mask.to(self.device)
            self._cache["valid_mask"] = mask
        return mask

    def to(self, device: torch.device | str) -> Segments:
        """Copy with `offsets` on `device`; lengths stay on the CPU."""
        if torch.device(device) == self.device:
            return self
        return Segments(offsets=self.offsets.to(device), lengths=self.lengths, total=self.total)

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Views of `tensor` [T, ...] per bag, padding dropped."""
        return list(torch.split(tensor[: self.num_valid], list(self.lengths)))
