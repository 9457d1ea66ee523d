"""Bags, labels, splits and PackMIL packing of feature stores for training and inference."""

from mil.data.binpack import PackingStats, first_fit_decreasing, next_fit, packing_stats
from mil.data.collate import PackedBag, collate
from mil.data.dataset import Bag, BagDataset, find_feature_stores
from mil.data.feature_cache import FeatureCache
from mil.data.labels import (
    ClassMap,
    JoinReport,
    LabelRow,
    LabelTable,
    join_labels,
    normalize_label,
    read_labels,
)
from mil.data.packing import (
    PackingConfig,
    PackLoader,
    PackPlan,
    build_eval_loader,
    build_train_loader,
    plan_eval_packs,
    plan_train_packs,
)
from mil.data.splits import (
    Split,
    check_split,
    kfold_splits,
    load_splits,
    save_splits,
    splits_from_column,
    train_val_split,
)

__all__ = [
    "Bag",
    "BagDataset",
    "ClassMap",
    "FeatureCache",
    "JoinReport",
    "LabelRow",
    "LabelTable",
    "PackLoader",
    "PackPlan",
    "PackedBag",
    "PackingConfig",
    "PackingStats",
    "Split",
    "build_eval_loader",
    "build_train_loader",
    "check_split",
    "collate",
    "find_feature_stores",
    "first_fit_decreasing",
    "join_labels",
    "kfold_splits",
    "load_splits",
    "next_fit",
    "normalize_label",
    "packing_stats",
    "plan_eval_packs",
    "plan_train_packs",
    "read_labels",
    "save_splits",
    "splits_from_column",
    "train_val_split",
]
