"""Per-bag softmax, attention pooling, reductions and top-k masks over packed bags.

Every function takes a pack of T rows (several bags back to back, then padding) and a `Segments`
describing the bags. The work is done on the valid rows only, so padding never reaches an
output: softmax statistics with `scatter_reduce`/`index_add_` for all bags at once, weighted sums
and maxima over chunks of consecutive bags: short bags share one dense product, a long bag is
one product on its own rows.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from mil.kernels.segments import Segments


def _check_rows(tensor: torch.Tensor, segments: Segments, name: str) -> None:
    if tensor.shape[0] != segments.total:
        raise ValueError(
            f"{name} has {tensor.shape[0]} rows but the pack has {segments.total} rows "
            f"({segments.num_segments} bags); pass the tensor and the Segments of the same pack"
        )


def _check_dims(tensor: torch.Tensor, dims: tuple[int, ...], name: str, shape: str) -> None:
    if tensor.dim() not in dims:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")


def _row_ids(segments: Segments, device: torch.device) -> torch.Tensor:
    """Bag index of every row, int64 [T], padding = B, on `device`."""
    ids = segments.segment_ids()
    return ids if ids.device == device else ids.to(device)


def _valid_ids(segments: Segments, device: torch.device) -> torch.Tensor:
    """Bag index of the rows that belong to a bag, int64 [num_valid], on `device`.

    Bags are laid back to back from row 0 and padding follows them, so the valid rows are
    exactly `[:num_valid]` and every function below works on that slice.
    """
    return _row_ids(segments, device)[: segments.num_valid]


def _valid_rows(tensor: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Rows `[:num_valid]` of `tensor`; the tensor itself when there is no padding.

    Returning the tensor unsliced spares autograd a [T, ...] zero-filled gradient buffer.
    """
    return tensor if segments.num_valid == tensor.shape[0] else tensor[: segments.num_valid]


def _pad_rows(tensor: torch.Tensor, total: int) -> torch.Tensor:
    """Append zero rows to `tensor` [n, ...] up to `total` rows."""
    if tensor.shape[0] == total:
        return tensor
    padding = tensor.new_zeros((total - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding], dim=0)


def _segment_max(scores: torch.Tensor, ids: torch.Tensor, num_bags: int) -> torch.Tensor:
    """Per-bag maximum of the valid rows `scores` [n, K] -> [B, K], without gradient.

    Empty bags and bags whose scores are all -inf give 0, so subtracting the result never
    creates NaN (-inf - -inf).
    """
    with torch.no_grad():
        fill = torch.finfo(scores.dtype).min
        buffer = scores.new_full((num_bags, *scores.shape[1:]), fill)
        index = ids.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)
        buffer.scatter_reduce_(0, index, scores.detach(), reduce="amax", include_self=True)
        return torch.where(torch.isfinite(buffer) & (buffer > fill), buffer, 0)


def _is_low_precision(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float16, torch.bfloat16)


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
    _check_dims(scores, (1, 2), "scores", "[T] or [T, K]")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}; cast with .float()")
    squeeze = scores.dim() == 1
    if squeeze:
        scores = scores.unsqueeze(1)
    ids = _valid_ids(segments, scores.device)
    num_bags = segments.num_segments
    valid_scores = _valid_rows(scores, segments)  # [n, K]

    # Stable form: the per-bag max (a constant for autograd) is subtracted before exp.
    shifted = valid_scores - _segment_max(valid_scores, ids, num_bags).index_select(0, ids)
    # float16 and bfloat16 scores are exponentiated and summed in float32: a float16 sum
    # overflows to inf above 65504 rows of equal score, which would make every weight 0.
    exp = torch.exp(shifted.float() if _is_low_precision(shifted) else shifted)
    sums = exp.new_zeros((num_bags, exp.shape[1])).index_add_(0, ids, exp)
    # Fully masked and empty bags have sum 0 and exp 0. Dividing by 1 there keeps their weights
    # and gradients 0, where a tiny divisor would overflow the gradient to inf * 0 = NaN.
    denominator = torch.where(sums > 0, sums, 1).index_select(0, ids)
    weights = _pad_rows((exp / denominator).to(scores.dtype), segments.total)
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
    _check_dims(values, (2,), "values", "[T, D]")
    if scores.dim() == 1:
        scores = scores.unsqueeze(1)
    weights = segment_softmax(scores, segments)  # [T, K]
    pooled = weighted_segment_sum(values, weights, segments)
    return pooled, weights


# The weighted sum runs as dense matrix products over chunks of consecutive bags. Each chunk of
# rows gets a [rows, bags * K] matrix holding each weight in its bag's column, so a chunk of c
# bags spends c times the multiply-adds of its rows. Short bags share a chunk, because one
# product per bag would cost more in call overhead than the zeros do. A long bag gets a chunk of
# its own, where the product is exactly the per-bag one.
# A bag of n rows joins the chunk before it (R rows, c bags) while the extra work, R + n * c rows,
# stays under CHUNK_OVERHEAD_ROWS (the cost of one more product, counted in rows) and the chunk
# stays within DENSE_COLUMNS_MAX columns. Both values are estimates from a 2-core CPU: at 100k
# rows, D = 512 and 16 bags, forward and backward took 104 ms with one chunk per bag and 153 ms
# with one chunk of 16; at 1024 bags, chunks of several bags were as fast as one bag per chunk
# or faster.
DENSE_COLUMNS_MAX = 64
CHUNK_OVERHEAD_ROWS = 256
# NOTE: the value for GPUs is a guess, never measured: a kernel launch costs about as long as
# streaming a few thousand rows, and the zeros of a dense product are cheap next to it.
CHUNK_OVERHEAD_ROWS_GPU = 4096


def _bag_chunks(
    lengths: tuple[int, ...], num_branches: int, device: torch.device
) -> list[tuple[int, int, int, int]]:
    """Group consecutive bags into chunks for the dense products (see CHUNK_OVERHEAD_ROWS).

    Returns:
        (first row, end row, first bag, end bag) per chunk, as Python ints; every chunk holds at
        least one bag.
    """
    bags_per_chunk = max(1, DENSE_COLUMNS_MAX // max(num_branches, 1))
    overhead_rows = CHUNK_OVERHEAD_ROWS if device.type == "cpu" else CHUNK_OVERHEAD_ROWS_GPU
    chunks = []
    row = bag = 0
    chunk_rows = chunk_bags = 0
    for index, n_rows in enumerate(lengths):
        fits = (chunk_bags < bags_per_chunk
                and chunk_rows + n_rows * chunk_bags < overhead_rows)
        if chunk_bags and not fits:
            chunks.append((row, row + chunk_rows, bag, index))
            row, bag = row + chunk_rows, index
            chunk_rows = chunk_bags = 0
        chunk_rows += n_rows
        chunk_bags += 1
    if chunk_bags:
        chunks.append((row, row + chunk_rows, bag, len(lengths)))
    return chunks


def _place_weights(weights: torch.Tensor, local_ids: torch.Tensor, num_bags: int) -> torch.Tensor:
    """Spread weights [n, K] into [n, bags * K]: row t keeps its K weights in its bag's columns."""
    if num_bags == 1:
        return weights
    num_branches = weights.shape[1]
    placed = weights.new_zeros((weights.shape[0], num_bags * num_branches))
    return placed.scatter_(1, _columns(local_ids, num_branches), weights)


def _columns(local_ids: torch.Tensor, num_branches: int) -> torch.Tensor:
    """Column of each row's K weights in the placed matrix, int64 [n, K]."""
    branch = torch.arange(num_branches, device=local_ids.device)
    return local_ids.unsqueeze(1) * num_branches + branch


class _WeightedSegmentSum(torch.autograd.Function):
    """pooled[b, k] = sum over rows t of bag b of weights[t, k] * values[t], with its gradient.

    Forward and backward loop over chunks of bags (see `_bag_chunks`): short bags share a
    chunk, long bags have one each. Chunk bounds are Python ints, so the loop does not
    synchronise with the device.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        lengths: tuple[int, ...],
    ) -> torch.Tensor:
        ctx.save_for_backward(values, weights, ids)
        ctx.lengths = lengths
        num_branches = weights.shape[1]
        pooled = values.new_zeros((len(lengths), num_branches, values.shape[1]))
        for row, row_end, bag, bag_end in _bag_chunks(lengths, num_branches, values.device):
            placed = _place_weights(weights[row:row_end], ids[row:row_end] - bag, bag_end - bag)
            pooled[bag:bag_end] = (placed.T @ values[row:row_end]).view(
                bag_end - bag, num_branches, values.shape[1]
            )
        return pooled

    @staticmethod
    def backward(
        ctx: Any, grad_pooled: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        values, weights, ids = ctx.saved_tensors
        num_branches, dim = weights.shape[1], values.shape[1]
        need_values, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_values = values.new_empty(values.shape) if need_values else None
        grad_weights = weights.new_empty(weights.shape) if need_weights else None
        for row, row_end, bag, bag_end in _bag_chunks(ctx.lengths, num_branches, values.device):
            local_ids = ids[row:row_end] - bag
            flat_grad = grad_pooled[bag:bag_end].reshape((bag_end - bag) * num_branches, dim)
            if grad_values is not None:
                placed = _place_weights(weights[row:row_end], local_ids, bag_end - bag)
                grad_values[row:row_end] = placed @ flat_grad
            if grad_weights is not None:
                per_column = values[row:row_end] @ flat_grad.T  # [rows, bags * K]
                if bag_end - bag == 1:
                    grad_weights[row:row_end] = per_column
                else:
                    grad_weights[row:row_end] = per_column.gather(
                        1, _columns(local_ids, num_branches))
        return grad_values, grad_weights, None, None


def _multiply_into(out: torch.Tensor, hits: torch.Tensor, share: torch.Tensor) -> None:
    """Write `hits * share` into `out`, with autograd history during a double backward.

    `torch.mul(..., out=)` saves a temporary but is not differentiable, so it runs only while
    grad mode is off, which is the case in a backward without `create_graph=True`.
    """
    if torch.is_grad_enabled():
        out.copy_(hits * share)
    else:
        torch.mul(hits, share, out=out)


class _SegmentMax(torch.autograd.Function):
    """out[b] = max over the rows of bag b of values, per column; 0 for an empty bag.

    The gradient of each maximum is split evenly between the rows that reach it. Chunks of bags
    as in `_WeightedSegmentSum`: a long bag is reduced on its own rows, short bags together.
    """

    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, ids: torch.Tensor, lengths: tuple[int, ...]
    ) -> torch.Tensor:
        out = values.new_zeros((len(lengths), values.shape[1]))
        for row, row_end, bag, bag_end in _bag_chunks(lengths, 1, values.device):
            if row == row_end:
                continue
            if bag_end - bag == 1:
                out[bag] = values[row:row_end].amax(0)
            else:
                index = (ids[row:row_end] - bag).unsqueeze(1).expand(-1, values.shape[1])
                out[bag:bag_end] = out[bag:bag_end].scatter_reduce(
                    0, index, values[row:row_end], reduce="amax", include_self=False)
        ctx.save_for_backward(values, ids, out)
        ctx.lengths = lengths
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        values, ids, out = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_values = torch.empty_like(values)
        for row, row_end, bag, bag_end in _bag_chunks(ctx.lengths, 1, values.device):
            if row == row_end:
                continue
            rows = values[row:row_end]
            if bag_end - bag == 1:
                hits = rows == out[bag]
                share = grad_out[bag] / hits.sum(0).clamp_(min=1)
                _multiply_into(grad_values[row:row_end], hits, share)
            else:
                local = ids[row:row_end] - bag
                hits = rows == out[bag:bag_end].index_select(0, local)
                counts = out.new_zeros((bag_end - bag, values.shape[1])).index_add_(
                    0, local, hits.to(values.dtype))
                share = grad_out[bag:bag_end] / counts.clamp_(min=1)
                _multiply_into(grad_values[row:row_end], hits, share.index_select(0, local))
        return grad_values, None, None


def weighted_segment_sum(
    values: torch.Tensor, weights: torch.Tensor, segments: Segments
) -> torch.Tensor:
    """`sum_{t in bag b} weights[t, k] * values[t]` -> [B, K, D] for values [T, D], weights [T, K].

    Padding rows are skipped, whatever their values and weights (NaN included). Values and
    weights of different dtypes are promoted to their common dtype first.
    """
    _check_rows(values, segments, "values")
    _check_rows(weights, segments, "weights")
    _check_dims(values, (2,), "values", "[T, D]")
    _check_dims(weights, (2,), "weights", "[T, K]")
    if values.dtype != weights.dtype:
        # Promote as `weights[:, :, None] * values[:, None, :]` would. Under autocast, the
        # products inside still run in the autocast dtype.
        common = torch.promote_types(values.dtype, weights.dtype)
        values, weights = values.to(common), weights.to(common)
    ids = _valid_ids(segments, values.device)
    return _WeightedSegmentSum.apply(
        _valid_rows(values, segments), _valid_rows(weights, segments), ids, segments.lengths
    )


def segment_reduce(
    values: torch.Tensor, segments: Segments, reduce: Literal["mean", "max", "sum"] = "mean"
) -> torch.Tensor:
    """Reduce each bag's rows to one vector.

    Args:
        values: [T, D] (or [T], or [T, ...]) instance features; padding rows are ignored.
            Integer and bool values are summed exactly; their mean is in the default float dtype.
        segments: bag boundaries of the pack.
        reduce: "mean", "max" or "sum". The gradient of "max" is split evenly between ties.

    Returns:
        [B, D] (or [B]); an empty bag gives 0.
    """
    _check_rows(values, segments, "values")
    if reduce not in ("mean", "max", "sum"):
        raise ValueError(f"reduce must be 'mean', 'max' or 'sum', got {reduce!r}")
    ids = _valid_ids(segments, values.device)
    num_bags = segments.num_segments
    feature_shape = values.shape[1:]
    features = math.prod(feature_shape)
    flat = _valid_rows(values, segments).reshape(segments.num_valid, features)  # [n, F]

    if reduce == "max":
        if not flat.is_floating_point():
            out = flat.new_zeros((num_bags, flat.shape[1])).scatter_reduce(
                0, ids.unsqueeze(1).expand_as(flat), flat, reduce="amax", include_self=False)
            return out.view(num_bags, *feature_shape)
        out = _SegmentMax.apply(flat, ids, segments.lengths)
        return out.view(num_bags, *feature_shape)

    if flat.dtype == torch.bool:
        flat = flat.to(torch.int64)  # so that "sum" counts the True entries
    if not flat.is_floating_point():
        if reduce == "sum":  # integer counts stay exact in index_add_
            out = flat.new_zeros((num_bags, flat.shape[1])).index_add_(0, ids, flat)
            return out.view(num_bags, *feature_shape)
        flat = flat.to(torch.get_default_dtype())
    if reduce == "mean":
        inverse_counts = [1.0 / max(n, 1) for n in segments.lengths]
        row_weights = torch.tensor(inverse_counts, dtype=flat.dtype, device=flat.device)[ids]
    else:
        row_weights = flat.new_ones(segments.num_valid)
    out = _WeightedSegmentSum.apply(flat, row_weights.unsqueeze(1), ids, segments.lengths)
    return out.view(num_bags, *feature_shape)


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
