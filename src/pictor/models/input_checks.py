"""Shape checks shared by the FLUX.1 transformer and its ControlNet: their inputs take the same forms, and a
wrong one should be named, with the model it was given to, before a matmul fails on it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["batched_ids", "batched_scalar", "shape_of"]


def shape_of(t: Any) -> str:
    """A tensor's shape as a list, or the type of something that is no tensor (for error messages)."""
    return str(list(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def batched_ids(owner: str, name: str, ids: Tensor, batch: int, length: int) -> Tensor:
    """[L, 3] or [1|B, L, 3] -> [1|B, L, 3] (a leading 1 is broadcast later, never copied)."""
    if not isinstance(ids, Tensor):
        raise ValueError(
            f"{owner}: {name} must be a tensor [B, {length}, 3] or [{length}, 3], got {shape_of(ids)}"
        )
    if ids.ndim == 2:
        ids = ids.unsqueeze(0)
    if ids.ndim != 3 or ids.shape[1] != length or ids.shape[2] != 3 or ids.shape[0] not in (1, batch):
        raise ValueError(
            f"{owner}: {name} must be [{batch}, {length}, 3] or [{length}, 3], got {shape_of(ids)}"
        )
    return ids


def batched_scalar(owner: str, name: str, value: Tensor, batch: int) -> Tensor:
    """[B] (or a scalar / [1], broadcast to the batch) -> [B]."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{owner}: {name} must be a tensor of shape [{batch}], got {shape_of(value)}")
    if value.ndim == 0 or (value.ndim == 1 and value.shape[0] == 1):
        return value.reshape(1).expand(batch)
    if value.ndim != 1 or value.shape[0] != batch:
        raise ValueError(f"{owner}: {name} must be [{batch}] (one value per sample), got {shape_of(value)}")
    return value
