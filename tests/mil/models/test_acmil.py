"""ACMIL: top-K masking in training, branch diversity loss, branch classifiers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mil.batch import PackedBatch
from mil.kernels.segments import Segments
from mil.models import MILModel, create_model
from mil.models.acmil import ACMIL, branch_diversity_loss


def test_defaults_follow_the_paper() -> None:
    model = create_model("acmil", in_dim=8, n_classes=2)
    assert isinstance(model, ACMIL)
    assert model.n_branches == 5
    assert model.top_k == 10
    assert model.mask_fraction == pytest.approx(0.6)
    assert len(model.branch_classifiers) == 5
    assert model.attention.score.out_features == 5


def test_diversity_is_zero_for_orthogonal_maps() -> None:
    attention = torch.zeros(6, 3, dtype=torch.float64)
    attention[0:2, 0] = 0.5
    attention[2:4, 1] = 0.5
    attention[4:6, 2] = 0.5
    segments = Segments.from_lengths([6])
    loss = branch_diversity_loss(attention, segments)
    torch.testing.assert_close(loss, torch.zeros(1, dtype=torch.float64))


def test_diversity_is_one_for_identical_maps() -> None:
    column = torch.softmax(torch.randn(9, dtype=torch.float64), dim=0)
    attention = torch.cat([column[:, None].repeat(1, 4), torch.zeros(2, 4, dtype=torch.float64)])
    segments = Segments.from_lengths([9], total=11)
    loss = branch_diversity_loss(attention, segments)
    torch.testing.assert_close(loss, torch.ones(1, dtype=torch.float64))


def test_diversity_is_computed_per_bag() -> None:
    identical = torch.full((3, 2), 1 / 3, dtype=torch.float64)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    attention = torch.cat([identical, orthogonal])
    loss = branch_diversity_loss(attention, Segments.from_lengths([3, 2]))
    torch.testing.assert_close(loss, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_no_masking_in_eval_mode(
    pack_factory: Callable[..., PackedBatch], model_factory: Callable[..., MILModel]
) -> None:
    model = model_factory("acmil").eval()
    batch = pack_factory([40, 12, 3])
    with torch.no_grad():
        first = model(batch).attention
        second = model(batch).attention
    valid = batch.segments.num_valid
    assert torch.all(first[:valid] > 0)
    torch.testing.assert_close(first, second, atol=0, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masking_only_among_each_bags_top_k(
    seed: int, pack_factory: Callable[..., PackedBatch], model_factory: Callable[..., MILModel]
) -> None:
    model = model_factory("acmil")
    assert isinstance(model, ACMIL)
    lengths = [40, 12, 3, 1, 25]
    batch = pack_factory(lengths, seed=seed)
    with torch.no_grad():
        unmasked = model.eval()(batch).attention  # [T, M]
        torch.manual_seed(seed)
        masked = model.train()(batch).attention

    unmasked_bags = batch.segments.split(unmasked)
    masked_bags = batch.segments.split(masked)
    for n, before, after in zip(lengths, unmasked_bags, masked_bags, strict=True):
        k = min(model.top_k, n)
        expected_masked = int(k * model.mask_fraction)
        top_k_rows = torch.topk(before, k, dim=0).indices  # [k, M]
        for branch in range(model.n_branches):
            dropped = torch.nonzero(after[:, branch] == 0).flatten()
            assert dropped.numel() == expected_masked, f"bag of {n}, branch {branch}"
            allowed = set(top_k_rows[:, branch].tolist())
            assert set(dropped.tolist()) <= allowed, f"bag of {n}, branch {branch}"
            torch.testing.assert_close(after[:, branch].sum(), torch.tensor(1.0, dtype=after.dtype))


def test_masking_changes_between_steps(
    pack_factory: Callable[..., PackedBatch], model_factory: Callable[..., MILModel]
) -> None:
    model = model_factory("acmil").train()
    batch = pack_factory([60])
    torch.manual_seed(0)
    patterns = {tuple((model(batch).attention[:60, 0] == 0).tolist()) for _ in range(8)}
    assert len(patterns) > 1


def test_slide_logits_use_branch_averaged_attention(
    pack_factory: Callable[..., PackedBatch], model_factory: Callable[..., MILModel]
) -> None:
    model = model_factory("acmil").eval()
    assert isinstance(model, ACMIL)
    batch = pack_factory([17])
    with torch.no_grad():
        output = model(batch)
        tiles = model.embed(batch.features[:17])
        bag_attention = output.attention[:17].mean(dim=1)  # [17]
        expected = model.slide_classifier(bag_attention @ tiles)
    torch.testing.assert_close(output.logits[0], expected)


def test_aux_losses_are_weighted(
    pack_factory: Callable[..., PackedBatch],
) -> None:
    batch = pack_factory([20, 5], dtype=torch.float32)
    torch.manual_seed(0)
    plain = create_model("acmil", in_dim=12, n_classes=3).eval()
    torch.manual_seed(0)
    weighted = create_model(
        "acmil", in_dim=12, n_classes=3, branch_loss_weight=0.5, diversity_weight=2.0
    ).eval()
    with torch.no_grad():
        plain_losses = plain(batch).aux_losses
        weighted_losses = weighted(batch).aux_losses
    torch.testing.assert_close(weighted_losses["branch_ce"], 0.5 * plain_losses["branch_ce"])
    torch.testing.assert_close(weighted_losses["diversity"], 2.0 * plain_losses["diversity"])


def test_rejects_invalid_options() -> None:
    with pytest.raises(ValueError, match="mask_fraction"):
        create_model("acmil", in_dim=8, n_classes=2, mask_fraction=1.5)
    with pytest.raises(ValueError, match="n_branches"):
        create_model("acmil", in_dim=8, n_classes=2, n_branches=0)
