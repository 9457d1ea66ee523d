from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from kernel_packs import (
    bag_slices,
    dense_attention,
    make_segments,
    permute_pack,
    random_qkv,
    segments_ids,
)

from mil.kernels import Segments, attention
from mil.kernels.attention import resolve_feature_map
from mil.kernels.groups import groups_by_size
from mil.kernels.sparse import route_regions

PACKS = ["mixed", "uneven", "single", "ones"]


def assert_padding_zero(out: torch.Tensor, segments: Segments) -> None:
    padding = out[segments.num_valid :]
    assert torch.equal(padding, torch.zeros_like(padding))


def dense_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segments: Segments,
    kv_segments: Segments,
    feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu",
) -> torch.Tensor:
    """Linear attention per bag written as the quadratic form phi(Q) phi(K)^T V / row sums."""
    phi = resolve_feature_map(feature_map)
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    pairs = zip(bag_slices(q_segments), bag_slices(kv_segments), strict=True)
    for q_rows, kv_rows in pairs:
        if q_rows.stop == q_rows.start or kv_rows.stop == kv_rows.start:
            continue
        similarity = torch.einsum("ihd,jhd->hij", phi(q[q_rows]), phi(k[kv_rows]))
        weights = similarity / (similarity.sum(-1, keepdim=True) + 1e-6)
        out[q_rows] = torch.einsum("hij,jhe->ihe", weights, v[kv_rows])
    return out


def dense_routes(
    q: torch.Tensor, k: torch.Tensor, segments: Segments, region_size: int, topk: int
) -> torch.Tensor:
    """Allowed [T, T] for bi-level routing, computed bag by bag without the packed code."""
    allowed = torch.zeros(segments.total, segments.total, dtype=torch.bool)
    for rows in bag_slices(segments):
        n = rows.stop - rows.start
        bounds = [(s, min(s + region_size, n)) for s in range(0, n, region_size)]
        if not bounds:
            continue
        q_bag, k_bag = q[rows].flatten(1), k[rows].flatten(1)
        q_regions = torch.stack([q_bag[a:b].mean(0) for a, b in bounds])
        k_regions = torch.stack([k_bag[a:b].mean(0) for a, b in bounds])
        affinity = q_regions @ k_regions.T
        chosen = torch.topk(affinity, min(topk, len(bounds)), dim=1).indices
        for r, (qa, qb) in enumerate(bounds):
            for c in chosen[r].tolist():
                ka, kb = bounds[c]
                allowed[rows.start + qa : rows.start + qb, rows.start + ka : rows.start + kb] = True
    return allowed


@pytest.mark.parametrize("pack", PACKS)
def test_softmax_reference_matches_dense(pack: str) -> None:
    segments = make_segments(pack)
    q, k, v = random_qkv(segments, segments)

    out = attention(q, k, v, segments, backend="reference")

    assert out.shape == q.shape
    torch.testing.assert_close(out, dense_attention(q, k, v, segments, segments))
    assert_padding_zero(out, segments)


def test_softmax_scale_option() -> None:
    segments = make_segments("uneven")
    q, k, v = random_qkv(segments, segments)

    out = attention(q, k, v, segments, scale=0.05)

    torch.testing.assert_close(out, dense_attention(q, k, v, segments, segments, scale=0.05))


def test_cross_attention_separate_segments() -> None:
    # Queries: 3 agent-like tokens per bag; keys: bags of 1, 0 (empty), 127 and 7 rows.
    q_segments = Segments.from_lengths([3, 3, 3, 3], total=14)
    kv_segments = Segments.from_lengths([1, 0, 127, 7], total=140)
    q, k, v = random_qkv(q_segments, kv_segments)

    out = attention(q, k, v, q_segments, kv_segments)

    torch.testing.assert_close(out, dense_attention(q, k, v, q_segments, kv_segments))
    assert torch.equal(out[3:6], torch.zeros_like(out[3:6]))  # bag without keys
    assert_padding_zero(out, q_segments)


def test_single_bag_matches_plain_attention() -> None:
    n, heads, head_dim = 64, 4, 16
    x = torch.randn(n, heads, head_dim, dtype=torch.float64)
    w_q, w_k, w_v = (torch.randn(head_dim, head_dim, dtype=torch.float64) for _ in range(3))
    q, k, v = x @ w_q, x @ w_k, x @ w_v

    scores = torch.einsum("ihd,jhd->hij", q, k) / head_dim**0.5
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.einsum("hij,jhe->ihe", weights, v)

    segments = Segments.from_lengths([n])
    for backend in ("reference", "auto"):
        out = attention(q, k, v, segments, backend=backend)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("pack", PACKS)
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_linear_matches_dense(pack: str, feature_map: str) -> None:
    segments = make_segments(pack)
    q, k, v = random_qkv(segments, segments)

    out = attention(q, k, v, segments, kind="linear", feature_map=feature_map)

    expected = dense_linear(q, k, v, segments, segments, feature_map)
    torch.testing.assert_close(out, expected)
    assert_padding_zero(out, segments)


def test_linear_custom_feature_map() -> None:
    segments = make_segments("uneven")
    q, k, v = random_qkv(segments, segments)

    out = attention(q, k, v, segments, kind="linear", feature_map=torch.nn.functional.softplus)

    expected = dense_linear(q, k, v, segments, segments, torch.nn.functional.softplus)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("pack", PACKS)
@pytest.mark.parametrize(("region_size", "topk"), [(8, 2), (16, 1), (5, 3)])
def test_routed_sparse_matches_dense(pack: str, region_size: int, topk: int) -> None:
    segments = make_segments(pack)
    q, k, v = random_qkv(segments, segments)
    options: dict[str, Any] = {"region_size": region_size, "topk": topk}

    out = attention(q, k, v, segments, kind="sparse", **options)

    allowed = dense_routes(q, k, segments, region_size, topk)
    torch.testing.assert_close(out, dense_attention(q, k, v, segments, segments, allowed))
    assert_padding_zero(out, segments)


def test_routed_sparse_all_regions_is_full_attention() -> None:
    segments = make_segments("mixed")
    q, k, v = random_qkv(segments, segments)

    out = attention(q, k, v, segments, kind="sparse", region_size=128, topk=8)

    torch.testing.assert_close(out, dense_attention(q, k, v, segments, segments))


@pytest.mark.parametrize("pack", PACKS)
def test_block_sparse_matches_dense(pack: str) -> None:
    segments = make_segments(pack)
    q, k, v = random_qkv(segments, segments)

    out = attention(q, k, v, segments, kind="sparse", mode="block", region_size=16)

    region = segments_ids(groups_by_size(segments, 16).rows)
    allowed = region[:, None] == region[None, :]
    torch.testing.assert_close(out, dense_attention(q, k, v, segments, segments, allowed))


def test_routes_stay_inside_bags() -> None:
    segments = make_segments("uneven")
    q, k, _ = random_qkv(segments, segments)
    groups = groups_by_size(segments, 4)

    routes = route_regions(q, k, groups, groups, topk=6)

    region_bag = groups.per_bag.segment_ids()
    for region, row in enumerate(routes.tolist()):
        chosen = [r for r in row if r >= 0]
        bag = int(region_bag[region])
        assert len(chosen) == min(6, groups.per_bag.lengths[bag])
        assert all(int(region_bag[r]) == bag for r in chosen)


KINDS = [
    ("softmax", {}),
    ("linear", {}),
    ("sparse", {"region_size": 16, "topk": 2}),
    ("sparse", {"mode": "block", "region_size": 16}),
]


@pytest.mark.parametrize(("kind", "options"), KINDS)
def test_attention_isolates_bags(kind: Any, options: dict[str, Any]) -> None:
    segments = make_segments("mixed")
    q, k, v = (
        torch.randn(segments.total, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )

    out = attention(q, k, v, segments, kind=kind, **options)
    out[bag_slices(segments)[3]].sum().backward()

    inside = bag_slices(segments)[3]
    outside = torch.ones(segments.total, dtype=torch.bool)
    outside[inside] = False
    for tensor in (q, k, v):
        assert tensor.grad is not None
        assert tensor.grad[outside].abs().sum().item() == 0.0
        assert tensor.grad[inside].abs().sum().item() > 0.0


@pytest.mark.parametrize(("kind", "options"), KINDS)
def test_attention_permuting_bags(kind: Any, options: dict[str, Any]) -> None:
    segments = make_segments("uneven")
    q, k, v = random_qkv(segments, segments)
    order = [3, 0, 5, 1, 4, 2]

    out = attention(q, k, v, segments, kind=kind, **options)
    permuted_q, permuted_segments = permute_pack(q, segments, order)
    permuted_k, _ = permute_pack(k, segments, order)
    permuted_v, _ = permute_pack(v, segments, order)
    permuted_out = attention(
        permuted_q,
        permuted_k,
        permuted_v,
        permuted_segments,
        kind=kind,
        **options,
    )

    expected, _ = permute_pack(out, segments, order)
    torch.testing.assert_close(permuted_out, expected)


def test_reference_gradients_match_dense() -> None:
    segments = make_segments("mixed")
    q, k, v = (
        torch.randn(segments.total, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    weight = torch.randn(segments.total, 2, 4, dtype=torch.float64)

    packed = attention(q, k, v, segments)
    packed_grads = torch.autograd.grad((packed * weight).sum(), (q, k, v))
    dense = dense_attention(q, k, v, segments, segments)
    dense_grads = torch.autograd.grad((dense * weight).sum(), (q, k, v))

    for packed_grad, dense_grad in zip(packed_grads, dense_grads, strict=True):
        torch.testing.assert_close(packed_grad, dense_grad)


def test_unknown_option_rejected() -> None:
    segments = Segments.from_lengths([3])
    q = torch.randn(3, 1, 4)
    with pytest.raises(ValueError, match="unknown option"):
        attention(q, q, q, segments, kind="linear", topk=3)


def test_unknown_kind_and_backend_rejected() -> None:
    segments = Segments.from_lengths([3])
    q = torch.randn(3, 1, 4)
    with pytest.raises(ValueError, match="attention kind"):
        attention(q, q, q, segments, kind="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention backend"):
        attention(q, q, q, segments, backend="triton")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only the reference backend"):
        attention(q, q, q, segments, kind="linear", backend="flex")


def test_varlen_rejected_on_cpu() -> None:
    segments = Segments.from_lengths([3])
    q = torch.randn(3, 1, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        attention(q, q, q, segments, backend="varlen")


def test_mismatched_rows_rejected() -> None:
    segments = Segments.from_lengths([3, 2])
    q = torch.randn(4, 1, 4)
    with pytest.raises(ValueError, match="segments cover"):
        attention(q, q, q, segments)


def test_mismatched_bag_counts_rejected() -> None:
    q_segments = Segments.from_lengths([2, 2])
    kv_segments = Segments.from_lengths([4])
    q = torch.randn(4, 1, 4)
    with pytest.raises(ValueError, match="same number of bags"):
        attention(q, q, q, q_segments, kv_segments)
