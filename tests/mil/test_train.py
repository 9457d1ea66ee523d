"""Training runs on synthetic feature stores: run directory, reproducibility, splits, losses."""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mil.batch import PackedBatch
from mil.checkpoint import load_checkpoint
from mil.engine import per_bag_loss, train_epoch
from mil.kernels.segments import Segments
from mil.models import create_model
from mil.optim import EarlyStopping, build_optimizer, warmup_cosine_factor
from mil.train import TrainConfig, class_weights, load_train_config, run_training
from preprocessing.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_fixtures import write_labels, write_slides  # noqa: E402


def _config(tmp_path: Path, **fields: Any) -> TrainConfig:
    features = tmp_path / "features"
    if not features.exists():
        labels = write_slides(features, n_slides=12)
        write_labels(tmp_path / "labels.csv", labels)
    defaults: dict[str, Any] = {
        "features_dir": features, "run_dir": tmp_path / "run", "labels": tmp_path / "labels.csv",
        "folds": 2, "epochs": 3, "lr": 1e-3, "n_bootstrap": 20, "progress": False,
        "packing": {"pack_len": 96},
    }
    return TrainConfig(**{**defaults, **fields})


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_kfold_run_writes_run_directory(tmp_path: Path) -> None:
    result = run_training(_config(tmp_path, n_seeds=2))
    run = tmp_path / "run"

    assert len(result.members) == 4
    for name in ("config.yaml", "classes.json", "labels_join.json", "metrics.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "splits").iterdir()) == ["fold_0.csv", "fold_1.csv"]
    assert json.loads((run / "classes.json").read_text()) == {"normal": 0, "tumor": 1}
    for fold in ("fold_0", "fold_1"):
        for seed in ("seed_0", "seed_1"):
            member = run / fold / seed
            for name in ("checkpoint.pt", "checkpoint_last.pt", "log.csv", "metrics.json",
                         "predictions_val.csv"):
                assert (member / name).is_file(), f"{fold}/{seed}/{name}"
            log = _read_csv(member / "log.csv")
            assert [row["epoch"] for row in log] == ["1", "2", "3"]
            assert "val_auroc" in log[0]

    summary = json.loads((run / "metrics.json").read_text())
    assert summary["n_models"] == 4
    assert summary["val"]["metrics"]["auroc"]["n"] == 4
    assert {"mean", "std", "sem", "n"} <= set(summary["val"]["metrics"]["accuracy"])


def test_checkpoint_keeps_class_map_and_threshold(tmp_path: Path) -> None:
    run_training(_config(tmp_path, folds=2, threshold="youden"))
    checkpoint = load_checkpoint(tmp_path / "run" / "fold_0" / "seed_0" / "checkpoint.pt",
                                 expected_model="abmil", expected_classes=["normal", "tumor"])
    member = json.loads((tmp_path / "run" / "fold_0" / "seed_0" / "metrics.json").read_text())

    assert checkpoint.threshold == pytest.approx(member["threshold"])
    assert checkpoint.model_config == {
        "embed_dim": 256, "attention_dim": 128, "dropout": 0.25, "gated": True
    }
    assert 1 <= checkpoint.epoch <= 3
    rows = _read_csv(tmp_path / "run" / "fold_0" / "seed_0" / "predictions_val.csv")
    assert set(rows[0]) == {"slide_id", "label", "predicted_class", "probability",
                            "prob_normal", "prob_tumor"}


def test_same_seed_gives_identical_metrics(tmp_path: Path) -> None:
    first = run_training(_config(tmp_path, run_dir=tmp_path / "a", folds=2))
    second = run_training(_config(tmp_path, run_dir=tmp_path / "b", folds=2))

    for one, two in zip(first.members, second.members, strict=True):
        assert one.val["metrics"] == two.val["metrics"]
        assert one.val["loss"] == two.val["loss"]
    for fold in ("fold_0", "fold_1"):
        log_a = _read_csv(tmp_path / "a" / fold / "seed_0" / "log.csv")
        log_b = _read_csv(tmp_path / "b" / fold / "seed_0" / "log.csv")
        assert [r["train_loss"] for r in log_a] == [r["train_loss"] for r in log_b]


def test_other_seed_changes_training(tmp_path: Path) -> None:
    run_training(_config(tmp_path, run_dir=tmp_path / "a", folds=2, seed=0))
    run_training(_config(tmp_path, run_dir=tmp_path / "b", folds=2, seed=5))
    log_a = _read_csv(tmp_path / "a" / "fold_0" / "seed_0" / "log.csv")
    log_b = _read_csv(tmp_path / "b" / "fold_0" / "seed_5" / "log.csv")
    assert [r["train_loss"] for r in log_a] != [r["train_loss"] for r in log_b]


def test_split_column_without_validation_trains(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labels = write_slides(tmp_path / "features", n_slides=4)
    write_labels(tmp_path / "labels.csv", labels, splits=dict.fromkeys(labels, "train"))
    with caplog.at_level(logging.WARNING, logger="mil.train_loop"):
        result = run_training(_config(tmp_path, epochs=2, patience=1))

    member = tmp_path / "run" / "fixed" / "seed_0"
    assert "no validation slides, so no early stopping" in caplog.text
    assert result.members[0].epochs_run == 2
    assert result.members[0].best_epoch == 2
    assert load_checkpoint(member / "checkpoint.pt").epoch == 2
    assert not result.members[0].val


def test_split_column_with_test_reports_ci(tmp_path: Path) -> None:
    labels = write_slides(tmp_path / "features", n_slides=12)
    parts = ["train"] * 6 + ["val"] * 2 + ["test"] * 4
    write_labels(tmp_path / "labels.csv", labels, splits=dict(zip(labels, parts, strict=True)))
    result = run_training(_config(tmp_path))

    report = result.members[0].test
    assert report["n_slides"] == 4
    low, high = report["ci95"]["accuracy"]
    assert low <= report["metrics"]["accuracy"] <= high
    assert (tmp_path / "run" / "fixed" / "seed_0" / "predictions_test.csv").is_file()


def test_early_stopping_without_improvement(tmp_path: Path) -> None:
    # A learning rate of 0 keeps the validation loss fixed, so only epoch 1 counts as best.
    result = run_training(_config(tmp_path, lr=1e-30, warmup_epochs=0, epochs=10, patience=2,
                                  folds=2))
    assert [m.epochs_run for m in result.members] == [3, 3]
    assert [m.best_epoch for m in result.members] == [1, 1]


def test_finished_run_is_reused(tmp_path: Path) -> None:
    run_training(_config(tmp_path))
    again = run_training(_config(tmp_path, progress=True))
    assert again.reused
    assert len(again.members) == 2


def test_other_config_in_run_dir_rejected(tmp_path: Path) -> None:
    run_training(_config(tmp_path))
    with pytest.raises(ConfigError, match="differs in: lr"):
        run_training(_config(tmp_path, lr=5e-4))
    replaced = run_training(_config(tmp_path, lr=5e-4, overwrite=True))
    assert not replaced.reused
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 5e-4


def test_changed_labels_or_features_rejected(tmp_path: Path) -> None:
    run_training(_config(tmp_path))
    labels = tmp_path / "labels.csv"
    original = labels.read_text()
    labels.write_text(original.replace("slide-00,normal", "slide-00,tumor"))
    with pytest.raises(ConfigError, match="changed: the content of .*labels.csv") as caught:
        run_training(_config(tmp_path))
    assert "--overwrite" in str(caught.value)
    assert "--run-dir" in str(caught.value)

    labels.write_text(original)
    write_slides(tmp_path / "features", n_slides=12, seed=1)
    with pytest.raises(ConfigError, match="feature stores modified in .*slide-00"):
        run_training(_config(tmp_path))

    replaced = run_training(_config(tmp_path, overwrite=True))
    assert not replaced.reused
    assert run_training(_config(tmp_path)).reused


def test_mixed_dimensions_write_nothing(tmp_path: Path) -> None:
    from preprocessing.errors import StoreFormatError

    _config(tmp_path)
    write_slides(tmp_path / "features", n_slides=2, dim=16)
    with pytest.raises(StoreFormatError, match="different dimensions"):
        run_training(_config(tmp_path))
    assert not (tmp_path / "run").exists()

    write_slides(tmp_path / "features", n_slides=2)
    assert not run_training(_config(tmp_path)).reused


def test_run_without_checkpoint_replaced(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    run_training(_config(tmp_path))
    for path in (tmp_path / "run").glob("*/seed_*/checkpoint*.pt"):
        path.unlink()
    (tmp_path / "run" / "metrics.json").unlink()
    with caplog.at_level(logging.WARNING, logger="mil.train_loop"):
        result = run_training(_config(tmp_path, lr=5e-4))
    assert not result.reused
    assert "stopped before its first checkpoint; replacing it" in caplog.text
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 5e-4


def test_balanced_sampler_and_acmil_aux_losses(tmp_path: Path) -> None:
    result = run_training(_config(tmp_path, model="acmil", balance="sampler", epochs=2))
    log = _read_csv(tmp_path / "run" / "fold_0" / "seed_0" / "log.csv")
    assert result.members[0].checkpoint.is_file()
    assert all(float(row["aux_loss"]) > 0 for row in log)


def test_unknown_model_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown model 'abmill'"):
        run_training(_config(tmp_path, model="abmill"))


def test_unknown_monitor_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="monitor must be"):
        _config(tmp_path, monitor="precision")


def test_load_config_from_pipeline_yaml(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": "out",
        "train": {"features_dir": "f", "run_dir": "r", "labels": "l.csv", "epochs": 7,
                  "packing": {"pack_len": 512, "main_fraction": 0.5}},
    }))
    cfg = load_train_config(path, {"epochs": 2, "packing": {"pack_len": 256}})
    assert cfg.epochs == 2
    assert cfg.packing.pack_len == 256
    assert cfg.packing.main_fraction == 0.5


def _pack(lengths: list[int], labels: torch.Tensor, residual: list[bool]) -> PackedBatch:
    generator = torch.Generator().manual_seed(0)
    total = sum(lengths) + 3
    features = torch.zeros(total, 4)
    features[: sum(lengths)] = torch.randn(sum(lengths), 4, generator=generator)
    return PackedBatch(features=features, segments=Segments.from_lengths(lengths, total=total),
                       labels=labels, bag_ids=[str(i) for i in range(len(lengths))],
                       is_residual=torch.tensor(residual))


def test_residual_bags_weighted_in_loss() -> None:
    torch.manual_seed(0)
    model = create_model("mean", in_dim=4, n_classes=2, dropout=0.0)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    pack = _pack([3, 4, 5], labels, [False, False, True])
    weights = torch.tensor([1.0, 3.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    stats = train_epoch(model, [pack], optimizer, device=torch.device("cpu"),
                        class_weights=weights, residual_weight=0.25)
    with torch.no_grad():
        logits = model(pack).logits
    losses = per_bag_loss(logits, labels, weights)
    expected = (losses[0] + losses[1]) / 2 + 0.25 * losses[2]
    assert stats.loss == pytest.approx(float(expected), rel=1e-6)
    plain = torch.nn.functional.cross_entropy(logits[1:2], torch.tensor([1]))
    assert float(losses[1]) == pytest.approx(3.0 * float(plain), rel=1e-5)


def test_soft_label_loss_weights_classes_by_mix() -> None:
    logits = torch.tensor([[0.2, -0.1]])
    soft = torch.tensor([[0.25, 0.75]])
    weights = torch.tensor([2.0, 4.0])
    expected = -(soft * torch.log_softmax(logits, -1)).sum() * (0.25 * 2.0 + 0.75 * 4.0)
    assert float(per_bag_loss(logits, soft, weights)[0]) == pytest.approx(float(expected))


def test_accumulated_packs_match_one_pack() -> None:
    labels = torch.tensor([0, 1, 1, 0])
    joined = _pack([3, 4, 2, 5], labels, [False] * 4)
    first = _pack([3, 4], labels[:2], [False, False])
    second = _pack([2, 5], labels[2:], [False, False])
    second.features[:7] = joined.features[7:14]
    first.features[:7] = joined.features[:7]

    def trained(packs: list[PackedBatch], per_step: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = create_model("abmil", in_dim=4, n_classes=2, dropout=0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        train_epoch(model, packs, optimizer, device=torch.device("cpu"), packs_per_step=per_step)
        return model.state_dict()

    one, two = trained([joined], 1), trained([first, second], 2)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


def test_class_weights_inverse_frequency() -> None:
    weights = class_weights([0, 0, 0, 1], 3)
    assert weights.tolist() == pytest.approx([4 / 6, 2.0, 0.0])


def test_warmup_then_cosine() -> None:
    factors = [warmup_cosine_factor(step, 4, 20, 0.1) for step in range(24)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert factors[20] == pytest.approx(0.1)
    assert factors[23] == pytest.approx(0.1)


def test_early_stopping_counts_patience() -> None:
    stopper = EarlyStopping("auroc", patience=2, min_epochs=0)
    assert stopper.update(1, 0.7)
    assert not stopper.update(2, 0.7)
    assert not stopper.should_stop(2)
    assert not stopper.update(3, math.nan)
    assert stopper.should_stop(3)
    assert stopper.best_epoch == 1


def test_cli_train_with_config_and_overrides(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    labels = write_slides(tmp_path / "features", n_slides=8)
    write_labels(tmp_path / "labels.csv", labels)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "features_dir": str(tmp_path / "features"), "run_dir": str(tmp_path / "run"),
        "labels": str(tmp_path / "labels.csv"), "epochs": 5, "n_bootstrap": 5,
        "packing": {"pack_len": 64},
    }))
    result = CliRunner().invoke(app, [
        "train", "--config", str(config), "--epochs", "1", "--folds", "2", "--no-progress",
        "--model-option", "embed_dim=16", "--main-fraction", "1.0",
    ])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["epochs"] == 1
    assert saved["model_options"]["embed_dim"] == 16
    assert saved["packing"] == {**saved["packing"], "pack_len": 64, "main_fraction": 1.0}


@pytest.mark.parametrize("device", ["gpu7", "cuda:x", "cpu:1", "meta"])
def test_cli_train_invalid_device_one_line(tmp_path: Path, device: str) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    _config(tmp_path)
    result = CliRunner().invoke(app, [
        "train", "--features-dir", str(tmp_path / "features"), "--run-dir",
        str(tmp_path / "run"), "--labels", str(tmp_path / "labels.csv"), "--no-progress",
        "--device", device,
    ])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    output = " ".join(result.output.split())
    assert f"Invalid device '{device}'; use auto, cpu, cuda or cuda:<index>." in output
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_train_cuda_without_cuda_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available on this machine; use "
                                          "--device cpu"):
        run_training(_config(tmp_path, device="cuda"))
    assert not (tmp_path / "run").exists()


def test_cli_train_reports_bad_labels(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    write_slides(tmp_path / "features", n_slides=4)
    (tmp_path / "labels.csv").write_text("slide,diagnosis\nslide-00,a\n")
    result = CliRunner().invoke(app, [
        "train", "--features-dir", str(tmp_path / "features"), "--run-dir",
        str(tmp_path / "run"), "--labels", str(tmp_path / "labels.csv"), "--no-progress",
    ])
    assert result.exit_code == 1
    assert "has no label column" in " ".join(result.output.split())


class _ConstantAuxModel(torch.nn.Module):
    """Mean pooling with a fixed auxiliary loss, so the aux share of each pack is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, batch: PackedBatch) -> Any:
        from mil.kernels import segment_reduce
        from mil.models.base import MILOutput

        pooled = segment_reduce(batch.features, batch.segments, reduce="mean")
        aux = (self.linear.weight ** 2).sum()
        return MILOutput(logits=self.linear(pooled),
                         attention=torch.zeros(batch.features.shape[0]),
                         aux_losses={"constant": aux})


def test_residual_aux_loss_scaled() -> None:
    torch.manual_seed(0)
    model = _ConstantAuxModel()
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    pack = _pack([3, 4, 5], labels, [False, False, True])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    stats = train_epoch(model, [pack], optimizer, device=torch.device("cpu"),
                        residual_weight=0.25)
    aux = float((model.linear.weight.detach() ** 2).sum())
    assert stats.aux_loss == pytest.approx(aux * (2 + 0.25 * 1) / 3, rel=1e-6)


def test_bad_model_option_value_creates_nothing(tmp_path: Path) -> None:
    cfg = _config(tmp_path, model_options={"dropout": "abc"})
    with pytest.raises(ConfigError) as caught:
        run_training(cfg)
    message = str(caught.value)
    assert "'dropout'" in message
    assert "'abc'" in message
    assert not (tmp_path / "run").exists()


def test_unknown_model_option_named_once(tmp_path: Path) -> None:
    cfg = _config(tmp_path, model_options={"hiden_dim": 3}, labels=tmp_path / "absent.csv")
    # The model check comes first, so the missing label file is not reached.
    with pytest.raises(ConfigError) as caught:
        run_training(cfg)
    message = str(caught.value)
    assert "has no option(s) hiden_dim" in message
    assert message.count("'abmil'") == 1
    assert not (tmp_path / "run").exists()


def _grade_labels(tmp_path: Path) -> Path:
    labels = write_slides(tmp_path / "features", n_slides=12)
    grades = {slide_id: ("low", "intermediate", "high")[index % 3]
              for index, slide_id in enumerate(labels)}
    return write_labels(tmp_path / "labels.csv", grades)


def test_ordinal_text_labels_need_class_order(tmp_path: Path) -> None:
    _grade_labels(tmp_path)
    cfg = _config(tmp_path, ordinal=True, epochs=1)
    with pytest.raises(ConfigError, match="--class-order"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()


def test_cli_class_order_sets_indices(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    _grade_labels(tmp_path)
    result = CliRunner().invoke(app, [
        "train", "--features-dir", str(tmp_path / "features"), "--run-dir", str(tmp_path / "run"),
        "--labels", str(tmp_path / "labels.csv"), "--ordinal", "--class-order",
        "low,intermediate,high", "--folds", "2", "--epochs", "1", "--n-bootstrap", "5",
        "--pack-len", "96", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    classes = json.loads((tmp_path / "run" / "classes.json").read_text())
    assert classes == {"low": 0, "intermediate": 1, "high": 2}


def test_labels_differing_in_case_warned(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    from mil.data import read_labels

    (tmp_path / "labels.csv").write_text(
        "slide_id,label\na,Brightfield\nb,brightfield\nc,brightfield \nd,fluorescence\n")
    with caplog.at_level(logging.WARNING, logger="mil.data.labels"):
        read_labels(tmp_path / "labels.csv")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'Brightfield' (1 row)" in warnings[0]
    assert "'brightfield' (2 rows)" in warnings[0]


def test_fixed_split_missing_class_says_edit(tmp_path: Path) -> None:
    labels = write_slides(tmp_path / "features", n_slides=8)
    splits = {slide_id: "train" for slide_id in labels}
    splits["slide-00"] = "val"
    splits["slide-02"] = "val"
    write_labels(tmp_path / "labels.csv", labels, splits)
    with pytest.raises(ConfigError) as caught:
        run_training(_config(tmp_path))
    message = str(caught.value)
    assert "['tumor']" in message
    assert "slide-00, slide-02" in message
    assert "edit the split column" in message
    assert "fewer" not in message


def test_too_many_folds_names_class(tmp_path: Path) -> None:
    labels = write_slides(tmp_path / "features", n_slides=8)
    labels = {slide_id: ("rare" if slide_id in ("slide-00", "slide-01") else "common")
              for slide_id in labels}
    write_labels(tmp_path / "labels.csv", labels)
    with pytest.raises(ConfigError) as caught:
        run_training(_config(tmp_path, folds=3))
    message = str(caught.value)
    assert "'rare' has 2 patient(s)" in message
    assert "--folds to at most 2" in message


def test_cli_train_invalid_values_one_line_each(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    write_slides(tmp_path / "features", n_slides=4)
    result = CliRunner().invoke(app, [
        "train", "--features-dir", str(tmp_path / "features"), "--run-dir",
        str(tmp_path / "run"), "--lr", "-1", "--val-fraction", "1.5", "--no-progress",
    ])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 3, result.output
    assert "--labels is required" in result.output
    assert "--lr -1.0 is invalid: input should be greater than 0" in result.output
    assert "--val-fraction 1.5 is invalid" in result.output
    assert "pydantic" not in result.output
    assert not (tmp_path / "run").exists()


def test_cli_train_help_shows_defaults() -> None:
    import re

    from typer.testing import CliRunner

    from cli.main import app
    from mil.data.packing import PackingConfig

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())
    fields = TrainConfig.model_fields
    expected = {
        "--epochs": fields["epochs"].default, "--folds": fields["folds"].default,
        "--lr": fields["lr"].default, "--patience": fields["patience"].default,
        "--n-bootstrap": fields["n_bootstrap"].default,
        "--val-fraction": fields["val_fraction"].default,
        "--pack-len": PackingConfig.model_fields["pack_len"].default,
        "--main-fraction": PackingConfig.model_fields["main_fraction"].default,
        "--residual-loss-weight": PackingConfig.model_fields["residual_loss_weight"].default,
    }
    for option, value in expected.items():
        found = re.search(re.escape(option) + r" .*?Default: ([^ ]+?)\.? ", text)
        assert found is not None, option
        assert float(found.group(1)) == pytest.approx(float(value)), option


def test_optimizer_decays_matrices_only_and_fuses() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))

    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)

    decayed, undecayed = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([3, 4])]
    assert decayed["weight_decay"] == 0.05
    assert len(undecayed["params"]) == 3
    assert undecayed["weight_decay"] == 0.0
    assert optimizer.defaults["fused"] is True
