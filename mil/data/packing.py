"""PackMIL packing: many bags per fixed-length pack, built in DataLoader workers.

PackMIL is described in Tang, Fang, Wu, Li and Cheng, "Revisiting Data Challenges of
Computational Pathology: A Pack-based Multiple Instance Learning Framework" (arXiv 2509.20923,
2025). This module implements its packing and hyperslides, not its attention downsampler.

Training (PackMIL): every epoch each bag's tiles are put in a seeded random order. The first
`main_fraction` of that order, capped at `max_tiles_per_bag`, is the bag's main part. The rest
is its residual part, capped so that `slides_per_hyperslide` residual parts fit one bag. Main
parts are packed into packs of `pack_len` rows with first-fit-decreasing. Residual parts of several
slides are concatenated into hyperslides whose soft label mixes the member labels by tile
count. Hyperslides are packed with the main parts and flagged `is_residual`, so the loss can
weight them by `residual_loss_weight`. Tiles beyond the caps are left out for that epoch only.

Inference never drops a tile: bags up to `pack_len` rows are packed whole with
first-fit-decreasing, and a longer bag gets a pack of its own, exactly as long as the bag, so
its prediction equals that of the unpacked bag.

A plan (which rows of which slides go into which pack) is computed in the main process from the
bag lengths alone. DataLoader workers read the rows and build the `PackedBatch`. The tile order
of a slide is regenerated in the worker from (seed, epoch, draw), so a plan stays small.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mil.batch import PackedBatch
from mil.data.binpack import PackingStats, first_fit_decreasing, next_fit, packing_stats
from mil.data.collate import PackedBag, collate, collate_labels, mix_labels
from mil.data.dataset import BagDataset
from mil.data.feature_cache import FeatureCache
from mil.kernels.segments import Segments
from preprocessing.errors import ConfigError

__all__ = [
    "BagPart",
    "PackLoader",
    "PackPlan",
    "PackingConfig",
    "PlannedBag",
    "build_eval_loader",
    "build_train_loader",
    "collate",
    "first_fit_decreasing",
    "next_fit",
    "plan_eval_packs",
    "plan_train_packs",
]

logger = logging.getLogger(__name__)


class PackingConfig(BaseModel):
    """Settings for splitting, capping and packing training bags (PackMIL)."""

    model_config = ConfigDict(extra="forbid")

    pack_len: int = Field(
        default=16384, ge=1, description="rows (tiles) per pack, padding included"
    )
    main_fraction: float = Field(
        default=0.8, gt=0.0, le=1.0,
        description="share of each shuffled training bag in its main part; the rest is its "
                    "residual part (1.0 turns hyperslides off)",
    )
    max_tiles_per_bag: int | None = Field(
        default=None, ge=1,
        description="cap on the tiles of a main part and of a hyperslide; default: pack_len",
    )
    slides_per_hyperslide: int = Field(
        default=4, ge=1, description="residual parts of this many slides form one hyperslide"
    )
    residual_loss_weight: float = Field(
        default=0.1, ge=0.0,
        description="weight of the hyperslide loss term relative to the main term",
    )
    shuffle_packs: bool = Field(
        default=True, description="visit the packs of an epoch in seeded order"
    )
    balanced_sampling: bool = Field(
        default=False,
        description="draw the bags of an epoch with replacement, each class equally likely",
    )

    @model_validator(mode="after")
    def _check_caps(self) -> PackingConfig:
        if self.max_tiles_per_bag is not None and self.max_tiles_per_bag > self.pack_len:
            raise ValueError(f"max_tiles_per_bag ({self.max_tiles_per_bag}) must not exceed "
                             f"pack_len ({self.pack_len})")
        return self

    @property
    def bag_cap(self) -> int:
        """Most tiles of a main part or a hyperslide."""
        return self.max_tiles_per_bag or self.pack_len

    @property
    def residual_cap(self) -> int:
        """Most tiles of one slide's residual part."""
        return max(1, self.bag_cap // self.slides_per_hyperslide)


@dataclass(frozen=True)
class BagPart:
    """Rows `start:stop` of one slide's tile order in this epoch.

    Attributes:
        slide_index: index of the slide in the `BagDataset`.
        start: first position in the tile order.
        stop: one past the last position.
        draw: position of the slide in this epoch's draw; it seeds the tile order, so two draws
            of one slide (balanced sampling) get independent orders.
    """

    slide_index: int
    start: int
    stop: int
    draw: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class PlannedBag:
    """One bag of a pack: a main part, a whole bag (inference) or a hyperslide."""

    parts: tuple[BagPart, ...]
    is_residual: bool = False

    @property
    def length(self) -> int:
        return sum(part.length for part in self.parts)


@dataclass
class PackPlan:
    """Assignment of slide rows to packs for one epoch (or for inference).

    Attributes:
        packs: the bags of each pack, in pack order.
        pack_lens: rows of each pack including padding.
        lengths: tiles of every slide of the data set.
        seed: seed of the tile orders; None keeps the store order (inference).
        epoch: epoch of the tile orders.
        skipped: indices of slides left out because they have no tiles.
    """

    packs: list[list[PlannedBag]]
    pack_lens: list[int]
    lengths: np.ndarray
    seed: int | None = None
    epoch: int = 0
    skipped: list[int] = field(default_factory=list)

    def tile_order(self, part: BagPart) -> np.ndarray:
        """Store rows of a slide in this epoch's order, int64 [n_tiles]."""
        n_tiles = int(self.lengths[part.slide_index])
        if self.seed is None:
            return np.arange(n_tiles, dtype=np.int64)
        generator = np.random.default_rng([self.seed, self.epoch, part.draw])
        return generator.permutation(n_tiles).astype(np.int64)

    def rows(self, part: BagPart) -> np.ndarray:
        """Store rows of `part`, sorted ascending (the store's order, which HDF5 reads fastest)."""
        return np.sort(self.tile_order(part)[part.start:part.stop])

    @property
    def stats(self) -> PackingStats:
        bags = [bag for pack in self.packs for bag in pack]
        index = {id(bag): i for i, bag in enumerate(bags)}
        return packing_stats(
            [[index[id(bag)] for bag in pack] for pack in self.packs],
            [bag.length for bag in bags],
            self.pack_lens,
        )

    def select(self, rank: int, world_size: int, equal: bool) -> PackPlan:
        """Return the plan of process `rank`: every `world_size`-th pack.

        With `equal` the remainder packs are dropped, so every process takes the same number of
        steps (training). Without it no pack is dropped (inference).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if world_size == 1:
            return self
        count = len(self.packs) // world_size * world_size if equal else len(self.packs)
        chosen = list(range(rank, count, world_size))
        return PackPlan(
            packs=[self.packs[i] for i in chosen],
            pack_lens=[self.pack_lens[i] for i in chosen],
            lengths=self.lengths, seed=self.seed, epoch=self.epoch, skipped=self.skipped,
        )


def _draw_slides(
    lengths: np.ndarray, labels: Sequence[int | None] | None, cfg: PackingConfig,
    generator: np.random.Generator,
) -> list[int]:
    """Slide indices of one epoch, in draw order; slides without tiles are never drawn."""
    usable = [i for i, n in enumerate(lengths.tolist()) if n > 0]
    if not cfg.balanced_sampling:
        return usable
    if labels is None or any(labels[i] is None for i in usable):
        raise ConfigError("balanced_sampling needs a label for every training slide")
    classes = np.asarray([labels[i] for i in usable])
    counts = {int(c): int((classes == c).sum()) for c in np.unique(classes)}
    weights = np.asarray([1.0 / counts[int(c)] for c in classes])
    drawn = generator.choice(len(usable), size=len(usable), replace=True, p=weights / weights.sum())
    return [usable[i] for i in drawn.tolist()]


def plan_train_packs(
    lengths: Sequence[int] | np.ndarray,
    cfg: PackingConfig,
    seed: int,
    epoch: int = 0,
    labels: Sequence[int | None] | None = None,
) -> PackPlan:
    """Split, cap and pack the bags of one training epoch (see the module docstring).

    Args:
        lengths: tiles of each slide.
        cfg: packing settings.
        seed: run seed; the same seed, epoch and lengths give the same plan.
        epoch: epoch number; each epoch draws other tile orders and hyperslides.
        labels: class index per slide, needed by `balanced_sampling` only.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    generator = np.random.default_rng([seed, epoch, 1 << 20])
    draws = _draw_slides(lengths, labels, cfg, generator)

    bags: list[PlannedBag] = []
    residual_parts: list[BagPart] = []
    for draw, slide_index in enumerate(draws):
        n_tiles = int(lengths[slide_index])
        n_main = n_tiles if cfg.main_fraction >= 1.0 else min(
            n_tiles, max(1, round(cfg.main_fraction * n_tiles)))
        bags.append(PlannedBag((BagPart(slide_index, 0, min(n_main, cfg.bag_cap), draw),)))
        if n_main < n_tiles:
            stop = n_main + min(n_tiles - n_main, cfg.residual_cap)
            residual_parts.append(BagPart(slide_index, n_main, stop, draw))

    order = generator.permutation(len(residual_parts)).tolist()
    shuffled = [residual_parts[i] for i in order]
    for start in range(0, len(shuffled), cfg.slides_per_hyperslide):
        group = tuple(shuffled[start:start + cfg.slides_per_hyperslide])
        bags.append(PlannedBag(group, is_residual=True))

    packs = [[bags[i] for i in pack]
             for pack in first_fit_decreasing([bag.length for bag in bags], cfg.pack_len)]
    if cfg.shuffle_packs:
        packs = [packs[i] for i in generator.permutation(len(packs)).tolist()]
    plan = PackPlan(
        packs=packs, pack_lens=[cfg.pack_len] * len(packs), lengths=lengths, seed=seed,
        epoch=epoch, skipped=[i for i, n in enumerate(lengths.tolist()) if n == 0],
    )
    return plan


def plan_eval_packs(lengths: Sequence[int] | np.ndarray, pack_len: int) -> PackPlan:
    """Pack whole bags for inference; a bag longer than `pack_len` gets its own exact-length pack.

    Slides without tiles are left out (listed in `skipped`).
    """
    if pack_len < 1:
        raise ValueError(f"pack_len must be >= 1, got {pack_len}")
    lengths = np.asarray(lengths, dtype=np.int64)
    fitting = [i for i, n in enumerate(lengths.tolist()) if 0 < n <= pack_len]
    long = [i for i, n in enumerate(lengths.tolist()) if n > pack_len]
    bags = [PlannedBag((BagPart(i, 0, int(lengths[i]), i),)) for i in fitting]
    packs = [[bags[i] for i in pack]
             for pack in first_fit_decreasing([bag.length for bag in bags], pack_len)]
    pack_lens = [pack_len] * len(packs)
    for i in long:
        packs.append([PlannedBag((BagPart(i, 0, int(lengths[i]), i),))])
        pack_lens.append(int(lengths[i]))
    return PackPlan(packs=packs, pack_lens=pack_lens, lengths=lengths, seed=None,
                    skipped=[i for i, n in enumerate(lengths.tolist()) if n == 0])


class PackDataset(torch.utils.data.Dataset[PackedBatch]):
    """Item k is pack k of a plan, read from the bag data set and collated; runs in workers."""

    def __init__(self, dataset: BagDataset, plan: PackPlan, n_classes: int | None,
                 soft_labels: bool) -> None:
        self.dataset = dataset
        self.plan = plan
        self.n_classes = n_classes
        self.soft_labels = soft_labels

    def __len__(self) -> int:
        return len(self.plan.packs)

    def __getitem__(self, index: int) -> PackedBatch:
        bags = [self.read_bag(bag) for bag in self.plan.packs[index]]
        return collate(bags, self.plan.pack_lens[index], self.n_classes, self.soft_labels,
                       dim=self.dataset.dim)

    def read_bag(self, planned: PlannedBag) -> PackedBag:
        features, coords, tile_index, labels, counts, ids = [], [], [], [], [], []
        for part in planned.parts:
            part_features, part_coords, part_rows = self.dataset.read_arrays(
                part.slide_index, self.plan.rows(part))
            features.append(part_features)
            coords.append(part_coords)
            tile_index.append(part_rows)
            labels.append(self.dataset.labels[part.slide_index])
            counts.append(part.length)
            ids.append(self.dataset.slide_ids[part.slide_index])
        return PackedBag(
            bag_id="+".join(ids),
            features=np.concatenate(features) if len(features) > 1 else features[0],
            coords=np.concatenate(coords) if len(coords) > 1 else coords[0],
            tile_index=np.concatenate(tile_index) if len(tile_index) > 1 else tile_index[0],
            label=_bag_label(planned, labels, counts, self.n_classes),
            is_residual=planned.is_residual,
        )


def _bag_label(
    planned: PlannedBag, labels: list[int | None], counts: list[int], n_classes: int | None
) -> int | np.ndarray | None:
    if any(label is None for label in labels):
        return None
    hard = [int(label) for label in labels if label is not None]
    if not planned.is_residual:
        return hard[0]
    if n_classes is None:
        raise ValueError("hyperslide labels need n_classes")
    return mix_labels(hard, counts, n_classes)


class PackLoader:
    """Iterable of the `PackedBatch` objects of one plan, with its packing statistics.

    Without a feature cache the packs are read and collated by a DataLoader (in its worker
    processes when `num_workers` > 0) and arrive on the CPU. With a cache they are gathered
    in the main process and arrive on the cache's device.

    Attributes:
        plan: the plan of this epoch (or of inference).
        stats: padding ratio and bags per pack of the plan.
    """

    def __init__(
        self,
        pack_dataset: PackDataset,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        self.pack_dataset = pack_dataset
        self.plan = pack_dataset.plan
        self.stats = self.plan.stats
        self.feature_cache = feature_cache
        self.loader: torch.utils.data.DataLoader[PackedBatch] = torch.utils.data.DataLoader(
            pack_dataset,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers if feature_cache is None else 0,
            pin_memory=pin_memory and feature_cache is None,
            prefetch_factor=prefetch_factor if num_workers > 0 and feature_cache is None
            else None,
        )

    def __len__(self) -> int:
        return len(self.plan.packs)

    def __iter__(self) -> Iterator[PackedBatch]:
        if self.feature_cache is None:
            yield from self.loader
            return
        for index in range(len(self.plan.packs)):
            yield gather_cached_pack(self.pack_dataset, self.feature_cache, index)


def gather_cached_pack(
    pack_dataset: PackDataset, cache: FeatureCache, index: int
) -> PackedBatch:
    """Pack `index` of a plan with its features gathered from `cache`, on the cache's device."""
    plan, dataset = pack_dataset.plan, pack_dataset.dataset
    pack, pack_len = plan.packs[index], plan.pack_lens[index]
    global_rows, coords, tile_index, labels, bag_ids, lengths = [], [], [], [], [], []
    for bag in pack:
        part_labels, part_ids = [], []
        for part in bag.parts:
            rows = plan.rows(part)
            cache_rows = cache.global_rows(part.slide_index, rows)
            global_rows.append(cache_rows)
            coords.append(cache.coords[cache_rows])
            tile_index.append(rows)
            part_labels.append(dataset.labels[part.slide_index])
            part_ids.append(dataset.slide_ids[part.slide_index])
        labels.append(_bag_label(bag, part_labels, [p.length for p in bag.parts],
                                 pack_dataset.n_classes))
        bag_ids.append("+".join(part_ids))
        lengths.append(bag.length)

    n_valid = sum(lengths)
    padding = pack_len - n_valid
    all_rows = np.concatenate(global_rows + [np.full(padding, cache.padding_row, np.int64)])
    all_coords = np.concatenate(coords + [np.zeros((padding, 2), np.int64)])
    all_tile_index = np.concatenate(tile_index + [np.full(padding, -1, np.int64)])
    batch = PackedBatch(
        features=cache.gather(all_rows),
        segments=Segments.from_lengths(lengths, total=pack_len),
        labels=collate_labels(labels, pack_dataset.n_classes, pack_dataset.soft_labels, bag_ids),
        bag_ids=bag_ids,
        coords=torch.from_numpy(all_coords),
        is_residual=torch.tensor([bag.is_residual for bag in pack], dtype=torch.bool),
        tile_index=torch.from_numpy(all_tile_index),
    )
    return batch.to(cache.device, non_blocking=True)


def build_train_loader(
    dataset: BagDataset,
    packing_cfg: PackingConfig,
    n_classes: int,
    seed: int,
    num_workers: int = 0,
    epoch: int = 0,
    feature_cache: FeatureCache | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> PackLoader:
    """Packed training batches of one epoch (build one loader per epoch).

    Labels are float [B, C]: one-hot for main parts, mixed by tile count for hyperslides
    (`is_residual` True). The same dataset, config, seed and epoch give the same packs for
    any `num_workers`.

    Args:
        dataset: training bags with a class index for every slide.
        packing_cfg: packing settings.
        n_classes: C.
        seed: run seed.
        num_workers: DataLoader worker processes that read and collate packs.
        epoch: epoch number, which selects tile orders, hyperslides and pack order.
        feature_cache: gather features from this device-resident cache instead of the stores;
            the packs are then built in the main process directly on the cache's device.
        rank: index of this process under DDP.
        world_size: number of DDP processes. Each takes every `world_size`-th pack, and all
            take the same number, so up to `world_size - 1` packs of the epoch are left out.
        pin_memory: page-locked batches for faster host-to-GPU copies.
        prefetch_factor: packs each worker reads ahead (DataLoader default when None).
    """
    missing = [dataset.slide_ids[i] for i, label in enumerate(dataset.labels) if label is None]
    if missing:
        raise ConfigError(f"{len(missing)} training slide(s) have no label, first: "
                          f"{missing[:5]}; pass labels for every training slide")
    bad = [label for label in dataset.labels if label is not None and not 0 <= label < n_classes]
    if bad:
        raise ConfigError(f"class indices {sorted(set(bad))} outside 0..{n_classes - 1}")
    if not (dataset.lengths > 0).any():
        raise ConfigError(f"none of the {len(dataset)} training slides has tiles; check the "
                          "tiling manifest (status no_tissue) and the feature folder")
    plan = plan_train_packs(dataset.lengths, packing_cfg, seed, epoch, dataset.labels)
    plan = plan.select(rank, world_size, equal=True)
    logger.info("epoch %d packing: %s", epoch, plan.stats.describe())
    pack_dataset = PackDataset(dataset, plan, n_classes, soft_labels=True)
    return PackLoader(pack_dataset, num_workers, pin_memory, prefetch_factor, feature_cache)


def build_eval_loader(
    dataset: BagDataset,
    pack_len: int,
    num_workers: int = 0,
    feature_cache: FeatureCache | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> PackLoader:
    """Packed inference batches holding every tile of every slide with tiles.

    Bags up to `pack_len` tiles are packed whole with first-fit-decreasing. A longer bag is
    alone in a pack of exactly its length, so no tile is dropped and no bag is chunked.
    Labels are int64 [B], or None when the data set has no labels. Slides without tiles are
    left out with a warning. Under DDP each process takes every `world_size`-th pack.
    """
    plan = plan_eval_packs(dataset.lengths, pack_len).select(rank, world_size, equal=False)
    if plan.skipped:
        logger.warning("%d slide(s) without tiles get no prediction: %s", len(plan.skipped),
                       ", ".join(dataset.slide_ids[i] for i in plan.skipped[:10]))
    long = sum(1 for n in plan.pack_lens if n > pack_len)
    logger.info("inference packing: %s; %d bag(s) longer than %d tiles packed alone",
                plan.stats.describe(), long, pack_len)
    pack_dataset = PackDataset(dataset, plan, n_classes=None, soft_labels=False)
    return PackLoader(pack_dataset, num_workers, pin_memory, prefetch_factor, feature_cache)
