"""The provenance record of each image a Pipeline makes (`pictor.provenance` writes it into the files): the
model, every setting, the sampler run's seeds, and an entry for each adapter, LoRA and picture that
conditioned it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pictor import __version__
from pictor.context_images import context_fields
from pictor.control_images import control_fields
from pictor.controlnet_requests import controlnet_fields
from pictor.editing import image_info
from pictor.generation_request import DENOISE_TILING_FIELDS, TILING_FIELDS, GenerationRequest
from pictor.ip_adapter_files import ip_adapter_fields
from pictor.noise_variation import variation_fields
from pictor.redux_images import redux_fields
from pictor.regional_attention import regional_record_fields

if TYPE_CHECKING:
    from pictor.pipeline import Pipeline

__all__ = ["record"]


def record(
    pipe: Pipeline, r: GenerationRequest, seed: int, run_seeds: list[int], index: int
) -> dict[str, Any]:
    return {
        "pictor_version": __version__,
        "model": {
            "name": pipe.config.name,
            "hash": pipe.hash,
            "preset": pipe.config.preset,
            "ref": pipe.ref,
            "trained": pipe.config.trained,
        },
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "width": r.width,
        "height": r.height,
        "steps": r.steps,
        "guidance": r.guidance,
        "guidance_mode": pipe.guidance_mode,
        **({"guidance_method": r.guidance_method.record()} if r.guidance_method is not None else {}),
        "sampler": r.sampler,
        "schedule": r.schedule,
        "seed": seed,
        "batch_seeds": run_seeds,
        "batch_index": index,
        "batch_size": len(run_seeds),
        "device": pipe.device.type,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        **({"weight_dtype": pipe.weight_dtype} if pipe.weight_dtype else {}),
        "loras": [dict(lo) for lo in pipe.loras],
        **({"layout": r.layout, "layout_adapter": dict(pipe.layout_info or {})} if r.layout else {}),
        **(_reference_fields(pipe, r) if r.reference is not None else {}),
        **(context_fields(r.context_image) if r.context_image is not None else {}),
        **(control_fields(r.control_image, r.control_canny) if r.control_image is not None else {}),
        **(_redux_fields(pipe, r) if r.redux_image is not None else {}),
        **(_ip_adapter_fields(pipe, r) if r.ip_adapter_image is not None else {}),
        **(controlnet_fields(r, pipe.controlnets) if pipe.controlnets else {}),
        **({name: getattr(r, name) for name in TILING_FIELDS} if r.vae_tile else {}),
        **({name: getattr(r, name) for name in DENOISE_TILING_FIELDS} if r.denoise_tile else {}),
        **({"cache_threshold": r.cache_threshold} if r.cache_threshold else {}),
        **({"prompt_weights": True} if r.prompt_weights else {}),
        **({"prompt_editing": True} if r.prompt_editing else {}),
        **({"regions": r.regions} if r.regions else {}),
        **({"regional_attention": True} if r.regions and r.regional_attention else {}),
        **regional_record_fields(r),
        **({"composable": True} if r.composable else {}),
        **variation_fields(r, index),
    }


def _redux_fields(pipe: Pipeline, r: GenerationRequest) -> dict[str, Any]:
    assert isinstance(r.redux_image, np.ndarray) and pipe.redux is not None
    return redux_fields(r.redux_image, float(r.redux_strength or 0.0), pipe.redux.info)


def _ip_adapter_fields(pipe: Pipeline, r: GenerationRequest) -> dict[str, Any]:
    assert isinstance(r.ip_adapter_image, np.ndarray) and pipe.ip_adapter is not None
    return ip_adapter_fields(r.ip_adapter_image, float(r.ip_adapter_scale or 0.0), pipe.ip_adapter.info)


def _reference_fields(pipe: Pipeline, r: GenerationRequest) -> dict[str, Any]:
    """A record holds the hash of the reference's fitted pixels, not the picture, and the adapter."""
    assert isinstance(r.reference, np.ndarray)
    return {
        "reference_image": image_info(r.reference),  # the fitted pixels' hash and size
        "reference_adapter": dict(pipe.reference_info or {}),
    }
