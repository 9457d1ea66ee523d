"""Random packs shared by the kernel tests: bag lengths 1, 2, 7, 127, 1000 and uneven splits."""

from __future__ import annotations

import torch

from mil.kernels import Segments

# Bag lengths of the test packs: singletons, tiny bags, one long bag, an empty bag, padding.
PACK_LENGTHS: dict[str, tuple[tuple[int, ...], int]] = {
    "mixed": ((1, 2, 7, 127, 1000), 1150),
    "uneven": ((300, 0, 5, 1, 64, 3), 400),
    "single": ((127,), 127),
    "ones": ((1, 1, 1), 4),
}


def make_segments(name: str) -> Segments:
    lengths, total = PACK_LENGTHS[name]
    return Segments.from_lengths(lengths, total=total)


def fill_padding(tensor: torch.Tensor, segments: Segments, value: float) -> torch.Tensor:
    """Copy of `tensor` with padding rows set to `value` (NaN there checks they are ignored)."""
    out = tensor.clone()
    out[segments.num_valid :] = value
    return out


def bag_slices(segments: Segments) -> list[slice]:
    return [slice(s, s + n) for s, n in zip(segments.starts, segments.lengths, strict=True)]


def permute_pack(
    tensor: torch.Tensor, segments: Segments, order: list[int]
) -> tuple[torch.Tensor, Segments]:
    """Reorder the bags of a pack; padding stays at the end."""
    slices = bag_slices(segments)
    parts = [tensor[slices[b]] for b in order] + [tensor[segments.num_valid :]]
    lengths = [segments.lengths[b] for b in order]
    return torch.cat(parts), Segments.from_lengths(lengths, total=segments.total)
