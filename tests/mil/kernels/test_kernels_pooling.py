from __future__ import annotations

import pytest
import torch
from kernel_packs import bag_slices, fill_padding, make_segments, permute_pack

from mil.kernels import (
    Segments,
    pooling,
    segment_attention_pool,
    segment_reduce,
    segment_softmax,
    segment_topk_mask,
)

PACKS = ["mixed", "uneven", "single", "ones"]


@pytest.fixture(autouse=True, params=[(64, 10**9), (64, 256), (3, 10**9), (1, 10**9)],
                ids=["one-chunk", "by-length", "three-bags", "one-bag"])
def dense_columns(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run every test with one chunk for all bags, chunks grouped by bag length, chunks of at
    most three bags, and one bag per chunk."""
    columns, overhead_rows = request.param
    monkeypatch.setattr(pooling, "DENSE_COLUMNS_MAX", columns)
    monkeypatch.setattr(pooling, "CHUNK_OVERHEAD_ROWS", overhead_rows)
    return int(columns)


def dense_pool(values: torch.Tensor, scores: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Per-bag loop: torch.softmax over each bag, then weights^T @ values -> [B, K, D]."""
    pooled = []
    for rows in bag_slices(segments):
        weights = torch.softmax(scores[rows], dim=0)  # [n, K]
        pooled.append(weights.T @ values[rows])  # [K, D]
    return torch.stack(pooled)


@pytest.mark.parametrize("pack", PACKS)
@pytest.mark.parametrize("branches", [None, 3])
def test_softmax_matches_per_bag(pack: str, branches: int | None) -> None:
    segments = make_segments(pack)
    shape = (segments.total,) if branches is None else (segments.total, branches)
    scores = fill_padding(torch.randn(shape, dtype=torch.float64) * 5, segments, float("nan"))

    weights = segment_softmax(scores, segments)

    assert weights.shape == scores.shape
    for rows in bag_slices(segments):
        torch.testing.assert_close(weights[rows], torch.softmax(scores[rows], dim=0))
    padding = weights[segments.num_valid :]
    assert torch.equal(padding, torch.zeros_like(padding))


def test_softmax_stable_for_large_logits() -> None:
    segments = Segments.from_lengths([3, 2])
    scores = torch.tensor([1000.0, 1001.0, 999.0, -1000.0, -1001.0])

    weights = segment_softmax(scores, segments)

    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights[:3], torch.softmax(scores[:3], 0))
    torch.testing.assert_close(weights[3:], torch.softmax(scores[3:], 0))


def test_softmax_masked_entries_no_nan() -> None:
    # Bag 0 partly masked, bag 1 fully masked, bag 2 a single row, bag 3 empty, 2 padding rows.
    segments = Segments.from_lengths([3, 2, 1, 0], total=8)
    scores = torch.tensor(
        [0.5, float("-inf"), 2.0, float("-inf"), float("-inf"), 7.0, float("nan"), 3.0],
        requires_grad=True,
    )

    weights = segment_softmax(scores, segments)
    (weights * torch.arange(8.0)).sum().backward()

    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights[:3], torch.softmax(scores.detach()[:3], 0))
    assert weights[3:5].tolist() == [0.0, 0.0]
    assert weights[5].item() == 1.0
    assert weights[6:].tolist() == [0.0, 0.0]
    assert scores.grad is not None
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[3:].abs().sum().item() == 0.0


@pytest.mark.parametrize("pack", PACKS)
def test_attention_pool_matches_per_bag(pack: str) -> None:
    segments = make_segments(pack)
    values = fill_padding(torch.randn(segments.total, 16, dtype=torch.float64), segments, 1e30)
    scores = fill_padding(torch.randn(segments.total, 2, dtype=torch.float64), segments, 0.0)

    pooled, weights = segment_attention_pool(values, scores, segments)

    nonempty = [b for b, n in enumerate(segments.lengths) if n > 0]
    expected = dense_pool(values, scores, segments)
    assert pooled.shape == (segments.num_segments, 2, 16)
    torch.testing.assert_close(pooled[nonempty], expected[nonempty])
    empty = [b for b, n in enumerate(segments.lengths) if n == 0]
    assert torch.equal(pooled[empty], torch.zeros_like(pooled[empty]))
    padding = weights[segments.num_valid :]
    assert torch.equal(padding, torch.zeros_like(padding))


def test_attention_pool_gradients_match_per_bag() -> None:
    segments = make_segments("mixed")
    values = torch.randn(segments.total, 8, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(segments.total, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randn(segments.num_segments, 2, 8, dtype=torch.float64)

    pooled, _ = segment_attention_pool(values, scores, segments)
    packed_grads = torch.autograd.grad((pooled * target).sum(), (values, scores))
    expected = dense_pool(values, scores, segments)
    dense_grads = torch.autograd.grad((expected * target).sum(), (values, scores))

    for packed, dense in zip(packed_grads, dense_grads, strict=True):
        torch.testing.assert_close(packed[: segments.num_valid], dense[: segments.num_valid])
        assert packed[segments.num_valid :].abs().sum().item() == 0.0


def test_attention_pool_gradcheck() -> None:
    segments = Segments.from_lengths([1, 3, 0, 2], total=7)
    values = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(
        lambda v, s: segment_attention_pool(v, s, segments)[0], (values, scores)
    )


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_pool_isolates_bags(reduce: str) -> None:
    segments = make_segments("mixed")
    values = torch.randn(segments.total, 4, requires_grad=True)
    scores = torch.randn(segments.total, 2, requires_grad=True)

    pooled, _ = segment_attention_pool(values, scores, segments)
    reduced = segment_reduce(values, segments, reduce=reduce)  # type: ignore[arg-type]
    (pooled[2].sum() + reduced[2].sum()).backward()

    assert values.grad is not None and scores.grad is not None
    inside = bag_slices(segments)[2]
    outside = torch.ones(segments.total, dtype=torch.bool)
    outside[inside] = False
    assert values.grad[outside].abs().sum().item() == 0.0
    assert scores.grad[outside].abs().sum().item() == 0.0
    assert values.grad[inside].abs().sum().item() > 0.0


def test_pool_permuting_bags_permutes_outputs() -> None:
    segments = make_segments("uneven")
    values = torch.randn(segments.total, 5, dtype=torch.float64)
    scores = torch.randn(segments.total, 3, dtype=torch.float64)
    order = [4, 2, 0, 5, 1, 3]

    pooled, weights = segment_attention_pool(values, scores, segments)
    permuted_values, permuted_segments = permute_pack(values, segments, order)
    permuted_scores, _ = permute_pack(scores, segments, order)
    permuted_pooled, permuted_weights = segment_attention_pool(
        permuted_values, permuted_scores, permuted_segments
    )

    torch.testing.assert_close(permuted_pooled, pooled[order])
    expected_weights, _ = permute_pack(weights, segments, order)
    torch.testing.assert_close(permuted_weights, expected_weights)


def test_gated_attention_single_bag_parity() -> None:
    # Gated attention pooling (Ilse et al., ICML 2018) written out for one bag of n instances.
    torch.manual_seed(0)
    n, dim, hidden = 50, 12, 6
    h = torch.randn(n, dim, dtype=torch.float64)
    v_proj = torch.randn(hidden, dim, dtype=torch.float64)
    u_proj = torch.randn(hidden, dim, dtype=torch.float64)
    w = torch.randn(hidden, dtype=torch.float64)

    logits = (torch.tanh(h @ v_proj.T) * torch.sigmoid(h @ u_proj.T)) @ w  # [n]
    exp = torch.exp(logits - logits.max())
    a = exp / exp.sum()
    z = (a.unsqueeze(1) * h).sum(0)

    segments = Segments.from_lengths([n])
    pooled, weights = segment_attention_pool(h, logits.unsqueeze(1), segments)

    torch.testing.assert_close(pooled[0, 0], z)
    torch.testing.assert_close(weights[:, 0], a)


@pytest.mark.parametrize("pack", PACKS)
@pytest.mark.parametrize("reduce", ["mean", "max", "sum"])
def test_reduce_matches_per_bag(pack: str, reduce: str) -> None:
    segments = make_segments(pack)
    values = fill_padding(torch.randn(segments.total, 6, dtype=torch.float64), segments, 1e30)

    out = segment_reduce(values, segments, reduce=reduce)  # type: ignore[arg-type]

    assert out.shape == (segments.num_segments, 6)
    for b, rows in enumerate(bag_slices(segments)):
        bag = values[rows]
        if bag.shape[0] == 0:
            assert torch.equal(out[b], torch.zeros(6, dtype=torch.float64))
        elif reduce == "mean":
            torch.testing.assert_close(out[b], bag.mean(0))
        elif reduce == "max":
            torch.testing.assert_close(out[b], bag.max(0).values)
        else:
            torch.testing.assert_close(out[b], bag.sum(0))


def test_reduce_rejects_unknown_mode() -> None:
    segments = Segments.from_lengths([2])
    with pytest.raises(ValueError, match="reduce must be"):
        segment_reduce(torch.zeros(2, 3), segments, reduce="median")  # type: ignore[arg-type]


def test_wrong_row_count_rejected() -> None:
    segments = Segments.from_lengths([2, 3], total=6)
    with pytest.raises(ValueError, match="pack has 6 rows"):
        segment_softmax(torch.zeros(5), segments)


def topk_sets(scores: torch.Tensor, segments: Segments, k: int) -> list[list[set[int]]]:
    """Rows of the per-bag, per-branch top-k (global row indices)."""
    sets = []
    for rows in bag_slices(segments):
        per_branch = []
        for j in range(scores.shape[1]):
            n = rows.stop - rows.start
            top = torch.topk(scores[rows, j], min(k, n)).indices + rows.start
            per_branch.append(set(top.tolist()))
        sets.append(per_branch)
    return sets


@pytest.mark.parametrize("pack", PACKS)
@pytest.mark.parametrize(("k", "fraction"), [(10, 0.5), (3, 1.0), (200, 0.25), (5, 0.0)])
def test_topk_mask_counts_and_membership(pack: str, k: int, fraction: float) -> None:
    segments = make_segments(pack)
    scores = torch.randn(segments.total, 3)  # distinct values, so top-k is unique
    generator = torch.Generator().manual_seed(3)

    mask = segment_topk_mask(scores, segments, k, fraction, generator=generator)

    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert not mask[segments.num_valid :].any()
    tops = topk_sets(scores, segments, k)
    for b, rows in enumerate(bag_slices(segments)):
        n = rows.stop - rows.start
        for j in range(3):
            masked_rows = set((torch.nonzero(mask[rows, j]).flatten() + rows.start).tolist())
            assert len(masked_rows) == int(fraction * min(k, n) + 1e-9)
            assert masked_rows <= tops[b][j]


def test_topk_mask_seeded_and_random() -> None:
    segments = make_segments("mixed")
    scores = torch.randn(segments.total, 2)

    first = segment_topk_mask(scores, segments, 50, 0.5, torch.Generator().manual_seed(1))
    again = segment_topk_mask(scores, segments, 50, 0.5, torch.Generator().manual_seed(1))
    other = segment_topk_mask(scores, segments, 50, 0.5, torch.Generator().manual_seed(2))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_topk_mask_one_dimensional_scores() -> None:
    segments = Segments.from_lengths([4, 1], total=6)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 2.0, 9.0])

    mask = segment_topk_mask(scores, segments, 2, 1.0)

    assert mask.tolist() == [False, True, False, True, True, False]


def test_topk_mask_rejects_bad_fraction() -> None:
    segments = Segments.from_lengths([4])
    with pytest.raises(ValueError, match="mask_fraction"):
        segment_topk_mask(torch.zeros(4, 1), segments, 2, 1.5)


def test_many_bags_match_per_bag() -> None:
    lengths = [
        int(n) for n in torch.randint(0, 40, (150,), generator=torch.Generator().manual_seed(5))
    ]
    segments = Segments.from_lengths(lengths, total=sum(lengths) + 9)
    values = torch.randn(segments.total, 4, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(segments.total, 2, dtype=torch.float64, requires_grad=True)

    pooled, _ = segment_attention_pool(values, scores, segments)
    means = segment_reduce(values, segments, reduce="mean")
    packed_grads = torch.autograd.grad(pooled.sum() + means.sum(), (values, scores))

    nonempty = [b for b, n in enumerate(lengths) if n > 0]
    expected = dense_pool(values, scores, segments)
    expected_means = torch.stack(
        [
            values[rows].mean(0) if rows.stop > rows.start else values.new_zeros(4)
            for rows in bag_slices(segments)
        ]
    )
    torch.testing.assert_close(pooled[nonempty], expected[nonempty])
    torch.testing.assert_close(means, expected_means)
    dense_grads = torch.autograd.grad(expected.sum() + expected_means.sum(), (values, scores))
    for packed, dense in zip(packed_grads, dense_grads, strict=True):
        torch.testing.assert_close(packed, dense)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_long_and_short_bags_match_per_bag(seed: int) -> None:
    """Runs of short bags between long ones: chunks of several bags next to one-bag chunks."""
    generator = torch.Generator().manual_seed(seed)
    short = torch.randint(0, 30, (60,), generator=generator).tolist()
    long = torch.randint(200, 700, (6,), generator=generator).tolist()
    lengths = [int(n) for n in short[:20] + long[:3] + short[20:40] + long[3:] + short[40:]]
    segments = Segments.from_lengths(lengths, total=sum(lengths) + 5)
    values = torch.randn(segments.total, 3, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(segments.total, 2, dtype=torch.float64, requires_grad=True)

    pooled, _ = segment_attention_pool(values, scores, segments)
    maxima = segment_reduce(values, segments, reduce="max")
    packed_grads = torch.autograd.grad(pooled.sum() + maxima.sum(), (values, scores))

    nonempty = [b for b, n in enumerate(lengths) if n > 0]
    expected = dense_pool(values, scores, segments)
    expected_maxima = torch.stack([
        values[rows].amax(0) if rows.stop > rows.start else values.new_zeros(3)
        for rows in bag_slices(segments)
    ])
    dense_grads = torch.autograd.grad(expected.sum() + expected_maxima.sum(), (values, scores))
    torch.testing.assert_close(pooled[nonempty], expected[nonempty])
    torch.testing.assert_close(maxima, expected_maxima)
    for packed, dense in zip(packed_grads, dense_grads, strict=True):
        torch.testing.assert_close(packed, dense)


def test_reduce_max_gradient_goes_to_argmax() -> None:
    segments = Segments.from_lengths([3, 2], total=6)
    values = torch.tensor([[1.0], [5.0], [2.0], [7.0], [3.0], [9.0]], requires_grad=True)

    segment_reduce(values, segments, reduce="max").sum().backward()

    assert values.grad is not None
    assert values.grad.flatten().tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def test_reduce_max_gradient_split_between_ties() -> None:
    segments = Segments.from_lengths([3, 0, 4], total=8)
    values = torch.tensor(
        [[4.0, 1.0], [4.0, 2.0], [0.0, 2.0], [1.0, 6.0], [8.0, 6.0], [8.0, 6.0], [8.0, 0.0],
         [99.0, 99.0]],
        requires_grad=True,
    )

    out = segment_reduce(values, segments, reduce="max")
    (out * torch.tensor([[1.0, 2.0], [5.0, 5.0], [3.0, 6.0]])).sum().backward()

    assert out.tolist() == [[4.0, 2.0], [0.0, 0.0], [8.0, 6.0]]
    assert values.grad is not None
    assert values.grad.tolist() == [
        [0.5, 0.0], [0.5, 1.0], [0.0, 1.0], [0.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 0.0],
        [0.0, 0.0],
    ]


def test_reduce_integer_and_bool_values() -> None:
    segments = Segments.from_lengths([2, 0, 3], total=6)
    values = torch.tensor([1, 2, 3, 4, 5, 9])

    assert segment_reduce(values, segments, "sum").tolist() == [3, 0, 12]
    assert segment_reduce(values, segments, "mean").tolist() == [1.5, 0.0, 4.0]
    assert segment_reduce(values, segments, "max").tolist() == [2, 0, 5]
    assert segment_reduce(values > 2, segments, "sum").tolist() == [0, 0, 3]


def test_chunks_group_short_bags_only(dense_columns: int) -> None:
    if dense_columns != 64 or pooling.CHUNK_OVERHEAD_ROWS != 256:
        pytest.skip("checks the default chunk settings")
    lengths = (5000, 3, 2, 0, 1, 6000, 40, 40, 40, 40, 40)

    chunks = pooling._bag_chunks(lengths, 1, torch.device("cpu"))

    bags = [(first, end) for _, _, first, end in chunks]
    assert bags == [(0, 1), (1, 5), (5, 6), (6, 10), (10, 11)]
    assert chunks[1][:2] == (5000, 5006)
    assert chunks[-1][1] == sum(lengths)
