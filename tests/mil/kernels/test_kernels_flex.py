"""FlexAttention masks checked against the dense reference on the CPU (eager, forward only)."""

from __future__ import annotations

import pytest
import torch
from kernel_packs import dense_attention, make_segments, random_qkv

from mil.kernels import Segments, attention
from mil.kernels.cache import pack_cache
from mil.kernels.flex import document_block_mask

pytest.importorskip("torch.nn.attention.flex_attention")

PACKS = ["mixed", "uneven", "single", "ones"]


@pytest.mark.parametrize("pack", PACKS)
def test_flex_document_mask_matches_dense(pack: str) -> None:
    segments = make_segments(pack)
    q, k, v = random_qkv(segments, segments)

    out = attention(q, k, v, segments, backend="flex")

    torch.testing.assert_close(out, dense_attention(q, k, v, segments, segments))
    padding = out[segments.num_valid :]
    assert torch.equal(padding, torch.zeros_like(padding))


def test_flex_cross_attention_matches_dense() -> None:
    q_segments = Segments.from_lengths([3, 3, 3], total=10)
    kv_segments = Segments.from_lengths([7, 0, 127], total=140)
    q, k, v = random_qkv(q_segments, kv_segments)

    out = attention(q, k, v, q_segments, kv_segments, backend="flex")

    torch.testing.assert_close(out, dense_attention(q, k, v, q_segments, kv_segments))


def test_flex_score_mod_matches_dense_bias() -> None:
    segments = make_segments("uneven")
    q, k, v = random_qkv(segments, segments)

    def distance_penalty(score, batch, head, q_idx, kv_idx):
        return score - 0.1 * (q_idx - kv_idx).abs()

    out = attention(q, k, v, segments, score_mod=distance_penalty)  # auto picks flex

    rows = torch.arange(segments.total, dtype=torch.float64)
    bias = -0.1 * (rows[:, None] - rows[None, :]).abs()
    torch.testing.assert_close(out, dense_attention(q, k, v, segments, segments, bias=bias))


@pytest.mark.parametrize("mode", ["routed", "block"])
def test_flex_sparse_matches_reference(mode: str) -> None:
    segments = make_segments("mixed")
    q, k, v = random_qkv(segments, segments)
    options = {"mode": mode, "region_size": 16, "topk": 3}
    if mode == "block":
        del options["topk"]

    flex_out = attention(q, k, v, segments, kind="sparse", backend="flex", **options)  # type: ignore[arg-type]
    reference_out = attention(q, k, v, segments, kind="sparse", backend="reference", **options)  # type: ignore[arg-type]

    torch.testing.assert_close(flex_out, reference_out)


def test_document_mask_built_once_per_pack() -> None:
    segments = make_segments("uneven")
    q, k, v = random_qkv(segments, segments)

    first = document_block_mask(segments, segments, q.device)
    attention(q, k, v, segments, backend="flex")
    attention(q, k, v, segments, backend="flex")

    assert document_block_mask(segments, segments, q.device) is first
    masks = [key for key in pack_cache(segments) if key[0] == "flex_document_mask"]
    assert len(masks) == 1


def test_flex_backward_on_cpu_rejected() -> None:
    segments = Segments.from_lengths([4])
    q = torch.randn(4, 1, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        attention(q, q, q, segments, backend="flex")
