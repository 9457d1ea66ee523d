"""Score maps of an attention store: validation, NaN handling, heads and class names."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from preprocessing.errors import StoreFormatError
from preprocessing.stores import AttentionStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreMap:
    """One map to draw: a name for files and captions, and one raw score per kept tile."""

    name: str
    title: str
    scores: np.ndarray


def _file_label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "head"


def _json_attr(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def class_names(attrs: dict[str, Any]) -> list[str]:
    """Class names in index order from the store's `classes` attribute (JSON list or map)."""
    classes = _json_attr(attrs.get("classes"))
    if isinstance(classes, dict):
        return [str(name) for name, _ in sorted(classes.items(), key=lambda item: int(item[1]))]
    if isinstance(classes, list):
        return [str(name) for name in classes]
    return []


def predicted_class_name(attrs: dict[str, Any]) -> str | None:
    """Predicted class as a name; an index is looked up in `classes`."""
    predicted = attrs.get("predicted_class")
    if predicted is None or predicted == "":
        return None
    names = class_names(attrs)
    if isinstance(predicted, (int, np.integer)) and 0 <= int(predicted) < len(names):
        return names[int(predicted)]
    return str(predicted)


def head_names(attrs: dict[str, Any], n_heads: int) -> tuple[list[str], bool]:
    """Name the H attention heads and tell whether they are per-class heads.

    Heads are per class when the store's `attention_per_class` is true and H equals the number
    of classes. Otherwise the `head_names` attribute (JSON list) names them if it has H entries.
    """
    names = _json_attr(attrs.get("head_names"))
    per_class = bool(attrs.get("attention_per_class", False))
    classes = class_names(attrs)
    if per_class and len(classes) == n_heads:
        return [f"class {name}" for name in classes], True
    if isinstance(names, list) and len(names) == n_heads:
        return [str(name) for name in names], False
    return [f"branch {index}" for index in range(n_heads)], False


def score_maps(store: AttentionStore, keep: np.ndarray, per_head: bool) -> list[ScoreMap]:
    """Build the maps to draw for a store: the slide map first, then one per head if asked.

    The slide map of [N, H] attention is the head of the predicted class for per-class heads,
    else the mean over heads.
    """
    attention = store.attention[keep]
    if attention.ndim == 2 and attention.shape[1] == 1:
        attention = attention[:, 0]
    if attention.ndim == 1:
        return [ScoreMap("attention", "attention", attention.astype(np.float64))]
    names, per_class = head_names(store.attrs, attention.shape[1])
    predicted = predicted_class_name(store.attrs)
    if per_class and predicted is not None and f"class {predicted}" in names:
        column = names.index(f"class {predicted}")
        main = ScoreMap("attention", f"attention of predicted class {predicted}",
                        attention[:, column].astype(np.float64))
    else:
        main = ScoreMap("attention", f"attention, mean of {attention.shape[1]} heads",
                        attention.mean(axis=1, dtype=np.float64))
    maps = [main]
    if per_head:
        for column, name in enumerate(names):
            maps.append(ScoreMap(_file_label(name), f"attention, {name}",
                                 attention[:, column].astype(np.float64)))
    return maps


def tile_px_level0_of(store: AttentionStore) -> float:
    """Tile side in level-0 pixels from `tile_px_level0`, else CLAM's `patch_size_level0`.

    Raises:
        StoreFormatError: neither attribute is a positive number.
    """
    value = store.attrs.get("tile_px_level0", store.attrs.get("patch_size_level0"))
    try:
        size = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        size = math.nan
    if not (math.isfinite(size) and size > 0):
        raise StoreFormatError(
            f"{store.path}: attribute tile_px_level0 is missing or invalid ({value!r}); the "
            "attention store must carry the tile side in level-0 pixels. Rerun `slidemil "
            "predict` with feature stores written by `slidemil extract`."
        )
    return size


def check_store(store: AttentionStore) -> tuple[np.ndarray, int]:
    """Validate shapes and find the tiles with finite scores.

    Returns:
        keep: bool [N], True for rows whose scores are all finite.
        n_dropped: rows with a NaN or infinite score.

    Raises:
        StoreFormatError: attention and coords lengths differ, attention is not [N] or [N, H],
            or no tile has a finite score.
    """
    attention, coords = store.attention, store.coords
    if attention.ndim not in (1, 2):
        raise StoreFormatError(
            f"{store.path}: attention has shape {attention.shape}, expected [N] or [N, H]"
        )
    if attention.shape[0] != coords.shape[0]:
        raise StoreFormatError(
            f"{store.path}: attention has {attention.shape[0]} rows but coords has "
            f"{coords.shape[0]}; they must be row-aligned. Rerun `slidemil predict` for "
            "this slide."
        )
    finite = np.isfinite(attention)
    keep = finite if finite.ndim == 1 else finite.all(axis=1)
    n_dropped = int((~keep).sum())
    if n_dropped:
        first = np.flatnonzero(~keep)[:5].tolist()
        logger.warning("%s: dropped %d of %d tiles with NaN or infinite attention (rows %s%s)",
                       store.path, n_dropped, keep.size, first, ", ..." if n_dropped > 5 else "")
    if not keep.any():
        raise StoreFormatError(
            f"{store.path}: none of the {keep.size} tiles has a finite attention score; check "
            "the model and the feature store of this slide, then rerun `slidemil predict`."
        )
    return keep, n_dropped
