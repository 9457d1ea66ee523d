"""All features of a bag data set in one tensor on a device, for data sets that fit in GPU memory.

With the cache, building a pack is one `index_select` on the device: no store is opened, no
DataLoader worker is needed and no features cross the PCIe bus during training. Coordinates
stay in host memory; they are small and only needed when writing outputs.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from preprocessing.errors import ConfigError

if TYPE_CHECKING:
    from mil.data.dataset import BagDataset

logger = logging.getLogger(__name__)


class FeatureCache:
    """Features of every slide of a `BagDataset`, back to back in one device tensor.

    Args:
        dataset: the bags to load (every tile of every slide).
        device: where the features live, usually "cuda"; "cpu" works too.
        dtype: storage type on the device; float16 halves memory against float32, and
            gathered rows are returned as float32.
        memory_fraction: refuse to load when the features need more than this share of the
            device's free memory (CUDA only).

    Attributes:
        features: [R + 1, D] features of all R tiles; the last row is zero and fills padding.
        offsets: int64 [S + 1]; slide s has the rows `offsets[s]:offsets[s + 1]`.
        coords: int64 [R, 2] level-0 (x, y) of all tiles, in host memory.

    Raises:
        ConfigError: the features do not fit in the device's free memory.
    """

    def __init__(
        self,
        dataset: BagDataset,
        device: torch.device | str = "cuda",
        dtype: torch.dtype = torch.float16,
        memory_fraction: float = 0.9,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.offsets = np.zeros(len(dataset) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum(dataset.lengths)
        n_rows = int(self.offsets[-1])
        element_size = torch.empty((), dtype=dtype).element_size()
        n_bytes = (n_rows + 1) * dataset.dim * element_size
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if n_bytes > memory_fraction * free:
                raise ConfigError(
                    f"the features of {len(dataset)} slides ({n_rows} tiles x {dataset.dim}) "
                    f"need {n_bytes / 2**30:.1f} GiB, more than {memory_fraction:.0%} of the "
                    f"{free / 2**30:.1f} GiB free on {self.device}; train without the GPU "
                    "feature cache (features are then read by DataLoader workers)"
                )

        started = time.perf_counter()
        self.features = torch.zeros((n_rows + 1, dataset.dim), dtype=dtype, device=self.device)
        self.coords = np.zeros((n_rows, 2), dtype=np.int64)
        for index in range(len(dataset)):
            start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
            if start == stop:
                continue
            features, coords, _ = dataset.read_arrays(index)
            self.features[start:stop] = torch.from_numpy(features).to(self.device, dtype)
            self.coords[start:stop] = coords
        logger.info("cached %d tiles of %d slides on %s (%.2f GiB) in %.1f s", n_rows,
                    len(dataset), self.device, n_bytes / 2**30, time.perf_counter() - started)

    @property
    def padding_row(self) -> int:
        """Row index of the zero row that padding rows gather."""
        return int(self.features.shape[0]) - 1

    def global_rows(self, slide_index: int, rows: np.ndarray) -> np.ndarray:
        """Cache rows of the store rows `rows` of slide `slide_index`, int64 [n]."""
        return self.offsets[slide_index] + np.asarray(rows, dtype=np.int64)

    def gather(self, global_rows: np.ndarray) -> torch.Tensor:
        """Float32 [n, D] features of cache rows `global_rows` on the cache's device."""
        index = torch.from_numpy(np.ascontiguousarray(global_rows, dtype=np.int64))
        if self.device.type == "cuda":
            index = index.pin_memory().to(self.device, non_blocking=True)
        return self.features.index_select(0, index).float()
