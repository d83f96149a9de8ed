"""The add-on models a Pipeline loads on request beside its own three (transformer, autoencoder, text
encoder): the layout and reference adapters, FLUX.1 Redux, the IP-Adapter, an upscale model, ControlNets
and LoRAs. (Not A1111's "Extras", the upscaling of finished pictures: that is `pictor.serve.a1111_extras`.)

Each is placed where the pipeline keeps its models (`Pipeline._home`: CPU memory under offload) and then
offload's groups are synced over it (`Pipeline._sync_offload`); each returns the entry records name it by.
These functions are `Pipeline`'s loader methods, apart only to keep pipeline.py short (two are bound onto
it as they are), so they use its private members as its methods do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pictor.controlnet_runs import ControlNetUnit, open_controlnet
from pictor.generation_request import GenerationError
from pictor.ip_adapter_files import open_ip_adapter
from pictor.layout_files import LayoutError, open_layout_adapter
from pictor.models.weight_storage import place
from pictor.redux_images import open_redux
from pictor.reference_files import ReferenceImageError, open_reference_adapter
from pictor.upscaler_files import load_upscaler

if TYPE_CHECKING:
    from pictor.pipeline import Pipeline

__all__ = [
    "add_controlnet",
    "add_lora",
    "set_ip_adapter",
    "set_layout_adapter",
    "set_redux",
    "set_reference_adapter",
    "set_upscaler",
]


def set_layout_adapter(pipe: Pipeline, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a layout adapter file (made by `pictor train layout`) for requests with a layout."""
    try:
        adapter, info = open_layout_adapter(path, pipe.transformer.params, pipe.text_encoder, pipe.hash)
    except LayoutError as exc:
        raise GenerationError(str(exc)) from exc
    pipe.layout_adapter, pipe.layout_info = adapter.to(pipe._home), info
    pipe._sync_offload()
    return info


def set_reference_adapter(pipe: Pipeline, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a reference adapter file (made by `pictor train reference`) for requests with a reference."""
    try:
        adapter, info = open_reference_adapter(
            path, pipe.transformer.params, pipe.text_encoder.max_length, pipe.hash
        )
    except ReferenceImageError as exc:
        raise GenerationError(str(exc)) from exc
    pipe.reference_adapter, pipe.reference_info = adapter.to(pipe._home), info
    pipe._sync_offload()
    return info


def set_redux(pipe: Pipeline, path: str | os.PathLike[str], siglip: str | os.PathLike[str]) -> dict[str, Any]:
    """Load FLUX.1 Redux (flux1-redux-dev.safetensors and a local SigLIP folder) for requests with a
    Redux picture; returns the entry records name."""
    redux = open_redux(path, siglip, pipe.transformer.params.context_in_dim)
    pipe.redux = redux.to(pipe._home, pipe.dtype)
    pipe._sync_offload()
    return redux.info


def set_ip_adapter(
    pipe: Pipeline, path: str | os.PathLike[str], clip: str | os.PathLike[str]
) -> dict[str, Any]:
    """Load XLabs' FLUX.1 IP-Adapter (ip_adapter.safetensors) and a local CLIP vision folder for requests
    with an IP-Adapter picture; returns the entry records name them by."""
    model = open_ip_adapter(path, clip, pipe.transformer.params)
    pipe.ip_adapter = model.to(pipe._home, pipe.dtype)
    pipe._sync_offload()
    return model.info


def set_upscaler(pipe: Pipeline, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an upscale model (ESRGAN, Real-ESRGAN, ...) that the hires fix can enlarge the first pass
    with (`GenerationRequest.hires_upscaler` = its name) and an upscaling edit its source
    (`EditRequest.upscaler`); returns what records say of it."""
    if Path(path).stem.lower() == "lanczos":  # requests name a model by its stem, and "lanczos" means none
        raise GenerationError(
            f"{path}: an upscale model named 'lanczos' would be taken for Lanczos; rename it"
        )
    pipe.upscaler = upscaler = load_upscaler(path, pipe._home)  # the setter syncs offload's groups
    return upscaler.describe()


def add_controlnet(pipe: Pipeline, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a FLUX.1 ControlNet (InstantX, Union or XLabs; a diffusers folder or a single file) beside
    the transformer; returns the entry records name it by."""
    same = next((u for u in pipe.controlnets if u.info["path"] == str(Path(path).resolve())), None)
    if same is not None:  # one Union ControlNet for two pictures: its weights once, as diffusers does
        unit = ControlNetUnit(same.model, dict(same.info))
    else:
        unit = open_controlnet(path, pipe.transformer.params, pipe._home, pipe.dtype)
    pipe.controlnets.append(unit)
    pipe._sync_offload()
    return unit.info


def add_lora(pipe: Pipeline, path: str | os.PathLike[str], scale: float = 1.0) -> dict[str, Any]:
    """Apply a LoRA file (pictor, diffusers/PEFT or kohya format) to the transformer."""
    from pictor.lora_files import a1111_lora_hash, apply_lora, lora_file_hash

    pipe.release_offload()  # the LoRA's layers are made beside the transformer's, in CPU memory
    name = apply_lora(pipe.transformer, path, scale=scale)
    place(pipe.transformer, pipe._home, pipe.dtype).requires_grad_(False)
    pipe._sync_offload()  # the LoRA's new layers need offload's hooks too
    entry = {
        "name": name,
        "path": str(Path(path).resolve()),
        "sha256": lora_file_hash(path),
        "hash": a1111_lora_hash(path),
        "scale": float(scale),
    }
    pipe.loras.append(entry)
    return entry
