"""Model checkpoints: weights plus everything needed to rebuild and trust them.

A checkpoint is a plain dict of tensors, strings, numbers, lists and dicts, so it loads with
`torch.load(..., weights_only=True)` and never runs pickled code. It stores the model's
registry name and options, the input feature dimension, the ordered class names (the class
map), the training config and the epoch, fold and seed it came from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preprocessing.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: the file it was read from.
        model_name: registry name for `mil.models.create_model`.
        model_config: options passed to `create_model` besides in_dim and n_classes.
        in_dim: feature dimension D of the tiles the model was trained on.
        classes: class names in index order (index i is logit i).
        state_dict: the model weights.
        train_config: the resolved training config of the run (JSON types).
        epoch: epoch the weights come from (1-based).
        fold: cross-validation fold, or 0 for a fixed split.
        seed: seed of the run.
        threshold: decision threshold on class 1 chosen for a binary task.
        metrics: validation metrics at that epoch.
    """

    path: Path
    model_name: str
    model_config: dict[str, Any]
    in_dim: int
    classes: list[str]
    state_dict: dict[str, torch.Tensor]
    train_config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    fold: int = 0
    seed: int = 0
    threshold: float = 0.5
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """Rebuild the registered model and load the weights strictly, in eval mode."""
        from mil.models import create_model

        try:
            model = create_model(
                self.model_name, in_dim=self.in_dim, n_classes=self.n_classes, **self.model_config
            )
        except ValueError as err:
            raise CheckpointError(
                f"{self.path}: cannot rebuild model {self.model_name!r} with the stored options "
                f"({err}); the checkpoint comes from another slidemil version, so retrain or "
                "install that version."
            ) from err
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{self.path}: weights do not fit model {self.model_name!r}: {err}"
            ) from err
        return model.to(device).eval()


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel or torch.compile wrapper."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module):
        return _unwrap(inner)
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):
        return _unwrap(original)
    return model


def save_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    model_name: str,
    model_config: Mapping[str, Any],
    in_dim: int,
    classes: Sequence[str],
    train_config: Mapping[str, Any] | None = None,
    epoch: int = 0,
    fold: int = 0,
    seed: int = 0,
    threshold: float = 0.5,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file, then rename).

    `model_config`, `train_config` and `metrics` must hold JSON types only (str, int, float,
    bool, None, lists and dicts of them), which `weights_only=True` loading accepts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().cpu() for name, tensor in _unwrap(model).state_dict().items()
    }
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "model_config": dict(model_config),
        "in_dim": int(in_dim),
        "classes": [str(c) for c in classes],
        "state_dict": state,
        "train_config": dict(train_config or {}),
        "epoch": int(epoch),
        "fold": int(fold),
        "seed": int(seed),
        "threshold": float(threshold),
        "metrics": dict(metrics or {}),
    }
    tmp = path.with_name(f"{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(
    path: Path,
    *,
    expected_model: str | None = None,
    expected_classes: Sequence[str] | None = None,
    expected_in_dim: int | None = None,
) -> Checkpoint:
    """Read a checkpoint with `weights_only=True` and check it against what the caller has.

    Args:
        path: the `checkpoint.pt` file.
        expected_model: registry name the caller will build; another name raises.
        expected_classes: class names in index order (from the run's classes.json); a
            checkpoint trained with another class map raises, because its logits would be
            read as the wrong classes.
        expected_in_dim: feature dimension of the stores the caller will feed.

    Raises:
        CheckpointError: the file is missing, unreadable or does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found. Train a model with `slidemil train`.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {err}). Files are loaded with "
            "weights_only=True; use a checkpoint written by slidemil."
        ) from err

    missing = [
        key for key in ("format", "model_name", "classes", "state_dict", "in_dim")
        if not isinstance(payload, dict) or key not in payload
    ]
    if missing:
        raise CheckpointError(
            f"{path}: not a slidemil checkpoint (missing {', '.join(missing)}); "
            "use the checkpoint.pt of a slidemil run directory."
        )
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format']} is not supported "
            f"(expected {CHECKPOINT_FORMAT}); retrain or use the slidemil version that wrote it."
        )

    checkpoint = Checkpoint(
        path=path,
        model_name=str(payload["model_name"]),
        model_config=dict(payload.get("model_config", {})),
        in_dim=int(payload["in_dim"]),
        classes=[str(c) for c in payload["classes"]],
        state_dict=dict(payload["state_dict"]),
        train_config=dict(payload.get("train_config", {})),
        epoch=int(payload.get("epoch", 0)),
        fold=int(payload.get("fold", 0)),
        seed=int(payload.get("seed", 0)),
        threshold=float(payload.get("threshold", 0.5)),
        metrics=dict(payload.get("metrics", {})),
    )
    _check_expected(checkpoint, expected_model, expected_classes, expected_in_dim)
    return checkpoint


def _check_expected(
    checkpoint: Checkpoint,
    expected_model: str | None,
    expected_classes: Sequence[str] | None,
    expected_in_dim: int | None,
) -> None:
    path = checkpoint.path
    if expected_model is not None and checkpoint.model_name != expected_model:
        raise CheckpointError(
            f"{path}: checkpoint contains model {checkpoint.model_name!r}, expected "
            f"{expected_model!r}; use a checkpoint of a {expected_model!r} run, or load this "
            f"one where a {checkpoint.model_name!r} model is expected."
        )
    if expected_classes is not None and list(expected_classes) != checkpoint.classes:
        raise CheckpointError(
            f"{path}: checkpoint was trained with classes {checkpoint.classes} (in index order) "
            f"but the class map is {list(expected_classes)}; use the classes.json of the run "
            "that wrote this checkpoint."
        )
    if expected_in_dim is not None and expected_in_dim != checkpoint.in_dim:
        raise CheckpointError(
            f"{path}: model expects {checkpoint.in_dim}-dim tile features but the features have "
            f"{expected_in_dim}; extract features with the backbone the model was trained on."
        )
