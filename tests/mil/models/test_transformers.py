"""TransMIL's layers against dense formulas, and the transformer MIL for every attention kind."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mil.batch import PackedBatch
from mil.kernels.segments import Segments
from mil.models import MILModel, create_model
from mil.models.transmil import PPEG, BagSequences, NystromLayer, PackedResidualConv, TransMIL


def dense_multihead_attention(layer: NystromLayer, tokens: torch.Tensor) -> torch.Tensor:
    """x + W_o softmax(q kᵀ / sqrt(Dh)) v for one bag, written out per head."""
    n = tokens.shape[0]
    qkv = layer.qkv(layer.norm(tokens)).view(n, 3, layer.n_heads, layer.head_dim)
    q, k, v = (qkv[:, i].transpose(0, 1) for i in range(3))  # [H, n, Dh]
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(layer.head_dim), dim=-1)
    mixed = (weights @ v).transpose(0, 1).reshape(n, -1)
    return tokens + layer.projection(mixed)


def test_nystrom_layer_equals_dense_attention_with_all_landmarks() -> None:
    torch.manual_seed(0)
    layer = NystromLayer(
        16, n_heads=4, n_landmarks=32, pinv_iterations=40, residual_conv_kernel=0, dropout=0.0
    ).double().eval()
    tokens = torch.randn(21, 16, dtype=torch.float64)
    with torch.no_grad():
        nystrom = layer(tokens, Segments.from_lengths([21]))
        dense = dense_multihead_attention(layer, tokens)
    torch.testing.assert_close(nystrom, dense, atol=1e-6, rtol=1e-6)


def test_residual_conv_equals_per_bag_convolution() -> None:
    torch.manual_seed(0)
    conv = PackedResidualConv(n_heads=2, kernel_size=5).double()
    lengths = [3, 1, 8]
    values = torch.randn(14, 2, 4, dtype=torch.float64)  # 12 bag rows, 2 padding rows
    segments = Segments.from_lengths(lengths, total=14)
    with torch.no_grad():
        packed = conv(values, segments)
        expected = [
            conv.conv(bag.permute(1, 0, 2).unsqueeze(0))[0].permute(1, 0, 2)
            for bag in segments.split(values)
        ]
    for got, want in zip(segments.split(packed), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.all(packed[12:] == 0)


def test_bag_sequences_pad_to_squares_cyclically() -> None:
    segments = Segments.from_lengths([3, 1, 5], total=10)
    layout = BagSequences.from_segments(segments, torch.device("cpu"))
    assert layout.sides == (2, 1, 3)
    assert layout.segments.lengths == (5, 2, 10)
    class_row = 10  # the appended class token
    expected_sources = [class_row, 0, 1, 2, 0, class_row, 3, class_row, 4, 5, 6, 7, 8, 4, 5, 6, 7]
    assert layout.source_rows.tolist() == expected_sources
    assert layout.class_rows.tolist() == [0, 5, 7]
    assert layout.tile_segments.lengths == (4, 1, 9)


def test_ppeg_equals_per_bag_grid_convolution() -> None:
    torch.manual_seed(0)
    ppeg = PPEG(6).double()
    segments = Segments.from_lengths([4, 9, 2])
    layout = BagSequences.from_segments(segments, torch.device("cpu"))
    tokens = torch.randn(layout.segments.total, 6, dtype=torch.float64)
    with torch.no_grad():
        encoded = ppeg(tokens, layout)
    for start, side in zip(layout.segments.starts, layout.sides, strict=True):
        grid_rows = slice(start + 1, start + 1 + side * side)
        grid = tokens[grid_rows].T.reshape(1, 6, side, side)
        with torch.no_grad():
            want = grid + ppeg.conv7(grid) + ppeg.conv5(grid) + ppeg.conv3(grid)
        torch.testing.assert_close(encoded[grid_rows], want[0].reshape(6, -1).T)
        torch.testing.assert_close(encoded[start], tokens[start])  # class token untouched


def test_transmil_attention_folds_repeated_tiles(
    pack_factory: Callable[..., PackedBatch], model_factory: Callable[..., MILModel]
) -> None:
    model = model_factory("transmil").eval()
    assert isinstance(model, TransMIL)
    batch = pack_factory([3, 7], padding=2)
    with torch.no_grad():
        attention = model(batch).attention  # [T, H]
    assert attention.shape == (12, 4)
    for bag in batch.segments.split(attention):
        torch.testing.assert_close(bag.sum(dim=0), torch.ones(4, dtype=torch.float64))
    assert torch.all(attention[10:] == 0)


def test_transmil_defaults_follow_the_paper() -> None:
    model = create_model("transmil", in_dim=8, n_classes=2)
    assert isinstance(model, TransMIL)
    assert model.layer1.n_heads == 8
    assert model.layer1.head_dim == 64
    assert model.layer1.n_landmarks == 256
    assert model.layer1.pinv_iterations == 6
    assert model.layer1.residual_conv is not None
    assert model.layer1.residual_conv.conv.kernel_size == (33, 1)


TRANSFORMER_KINDS: list[tuple[str, dict[str, Any]]] = [
    ("softmax", {}),
    ("linear", {}),
    ("sparse", {"mode": "routed", "region_size": 8, "topk": 2}),
    ("sparse", {"mode": "block", "region_size": 8}),
    ("agent", {"num_agents": 6}),
]


@pytest.mark.parametrize(("kind", "options"), TRANSFORMER_KINDS)
def test_transformer_kinds_pack_like_single_bags(
    kind: str, options: dict[str, Any], pack_factory: Callable[..., PackedBatch]
) -> None:
    torch.manual_seed(0)
    model = create_model(
        "transformer", in_dim=12, n_classes=3, embed_dim=16, n_heads=2, n_layers=2,
        attention_kind=kind, attention_options=options,
    ).double().eval()
    lengths = [1, 3, 50, 130]
    batch = pack_factory(lengths, padding=5)
    with torch.no_grad():
        packed = model(batch)
        bags = batch.segments.split(batch.features)
        singles = [
            model(PackedBatch(features=bag, segments=Segments.from_lengths([bag.shape[0]])))
            for bag in bags
        ]
    packed_attention = batch.segments.split(packed.attention)
    for b, single in enumerate(singles):
        torch.testing.assert_close(packed.logits[b], single.logits[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(packed_attention[b], single.attention, atol=1e-6, rtol=1e-6)
    assert torch.all(packed_attention[0] == 1.0)


@pytest.mark.parametrize(("kind", "options"), TRANSFORMER_KINDS)
def test_transformer_kinds_keep_gradients_in_bag(
    kind: str, options: dict[str, Any], pack_factory: Callable[..., PackedBatch]
) -> None:
    torch.manual_seed(0)
    model = create_model(
        "transformer", in_dim=12, n_classes=3, embed_dim=16, n_heads=2, n_layers=1,
        attention_kind=kind, attention_options=options,
    ).double().eval()
    batch = pack_factory([20, 9, 33], padding=3)
    batch.features.requires_grad_(True)
    model(batch).logits[1].sum().backward()
    grad = batch.features.grad
    assert grad is not None
    assert torch.all(grad[:20] == 0)
    assert torch.all(grad[29:] == 0)
    assert grad[20:29].abs().sum() > 0


def test_transformer_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="attention_kind"):
        create_model("transformer", in_dim=8, n_classes=2, attention_kind="dense")
    with pytest.raises(ValueError, match="n_heads"):
        create_model("transformer", in_dim=8, n_classes=2, embed_dim=30, n_heads=8)
