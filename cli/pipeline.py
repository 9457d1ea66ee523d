"""`slidemil run CONFIG.yaml`: the five stages chained from one YAML file.

The YAML has an `output_dir` and one section per stage (`tile`, `extract`, `train`, `predict`,
`heatmap`) whose keys are the fields of that stage's config object. Folders that connect the
stages are filled in from `output_dir` when a section leaves them out:

    <output_dir>/tiles/                  coords stores, QC thumbnails, manifest.csv
    <output_dir>/features/<backbone>/    feature stores, manifest.csv
    <output_dir>/runs/<run_name>/        checkpoints, metrics, predictions.csv, attention/
    <output_dir>/heatmaps/               PNG overlays, GeoJSON, top-tile galleries

Relative paths in the YAML are resolved against the folder the command runs in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from preprocessing.errors import ConfigError

logger = logging.getLogger(__name__)

STAGES = ("tile", "extract", "train", "predict", "heatmap")


class PipelineConfig(BaseModel):
    """Top level of a pipeline YAML file; stage sections are validated by each stage."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path
    run_name: str = "run"
    stages: list[str] = Field(default_factory=lambda: list(STAGES))
    tile: dict[str, Any] = Field(default_factory=dict)
    extract: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    predict: dict[str, Any] = Field(default_factory=dict)
    heatmap: dict[str, Any] = Field(default_factory=dict)


@dataclass
class StageOutcome:
    """What one stage of the pipeline produced."""

    stage: str
    output: Path
    failed: int
    detail: str


def load_pipeline_config(path: Path) -> PipelineConfig:
    """Read and validate a pipeline YAML file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read pipeline config ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline config must be a mapping with an output_dir key")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValueError as err:
        raise ConfigError(f"{path}: invalid pipeline config:\n{err}") from err
    unknown = [stage for stage in config.stages if stage not in STAGES]
    if unknown:
        raise ConfigError(f"{path}: unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    return config


def stage_folders(config: PipelineConfig) -> dict[str, Path]:
    """Folders that connect the stages, derived from `output_dir` and the stage sections."""
    from preprocessing.backbones import get_backbone_preset

    out = config.output_dir
    # hf-hub ids contain '/' and ':', so the folder uses the preset's file-safe name.
    backbone = get_backbone_preset(str(config.extract.get("backbone", "efficientnet_lite0"))).name
    tiles = Path(config.tile.get("output_dir", out / "tiles"))
    features_root = Path(config.extract.get("output_dir", out / "features"))
    features = Path(config.train.get("features_dir", features_root / backbone))
    run_dir = Path(config.train.get("run_dir", out / "runs" / config.run_name))
    predictions = Path(config.predict.get("output_dir", run_dir))
    heatmaps = Path(config.heatmap.get("output_dir", out / "heatmaps"))
    return {
        "tiles": tiles,
        "features_root": features_root,
        "features": features,
        "run_dir": run_dir,
        "predictions": predictions,
        "heatmaps": heatmaps,
    }


def stage_sections(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Each stage's config fields with the connecting folders filled in."""
    folders = stage_folders(config)
    return {
        "tile": {"output_dir": folders["tiles"], **config.tile},
        "extract": {
            "coords_dir": folders["tiles"],
            "output_dir": folders["features_root"],
            **config.extract,
        },
        "train": {"features_dir": folders["features"], "run_dir": folders["run_dir"],
                  **config.train},
        "predict": {
            "run_dir": folders["run_dir"],
            "features_dir": folders["features"],
            "output_dir": folders["predictions"],
            **config.predict,
        },
        "heatmap": {
            "attention_dir": folders["predictions"] / "attention",
            "output_dir": folders["heatmaps"],
            **config.heatmap,
        },
    }


def _run_tile(fields: dict[str, Any]) -> StageOutcome:
    from preprocessing.tiling import TilingConfig, run_tiling

    result = run_tiling(TilingConfig(**fields))
    return StageOutcome("tile", Path(fields["output_dir"]), result.n_failed, str(result))


def _run_extract(fields: dict[str, Any]) -> StageOutcome:
    from preprocessing.extract import ExtractConfig, backbone_output_dir, run_extraction

    config = ExtractConfig(**fields)
    result = run_extraction(config)
    return StageOutcome("extract", backbone_output_dir(config), result.n_failed, str(result))


def _run_train(fields: dict[str, Any]) -> StageOutcome:
    from mil.train import TrainConfig, run_training

    config = TrainConfig(**fields)
    result = run_training(config)
    return StageOutcome("train", Path(config.run_dir), 0, str(result))


def _run_predict(fields: dict[str, Any]) -> StageOutcome:
    from mil.predict import PredictConfig, run_prediction

    config = PredictConfig(**fields)
    result = run_prediction(config)
    return StageOutcome(
        "predict", result.predictions_path.parent, result.n_failed, str(result)
    )


def _run_heatmap(fields: dict[str, Any]) -> StageOutcome:
    from mil.heatmap import HeatmapConfig, run_heatmaps

    result = run_heatmaps(HeatmapConfig(**fields))
    return StageOutcome("heatmap", Path(fields["output_dir"]), result.n_failed, str(result))


RUNNERS: dict[str, Callable[[dict[str, Any]], StageOutcome]] = {
    "tile": _run_tile,
    "extract": _run_extract,
    "train": _run_train,
    "predict": _run_predict,
    "heatmap": _run_heatmap,
}


def run_pipeline(config: PipelineConfig, stop_on_failure: bool = True) -> list[StageOutcome]:
    """Run the configured stages in order; each stage skips the slides it already finished.

    A stage in which some slides failed stops the pipeline when `stop_on_failure` is set,
    because later stages would silently work on fewer slides.
    """
    sections = stage_sections(config)
    outcomes: list[StageOutcome] = []
    for stage in STAGES:
        if stage not in config.stages:
            continue
        logger.info("stage %s: starting", stage)
        outcome = RUNNERS[stage](sections[stage])
        outcomes.append(outcome)
        logger.info("stage %s: done, outputs in %s", stage, outcome.output)
        if outcome.failed and stop_on_failure:
            logger.error(
                "stage %s: %d slide(s) failed; see %s/manifest.csv. Fix them or set "
                "skip_errors to continue without them.", stage, outcome.failed, outcome.output
            )
            break
    return outcomes
