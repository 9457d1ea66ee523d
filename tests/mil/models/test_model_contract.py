"""Contract every registered model keeps on packed batches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mil.batch import PackedBatch
from mil.kernels.segments import Segments
from mil.models import MILModel, list_models

MODEL_NAMES = list_models()
LENGTHS = [1, 3, 50, 400]

PackFactory = Callable[..., PackedBatch]
ModelFactory = Callable[..., MILModel]


def single_bag(batch: PackedBatch, index: int) -> PackedBatch:
    """Bag `index` of `batch` alone in a pack without padding."""
    rows = batch.segments.split(batch.features)[index]
    assert batch.labels is not None
    return PackedBatch(
        features=rows.clone(),
        segments=Segments.from_lengths([rows.shape[0]]),
        labels=batch.labels[index : index + 1],
        bag_ids=[batch.bag_ids[index]],
    )


def test_registry_lists_every_model() -> None:
    expected = {"mean", "max", "abmil", "acmil", "clam_sb", "dsmil", "transmil", "transformer"}
    assert expected <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_packed_equals_one_bag_at_a_time(
    name: str, pack_factory: PackFactory, model_factory: ModelFactory
) -> None:
    model = model_factory(name).eval()
    batch = pack_factory(LENGTHS, padding=7)
    with torch.no_grad():
        packed = model(batch)
        singles = [model(single_bag(batch, b)) for b in range(len(LENGTHS))]

    assert packed.logits.shape == (len(LENGTHS), model.n_classes)
    assert packed.attention.shape[0] == batch.segments.total
    assert torch.all(packed.attention[batch.segments.num_valid :] == 0)
    packed_attention = batch.segments.split(packed.attention)
    for b, single in enumerate(singles):
        torch.testing.assert_close(packed.logits[b], single.logits[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(packed_attention[b], single.attention, atol=1e-6, rtol=1e-6)

    assert set(packed.aux_losses) == set(singles[0].aux_losses)
    for key, value in packed.aux_losses.items():
        mean_of_singles = torch.stack([single.aux_losses[key] for single in singles]).mean()
        torch.testing.assert_close(value, mean_of_singles, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_stay_in_their_bag(
    name: str, pack_factory: PackFactory, model_factory: ModelFactory
) -> None:
    model = model_factory(name).eval()
    lengths = [4, 30, 1, 17]
    batch = pack_factory(lengths, padding=3)
    batch.features.requires_grad_(True)
    output = model(batch)

    target = 1
    rows = torch.arange(batch.segments.total)
    start = batch.segments.starts[target]
    in_target = (rows >= start) & (rows < start + lengths[target])
    loss = output.logits[target].sum() + (output.attention[in_target] ** 2).sum()
    loss.backward()

    grad = batch.features.grad
    assert grad is not None
    assert torch.all(grad[~in_target] == 0), "gradient leaked into another bag or padding"
    assert grad[in_target].abs().sum() > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bag_order_in_pack_is_irrelevant(
    name: str, pack_factory: PackFactory, model_factory: ModelFactory
) -> None:
    model = model_factory(name).eval()
    lengths = [5, 1, 23, 9]
    batch = pack_factory(lengths, padding=4)
    bags = batch.segments.split(batch.features)
    order = [2, 0, 3, 1]
    permuted = pack_factory(
        [lengths[i] for i in order], padding=4, features=[bags[i] for i in order]
    )
    with torch.no_grad():
        reference = model(batch)
        shuffled = model(permuted)

    reference_attention = batch.segments.split(reference.attention)
    shuffled_attention = permuted.segments.split(shuffled.attention)
    for position, b in enumerate(order):
        torch.testing.assert_close(shuffled.logits[position], reference.logits[b])
        torch.testing.assert_close(shuffled_attention[position], reference_attention[b])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_without_nan(
    name: str, pack_factory: PackFactory, model_factory: ModelFactory
) -> None:
    model = model_factory(name, dtype=torch.float32).train()
    batch = pack_factory([1, 2, 3, 64, 7], padding=6, dtype=torch.float32)
    batch.features.requires_grad_(True)
    output = model(batch)
    assert batch.labels is not None
    loss = torch.nn.functional.cross_entropy(output.logits, batch.labels)
    loss = loss + sum(output.aux_losses.values(), torch.zeros(()))
    loss.backward()

    assert torch.isfinite(output.logits).all()
    assert torch.isfinite(output.attention).all()
    assert torch.isfinite(loss)
    assert batch.features.grad is not None
    assert torch.isfinite(batch.features.grad).all()
    for parameter_name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), parameter_name


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_tile_bag_gets_full_attention(
    name: str, mode: str, pack_factory: PackFactory, model_factory: ModelFactory
) -> None:
    model = model_factory(name).train(mode == "train")
    batch = pack_factory([1, 6, 1], padding=2)
    output = model(batch)

    attention = output.attention.detach()
    for row in (0, 7):
        assert torch.all(attention[row] == 1.0), f"row {row}: {attention[row]}"
    assert torch.isfinite(output.logits).all()
    for key, value in output.aux_losses.items():
        assert torch.isfinite(value), key


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_inference_without_labels_has_no_aux_losses(
    name: str, pack_factory: PackFactory, model_factory: ModelFactory
) -> None:
    model = model_factory(name).eval()
    batch = pack_factory([4, 2])
    batch.labels = None
    with torch.no_grad():
        output = model(batch)
    assert output.aux_losses == {}
    assert output.logits.shape == (2, model.n_classes)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_soft_labels_give_finite_aux_losses(
    name: str, pack_factory: PackFactory, model_factory: ModelFactory
) -> None:
    model = model_factory(name).train()
    batch = pack_factory([12, 5])
    batch.labels = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    output = model(batch)
    for key, value in output.aux_losses.items():
        assert value.dim() == 0, key
        assert torch.isfinite(value), key


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_empty_bag_stays_finite(
    name: str, pack_factory: PackFactory, model_factory: ModelFactory
) -> None:
    model = model_factory(name).train()
    batch = pack_factory([4, 0, 3], padding=2)
    batch.features.requires_grad_(True)
    output = model(batch)
    aux = sum(output.aux_losses.values(), torch.zeros((), dtype=torch.float64))
    loss = output.logits.sum() + aux
    loss.backward()
    assert torch.isfinite(output.logits).all()
    assert batch.features.grad is not None
    assert torch.isfinite(batch.features.grad).all()
