"""Model contract and registry shared by every MIL model."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
from torch import nn

from mil.batch import PackedBatch


@dataclass
class MILOutput:
    """What every model returns for a PackedBatch of B bags in T rows.

    Attributes:
        logits: [B, C] per-bag class logits.
        attention: [T] or [T, H] per-tile attention in the batch's row order (H heads or
            branches); rows of a bag sum to 1 per head where the model normalises attention,
            padding rows are 0.
        aux_losses: named auxiliary losses, already weighted, added to the task loss in training.
    """

    logits: torch.Tensor
    attention: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class MILModel(nn.Module):
    """Base class: subclasses implement `forward(batch) -> MILOutput`.

    Attributes:
        attention_axis: what the H columns of [T, H] attention are: "branch", "head" or
            "class" (column c belongs to class c); None for models with [T] attention.
    """

    attention_axis: ClassVar[str | None] = None

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.n_classes = n_classes

    def forward(self, batch: PackedBatch) -> MILOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def attention_names(self, n_columns: int) -> list[str]:
        """Names of the attention columns, for heatmap titles ("branch 1", "class 0", ...)."""
        axis = self.attention_axis or "head"
        return [f"{axis} {index + 1 if axis != 'class' else index}" for index in range(n_columns)]


ModelT = TypeVar("ModelT", bound=type[MILModel])
_MODELS: dict[str, type[MILModel]] = {}


def register_model(name: str) -> Callable[[ModelT], ModelT]:
    """Class decorator that adds a model to the registry under `name`."""

    def decorator(cls: ModelT) -> ModelT:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered by {_MODELS[name].__name__}")
        _MODELS[name] = cls
        return cls

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def create_model(name: str, in_dim: int, n_classes: int, **config: object) -> MILModel:
    """Build a registered model; unknown names and unknown config keys raise ValueError."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    cls = _MODELS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "in_dim", "n_classes"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(
            f"model {name!r} has no option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(in_dim=in_dim, n_classes=n_classes, **config)
