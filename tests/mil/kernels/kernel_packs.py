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


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segments: Segments,
    kv_segments: Segments,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention over the whole pack with an explicit [Tq, Tk] mask, written out in full.

    A query sees a key when both are in the same bag (and `allowed[i, j]`, when given); `bias`
    [Tq, Tk] is added to the scaled scores. Queries that see no key output 0.
    """
    q_ids = segments_ids(q_segments)
    kv_ids = segments_ids(kv_segments)
    mask = (q_ids[:, None] == kv_ids[None, :]) & (q_ids[:, None] >= 0)  # [Tq, Tk]
    if allowed is not None:
        mask &= allowed
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale  # [H, Tq, Tk]
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without keys -> 0
    out = torch.einsum("hij,jhe->ihe", weights, v.nan_to_num(0.0))
    return out * mask.any(dim=1).to(out.dtype)[:, None, None]


def segments_ids(segments: Segments) -> torch.Tensor:
    """Bag index per row with padding as -1 (unlike `Segments.segment_ids`, padding = B)."""
    ids = segments.segment_ids().clone()
    ids[segments.num_valid :] = -1
    return ids


def random_qkv(
    q_segments: Segments,
    kv_segments: Segments,
    heads: int = 2,
    head_dim: int = 8,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q [Tq, H, Dh], k, v [Tk, H, Dh] with NaN in every padding row."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(q_segments.total, heads, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(kv_segments.total, heads, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(kv_segments.total, heads, head_dim, generator=generator, dtype=dtype)
    return (
        fill_padding(q, q_segments, float("nan")),
        fill_padding(k, kv_segments, float("nan")),
        fill_padding(v, kv_segments, float("nan")),
    )
