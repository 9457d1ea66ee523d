"""Seeding of every random number generator a training run touches.

A run is reproducible on the CPU when Python's `random`, numpy, torch and every DataLoader
worker start from states derived from one integer seed. On the GPU some kernels
(`index_add_`, scatter reductions) are non-deterministic unless deterministic algorithms are
requested, which `seed_everything(..., deterministic=True)` does at some cost in speed.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

logger = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (CPU and every CUDA device) from one integer.

    Args:
        seed: the run's seed; the same seed gives the same initial weights and data order.
        deterministic: also ask torch for deterministic kernels (slower on the GPU, and kernels
            without a deterministic version then raise instead of silently varying).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        # cuBLAS needs this workspace setting before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    logger.debug("seeded python, numpy and torch with %d (deterministic=%s)", seed, deterministic)


def make_generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `seed`, for samplers and DataLoader shuffling."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed Python and numpy in each worker from torch's seed.

    torch already gives every worker the seed `base_seed + worker_id`, where `base_seed` comes
    from the loader's generator; Python's `random` and numpy do not follow it on their own.
    """
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
