"""Slide-level classification metrics with bootstrap confidence intervals.

Every metric takes the true class indices `y_true` [N] and the predicted class probabilities
`probs` [N, C] of N slides. The class predicted for a slide is the argmax of its probabilities.
For two classes, the positive class (index 1) is predicted when its probability is at least
the decision threshold, which is 0.5 unless one was chosen on validation data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm

logger = logging.getLogger(__name__)

#: Metrics where larger is better; `loss` is the one metric where smaller is better.
METRIC_NAMES = ("accuracy", "balanced_accuracy", "auroc", "f1_macro", "qwk")
ThresholdMethod = Literal["fixed", "youden"]


def predict_classes(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Predicted class index per slide.

    Args:
        probs: [N, C] class probabilities.
        threshold: for C == 2, the probability of class 1 at or above which class 1 is
            predicted; ignored for more classes (argmax).

    Returns:
        [N] int64 class indices.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be [N, C], got shape {probs.shape}")
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)


def choose_threshold(
    y_true: np.ndarray, probs: np.ndarray, method: ThresholdMethod = "fixed"
) -> float:
    """Decision threshold on the probability of class 1 for a binary task.

    `fixed` returns 0.5. `youden` returns the threshold that maximises Youden's J
    (sensitivity + specificity - 1) on the given (validation) slides, or 0.5 when those slides
    hold a single class, because the ROC curve is then undefined.
    """
    if method == "fixed" or np.asarray(probs).shape[1] != 2:
        return 0.5
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        logger.warning("validation slides hold one class only; keeping decision threshold 0.5")
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(y_true, np.asarray(probs)[:, 1])
    best = int(np.argmax(tpr - fpr))
    # roc_curve puts +inf as the first threshold (nothing predicted positive); clip to [0, 1].
    return float(min(max(thresholds[best], 0.0), 1.0))


def _confusion(y_true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C] counts, rows = true class, columns = predicted class."""
    flat = np.bincount(y_true * n_classes + pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def _binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve from the Mann-Whitney U statistic (ties count one half)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the classes present in `y_true`; NaN with a single class."""
    present = np.unique(y_true)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return _binary_auroc(y_true == 1, probs[:, 1])
    return float(np.mean([_binary_auroc(y_true == cls, probs[:, cls]) for cls in present]))


def metric_functions(
    n_classes: int, threshold: float = 0.5, ordinal: bool = False
) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """Metric name -> fn(y_true [N], probs [N, C]) -> float, as `evaluate_predictions` uses.

    The functions work on the confusion matrix with numpy, so a bootstrap of 1000 resamples
    takes well under a second; tests check them against scikit-learn.
    """

    def confusion(y: np.ndarray, p: np.ndarray) -> np.ndarray:
        return _confusion(y, predict_classes(p, threshold), n_classes)

    def accuracy(y: np.ndarray, p: np.ndarray) -> float:
        return float(np.trace(confusion(y, p)) / len(y))

    def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
        # Mean recall over the classes present in y (as scikit-learn computes it).
        counts = confusion(y, p)
        true_totals = counts.sum(axis=1)
        present = true_totals > 0
        return float(np.mean(np.diag(counts)[present] / true_totals[present]))

    def f1_macro(y: np.ndarray, p: np.ndarray) -> float:
        # Mean over all C classes; a class never true and never predicted scores 0.
        counts = confusion(y, p)
        denominator = counts.sum(axis=0) + counts.sum(axis=1)
        f1 = np.divide(2.0 * np.diag(counts), denominator, out=np.zeros(n_classes),
                       where=denominator > 0)
        return float(f1.mean())

    def qwk(y: np.ndarray, p: np.ndarray) -> float:
        counts = confusion(y, p).astype(np.float64)
        grid = np.arange(n_classes)
        weights = (grid[:, None] - grid[None, :]) ** 2 / max(n_classes - 1, 1) ** 2
        expected = np.outer(counts.sum(axis=1), counts.sum(axis=0)) / counts.sum()
        denominator = float((weights * expected).sum())
        if denominator == 0.0:
            # One class in both truth and prediction: perfect agreement or undefined.
            return 1.0 if np.trace(counts) == counts.sum() else math.nan
        return 1.0 - float((weights * counts).sum()) / denominator

    functions: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": accuracy,
        "balanced_accuracy": balanced_accuracy,
        "auroc": _auroc,
        "f1_macro": f1_macro,
    }
    if ordinal:
        functions["qwk"] = qwk
    return functions


@dataclass
class EvaluationReport:
    """Metrics of one set of slide predictions.

    Attributes:
        metrics: metric name -> value (NaN where undefined, such as AUROC on one class).
        ci95: metric name -> (low, high) bootstrap 95% interval; empty without bootstrap.
        threshold: decision threshold on the probability of class 1 (two classes only;
            0.5 is reported but unused for more classes, where the argmax decides).
        n_slides: number of slides evaluated.
        confusion: [C, C] counts, rows = true class, columns = predicted class.
        single_class_prediction: True when every slide got the same predicted class.
    """

    metrics: dict[str, float]
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    threshold: float = 0.5
    n_slides: int = 0
    confusion: list[list[int]] = field(default_factory=list)
    single_class_prediction: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN becomes None so the file stays valid JSON."""

        def clean(value: float) -> float | None:
            return None if value is None or math.isnan(value) else float(value)

        return {
            "metrics": {name: clean(v) for name, v in self.metrics.items()},
            "ci95": {name: [clean(lo), clean(hi)] for name, (lo, hi) in self.ci95.items()},
            "threshold": self.threshold,
            "n_slides": self.n_slides,
            "confusion": self.confusion,
            "single_class_prediction": self.single_class_prediction,
        }


def evaluate_predictions(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    *,
    threshold: float = 0.5,
    ordinal: bool = False,
    n_bootstrap: int = 0,
    seed: int = 0,
    context: str = "",
    warn_single_class: bool = True,
) -> EvaluationReport:
    """Compute all metrics of N slide predictions, with bootstrap CIs when `n_bootstrap` > 0.

    Args:
        y_true: [N] true class indices.
        probs: [N, C] class probabilities (each row sums to 1).
        threshold: decision threshold on class 1 for two classes.
        ordinal: the classes are ordered grades; adds quadratic weighted kappa (`qwk`).
        n_bootstrap: resamples of the N slides (with replacement) for percentile 95% CIs;
            1000 or more for reported numbers, 0 to skip.
        seed: seed of the resampling, so the intervals are reproducible.
        context: words naming the evaluated set (such as "fold 2 test"), used in warnings.
        warn_single_class: log a warning when every slide got the same predicted class
            (turned off for the per-epoch validation, where early epochs often do that).

    Returns:
        The report, whose `single_class_prediction` flags a model that predicted one class
        for every slide.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(y) != len(p):
        raise ValueError(f"expected y_true [N] and probs [N, C], got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError(f"no slides to evaluate{' in ' + context if context else ''}")
    n_classes = p.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"class index outside 0..{n_classes - 1} in y_true")

    functions = metric_functions(n_classes, threshold, ordinal)
    values = {name: fn(y, p) for name, fn in functions.items()}
    pred = predict_classes(p, threshold)
    confusion = _confusion(y, pred, n_classes).tolist()

    single_class = len(y) > 1 and len(np.unique(pred)) == 1
    if single_class and warn_single_class:
        logger.warning(
            "the model predicts class %d for all %d slides%s; check class balance, the "
            "learning rate and the decision threshold (%.3f)",
            int(pred[0]), len(y), f" in {context}" if context else "", threshold,
        )

    ci95 = bootstrap_ci(y, p, functions, n_bootstrap, seed) if n_bootstrap > 0 else {}
    return EvaluationReport(
        metrics=values,
        ci95=ci95,
        threshold=float(threshold),
        n_slides=len(y),
        confusion=confusion,
        single_class_prediction=single_class,
    )


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    functions: dict[str, Callable[[np.ndarray, np.ndarray], float]],
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric over resampled slides.

    Resamples where a metric is undefined (AUROC of a resample with one class) are left out
    of that metric's interval. A metric undefined in every resample gets (NaN, NaN).
    """
    rng = np.random.default_rng(seed)
    n = len(y_true)
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, size=n)
        for name, fn in functions.items():
            value = fn(y_true[idx], probs[idx])
            if not math.isnan(value):
                samples[name].append(value)
    tail = (1.0 - level) / 2.0 * 100.0
    intervals: dict[str, tuple[float, float]] = {}
    for name, values in samples.items():
        if values:
            low, high = np.percentile(values, [tail, 100.0 - tail])
            intervals[name] = (float(low), float(high))
        else:
            intervals[name] = (math.nan, math.nan)
    return intervals


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Return whether `value` improves on `best` (`loss` must be lower, other metrics higher)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if metric == "loss" else value > best


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, standard error and count of finite `values`."""
    finite = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(finite) == 0:
        return {"mean": math.nan, "std": math.nan, "sem": math.nan, "n": 0}
    std = float(finite.std(ddof=1)) if len(finite) > 1 else 0.0
    return {
        "mean": float(finite.mean()),
        "std": std,
        "sem": std / math.sqrt(len(finite)),
        "n": len(finite),
    }
