"""Feature extraction: coords stores in, one feature store per slide out.

For every coords store ``<coords_dir>/<slide_id>.h5`` the stage reads the listed tiles from the
slide (at the level and size the tiling stage chose), embeds them with a backbone from
:mod:`preprocessing.backbones` and writes ``<output_dir>/<backbone>/<slide_id>.h5`` (or
``.zarr``). Rows follow the order of the coords store; a tile that cannot be decoded is
skipped, counted and logged with its coordinates. Features and coords therefore always stay
aligned.

Memory: each batch of embeddings is appended to the temporary store as soon as the backbone
returns it, so a slide needs memory for a few batches, not for all N x D features. Because
skipped tiles make N known only at the end, the store's datasets grow by rows, and the checks
on failed tiles and NaN features run before the store is committed.

Throughput: DataLoader workers decode tiles while the device computes. Each worker opens its
own slide handle on first use, because open file handles must never cross a fork or be
pickled for spawn. Batches travel as uint8 (a quarter of the bytes of float32) in pinned memory
on CUDA and are converted, resized and normalised on the device. On CUDA the forward pass runs
under bf16/fp16 autocast in channels-last layout and the copy of batch k back to the host
overlaps the forward pass of batch k + 1.

Resume: a slide whose complete, valid store exists with the same weights is skipped. A store
with NaN or infinite rows, or with a row count that disagrees with its coords, is rebuilt.
A killed job leaves no complete store, only a temporary file or a lock, so the slide is
recomputed next time. ``overwrite`` recomputes every store. Sharding, locks and the manifest
come from :mod:`preprocessing.jobs`.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from rich import get_console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch.utils.data import DataLoader, Dataset

from preprocessing.backbones import (
    Backbone,
    create_backbone,
    expected_weights_id,
    get_backbone_preset,
)
from preprocessing.errors import (
    BackboneError,
    ConfigError,
    IncompleteStoreError,
    SlideOpenError,
    StoreFormatError,
    TileReadError,
)
from preprocessing.inputs import SlideInput, list_slides
from preprocessing.jobs import Shard, SlideOutcome, StageResult, progress_console, run_slides
from preprocessing.slide import Slide, open_slide
from preprocessing.stores import (
    CoordsStore,
    FeatureStoreWriter,
    feature_store_path,
    is_complete_store,
    open_feature_store,
    read_coords_store,
    replace_text,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

STAGE = "extract"
Precision = Literal["auto", "fp32", "bf16", "fp16"]
StartMethod = Literal["fork", "spawn", "forkserver"]

#: Rows handed to the store writer at once by `write_feature_store`, and rows read at once
#: when a store is checked for NaN.
WRITE_BLOCK_ROWS = 4096


class ExtractConfig(BaseModel):
    """Settings of the extract stage; CLI options map 1:1 to these fields.

    Attributes:
        coords_dir: Folder of coords stores written by ``slidemil tile``.
        output_dir: Root of the feature stores; the stage writes ``<output_dir>/<backbone>/``.
        slides: Optional slide list (folder, glob or CSV) naming the slides expected and where
            they are now. Each listed path replaces the ``slide_path`` recorded in the slide's
            coords store (for slides moved after tiling), and each slide without a coords store
            gets a failed manifest row. Without it, every coords store in ``coords_dir`` is
            extracted from the path its coords store records.
        backbone: A preset name (see ``slidemil extract --help``), a timm model name or an
            ``hf-hub:owner/repo`` id.
        weights: ``pretrained`` (default), ``random``, or a path to a checkpoint file.
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:<index>``.
        batch_size: Tiles per forward pass; halved automatically on CUDA out-of-memory.
        num_workers: DataLoader processes decoding tiles; 0 decodes in the main process.
            None chooses automatically (see :func:`resolve_num_workers`).
        worker_start_method: ``fork``, ``spawn`` or ``forkserver``; None uses the platform
            default.
        prefetch_factor: Batches each worker decodes ahead.
        precision: ``auto`` (bf16 on CUDA with bf16 support, fp16 on older CUDA, fp32 on CPU),
            or a fixed ``fp32``, ``bf16`` or ``fp16`` autocast.
        channels_last: Run the network in channels-last memory layout (faster convolutions on
            CUDA tensor cores).
        compile: Compile the network with ``torch.compile`` (slow first batch, faster after).
        tta_flips: Average the embeddings of the tile and its horizontal, vertical and double
            flips (4 forward passes per tile).
        format: ``h5`` or ``zarr`` feature stores.
        dtype: Stored feature type, ``float16`` or ``float32``.
        max_failed_tile_fraction: A slide fails when more than this fraction of its tiles
            cannot be decoded; fewer failed tiles are skipped and the slide is ``partial``.
        shard: ``i/n`` to process every n-th slide starting at i; None reads
            ``SLURM_ARRAY_TASK_ID``.
        overwrite: Recompute feature stores that are already complete, also those made with
            other settings, and remove their stores in the other format. Only the stores of
            the processed slides are replaced.
        skip_errors: Record a failed slide in the manifest and continue with the next one.
        progress: Show a progress bar of the slides and, on a terminal, one of the current
            slide's tiles with tiles per second.
    """

    model_config = ConfigDict(extra="forbid")

    coords_dir: Path
    output_dir: Path
    slides: str | None = None
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    device: str = "auto"
    batch_size: int = Field(default=64, ge=1)
    num_workers: int | None = Field(default=None, ge=0)
    worker_start_method: StartMethod | None = None
    prefetch_factor: int = Field(default=4, ge=1)
    precision: Precision = "auto"
    channels_last: bool = True
    compile: bool = False
    tta_flips: bool = False
    format: Literal["h5", "zarr"] = "h5"
    dtype: Literal["float16", "float32"] = "float16"
    max_failed_tile_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    shard: Shard = None
    overwrite: bool = False
    skip_errors: bool = True
    progress: bool = True


# --------------------------------------------------------------------------------------------
# Devices and precision
# --------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda[:i]`` into a torch device that exists on this machine.

    Raises:
        ConfigError: A CUDA device was requested but is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(
            f"Invalid device {device!r}; use auto, cpu, cuda or cuda:<index>."
        ) from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"Device {device!r} requested but CUDA is not available on this machine; "
                "use --device cpu or install a CUDA build of torch."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"Device {device!r} requested but only {torch.cuda.device_count()} CUDA "
                "devices exist."
            )
    return resolved


def resolve_num_workers(requested: int | None, device: torch.device) -> int:
    """Return the DataLoader worker count: ``requested``, or an automatic choice when None.

    On the CPU the automatic choice is 0. Decoding and the forward pass compete for the same
    cores there: on an idle 2-core machine one worker was 25% slower than 0, and on a busy one
    at most 10% faster (docs/extract.md). On CUDA it is one worker per
    available core minus one for the main process, at most 4.
    """
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS and Windows
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def describe_precision(autocast_dtype: torch.dtype | None) -> str:
    """Name the compute precision for logs: ``float32 (no autocast)`` or ``bfloat16 autocast``."""
    if autocast_dtype is None:
        return "float32 (no autocast)"
    return f"{str(autocast_dtype).removeprefix('torch.')} autocast"


def resolve_autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for ``precision`` on ``device``, or None for fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --------------------------------------------------------------------------------------------
# Reading tiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileGrid:
    """Tile geometry of one slide: everything a worker needs to read its tiles (picklable).

    Attributes:
        slide_id: Slide id for messages.
        slide_path: Slide file.
        slide_mpp: µm per level-0 pixel used by the tiling stage (passed on as an override so
            that slides whose mpp came from a CSV open the same way).
        coords: int64 [N, 2] level-0 (x, y) top-left corners.
        tile_px_level0: Side of a tile's footprint in level-0 pixels (float).
        read_level: Pyramid level the footprint is read from.
        tile_px: Side of the tile in pixels after resizing.
    """

    slide_id: str
    slide_path: Path
    slide_mpp: float | None
    coords: np.ndarray
    tile_px_level0: float
    read_level: int
    tile_px: int


class TileDataset(Dataset[tuple[int, np.ndarray | None]]):
    """Tiles of one slide as uint8 RGB [tile_px, tile_px, 3] arrays, indexed by row.

    The slide is opened on the first ``__getitem__`` in each process, and never pickled, so
    every DataLoader worker owns its handle under both fork and spawn. A tile that cannot be
    decoded comes back as None; the collate function drops it.
    """

    def __init__(self, grid: TileGrid) -> None:
        self.grid = grid
        self._slide: Slide | None = None
        self._owner_pid: int | None = None

    def __len__(self) -> int:
        return int(self.grid.coords.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"] = None
        state["_owner_pid"] = None
        return state

    def _handle(self) -> Slide:
        # A handle inherited through fork belongs to the parent; open a new one.
        if self._slide is None or self._owner_pid != os.getpid():
            self._slide = open_slide(self.grid.slide_path, mpp=self.grid.slide_mpp)
            self._owner_pid = os.getpid()
        return self._slide

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None]:
        x, y = (int(value) for value in self.grid.coords[index])
        try:
            tile = self._handle().read_tile(
                x, y, self.grid.tile_px_level0, self.grid.read_level, self.grid.tile_px
            )
        except TileReadError as err:
            logger.warning(
                "%s: skipping tile %d at level-0 (x=%d, y=%d): %s",
                self.grid.slide_id,
                index,
                x,
                y,
                err,
            )
            return index, None
        return index, tile

    def close(self) -> None:
        """Close this process's slide handle."""
        if self._slide is not None and self._owner_pid == os.getpid():
            self._slide.close()
        self._slide = None
        self._owner_pid = None


@dataclass
class TileBatch:
    """A batch of decoded tiles and the rows that failed.

    Attributes:
        rows: int64 [b] coords-store rows of the decoded tiles, ascending.
        tiles: uint8 [b, 3, H, W] in channels-last memory layout.
        failed_rows: Rows of this batch whose tile could not be decoded.
    """

    rows: torch.Tensor
    tiles: torch.Tensor
    failed_rows: list[int]

    def pin_memory(self) -> TileBatch:
        """Pin the tiles so the copy to the GPU can run asynchronously (DataLoader hook)."""
        return TileBatch(self.rows, self.tiles.pin_memory(), self.failed_rows)


def collate_tiles(samples: Sequence[tuple[int, np.ndarray | None]]) -> TileBatch:
    """Stack decoded tiles into one uint8 batch, leaving failed tiles out."""
    rows = [index for index, tile in samples if tile is not None]
    failed = [index for index, tile in samples if tile is None]
    arrays = [tile for _, tile in samples if tile is not None]
    if arrays:
        # [b, H, W, 3] viewed as [b, 3, H, W] is already channels-last: no copy needed.
        tiles = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    else:
        tiles = torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    return TileBatch(torch.tensor(rows, dtype=torch.int64), tiles, failed)


def make_tile_loader(
    grid: TileGrid,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    worker_start_method: StartMethod | None = None,
    prefetch_factor: int = 4,
) -> tuple[DataLoader[Any], TileDataset]:
    """Build the ordered DataLoader over one slide's tiles; batches keep coords order."""
    dataset = TileDataset(grid)
    options: dict[str, Any] = {}
    if num_workers > 0:
        options["prefetch_factor"] = prefetch_factor
        options["multiprocessing_context"] = worker_start_method
    loader: DataLoader[Any] = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_tiles,
        pin_memory=pin_memory,
        drop_last=False,
        **options,
    )
    return loader, dataset


# --------------------------------------------------------------------------------------------
# Computing embeddings
# --------------------------------------------------------------------------------------------


class TileEmbedder:
    """Runs a backbone over uint8 tile batches on one device.

    Handles autocast, channels-last layout, optional ``torch.compile``, test-time flips, and
    CUDA out-of-memory by halving the batch (down to one tile) for the rest of the run.

    Args:
        backbone: The encoder, on the CPU or already on ``device``.
        device: Where to compute.
        autocast_dtype: bf16/fp16 for mixed precision, None for fp32.
        channels_last: Convert the network and inputs to channels-last layout.
        compile: Wrap the backbone in ``torch.compile``.
        tta_flips: Average over the identity, horizontal, vertical and double flip.
    """

    def __init__(
        self,
        backbone: Backbone,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = True,
        compile: bool = False,
        tta_flips: bool = False,
    ) -> None:
        self.backbone = backbone.to(device).eval()
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.tta_flips = tta_flips
        self.forward_fn: Any = torch.compile(self.backbone) if compile else self.backbone
        self.max_batch: int | None = None

    @property
    def embedding_dim(self) -> int:
        return int(self.backbone.embedding_dim)

    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """Embed uint8 tiles [b, 3, H, W] (host or device); returns float32 [b, D] on device."""
        if self.max_batch is not None and tiles.shape[0] > self.max_batch:
            parts = [self.embed(part) for part in tiles.split(self.max_batch)]
            return torch.cat(parts)
        try:
            return self._embed_on_device(tiles)
        except torch.OutOfMemoryError as err:
            if tiles.shape[0] == 1:
                raise BackboneError(
                    f"Backbone {self.backbone.preset.name!r} ran out of memory on {self.device} "
                    "with a batch of one tile; use a device with more memory, --precision bf16 "
                    "or fp16, or a smaller backbone."
                ) from err
        # The retry happens outside the except block because the exception's traceback keeps
        # the failed batch's activations alive until the block ends.
        self.max_batch = max(1, tiles.shape[0] // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.warning(
            "Out of memory on %s with %d tiles; retrying with batches of %d.",
            self.device,
            tiles.shape[0],
            self.max_batch,
        )
        return self.embed(tiles)

    def _embed_on_device(self, tiles: torch.Tensor) -> torch.Tensor:
        images = tiles.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ),
        ):
            embeddings = self.forward_fn(images).float()  # [b, D]
            if self.tta_flips:
                for dims in ((3,), (2,), (2, 3)):
                    embeddings = embeddings + self.forward_fn(images.flip(dims)).float()
                embeddings = embeddings / 4.0
        return embeddings

    def embed_batches(
        self, batches: Iterable[TileBatch]
    ) -> Iterator[tuple[TileBatch, np.ndarray]]:
        """Embed a stream of batches; yields each batch with its float32 [b, D] embeddings.

        On CUDA the copy of one batch's embeddings to the host is left in flight while the
        next batch is computed, so the device does not wait for that copy.
        """
        # NOTE: the CUDA branch (pinned batches, asynchronous copies, events) is exercised only
        # by the gpu-marked tests, which skip on machines without CUDA.
        pending: tuple[TileBatch, torch.Tensor, torch.cuda.Event | None] | None = None
        for batch in batches:
            if batch.rows.numel() == 0:
                if pending is not None:
                    yield _finish(pending)
                    pending = None
                yield batch, np.empty((0, self.embedding_dim), dtype=np.float32)
                continue
            embeddings = self.embed(batch.tiles)
            current: tuple[TileBatch, torch.Tensor, torch.cuda.Event | None]
            if self.device.type == "cuda":
                host = embeddings.to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                current = (batch, host, event)
            else:
                current = (batch, embeddings, None)
            if pending is not None:
                yield _finish(pending)
            pending = current
        if pending is not None:
            yield _finish(pending)


def _finish(
    pending: tuple[TileBatch, torch.Tensor, torch.cuda.Event | None],
) -> tuple[TileBatch, np.ndarray]:
    batch, host, event = pending
    if event is not None:
        event.synchronize()
    return batch, host.numpy()


# --------------------------------------------------------------------------------------------
# One slide
# --------------------------------------------------------------------------------------------


def tile_grid_from_store(store: CoordsStore, slide_id: str) -> TileGrid:
    """Read the tile geometry that the tiling stage recorded in a coords store.

    Raises:
        StoreFormatError: A required attribute is missing or invalid.
    """
    attrs = store.attrs
    missing = [
        key for key in ("slide_path", "tile_px", "tile_px_level0", "read_level") if key not in attrs
    ]
    if missing:
        raise StoreFormatError(
            f"{store.path}: coords store lacks attributes {missing}; it was not written by "
            "`slidemil tile`. Rerun `slidemil tile` for this slide."
        )
    slide_mpp = attrs.get("slide_mpp")
    return TileGrid(
        slide_id=slide_id,
        slide_path=Path(str(attrs["slide_path"])),
        slide_mpp=float(slide_mpp) if slide_mpp not in (None, "") else None,
        coords=store.coords,
        tile_px_level0=float(attrs["tile_px_level0"]),
        read_level=int(attrs["read_level"]),
        tile_px=int(attrs["tile_px"]),
    )


def _check_slide_matches(grid: TileGrid, attrs: dict[str, Any]) -> None:
    """Reject a slide file whose size differs from the one the coords were made for."""
    with open_slide(grid.slide_path, mpp=grid.slide_mpp) as slide:
        width, height = attrs.get("level0_width"), attrs.get("level0_height")
        expected = (int(width), int(height)) if width is not None and height is not None else None
        if expected is not None and expected != slide.dimensions:
            raise StoreFormatError(
                f"{grid.slide_path}: level 0 is {slide.dimensions} pixels but the coords store of "
                f"slide {grid.slide_id!r} was made for {expected}; the file changed since "
                "tiling. Rerun `slidemil tile` for this slide."
            )
        if not 0 <= grid.read_level < slide.level_count:
            raise StoreFormatError(
                f"{grid.slide_path}: coords store asks for level {grid.read_level} but the slide "
                f"has {slide.level_count} levels; rerun `slidemil tile` for this slide."
            )


@dataclass
class SlideFeatures:
    """Embeddings of the decodable tiles of one slide, in coords order.

    Attributes:
        features: [n_ok, D] in the store dtype.
        coords: int64 [n_ok, 2] level-0 (x, y).
        failed_coords: int64 [n_failed, 2] level-0 (x, y) of tiles that could not be decoded.
        seconds: Wall time of reading and embedding.
    """

    features: np.ndarray
    coords: np.ndarray
    failed_coords: np.ndarray
    seconds: float


@dataclass
class StreamedSlide:
    """Summary of one slide whose embeddings went to a sink batch by batch.

    Attributes:
        n_rows: Rows handed to the sink (the decodable tiles).
        failed_coords: int64 [n_failed, 2] level-0 (x, y) of tiles that could not be decoded.
        seconds: Wall time of reading, embedding and handing the rows to the sink.
    """

    n_rows: int
    failed_coords: np.ndarray
    seconds: float


class FeatureSink(Protocol):
    """Receiver of embeddings in coords order, such as an appending `FeatureStoreWriter`."""

    def append(self, rows: np.ndarray, coords: np.ndarray) -> None:
        """Take features [b, D] in the store dtype and their int64 level-0 coords [b, 2]."""


class _TileRateColumn(ProgressColumn):
    """Tiles per second of a slide, as rich estimates it over the last seconds."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:,.0f} tiles/s" if speed else "- tiles/s")


@contextmanager
def tile_progress(slide_id: str, n_tiles: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Show a bar of one slide's tiles (done / total, tiles per second) while the block runs.

    Yields the function that advances the bar by n tiles. The bar joins the stage's slide bar
    and disappears when the slide is done. It is off when `enabled` is False or when the
    console is not a terminal, so that logs redirected to a file get no progress lines.
    """
    console = progress_console() or get_console()
    if not enabled or not (console.is_terminal or console.is_jupyter):
        yield lambda n: None
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles"),
        _TileRateColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        task = progress.add_task(slide_id, total=n_tiles)
        yield lambda n: progress.advance(task, n)


def stream_slide_features(
    grid: TileGrid,
    embedder: TileEmbedder,
    sink: FeatureSink,
    batch_size: int,
    num_workers: int,
    dtype: str = "float16",
    worker_start_method: StartMethod | None = None,
    prefetch_factor: int = 4,
    progress: bool = False,
) -> StreamedSlide:
    """Read and embed every tile of one slide and hand each batch to `sink` in coords order.

    Only one batch of embeddings is held at a time, so memory does not grow with the number
    of tiles. Tiles that cannot be decoded are left out of the rows and their coords, never
    zero-filled, and are returned in `failed_coords`.

    Raises:
        BackboneError: A batch has NaN or infinite features after the conversion to `dtype`
            (float16 overflows above 65504). The slide stops at that batch.
    """
    start = time.perf_counter()
    n_tiles = int(grid.coords.shape[0])
    failed_rows: list[int] = []
    n_rows = 0
    if n_tiles == 0:
        return StreamedSlide(0, np.empty((0, 2), dtype=np.int64), 0.0)
    loader, dataset = make_tile_loader(
        grid,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=embedder.device.type == "cuda",
        worker_start_method=worker_start_method,
        prefetch_factor=prefetch_factor,
    )
    previous_row = -1
    # Without workers the main process decodes; a thread decodes the next batch meanwhile.
    prefetched = prefetch_in_thread(loader) if num_workers == 0 else None
    batches: Iterable[TileBatch] = loader if prefetched is None else prefetched
    try:
        with tile_progress(grid.slide_id, n_tiles, progress) as advance:
            for batch, embeddings in embedder.embed_batches(batches):
                rows = batch.rows.numpy()
                previous_row = _check_rows_ascending(grid, rows, previous_row)
                # Overflow to inf in float16 is reported by the check below, not as a warning.
                with np.errstate(over="ignore"):
                    features = embeddings.astype(np.dtype(dtype), copy=False)  # [b, D]
                _reject_non_finite(grid, embedder, rows, features, dtype)
                if rows.size:
                    sink.append(features, grid.coords[rows])
                n_rows += int(rows.size)
                failed_rows.extend(batch.failed_rows)
                advance(int(rows.size) + len(batch.failed_rows))
    finally:
        if prefetched is not None:
            prefetched.close()  # stops the reading thread before the slide handle closes
        dataset.close()
    return StreamedSlide(
        n_rows=n_rows,
        failed_coords=grid.coords[np.asarray(failed_rows, dtype=np.int64)],
        seconds=time.perf_counter() - start,
    )


def prefetch_in_thread(items: Iterable[T], depth: int = 1) -> Generator[T, None, None]:
    """Yield the items of `items` in order, produced up to `depth` ahead by a background thread.

    OpenSlide is called through ctypes, which releases the GIL, so the thread reads the next
    tile batch while the forward pass runs. On an idle 2-core CPU this raised extraction with 0
    workers from 0.85-0.89 to 0.90-0.92 of the backbone-only rate. An exception in the thread is
    raised here, and closing the generator stops the thread after the item it is producing.
    """
    handoff: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    finished = object()

    def hand_over(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over((True, item)):
                    return
            hand_over((True, finished))
        except BaseException as err:  # handed to the consumer, which raises it
            hand_over((False, err))

    thread = threading.Thread(target=produce, name="tile-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = handoff.get()
            if not ok:
                raise item
            if item is finished:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _check_rows_ascending(grid: TileGrid, rows: np.ndarray, previous_row: int) -> int:
    """Check that a batch continues the coords order; returns its last row.

    Rows are appended to the store as they come, so a batch out of order would leave the
    store's rows out of the coords store's order. The DataLoader (shuffle=False) yields
    batches in order, and this check guards that assumption.
    """
    if rows.size == 0:
        return previous_row
    if rows[0] <= previous_row or (rows.size > 1 and bool((np.diff(rows) <= 0).any())):
        raise RuntimeError(
            f"{grid.slide_id}: tile batch with rows {rows[0]}..{rows[-1]} arrived after row "
            f"{previous_row}, but batches must follow the coords order. This is a bug in "
            "slidemil: the tile DataLoader must use shuffle=False and in_order=True."
        )
    return int(rows[-1])


def _reject_non_finite(
    grid: TileGrid, embedder: TileEmbedder, rows: np.ndarray, features: np.ndarray, dtype: str
) -> None:
    """Raise BackboneError when a batch has NaN or infinite features [b, D]."""
    finite = np.isfinite(features).all(axis=1)
    if finite.all():
        return
    bad = np.flatnonzero(~finite)
    x, y = (int(value) for value in grid.coords[rows[bad[0]]])
    hint = "--precision fp32"
    if dtype == "float16":
        hint = "--dtype float32 (float16 stores overflow above 65504), " + hint
    raise BackboneError(
        f"{grid.slide_id}: backbone {embedder.backbone.preset.name!r} produced NaN or infinite "
        f"features for {bad.size} of the {finite.size} tiles of the batch that starts at row "
        f"{int(rows[0])} (first at level-0 x={x}, y={y}); extraction stopped there and no "
        f"store was written. Try {hint}, or check the weights."
    )


class _ArraySink:
    """Collects streamed rows and coords in memory (for `embed_slide`)."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.coords: list[np.ndarray] = []

    def append(self, rows: np.ndarray, coords: np.ndarray) -> None:
        self.rows.append(rows)
        self.coords.append(coords)


def embed_slide(
    grid: TileGrid,
    embedder: TileEmbedder,
    batch_size: int,
    num_workers: int,
    dtype: str = "float16",
    worker_start_method: StartMethod | None = None,
    prefetch_factor: int = 4,
) -> SlideFeatures:
    """Read and embed every tile of one slide and return all features in memory.

    All N x D values stay in memory, so this suits small grids, tests and benchmarks. The
    stage itself streams batches to the store with :func:`stream_slide_features`.
    Failed tiles are left out, never zero-filled.

    Raises:
        BackboneError: Some features are NaN or infinite in `dtype`.
    """
    sink = _ArraySink()
    streamed = stream_slide_features(
        grid,
        embedder,
        sink,
        batch_size=batch_size,
        num_workers=num_workers,
        dtype=dtype,
        worker_start_method=worker_start_method,
        prefetch_factor=prefetch_factor,
    )
    if sink.rows:
        features = np.concatenate(sink.rows)
        coords = np.concatenate(sink.coords)
    else:
        features = np.empty((0, embedder.embedding_dim), dtype=np.dtype(dtype))
        coords = np.empty((0, 2), dtype=np.int64)
    return SlideFeatures(
        features=features,
        coords=coords,
        failed_coords=streamed.failed_coords,
        seconds=streamed.seconds,
    )


def feature_store_attrs(
    coords_attrs: dict[str, Any], backbone: Backbone, cfg: ExtractConfig, n_failed: int
) -> dict[str, Any]:
    """Attributes of a feature store: the coords store's plus what made the features."""
    attrs = {key: value for key, value in coords_attrs.items() if key != "complete"}
    preset = backbone.preset
    attrs.update(
        {
            "backbone": preset.name,
            "backbone_timm_name": preset.timm_name,
            "weights": backbone.weights,
            "weights_sha256": backbone.weights_sha256 or "",
            "embedding_dim": backbone.embedding_dim,
            "normalize_mean": list(preset.mean),
            "normalize_std": list(preset.std),
            "input_px": preset.input_px,
            "pooling": preset.pooling,
            "dtype": cfg.dtype,
            "tta_flips": cfg.tta_flips,
            "n_failed_tiles": n_failed,
        }
    )
    if n_failed and attrs.get("status", "ok") == "ok":
        attrs["status"] = "partial"
    return attrs


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def backbone_output_dir(cfg: ExtractConfig) -> Path:
    """Folder of this backbone's feature stores: ``<output_dir>/<backbone>``."""
    return Path(cfg.output_dir) / get_backbone_preset(cfg.backbone).name


def list_extract_inputs(cfg: ExtractConfig) -> list[SlideInput]:
    """Slides to extract; ``path`` of each input is its coords store.

    Raises:
        ConfigError: The coords folder does not exist or contains no coords stores.
    """
    coords_dir = Path(cfg.coords_dir)
    if not coords_dir.is_dir():
        raise ConfigError(
            f"Coords folder {coords_dir} does not exist; run `slidemil tile` first or pass the "
            "folder it wrote with --coords-dir."
        )
    if cfg.slides is not None:
        slide_ids = [slide.slide_id for slide in list_slides(cfg.slides)]
        return [SlideInput(slide_id, coords_dir / f"{slide_id}.h5") for slide_id in slide_ids]
    stores = sorted(path for path in coords_dir.glob("*.h5") if ".tmp-" not in path.name)
    if not stores:
        raise ConfigError(
            f"Coords folder {coords_dir} contains no coords stores (*.h5); run `slidemil tile` "
            "with --output-dir pointing there first."
        )
    return [SlideInput(path.name[: -len(".h5")], path) for path in stores]


def slide_path_overrides(spec: str | None) -> dict[str, Path]:
    """Map slide id to slide file for a ``--slides`` folder, glob or CSV (empty without one)."""
    if spec is None:
        return {}
    return {slide.slide_id: slide.path for slide in list_slides(spec)}


def feature_store_problem(path: Path, n_coords: int | None = None) -> str | None:
    """Describe why a complete feature store cannot be used; None when it is valid.

    Checks that features and coords have the same number of rows and that every feature is
    finite (read in blocks of ``WRITE_BLOCK_ROWS`` rows). When ``n_coords`` is given, the
    stored rows plus the recorded failed tiles must also add up to the coords store's tiles.
    """
    try:
        with open_feature_store(path) as store:
            n_failed = int(store.attrs.get("n_failed_tiles", 0) or 0)
            if n_coords is not None and store.n_tiles + n_failed != n_coords:
                return (
                    f"it has {store.n_tiles} rows and {n_failed} failed tiles but the coords "
                    f"store lists {n_coords} tiles"
                )
            for start in range(0, store.n_tiles, WRITE_BLOCK_ROWS):
                block = np.asarray(store.features[start : start + WRITE_BLOCK_ROWS])
                finite = np.isfinite(block).all(axis=1)
                if not finite.all():
                    first = start + int(np.flatnonzero(~finite)[0])
                    return f"it has NaN or infinite features, first at row {first}"
    except (IncompleteStoreError, StoreFormatError, OSError) as err:
        return f"it cannot be read ({' '.join(str(err).split())})"
    return None


def _count_coords(path: Path) -> int | None:
    """Tiles in a coords store, or None when it cannot be read (the slide's run reports why)."""
    try:
        return read_coords_store(path).n_tiles
    except (IncompleteStoreError, StoreFormatError, OSError):
        return None


class _SlideExtractor:
    """Per-slide work of the stage; builds the backbone on the first slide that needs it."""

    def __init__(self, cfg: ExtractConfig, out_dir: Path, weights_id: str) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.weights_id = weights_id
        self.device = resolve_device(cfg.device)
        self.num_workers = resolve_num_workers(cfg.num_workers, self.device)
        self.slide_paths = slide_path_overrides(cfg.slides)
        self._embedder: TileEmbedder | None = None
        self._config_saved = False

    @property
    def embedder(self) -> TileEmbedder:
        if self._embedder is None:
            backbone = create_backbone(self.cfg.backbone, self.cfg.weights)
            self._embedder = TileEmbedder(
                backbone,
                self.device,
                autocast_dtype=resolve_autocast_dtype(self.cfg.precision, self.device),
                channels_last=self.cfg.channels_last,
                compile=self.cfg.compile,
                tta_flips=self.cfg.tta_flips,
            )
            logger.info(
                "Extracting with %s on %s (%s, batch %d, %d workers%s).",
                backbone.preset.name,
                self.device,
                describe_precision(self._embedder.autocast_dtype),
                self.cfg.batch_size,
                self.num_workers,
                " chosen automatically" if self.cfg.num_workers is None else "",
            )
        return self._embedder

    def store_path(self, slide: SlideInput) -> Path:
        return feature_store_path(self.out_dir, slide.slide_id, self.cfg.format)

    def other_format_path(self, slide: SlideInput) -> Path:
        """Path of the slide's store in the format this run does not write."""
        other: Literal["h5", "zarr"] = "zarr" if self.cfg.format == "h5" else "h5"
        return feature_store_path(self.out_dir, slide.slide_id, other)

    def requested_settings(self) -> dict[str, Any]:
        """Store attributes that must match for a finished store to count as done."""
        return {
            "weights": self.weights_id,
            "dtype": self.cfg.dtype,
            "tta_flips": self.cfg.tta_flips,
        }

    def settings_differences(self, path: Path) -> list[str]:
        """Describe how a complete store's settings differ from this run's (empty if equal).

        A store whose attributes cannot be read has no comparable settings; it counts as
        equal here and is rebuilt because :func:`feature_store_problem` reports it.
        """
        try:
            with open_feature_store(path) as store:
                attrs = store.attrs
        except (IncompleteStoreError, StoreFormatError, OSError):
            return []
        return [
            f"{key} {attrs.get(key)!r} (this run: {value!r})"
            for key, value in self.requested_settings().items()
            if attrs.get(key) != value
        ]

    def is_done(self, slide: SlideInput) -> bool:
        """True for a complete, valid store made with this run's settings (and no overwrite)."""
        path = self.store_path(slide)
        if self.cfg.overwrite or not is_complete_store(path):
            return False
        if self.settings_differences(path):
            return False
        problem = feature_store_problem(path, _count_coords(slide.path))
        if problem is not None:
            logger.warning("%s: rebuilding %s because %s.", slide.slide_id, path, problem)
            return False
        return True

    def __call__(self, slide: SlideInput) -> SlideOutcome:
        start = time.perf_counter()
        path = self.store_path(slide)
        self._reject_other_settings(path)
        old_format = self._reject_other_format(slide, path)
        _remove_stale_temporaries(path)
        if not slide.path.exists():
            raise IncompleteStoreError(
                f"{slide.path}: coords store of slide {slide.slide_id!r} is missing; run "
                "`slidemil tile` for this slide first."
            )
        coords_store = read_coords_store(slide.path)
        grid = self._locate_slide(tile_grid_from_store(coords_store, slide.slide_id), slide)
        built_backbone = self._embedder is None
        embedder = self.embedder
        backbone_seconds = time.perf_counter() - start if built_backbone else 0.0

        if coords_store.n_tiles:
            _check_slide_matches(grid, coords_store.attrs)
        # Rows go to the temporary store batch by batch. Any error below, including the
        # failed-tile check, removes the temporary store, so nothing incomplete is committed.
        with FeatureStoreWriter.appending(
            path, embedder.embedding_dim, {}, dtype=self.cfg.dtype, fmt=self.cfg.format
        ) as writer:
            result = stream_slide_features(
                grid,
                embedder,
                writer,
                batch_size=self.cfg.batch_size,
                num_workers=self.num_workers,
                dtype=self.cfg.dtype,
                worker_start_method=self.cfg.worker_start_method,
                prefetch_factor=self.cfg.prefetch_factor,
                progress=self.cfg.progress,
            )
            n_failed = int(result.failed_coords.shape[0])
            self._check_failed_fraction(
                slide, n_failed, coords_store.n_tiles, result.failed_coords
            )
            attrs = feature_store_attrs(coords_store.attrs, embedder.backbone, self.cfg, n_failed)
            writer.update_attrs(attrs)
        if old_format is not None:
            logger.info("%s: removing %s, replaced by %s (--overwrite).", slide.slide_id,
                        old_format, path)
            _remove_store(old_format)
        if not self._config_saved:
            # Written after the first store so that a run that rejected its settings for
            # every slide leaves the previous extract_config.yaml in place.
            save_resolved_config(self.cfg, self.out_dir, self.weights_id)
            self._config_saved = True
        n_ok = result.n_rows
        self._log_timing(slide, n_ok, result.seconds, backbone_seconds, start, path)
        message = ""
        if n_failed:
            first = result.failed_coords[0]
            message = (
                f"{n_failed} of {coords_store.n_tiles} tiles could not be decoded and were "
                f"skipped (first at level-0 x={int(first[0])}, y={int(first[1])})"
            )
        status = str(attrs.get("status", "ok"))
        if status not in ("ok", "no_tissue", "partial"):
            status = "ok"
        return SlideOutcome(status=status, n_tiles=n_ok, message=message)

    def _locate_slide(self, grid: TileGrid, slide: SlideInput) -> TileGrid:
        """Apply the ``--slides`` location of the slide file and check that the file exists.

        Raises:
            SlideOpenError: The slide file is not found.
        """
        override = self.slide_paths.get(slide.slide_id)
        if override is not None:
            grid = replace(grid, slide_path=override)
        if grid.slide_path.exists():
            return grid
        if override is not None:
            raise SlideOpenError(
                f"{grid.slide_path}: slide file of {slide.slide_id!r} not found; the path "
                "comes from --slides. Check the slide list."
            )
        raise SlideOpenError(
            f"{grid.slide_path}: slide file of {slide.slide_id!r} not found; the path comes "
            f"from the coords store {slide.path} (attribute slide_path). If the slide moved "
            "after tiling, pass its new location with --slides (folder, glob or CSV)."
        )

    def _log_timing(
        self,
        slide: SlideInput,
        n_ok: int,
        embed_seconds: float,
        backbone_seconds: float,
        start: float,
        path: Path,
    ) -> None:
        # The total is what the manifest's `seconds` column records for the same call.
        total = time.perf_counter() - start
        rate = n_ok / embed_seconds if embed_seconds > 0 else 0.0
        backbone_note = (
            f" ({backbone_seconds:.1f} s building the backbone)" if backbone_seconds else ""
        )
        logger.info(
            "%s: %d tiles, %.1f s for the slide%s, of which reading, embedding and writing "
            "tiles took %.1f s (%.1f tiles/s) -> %s",
            slide.slide_id,
            n_ok,
            total,
            backbone_note,
            embed_seconds,
            rate,
            path,
        )

    def _reject_other_settings(self, path: Path) -> None:
        if self.cfg.overwrite or not is_complete_store(path):
            return
        differences = self.settings_differences(path)
        if not differences:
            return
        raise ConfigError(
            f"{path}: a complete feature store made with other settings exists: "
            f"{'; '.join(differences)}. Rerun with --overwrite to replace it, delete the store "
            "or choose another --output-dir; slidemil never overwrites features silently."
        )

    def _reject_other_format(self, slide: SlideInput, path: Path) -> Path | None:
        """Check for a complete store of the slide in the other format.

        Training reads one store per slide, so the two formats never coexist in one folder.

        Returns:
            The other-format store to remove once the new store is written (with
            ``overwrite``), or None when there is no such store.

        Raises:
            ConfigError: A complete store in the other format exists and ``overwrite`` is off.
        """
        other = self.other_format_path(slide)
        if not is_complete_store(other):
            return None
        if self.cfg.overwrite:
            return other
        raise ConfigError(
            f"{slide.slide_id}: a complete {other.suffix.lstrip('.')} feature store {other} "
            f"exists, and this run would write a {self.cfg.format} store {path} beside it; "
            "training rejects two feature stores for one slide. Rerun with --overwrite to "
            f"replace {other.name} by {path.name} (the old store is removed), or choose "
            "another --output-dir."
        )

    def _check_failed_fraction(
        self, slide: SlideInput, n_failed: int, n_tiles: int, failed_coords: np.ndarray
    ) -> None:
        if n_failed == 0:
            return
        listed = ", ".join(f"({int(x)}, {int(y)})" for x, y in failed_coords[:10])
        logger.warning(
            "%s: %d of %d tiles could not be decoded and are left out; level-0 (x, y): %s%s",
            slide.slide_id,
            n_failed,
            n_tiles,
            listed,
            " ..." if n_failed > 10 else "",
        )
        if n_failed == n_tiles or n_failed > self.cfg.max_failed_tile_fraction * n_tiles:
            raise TileReadError(
                f"{slide.slide_id}: {n_failed} of {n_tiles} tiles could not be decoded, more "
                f"than max_failed_tile_fraction={self.cfg.max_failed_tile_fraction}. The slide "
                "file is probably damaged; re-export or re-scan it, or raise "
                "--max-failed-tile-fraction to keep the decodable tiles."
            )


def write_feature_store(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
    cfg: ExtractConfig,
) -> None:
    """Write one slide's features [N, D] and coords [N, 2], already in memory, atomically.

    The stage does not use this: it appends each batch as it is computed (see
    :func:`stream_slide_features`).
    """
    n_rows, dim = features.shape
    with FeatureStoreWriter(
        path, n_rows, dim, coords, attrs, dtype=cfg.dtype, fmt=cfg.format
    ) as writer:
        for start in range(0, n_rows, WRITE_BLOCK_ROWS):
            writer.write(start, features[start : start + WRITE_BLOCK_ROWS])


def _remove_store(path: Path) -> None:
    """Delete a feature store: a file (HDF5) or a folder (Zarr)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary stores of this slide left by killed jobs (the caller holds its lock).

    These are `<store>.tmp-<pid>` being written and `<store>.old-<pid>`, a replaced zarr store
    that a job killed during the commit had moved aside but not yet deleted.
    """
    leftovers = [*path.parent.glob(f"{path.name}.tmp-*"), *path.parent.glob(f"{path.name}.old-*")]
    for leftover in leftovers:
        logger.info("Removing %s left by an interrupted run.", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def save_resolved_config(cfg: ExtractConfig, out_dir: Path, weights_id: str) -> Path:
    """Write the resolved config beside the stores as ``extract_config.yaml`` (atomic).

    The stage calls this after the first store of a run is written, so the file describes
    stores that exist. A run that extracts no slide leaves the previous file unchanged.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "extract_config.yaml"
    content = cfg.model_dump(mode="json")
    content["resolved_weights"] = weights_id
    replace_text(path, yaml.safe_dump(content, sort_keys=False))
    return path


def run_extraction(cfg: ExtractConfig) -> StageResult:
    """Extract features for every slide of ``cfg.coords_dir`` (this shard's part of it).

    Returns:
        Counts of processed, failed and skipped slides and the manifest path
        (``<output_dir>/<backbone>/manifest.csv``).

    Raises:
        ConfigError: Missing coords folder, invalid device or shard.
        BackboneError: Unknown backbone or unusable weights (before any slide is touched).
        SlidemilError: The first failing slide's error when ``skip_errors`` is False.
    """
    out_dir = backbone_output_dir(cfg)
    weights_id = expected_weights_id(cfg.backbone, cfg.weights)
    inputs = list_extract_inputs(cfg)
    extractor = _SlideExtractor(cfg, out_dir, weights_id)
    logger.info(
        "Extract: %d slides from %s into %s (backbone %s, weights %s).",
        len(inputs),
        cfg.coords_dir,
        out_dir,
        cfg.backbone,
        weights_id,
    )
    return run_slides(
        inputs,
        extractor,
        stage=STAGE,
        output_dir=out_dir,
        is_done=extractor.is_done,
        skip_errors=cfg.skip_errors,
        shard=cfg.shard,
        progress=cfg.progress,
    )


__all__ = [
    "ExtractConfig",
    "FeatureSink",
    "SlideFeatures",
    "StreamedSlide",
    "TileBatch",
    "TileDataset",
    "TileEmbedder",
    "TileGrid",
    "collate_tiles",
    "embed_slide",
    "feature_store_attrs",
    "make_tile_loader",
    "resolve_autocast_dtype",
    "resolve_device",
    "run_extraction",
    "stream_slide_features",
    "tile_grid_from_store",
    "tile_progress",
    "write_feature_store",
]
