"""Which of a Pipeline's models offload moves together (`pictor.models.offload` does the moving).

A group is what runs as one piece. The ControlNets share the transformer's group: they run on every
sampler step beside it, and a group of their own would move the whole transformer out and back in twice a
step. Everything else (text encoder, autoencoder, the adapters and vision towers that run once before the
sampler, the upscaler) is a group of its own, so at most one of them is on the device at a time.

Offload is not recorded: it changes where weights wait between uses, not one computed value (the tests
compare pixels bit for bit), and `reproduce` gives the same pixels with or without it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from pictor.models.offload import Mover, Offload, offload_mode_problem
from pictor.notices import PictorWarning

if TYPE_CHECKING:
    from pictor.pipeline import Pipeline

__all__ = ["OFFLOAD_DEVICE", "check_offload", "home_device", "make_offload", "offload_groups"]

OFFLOAD_DEVICE = torch.device("cpu")


def check_offload(mode: str | None, blocks_on_device: int) -> None:
    """Refuse an unknown mode (or a bad block count) before any model is moved."""
    problem = offload_mode_problem(mode, blocks_on_device)
    if problem:
        raise ValueError(problem)


def home_device(device: torch.device, mode: str | None) -> torch.device:
    """Where the models wait between uses: CPU memory under offload, else the execution device."""
    return OFFLOAD_DEVICE if mode is not None else device


def offload_groups(pipe: Pipeline) -> dict[str, list[nn.Module]]:
    """The pipeline's models by group, as they are now (call again after loading an adapter or a LoRA)."""
    groups: dict[str, list[nn.Module]] = {
        "text_encoder": [pipe.text_encoder],
        "transformer": [pipe.transformer, *(unit.model for unit in pipe.controlnets)],
        "autoencoder": [pipe.autoencoder],
    }
    if pipe.layout_adapter is not None:
        groups["layout_adapter"] = [pipe.layout_adapter]
    if pipe.reference_adapter is not None:
        groups["reference_adapter"] = [pipe.reference_adapter]
    if pipe.redux is not None:
        groups["redux"] = [pipe.redux.siglip, pipe.redux.encoder]
    if pipe.ip_adapter is not None:  # its per-block keys and values are computed once, before sampling
        groups["ip_adapter"] = [pipe.ip_adapter.clip, pipe.ip_adapter.adapter]
    if pipe.upscaler is not None:
        groups["upscaler"] = [pipe.upscaler.net]
    return groups


def make_offload(
    mode: str | None, device: torch.device, blocks_on_device: int = 0, mover: Mover | None = None
) -> Offload | None:
    """The scheduler for `mode` (None: none). On a CPU-only run it warns that nothing is saved: the
    execution device is CPU memory, where offload keeps the models anyway. The hooks are still installed
    (their moves are CPU-to-CPU no-ops), so the same code path runs everywhere."""
    check_offload(mode, blocks_on_device)
    if mode is None:
        return None
    if device.type == "cpu":
        warnings.warn(
            f"offload={mode!r} does nothing on a CPU run: the models already live in CPU memory, where "
            "offload would keep them between uses; it saves GPU memory only with device='cuda'",
            PictorWarning,
            stacklevel=4,
        )
    return Offload(mode, device, OFFLOAD_DEVICE, mover, blocks_on_device)
