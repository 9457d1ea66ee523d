"""The work behind `run_training`: labels and splits, then one training loop per (split, seed)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mil.checkpoint import save_checkpoint
from mil.data import (
    BagDataset,
    ClassMap,
    FeatureCache,
    JoinReport,
    Split,
    build_eval_loader,
    build_train_loader,
    check_split,
    find_feature_stores,
    join_labels,
    kfold_splits,
    load_splits,
    read_labels,
    save_splits,
    splits_from_column,
    train_val_split,
)
from mil.data.packing import PackLoader
from mil.distributed import (
    DistributedContext,
    barrier,
    broadcast_object,
    init_distributed,
    wrap_model,
)
from mil.engine import BagPredictions, predict_bags, train_epoch
from mil.metrics import EvaluationReport, choose_threshold, evaluate_predictions
from mil.optim import EarlyStopping, build_optimizer, build_scheduler
from mil.progress import ProgressReporter, progress_bars
from mil.run_dir import EpochLog, RunLayout, prediction_rows, write_csv, write_json
from mil.seed import seed_everything
from mil.train import (
    MemberResult,
    TrainConfig,
    TrainResult,
    class_weights,
    config_to_dict,
    read_run_config,
    write_run_config,
    write_summary,
)
from preprocessing.errors import ConfigError

logger = logging.getLogger(__name__)

#: Config fields that change how a run executes but not what it computes; a finished run whose
#: config differs only in these is reused.
EXECUTION_FIELDS = frozenset({"overwrite", "progress", "num_workers", "device"})


@dataclass
class Parts:
    """Bag data sets of one split; val and test are None when the split leaves them empty."""

    train: BagDataset
    val: BagDataset | None
    test: BagDataset | None


class TrainingSession:
    """One `run_training` call: resolves the config, prepares the run directory and trains."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = resolve_model(cfg)
        self.layout = RunLayout(Path(cfg.run_dir))
        self.context: DistributedContext = init_distributed(cfg.device)

    @property
    def is_main(self) -> bool:
        return self.context.is_main

    def run(self) -> TrainResult:
        """Train every (split, seed) model and write the summary."""
        check_model_options(self.cfg)
        reused = self._reuse_or_prepare()
        if reused is not None:
            return reused

        cfg = self.cfg
        table = read_labels(cfg.labels, cfg.slide_column, cfg.label_column)
        report = join_labels(table, cfg.features_dir)
        check_ordinal_order(cfg, report.labels.values())
        class_map = ClassMap.from_labels(report.labels.values(), order=cfg.class_order)
        if class_map.n_classes < 2:
            raise ConfigError(
                f"{cfg.labels}: every matched slide has the label {class_map.names[0]!r}; "
                "training needs at least two classes"
            )
        splits = self._make_splits(report, table.has_splits)
        hint = self._split_fix_hint(table.has_splits)
        for split in splits:
            check_split(split, report.labels, class_map, report.case_ids, fix_hint=hint)
        # Probe every matched store now, so that mixed feature dimensions or unreadable stores
        # fail before anything is written into the run directory.
        BagDataset(cfg.features_dir, slide_ids=report.slide_ids)

        if self.is_main:
            write_run_config(self.layout, cfg)
            write_json(self.layout.inputs, input_digest(cfg))
            class_map.save(self.layout.classes)
            write_json(self.layout.join_report, report.to_dict())
            save_splits(splits, self.layout.splits, report.labels, report.case_ids)
        barrier()

        indices = {slide_id: class_map.index(label) for slide_id, label in report.labels.items()}
        members: list[MemberResult] = []
        with progress_bars(cfg.progress and self.is_main) as progress:
            for split in splits:
                parts = self._datasets(split, indices)
                for seed in cfg.seeds:
                    member = MemberTrainer(self, split, seed, parts, class_map, progress)
                    members.append(member.run())

        summary: dict[str, Any] = {}
        if self.is_main:
            extra = {"classes": list(class_map.names), "splits": [s.name for s in splits],
                     "seeds": cfg.seeds}
            summary = write_summary(self.layout, members, extra)
            logger.info("training finished: %s", TrainResult(self.layout.root, members, summary))
        barrier()
        return TrainResult(run_dir=self.layout.root, members=members, summary=summary)

    def _reuse_or_prepare(self) -> TrainResult | None:
        """Reuse an identical finished run, or make sure the run directory may be written.

        Raises:
            ConfigError: the run directory holds a run whose config, label CSV or feature
                stores differ from this one and `overwrite` is not set.
        """
        layout = self.layout
        if not layout.config.exists():
            return None
        if self.cfg.overwrite:
            if self.is_main:
                logger.warning("--overwrite is set: removing the previous run in %s",
                               layout.root)
                remove_run_outputs(layout)
            barrier()
            return None
        if not layout.metrics.exists() and not has_trained_model(layout):
            if self.is_main:
                logger.warning("%s contains a run that stopped before its first checkpoint; "
                               "replacing it", layout.root)
                remove_run_outputs(layout)
            barrier()
            return None
        stored = read_run_config(layout.root)
        current = config_to_dict(self.cfg)
        differing = sorted(
            key for key in set(stored) | set(current)
            if key not in EXECUTION_FIELDS and stored.get(key) != current.get(key)
        )
        if differing:
            raise ConfigError(
                f"{layout.root} already contains a run with another config (differs in: "
                f"{', '.join(differing)}); choose another --run-dir or pass --overwrite to "
                "replace it"
            )
        changed = changed_inputs(layout, self.cfg)
        if changed:
            raise ConfigError(
                f"{layout.root} already contains a run trained on other inputs (changed: "
                f"{'; '.join(changed)}); choose another --run-dir or pass --overwrite to "
                "retrain on the current inputs"
            )
        if layout.metrics.exists():
            summary = json.loads(layout.metrics.read_text())
            logger.info("%s already contains this finished run; reusing it (pass --overwrite "
                        "to retrain)", layout.root)
            members = [
                MemberResult(split_name=m["split"], seed=m["seed"], best_epoch=m["best_epoch"],
                             epochs_run=m["epochs_run"], checkpoint=Path(m["checkpoint"]),
                             val={"metrics": m["val"]} if m["val"] else {},
                             test={"metrics": m["test"]} if m["test"] else {})
                for m in summary.get("models", [])
            ]
            return TrainResult(layout.root, members, summary, reused=True)
        logger.warning("%s contains an unfinished run with this config; training it again",
                       layout.root)
        return None

    def _split_mode(self, has_split_column: bool) -> str:
        if self.cfg.split == "auto":
            return "column" if has_split_column else "kfold"
        return self.cfg.split

    def _split_fix_hint(self, has_split_column: bool) -> str | None:
        """Return how to repair a split the user wrote, or None for generated splits."""
        mode = self._split_mode(has_split_column)
        if mode == "column":
            return (f"edit the split column of {self.cfg.labels} so that every non-empty part "
                    "has a slide of each class")
        if mode == "files":
            return (f"edit the split files in {self.cfg.splits_dir} so that every non-empty "
                    "part has a slide of each class")
        return None

    def _make_splits(self, report: JoinReport, has_split_column: bool) -> list[Split]:
        cfg = self.cfg
        mode = self._split_mode(has_split_column)
        if mode == "column":
            if not has_split_column:
                raise ConfigError(f"{cfg.labels} has no split column; add one with train/val/"
                                  "test per slide, or use --split kfold")
            return [splits_from_column(report.matched)]
        if mode == "files":
            assert cfg.splits_dir is not None  # checked by the config validator
            return load_splits(cfg.splits_dir)
        if mode == "holdout":
            return [train_val_split(report.matched, cfg.val_fraction, cfg.split_seed,
                                    cfg.test_fraction)]
        return kfold_splits(report.matched, cfg.folds, cfg.split_seed, cfg.test_fraction)

    def _datasets(self, split: Split, indices: Mapping[str, int]) -> Parts:
        cache = self.cfg.cache_features and self.context.device.type == "cpu"

        def dataset(ids: list[str]) -> BagDataset | None:
            if not ids:
                return None
            return BagDataset(self.cfg.features_dir, slide_ids=ids,
                              labels={i: indices[i] for i in ids}, cache=cache)

        train = dataset(split.train)
        assert train is not None  # check_split rejects an empty training part
        return Parts(train=train, val=dataset(split.val), test=dataset(split.test))


class MemberTrainer:
    """Train, select and evaluate the model of one split and one seed."""

    def __init__(self, session: TrainingSession, split: Split, seed: int, parts: Parts,
                 class_map: ClassMap, progress: ProgressReporter) -> None:
        self.session = session
        self.cfg = session.cfg
        self.context = session.context
        self.split = split
        self.seed = seed
        self.parts = parts
        self.class_map = class_map
        self.progress = progress
        self.folder = session.layout.member(split.name, seed)
        self.name = f"{split.name} seed {seed}"

    def run(self) -> MemberResult:
        cfg, context = self.cfg, self.context
        seed_everything(self.seed, cfg.deterministic)
        train_ds = self.parts.train
        model = self._build_model(train_ds.dim)
        wrapped = wrap_model(model, context, cfg.find_unused_parameters)
        optimizer = build_optimizer(wrapped, cfg.lr, cfg.weight_decay)
        weights = None
        if cfg.balance == "class_weights":
            weights = class_weights([int(v) for v in train_ds.labels if v is not None],
                                    self.class_map.n_classes).to(context.device)
        packing = cfg.packing
        if cfg.balance == "sampler":
            packing = packing.model_copy(update={"balanced_sampling": True})
        train_cache = self._cache(train_ds)
        val_loader = self._eval_loader(self.parts.val)
        if val_loader is None and self.session.is_main:
            logger.warning("%s: no validation slides, so no early stopping; the last epoch's "
                           "weights are saved as checkpoint.pt", self.name)

        # Epochs are numbered from 1 in logs, log.csv and the packing seed alike.
        loader = self._train_loader(train_ds, packing, train_cache, epoch=1)
        steps_per_epoch = math.ceil(len(loader) / cfg.packs_per_step)
        scheduler = build_scheduler(optimizer, steps_per_epoch, cfg.epochs, cfg.warmup_epochs,
                                    cfg.min_lr_ratio)
        stopper = EarlyStopping(cfg.monitor, cfg.patience, cfg.min_epochs)
        log = EpochLog(self.folder / "log.csv") if self.session.is_main else None
        epochs_run = 0

        for epoch in range(1, cfg.epochs + 1):
            if epoch > 1:
                loader = self._train_loader(train_ds, packing, train_cache, epoch=epoch)
            lr = optimizer.param_groups[0]["lr"]
            n_bags = sum(len(pack) for pack in loader.plan.packs)
            advance = self.progress.start(f"{self.name} epoch {epoch}/{cfg.epochs}", n_bags)
            stats = train_epoch(
                wrapped, loader, optimizer, scheduler, device=context.device,
                class_weights=weights, residual_weight=packing.residual_loss_weight,
                packs_per_step=cfg.packs_per_step, grad_clip=cfg.grad_clip, amp=cfg.amp,
                on_bags=advance,
            )
            self.progress.finish()
            epochs_run = epoch
            row: dict[str, Any] = {
                "epoch": epoch, "lr": lr, "train_loss": stats.loss, "aux_loss": stats.aux_loss,
                "train_bags": stats.n_bags, "steps": stats.n_steps, "seconds": stats.seconds,
                "bags_per_second": stats.bags_per_second,
                "padding_ratio": loader.stats.padding_ratio,
            }
            stop = False
            if self.session.is_main:
                stop = self._validate(model, val_loader, epoch, stopper, row)
                assert log is not None
                log.write(row)
                self._save(model, self.folder / "checkpoint_last.pt", epoch, 0.5, {})
                logger.info("%s epoch %d/%d: %s", self.name, epoch, cfg.epochs,
                            _format_row(row))
            if broadcast_object(stop):
                logger.info("%s: early stopping after epoch %d (best %s %.4f at epoch %d)",
                            self.name, epoch, cfg.monitor, stopper.best, stopper.best_epoch)
                break

        best_epoch = stopper.best_epoch if val_loader is not None else epochs_run
        result = MemberResult(split_name=self.split.name, seed=self.seed, best_epoch=best_epoch,
                              epochs_run=epochs_run, checkpoint=self.folder / "checkpoint.pt")
        if self.session.is_main:
            self._final_evaluation(model, val_loader, result)
        barrier()
        return result

    def _build_model(self, in_dim: int) -> nn.Module:
        return build_model(self.cfg, in_dim, self.class_map.n_classes)

    def _cache(self, dataset: BagDataset | None) -> FeatureCache | None:
        if dataset is None or not self.cfg.cache_features or self.context.device.type != "cuda":
            return None
        return FeatureCache(dataset, device=self.context.device)

    def _train_loader(self, dataset: BagDataset, packing: Any, cache: FeatureCache | None,
                      epoch: int) -> PackLoader:
        return build_train_loader(
            dataset, packing, self.class_map.n_classes, seed=self.seed,
            num_workers=self.cfg.num_workers, epoch=epoch, feature_cache=cache,
            rank=self.context.rank, world_size=self.context.world_size,
            pin_memory=self.context.device.type == "cuda" and cache is None,
        )

    def _eval_loader(self, dataset: BagDataset | None) -> PackLoader | None:
        if dataset is None:
            return None
        return build_eval_loader(dataset, self.cfg.packing.pack_len,
                                 num_workers=self.cfg.num_workers,
                                 feature_cache=self._cache(dataset))

    def _predict(self, model: nn.Module, loader: PackLoader, description: str
                 ) -> BagPredictions:
        n_bags = sum(len(pack) for pack in loader.plan.packs)
        advance = self.progress.start(description, n_bags)
        predictions = predict_bags(model, loader, device=self.context.device, amp=self.cfg.amp,
                                   keep_attention=False, on_bags=advance)
        self.progress.finish()
        return predictions

    def _validate(self, model: nn.Module, loader: PackLoader | None, epoch: int,
                  stopper: EarlyStopping, row: dict[str, Any]) -> bool:
        """Validate after an epoch, save the best checkpoint; True when training should stop."""
        if loader is None:
            self._save(model, self.folder / "checkpoint.pt", epoch, 0.5, {})
            return False
        predictions = self._predict(model, loader, f"{self.name} validation")
        assert predictions.labels is not None
        report = evaluate_predictions(predictions.labels, predictions.probs,
                                      ordinal=self.cfg.ordinal, warn_single_class=False)
        row["val_loss"] = predictions.loss
        row.update({f"val_{name}": value for name, value in report.metrics.items()})
        value = predictions.loss if self.cfg.monitor == "loss" else report.metrics.get(
            self.cfg.monitor, math.nan)
        if stopper.update(epoch, value):
            row["best"] = 1
            self._save(model, self.folder / "checkpoint.pt", epoch, 0.5,
                       {"val_loss": predictions.loss, **report.metrics})
        else:
            row["best"] = 0
        return stopper.should_stop(epoch)

    def _save(self, model: nn.Module, path: Path, epoch: int, threshold: float,
              metrics: Mapping[str, float]) -> None:
        save_checkpoint(
            path, model, model_name=self.cfg.model, model_config=self.cfg.model_options,
            in_dim=self.parts.train.dim, classes=self.class_map.names,
            train_config=config_to_dict(self.cfg), epoch=epoch,
            fold=_fold_index(self.split.name), seed=self.seed, threshold=threshold,
            metrics={k: (None if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in metrics.items()},
        )

    def _final_evaluation(self, model: nn.Module, val_loader: PackLoader | None,
                          result: MemberResult) -> None:
        """Reload the best weights, pick the threshold on validation, evaluate val and test."""
        from mil.checkpoint import load_checkpoint

        cfg = self.cfg
        best = load_checkpoint(result.checkpoint, expected_model=cfg.model,
                               expected_classes=self.class_map.names)
        model.load_state_dict(best.state_dict)

        threshold = 0.5
        val_predictions = None
        if val_loader is not None:
            val_predictions = self._predict(model, val_loader, f"{self.name} validation")
            assert val_predictions.labels is not None
            threshold = choose_threshold(val_predictions.labels, val_predictions.probs,
                                         cfg.threshold)
        test_loader = self._eval_loader(self.parts.test)
        test_predictions = (self._predict(model, test_loader, f"{self.name} test")
                            if test_loader is not None else None)

        member_metrics: dict[str, Any] = {"split": self.split.name, "seed": self.seed,
                                          "best_epoch": result.best_epoch,
                                          "epochs_run": result.epochs_run,
                                          "threshold": threshold}
        for part, predictions in (("val", val_predictions), ("test", test_predictions)):
            if predictions is None:
                continue
            report = self._report(predictions, threshold, part)
            payload = {**report.to_dict(), "loss": _none_if_nan(predictions.loss)}
            setattr(result, part, payload)
            member_metrics[part] = payload
            write_csv(self.folder / f"predictions_{part}.csv",
                      prediction_rows(predictions.bag_ids, predictions.probs,
                                      self.class_map.names, threshold, predictions.labels))
        write_json(self.folder / "metrics.json", member_metrics)
        self._save(model, result.checkpoint, best.epoch, threshold,
                   {k: v for k, v in result.val.get("metrics", {}).items() if v is not None})

    def _report(self, predictions: BagPredictions, threshold: float, part: str
                ) -> EvaluationReport:
        assert predictions.labels is not None
        return evaluate_predictions(
            predictions.labels, predictions.probs, threshold=threshold, ordinal=self.cfg.ordinal,
            n_bootstrap=self.cfg.n_bootstrap, seed=self.seed, context=f"{self.name} {part}",
        )


def resolve_model(cfg: TrainConfig) -> TrainConfig:
    """The config with `model` set to a registered name and `model_options` to the full
    constructor options (preset options updated by the config's own)."""
    from mil.models import list_models
    from mil.models.presets import PRESET_DIR, load_model_preset

    name = cfg.model
    is_path = name.endswith((".yaml", ".yml"))
    if not is_path and name not in list_models():
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    if is_path or (PRESET_DIR / f"{name}.yaml").exists():
        preset = load_model_preset(name)
        name, options = preset.model, {**preset.options, **cfg.model_options}
    else:
        options = dict(cfg.model_options)
    return cfg.model_copy(update={"model": name, "model_options": options})


#: Feature dimension of the trial build that checks the model options before any data is read.
#: The real build in each (split, seed) uses the stores' dimension.
PROBE_IN_DIM = 16


def build_model(cfg: TrainConfig, in_dim: int, n_classes: int) -> nn.Module:
    """Build the configured model, turning an invalid option into a ConfigError.

    Raises:
        ConfigError: an option name is unknown to the model, or a value is invalid; the message
            names the option and its value.
    """
    from mil.models import create_model

    try:
        return create_model(cfg.model, in_dim=in_dim, n_classes=n_classes, **cfg.model_options)
    except (ValueError, TypeError, RuntimeError) as err:
        if "has no option" in str(err):
            raise ConfigError(f"{err}. Fix the --model-option name (model_options in a config "
                              "file).") from err
        culprit = _failing_option(cfg, in_dim, n_classes)
        if culprit is None:
            raise ConfigError(f"model {cfg.model!r} cannot be built with options "
                              f"{cfg.model_options} ({type(err).__name__}: {err}); check the "
                              "--model-option values") from err
        key, value, cause = culprit
        raise ConfigError(
            f"model {cfg.model!r}: invalid value {value!r} for option {key!r} "
            f"({type(cause).__name__}: {cause}); pass a valid --model-option {key}=VALUE "
            "(model_options in a config file)"
        ) from err


def _failing_option(cfg: TrainConfig, in_dim: int, n_classes: int
                    ) -> tuple[str, Any, Exception] | None:
    """Find the first option that fails a build on its own; return it with its error."""
    from mil.models import create_model

    for key, value in cfg.model_options.items():
        try:
            create_model(cfg.model, in_dim=in_dim, n_classes=n_classes, **{key: value})
        except (ValueError, TypeError, RuntimeError) as err:
            return key, value, err
    return None


def check_model_options(cfg: TrainConfig) -> None:
    """Build the model once with a probe feature dimension, before anything is read or written.

    NOTE: an option whose validity depends on the real feature dimension is only caught when
    the first (split, seed) model is built.

    Raises:
        ConfigError: an option name or value is invalid.
    """
    n_classes = max(2, len(cfg.class_order or []))
    build_model(cfg, PROBE_IN_DIM, n_classes)


def check_ordinal_order(cfg: TrainConfig, labels: Iterable[object]) -> None:
    """Require an explicit class order for ordinal training on text labels.

    Numeric grades sort by value, but text grades would sort alphabetically (high,
    intermediate, low), which is no grade order.

    Raises:
        ConfigError: `ordinal` is set, a label is not a number and no class order is given.
    """
    if not cfg.ordinal or cfg.class_order is not None:
        return
    names = sorted({str(label) for label in labels if label is not None})
    text = [name for name in names if not _is_number(name)]
    if text:
        raise ConfigError(
            f"--ordinal is set but the labels of {cfg.labels} are not numbers ({', '.join(names)})"
            ", so their order is unknown; pass --class-order with these classes comma-separated "
            "from lowest to highest grade (class_order in a config file)"
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def input_digest(cfg: TrainConfig) -> dict[str, Any]:
    """Identify the inputs of a run: the label CSV's SHA-256 and every feature store's name,
    size in bytes and modification time (ns).

    A zarr store is a folder, so its size is the sum over its files and its time is the latest
    among them. Stores are identified by file metadata, not content, so copying them to a new
    folder with new times counts as a change.
    """
    labels = Path(cfg.labels)
    stores: dict[str, list[int]] = {}
    for slide_id, path in find_feature_stores(cfg.features_dir).items():
        stores[slide_id] = _store_stat(path)
    return {
        "labels_sha256": hashlib.sha256(labels.read_bytes()).hexdigest(),
        "feature_stores": stores,
    }


def _store_stat(path: Path) -> list[int]:
    """Return [size in bytes, modification time in ns] of a store file or zarr folder."""
    if not path.is_dir():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    size, mtime = 0, path.stat().st_mtime_ns
    for item in path.rglob("*"):
        if item.is_file():
            stat = item.stat()
            size += stat.st_size
            mtime = max(mtime, stat.st_mtime_ns)
    return [size, mtime]


def changed_inputs(layout: RunLayout, cfg: TrainConfig) -> list[str]:
    """Describe how the current inputs differ from those stored in `inputs.json`.

    Returns an empty list when they match, or when the run predates `inputs.json`.
    """
    if not layout.inputs.exists():
        return []
    stored = json.loads(layout.inputs.read_text())
    current = input_digest(cfg)
    changes = []
    if stored.get("labels_sha256") != current["labels_sha256"]:
        changes.append(f"the content of {cfg.labels}")
    old_stores: dict[str, Any] = stored.get("feature_stores", {})
    new_stores: dict[str, Any] = current["feature_stores"]
    added = sorted(set(new_stores) - set(old_stores))
    removed = sorted(set(old_stores) - set(new_stores))
    modified = sorted(key for key in set(old_stores) & set(new_stores)
                      if list(old_stores[key]) != list(new_stores[key]))
    for kind, ids in (("added", added), ("removed", removed), ("modified", modified)):
        if ids:
            shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
            changes.append(f"feature stores {kind} in {cfg.features_dir}: {shown}")
    return changes


def has_trained_model(layout: RunLayout) -> bool:
    """Whether any (split, seed) folder of the run contains a best or last checkpoint."""
    return any(layout.root.glob("*/seed_*/checkpoint*.pt"))


def remove_run_outputs(layout: RunLayout) -> None:
    """Delete what a previous training run wrote into the run directory (nothing else)."""
    for path in (layout.config, layout.inputs, layout.classes, layout.join_report, layout.metrics):
        path.unlink(missing_ok=True)
    for folder in [layout.splits, *layout.root.glob("fold_*"), layout.root / "fixed"]:
        if folder.is_dir():
            shutil.rmtree(folder)
    for name in ("predictions.csv", "predictions.json", "prediction_metrics.json"):
        (layout.root / name).unlink(missing_ok=True)
    if (layout.root / "attention").is_dir():
        shutil.rmtree(layout.root / "attention")


def _fold_index(split_name: str) -> int:
    suffix = split_name.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _format_row(row: Mapping[str, Any]) -> str:
    shown = []
    for key in ("train_loss", "val_loss", "val_auroc", "val_balanced_accuracy",
                "bags_per_second"):
        value = row.get(key)
        if isinstance(value, float | np.floating) and not math.isnan(value):
            shown.append(f"{key} {value:.4g}")
    if row.get("best"):
        shown.append("(best)")
    return ", ".join(shown)
