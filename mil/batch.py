"""The packed batch that the collate builds and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from mil.kernels.segments import Segments


@dataclass
class PackedBatch:
    """Several bags concatenated along the tile axis and padded to a fixed pack length.

    Attributes:
        features: [T, D] tile features; padding rows are zero and belong to no bag.
        segments: bag boundaries (offsets int32 [B+1], lengths as Python ints).
        labels: [B] int64 class indices, or [B, C] float class probabilities (soft labels of
            hyperslides built from residual parts), or None at inference.
        bag_ids: slide id of each bag; a hyperslide joins its member ids with "+".
        coords: [T, 2] int64 level-0 (x, y) of each tile, or None.
        is_residual: [B] bool, True for hyperslides built from residual parts.
        tile_index: [T] int64 row of each tile in its slide's feature store (-1 on padding),
            so outputs can be written back in the store's row order.
    """

    features: torch.Tensor
    segments: Segments
    labels: torch.Tensor | None = None
    bag_ids: list[str] = field(default_factory=list)
    coords: torch.Tensor | None = None
    is_residual: torch.Tensor | None = None
    tile_index: torch.Tensor | None = None

    @property
    def num_bags(self) -> int:
        return self.segments.num_segments

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """Copy of the batch with every tensor on `device`."""

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

        return replace(
            self,
            features=self.features.to(device, non_blocking=non_blocking),
            segments=self.segments.to(device),
            labels=move(self.labels),
            coords=move(self.coords),
            is_residual=move(self.is_residual),
            tile_index=move(self.tile_index),
        )

    def pin_memory(self) -> PackedBatch:
        """Page-locked copy, used by DataLoader(pin_memory=True)."""
        return replace(
            self,
            features=self.features.pin_memory(),
            labels=None if self.labels is None else self.labels.pin_memory(),
        )
