"""torchrun set-up: DistributedDataParallel, or FSDP2 for a model that does not fit one device.

`pictor train ...` under `torchrun --nproc_per_node N` finds RANK / WORLD_SIZE / LOCAL_RANK in the
environment and joins a process group: NCCL when each rank has a GPU, gloo on the CPU. Without those
variables it is a single process and every helper here is a no-op.

With `--fsdp` the transformer's parameters, gradients and AdamW state are sharded over the ranks
(`fully_shard`, one unit per transformer block, then the root), built from rank 0's whole model while the
other ranks hold only its meta-device architecture (the EMA is sharded too: `pictor.train.ema`).
Checkpoints stay in the one full format: `full_state` and `full_tensor` gather the shards (collectives:
every rank calls them, in the same order), rank 0 writes, and `load_full_state` shards a full state again,
so a run may resume with or without FSDP.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


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
    """Leave the process group together, after a finished run only.

    A rank that failed must leave without it: the other ranks are inside some other collective (the next
    step's all-reduce), where this barrier would hold them all until the group's timeout (30 minutes)
    before the error surfaced; exiting lets torchrun see the failure and stop them within seconds. Nor
    may it destroy the group, which can wait on a peer's pending work (NCCL)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def patient_barrier(info: DistInfo, hours: float = 24.0) -> None:
    """A barrier for waits longer than the process group's timeout (NCCL's is 10 minutes), such as ranks
    encoding a large folder's latents at different speeds: on a gloo group of its own with a long one."""
    if info.distributed:
        group = dist.new_group(backend="gloo", timeout=timedelta(hours=hours))
        dist.barrier(group=group)
        dist.destroy_process_group(group)


def wrap(model: nn.Module, info: DistInfo, unused: bool = False) -> nn.Module:
    """DDP for more than one rank; the bare module otherwise. ``unused``: some trained parameters may get no
    gradient in a step (a LoRA run's --module-dropout), so DDP searches for them after each forward."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    # Otherwise every trained parameter gets a gradient every step in every stage (a ControlNet's that
    # could not are frozen: `pictor.train.controlnet`), so no unused-parameter search.
    return DistributedDataParallel(
        model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=unused
    )


def shard(model: nn.Module, units: Iterable[nn.Module], device: torch.device) -> nn.Module:
    """FSDP2 in place: each unit (a transformer block) gathers its weights only while it runs, then the
    root takes the rest (embedders, final layer). Build the optimizer after this: it must see the shards.

    Rank 0 holds the whole model, initialized or loaded (on the CPU or any device); the other ranks may hold
    it on the meta device, taking no memory. The module is sharded on the meta device, each rank allocates
    only its shards on `device`, and rank 0 sends their values one tensor at a time: no rank ever holds the
    whole model on `device`, and only rank 0 holds it at all (in host memory, until this returns)."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ValueError("--fsdp shards over torchrun's processes: run under torchrun --nproc_per_node N")
    # Rank 0's values stay referenced here while its module's parameters move to the meta device.
    source = model.state_dict() if dist.get_rank() == 0 else None
    model.to("meta")
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    model.to_empty(device=device)
    load_full_state(model, source, from_rank0=True)
    return model


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a shard (a collective), or the tensor itself when it is not sharded."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The module's state dict with every shard gathered, on the CPU; empty where `keep` is False.

    Every rank must call it (the gathers are collectives); one whole tensor at a time is on the device, so
    a sharded model never needs its whole size there."""
    state = {}
    for name, value in model.state_dict().items():
        whole = full_tensor(value.detach())  # gathered on every rank alike, kept (and copied) on some
        if keep:
            state[name] = whole.cpu()
    return state


def local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's own tensors: its shards under FSDP, the whole tensors otherwise."""
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}


def load_full_state(
    model: nn.Module, state: Mapping[str, torch.Tensor] | None, from_rank0: bool = False
) -> None:
    """A full state dict into a module, sharding it where the module is sharded; each tensor is read
    from `state` once (it may be a file read lazily) and is whole only until its shard is cut.

    Sharded tensors take rank 0's values (distribute_tensor scatters them). `from_rank0` (every rank calls
    together): unsharded ones are broadcast from rank 0 too, and ranks other than 0 may pass `state` None,
    holding no values of their own (a meta-built model in `shard`)."""
    own = model.state_dict()
    if state is not None and set(own) != set(state):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise RuntimeError(
            f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, target in own.items():
            if state is None:  # only the shape matters: rank 0's data is what arrives
                value = torch.empty(target.shape, dtype=target.dtype, device=target.device)
            else:
                value = state[name]
                if value.shape != target.shape:  # copy_ would broadcast a smaller tensor silently
                    raise RuntimeError(
                        f"state dict does not match the model: {name} is {tuple(value.shape)}, "
                        f"the model's is {tuple(target.shape)}"
                    )
                value = value.to(target.device, target.dtype)
            if isinstance(target, DTensor):  # scattered from rank 0 (distribute_tensor's src_data_rank)
                value = distribute_tensor(value, target.device_mesh, target.placements)
            elif from_rank0:
                dist.broadcast(value, src=0)
            target.copy_(value)


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full optimizer-state tensor cut to its sharded parameter's shard (unchanged when not sharded)."""
    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


@contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-steps that are not the last. FSDP reduces on
    every micro-step: skipping would keep each block's whole gradient between them, unsharded."""
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
