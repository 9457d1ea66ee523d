"""YAML presets in configs/models: one per registered model, in sync with the defaults."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from mil.models import list_models
from mil.models.base import _MODELS
from mil.models.presets import PRESET_DIR, ModelPreset, load_model_preset
from preprocessing.errors import ConfigError


@pytest.mark.parametrize("name", list_models())
def test_preset_exists_and_builds(name: str) -> None:
    preset = load_model_preset(name)
    assert preset.model == name
    model = preset.build(in_dim=8, n_classes=2)
    assert model.n_classes == 2


@pytest.mark.parametrize("name", list_models())
def test_preset_matches_constructor_defaults(name: str) -> None:
    preset = load_model_preset(name)
    parameters = inspect.signature(_MODELS[name].__init__).parameters
    defaults = {
        key: parameter.default
        for key, parameter in parameters.items()
        if key not in ("self", "in_dim", "n_classes")
    }
    assert preset.options == defaults


def test_preset_by_path_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text("model: abmil\noptions:\n  embed_dim: 32\n")
    preset = load_model_preset(path)
    assert preset == ModelPreset(model="abmil", options={"embed_dim": 32})
    model = preset.build(in_dim=8, n_classes=2, attention_dim=4)
    assert model.classifier.in_features == 32


def test_preset_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no-such-model.yaml"):
        load_model_preset("no-such-model")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: not_a_model\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not_a_model"):
        load_model_preset(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("options: {}\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_model_preset(missing)


def test_preset_dir_holds_only_registered_models() -> None:
    names = {path.stem for path in PRESET_DIR.glob("*.yaml")}
    assert names == set(list_models())
