"""ABMIL (gated and plain) against its formulas written out, and the mean/max baselines."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mil.batch import PackedBatch
from mil.kernels.segments import Segments
from mil.models import MILModel, create_model
from mil.models.abmil import ABMIL
from mil.models.layers import GatedAttentionScores, TanhAttentionScores


def test_abmil_matches_gated_attention_formula(
    pack_factory: Callable[..., PackedBatch], model_factory: Callable[..., MILModel]
) -> None:
    model = model_factory("abmil").eval()
    assert isinstance(model, ABMIL)
    batch = pack_factory([37], padding=0)
    x = batch.features  # [37, D]
    with torch.no_grad():
        output = model(batch)

        embed = model.embed[0]
        tanh_layer = model.attention.tanh_branch[0]
        gate_layer = model.attention.gate_branch[0]
        score_layer = model.attention.score
        h = torch.relu(x @ embed.weight.T + embed.bias)  # [37, E]
        tanh_part = torch.tanh(h @ tanh_layer.weight.T + tanh_layer.bias)
        gate_part = torch.sigmoid(h @ gate_layer.weight.T + gate_layer.bias)
        scores = (tanh_part * gate_part) @ score_layer.weight[0] + score_layer.bias[0]  # [37]
        weights = torch.exp(scores - scores.max())
        weights = weights / weights.sum()
        z = weights @ h  # [E]
        logits = z @ model.classifier.weight.T + model.classifier.bias

    torch.testing.assert_close(output.attention, weights, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(output.logits[0], logits, atol=1e-12, rtol=1e-10)



def test_abmil_matches_plain_attention_formula(
    pack_factory: Callable[..., PackedBatch],
) -> None:
    batch = pack_factory([37], padding=0)
    x = batch.features  # [37, D]
    torch.manual_seed(0)
    model = create_model(
        "abmil", in_dim=x.shape[1], n_classes=3, embed_dim=16, attention_dim=8, gated=False
    )
    model = model.to(torch.float64).eval()
    assert isinstance(model, ABMIL)
    assert isinstance(model.attention, TanhAttentionScores)
    with torch.no_grad():
        output = model(batch)

        embed = model.embed[0]
        tanh_layer = model.attention.tanh_branch[0]
        score_layer = model.attention.score
        h = torch.relu(x @ embed.weight.T + embed.bias)  # [37, E]
        tanh_part = torch.tanh(h @ tanh_layer.weight.T + tanh_layer.bias)  # [37, A]
        scores = tanh_part @ score_layer.weight[0] + score_layer.bias[0]  # [37]
        weights = torch.exp(scores - scores.max())
        weights = weights / weights.sum()
        z = weights @ h  # [E]
        logits = z @ model.classifier.weight.T + model.classifier.bias

    torch.testing.assert_close(output.attention, weights, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(output.logits[0], logits, atol=1e-12, rtol=1e-10)


def test_abmil_plain_attention_has_no_gate() -> None:
    gated = create_model("abmil", in_dim=12, n_classes=2, embed_dim=16, attention_dim=8)
    plain = create_model(
        "abmil", in_dim=12, n_classes=2, embed_dim=16, attention_dim=8, gated=False
    )
    assert isinstance(gated.attention, GatedAttentionScores)
    assert not hasattr(plain.attention, "gate_branch")
    n_gate_parameters = 16 * 8 + 8
    n_gated = sum(p.numel() for p in gated.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    assert n_gated - n_plain == n_gate_parameters


def test_mean_pooling_weights_and_logits(
    pack_factory: Callable[..., PackedBatch], model_factory: Callable[..., MILModel]
) -> None:
    model = model_factory("mean").eval()
    batch = pack_factory([4, 10], padding=3)
    with torch.no_grad():
        output = model(batch)
        tiles = model.embed(batch.features[:4])
        expected = model.classifier(tiles.mean(dim=0))
    torch.testing.assert_close(output.logits[0], expected)
    torch.testing.assert_close(output.attention[:4], torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(output.attention[4:14], torch.full((10,), 0.1, dtype=torch.float64))
    assert torch.all(output.attention[14:] == 0)


def test_max_pooling_weights_count_channel_maxima(
    model_factory: Callable[..., MILModel],
) -> None:
    model = model_factory("max").eval()
    features = torch.randn(6, 12, dtype=torch.float64)
    batch = PackedBatch(features=features, segments=Segments.from_lengths([6]))
    with torch.no_grad():
        output = model(batch)
        tiles = model.embed(features)  # [6, E]
        expected_logits = model.classifier(tiles.max(dim=0).values)
        holds_max = (tiles == tiles.max(dim=0).values).double()
        expected_weights = (holds_max / holds_max.sum(dim=0)).mean(dim=1)
    torch.testing.assert_close(output.logits[0], expected_logits)
    torch.testing.assert_close(output.attention, expected_weights)
    torch.testing.assert_close(output.attention.sum(), torch.tensor(1.0, dtype=torch.float64))
