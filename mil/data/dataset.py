"""Bags of tile features read lazily from per-slide feature stores.

A bag is one slide: its tile features [N, D], the level-0 (x, y) coordinates of the tiles and
the slide's label. `BagDataset` opens each store only while it reads from it, so it can be
pickled into DataLoader worker processes. Every read is checked for two-dimensional features of
the data set's dimension, as many feature rows as coords, and no NaN or infinite value. Errors
name the slide, the file and the first bad row.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from preprocessing.errors import ConfigError, DuplicateSlideIdError, StoreFormatError
from preprocessing.importers import (
    FeatureFileFormat,
    detect_feature_format,
    read_feature_file,
)
from preprocessing.stores import FeatureStore, open_feature_store

logger = logging.getLogger(__name__)

#: Suffixes of the feature files that `find_feature_stores` lists.
FEATURE_STORE_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5", ".zarr", ".pt")

#: Estimated cost of reading one row through an HDF5 point selection, in bytes of a contiguous
#: read that take as long. A subset of rows is read by selection only when it is cheaper than
#: reading the whole store and indexing in memory.
# NOTE: estimated with h5py 3.16 on a local disk with a warm page cache, where a selected row
# took about 80 µs and a full read ran at 0.9 GB/s. Other file systems move the break-even point.
POINT_READ_COST_BYTES = 65536


@dataclass
class Bag:
    """One slide's tiles.

    Attributes:
        slide_id: the slide id (feature store name without suffix).
        features: float32 [N, D] tile features.
        coords: int64 [N, 2] level-0 (x, y) top-left corners of the tiles.
        label: class index, or None when the data set has no labels.
        tile_index: int64 [N] row of each tile in the slide's feature store.
    """

    slide_id: str
    features: torch.Tensor
    coords: torch.Tensor
    label: int | None = None
    tile_index: torch.Tensor | None = None

    @property
    def n_tiles(self) -> int:
        return int(self.features.shape[0])


def _is_store_name(path: Path) -> bool:
    unfinished = ".tmp-" in path.name or ".old-" in path.name
    return path.suffix in FEATURE_STORE_SUFFIXES and not unfinished


def find_feature_stores(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Slide id → feature file for every feature file directly inside `directory`.

    Reads slidemil stores (`.h5`, `.zarr`) and the files of CLAM, TRIDENT and STAMP (`.h5`,
    `.hdf5`, CLAM `.pt`). A CLAM output folder that keeps its files in `h5_files/` is read from
    there. An HDF5 file wins over a CLAM `.pt` file of the same slide. Temporary files of an
    unfinished write (`*.tmp-<pid>`) are ignored.

    Raises:
        StoreFormatError: `directory` does not exist.
        DuplicateSlideIdError: one slide id has two stores (`a.h5` and `a.zarr`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreFormatError(f"feature folder {directory} not found; run `slidemil extract` "
                               "or pass the folder holding <slide_id>.h5 files")
    candidates = [path for path in directory.iterdir() if _is_store_name(path)]
    if not candidates and (directory / "h5_files").is_dir():
        candidates = [path for path in (directory / "h5_files").iterdir() if _is_store_name(path)]
    stores: dict[str, Path] = {}
    for path in sorted(candidates, key=lambda p: (p.suffix == ".pt", p.name)):
        slide_id = path.name[: -len(path.suffix)]
        if slide_id in stores:
            if path.suffix == ".pt":
                continue
            raise DuplicateSlideIdError(
                f"slide {slide_id} has two feature stores, {stores[slide_id]} and {path}; "
                "delete one of them"
            )
        stores[slide_id] = path
    return dict(sorted(stores.items()))


def detect_source_format(path: Path) -> FeatureFileFormat:
    """Layout of a feature file: `slidemil` for zarr folders, else as the importers detect it."""
    if path.suffix == ".zarr":
        return "slidemil"
    return detect_feature_format(path)


class ImportedSource:
    """A CLAM, TRIDENT or STAMP feature file, read whole, with the `FeatureStore` interface.

    Files without level-0 pixel coordinates (CLAM `.pt`, STAMP µm coordinates of a slide whose
    mpp is unknown) get coords of -1, so they train and predict but cannot be drawn as heatmaps.
    """

    def __init__(self, path: Path, source_format: FeatureFileFormat) -> None:
        imported = read_feature_file(path, source_format)
        self.path = path
        self.attrs = imported.attrs
        self._features = imported.features
        if imported.coords is None:
            logger.warning("%s (%s) has no level-0 pixel coordinates; its tiles get coords -1 "
                           "and no heatmap can be drawn", path, source_format)
            self.coords = np.full((imported.n_tiles, 2), -1, dtype=np.int64)
        else:
            self.coords = imported.coords

    @property
    def n_tiles(self) -> int:
        return int(self._features.shape[0])

    @property
    def dim(self) -> int:
        return int(self._features.shape[1])

    def read_features(self, rows: np.ndarray | None = None) -> np.ndarray:
        return self._features if rows is None else self._features[rows]

    def close(self) -> None:
        """Nothing to close: the file was read whole when opened."""


def probe_shape(path: Path, source_format: FeatureFileFormat) -> tuple[int, int]:
    """Tiles N and feature dimension D of a feature file, reading no features where possible.

    slidemil stores are opened (which validates them); CLAM, TRIDENT and STAMP HDF5 files are
    read for their dataset shape only, and CLAM `.pt` files are loaded whole.
    """
    if source_format in ("slidemil", "clam_pt"):
        with open_source(path, source_format) as store:
            return store.n_tiles, store.dim
    name = "feats" if source_format == "stamp" else "features"
    try:
        with h5py.File(path, "r") as handle:
            shape = tuple(handle[name].shape) if name in handle else None
    except OSError as err:
        raise StoreFormatError(f"{path}: not a readable HDF5 file ({err}); copy it again or "
                               "re-extract the slide") from err
    if shape is not None and len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]  # some CLAM forks store [1, N, D]
    if shape is None or len(shape) != 2:
        raise StoreFormatError(f"{path}: a {source_format} file needs a {name!r} dataset of "
                               f"shape (N, D), found {shape}; re-extract the slide")
    return int(shape[0]), int(shape[1])


@contextmanager
def open_source(path: Path, source_format: FeatureFileFormat = "slidemil") -> Iterator[
        FeatureStore | ImportedSource]:
    """Open a feature file for reading and close it on exit.

    slidemil stores are read lazily through `open_feature_store`; files of other pipelines are
    read whole.
    """
    store: FeatureStore | ImportedSource
    if source_format == "slidemil":
        store = open_feature_store(path)
    else:
        store = ImportedSource(path, source_format)
    try:
        yield store
    finally:
        store.close()


class BagDataset(torch.utils.data.Dataset[Bag]):
    """Slides of a feature folder (or explicit store paths) as bags, read on demand.

    Args:
        features: a folder of `<slide_id>.h5|.zarr` stores, a mapping slide id → store path,
            or a sequence of store paths (the slide id is the file name without suffix).
        slide_ids: slides to use, in this order; default: every store, sorted by id.
        labels: class index per slide, as a sequence aligned with `slide_ids` or a mapping
            slide id → index; None for unlabelled data (prediction).
        cache: keep each bag's features in memory after its first read, as stored (float16
            stores stay float16). Each DataLoader worker process keeps its own cache.
        max_tiles: for training only: `dataset[i]` returns at most this many tiles of a bag,
            drawn without replacement with a generator seeded by (`seed`, epoch, i). The
            packed loaders apply their own cap and ignore this one.
        seed: seed of the tile cap.

    Raises:
        StoreFormatError: a store is missing, unreadable or has the wrong dimension.
        IncompleteStoreError: a store was never completed.
        ConfigError: labels do not align with the slides.
    """

    def __init__(
        self,
        features: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]
        | Sequence[str | os.PathLike[str]],
        slide_ids: Sequence[str] | None = None,
        labels: Sequence[int | None] | Mapping[str, int] | None = None,
        cache: bool = False,
        max_tiles: int | None = None,
        seed: int = 0,
    ) -> None:
        paths = _resolve_paths(features)
        if slide_ids is None:
            slide_ids = sorted(paths)
        missing = [slide_id for slide_id in slide_ids if slide_id not in paths]
        if missing:
            raise StoreFormatError(
                f"no feature store for {len(missing)} slide(s), first: {missing[:5]}; "
                "run `slidemil extract` for them or drop them from the label file"
            )
        if len(set(slide_ids)) != len(slide_ids):
            raise DuplicateSlideIdError(f"slide ids repeat in {list(slide_ids)}")
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1 or None, got {max_tiles}")

        self.slide_ids: list[str] = list(slide_ids)
        self.paths: list[Path] = [paths[slide_id] for slide_id in self.slide_ids]
        self.labels: list[int | None] = _align_labels(self.slide_ids, labels)
        self.max_tiles = max_tiles
        self.seed = seed
        self.epoch = 0
        self.cache_enabled = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        self.formats: list[FeatureFileFormat] = [detect_source_format(p) for p in self.paths]
        lengths, dims = [], set()
        for slide_id, path, source_format in zip(self.slide_ids, self.paths, self.formats,
                                                 strict=True):
            n_tiles, dim = probe_shape(path, source_format)
            lengths.append(n_tiles)
            if n_tiles:
                dims.add((dim, slide_id, path))
        self.lengths = np.asarray(lengths, dtype=np.int64)
        dim_values = sorted({dim for dim, _, _ in dims})
        if len(dim_values) > 1:
            examples = {dim: (slide_id, str(path)) for dim, slide_id, path in sorted(dims)}
            raise StoreFormatError(
                f"feature stores have different dimensions {dim_values}: {examples}; "
                "use stores of one backbone"
            )
        self.dim = dim_values[0] if dim_values else 0
        empty = [slide_id for slide_id, n in zip(self.slide_ids, lengths, strict=True) if n == 0]
        if empty:
            logger.warning("%d slide(s) have no tiles and are left out of packed batches: %s",
                           len(empty), ", ".join(empty[:10]))

    def __len__(self) -> int:
        return len(self.slide_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose seed draws the capped tiles of `dataset[i]`."""
        self.epoch = epoch

    def index_of(self, slide_id: str) -> int:
        return self.slide_ids.index(slide_id)

    def __getitem__(self, index: int) -> Bag:
        n_tiles = int(self.lengths[index])
        rows = None
        if self.max_tiles is not None and n_tiles > self.max_tiles:
            generator = np.random.default_rng([self.seed, self.epoch, index])
            rows = np.sort(generator.choice(n_tiles, self.max_tiles, replace=False))
        return self.read(index, rows)

    def read(self, index: int, rows: np.ndarray | None = None) -> Bag:
        """Read bag `index`, all tiles or the store rows `rows` in the given order, no cap."""
        features, coords, tile_index = self.read_arrays(index, rows)
        return Bag(
            slide_id=self.slide_ids[index],
            features=torch.from_numpy(features.astype(np.float32, copy=False)),
            coords=torch.from_numpy(coords),
            label=self.labels[index],
            tile_index=torch.from_numpy(tile_index),
        )

    def read_arrays(
        self, index: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features [n, D] as stored, coords int64 [n, 2] and store rows int64 [n] of a bag."""
        n_tiles = int(self.lengths[index])
        if rows is None:
            tile_index = np.arange(n_tiles, dtype=np.int64)
        else:
            tile_index = np.asarray(rows, dtype=np.int64).reshape(-1)
            if tile_index.size and (tile_index.min() < 0 or tile_index.max() >= n_tiles):
                raise IndexError(f"rows outside 0..{n_tiles - 1} requested from slide "
                                 f"{self.slide_ids[index]}")
        cached = self._cache.get(index)
        if cached is not None:
            features, coords = cached
            if rows is None:
                return features, coords, tile_index
            return features[tile_index], coords[tile_index], tile_index

        if self.cache_enabled or rows is None:
            features, coords = self._read_store(index, None)
            if self.cache_enabled:
                self._cache[index] = (features, coords)
            if rows is not None:
                features, coords = features[tile_index], coords[tile_index]
            return features, coords, tile_index
        features, coords = self._read_store(index, tile_index)
        return features, coords, tile_index

    def _read_store(
        self, index: int, rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        slide_id, path = self.slide_ids[index], self.paths[index]
        try:
            with open_source(path, self.formats[index]) as store:
                if store.n_tiles != int(self.lengths[index]):
                    raise StoreFormatError(
                        f"slide {slide_id}: {path} now has {store.n_tiles} tiles, "
                        f"{int(self.lengths[index])} when the data set was opened; the store "
                        "was rewritten during training. Restart the run"
                    )
                features = read_rows(store, rows)
                coords = store.coords if rows is None else store.coords[rows]
        except OSError as err:
            raise StoreFormatError(
                f"slide {slide_id}: reading {path} failed ({err}); rerun `slidemil extract`, "
                "which rebuilds damaged stores, or delete the file first"
            ) from err
        check_features(slide_id, path, features, coords, self.dim, rows)
        return features, np.ascontiguousarray(coords, dtype=np.int64)

    def iter_bags(self) -> Iterator[Bag]:
        """Yield every bag in order with all its tiles (no cap)."""
        for index in range(len(self)):
            yield self.read(index)


def read_rows(store: FeatureStore | ImportedSource, rows: np.ndarray | None) -> np.ndarray:
    """Features [n, D] of `rows` (all rows when None) in the given order, as stored.

    A selection costs about `POINT_READ_COST_BYTES` per row, so a large share of a store is
    read whole and indexed in memory instead.
    """
    if rows is None or isinstance(store, ImportedSource):
        return store.read_features(rows)
    row_bytes = store.dim * store.features.dtype.itemsize
    if rows.size * POINT_READ_COST_BYTES >= store.n_tiles * row_bytes:
        return store.read_features(None)[rows]
    return store.read_features(rows)


def check_features(
    slide_id: str,
    path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    dim: int,
    rows: np.ndarray | None = None,
) -> None:
    """Validate features read from a store.

    Args:
        slide_id: slide the rows belong to, named in errors.
        path: store the rows came from, named in errors.
        features: [n, D] features.
        coords: [n, 2] coords read for the same rows.
        dim: expected D.
        rows: store row of each feature row, to name the bad row; None means rows 0..n-1.

    Raises:
        StoreFormatError: wrong shape, rows and coords of different lengths, or a non-finite value.
    """
    if features.ndim != 2 or (features.shape[0] and features.shape[1] != dim):
        raise StoreFormatError(
            f"slide {slide_id}: {path} has features of shape {features.shape}, expected "
            f"(N, {dim}); extract all slides with one backbone"
        )
    if coords.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise StoreFormatError(
            f"slide {slide_id}: {path} has {features.shape[0]} feature rows but coords of shape "
            f"{coords.shape}; rerun `slidemil extract`, which rebuilds such stores"
        )
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        first = int(bad[0]) if rows is None else int(rows[bad[0]])
        raise StoreFormatError(
            f"slide {slide_id}: {path} has NaN or infinite features in {bad.size} row(s), first "
            f"at row {first}; rerun `slidemil extract`, which rebuilds such stores (check the "
            "backbone weights, or use --dtype float32 when values overflow float16)"
        )


def _resolve_paths(
    features: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]
    | Sequence[str | os.PathLike[str]],
) -> dict[str, Path]:
    if isinstance(features, str | os.PathLike):
        return find_feature_stores(features)
    if isinstance(features, Mapping):
        return {str(slide_id): Path(path) for slide_id, path in features.items()}
    paths: dict[str, Path] = {}
    for item in features:
        path = Path(item)
        slide_id = path.name[: -len(path.suffix)] if path.suffix else path.name
        if slide_id in paths:
            raise DuplicateSlideIdError(f"slide {slide_id} is given twice: {paths[slide_id]} "
                                        f"and {path}")
        paths[slide_id] = path
    return paths


def _align_labels(
    slide_ids: list[str], labels: Sequence[int | None] | Mapping[str, int] | None
) -> list[int | None]:
    if labels is None:
        return [None] * len(slide_ids)
    if isinstance(labels, Mapping):
        missing = [slide_id for slide_id in slide_ids if slide_id not in labels]
        if missing:
            raise ConfigError(f"no label for {len(missing)} slide(s), first: {missing[:5]}; "
                              "join the label file first and pass only matched slides")
        values: list[int | None] = [labels[slide_id] for slide_id in slide_ids]
    else:
        values = list(labels)
        if len(values) != len(slide_ids):
            raise ConfigError(f"{len(values)} labels for {len(slide_ids)} slides; pass one label "
                              "per slide")
    out: list[int | None] = []
    for slide_id, value in zip(slide_ids, values, strict=True):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"label {value!r} of slide {slide_id} is not a class index; map "
                              "labels with ClassMap.index first")
        out.append(int(value))
    return out
