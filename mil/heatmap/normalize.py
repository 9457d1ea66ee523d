"""Map per-tile attention scores to [0, 1] for colouring, and name the mapping."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from scipy.stats import rankdata


class Normalization(StrEnum):
    """Normalisation of scores before colouring.

    `percentile`: rank of the score within the slide, 0 (lowest) to 1 (highest); ties share
    their average rank. Robust to the scale of the attention, so slides of any size compare.
    `minmax`: linear from the slide's lowest to its highest score.
    `raw`: linear over a fixed range given by the caller, clipped, so colours compare across
    slides for scores with a fixed meaning (probabilities, sigmoid attention).
    """

    percentile = "percentile"
    minmax = "minmax"
    raw = "raw"


@dataclass(frozen=True)
class NormalizedScores:
    """Scores mapped to [0, 1] plus what the colour bar needs to describe the mapping.

    Attributes:
        values: float32 [N] in [0, 1].
        method: the normalisation used.
        label: colour bar title naming the normalisation.
        tick_values: positions of the colour bar ticks in [0, 1].
        tick_labels: text of each tick, in the units of `label`.
    """

    values: np.ndarray
    method: Normalization
    label: str
    tick_values: tuple[float, ...]
    tick_labels: tuple[str, ...]


def _format_score(value: float) -> str:
    return f"{value:.3g}"


def normalize_scores(
    scores: np.ndarray,
    method: Normalization | str = Normalization.percentile,
    raw_range: tuple[float, float] = (0.0, 1.0),
) -> NormalizedScores:
    """Map finite scores [N] to [0, 1] with `method`.

    Args:
        scores: float [N], all finite (drop NaN rows before calling).
        method: percentile (default), minmax or raw.
        raw_range: (low, high) score mapped to 0 and 1 by `raw`; ignored otherwise.

    Returns:
        The mapped values and the colour bar description. A slide whose scores are all equal
        maps to 0.5 under percentile and minmax, since no tile ranks above another.

    Raises:
        ValueError: scores are not one-dimensional or not finite, or `raw_range` is empty.
    """
    method = Normalization(method)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape [N], got {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; drop those tiles before normalising")
    count = scores.shape[0]

    if method is Normalization.percentile:
        if count > 1:
            values = (rankdata(scores, method="average") - 1.0) / (count - 1)
        else:
            values = np.full(count, 0.5)
        return NormalizedScores(
            values=values.astype(np.float32),
            method=method,
            label="attention, percentile rank within slide (%)",
            tick_values=(0.0, 0.25, 0.5, 0.75, 1.0),
            tick_labels=("0", "25", "50", "75", "100"),
        )

    if method is Normalization.minmax:
        low = float(scores.min()) if count else 0.0
        high = float(scores.max()) if count else 1.0
        label = "attention, min-max scaled within slide"
    else:
        low, high = float(raw_range[0]), float(raw_range[1])
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise ValueError(f"raw_range must be two finite numbers low < high, got {raw_range}")
        label = "attention, raw score"

    if high > low:
        values = np.clip((scores - low) / (high - low), 0.0, 1.0)
    else:
        values = np.full(count, 0.5)
    ticks = (0.0, 0.5, 1.0)
    tick_labels = tuple(_format_score(low + tick * (high - low)) for tick in ticks)
    return NormalizedScores(
        values=values.astype(np.float32),
        method=method,
        label=label,
        tick_values=ticks,
        tick_labels=tick_labels,
    )
