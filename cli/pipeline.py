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

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from preprocessing.errors import ConfigError

logger = logging.getLogger(__name__)

STAGES = ("tile", "extract", "train", "predict", "heatmap")


class PipelineConfig(BaseModel):
    """Top level of a pipeline YAML file; stage sections are validated by each stage."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path
    run_name: str = "run"
    stages: list[str] = Field(default_factory=lambda: list(STAGES))
    stop_on_failure: bool = True
    tile: dict[str, Any] = Field(default_factory=dict)
    extract: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    predict: dict[str, Any] = Field(default_factory=dict)
    heatmap: dict[str, Any] = Field(default_factory=dict)


@dataclass
class StageOutcome:
    """Result of one pipeline stage: its output folder, failed slides and summary."""

    stage: str
    output: Path
    failed: int
    detail: str


def load_pipeline_config(path: Path, stages: list[str] | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML file; `stages` replaces the file's `stages` list."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read pipeline config ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline config must be a mapping with an output_dir key")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            f"{path}: invalid pipeline config:\n  " + "\n  ".join(_problems("", err))
        ) from err
    if config.output_dir.exists() and not config.output_dir.is_dir():
        raise ConfigError(
            f"{path}: output_dir {config.output_dir} is a file; point it at a folder"
        )
    if stages is not None:
        if any(not stage for stage in stages):
            raise ConfigError(f"{path}: empty stage name in {stages}; separate stages by one comma")
        config.stages = stages
    if not config.stages:
        raise ConfigError(f"{path}: no stage selected; stages are {', '.join(STAGES)}")
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
    """Return each stage's config fields with the connecting folders filled in."""
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


def _stage_api() -> dict[str, tuple[type[BaseModel], Callable[[Any], Any]]]:
    """Config class and entry function of each stage, imported only when a pipeline runs."""
    from mil.heatmap import HeatmapConfig, run_heatmaps
    from mil.predict import PredictConfig, run_prediction
    from mil.train import TrainConfig, run_training
    from preprocessing.extract import ExtractConfig, run_extraction
    from preprocessing.tiling import TilingConfig, run_tiling

    return {
        "tile": (TilingConfig, run_tiling),
        "extract": (ExtractConfig, run_extraction),
        "train": (TrainConfig, run_training),
        "predict": (PredictConfig, run_prediction),
        "heatmap": (HeatmapConfig, run_heatmaps),
    }


def build_stage_configs(config: PipelineConfig, source: Path | str = "pipeline config"
                        ) -> dict[str, BaseModel]:
    """Validate the sections of the selected stages before any stage runs.

    A section that the YAML spells out is validated even when its stage is not selected, so
    a typo in `train` is reported before hours of tiling, not after.

    Raises:
        ConfigError: listing every invalid key as `section.key: problem`.
    """
    sections = stage_sections(config)
    api = _stage_api()
    built: dict[str, BaseModel] = {}
    problems: list[str] = []
    for stage in STAGES:
        if stage not in config.stages and not getattr(config, stage):
            continue
        config_class, _ = api[stage]
        try:
            built[stage] = config_class(**sections[stage])
        except ValidationError as err:
            problems.extend(_problems(stage, err))
    if "train" in built and "train" in config.stages:
        problems.extend(_train_input_problems(built["train"]))
    if problems:
        raise ConfigError(
            f"{source}: invalid settings:\n  " + "\n  ".join(problems)
            + "\nFix these keys; `slidemil STAGE --help` lists the options of each stage "
            "(YAML keys are the option names with '_' for '-')."
        )
    return built


def _problems(section: str, err: ValidationError) -> list[str]:
    """One `section.key: problem` line per validation error."""
    lines = []
    for error in err.errors():
        key = ".".join(str(part) for part in (section, *error["loc"]) if part != "")
        lines.append(f"{key or 'top level'}: {error['msg']}")
    return lines


def _train_input_problems(train_config: Any) -> list[str]:
    """Check the train inputs that exist before the pipeline starts: labels file and model."""
    from mil.models.presets import load_model_preset

    problems = []
    if not Path(train_config.labels).is_file():
        problems.append(f"train.labels: label file {train_config.labels} not found")
    try:
        load_model_preset(train_config.model)
    except ConfigError as err:
        problems.append(f"train.model: {err}")
    return problems


def _output_folder(stage: str, stage_config: Any, result: Any) -> Path:
    if stage == "extract":
        from preprocessing.extract import backbone_output_dir

        return backbone_output_dir(stage_config)
    if stage == "train":
        return Path(stage_config.run_dir)
    if stage == "predict":
        return Path(result.predictions_path).parent
    return Path(stage_config.output_dir)


def _predict_inputs_stamp(stage_config: Any) -> dict[str, Any]:
    """Return the settings of a prediction and the files it reads, with their mtimes."""
    run_dir = Path(stage_config.run_dir)
    features_dir = Path(stage_config.features_dir)
    files = sorted(run_dir.rglob("checkpoint*.pt")) + sorted(features_dir.glob("*.h5")) + sorted(
        features_dir.glob("*.zarr")
    )
    return {
        "config": json.loads(stage_config.model_dump_json()),
        "inputs": {str(path): path.stat().st_mtime_ns for path in files},
    }


def _predict_stamp_path(stage_config: Any) -> Path:
    output_dir = Path(stage_config.output_dir or stage_config.run_dir)
    return output_dir / ".pipeline-predict.json"


def _predictions_current(stage_config: Any) -> bool:
    """True when predict already ran with these settings on these checkpoints and features."""
    stamp_path = _predict_stamp_path(stage_config)
    if not stamp_path.is_file():
        return False
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        return False
    return bool(stamp == _predict_inputs_stamp(stage_config))


def run_pipeline(
    config: PipelineConfig, source: Path | str = "pipeline config"
) -> list[StageOutcome]:
    """Run the selected stages in order; each stage skips the slides it already finished.

    Prediction is skipped as a whole when its settings, checkpoints and feature stores are
    unchanged since the last run. A stage in which some slides failed stops the pipeline unless
    the config sets `stop_on_failure: false`, because later stages would silently work on
    fewer slides.
    """
    stage_configs = build_stage_configs(config, source)
    api = _stage_api()
    outcomes: list[StageOutcome] = []
    for stage in STAGES:
        if stage not in config.stages:
            continue
        stage_config = stage_configs[stage]
        if stage == "predict" and _predictions_current(stage_config):
            output = Path(stage_config.output_dir or stage_config.run_dir)  # type: ignore[attr-defined]
            logger.info("stage predict: reused, predictions in %s are up to date", output)
            outcomes.append(StageOutcome(stage, output, 0, "reused"))
            continue
        logger.info("stage %s: starting", stage)
        result = api[stage][1](stage_config)
        outcome = StageOutcome(
            stage, _output_folder(stage, stage_config, result),
            int(getattr(result, "n_failed", 0)), str(result),
        )
        outcomes.append(outcome)
        if stage == "predict" and not outcome.failed:
            stamp_path = _predict_stamp_path(stage_config)
            stamp_path.parent.mkdir(parents=True, exist_ok=True)
            stamp_path.write_text(json.dumps(_predict_inputs_stamp(stage_config), indent=1))
        logger.info("stage %s: done (%s), outputs in %s", stage, outcome.detail, outcome.output)
        if outcome.failed and config.stop_on_failure:
            logger.error(
                "stage %s: %d slide(s) failed; see %s/manifest.csv. Fix or remove them and run "
                "again, or set stop_on_failure: false in the pipeline YAML to go on without "
                "them.", stage, outcome.failed, outcome.output
            )
            break
    return outcomes
