"""The `meta` device as a stand-in for CUDA in CPU offload tests (no GPU needed).

On a CPU-only machine offload's execution and offload devices are both the CPU, so a tensor left in CPU
memory meeting one on the execution device goes unnoticed; on a GPU that op raises. Here the execution
device is ``meta``: `MetaMover` moving a module in swaps each of its tensors for a meta tensor of the same
shape and dtype (keeping the real one), and moving it out puts the real CPU tensor back. A CPU tensor
meeting a meta one in an op is then what a CPU tensor meeting a CUDA one is on a GPU: meta raises for most
ops, and `DevCheck` flags the ones it lets through (``F.linear`` is lenient). Meta tensors hold no values,
so a run gets as far as the first op that reads one (a sampler's ``tolist()`` of its times), never to
pixels; the tests here check placement, the pixel tests elsewhere check values.
"""

from __future__ import annotations

import traceback
import warnings
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from pictor.pipeline import Pipeline

META = torch.device("meta")

# Ops that may take tensors on two devices on a GPU too (copies), and factories that take one.
_CROSS_DEVICE_OK = {
    "to",
    "copy_",
    "__setitem__",
    "cpu",
    "cuda",
    "__get__",
    "_to_copy",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "randn_like",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "new_tensor",
}


class MetaMover:
    """An offload mover with ``meta`` as the execution device: in swaps tensors for meta ones, out puts the
    real CPU ones back. `fail_at`: raise instead of moving in the tensor of that number (counting every
    tensor moved in, from 0), leaving a module half moved, as running out of device memory would."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.real: dict[int, torch.Tensor] = {}  # id(meta stand-in) -> the real CPU tensor
        self.fail_at = fail_at
        self.moved_in = 0

    def __call__(self, module: nn.Module, device: torch.device, inward: bool) -> None:
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for key, t in list(store.items()):
                    if t is None:
                        continue
                    if inward and not t.is_meta:
                        if self.fail_at is not None and self.moved_in == self.fail_at:
                            raise RuntimeError("CUDA out of memory (MetaMover.fail_at)")
                        self.moved_in += 1
                        m = torch.empty_like(t, device=META)
                        m = nn.Parameter(m, requires_grad=False) if isinstance(t, nn.Parameter) else m
                        self.real[id(m)] = t
                        store[key] = m
                    elif not inward and t.is_meta and id(t) in self.real:
                        store[key] = self.real.pop(id(t))


def meta_tensors(*modules: nn.Module) -> list[str]:
    """The names of the modules' tensors that are on the meta device (offload left them "in")."""
    return [
        name
        for module in modules
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.is_meta
    ]


class DevCheck(TorchFunctionMode):
    """Records every op whose tensor arguments sit both in CPU memory and on ``meta`` (what raises on a
    GPU), where in pictor it ran. 0-dim CPU tensors are allowed, as CUDA allows them."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[tuple[str, str]] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in _CROSS_DEVICE_OK:
            flat, _ = tree_flatten((args, kwargs))
            devices = {
                t.device.type
                for t in flat
                if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)
            }
            if {"cpu", "meta"} <= devices:
                where = [line.strip() for line in traceback.format_stack()[:-1] if "/pictor/" in line]
                self.hits.append((name, where[-1] if where else "?"))
        return func(*args, **kwargs)


def meta_offload(pipe: Pipeline, mode: str = "model", blocks_on_device: int = 0, **mover: Any) -> MetaMover:
    """Put `pipe` under offload with ``meta`` as its execution device (its models stay in CPU memory);
    returns the mover."""
    meta = MetaMover(**mover)
    pipe.device = META
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.set_offload(mode, blocks_on_device, mover=meta)
    return meta
