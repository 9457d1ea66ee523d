"""Sparse attention inside each bag: block-local and routed (bi-level routing) attention.

Each bag is cut into regions of `region_size` consecutive rows. The last region of a bag may be
shorter, and no region crosses a bag boundary.

- block: every query attends to the keys of its own region only.
- routed: bi-level routing attention of BiFormer (Zhu et al., "BiFormer: Vision Transformer with
  Bi-Level Routing Attention", CVPR 2023). Region queries and keys are the means of their rows
  (all heads together); each query region keeps the `topk` key regions of its own bag with the
  highest affinity (no gradient flows through this choice), and its queries attend to all keys
  of those regions. With `topk` >= the regions of a bag this is full attention within the bag.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mil.kernels.groups import BagGroups, groups_by_size
from mil.kernels.pooling import segment_reduce
from mil.kernels.segments import Segments

SparseMode = Literal["routed", "block"]


def route_regions(
    q: torch.Tensor,
    k: torch.Tensor,
    q_groups: BagGroups,
    kv_groups: BagGroups,
    topk: int,
) -> torch.Tensor:
    """Pick, for each query region, the `topk` key regions of its bag with the highest affinity.

    Args:
        q: [Tq, H, Dh] queries; k: [Tk, H, Dh] keys.
        q_groups, kv_groups: the regions of the query and key packs.
        topk: key regions kept per query region (>= 1).

    Returns:
        int64 [Rq, min(topk, max key regions per bag)] key region indices, -1 where the bag has
        fewer key regions than that.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    num_q_regions = q_groups.num_groups
    width = min(topk, kv_groups.per_bag.max_len)
    if num_q_regions == 0 or width == 0:
        return torch.full((num_q_regions, width), -1, dtype=torch.int64, device=q.device)

    with torch.no_grad():
        # Routing in float32 whatever the input dtype, so every backend picks the same regions.
        q_regions = segment_reduce(q.detach().float().flatten(1), q_groups.rows, "mean")
        k_regions = segment_reduce(k.detach().float().flatten(1), kv_groups.rows, "mean")
        affinity = q_regions @ k_regions.T  # [Rq, Rk]
        q_bag = q_groups.per_bag.segment_ids().to(q.device)
        kv_bag = kv_groups.per_bag.segment_ids().to(q.device)
        same_bag = q_bag.unsqueeze(1) == kv_bag.unsqueeze(0)
        affinity = torch.where(same_bag, affinity.nan_to_num(0.0), float("-inf"))
        scores, selected = torch.topk(affinity, width, dim=1)  # [Rq, width]
        selected = torch.where(torch.isfinite(scores), selected, -1)
    return selected


def block_routes(q_groups: BagGroups, kv_groups: BagGroups, device: torch.device) -> torch.Tensor:
    """Routes for block-local attention: each region to itself, int64 [R, 1]."""
    if q_groups.rows.lengths != kv_groups.rows.lengths:
        raise ValueError(
            "block sparse attention needs queries and keys cut into the same regions; "
            "use mode='routed' for cross attention between packs of different bag lengths"
        )
    return torch.arange(q_groups.num_groups, device=device).unsqueeze(1)


def _region_rows(groups: BagGroups, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """First row and row count of every region, int64 [R] each, on `device`."""
    offsets = groups.rows.offsets.to(device=device, dtype=torch.int64)
    return offsets[:-1], offsets[1:] - offsets[:-1]


def routed_attention_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: BagGroups,
    kv_groups: BagGroups,
    routes: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attend from each query region to the keys of its routed regions, all regions at once.

    The queries of each region are gathered into [Rq, S, H, Dh] and the keys and values of its
    routed regions into [Rq, topk * Sk, H, D]. One batched `scaled_dot_product_attention` with a
    key mask follows, and its result is scattered back to the pack's rows. Memory is
    O(Tq * topk * Sk * H * D).

    Args:
        q: [Tq, H, Dh]; k: [Tk, H, Dh]; v: [Tk, H, Dv].
        q_groups, kv_groups: the regions of the query and key packs.
        routes: int64 [Rq, W] key region indices per query region, -1 = unused slot.
        scale: softmax temperature, default 1/sqrt(Dh).

    Returns:
        [Tq, H, Dv]; padding rows and queries without any routed key are 0.
    """
    device = q.device
    total_q = q.shape[0]
    out_tail = (v.shape[1], v.shape[2])
    if q_groups.num_groups == 0 or routes.shape[1] == 0:
        return q.new_zeros((total_q, *out_tail))

    q_start, q_count = _region_rows(q_groups, device)
    kv_start, kv_count = _region_rows(kv_groups, device)
    q_width = q_groups.rows.max_len
    kv_width = kv_groups.rows.max_len

    q_slot = torch.arange(q_width, device=device)
    q_index = q_start.unsqueeze(1) + q_slot  # [Rq, S]
    q_valid = q_slot < q_count.unsqueeze(1)

    used = routes >= 0  # [Rq, W]
    route = routes.clamp_min(0)
    kv_slot = torch.arange(kv_width, device=device)
    kv_index = kv_start[route].unsqueeze(-1) + kv_slot  # [Rq, W, Sk]
    kv_valid = used.unsqueeze(-1) & (kv_slot < kv_count[route].unsqueeze(-1))
    kv_index = kv_index.flatten(1)  # [Rq, W * Sk]
    kv_valid = kv_valid.flatten(1)

    # Regions without any key (a bag with no key rows) still get one key slot so the softmax
    # is defined, and their output is zeroed below.
    has_key = kv_valid.any(dim=1)  # [Rq]
    kv_valid[:, 0] |= ~has_key

    gathered_q = q[torch.where(q_valid, q_index, 0)]  # [Rq, S, H, Dh]
    gathered_k = k[torch.where(kv_valid, kv_index, 0)]  # [Rq, W*Sk, H, Dh]
    gathered_v = v[torch.where(kv_valid, kv_index, 0)]  # [Rq, W*Sk, H, Dv]
    out = F.scaled_dot_product_attention(
        gathered_q.transpose(1, 2),  # [Rq, H, S, Dh]
        gathered_k.transpose(1, 2),
        gathered_v.transpose(1, 2),
        attn_mask=kv_valid[:, None, None, :],
        scale=scale,
    ).transpose(1, 2)  # [Rq, S, H, Dv]
    keep = q_valid & has_key.unsqueeze(1)
    out = out * keep[..., None, None].to(out.dtype)

    # Each pack row appears in exactly one (region, slot); unused slots go to a dropped row.
    target = torch.where(q_valid, q_index, total_q).flatten()
    result = q.new_zeros((total_q + 1, *out_tail)).index_add(0, target, out.flatten(0, 1))
    return result[:total_q]


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segments: Segments,
    kv_segments: Segments,
    backend: Literal["reference", "flex"] = "reference",
    mode: SparseMode = "routed",
    region_size: int = 64,
    topk: int = 4,
    scale: float | None = None,
) -> torch.Tensor:
    """Block or routed attention within each bag (see the module docstring).

    Args:
        q: [Tq, H, Dh]; k: [Tk, H, Dh]; v: [Tk, H, Dv].
        q_segments, kv_segments: bag boundaries of queries and keys (same number of bags).
        backend: "reference" (packed region gather) or "flex" (FlexAttention with the routes as
            a block mask).
        mode: "routed" or "block".
        region_size: rows per region.
        topk: key regions per query region (routed mode).
        scale: softmax temperature, default 1/sqrt(Dh).

    Returns:
        [Tq, H, Dv]; padding rows are 0.
    """
    q_groups = groups_by_size(q_segments, region_size)
    kv_groups = groups_by_size(kv_segments, region_size)
    if mode == "routed":
        routes = route_regions(q, k, q_groups, kv_groups, topk)
    elif mode == "block":
        routes = block_routes(q_groups, kv_groups, q.device)
    else:
        raise ValueError(f"sparse attention mode must be 'routed' or 'block', got {mode!r}")

    if backend == "flex":
        from mil.kernels.flex import flex_routed_attention

        return flex_routed_attention(q, k, v, q_groups, kv_groups, routes, scale=scale)
    return routed_attention_gather(q, k, v, q_groups, kv_groups, routes, scale=scale)
