"""`slidemil run`: config validation before any work, stage selection, reuse of predictions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from cli import pipeline
from cli.main import app
from cli.pipeline import PipelineConfig, load_pipeline_config, run_pipeline
from preprocessing.errors import ConfigError


class FakeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_dir: Path | None = None
    run_dir: Path | None = None
    features_dir: Path | None = None
    coords_dir: Path | None = None
    attention_dir: Path | None = None
    slides: str | None = None
    labels: str = __file__
    model: str = "abmil"
    backbone: str = "efficientnet_lite0"


@dataclass
class FakeResult:
    n_failed: int
    predictions_path: Path


def fake_api(calls: list[str], failing: set[str]) -> dict[str, Any]:
    def runner(stage: str) -> Any:
        def run(config: FakeConfig) -> FakeResult:
            calls.append(stage)
            output = Path(config.output_dir or config.run_dir or ".")
            return FakeResult(int(stage in failing), output / "predictions.csv")

        return run

    return {stage: (FakeConfig, runner(stage)) for stage in pipeline.STAGES}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    recorded: list[str] = []
    monkeypatch.setattr(pipeline, "_stage_api", lambda: fake_api(recorded, set()))
    return recorded


def write_config(tmp_path: Path, **sections: Any) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **sections}))
    return path


def test_typo_reported_before_any_stage(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        tile={"slides": "x", "target_mp": 2},
        train={"labels": "l.csv", "epochz": 3, "packing": {"pack_lenn": 64}},
    )
    result = CliRunner().invoke(app, ["run", str(path)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "tile.target_mp" in output
    assert "train.epochz" in output
    assert "train.packing.pack_lenn" in output
    assert not (tmp_path / "out").exists()


def test_unknown_stage_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match="extrct"):
        load_pipeline_config(path, ["tile", "extrct"])


def test_empty_stage_list_rejected(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path)), "--stages", ""])
    assert result.exit_code == 1
    assert "no stage selected" in " ".join(result.output.split())


def test_stages_run_in_pipeline_order(tmp_path: Path, calls: list[str]) -> None:
    config = PipelineConfig(output_dir=tmp_path, stages=["heatmap", "tile"])
    run_pipeline(config)
    assert calls == ["tile", "heatmap"]


def test_failed_stage_stops_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded: list[str] = []
    monkeypatch.setattr(pipeline, "_stage_api", lambda: fake_api(recorded, {"extract"}))
    outcomes = run_pipeline(PipelineConfig(output_dir=tmp_path))
    assert recorded == ["tile", "extract"]
    assert outcomes[-1].failed == 1
    recorded.clear()
    run_pipeline(PipelineConfig(output_dir=tmp_path, stop_on_failure=False))
    assert recorded == list(pipeline.STAGES)


def test_predict_reused_until_inputs_change(tmp_path: Path, calls: list[str]) -> None:
    config = PipelineConfig(output_dir=tmp_path, stages=["predict"])
    folders = pipeline.stage_folders(config)
    checkpoint = folders["run_dir"] / "fixed" / "seed_0" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    folders["features"].mkdir(parents=True)
    (folders["features"] / "a.h5").write_bytes(b"features")

    run_pipeline(config)
    run_pipeline(config)
    assert calls == ["predict"]

    (folders["features"] / "b.h5").write_bytes(b"new slide")
    run_pipeline(config)
    assert calls == ["predict", "predict"]


def test_output_dir_that_is_a_file_rejected(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(afile)}))
    with pytest.raises(ConfigError, match="is a file"):
        load_pipeline_config(path)


def test_top_level_keys_listed_plainly(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": [1, 2], "run_name": 5, "toplevel_typo": 1}))
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path)
    message = str(info.value)
    assert "toplevel_typo: Extra inputs are not permitted" in message
    assert "run_name:" in message
    assert "errors.pydantic.dev" not in message


def test_missing_labels_and_model_found_up_front(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, tile={"slides": "x"},
        train={"labels": str(tmp_path / "missing.csv"), "model": "abmill"},
    )
    result = CliRunner().invoke(app, ["run", str(path)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "train.labels: label file" in output
    assert "train.model:" in output
    assert not (tmp_path / "out").exists()


def test_empty_stage_name_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="empty stage name"):
        load_pipeline_config(write_config(tmp_path), ["tile", "", "extract"])
