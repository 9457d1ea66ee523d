"""Per-slide stores: coords, features and attention, in HDF5 (default) or zarr.

Every store is written to `<name>.tmp-<pid>` and moved into place with `os.replace` once all
data is written; the attribute `complete=True` is set last. Readers reject stores without it,
so a killed job never leaves a file that later stages mistake for a finished one.

Coordinates are level-0 pixels, top-left corner, (x, y), int64.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import h5py
import numpy as np

from preprocessing.errors import (
    IncompleteStoreError,
    StoreFormatError,
    StoreWriteError,
)

logger = logging.getLogger(__name__)

StoreFormat = Literal["h5", "zarr"]
STORE_SUFFIXES: dict[str, str] = {"h5": ".h5", "zarr": ".zarr"}


def feature_store_path(directory: Path, slide_id: str, fmt: StoreFormat = "h5") -> Path:
    """Path of the store of `slide_id` in `directory` for the given format."""
    return Path(directory) / f"{slide_id}{STORE_SUFFIXES[fmt]}"


def store_format(path: Path) -> StoreFormat:
    """Format of a store from its suffix (`.zarr` is zarr, anything else HDF5)."""
    return "zarr" if Path(path).suffix == ".zarr" else "h5"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _move_into_place(tmp: Path, path: Path) -> None:
    """Replace `path` by `tmp`; a zarr folder cannot be replaced in one rename, so the old one
    is renamed aside first and removed after."""
    if tmp.is_dir() and path.exists():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def replace_text(path: Path, text: str) -> bool:
    """Write `text` to `path` atomically, unless the file already contains exactly that text.

    An unchanged file keeps its modification time, so a rerun that redoes nothing changes no
    file. Returns True when the file was written.
    """
    data = text.encode("utf-8")  # bytes, so that CSV line endings are compared as written
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _clean_attr(value: Any) -> Any:
    """Convert an attribute value to a type both HDF5 and zarr (JSON) store unchanged."""
    if value is None:
        return ""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_clean_attr(item) for item in value]
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _read_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def is_complete_store(path: Path) -> bool:
    """True when `path` exists, opens and carries `complete=True`."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        with _open_group(path) as group:
            return bool(group.attrs.get("complete", False))
    except (OSError, ValueError, KeyError, StoreFormatError):
        return False


@contextmanager
def _open_group(path: Path) -> Iterator[Any]:
    """Open a store read-only as an h5py File or zarr Group."""
    if store_format(path) == "zarr":
        import zarr

        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as err:  # zarr raises several unrelated types for unreadable folders
            raise StoreFormatError(
                f"{path}: not a readable zarr store ({err}). Delete it and rerun the stage."
            ) from err
        yield group
    else:
        try:
            handle = h5py.File(path, "r")
        except OSError as err:
            raise StoreFormatError(
                f"{path}: not a readable HDF5 file ({err}); it is probably truncated. "
                "Delete it and rerun the stage that wrote it."
            ) from err
        with handle:
            yield handle


def _check_complete(path: Path, attrs: Mapping[str, Any]) -> None:
    if not attrs.get("complete", False):
        raise IncompleteStoreError(
            f"{path}: store is incomplete (no complete=True attribute): the job that wrote it "
            "was stopped or failed. Rerun the stage; it rebuilds incomplete stores."
        )


def _check_coords(path: Path, coords: np.ndarray) -> np.ndarray:
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise StoreFormatError(
            f"{path}: dataset 'coords' has shape {coords.shape}, expected (N, 2) level-0 (x, y)"
        )
    return coords.astype(np.int64, copy=False)


def _integer_coords(path: Path, coords: Any) -> np.ndarray:
    """Check appended coords: shape exactly [n, 2] and whole, finite numbers; int64 copy.

    Unlike the fixed-size writer, no reshape: an (x, y) pair stacked as [2, n] would otherwise
    be read as n rows of mixed x and y values.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise StoreFormatError(
            f"{path}: appended coords have shape {coords.shape}, expected (n, 2) level-0 (x, y); "
            "stack x and y as columns, e.g. np.column_stack([x, y])"
        )
    if coords.dtype.kind == "f":
        if not np.isfinite(coords).all() or (coords != np.round(coords)).any():
            raise StoreFormatError(
                f"{path}: appended coords contain NaN, inf or fractional values; "
                "coords are whole level-0 pixels"
            )
    elif coords.dtype.kind not in "iu":
        raise StoreFormatError(
            f"{path}: appended coords of dtype {coords.dtype}, expected integer level-0 pixels"
        )
    return np.array(coords, dtype=np.int64)


# --------------------------------------------------------------------------- coords stores


@dataclass
class CoordsStore:
    """Tile grid of one slide: `coords` int64 [N, 2] level-0 (x, y) and the store attributes."""

    path: Path
    coords: np.ndarray
    attrs: dict[str, Any]

    @property
    def n_tiles(self) -> int:
        return int(self.coords.shape[0])


def write_coords_store(path: Path, coords: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Write a coords store atomically; `complete=True` is set last.

    Args:
        path: destination `.h5` file; an existing file is replaced only on success.
        coords: int [N, 2] level-0 (x, y) top-left corners; N may be 0 (status `no_tissue`).
        attrs: store attributes (see the design's coords store); dicts are stored as JSON text.
    """
    path = Path(path)
    coords = _check_coords(path, np.asarray(coords).reshape(-1, 2))
    tmp = _tmp_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as handle:
            dataset = handle.create_dataset("coords", data=coords)
            for key, value in attrs.items():
                if key != "complete":
                    handle.attrs[key] = _clean_attr(value)
                    # CLAM and TRIDENT readers look for the patch attributes on the dataset.
                    dataset.attrs[key] = _clean_attr(value)
            handle.attrs["complete"] = True
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def read_coords_store(path: Path) -> CoordsStore:
    """Read a complete coords store; raises IncompleteStoreError or StoreFormatError."""
    path = Path(path)
    if not path.exists():
        raise StoreFormatError(f"{path}: coords store not found. Run `slidemil tile` first.")
    with _open_group(path) as group:
        attrs = _read_attrs(group.attrs)
        _check_complete(path, attrs)
        if "coords" not in group:
            raise StoreFormatError(f"{path}: no 'coords' dataset; rerun `slidemil tile`.")
        coords = _check_coords(path, np.asarray(group["coords"][:]))
    return CoordsStore(path=path, coords=coords, attrs=attrs)


# -------------------------------------------------------------------------- feature stores

#: Rows of one chunk of an appended `coords` dataset (1 MiB of int64 pairs).
COORDS_CHUNK_ROWS = 2**16


def _feature_chunk_rows(dim: int) -> int:
    """Rows per chunk of `features`: about 1 MiB of float32 (half that as float16)."""
    return max(1, 2**20 // max(1, dim * 4))


def _resize_rows(array: Any, n_rows: int) -> None:
    """Set the number of rows of a resizable h5py Dataset or zarr Array."""
    if isinstance(array, h5py.Dataset):
        array.resize(n_rows, axis=0)
    else:
        array.resize((n_rows, *array.shape[1:]))


class _ChunkAppender:
    """Append rows to a resizable 2-D array, writing whole chunks only.

    Rows wait in memory until at least one chunk of `chunk_rows` rows is filled, so every chunk
    is written once (a zarr chunk written in parts is decompressed and compressed again each
    time). Between calls, fewer than `chunk_rows` rows stay in memory.
    """

    def __init__(self, array: Any, chunk_rows: int) -> None:
        self.array = array
        self.chunk_rows = chunk_rows
        self.n_flushed = 0
        self.n_pending = 0
        self._pending: list[np.ndarray] = []

    def append(self, rows: np.ndarray) -> None:
        self._pending.append(rows)
        self.n_pending += rows.shape[0]
        if self.n_pending >= self.chunk_rows:
            self.flush(whole_chunks_only=True)

    def flush(self, whole_chunks_only: bool = False) -> None:
        if not self._pending:
            return
        block = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        n_rows = block.shape[0]
        if whole_chunks_only:
            n_rows -= n_rows % self.chunk_rows
        if n_rows:
            stop = self.n_flushed + n_rows
            _resize_rows(self.array, stop)
            self.array[self.n_flushed : stop] = block[:n_rows]
            self.n_flushed = stop
        # Copy the remainder so that the concatenated block can be freed.
        rest = block[n_rows:].copy()
        self._pending = [rest] if rest.shape[0] else []
        self.n_pending = rest.shape[0]


class FeatureStoreWriter:
    """Write a feature store in row blocks, then commit it atomically.

    Use as a context manager: the store is moved into place with `complete=True` when the
    block exits without an exception, and the temporary file is removed otherwise.

    The writer has two modes:

    - Fixed size (this constructor with `n_rows` and `coords`): `write(start, rows)` fills
      rows at any position, and every row must be written before the commit.
    - Appending (`FeatureStoreWriter.appending(path, dim, attrs)`): `append(rows, coords)`
      adds rows and their coords at the end of resizable datasets, and the store gets as many
      rows as were appended. The caller needs to know neither N nor the coords in advance.
      Rows are written as soon as a whole chunk of `features` (about 1 MiB as float32) is
      filled, so between calls the writer keeps less than one chunk of rows in memory.

    Args:
        path: destination `<slide_id>.h5` or `<slide_id>.zarr`.
        n_rows: N, the number of tiles (rows of `features` and `coords`); None for appending.
        dim: D, the embedding dimension.
        coords: int [N, 2] level-0 (x, y), in the row order of the features; None for
            appending.
        attrs: store attributes (all coords attrs plus backbone, weights, ...); they are
            written at the commit, so `update_attrs` may still change them.
        dtype: "float16" (default) or "float32".
        fmt: "h5" or "zarr"; defaults to the format given by the suffix of `path`.
    """

    def __init__(
        self,
        path: Path,
        n_rows: int | None,
        dim: int,
        coords: np.ndarray | None,
        attrs: Mapping[str, Any],
        dtype: str = "float16",
        fmt: StoreFormat | None = None,
    ) -> None:
        self.path = Path(path)
        self.fmt: StoreFormat = fmt or store_format(self.path)
        self.dim = int(dim)
        if self.dim < 1:
            raise ValueError(f"{self.path}: the embedding dimension must be >= 1, got {dim}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype("float16"), np.dtype("float32")):
            raise ValueError(f"{self.path}: feature dtype must be float16 or float32, got {dtype}")
        self.is_appending = n_rows is None
        if n_rows is None:
            if coords is not None:
                raise ValueError(
                    f"{self.path}: an appending writer takes the coords of each block in "
                    "append(rows, coords); pass coords=None"
                )
            self.n_rows = 0
            self.coords = np.empty((0, 2), dtype=np.int64)
        else:
            self.n_rows = int(n_rows)
            if coords is None:
                raise ValueError(f"{self.path}: a fixed-size writer needs the coords of all rows")
            self.coords = _check_coords(self.path, np.asarray(coords).reshape(-1, 2))
            if self.coords.shape[0] != self.n_rows:
                raise StoreFormatError(
                    f"{self.path}: {self.coords.shape[0]} coords for {self.n_rows} feature rows"
                )
        self.attrs = dict(attrs)
        self.tmp = _tmp_path(self.path)
        self._written = np.zeros(self.n_rows, dtype=bool)
        self._handle: Any = None
        self._features: Any = None
        self._feature_appender: _ChunkAppender | None = None
        self._coords_appender: _ChunkAppender | None = None
        # Set when the `with` block exits: the temporary store is then committed or removed,
        # and writing to it again would lose the rows or overwrite the committed store.
        self._closed = False

    @classmethod
    def appending(
        cls,
        path: Path,
        dim: int,
        attrs: Mapping[str, Any],
        dtype: str = "float16",
        fmt: StoreFormat | None = None,
    ) -> FeatureStoreWriter:
        """Create a writer whose rows and coords are added with `append`; see the class."""
        return cls(path, None, dim, None, attrs, dtype=dtype, fmt=fmt)

    @property
    def n_rows_written(self) -> int:
        """Rows appended (or, for a fixed-size store, rows written) so far."""
        if self._feature_appender is not None:
            return self._feature_appender.n_flushed + self._feature_appender.n_pending
        return int(self._written.sum())

    @property
    def n_rows_buffered(self) -> int:
        """Appended feature rows held in memory, not yet written to the temporary store."""
        return self._feature_appender.n_pending if self._feature_appender is not None else 0

    def update_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Add or replace store attributes before the commit (e.g. counts known at the end)."""
        self.attrs.update(attrs)

    def __enter__(self) -> FeatureStoreWriter:
        if self._closed:
            raise ValueError(
                f"{self.path}: this writer's `with` block has already ended and its store was "
                "committed or removed; create a new FeatureStoreWriter to write the store again"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _remove(self.tmp)
            self._open_tmp()
            if self.is_appending:
                self._create_appendable()
            else:
                self._create_fixed()
        except OSError as err:
            self.abort()
            raise self._write_error(err) from err
        return self

    def _open_tmp(self) -> None:
        if self.fmt == "zarr":
            import zarr

            self._handle = zarr.open_group(str(self.tmp), mode="w")
        elif self.is_appending:
            # The appender writes whole chunks, so HDF5's chunk cache saves nothing. Without it
            # a full disk fails the write that hits it, not only the close, and a failed close
            # leaves no dirty chunks that crash the interpreter at exit (seen with h5py 3.16
            # and HDF5 2.0).
            self._handle = h5py.File(self.tmp, "w", rdcc_nbytes=0)
        else:
            self._handle = h5py.File(self.tmp, "w")

    def _create_fixed(self) -> None:
        chunk_rows = max(1, min(self.n_rows, _feature_chunk_rows(self.dim)))
        if self.fmt == "zarr":
            self._features = self._handle.create_array(
                "features", shape=(self.n_rows, self.dim), dtype=self.dtype,
                chunks=(chunk_rows, self.dim),
            )
            self._handle.create_array("coords", shape=self.coords.shape, dtype="int64")[:] = (
                self.coords
            )
        else:
            self._features = self._handle.create_dataset(
                "features", shape=(self.n_rows, self.dim), dtype=self.dtype,
                chunks=(chunk_rows, self.dim) if self.n_rows else None,
            )
            self._handle.create_dataset("coords", data=self.coords)

    def _create_appendable(self) -> None:
        """Create empty `features` (0, D) and `coords` (0, 2) datasets that grow by rows."""
        chunk_rows = _feature_chunk_rows(self.dim)
        if self.fmt == "zarr":
            features = self._handle.create_array(
                "features", shape=(0, self.dim), dtype=self.dtype, chunks=(chunk_rows, self.dim)
            )
            coords = self._handle.create_array(
                "coords", shape=(0, 2), dtype="int64", chunks=(COORDS_CHUNK_ROWS, 2)
            )
        else:
            features = self._handle.create_dataset(
                "features", shape=(0, self.dim), maxshape=(None, self.dim), dtype=self.dtype,
                chunks=(chunk_rows, self.dim),
            )
            coords = self._handle.create_dataset(
                "coords", shape=(0, 2), maxshape=(None, 2), dtype="int64",
                chunks=(COORDS_CHUNK_ROWS, 2),
            )
        self._features = features
        self._feature_appender = _ChunkAppender(features, chunk_rows)
        self._coords_appender = _ChunkAppender(coords, COORDS_CHUNK_ROWS)

    def _check_finite(self, first_row: int, rows: np.ndarray) -> None:
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            first = first_row + int(np.flatnonzero(bad)[0])
            raise StoreFormatError(
                f"{self.path}: non-finite features in {int(bad.sum())} row(s), first at row "
                f"{first}; check the backbone weights and --precision"
            )

    def _check_shape(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise StoreFormatError(
                f"{self.path}: rows of shape {rows.shape}, expected (n, {self.dim})"
            )

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write `rows` [n, D] at rows `start:start + n`; NaN or inf rows raise StoreFormatError."""
        if self.is_appending:
            raise ValueError(f"{self.path}: this writer appends rows; use append(rows, coords)")
        rows = np.asarray(rows)
        self._check_shape(rows)
        stop = start + rows.shape[0]
        if start < 0 or stop > self.n_rows:
            raise StoreFormatError(f"{self.path}: rows {start}:{stop} outside 0:{self.n_rows}")
        self._check_finite(start, rows)
        self._features[start:stop] = rows.astype(self.dtype, copy=False)
        self._written[start:stop] = True

    def append(self, rows: np.ndarray, coords: np.ndarray) -> None:
        """Append `rows` [n, D] and their level-0 `coords` [n, 2] after the rows appended so far.

        The rows are converted to the store dtype first, so values that overflow float16 are
        rejected like NaN.

        Raises:
            StoreFormatError: Wrong shapes, different row counts, or NaN or inf rows.
        """
        if self._closed:
            raise ValueError(
                f"{self.path}: append() after the writer's `with` block ended; the store was "
                "already committed or removed, so these rows would be lost"
            )
        if self._feature_appender is None or self._coords_appender is None:
            raise ValueError(
                f"{self.path}: append() needs an appending writer inside its `with` block"
            )
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iuf":
            raise StoreFormatError(
                f"{self.path}: feature rows of dtype {rows.dtype}, expected real numbers "
                "(float or integer)"
            )
        # A copy, because the writer may hold it; float16 overflow shows up as inf below.
        with np.errstate(over="ignore"):
            stored = np.array(rows, dtype=self.dtype)
        self._check_shape(stored)
        coords = _integer_coords(self.path, coords)
        if coords.shape[0] != stored.shape[0]:
            raise StoreFormatError(
                f"{self.path}: {stored.shape[0]} feature rows but {coords.shape[0]} coords"
            )
        self._check_finite(self.n_rows_written, stored)
        try:
            self._feature_appender.append(stored)
            self._coords_appender.append(coords)
        except (OSError, RuntimeError) as err:
            raise self._write_error(err) from err

    def _finish_rows(self) -> None:
        """Write the rows still buffered and check that every row of the store is written."""
        if self._feature_appender is not None and self._coords_appender is not None:
            self._feature_appender.flush()
            self._coords_appender.flush()
            n_features = self._feature_appender.n_flushed
            n_coords = self._coords_appender.n_flushed
            if n_features != n_coords:
                raise StoreFormatError(
                    f"{self.path}: {n_features} feature rows but {n_coords} coords were "
                    "appended; the store was not committed"
                )
            return
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise StoreFormatError(
                f"{self.path}: {missing.size} of {self.n_rows} feature rows were never "
                f"written (first: row {int(missing[0])}); the store was not committed"
            )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closed = True
        if exc_type is not None:
            # The block's own exception propagates; the temporary store is removed in any case.
            self.abort()
            return
        try:
            self._finish_rows()
            for key, value in self.attrs.items():
                if key != "complete":
                    self._handle.attrs[key] = _clean_attr(value)
            self._handle.attrs["embedding_dim"] = self.dim
            self._handle.attrs["dtype"] = str(self.dtype)
            self._handle.attrs["complete"] = True
            # HDF5 writes cached chunks when the file closes, so a full disk often fails here.
            self._close_handle()
        except (OSError, RuntimeError) as err:
            self.abort()
            raise self._write_error(err) from err
        except BaseException:
            self.abort()
            raise
        _move_into_place(self.tmp, self.path)

    def _write_error(self, err: BaseException) -> StoreWriteError:
        return StoreWriteError(
            f"{self.path}: writing the temporary store {self.tmp.name} failed ({err}), so the "
            "store is not committed and the temporary store is removed. Check free space and "
            f"write permission in {self.path.parent}, then rerun."
        )

    def _close_handle(self) -> None:
        handle, self._handle = self._handle, None
        self._features = None
        if self.fmt != "h5" or handle is None:
            return
        try:
            handle.close()
        except (OSError, RuntimeError):
            # A failed close can leave the file open inside HDF5, which then segfaults when
            # it flushes the file at exit. A second close releases it.
            with contextlib.suppress(OSError, RuntimeError):
                handle.close()
            raise

    def abort(self) -> None:
        """Remove the temporary store (for callers not using the context manager).

        A failure to close the store, as when the disk is full, is logged and does not stop
        the removal, so the caller receives the exception that is already being raised.
        """
        self._closed = True
        try:
            self._close_handle()
        except (OSError, RuntimeError) as err:
            logger.warning("%s: closing the temporary store %s failed (%s); removing it.",
                           self.path, self.tmp, err)
        _remove(self.tmp)


class FeatureStore:
    """Read access to a complete feature store; `features` stays on disk until sliced.

    Attributes:
        path: the store.
        coords: int64 [N, 2] level-0 (x, y), row-aligned with `features`.
        attrs: store attributes.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreFormatError(
                f"{self.path}: feature store not found. Run `slidemil extract` first."
            )
        self._context = _open_group(self.path)
        group = self._context.__enter__()
        try:
            self.attrs = _read_attrs(group.attrs)
            _check_complete(self.path, self.attrs)
            for name in ("features", "coords"):
                if name not in group:
                    raise StoreFormatError(
                        f"{self.path}: no '{name}' dataset; rerun `slidemil extract`."
                    )
            self.features = group["features"]
            self.coords = _check_coords(self.path, np.asarray(group["coords"][:]))
            if len(self.features.shape) != 2 or self.features.shape[0] != self.coords.shape[0]:
                raise StoreFormatError(
                    f"{self.path}: features of shape {tuple(self.features.shape)} do not match "
                    f"{self.coords.shape[0]} coords; rerun `slidemil extract` for this slide."
                )
        except BaseException:
            self.close()
            raise

    @property
    def n_tiles(self) -> int:
        return int(self.coords.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def read_features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Features [N, D] (or the given rows, in the given order) as stored."""
        if rows is None:
            return np.asarray(self.features[:])
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        data = np.asarray(self.features[sorted_rows.tolist()]) if len(rows) else np.empty(
            (0, self.dim), dtype=self.features.dtype
        )
        out = np.empty_like(data)
        out[order] = data
        return out

    def close(self) -> None:
        self._context.__exit__(None, None, None)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_feature_store(path: Path) -> FeatureStore:
    """Open a complete HDF5 or zarr feature store for reading."""
    return FeatureStore(path)


# ------------------------------------------------------------------------ attention stores


@dataclass
class AttentionStore:
    """Per-tile attention of one slide, row-aligned with its feature store.

    Attributes:
        attention: float32 [N] or [N, H] (H heads or branches).
        coords: int64 [N, 2] level-0 (x, y).
        attrs: slide_id, slide_path, tile_px_level0, level0_width, level0_height,
            predicted_class, probability, classes (JSON), model, ...
    """

    path: Path
    attention: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]


def write_attention_store(
    path: Path, attention: np.ndarray, coords: np.ndarray, attrs: Mapping[str, Any]
) -> None:
    """Write `attention` [N] or [N, H] with its level-0 `coords` [N, 2] atomically."""
    path = Path(path)
    attention = np.asarray(attention, dtype=np.float32)
    coords = _check_coords(path, np.asarray(coords).reshape(-1, 2))
    if attention.ndim not in (1, 2) or attention.shape[0] != coords.shape[0]:
        raise StoreFormatError(
            f"{path}: attention of shape {attention.shape} does not match {coords.shape[0]} coords"
        )
    tmp = _tmp_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("attention", data=attention)
            handle.create_dataset("coords", data=coords)
            for key, value in attrs.items():
                if key != "complete":
                    handle.attrs[key] = _clean_attr(value)
            handle.attrs["complete"] = True
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def read_attention_store(path: Path) -> AttentionStore:
    """Read a complete attention store; lengths of attention and coords must agree."""
    path = Path(path)
    if not path.exists():
        raise StoreFormatError(f"{path}: attention file not found. Run `slidemil predict` first.")
    with _open_group(path) as group:
        attrs = _read_attrs(group.attrs)
        _check_complete(path, attrs)
        for name in ("attention", "coords"):
            if name not in group:
                raise StoreFormatError(f"{path}: no '{name}' dataset; rerun `slidemil predict`.")
        attention = np.asarray(group["attention"][:], dtype=np.float32)
        coords = _check_coords(path, np.asarray(group["coords"][:]))
    if attention.shape[0] != coords.shape[0]:
        raise StoreFormatError(
            f"{path}: {attention.shape[0]} attention rows but {coords.shape[0]} coords; "
            "rerun `slidemil predict` for this slide."
        )
    return AttentionStore(path=path, attention=attention, coords=coords, attrs=attrs)
