"""Data-parallel training with `torchrun`: process group set-up, sharding and reductions.

`torchrun --nproc-per-node G [--nnodes N ...] --no-python slidemil train ...` starts one
process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE. Each process trains on its own share
of the packs of a step, DistributedDataParallel averages gradients, and only rank 0 writes
files.
Without those variables everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")


@dataclass(frozen=True)
class DistributedContext:
    """Position of this process in the job.

    Attributes:
        rank: global rank, 0..world_size-1.
        local_rank: rank on this node, which picks the GPU.
        world_size: number of processes.
        device: the device this process trains on.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs progress (rank 0)."""
        return self.rank == 0


def is_distributed() -> bool:
    """Return whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str = "auto", backend: str | None = None) -> DistributedContext:
    """Join the process group `torchrun` describes in the environment, or run alone.

    Args:
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"; under torchrun a
            CUDA process uses `cuda:LOCAL_RANK`.
        backend: "nccl" or "gloo"; default nccl for CUDA and gloo for the CPU.
    """
    resolved = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=resolved)

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if resolved.type == "cuda" else "gloo"))
    logger.info("process %d of %d on %s", rank, world_size, resolved)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size,
                              device=resolved)


def resolve_device(device: str) -> torch.device:
    """Return the torch device for "auto", "cpu", "cuda" or "cuda:N".

    Raises:
        ConfigError: `device` is none of these, or names CUDA (or a CUDA index) that this
            machine lacks.
    """
    from preprocessing.errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"Invalid device {device!r}; use auto, cpu, cuda or cuda:<index>."
        ) from err
    if resolved.type not in ("cpu", "cuda") or (resolved.type == "cpu" and resolved.index):
        raise ConfigError(f"Invalid device {device!r}; use auto, cpu, cuda or cuda:<index>.")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"Device {device!r} requested but CUDA is not available on this "
                              "machine; use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"Device {device!r} requested but this machine has {count} CUDA "
                              f"device(s), cuda:0 to cuda:{count - 1}; pick one of them")
    return resolved


def wrap_model(
    model: nn.Module, context: DistributedContext, find_unused_parameters: bool = False
) -> nn.Module:
    """Move the model to its device and wrap it in DistributedDataParallel under torchrun.

    Set `find_unused_parameters` for models that skip some parameters in a step; DDP then
    raises a message naming them when it is left unset.
    """
    model = model.to(context.device)
    if context.world_size <= 1:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def shard(items: Sequence[ItemT], rank: int, world_size: int) -> list[ItemT]:
    """Items rank, rank + world_size, ... of `items` (this process's share of a step)."""
    return list(items[rank::world_size])


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum of `values` over all processes (a copy of `values` when running alone)."""
    if not is_distributed():
        return values.clone()
    # NCCL reduces only CUDA tensors; gloo reduces CPU tensors.
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = values.to(backend_device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def barrier() -> None:
    """Wait for every process (no-op when running alone)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(value: ItemT, src: int = 0) -> ItemT:
    """`value` of process `src` on every process (returned unchanged when running alone)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup_distributed(wait_for_peers: bool = False) -> None:
    """Leave the process group when one was joined.

    Args:
        wait_for_peers: meet every process at a barrier first, so that all leave together.
            Use it on the success path. Without it, a gloo process that left while rank 0 was
            still saving aborted once in a test run ("terminate called without an active
            exception"). Leave it off after an error, where a peer may never reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
