"""Per-bag softmax, attention pooling, reductions and top-k masks over packed bags.

Every function takes a pack of T rows (several bags back to back, then padding) and a `Segments`
describing the bags. The work is done for all bags at once with `index_add_`/`scatter_reduce`
on a [B+1, ...] buffer whose last row collects the padding rows and is then dropped, so padding
never reaches an output and the number of bags costs no Python loop.
"""

from __future__ import annotations

from typing import Literal

import torch

from mil.kernels.segments import Segments


def _check_rows(tensor: torch.Tensor, segments: Segments, name: str) -> None:
    if tensor.shape[0] != segments.total:
        raise ValueError(
            f"{name} has {tensor.shape[0]} rows but the pack has {segments.total} rows "
            f"({segments.num_segments} bags); pass the tensor and the Segments of the same pack"
        )


def _row_ids(segments: Segments, device: torch.device) -> torch.Tensor:
    """Bag index of every row, int64 [T], padding = B, on `device`."""
    ids = segments.segment_ids()
    return ids if ids.device == device else ids.to(device)


def _segment_max_rows(scores: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Per-bag maximum of `scores` [T, K] -> [B+1, K] (row B: padding), without gradient.

    Padding rows, empty bags and bags whose scores are all -inf give 0, so subtracting the
    result never creates NaN (-inf - -inf).
    """
    ids = _row_ids(segments, scores.device)
    with torch.no_grad():
        fill = torch.finfo(scores.dtype).min
        buffer = scores.new_full((segments.num_segments + 1, *scores.shape[1:]), fill)
        index = ids.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)
        buffer.scatter_reduce_(0, index, scores.detach(), reduce="amax", include_self=True)
        buffer = torch.where(torch.isfinite(buffer) & (buffer > fill), buffer, 0)
    return buffer


def segment_softmax(scores: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Softmax of `scores` over the rows of each bag.

    Args:
        scores: [T] or [T, K] logits; K independent heads or branches. Entries set to -inf are
            masked and get weight 0. Padding rows may hold any value, NaN included.
        segments: bag boundaries of the pack.

    Returns:
        Weights of the shape of `scores`; each bag's column sums to 1, except bags that are empty
        or fully masked, whose weights are 0. Padding rows are exactly 0.
    """
    _check_rows(scores, segments, "scores")
    squeeze = scores.dim() == 1
    if squeeze:
        scores = scores.unsqueeze(1)
    ids = _row_ids(segments, scores.device)
    valid = (ids < segments.num_segments).unsqueeze(1)  # [T, 1]

    # Stable form: the per-bag max (a constant for autograd) is subtracted before exp.
    bag_max = _segment_max_rows(torch.where(valid, scores, float("-inf")), segments)
    shifted = torch.where(valid, scores, 0) - bag_max.index_select(0, ids)
    exp = torch.where(valid, torch.exp(shifted), 0)  # [T, K]

    sums = exp.new_zeros((segments.num_segments + 1, exp.shape[1])).index_add_(0, ids, exp)
    # Fully masked and empty bags have sum 0 and exp 0. Dividing by 1 there keeps their weights
    # and gradients 0, where a tiny divisor would overflow the gradient to inf * 0 = NaN.
    denominator = torch.where(sums > 0, sums, 1).index_select(0, ids)
    weights = exp / denominator
    return weights.squeeze(1) if squeeze else weights


def segment_attention_pool(
    values: torch.Tensor, scores: torch.Tensor, segments: Segments
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool each bag's rows with softmax attention, K heads or branches at once.

    `pooled[b, k] = sum_{t in bag b} softmax_b(scores[:, k])[t] * values[t]`. ABMIL is K = 1;
    multi-branch attention (ACMIL, CLAM) is K = number of branches.

    Args:
        values: [T, D] instance embeddings.
        scores: [T, K] (or [T], read as K = 1) attention logits; -inf masks an entry.
        segments: bag boundaries of the pack.

    Returns:
        pooled [B, K, D] (zeros for an empty or fully masked bag) and weights [T, K] (0 on padding).
    """
    _check_rows(values, segments, "values")
    if scores.dim() == 1:
        scores = scores.unsqueeze(1)
    weights = segment_softmax(scores, segments)  # [T, K]
    pooled = weighted_segment_sum(values, weights, segments)
    return pooled, weights


def weighted_segment_sum(
    values: torch.Tensor, weights: torch.Tensor, segments: Segments
) -> torch.Tensor:
    """`sum_{t in bag b} weights[t, k] * values[t]` -> [B, K, D] for values [T, D], weights [T, K].

    Padding rows must carry weight 0 (as `segment_softmax` gives). Values of padding rows are
    zeroed first so that NaN or inf there cannot leak through 0 * inf.
    """
    ids = _row_ids(segments, values.device)
    valid = (ids < segments.num_segments).unsqueeze(1)
    values = torch.where(valid, values, 0)
    num_branches = weights.shape[1]
    buffer = values.new_zeros((segments.num_segments + 1, num_branches, values.shape[1]))
    # One [T, D] product per branch instead of a [T, K, D] broadcast keeps peak memory at T*D.
    branches = [
        buffer[:, k].index_add(0, ids, values * weights[:, k : k + 1]) for k in range(num_branches)
    ]
    return torch.stack(branches, dim=1)[: segments.num_segments]


def segment_reduce(
    values: torch.Tensor, segments: Segments, reduce: Literal["mean", "max", "sum"] = "mean"
) -> torch.Tensor:
    """Reduce each bag's rows to one vector.

    Args:
        values: [T, D] (or [T]) instance features; padding rows are ignored.
        segments: bag boundaries of the pack.
        reduce: "mean", "max" or "sum". The gradient of "max" is split evenly between ties.

    Returns:
        [B, D] (or [B]); an empty bag gives 0.
    """
    _check_rows(values, segments, "values")
    if reduce not in ("mean", "max", "sum"):
        raise ValueError(f"reduce must be 'mean', 'max' or 'sum', got {reduce!r}")
    ids = _row_ids(segments, values.device)
    num_bags = segments.num_segments
    out_shape = (num_bags + 1, *values.shape[1:])
    valid = (ids < num_bags).view(-1, *([1] * (values.dim() - 1)))
    values = torch.where(valid, values, 0)

    if reduce == "max":
        index = ids.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
        # include_self=False leaves empty bags at the buffer's 0 instead of -inf.
        out = values.new_zeros(out_shape).scatter_reduce(
            0, index, values, reduce="amax", include_self=False
        )
        return out[:num_bags]

    out = values.new_zeros(out_shape).index_add(0, ids, values)[:num_bags]
    if reduce == "sum":
        return out
    counts = torch.tensor([max(n, 1) for n in segments.lengths], dtype=values.dtype)
    counts = counts.to(values.device).view(-1, *([1] * (values.dim() - 1)))
    return out / counts


def _rank_within_bags(
    keys: torch.Tensor, ids: torch.Tensor, row_start: torch.Tensor
) -> torch.Tensor:
    """Rank of every row among the rows of its bag by descending `keys`, per column.

    Args:
        keys: [T, K] sort keys; padding rows must sort last (use -inf).
        ids: [T] bag index per row, non-decreasing (bags are contiguous), padding = B.
        row_start: [T] first row of the row's bag.

    Returns:
        int64 [T, K]; 0 is the largest key of the bag.
    """
    order = torch.sort(keys, dim=0, descending=True, stable=True).indices  # [T, K]
    # A stable sort by bag index keeps the descending key order inside each bag, and since bags
    # are contiguous, the sorted positions of bag b are exactly its own rows.
    order = order.gather(0, torch.sort(ids[order], dim=0, stable=True).indices)
    position = torch.arange(keys.shape[0], device=keys.device).unsqueeze(1)
    rank = torch.empty_like(order)
    rank.scatter_(0, order, (position - row_start.unsqueeze(1)).expand_as(order))
    return rank


def segment_topk_mask(
    scores: torch.Tensor,
    segments: Segments,
    k: int,
    mask_fraction: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the top-k rows of each bag and branch and mask a random fraction of them.

    The stochastic instance masking of ACMIL (Zhang et al., "Attention-Challenging Multiple
    Instance Learning for Whole Slide Image Classification", ECCV 2024): in each bag b and
    branch j, k_b = min(k, len(b)) highest-scoring rows are candidates and
    floor(mask_fraction * k_b) of them, chosen uniformly at random, are masked.

    Args:
        scores: [T, K] (or [T]) attention logits; read without gradient.
        segments: bag boundaries of the pack.
        k: candidates per bag and branch (>= 0); shrinks to the bag length.
        mask_fraction: fraction of the candidates to mask, in [0, 1].
        generator: random source; a generator on the CPU or on `scores.device` makes the mask
            reproducible.

    Returns:
        bool [T, K] (or [T]), True = masked. Padding rows are never masked.
    """
    _check_rows(scores, segments, "scores")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if not 0.0 <= mask_fraction <= 1.0:
        raise ValueError(f"mask_fraction must be in [0, 1], got {mask_fraction}")
    squeeze = scores.dim() == 1
    keys = scores.detach().unsqueeze(1) if squeeze else scores.detach()
    device = keys.device
    ids = _row_ids(segments, device)
    num_bags = segments.num_segments
    valid = (ids < num_bags).unsqueeze(1)

    # Per-row bag constants, computed from the Python lengths: no device sync.
    starts = list(segments.starts) + [segments.num_valid]
    candidates = [min(k, n) for n in segments.lengths] + [0]
    masked_per_bag = [int(mask_fraction * c + 1e-9) for c in candidates]
    row_start = torch.tensor(starts, dtype=torch.int64, device=device)[ids]
    row_masked = torch.tensor(masked_per_bag, dtype=torch.int64, device=device)[ids]
    row_candidates = torch.tensor(candidates, dtype=torch.int64, device=device)[ids]

    if not keys.is_floating_point():
        keys = keys.float()
    keys = torch.where(valid, keys.nan_to_num(nan=float("-inf")), float("-inf"))
    score_rank = _rank_within_bags(keys, ids, row_start)
    is_candidate = valid & (score_rank < row_candidates.unsqueeze(1))

    random_source = device if generator is None else generator.device
    noise = torch.rand(keys.shape, generator=generator, device=random_source).to(device)
    noise = torch.where(is_candidate, noise, -1.0)  # non-candidates rank after every candidate
    random_rank = _rank_within_bags(noise, ids, row_start)
    mask = is_candidate & (random_rank < row_masked.unsqueeze(1))
    return mask.squeeze(1) if squeeze else mask
