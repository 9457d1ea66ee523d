"""Packs of random bags and small model configurations shared by the model tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

import mil.models
from mil.batch import PackedBatch
from mil.kernels.segments import Segments
from mil.models import MILModel, create_model

IN_DIM = 12
N_CLASSES = 3

# Small widths keep the float64 runs on 400-tile bags fast; other options keep their defaults.
SMALL_CONFIGS: dict[str, dict[str, object]] = {
    "mean": {"embed_dim": 16},
    "max": {"embed_dim": 16},
    "abmil": {"embed_dim": 16, "attention_dim": 8},
    "acmil": {"embed_dim": 16, "attention_dim": 8},
    "clam_sb": {"embed_dim": 16, "attention_dim": 8},
    "dsmil": {"embed_dim": 16},
    "transmil": {"embed_dim": 32, "n_heads": 4, "n_landmarks": 16},
    "transformer": {"embed_dim": 32, "n_heads": 4, "n_layers": 2},
}


def make_pack(
    lengths: Sequence[int],
    padding: int = 5,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    features: Sequence[torch.Tensor] | None = None,
) -> PackedBatch:
    """Pack bags of `lengths` random tiles (or the given per-bag features) plus padding rows."""
    generator = torch.Generator().manual_seed(seed)
    if features is None:
        features = [torch.randn(n, IN_DIM, generator=generator, dtype=dtype) for n in lengths]
    rows = torch.cat([*features, torch.zeros(padding, IN_DIM, dtype=dtype)])
    segments = Segments.from_lengths(lengths, total=rows.shape[0])
    labels = torch.arange(len(lengths)) % N_CLASSES
    return PackedBatch(
        features=rows,
        segments=segments,
        labels=labels,
        bag_ids=[f"slide-{i}" for i in range(len(lengths))],
    )


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> MILModel:
    """Registered model `name` with its small test config, seeded weights and `dtype`."""
    torch.manual_seed(seed)
    model = create_model(name, in_dim=IN_DIM, n_classes=N_CLASSES, **SMALL_CONFIGS.get(name, {}))
    return model.to(dtype)


@pytest.fixture
def pack_factory() -> Callable[..., PackedBatch]:
    return make_pack


@pytest.fixture
def model_factory() -> Callable[..., MILModel]:
    return build_model


MODEL_NAMES = mil.models.list_models()
