"""Packing-safe Nyström attention (Xiong et al., "Nyströmformer", AAAI 2021), as used by TransMIL.

Softmax attention softmax(QKᵀ)V is approximated per bag with m landmarks:
softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V, where Q̃ and K̃ are means of m runs of
consecutive rows. Everything is done per bag: landmarks never mix rows of two bags, the
pseudo-inverse scaling uses one bag only, and padding never enters a landmark. Unlike the usual
implementation, a bag is not zero-padded to a multiple of m first; a bag of n rows gets
min(m, n) landmarks of n // m or n // m + 1 rows, so with n <= m the landmarks are the tokens
themselves and the result is dense softmax attention (up to the pseudo-inverse iterations).

The two outer products are cross attention between the pack and its landmarks, so they run on
any backend of `attention`. The residual depthwise convolution over V of TransMIL is a model
layer and not part of this function.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from mil.kernels.attention import attention, default_scale
from mil.kernels.groups import groups_by_count
from mil.kernels.pooling import segment_reduce
from mil.kernels.segments import Segments


def iterative_pinv(matrix: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse by the iteration of Razavi et al. (2014) used in Nyströmformer.

    Args:
        matrix: [B, H, M, M], one stack of H matrices per bag. The initial scaling divides by the
            maximum absolute row sum times the maximum absolute column sum over the H heads of the
            same bag (for a single bag this is the global maximum of the original code).
        iterations: number of iterations; 6 in Nyströmformer and TransMIL.

    Returns:
        [B, H, M, M] approximate pseudo-inverses.
    """
    magnitude = matrix.abs()
    max_row_sum = magnitude.sum(-1).amax(dim=(-2, -1))  # [B]
    max_col_sum = magnitude.sum(-2).amax(dim=(-2, -1))
    inverse = matrix.transpose(-1, -2) / (max_row_sum * max_col_sum).clamp_min(
        torch.finfo(matrix.dtype).tiny
    ).view(-1, 1, 1, 1)
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        product = matrix @ inverse
        inverse = (
            0.25
            * inverse
            @ (13 * identity - product @ (15 * identity - product @ (7 * identity - product)))
        )
    return inverse


def _pad_positions(segments: Segments, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bag index and position inside the bag of every row, int64 [T] each (no padding rows)."""
    ids = segments.segment_ids().to(device)
    starts = segments.offsets.to(device=device, dtype=torch.int64)
    return ids, torch.arange(segments.total, device=device) - starts[ids]


def _landmark_kernel(
    q_landmarks: torch.Tensor,
    k_landmarks: torch.Tensor,
    landmark_segments: Segments,
    scale: float,
) -> torch.Tensor:
    """softmax(Q̃ K̃ᵀ) per bag, padded to [B, H, M, M] with the identity on padding rows/columns.

    Padding with a separate identity block keeps the pseudo-inverse of each bag's block exact,
    and the identity's row and column sums (1) never exceed those of a softmax block, so the
    iteration's scaling is unchanged.
    """
    device = q_landmarks.device
    num_bags, width = landmark_segments.num_segments, landmark_segments.max_len
    bag, position = _pad_positions(landmark_segments, device)
    heads, head_dim = q_landmarks.shape[1], q_landmarks.shape[2]
    padded_q = q_landmarks.new_zeros((num_bags, width, heads, head_dim))
    padded_q = padded_q.index_put((bag, position), q_landmarks)
    padded_k = padded_q.new_zeros(padded_q.shape).index_put((bag, position), k_landmarks)

    counts = torch.tensor(landmark_segments.lengths, device=device)
    slot = torch.arange(width, device=device)
    valid = slot.view(1, -1) < counts.view(-1, 1)  # [B, M]
    scores = torch.einsum("bihd,bjhd->bhij", padded_q, padded_k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
    kernel = torch.softmax(scores, dim=-1)
    both_valid = (valid.unsqueeze(2) & valid.unsqueeze(1)).unsqueeze(1)  # [B, 1, M, M]
    padding_diagonal = torch.diag_embed((~valid).to(kernel.dtype)).unsqueeze(1)
    return kernel * both_valid.to(kernel.dtype) + padding_diagonal


def _landmark_buckets(
    landmark_segments: Segments, device: torch.device
) -> list[tuple[torch.Tensor, Segments]]:
    """Group the bags by landmark count for the pseudo-inverse, which pads each bag to M × M.

    Padding every bag to the largest count would cost cubic work on zeros: with log-normal bag
    lengths, the packed form was 3 times slower than a per-bag loop. Bags whose counts fall in
    the same quarter octave go together. Padding then widens a bag's side by less than 19%
    (cubic work by less than 1.7 times), and a pack needs at most 4 * log2(m) + 1 batched
    inversions. Empty bags have no landmarks and are left out.

    Returns:
        Per bucket: the landmark rows of its bags (int64, in bag order) and their `Segments`.
    """
    buckets: dict[int, list[int]] = {}
    for bag, count in enumerate(landmark_segments.lengths):
        if count:
            buckets.setdefault(math.floor(4 * math.log2(count)), []).append(bag)
    starts = landmark_segments.starts
    lengths = landmark_segments.lengths
    result = []
    for bags in buckets.values():
        rows = [row for b in bags for row in range(starts[b], starts[b] + lengths[b])]
        result.append((
            torch.tensor(rows, dtype=torch.int64, device=device),
            Segments.from_lengths([lengths[b] for b in bags], device=device),
        ))
    return result


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    num_landmarks: int = 256,
    pinv_iterations: int = 6,
    scale: float | None = None,
    backend: Literal["auto", "reference", "varlen", "flex"] = "auto",
) -> torch.Tensor:
    """Nyström approximation of softmax self-attention within each bag of a pack.

    Args:
        q: [T, H, Dh]; k: [T, H, Dh]; v: [T, H, Dv].
        segments: bag boundaries of the pack.
        num_landmarks: landmarks per bag m (a bag of n < m rows gets n).
        pinv_iterations: iterations of `iterative_pinv`.
        scale: softmax temperature, default 1/sqrt(Dh).
        backend: backend of the two cross-attention products (see `attention`).

    Returns:
        [T, H, Dv]; padding rows are 0.
    """
    scale = default_scale(q.shape[-1], scale)
    groups = groups_by_count(segments, num_landmarks)
    if groups.num_groups == 0:  # every bag is empty
        return q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    landmark_segments = groups.per_bag  # B bags over G landmark rows
    q_landmarks = segment_reduce(q, groups.rows, "mean")  # [G, H, Dh]
    k_landmarks = segment_reduce(k, groups.rows, "mean")

    # softmax(Q̃ Kᵀ) V: landmark queries attend to the tokens of their bag.
    landmark_values = attention(
        q_landmarks, k, v, landmark_segments, segments, backend=backend, scale=scale
    )  # [G, H, Dv]

    # pinv(softmax(Q̃ K̃ᵀ)) · landmark_values, per bag.
    mixed = landmark_values.new_zeros(landmark_values.shape)  # [G, H, Dv]
    for rows, bucket in _landmark_buckets(landmark_segments, q.device):
        kernel = _landmark_kernel(q_landmarks[rows], k_landmarks[rows], bucket, scale)
        inverse = iterative_pinv(kernel, pinv_iterations)  # [b, H, M, M]
        bag, position = _pad_positions(bucket, q.device)
        padded_values = landmark_values.new_zeros(
            (bucket.num_segments, bucket.max_len, *landmark_values.shape[1:])
        ).index_put((bag, position), landmark_values[rows])  # [b, M, H, Dv]
        bucket_mixed = torch.einsum("bhij,bjhe->bihe", inverse, padded_values)[bag, position]
        mixed = mixed.index_copy(0, rows, bucket_mixed)

    # softmax(Q K̃ᵀ) · mixed: tokens attend to the landmarks of their bag.
    return attention(
        q, k_landmarks, mixed, segments, landmark_segments, backend=backend, scale=scale
    )
