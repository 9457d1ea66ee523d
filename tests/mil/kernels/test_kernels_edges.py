"""Packs without any tile: no bags, only empty bags, or only padding rows."""

from __future__ import annotations

import pytest
import torch

from mil.kernels import (
    Segments,
    agent_attention,
    attention,
    nystrom_attention,
    segment_attention_pool,
    segment_reduce,
    segment_topk_mask,
)

EMPTY_PACKS = [([], 0), ([], 5), ([0, 0], 3), ([0], 0)]


@pytest.mark.parametrize(("lengths", "total"), EMPTY_PACKS)
def test_pooling_on_empty_pack(lengths: list[int], total: int) -> None:
    segments = Segments.from_lengths(lengths, total=total)
    values = torch.randn(total, 4, requires_grad=True)
    scores = torch.randn(total, 2, requires_grad=True)

    pooled, weights = segment_attention_pool(values, scores, segments)
    (pooled.sum() + weights.sum()).backward()

    assert pooled.shape == (len(lengths), 2, 4)
    assert torch.equal(pooled, torch.zeros_like(pooled))
    assert torch.equal(weights, torch.zeros_like(weights))
    assert segment_reduce(values, segments, "max").shape == (len(lengths), 4)
    assert segment_reduce(values, segments, "mean").shape == (len(lengths), 4)
    assert not segment_topk_mask(scores, segments, 3, 0.5).any()


@pytest.mark.parametrize(("lengths", "total"), EMPTY_PACKS)
@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_attention_on_empty_pack(lengths: list[int], total: int, backend: str) -> None:
    segments = Segments.from_lengths(lengths, total=total)
    q = torch.randn(total, 2, 8)
    outputs = [
        attention(q, q, q, segments, backend=backend),  # type: ignore[arg-type]
        attention(q, q, q, segments, kind="sparse", backend=backend),  # type: ignore[arg-type]
        nystrom_attention(q, q, q, segments, backend=backend),  # type: ignore[arg-type]
        agent_attention(q, q, q, segments, backend=backend),  # type: ignore[arg-type]
    ]
    if backend == "reference":
        outputs.append(attention(q, q, q, segments, kind="linear"))

    for out in outputs:
        assert out.shape == (total, 2, 8)
        assert torch.equal(out, torch.zeros_like(out))
