"""CUDA backends against the float32 reference; skipped without a CUDA device."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kernel_packs import make_segments

from mil.kernels import (
    Segments,
    agent_attention,
    attention,
    nystrom_attention,
    segment_attention_pool,
    segment_topk_mask,
)

pytestmark = pytest.mark.gpu

HALF = [torch.bfloat16, torch.float16]


def cuda_qkv(
    segments: Segments, dtype: torch.dtype, heads: int = 4, head_dim: int = 64
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    return tuple(
        torch.randn(segments.total, heads, head_dim, device="cuda", generator=generator)
        .to(dtype)
        .requires_grad_()
        for _ in range(3)
    )


def reference_and_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, **options: Any
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = attention(q32, k32, v32, segments.to("cuda"), **{"backend": "reference", **options})
    grads = torch.autograd.grad(out.square().sum(), (q32, k32, v32))
    return out, grads


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("pack", ["mixed", "uneven"])
def test_varlen_matches_reference(dtype: torch.dtype, pack: str) -> None:
    segments = make_segments(pack).to("cuda")
    q, k, v = cuda_qkv(segments, dtype)

    out = attention(q, k, v, segments, backend="varlen")
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected, expected_grads = reference_and_grads(q, k, v, segments)

    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.float(), expected_grad, atol=5e-2, rtol=5e-2)
    padding = out[segments.num_valid :]
    assert torch.equal(padding, torch.zeros_like(padding))


def test_auto_picks_varlen_for_bf16() -> None:
    from mil.kernels.attention import _choose_backend

    q = torch.zeros(4, 1, 64, device="cuda", dtype=torch.bfloat16)
    assert _choose_backend(q, q, "softmax", "auto", {}) == "varlen"
    wide_values = torch.zeros(4, 1, 32, device="cuda", dtype=torch.bfloat16)
    assert _choose_backend(q, wide_values, "softmax", "auto", {}) == "reference"


@pytest.mark.parametrize("dtype", HALF)
def test_flex_compiled_matches_reference(dtype: torch.dtype) -> None:
    segments = make_segments("mixed").to("cuda")
    q, k, v = cuda_qkv(segments, dtype)

    out = attention(q, k, v, segments, backend="flex")
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected, expected_grads = reference_and_grads(q, k, v, segments)

    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.float(), expected_grad, atol=5e-2, rtol=5e-2)


def test_flex_routed_sparse_matches_reference() -> None:
    segments = make_segments("mixed").to("cuda")
    q, k, v = cuda_qkv(segments, torch.bfloat16)
    options = {"region_size": 64, "topk": 2}

    out = attention(q, k, v, segments, kind="sparse", backend="flex", **options)  # type: ignore[arg-type]
    expected, _ = reference_and_grads(q, k, v, segments, kind="sparse", **options)

    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_landmark_attention_on_cuda_backends(backend: Any) -> None:
    segments = make_segments("mixed").to("cuda")
    q, k, v = (x.detach() for x in cuda_qkv(segments, torch.bfloat16))

    for function in (nystrom_attention, agent_attention):
        out = function(q, k, v, segments, backend=backend)
        expected = function(q.float(), k.float(), v.float(), segments, backend="reference")
        torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_pooling_on_cuda_matches_cpu() -> None:
    segments = make_segments("mixed")
    values = torch.randn(segments.total, 32)
    scores = torch.randn(segments.total, 3)

    pooled, weights = segment_attention_pool(values.cuda(), scores.cuda(), segments.to("cuda"))
    expected_pooled, expected_weights = segment_attention_pool(values, scores, segments)
    mask = segment_topk_mask(scores.cuda(), segments.to("cuda"), 10, 0.5)

    torch.testing.assert_close(pooled.cpu(), expected_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.cpu(), expected_weights, atol=1e-6, rtol=1e-5)
    assert int(mask.sum()) == sum(3 * int(0.5 * min(10, n)) for n in segments.lengths)
