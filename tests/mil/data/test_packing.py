"""Bin packing and PackMIL plans: every kept tile once, no pack overflows, seeds reproduce."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from pydantic import ValidationError

from mil.data.binpack import first_fit_decreasing, next_fit, packing_stats
from mil.data.packing import PackingConfig, PackPlan, plan_eval_packs, plan_train_packs


def random_lengths(seed: int, n: int = 60, high: int = 3000) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return np.exp(generator.uniform(0, np.log(high), n)).astype(np.int64) + 1


@pytest.mark.parametrize("packer", [first_fit_decreasing, next_fit])
@pytest.mark.parametrize("seed", range(4))
def test_bin_packing_places_every_item_once(
    packer: Callable[[list[int], int], list[list[int]]], seed: int
) -> None:
    lengths = random_lengths(seed, high=1000)
    packs = packer(lengths.tolist(), 1000)

    placed = sorted(i for pack in packs for i in pack)
    assert placed == list(range(len(lengths)))
    for pack in packs:
        assert sum(int(lengths[i]) for i in pack) <= 1000
        assert pack


def test_ffd_needs_no_more_packs_than_next_fit() -> None:
    for seed in range(10):
        lengths = random_lengths(seed, high=1000).tolist()
        assert len(first_fit_decreasing(lengths, 1000)) <= len(next_fit(lengths, 1000))


def test_ffd_example() -> None:
    assert first_fit_decreasing([4, 8, 1, 4, 2, 1], 10) == [[1, 4], [0, 3, 2, 5]]
    assert next_fit([4, 8, 1, 4, 2, 1], 10) == [[0], [1, 2], [3, 4, 5]]


@pytest.mark.parametrize("bad", [[0], [11], [-1]])
def test_bin_packing_rejects_bad_lengths(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="length"):
        first_fit_decreasing(bad, 10)


def test_packing_stats() -> None:
    stats = packing_stats([[0, 1], [2]], [3, 5, 4], 10)
    assert stats.padding_ratio == pytest.approx(0.4)
    assert stats.mean_bags_per_pack == 1.5
    assert (stats.min_bags_per_pack, stats.max_bags_per_pack) == (1, 2)
    assert "padding 40.00%" in stats.describe()


def kept_rows(plan: PackPlan) -> Counter[tuple[int, int]]:
    """(slide, store row) → how often the plan places it."""
    counts: Counter[tuple[int, int]] = Counter()
    for pack in plan.packs:
        for bag in pack:
            for part in bag.parts:
                counts.update((part.slide_index, int(row)) for row in plan.rows(part))
    return counts


CONFIGS = [
    PackingConfig(pack_len=2048),
    PackingConfig(pack_len=2048, main_fraction=1.0),
    PackingConfig(pack_len=2048, max_tiles_per_bag=700, slides_per_hyperslide=3),
    PackingConfig(pack_len=512, main_fraction=0.5, slides_per_hyperslide=1),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", [0, 7])
def test_train_plan_invariants(cfg: PackingConfig, seed: int) -> None:
    lengths = random_lengths(seed)
    lengths[3] = 0
    plan = plan_train_packs(lengths, cfg, seed=seed, epoch=2)

    for pack, pack_len in zip(plan.packs, plan.pack_lens, strict=True):
        assert pack_len == cfg.pack_len
        assert sum(bag.length for bag in pack) <= pack_len
        for bag in pack:
            assert 0 < bag.length <= cfg.bag_cap
            assert len(bag.parts) <= cfg.slides_per_hyperslide

    counts = kept_rows(plan)
    assert max(counts.values()) == 1, "a tile is in two packs"
    assert all(0 <= row < lengths[slide] for slide, row in counts)
    assert plan.skipped == [3]
    assert not any(slide == 3 for slide, _ in counts)

    main = [b for pack in plan.packs for b in pack if not b.is_residual]
    residual = [b for pack in plan.packs for b in pack if b.is_residual]
    assert sorted(b.parts[0].slide_index for b in main) == [
        i for i in range(len(lengths)) if lengths[i] > 0]
    if cfg.main_fraction == 1.0:
        assert not residual
    for bag in residual:
        slides = [part.slide_index for part in bag.parts]
        assert len(set(slides)) == len(slides)
        for part in bag.parts:
            assert part.length <= cfg.residual_cap


def test_main_and_residual_parts_disjoint() -> None:
    lengths = [1000, 50, 3, 1]
    cfg = PackingConfig(pack_len=4096, main_fraction=0.7)
    plan = plan_train_packs(lengths, cfg, seed=1)
    rows: dict[tuple[int, bool], set[int]] = {}
    for pack in plan.packs:
        for bag in pack:
            for part in bag.parts:
                rows[(part.slide_index, bag.is_residual)] = set(plan.rows(part).tolist())
    for slide, n_tiles in enumerate(lengths):
        main = rows[(slide, False)]
        residual = rows.get((slide, True), set())
        assert not main & residual
        expected_main = max(1, round(0.7 * n_tiles))
        assert len(main) == expected_main
        assert len(residual) == min(n_tiles - expected_main, cfg.residual_cap)
    assert (3, True) not in rows


def test_long_bag_is_subsampled_in_training() -> None:
    plan = plan_train_packs([10_000], PackingConfig(pack_len=1000), seed=0)
    counts = kept_rows(plan)
    main = [bag for pack in plan.packs for bag in pack if not bag.is_residual]
    assert main[0].length == 1000
    assert len(counts) == 1000 + 250


def test_same_seed_same_plan() -> None:
    lengths = random_lengths(3)
    cfg = PackingConfig(pack_len=1024)
    first = plan_train_packs(lengths, cfg, seed=11, epoch=4)
    second = plan_train_packs(lengths, cfg, seed=11, epoch=4)
    assert first.packs == second.packs
    assert kept_rows(first) == kept_rows(second)
    other_epoch = plan_train_packs(lengths, cfg, seed=11, epoch=5)
    assert kept_rows(other_epoch) != kept_rows(first)
    other_seed = plan_train_packs(lengths, cfg, seed=12, epoch=4)
    assert kept_rows(other_seed) != kept_rows(first)


def test_eval_plan_keeps_every_tile() -> None:
    lengths = [300, 5000, 1, 0, 1024, 999]
    plan = plan_eval_packs(lengths, 1024)

    counts = kept_rows(plan)
    expected = {(slide, row) for slide, n in enumerate(lengths) for row in range(n)}
    assert set(counts) == expected
    assert max(counts.values()) == 1
    assert plan.skipped == [3]
    long_packs = [(pack, n) for pack, n in zip(plan.packs, plan.pack_lens, strict=True)
                  if n > 1024]
    assert len(long_packs) == 1
    pack, pack_len = long_packs[0]
    assert pack_len == 5000
    assert [part.slide_index for part in pack[0].parts] == [1]
    for pack, pack_len in zip(plan.packs, plan.pack_lens, strict=True):
        assert sum(bag.length for bag in pack) <= pack_len
        assert all(len(bag.parts) == 1 for bag in pack)
        assert all(bag.parts[0].length == lengths[bag.parts[0].slide_index] for bag in pack)


def test_select_splits_packs_between_ranks() -> None:
    plan = plan_train_packs(random_lengths(0), PackingConfig(pack_len=1024), seed=0)
    parts = [plan.select(rank, 3, equal=True) for rank in range(3)]
    sizes = {len(part.packs) for part in parts}
    assert sizes == {len(plan.packs) // 3}
    chosen = [id(bag) for part in parts for pack in part.packs for bag in pack]
    assert len(chosen) == len(set(chosen))
    eval_plan = plan_eval_packs(random_lengths(0), 1024)
    eval_parts = [eval_plan.select(rank, 4, equal=False) for rank in range(4)]
    assert sum(len(part.packs) for part in eval_parts) == len(eval_plan.packs)


def test_balanced_sampling_draws_classes_equally() -> None:
    lengths = [100] * 200
    labels = [0] * 180 + [1] * 20
    cfg = PackingConfig(pack_len=4096, balanced_sampling=True, main_fraction=1.0)
    plan = plan_train_packs(lengths, cfg, seed=0, labels=labels)
    drawn = [labels[bag.parts[0].slide_index] for pack in plan.packs for bag in pack]
    assert len(drawn) == 200
    assert 70 <= drawn.count(1) <= 130


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="max_tiles_per_bag"):
        PackingConfig(pack_len=100, max_tiles_per_bag=200)
    with pytest.raises(ValidationError):
        PackingConfig(pack_length=100)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        PackingConfig(main_fraction=0.0)
    assert PackingConfig(pack_len=100).bag_cap == 100
    assert PackingConfig(pack_len=100, slides_per_hyperslide=3).residual_cap == 33
