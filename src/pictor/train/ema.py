"""EMA weights: an exponential moving average of the trained module's parameters, in fp32.

`EMA` keeps a whole shadow copy of the module on every process (one process, or DDP, where every rank holds
the whole model anyway). `ShardedEMA` is its FSDP form: each rank averages only its own shards of the
parameters, in place and with no collective, so the average costs 4 bytes per parameter divided over the
ranks, like the weights it follows. Both hand out the whole averaged module where one is needed (sample
grids, evaluations, bundles) through `whole()`, which for the sharded form gathers the shards (a collective:
every rank enters it, in the same order) into a fresh module on rank 0 for as long as it is used.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def decay_at(decay: float, warmup: bool, step: int) -> float:
    # The warm-up lets a short run's EMA follow the fast early changes instead of the random init.
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class EMA:
    """A whole fp32 shadow copy of the module: what sample grids are drawn with and bundles store.
    Buffers (none in pictor's models today) are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return decay_at(self.decay, self.warmup, step)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        ema = [p for _, p in sorted(self.module.named_parameters(), key=lambda kv: kv[0])]
        live = [p.detach().float() for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0])]
        torch._foreach_lerp_(ema, live, weight)
        for (_, b_ema), (_, b) in zip(self.module.named_buffers(), model.named_buffers(), strict=True):
            b_ema.copy_(b)

    @contextmanager
    def whole(self, keep: bool = True, device: torch.device | None = None) -> Iterator[nn.Module | None]:
        """The averaged module (already whole and on the training device; `keep`/`device` are for the
        sharded form's sake)."""
        yield self.module if keep else None

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)


def meta_copy(model: nn.Module) -> nn.Module:
    """The module's architecture on the meta device: a deep copy whose tensors take no memory."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ShardedEMA:
    """The EMA of an FSDP-sharded module, sharded as its parameters are.

    `skeleton` is the whole module on the meta device (`meta_copy` of it before sharding): `whole()` loads
    the gathered average into a copy of it. The per-step update is the same elementwise lerp as `EMA`'s, on
    each rank's pieces, so the average equals the unsharded one bit for bit."""

    def __init__(self, model: nn.Module, skeleton: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup, self.skeleton = decay, warmup, skeleton
        params = dict(model.named_parameters())
        self.names = sorted(params)
        self.layout = {n: p for n, p in params.items() if isinstance(p, DTensor)}  # mesh, placements, shape
        with torch.no_grad():
            self.shards = {n: _local(params[n]).detach().float().clone() for n in self.names}
            self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def decay_at(self, step: int) -> float:
        return decay_at(self.decay, self.warmup, step)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        params = dict(model.named_parameters())
        live = [_local(params[n]).detach().float() for n in self.names]
        torch._foreach_lerp_([self.shards[n] for n in self.names], live, weight)
        for n, b in model.named_buffers():
            self.buffers[n].copy_(b)

    def _full(self, name: str) -> torch.Tensor:
        shard = self.shards[name]
        like = self.layout.get(name)
        if like is None:
            return shard
        whole = DTensor.from_local(
            shard, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
        )
        return whole.full_tensor()

    @contextmanager
    def whole(self, keep: bool = True, device: torch.device | None = None) -> Iterator[nn.Module | None]:
        """The whole averaged module on rank 0 (`keep`; None elsewhere), on `device` or the CPU, for the
        duration. Every rank must enter it: one gathered tensor at a time is on the training device."""
        state = {}
        for name in self.names:
            value = self._full(name)
            if keep:
                state[name] = value.to(device or "cpu", copy=True)
        if not keep:
            yield None
            return
        state.update({n: b.to(device or "cpu", copy=True) for n, b in self.buffers.items()})
        module = copy.deepcopy(self.skeleton)
        module.load_state_dict(state, strict=True, assign=True)
        yield module.eval().requires_grad_(False)

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """A whole EMA state (a checkpoint's) cut to this rank's shards (a collective, as sharding is)."""
        expected = set(self.names) | set(self.buffers)
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise RuntimeError(
                f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name in self.names:
            like = self.layout.get(name)
            value = state[name].float()
            shape = like.shape if like is not None else self.shards[name].shape
            if value.shape != shape:
                raise RuntimeError(f"EMA state does not match the model: {name} is {tuple(value.shape)}")
            value = value.to(self.shards[name].device)
            if like is not None:
                value = distribute_tensor(value, like.device_mesh, like.placements).to_local()
            self.shards[name].copy_(value)
        for name, buf in self.buffers.items():
            buf.copy_(state[name])
