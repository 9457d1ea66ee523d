"""CLAM-SB instance clustering and DSMIL's critical-instance attention, written out per bag."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from mil.batch import PackedBatch
from mil.kernels.segments import Segments
from mil.models import MILModel, create_model
from mil.models.clam import CLAMSB, top_rows_per_bag
from mil.models.dsmil import DSMIL


def clam_instance_loss_one_bag(
    model: CLAMSB, features: torch.Tensor, label: int
) -> torch.Tensor:
    """CLAM-SB's instance loss for one bag, with topk on the bag's attention as CLAM does it."""
    tiles = model.embed(features)
    attention = torch.softmax(model.attention(tiles)[:, 0], dim=0)
    n = features.shape[0]
    total = torch.zeros((), dtype=features.dtype)
    for c in range(model.n_classes):
        head_logits = model.instance_classifiers(tiles).view(n, model.n_classes, 2)[:, c]
        if c == label:
            k = min(model.k_sample, n // 2)
            if k == 0:
                continue
            top = torch.topk(attention, k).indices
            bottom = torch.topk(-attention, k).indices
            logits = torch.cat([head_logits[top], head_logits[bottom]])
            targets = torch.cat([torch.ones(k), torch.zeros(k)]).long()
            total = total + F.cross_entropy(logits, targets)
        elif model.subtyping:
            k = min(model.k_sample, n)
            top = torch.topk(attention, k).indices
            total = total + F.cross_entropy(head_logits[top], torch.zeros(k).long())
    return total / model.n_classes if model.subtyping else total


@pytest.mark.parametrize("subtyping", [False, True])
def test_clam_instance_loss_matches_per_bag_formula(
    subtyping: bool, pack_factory: Callable[..., PackedBatch]
) -> None:
    torch.manual_seed(0)
    model = create_model(
        "clam_sb", in_dim=12, n_classes=3, embed_dim=16, attention_dim=8, subtyping=subtyping,
        instance_loss_weight=1.0,
    ).double().eval()
    assert isinstance(model, CLAMSB)
    lengths = [1, 3, 20, 9]
    batch = pack_factory(lengths, padding=4)
    assert batch.labels is not None
    with torch.no_grad():
        packed = model(batch).aux_losses["instance"]
        bags = batch.segments.split(batch.features)
        expected = torch.stack([
            clam_instance_loss_one_bag(model, bag, int(label))
            for bag, label in zip(bags, batch.labels, strict=True)
        ]).mean()
    torch.testing.assert_close(packed, expected)


def test_clam_soft_labels_mix_hard_label_losses(
    pack_factory: Callable[..., PackedBatch], model_factory: Callable[..., MILModel]
) -> None:
    model = model_factory("clam_sb").eval()
    batch = pack_factory([25])
    soft = torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64)
    losses = []
    with torch.no_grad():
        for labels in (torch.tensor([0]), torch.tensor([1]), soft):
            batch.labels = labels
            losses.append(model(batch).aux_losses["instance"])
    torch.testing.assert_close(losses[2], 0.25 * losses[0] + 0.75 * losses[1])


def test_top_rows_shrink_to_each_bags_k() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 3.0, 2.0, 1.0, 0.0, 7.0, 0.0])
    segments = Segments.from_lengths([3, 4, 1], total=9)
    selected = top_rows_per_bag(scores, segments, [2, 1, 0])
    expected = torch.tensor([False, True, True, True, False, False, False, False, False])
    assert torch.equal(selected, expected)


def test_clam_rejects_zero_k_sample() -> None:
    with pytest.raises(ValueError, match="k_sample"):
        create_model("clam_sb", in_dim=8, n_classes=2, k_sample=0)


def test_dsmil_matches_critical_instance_formula(
    pack_factory: Callable[..., PackedBatch], model_factory: Callable[..., MILModel]
) -> None:
    model = model_factory("dsmil").eval()
    assert isinstance(model, DSMIL)
    batch = pack_factory([30], padding=0)
    with torch.no_grad():
        output = model(batch)

        tiles = model.embed(batch.features)  # [30, E]
        instance_scores = model.instance_classifier(tiles)  # [30, C]
        critical = instance_scores.argmax(dim=0)  # [C]
        queries = model.query(tiles)  # [30, Q]
        scores = queries @ queries[critical].T / math.sqrt(model.query_dim)  # [30, C]
        weights = torch.softmax(scores, dim=0)
        pooled = weights.T @ model.value(tiles)  # [C, E]
        logits = model.bag_classifier(pooled[None])[0, :, 0]
        instance_ce = F.cross_entropy(instance_scores.max(dim=0).values[None], batch.labels)

    torch.testing.assert_close(output.attention, weights)
    torch.testing.assert_close(output.logits[0], logits)
    torch.testing.assert_close(output.aux_losses["instance_ce"], instance_ce)
