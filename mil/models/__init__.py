"""MIL models on packed batches; importing this package registers every model.

Use `create_model(name, in_dim, n_classes, **config)` and `list_models()`; presets for each
model are in `configs/models/<name>.yaml`.
"""

from mil.models import abmil, acmil, clam, dsmil, pooling, transformer, transmil
from mil.models.base import MILModel, MILOutput, create_model, list_models, register_model

__all__ = [
    "MILModel",
    "MILOutput",
    "abmil",
    "acmil",
    "clam",
    "dsmil",
    "create_model",
    "list_models",
    "pooling",
    "register_model",
    "transformer",
    "transmil",
]
