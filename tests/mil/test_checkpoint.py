"""Checkpoints: round trip, weights_only loading and rejection of mismatched runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mil.checkpoint import load_checkpoint, save_checkpoint
from mil.models import create_model
from preprocessing.errors import CheckpointError

CLASSES = ["benign", "tumor"]


class _Opaque:
    """An arbitrary class; unpickling it would run code, which weights_only forbids."""


def _save(path: Path, model_name: str = "abmil", classes: list[str] = CLASSES) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(model_name, in_dim=8, n_classes=len(classes))
    save_checkpoint(
        path, model, model_name=model_name, model_config={}, in_dim=8, classes=classes,
        train_config={"lr": 1e-3, "model": model_name}, epoch=3, fold=1, seed=7, threshold=0.4,
        metrics={"auroc": 0.9},
    )
    return model


def test_round_trip_restores_weights(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    original = _save(path)
    checkpoint = load_checkpoint(path, expected_model="abmil", expected_classes=CLASSES,
                                 expected_in_dim=8)
    model = checkpoint.build_model()

    assert not model.training
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert checkpoint.classes == CLASSES
    assert (checkpoint.epoch, checkpoint.fold, checkpoint.seed) == (3, 1, 7)
    assert checkpoint.threshold == pytest.approx(0.4)
    assert checkpoint.train_config["lr"] == pytest.approx(1e-3)


def test_file_loads_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    _save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["model_name"] == "abmil"


def test_other_model_rejected(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    _save(path, model_name="mean")
    with pytest.raises(CheckpointError, match="contains model 'mean', expected 'abmil'"):
        load_checkpoint(path, expected_model="abmil")


def test_other_class_map_rejected(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    _save(path)
    with pytest.raises(CheckpointError, match="trained with classes"):
        load_checkpoint(path, expected_classes=["tumor", "benign"])


def test_other_feature_dim_rejected(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    _save(path)
    with pytest.raises(CheckpointError, match="8-dim tile features but the features have 16"):
        load_checkpoint(path, expected_in_dim=16)


def test_pickled_object_rejected(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "payload": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)


def test_foreign_dict_rejected(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a slidemil checkpoint"):
        load_checkpoint(path)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_wrong_state_dict_rejected(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    model = create_model("abmil", in_dim=8, n_classes=2)
    save_checkpoint(path, model, model_name="abmil", model_config={"embed_dim": 32}, in_dim=8,
                    classes=CLASSES)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(path).build_model()
