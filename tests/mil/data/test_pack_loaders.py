"""Packed loaders: PackedBatch contents, padding, labels, workers and the feature cache."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from data_stores import grid_coords, store_features

from mil.batch import PackedBatch
from mil.data.dataset import BagDataset
from mil.data.feature_cache import FeatureCache
from mil.data.packing import PackingConfig, build_eval_loader, build_train_loader
from preprocessing.errors import ConfigError

LENGTHS = [5, 300, 1200, 40, 0, 77, 640, 9]
LABELS = [0, 1, 2, 1, 0, 2, 0, 1]
DIM = 4

FeatureDir = Callable[[Sequence[int]], Path]


@pytest.fixture
def dataset(feature_dir: FeatureDir) -> BagDataset:
    folder = feature_dir(LENGTHS)
    return BagDataset(folder, labels={f"s{i}": label for i, label in enumerate(LABELS)})


def bag_tiles(batch: PackedBatch) -> list[list[tuple[str, int]]]:
    """(slide id, store row) of the rows of each bag, checking features and coords on the way."""
    assert batch.tile_index is not None
    assert batch.coords is not None
    bags = []
    rows_per_bag = batch.segments.split(torch.arange(batch.segments.total))
    for bag_id, rows in zip(batch.bag_ids, rows_per_bag, strict=True):
        members = bag_id.split("+")
        tiles = []
        for row in rows.tolist():
            store_row = int(batch.tile_index[row])
            slide = next(m for m in members if store_row < LENGTHS[int(m[1:])] and np.array_equal(
                batch.features[row].numpy(), store_features(m, LENGTHS[int(m[1:])], DIM)[
                    store_row]))
            assert batch.coords[row].tolist() == grid_coords(LENGTHS[int(slide[1:])])[
                store_row].tolist()
            tiles.append((slide, store_row))
        bags.append(tiles)
    return bags


def tiles_of(batch: PackedBatch) -> list[tuple[str, int]]:
    return [tile for tiles in bag_tiles(batch) for tile in tiles]


def check_padding(batch: PackedBatch) -> None:
    segments = batch.segments
    padding = ~segments.valid_mask()
    assert torch.all(segments.segment_ids()[padding] == segments.num_segments)
    assert torch.all(batch.features[padding] == 0)
    assert batch.tile_index is not None
    assert torch.all(batch.tile_index[padding] == -1)
    assert torch.all(batch.tile_index[~padding] >= 0)


def test_train_loader_batches(dataset: BagDataset) -> None:
    cfg = PackingConfig(pack_len=512, slides_per_hyperslide=3)
    loader = build_train_loader(dataset, cfg, n_classes=3, seed=0)

    seen: Counter[tuple[str, int]] = Counter()
    n_residual = 0
    for batch in loader:
        assert batch.features.shape == (512, DIM)
        assert batch.features.dtype == torch.float32
        assert batch.segments.offsets.dtype == torch.int32
        check_padding(batch)
        assert batch.labels is not None
        assert batch.labels.shape == (batch.num_bags, 3)
        assert torch.allclose(batch.labels.sum(1), torch.ones(batch.num_bags))
        assert batch.is_residual is not None
        tiles_per_bag = bag_tiles(batch)
        for tiles in tiles_per_bag:
            seen.update(tiles)
        for tiles, bag_id, is_residual, label in zip(
                tiles_per_bag, batch.bag_ids, batch.is_residual, batch.labels, strict=True):
            members = bag_id.split("+")
            if not is_residual:
                assert len(members) == 1
                assert label.tolist() == np.eye(3)[LABELS[int(members[0][1:])]].tolist()
                continue
            n_residual += 1
            share = np.zeros(3)
            counts = Counter(slide for slide, _ in tiles)
            assert set(counts) == set(members)
            for member in members:
                share[LABELS[int(member[1:])]] += counts[member] / len(tiles)
            assert np.allclose(label.numpy(), share, atol=1e-6)
    assert n_residual > 0
    assert max(seen.values()) == 1
    assert len(loader) == loader.stats.n_packs
    assert not any(slide == "s4" for slide, _ in seen)


def test_train_loader_same_seed_and_workers(dataset: BagDataset) -> None:
    cfg = PackingConfig(pack_len=700)
    serial = list(build_train_loader(dataset, cfg, 3, seed=4, epoch=1))
    workers = list(build_train_loader(dataset, cfg, 3, seed=4, epoch=1, num_workers=2))
    assert len(serial) == len(workers)
    for first, second in zip(serial, workers, strict=True):
        assert first.bag_ids == second.bag_ids
        assert torch.equal(first.features, second.features)
        assert first.segments.lengths == second.segments.lengths
        assert torch.equal(first.tile_index, second.tile_index)
    other_epoch = list(build_train_loader(dataset, cfg, 3, seed=4, epoch=2))
    assert [b.tile_index.tolist() for b in other_epoch] != [b.tile_index.tolist()
                                                            for b in serial]


def test_feature_cache_matches_store_reads(dataset: BagDataset) -> None:
    cfg = PackingConfig(pack_len=600)
    cache = FeatureCache(dataset, device="cpu", dtype=torch.float32)
    assert cache.features.shape == (sum(LENGTHS) + 1, DIM)
    stored = list(build_train_loader(dataset, cfg, 3, seed=2))
    cached = list(build_train_loader(dataset, cfg, 3, seed=2, feature_cache=cache))
    for first, second in zip(stored, cached, strict=True):
        assert first.bag_ids == second.bag_ids
        assert torch.equal(first.features, second.features)
        assert torch.equal(first.coords, second.coords)
        assert torch.equal(first.labels, second.labels)
        assert torch.equal(first.is_residual, second.is_residual)
        assert torch.equal(first.segments.offsets, second.segments.offsets)
    eval_cached = list(build_eval_loader(dataset, 500, feature_cache=cache))
    eval_stored = list(build_eval_loader(dataset, 500))
    for first, second in zip(eval_stored, eval_cached, strict=True):
        assert torch.equal(first.features, second.features)
        assert torch.equal(first.labels, second.labels)


def test_eval_loader_keeps_every_tile(dataset: BagDataset) -> None:
    loader = build_eval_loader(dataset, pack_len=512)

    seen: Counter[tuple[str, int]] = Counter()
    for batch in loader:
        check_padding(batch)
        assert batch.labels is not None
        assert batch.labels.dtype == torch.int64
        assert not batch.is_residual.any()
        if batch.segments.total > 512:
            assert batch.segments.lengths == (batch.segments.total,)
        seen.update(tiles_of(batch))
    expected = {(f"s{i}", row) for i, n in enumerate(LENGTHS) for row in range(n)}
    assert set(seen) == expected
    assert max(seen.values()) == 1


def test_eval_loader_without_labels(feature_dir: FeatureDir) -> None:
    dataset = BagDataset(feature_dir([3, 4]))
    batches = list(build_eval_loader(dataset, pack_len=16))
    assert len(batches) == 1
    assert batches[0].labels is None
    assert batches[0].bag_ids == ["s1", "s0"]


def test_train_loader_needs_tiles(feature_dir: FeatureDir) -> None:
    dataset = BagDataset(feature_dir([0, 0]), labels=[0, 1])
    with pytest.raises(ConfigError, match="none of the 2 training slides has tiles"):
        build_train_loader(dataset, PackingConfig(pack_len=8), 2, seed=0)


def test_train_loader_rejects_bad_labels(feature_dir: FeatureDir) -> None:
    folder = feature_dir([3, 4])
    with pytest.raises(ConfigError, match="no label"):
        build_train_loader(BagDataset(folder), PackingConfig(pack_len=8), 2, seed=0)
    with pytest.raises(ConfigError, match="outside 0..1"):
        build_train_loader(BagDataset(folder, labels=[0, 5]), PackingConfig(pack_len=8), 2,
                           seed=0)


def test_train_loader_ranks_are_disjoint(dataset: BagDataset) -> None:
    cfg = PackingConfig(pack_len=256)
    loaders = [build_train_loader(dataset, cfg, 3, seed=0, rank=r, world_size=2)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    ids = [tuple(batch.bag_ids) for loader in loaders for batch in loader]
    assert len(ids) == len(set(ids))


@pytest.mark.gpu
def test_feature_cache_on_cuda(dataset: BagDataset) -> None:
    cfg = PackingConfig(pack_len=600)
    cache = FeatureCache(dataset, device="cuda")
    assert cache.features.dtype == torch.float16
    for stored, cached in zip(build_train_loader(dataset, cfg, 3, seed=1),
                              build_train_loader(dataset, cfg, 3, seed=1, feature_cache=cache),
                              strict=True):
        assert cached.features.is_cuda
        assert cached.segments.offsets.is_cuda
        assert cached.bag_ids == stored.bag_ids
        torch.testing.assert_close(cached.features.cpu(), stored.features, rtol=1e-3, atol=1e-2)
        assert torch.equal(cached.tile_index.cpu(), stored.tile_index)
