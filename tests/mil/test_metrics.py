"""Slide-level metrics, bootstrap intervals, thresholds and the one-class warning."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mil.metrics import (
    choose_threshold,
    evaluate_predictions,
    is_better,
    predict_classes,
    summarize,
)


def _binary_probs(p1: list[float]) -> np.ndarray:
    p1_array = np.asarray(p1, dtype=float)
    return np.stack([1 - p1_array, p1_array], axis=1)


def test_binary_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p1 = np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1)
    probs = _binary_probs(p1.tolist())
    report = evaluate_predictions(y, probs)
    pred = (p1 >= 0.5).astype(int)

    assert report.metrics["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert report.metrics["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y, pred)
    )
    assert report.metrics["auroc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert report.metrics["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert "qwk" not in report.metrics
    assert report.n_slides == 60
    assert np.asarray(report.confusion).sum() == 60


def test_multiclass_auroc_is_macro_one_vs_rest() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + np.eye(3)[y] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    report = evaluate_predictions(y, probs, ordinal=True)

    expected = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert report.metrics["auroc"] == pytest.approx(expected)
    assert report.metrics["qwk"] == pytest.approx(
        skm.cohen_kappa_score(y, probs.argmax(1), weights="quadratic")
    )


def test_threshold_changes_binary_prediction() -> None:
    probs = _binary_probs([0.2, 0.4, 0.6, 0.8])
    assert predict_classes(probs, 0.5).tolist() == [0, 0, 1, 1]
    assert predict_classes(probs, 0.3).tolist() == [0, 1, 1, 1]
    report = evaluate_predictions([0, 1, 1, 1], probs, threshold=0.3)
    assert report.metrics["accuracy"] == 1.0
    assert report.threshold == 0.3


def test_youden_threshold_separates_classes() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    probs = _binary_probs([0.1, 0.2, 0.25, 0.3, 0.35, 0.4])
    threshold = choose_threshold(y, probs, "youden")
    assert 0.25 < threshold <= 0.3
    assert choose_threshold(y, probs, "fixed") == 0.5


def test_youden_single_class_keeps_half() -> None:
    assert choose_threshold(np.zeros(4, int), _binary_probs([0.1, 0.2, 0.3, 0.9]), "youden") == 0.5


def test_one_class_prediction_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mil.metrics"):
        report = evaluate_predictions([0, 1, 1], _binary_probs([0.1, 0.2, 0.3]), context="val")
    assert report.single_class_prediction
    assert "predicts class 0 for all 3 slides in val" in caplog.text


def test_auroc_undefined_for_one_true_class() -> None:
    report = evaluate_predictions([1, 1, 1], _binary_probs([0.1, 0.7, 0.9]))
    assert math.isnan(report.metrics["auroc"])
    assert report.to_dict()["metrics"]["auroc"] is None


def test_bootstrap_ci_contains_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    probs = _binary_probs(np.clip(0.4 * y + rng.random(80) * 0.6, 0, 1).tolist())
    first = evaluate_predictions(y, probs, n_bootstrap=200, seed=3)
    second = evaluate_predictions(y, probs, n_bootstrap=200, seed=3)

    assert first.ci95 == second.ci95
    for name, value in first.metrics.items():
        low, high = first.ci95[name]
        assert low <= value <= high, name
        assert high - low > 0, name


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="expected y_true"):
        evaluate_predictions([0, 1], _binary_probs([0.1]))
    with pytest.raises(ValueError, match="class index"):
        evaluate_predictions([0, 2], _binary_probs([0.1, 0.2]))


def test_is_better_direction() -> None:
    assert is_better("loss", 0.4, 0.5)
    assert not is_better("loss", 0.6, 0.5)
    assert is_better("auroc", 0.8, 0.7)
    assert is_better("auroc", 0.8, None)
    assert not is_better("auroc", math.nan, 0.7)


def test_summarize_mean_std_sem() -> None:
    summary = summarize([0.8, 0.9, 1.0, math.nan])
    assert summary["mean"] == pytest.approx(0.9)
    assert summary["std"] == pytest.approx(0.1)
    assert summary["sem"] == pytest.approx(0.1 / math.sqrt(3))
    assert summary["n"] == 3


@pytest.mark.parametrize("n_classes", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_random(n_classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, 40)
    y[:n_classes] = np.arange(n_classes)
    # Rounded probabilities create ties, which the rank-based AUROC must count as one half.
    logits = np.round(rng.normal(size=(40, n_classes)) + np.eye(n_classes)[y], 1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    report = evaluate_predictions(y, probs, ordinal=True)
    pred = predict_classes(probs)
    labels = list(range(n_classes))

    assert report.metrics["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert report.metrics["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y, pred))
    assert report.metrics["f1_macro"] == pytest.approx(
        skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    assert report.metrics["qwk"] == pytest.approx(
        skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic"))
    expected_auroc = (skm.roc_auc_score(y, probs[:, 1]) if n_classes == 2 else
                      skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert report.metrics["auroc"] == pytest.approx(expected_auroc)
    assert report.confusion == skm.confusion_matrix(y, pred, labels=labels).tolist()


def test_f1_counts_never_predicted_class_as_zero() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05]] * 2 + [[0.1, 0.8, 0.1]] * 2)
    report = evaluate_predictions(y, probs)
    assert report.metrics["f1_macro"] == pytest.approx(2 / 3)
    assert report.metrics["balanced_accuracy"] == pytest.approx(1.0)
