"""Prediction from a trained run: whole bags, eval mode, ensembles, attention stores."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mil.batch import PackedBatch
from mil.checkpoint import load_checkpoint
from mil.kernels.segments import Segments
from mil.predict import PredictConfig, run_prediction
from mil.train import TrainConfig, run_training
from preprocessing.errors import CheckpointError, ConfigError
from preprocessing.stores import open_feature_store, read_attention_store

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_fixtures import write_labels, write_slides  # noqa: E402


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    labels = write_slides(root / "features", n_slides=10, max_tiles=60)
    write_labels(root / "labels.csv", labels)
    run_training(TrainConfig(
        features_dir=root / "features", run_dir=root / "run", labels=root / "labels.csv",
        folds=2, epochs=3, lr=1e-3, n_bootstrap=10, progress=False,
        # A pack shorter than the longest slide checks that long bags are never cut.
        packing={"pack_len": 48},
    ))
    return root


def _predictions(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["slide_id"]: row for row in csv.DictReader(handle)}


def _predict(root: Path, out: str, **fields: object) -> dict[str, dict[str, str]]:
    cfg = PredictConfig(run_dir=root / "run", features_dir=root / "features",
                        output_dir=root / out, progress=False, **fields)
    result = run_prediction(cfg)
    assert result.n_failed == 0
    return _predictions(result.predictions_path)


def test_predictions_and_attention_written(trained_run: Path) -> None:
    rows = _predict(trained_run, "ensemble", labels=trained_run / "labels.csv", n_bootstrap=10)
    out = trained_run / "ensemble"

    assert len(rows) == 10
    row = rows["slide-01"]
    assert row["n_models"] == "2"
    assert float(row["prob_normal"]) + float(row["prob_tumor"]) == pytest.approx(1.0, abs=1e-5)
    assert row["label"] == "tumor"
    metrics = json.loads((out / "prediction_metrics.json").read_text())
    assert metrics["n_slides"] == 10

    for slide_id in rows:
        store = read_attention_store(out / "attention" / f"{slide_id}.h5")
        with open_feature_store(trained_run / "features" / f"{slide_id}.h5") as features:
            np.testing.assert_array_equal(store.coords, features.coords)
        assert store.attention.shape == (features.n_tiles,)
        assert store.attention.sum() == pytest.approx(1.0, abs=1e-4)
        attrs = store.attrs
        assert attrs["slide_id"] == slide_id
        assert attrs["slide_path"] == f"/slides/{slide_id}.svs"
        assert attrs["tile_px_level0"] == pytest.approx(256.0)
        assert (attrs["level0_width"], attrs["level0_height"]) == (4096, 2048)
        assert attrs["predicted_class"] == rows[slide_id]["predicted_class"]
        assert attrs["probability"] == pytest.approx(float(rows[slide_id]["probability"]),
                                                     rel=1e-4)
        assert json.loads(attrs["classes"]) == ["normal", "tumor"]
        assert attrs["model"] == "abmil"


def test_single_model_equals_unpacked_forward(trained_run: Path) -> None:
    rows = _predict(trained_run, "fold0", folds=["fold_0"], ensemble=False)
    checkpoint = load_checkpoint(trained_run / "run" / "fold_0" / "seed_0" / "checkpoint.pt")
    model = checkpoint.build_model()

    for slide_id, row in rows.items():
        with open_feature_store(trained_run / "features" / f"{slide_id}.h5") as store:
            features = torch.from_numpy(store.read_features().astype(np.float32))
        batch = PackedBatch(features=features, segments=Segments.from_lengths([len(features)]))
        with torch.no_grad():
            output = model(batch)
        probs = torch.softmax(output.logits, -1)[0]
        assert float(row["prob_tumor"]) == pytest.approx(float(probs[1]), abs=1e-5)
        attention = read_attention_store(trained_run / "fold0" / "attention" / f"{slide_id}.h5")
        np.testing.assert_allclose(attention.attention, output.attention.numpy(), atol=1e-6)


def test_ensemble_averages_members(trained_run: Path) -> None:
    both = _predict(trained_run, "both")
    first = _predict(trained_run, "f0", folds=["fold_0"])
    second = _predict(trained_run, "f1", folds=["fold_1"])
    for slide_id, row in both.items():
        mean = (float(first[slide_id]["prob_tumor"]) + float(second[slide_id]["prob_tumor"])) / 2
        assert float(row["prob_tumor"]) == pytest.approx(mean, abs=1e-5)
        att = [read_attention_store(trained_run / name / "attention" / f"{slide_id}.h5").attention
               for name in ("both", "f0", "f1")]
        np.testing.assert_allclose(att[0], (att[1] + att[2]) / 2, atol=1e-6)


def test_prediction_is_repeatable(trained_run: Path) -> None:
    first = _predict(trained_run, "again_a", write_attention=False)
    second = _predict(trained_run, "again_b", write_attention=False)
    assert first == second
    assert not (trained_run / "again_a" / "attention").exists()


def test_ensemble_off_with_several_models_rejected(trained_run: Path) -> None:
    with pytest.raises(ConfigError, match="ensemble is off but 2 models match"):
        _predict(trained_run, "x", ensemble=False)


def test_unknown_fold_rejected(trained_run: Path) -> None:
    with pytest.raises(CheckpointError, match="available: fold_0/seed_0, fold_1/seed_0"):
        _predict(trained_run, "x", folds=["fold_7"])


def test_features_of_other_dim_rejected(trained_run: Path, tmp_path: Path) -> None:
    write_slides(tmp_path / "wide", n_slides=2, dim=12)
    cfg = PredictConfig(run_dir=trained_run / "run", features_dir=tmp_path / "wide",
                        output_dir=tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="8-dim tile features but the features have 12"):
        run_prediction(cfg)


def test_missing_slide_rejected(trained_run: Path) -> None:
    with pytest.raises(ConfigError, match="no feature store"):
        _predict(trained_run, "x", slides=["slide-99"])


def test_metrics_flag_slides_used_in_training(trained_run: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    from mil.data.splits import read_split

    split = read_split(trained_run / "run" / "splits" / "fold_0.csv")
    with caplog.at_level("WARNING", logger="mil.predict"):
        _predict(trained_run, "seen", folds=["fold_0"], labels=trained_run / "labels.csv",
                 n_bootstrap=5)
    metrics = json.loads((trained_run / "seen" / "prediction_metrics.json").read_text())

    assert metrics["in_training"] == sorted(split.train)
    assert metrics["in_validation"] == sorted(split.val)
    assert f"{len(split.train)} of 10 predicted slide(s) were in the training part" in caplog.text

    caplog.clear()
    with caplog.at_level("WARNING", logger="mil.predict"):
        _predict(trained_run, "held_out", folds=["fold_0"], slides=sorted(split.val),
                 labels=trained_run / "labels.csv", n_bootstrap=5)
    held_out = json.loads((trained_run / "held_out" / "prediction_metrics.json").read_text())
    assert held_out["in_training"] == []
    assert "training part" not in caplog.text


def test_cli_predict_one_fold(trained_run: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    out = trained_run / "cli"
    result = CliRunner().invoke(app, [
        "predict", "--run-dir", str(trained_run / "run"), "--features-dir",
        str(trained_run / "features"), "-o", str(out), "--fold", "fold_1", "--no-ensemble",
        "--slide", "slide-03", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    rows = _predictions(out / "predictions.csv")
    assert list(rows) == ["slide-03"]
    assert rows["slide-03"]["n_models"] == "1"
    assert (out / "attention" / "slide-03.h5").is_file()


@pytest.mark.parametrize("device", ["gpu7", "cuda:x"])
def test_cli_predict_invalid_device_one_line(trained_run: Path, device: str) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    out = trained_run / f"device_{device.replace(':', '_')}"
    result = CliRunner().invoke(app, [
        "predict", "--run-dir", str(trained_run / "run"), "--features-dir",
        str(trained_run / "features"), "-o", str(out), "--device", device, "--no-progress",
    ])
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert f"Invalid device '{device}'; use auto, cpu, cuda or cuda:<index>." in output
    assert "Traceback" not in output
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_predict_cuda_without_cuda_rejected(trained_run: Path) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available on this machine; use "
                                          "--device cpu"):
        _predict(trained_run, "no_cuda", device="cuda")


def test_run_without_models_says_train_first(trained_run: Path, tmp_path: Path) -> None:
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    with pytest.raises(CheckpointError) as caught:
        run_prediction(PredictConfig(run_dir=empty_run, features_dir=trained_run / "features",
                                     progress=False))
    message = str(caught.value)
    assert f"no trained model found in {empty_run}" in message
    assert "run `slidemil train` with this --run-dir first" in message
    assert "None" not in message


def test_unmatched_fold_lists_available(trained_run: Path) -> None:
    with pytest.raises(CheckpointError, match=r"matches --fold fold_9 --seed any \(available: "
                                              r"fold_0/seed_0, fold_1/seed_0\)"):
        _predict(trained_run, "fold_9", folds=["fold_9"])


def test_empty_class_map_named(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    (run / "classes.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"class map {run / 'classes.json'} lists no classes"):
        run_prediction(PredictConfig(run_dir=run, features_dir=trained_run / "features",
                                     output_dir=tmp_path / "out", progress=False))


def test_cli_predict_rejects_bad_selection(trained_run: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, [
        "predict", "--run-dir", str(trained_run / "run"), "--features-dir",
        str(trained_run / "features"), "-o", str(trained_run / "bad"), "--no-ensemble",
        "--no-progress",
    ])
    assert result.exit_code == 1
    assert "ensemble is off" in " ".join(result.output.split())


def test_one_slide_merges_into_predictions(trained_run: Path) -> None:
    everything = _predict(trained_run, "merge", folds=["fold_0"])
    again = _predict(trained_run, "merge", slides=["slide-03"], folds=["fold_0"],
                     labels=trained_run / "labels.csv", n_bootstrap=5)

    assert sorted(again) == sorted(everything)
    assert again["slide-03"]["n_models"] == "1"
    for slide_id, row in everything.items():
        if slide_id != "slide-03":
            assert again[slide_id] == {**row, "label": again[slide_id]["label"]}
    assert list(again) == sorted(again)
    # The label CSV fills the label of the rows kept from the first prediction too.
    assert again["slide-00"]["label"] == "normal"
    assert again["slide-01"]["label"] == "tumor"
    sidecar = json.loads((trained_run / "merge" / "predictions.json").read_text())
    assert sidecar["members"] == ["fold_0/seed_0"]
    assert sidecar["run_dir"] == str((trained_run / "run").resolve())


def test_other_models_into_same_output_rejected(trained_run: Path) -> None:
    _predict(trained_run, "mixed", slides=["slide-00"], folds=["fold_0"])
    with pytest.raises(ConfigError, match="differs in: members") as caught:
        _predict(trained_run, "mixed", slides=["slide-01"], folds=["fold_1"])
    message = str(caught.value)
    assert "fold_0/seed_0" in message
    assert "fold_1/seed_0" in message
    assert "--output-dir (-o)" in message
    with pytest.raises(ConfigError, match="differs in: checkpoint"):
        _predict(trained_run, "mixed", slides=["slide-01"], folds=["fold_0"], checkpoint="last")
    assert list(_predictions(trained_run / "mixed" / "predictions.csv")) == ["slide-00"]


def test_second_cohort_keeps_first(trained_run: Path, tmp_path: Path) -> None:
    first = tmp_path / "cohort_a"
    second = tmp_path / "cohort_b"
    first.mkdir()
    second.mkdir()
    for index, slide_id in enumerate(f"slide-{i:02d}" for i in range(4)):
        target = first if index < 2 else second
        (target / f"{slide_id}.h5").symlink_to(trained_run / "features" / f"{slide_id}.h5")
    out = tmp_path / "out"
    for features in (first, second):
        run_prediction(PredictConfig(run_dir=trained_run / "run", features_dir=features,
                                     output_dir=out, progress=False,
                                     labels=trained_run / "labels.csv", n_bootstrap=5))

    rows = _predictions(out / "predictions.csv")
    assert list(rows) == ["slide-00", "slide-01", "slide-02", "slide-03"]
    assert rows["slide-00"]["label"] == "normal"
    assert rows["slide-03"]["label"] == "tumor"


def test_predictions_of_other_classes_rejected(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("slide_id,predicted_class,prob_a,prob_b\nx,a,0.6,0.4\n")
    with pytest.raises(ConfigError, match="another --output-dir"):
        run_prediction(PredictConfig(run_dir=trained_run / "run",
                                     features_dir=trained_run / "features", output_dir=out,
                                     slides=["slide-00"], progress=False))
    assert not (out / "attention").exists()


def _run_with_model(trained_run: Path, target: Path, model_name: str,
                    config_model: str | None = None, n_swapped: int = 2) -> Path:
    """Copy the trained run, replacing `n_swapped` checkpoints by untrained `model_name` ones."""
    import shutil

    import yaml

    from mil.checkpoint import save_checkpoint
    from mil.models import create_model

    run = target / "run"
    shutil.copytree(trained_run / "run", run)
    for path in sorted(run.glob("*/seed_*/checkpoint.pt"))[:n_swapped]:
        torch.manual_seed(0)
        save_checkpoint(path, create_model(model_name, in_dim=8, n_classes=2),
                        model_name=model_name, model_config={}, in_dim=8,
                        classes=["normal", "tumor"])
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"] = config_model or model_name
    config["model_options"] = {}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_checkpoint_of_other_model_rejected(trained_run: Path, tmp_path: Path) -> None:
    run = _run_with_model(trained_run, tmp_path, "acmil", config_model="abmil", n_swapped=1)
    cfg = PredictConfig(run_dir=run, features_dir=trained_run / "features",
                        output_dir=tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError) as caught:
        run_prediction(cfg)
    message = str(caught.value)
    assert "fold_0/seed_0/checkpoint.pt" in message
    assert "'acmil'" in message
    assert "'abmil'" in message
    assert "set the model" not in message


def test_checkpoint_of_other_classes_rejected(trained_run: Path, tmp_path: Path) -> None:
    run = _run_with_model(trained_run, tmp_path, "abmil", n_swapped=0)
    (run / "classes.json").write_text(json.dumps({"tumor": 0, "normal": 1}))
    cfg = PredictConfig(run_dir=run, features_dir=trained_run / "features",
                        output_dir=tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="checkpoint was trained with classes"):
        run_prediction(cfg)


@pytest.mark.parametrize(("model_name", "names", "per_class"), [
    ("dsmil", ["normal", "tumor"], True),
    ("acmil", None, False),
])
def test_attention_columns_named(trained_run: Path, tmp_path: Path, model_name: str,
                                 names: list[str] | None, per_class: bool) -> None:
    from mil.heatmap.maps import head_names

    run = _run_with_model(trained_run, tmp_path, model_name)
    run_prediction(PredictConfig(run_dir=run, features_dir=trained_run / "features",
                                 output_dir=tmp_path / "out", slides=["slide-01"],
                                 progress=False))
    store = read_attention_store(tmp_path / "out" / "attention" / "slide-01.h5")
    n_columns = store.attention.shape[1]
    stored = json.loads(store.attrs["head_names"])
    assert len(stored) == n_columns
    if names is not None:
        assert stored == names
    else:
        assert stored[0] == "branch 1"
    assert bool(store.attrs["attention_per_class"]) is per_class
    titles, titled_per_class = head_names(store.attrs, n_columns)
    assert titled_per_class is per_class
    assert titles[-1].endswith(stored[-1])
