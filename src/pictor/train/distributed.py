"""torchrun / DistributedDataParallel set-up.

`pictor train ...` under `torchrun --nproc_per_node N` finds RANK / WORLD_SIZE / LOCAL_RANK in the
environment and joins a process group: NCCL when each rank has a GPU, gloo on the CPU. Without those
variables it is a single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def setup(requested_device: str | None = None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP for more than one rank; the bare module otherwise."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    # Every parameter gets a gradient every step in both stages, so no unused-parameter search.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


@contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-steps that are not the last."""
    ctx = model.no_sync() if skip and hasattr(model, "no_sync") else nullcontext()
    with ctx:
        yield


def mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (for logging the global loss)."""
    if not info.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def broadcast(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.contiguous()
        dist.broadcast(value, src=0)
    return value


def gather(value: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (e.g. parameter checksums) on every rank."""
    if not info.distributed:
        return [value]
    out = [torch.empty_like(value) for _ in range(info.world_size)]
    dist.all_gather(out, value.contiguous())
    return out
