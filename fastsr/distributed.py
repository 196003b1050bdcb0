"""The torchrun process group: joined at the start of a run, left at its end, in one place."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes files, so that N ranks leave the same run folder as one process."""
        return self.rank == 0


@contextlib.contextmanager
def process_group(device: str | torch.device) -> Iterator[DistInfo]:
    """Join torchrun's process group (``WORLD_SIZE`` > 1) for the duration of the block.

    Under torchrun a CUDA ``device`` without an index becomes this rank's GPU (``LOCAL_RANK``); the
    group uses nccl on CUDA, gloo otherwise (``FASTSR_DIST_BACKEND`` overrides). A group created
    here is destroyed on leaving; one the caller created is left alone. A block that ends normally
    waits for all ranks first, so that no rank returns before rank 0 has written its files.
    Shared by training and file upscaling.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        yield DistInfo(0, 1, dev)
        return
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(os.environ.get("FASTSR_DIST_BACKEND") or ("nccl" if dev.type == "cuda" else "gloo"))
    try:
        yield DistInfo(dist.get_rank(), dist.get_world_size(), dev)
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if info.world_size > 1:
        dist.barrier()


def all_gather(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order."""
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    return gathered


def broadcast_object(value: object, info: DistInfo) -> object:
    """Rank 0's ``value`` (any picklable object) on every rank; the value itself in one process."""
    if info.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
