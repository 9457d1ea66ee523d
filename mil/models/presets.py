"""YAML model presets: `configs/models/<name>.yaml` holds `model: <registered name>` and `options:`.

A preset is the full set of constructor options of one model, so a run can be reproduced from
the file alone. Training configs may point at a preset by name or path and override options.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mil.models.base import MILModel, create_model, list_models
from preprocessing.errors import ConfigError

#: Folder of the presets shipped with slidemil (the repository's configs/models).
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclass(frozen=True)
class ModelPreset:
    """A registered model name and its constructor options (everything but in_dim, n_classes)."""

    model: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, in_dim: int, n_classes: int, **overrides: Any) -> MILModel:
        """Create the model with the preset's options, updated by `overrides`."""
        return create_model(self.model, in_dim, n_classes, **{**self.options, **overrides})


def load_model_preset(name_or_path: str | Path) -> ModelPreset:
    """Read a preset from a YAML file, or by model name from the shipped presets.

    Raises:
        ConfigError: the file is missing or unreadable, lacks `model`, names an unregistered
            model, or its `options` is not a mapping.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name_or_path}.yaml"
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(
            f"cannot read model preset {path}: {err}. Give a model name with a preset in "
            f"{PRESET_DIR} ({', '.join(list_models())}) or the path of a YAML preset."
        ) from err
    if not isinstance(content, Mapping) or "model" not in content:
        raise ConfigError(f"model preset {path} has no `model:` key; add the registered model name")
    model = str(content["model"])
    if model not in list_models():
        raise ConfigError(
            f"model preset {path} names unknown model {model!r}; "
            f"registered models: {', '.join(list_models())}"
        )
    options = content.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"model preset {path}: `options` must be a mapping of option: value")
    return ModelPreset(model=model, options=dict(options))
