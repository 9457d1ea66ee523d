"""Packed pooling kernels against a per-bag float64 reference on unusual packs and dtypes."""

from __future__ import annotations

import pytest
import torch

from mil.kernels import (
    Segments,
    pooling,
    segment_attention_pool,
    segment_reduce,
    segment_softmax,
)
from mil.kernels.pooling import weighted_segment_sum


@pytest.fixture(autouse=True, params=[(64, 256), (1, 10**9)], ids=["by-length", "one-bag"])
def chunking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test with chunks grouped by bag length and with one bag per chunk."""
    columns, overhead_rows = request.param
    monkeypatch.setattr(pooling, "DENSE_COLUMNS_MAX", columns)
    monkeypatch.setattr(pooling, "CHUNK_OVERHEAD_ROWS", overhead_rows)


def make_pack(
    lengths: list[int], dim: int, branches: int, padding: int, dtype: torch.dtype,
    padding_value: float = float("nan"), seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, Segments]:
    """Random values [T, D] and scores [T, K] with `padding` rows of `padding_value` at the end."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths) + padding
    values = torch.randn(total, dim, generator=generator, dtype=torch.float64)
    scores = torch.randn(total, branches, generator=generator, dtype=torch.float64)
    values[sum(lengths):] = padding_value
    scores[sum(lengths):] = padding_value
    return values.to(dtype), scores.to(dtype), Segments.from_lengths(lengths, total=total)


def reference_pool(values: torch.Tensor, scores: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Per-bag torch.softmax and weights^T @ values in float64 -> [B, K, D]; zeros for empty."""
    pooled = []
    start = 0
    for n in lengths:
        bag_values = values[start:start + n].double()
        bag_scores = scores[start:start + n].double()
        start += n
        if n == 0:
            pooled.append(torch.zeros(scores.shape[1], values.shape[1], dtype=torch.float64))
            continue
        pooled.append(torch.softmax(bag_scores, dim=0).T @ bag_values)
    return torch.stack(pooled)


@pytest.mark.parametrize("padding_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("branches", [1, 2, 8])
def test_pool_mixed_lengths_match_reference(padding_value: float, branches: int) -> None:
    lengths = [0, 1, 300, 2, 0, 3, 1, 700, 1, 0]
    values, scores, segments = make_pack(lengths, 5, branches, 4, torch.float32, padding_value)

    pooled, weights = segment_attention_pool(values, scores, segments)

    expected = reference_pool(values, scores, lengths)
    torch.testing.assert_close(pooled.double(), expected, atol=1e-5, rtol=1e-4)
    assert torch.all(weights[sum(lengths):] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_long_bag_weights_sum_to_one(dtype: torch.dtype) -> None:
    # 70,000 rows of equal score: a float16 sum of their exponentials overflows to inf.
    lengths = [70_000, 3]
    values, scores, segments = make_pack(lengths, 4, 2, 2, dtype)
    scores[: lengths[0]] = 0

    pooled, weights = segment_attention_pool(values, scores, segments)

    column_sums = weights[: lengths[0]].double().sum(0)
    torch.testing.assert_close(column_sums, torch.ones(2, dtype=torch.float64), atol=5e-3, rtol=0)
    assert weights.dtype == dtype
    expected = reference_pool(values, scores, lengths)
    torch.testing.assert_close(pooled.double(), expected, atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_reduce_matches_reference(dtype: torch.dtype) -> None:
    lengths = [5, 0, 1, 400]
    values, _, segments = make_pack(lengths, 3, 1, 2, dtype)
    bags = values[: sum(lengths)].double().split(lengths)

    mean = segment_reduce(values, segments, "mean")
    maximum = segment_reduce(values, segments, "max")

    for index, bag in enumerate(bags):
        expected_mean = bag.mean(0) if len(bag) else torch.zeros(3, dtype=torch.float64)
        expected_max = bag.amax(0) if len(bag) else torch.zeros(3, dtype=torch.float64)
        torch.testing.assert_close(mean[index].double(), expected_mean, atol=2e-2, rtol=0)
        torch.testing.assert_close(maximum[index].double(), expected_max, atol=0, rtol=0)


def test_mixed_dtypes_are_promoted() -> None:
    lengths = [3, 0, 4]
    values, scores, segments = make_pack(lengths, 6, 2, 1, torch.float32, padding_value=0.0)

    pooled, _ = segment_attention_pool(values.half(), scores, segments)
    summed = weighted_segment_sum(values, scores.half(), segments)

    assert pooled.dtype == torch.float32
    assert summed.dtype == torch.float32
    expected = reference_pool(values.half(), scores, lengths)
    torch.testing.assert_close(pooled.double(), expected, atol=1e-5, rtol=1e-4)


def test_non_contiguous_inputs_match_contiguous() -> None:
    lengths = [3, 0, 70, 1]
    values, scores, segments = make_pack(lengths, 12, 3, 2, torch.float32, padding_value=0.0)
    strided_values = values[:, ::2]
    transposed_scores = scores.T.contiguous().T

    pooled, _ = segment_attention_pool(strided_values, transposed_scores, segments)
    maximum = segment_reduce(strided_values, segments, "max")

    expected, _ = segment_attention_pool(strided_values.contiguous(), scores, segments)
    torch.testing.assert_close(pooled, expected, atol=0, rtol=0)
    torch.testing.assert_close(
        maximum, segment_reduce(strided_values.contiguous(), segments, "max"), atol=0, rtol=0
    )


@pytest.mark.parametrize("needs_grad", ["values", "scores"])
def test_gradient_flows_to_one_input(needs_grad: str) -> None:
    lengths = [3, 0, 5, 1]
    values, scores, segments = make_pack(lengths, 4, 2, 2, torch.float64, padding_value=0.0)
    leaf = values if needs_grad == "values" else scores
    leaf.requires_grad_()

    pooled, _ = segment_attention_pool(values, scores, segments)
    (gradient,) = torch.autograd.grad(pooled.square().sum(), leaf)

    reference_leaf = leaf.detach().clone().requires_grad_()
    inputs = (reference_leaf, scores) if needs_grad == "values" else (values, reference_leaf)
    expected = reference_pool(*inputs, lengths)
    (expected_gradient,) = torch.autograd.grad(expected.square().sum(), reference_leaf)
    torch.testing.assert_close(gradient, expected_gradient)


def test_masked_scores_give_finite_gradients() -> None:
    lengths = [4, 3, 2]
    values, scores, segments = make_pack(lengths, 5, 2, 1, torch.float64, padding_value=0.0)
    scores[0:4, 0] = float("-inf")  # bag 0, branch 0 fully masked
    scores[4, 1] = float("-inf")
    values.requires_grad_()
    scores.requires_grad_()

    pooled, weights = segment_attention_pool(values, scores, segments)
    pooled.sum().backward()

    assert torch.all(pooled[0, 0] == 0)
    assert weights[4, 1] == 0
    assert values.grad is not None and torch.isfinite(values.grad).all()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


def test_max_ties_share_gradient() -> None:
    values = torch.tensor([[1.0, 2.0], [1.0, 0.0], [1.0, 2.0], [3.0, 3.0], [9.0, 9.0]],
                          requires_grad=True)
    segments = Segments.from_lengths([3, 1], total=5)

    segment_reduce(values, segments, "max").sum().backward()

    expected = torch.tensor([[1 / 3, 0.5], [1 / 3, 0.0], [1 / 3, 0.5], [1.0, 1.0], [0.0, 0.0]])
    assert values.grad is not None
    torch.testing.assert_close(values.grad, expected)


@pytest.mark.parametrize("lengths", [[2, 0, 3], [1], [0, 4, 1, 1]])
def test_gradcheck_small_packs(lengths: list[int]) -> None:
    values, scores, segments = make_pack(lengths, 3, 2, 2, torch.float64, padding_value=0.0)
    values.requires_grad_()
    scores.requires_grad_()

    assert torch.autograd.gradcheck(
        lambda v, s: segment_attention_pool(v, s, segments)[0], (values, scores))
    assert torch.autograd.gradcheck(lambda v: segment_reduce(v, segments, "max"), (values,))
    assert torch.autograd.gradgradcheck(
        lambda v, s: segment_attention_pool(v, s, segments)[0], (values, scores))


@pytest.mark.parametrize("lengths", [[2, 0, 3], [1], [0, 4, 1, 1]])
def test_max_double_backward(lengths: list[int]) -> None:
    values, _, segments = make_pack(lengths, 3, 1, 2, torch.float64, padding_value=0.0)
    values.requires_grad_()

    assert torch.autograd.gradgradcheck(lambda v: segment_reduce(v, segments, "max"), (values,))


def test_wrong_shapes_and_dtypes_named() -> None:
    segments = Segments.from_lengths([2, 3])

    with pytest.raises(ValueError, match=r"values has shape \(5,\), expected \[T, D\]"):
        weighted_segment_sum(torch.randn(5), torch.randn(5, 1), segments)
    with pytest.raises(ValueError, match=r"scores has shape \(5, 2, 2\)"):
        segment_attention_pool(torch.randn(5, 4), torch.randn(5, 2, 2), segments)
    with pytest.raises(TypeError, match="scores must be floating point, got torch.int64"):
        segment_softmax(torch.randint(0, 3, (5,)), segments)
