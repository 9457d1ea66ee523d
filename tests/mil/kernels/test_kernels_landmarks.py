"""Nyström (TransMIL) and agent attention: per-bag references written out in full."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kernel_packs import bag_slices, dense_attention, make_segments, permute_pack, random_qkv

from mil.kernels import Segments, agent_attention, iterative_pinv, nystrom_attention

PACKS = ["mixed", "uneven", "single", "ones"]


def group_means(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Means of `groups` runs of consecutive rows of x [n, H, D]; run sizes differ by <= 1."""
    n = x.shape[0]
    m = min(groups, n)
    sizes = [n // m + (1 if i < n % m else 0) for i in range(m)]
    return torch.stack([chunk.mean(0) for chunk in torch.split(x, sizes)])


def pinv_written_out(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """Nyströmformer's iterative pseudo-inverse for one bag's [H, M, M], global max scaling."""
    magnitude = matrix.abs()
    z = matrix.transpose(-1, -2) / (magnitude.sum(-1).max() * magnitude.sum(-2).max())
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    for _ in range(iterations):
        xz = matrix @ z
        z = 0.25 * z @ (13 * identity - xz @ (15 * identity - xz @ (7 * identity - xz)))
    return z


def nystrom_written_out(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: int, iterations: int
) -> torch.Tensor:
    """Nyström attention of one bag q, k, v [n, H, D] (queries scaled first, as in TransMIL)."""
    q = q * q.shape[-1] ** -0.5
    q_l, k_l = group_means(q, landmarks), group_means(k, landmarks)
    attn1 = torch.softmax(torch.einsum("ihd,jhd->hij", q, k_l), -1)  # [H, n, m]
    attn2 = torch.softmax(torch.einsum("ihd,jhd->hij", q_l, k_l), -1)  # [H, m, m]
    attn3 = torch.softmax(torch.einsum("ihd,jhd->hij", q_l, k), -1)  # [H, m, n]
    context = attn3 @ v.transpose(0, 1)  # [H, m, D]
    out = (attn1 @ pinv_written_out(attn2, iterations)) @ context  # [H, n, D]
    return out.transpose(0, 1)


def agent_written_out(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor
) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    aggregate = torch.softmax(torch.einsum("ahd,jhd->haj", agents, k) * scale, -1)
    agent_values = aggregate @ v.transpose(0, 1)  # [H, A, D]
    broadcast = torch.softmax(torch.einsum("ihd,ahd->hia", q, agents) * scale, -1)
    return (broadcast @ agent_values).transpose(0, 1)


def test_nystrom_single_bag_matches_transmil_form() -> None:
    segments = Segments.from_lengths([128])
    q, k, v = random_qkv(segments, segments, heads=4, head_dim=16)

    out = nystrom_attention(q, k, v, segments, num_landmarks=16, pinv_iterations=6)

    torch.testing.assert_close(out, nystrom_written_out(q, k, v, 16, 6))


@pytest.mark.parametrize("pack", PACKS)
def test_nystrom_pack_matches_per_bag(pack: str) -> None:
    segments = make_segments(pack)
    q, k, v = random_qkv(segments, segments)

    out = nystrom_attention(q, k, v, segments, num_landmarks=16)

    for rows in bag_slices(segments):
        if rows.stop == rows.start:
            continue
        expected = nystrom_written_out(q[rows], k[rows], v[rows], 16, 6)
        torch.testing.assert_close(out[rows], expected)
    padding = out[segments.num_valid :]
    assert torch.equal(padding, torch.zeros_like(padding))


def test_nystrom_all_landmarks_is_dense_softmax() -> None:
    segments = Segments.from_lengths([1, 2, 7, 60, 0, 5], total=80)
    q, k, v = random_qkv(segments, segments)

    out = nystrom_attention(q, k, v, segments, num_landmarks=64, pinv_iterations=40)

    torch.testing.assert_close(out, dense_attention(q, k, v, segments, segments))


def test_iterative_pinv_inverts_stack() -> None:
    matrix = torch.softmax(torch.randn(3, 2, 9, 9, dtype=torch.float64), dim=-1)

    inverse = iterative_pinv(matrix, iterations=40)

    torch.testing.assert_close(inverse, torch.linalg.pinv(matrix), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pack", PACKS)
def test_agent_pooled_matches_per_bag(pack: str) -> None:
    segments = make_segments(pack)
    q, k, v = random_qkv(segments, segments)

    out = agent_attention(q, k, v, segments, num_agents=9)

    for rows in bag_slices(segments):
        if rows.stop == rows.start:
            continue
        agents = group_means(q[rows], 9)
        torch.testing.assert_close(out[rows], agent_written_out(q[rows], k[rows], v[rows], agents))
    padding = out[segments.num_valid :]
    assert torch.equal(padding, torch.zeros_like(padding))


def test_agent_learned_tokens_match_per_bag() -> None:
    segments = make_segments("uneven")
    q, k, v = random_qkv(segments, segments)
    agents = torch.randn(5, 2, 8, dtype=torch.float64)

    out = agent_attention(q, k, v, segments, agents=agents)

    for rows in bag_slices(segments):
        if rows.stop == rows.start:
            continue
        torch.testing.assert_close(out[rows], agent_written_out(q[rows], k[rows], v[rows], agents))


def test_agent_rejects_bad_agent_shape() -> None:
    segments = Segments.from_lengths([4])
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="agents must be"):
        agent_attention(q, q, q, segments, agents=torch.randn(3, 8))


LANDMARK_FUNCTIONS = [
    lambda q, k, v, s: nystrom_attention(q, k, v, s, num_landmarks=8),
    lambda q, k, v, s: agent_attention(q, k, v, s, num_agents=8),
]


@pytest.mark.parametrize("function", LANDMARK_FUNCTIONS, ids=["nystrom", "agent"])
def test_landmarks_isolate_bags(function: Any) -> None:
    segments = make_segments("mixed")
    q, k, v = (
        torch.randn(segments.total, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )

    out = function(q, k, v, segments)
    inside = bag_slices(segments)[3]
    out[inside].sum().backward()

    outside = torch.ones(segments.total, dtype=torch.bool)
    outside[inside] = False
    for tensor in (q, k, v):
        assert tensor.grad is not None
        assert tensor.grad[outside].abs().sum().item() == 0.0
        assert tensor.grad[inside].abs().sum().item() > 0.0


@pytest.mark.parametrize("function", LANDMARK_FUNCTIONS, ids=["nystrom", "agent"])
def test_landmarks_permuting_bags(function: Any) -> None:
    segments = make_segments("uneven")
    q, k, v = random_qkv(segments, segments)
    order = [5, 3, 1, 0, 2, 4]

    out = function(q, k, v, segments)
    permuted = [permute_pack(x, segments, order) for x in (q, k, v)]
    permuted_segments = permuted[0][1]
    permuted_out = function(permuted[0][0], permuted[1][0], permuted[2][0], permuted_segments)

    expected, _ = permute_pack(out, segments, order)
    torch.testing.assert_close(permuted_out, expected)
