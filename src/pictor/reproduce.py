"""Reproduce an image from its own provenance record: the same model (checked by hash), the same LoRAs,
the same sampler run (all the seeds that shared it), hence the same pixels on the same device and dtype.
An edit's record holds only hashes of its source image and mask; the files are checked against them.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
from PIL import Image

from pictor.controlnet_requests import (
    check_controlnet_pixels,
    check_recorded_controlnets,
    recorded_controlnet_settings,
)
from pictor.editing import EditRequest, ImageSource
from pictor.generation_request import DENOISE_TILING_FIELDS, TILING_FIELDS
from pictor.guidance_methods import GuidanceMethod
from pictor.notices import PictorWarning
from pictor.pipeline import GeneratedImage, GenerationError, GenerationRequest, Pipeline, ProgressFn
from pictor.provenance import ProvenanceError
from pictor.record_checks import check_record, recorded_upscaler, upscaler_flag
from pictor.regional_attention import REGIONAL_OPTION_FIELDS
from pictor.reproduce_inputs import (
    check_context,
    check_control,
    check_ip_adapter,
    check_layout_adapter,
    check_loras,
    check_picture_pixels,
    check_redux,
    check_reference,
    check_upscaler,
)

__all__ = ["check_record", "pixel_report", "recorded_upscaler", "reproduce", "upscaler_flag"]


def _settings(
    record: dict[str, Any],
    seeds: list[int],
    reference: ImageSource | None,
    context: ImageSource | None,
    control: ImageSource | None,
    redux: ImageSource | None = None,
    controlnet_images: list[ImageSource] | None = None,
    ip_adapter: ImageSource | None = None,
) -> dict[str, Any]:
    """The sampler settings a generation record and an edit record share: one run over all its seeds."""
    return {
        "negative_prompt": record.get("negative_prompt", ""),
        "steps": record["steps"],
        "guidance": record["guidance"],
        "guidance_method": (
            GuidanceMethod.from_record(record["guidance_method"]) if record.get("guidance_method") else None
        ),
        "sampler": record["sampler"],
        "schedule": record.get("schedule"),
        "seed": seeds[0],
        "num_images": len(seeds),
        "layout": record.get("layout"),
        "regions": record.get("regions"),
        "regional_attention": record.get("regional_attention", False),
        **{name: record.get(name) for name in REGIONAL_OPTION_FIELDS},
        "reference": reference,
        "context_image": context,
        "control_image": control,
        "control_canny": tuple(record["control_canny"]) if record.get("control_canny") else None,
        "redux_image": redux,
        "redux_strength": record["redux"]["strength"] if record.get("redux") else None,
        "ip_adapter_image": ip_adapter,
        "ip_adapter_scale": record["ip_adapter"]["scale"] if record.get("ip_adapter") else None,
        **{name: record.get(name) for name in TILING_FIELDS},
        **{name: record.get(name) for name in DENOISE_TILING_FIELDS},
        "cache_threshold": record.get("cache_threshold"),
        "prompt_weights": record.get("prompt_weights", False),
        "prompt_editing": record.get("prompt_editing", False),
        "composable": record.get("composable", False),
        **recorded_controlnet_settings(record, controlnet_images),
        **_variation(record),
    }


def _variation(record: dict[str, Any]) -> dict[str, Any]:
    """A record's variation seeds as request fields: the run's first image's variation seed (image j of a
    run takes the first's + j), the strength and the seed resize."""
    fields: dict[str, Any] = {}
    if record.get("variation_strength"):
        first = int(record["variation_seed"]) - int(record.get("batch_index", 0))
        fields |= {"variation_seed": first, "variation_strength": record["variation_strength"]}
    if record.get("seed_resize_from"):
        fields["seed_resize_from"] = tuple(record["seed_resize_from"])
    return fields


def _hires(record: dict[str, Any], pipe: Pipeline) -> dict[str, Any]:
    """A hires-fix record's second pass as request fields (none for other records). An upscale model goes by
    the loaded one's name: `check_upscaler` found its hash to be the recorded one's, under any name."""
    hires = record.get("hires")
    if not hires:
        return {}
    return {
        "hires_scale": hires["scale"],
        "hires_strength": hires["strength"],
        "hires_steps": hires["steps"],
        "hires_upscaler": pipe.upscaler.name if recorded_upscaler(record)[0] and pipe.upscaler else None,
    }


def reproduce(
    pipe: Pipeline,
    record: dict[str, Any],
    progress: ProgressFn | None = None,
    source: ImageSource | None = None,
    mask: ImageSource | None = None,
    reference: ImageSource | None = None,
    context: ImageSource | None = None,
    control: ImageSource | None = None,
    redux: ImageSource | None = None,
    controlnet_images: list[ImageSource] | None = None,
    ip_adapter: ImageSource | None = None,
) -> GeneratedImage:
    """Regenerate one image from its record: the same sampler run, the same pixels.

    An edit's record holds only hashes of its source image and mask, and a record with a reference or a
    (FLUX.1 Kontext) context image or a (Canny / Depth) control picture only the hash of that picture; pass
    those files as `source`, `mask`, `reference`, `context` and `control`, and they are checked against the
    hashes before the sampler runs (a control picture's Canny edges are drawn again, as the record says);
    likewise a FLUX.1 Redux picture as `redux`, an IP-Adapter picture as `ip_adapter` and ControlNet
    pictures, in order, as `controlnet_images` (the pipeline must have the record's ControlNets loaded, in
    order).
    """
    check_record(record)
    if "mode" not in record and (source is not None or mask is not None):
        raise GenerationError("this image is not an edit of another image; drop --source and --mask")
    want = record.get("model", {}).get("hash", "")
    if want and pipe.hash and want != pipe.hash:
        raise GenerationError(
            f"the image was made by model '{record['model'].get('name')}' (hash {want[:10]}), but the "
            f"loaded model '{pipe.name}' has hash {pipe.hash[:10]}; pass that model with --model"
        )
    if record.get("device") not in (None, pipe.device.type) or record.get("dtype") not in (
        None,
        str(pipe.dtype).removeprefix("torch."),
    ):
        warnings.warn(
            f"the image was made on {record.get('device')}/{record.get('dtype')}, this run is on "
            f"{pipe.device.type}/{pipe.dtype}: pixels may differ slightly",
            PictorWarning,
            stacklevel=2,
        )
    mode = record.get("guidance_mode", "cfg")
    if mode != pipe.guidance_mode:  # the model hash covers the weights, not this setting of its config
        raise GenerationError(
            f"the image was made with {mode} guidance, but the loaded model '{pipe.name}' uses "
            f"{pipe.guidance_mode} guidance; pass the model it was made with"
        )
    check_loras(pipe, record)
    check_layout_adapter(pipe, record)
    check_reference(pipe, record, reference)
    check_context(record, context)
    check_control(record, control)
    check_redux(pipe, record, redux)
    check_ip_adapter(pipe, record, ip_adapter)
    check_upscaler(pipe, record)
    check_recorded_controlnets(pipe.controlnets, record, controlnet_images)
    seeds = [int(s) for s in record.get("batch_seeds", [record["seed"]])]
    if "mode" in record:
        pictures = _settings(record, seeds, reference, context, control, redux, controlnet_images, ip_adapter)
        return _reproduce_edit(pipe, record, progress, source, mask, pictures)
    request = GenerationRequest(
        prompt=record["prompt"],
        width=record["width"],
        height=record["height"],
        **_settings(record, seeds, reference, context, control, redux, controlnet_images, ip_adapter),
        **_hires(record, pipe),
    )
    r = pipe.resolve_request(request, reproducing=True)
    check_picture_pixels(record, r)
    check_controlnet_pixels(record, r)
    run = pipe.run_hires_seeds if r.hires_scale else pipe.run_seeds
    images = run(r, seeds, progress or (lambda i, n: None))
    return images[int(record.get("batch_index", 0))]


def _reproduce_edit(
    pipe: Pipeline,
    record: dict[str, Any],
    progress: ProgressFn | None,
    source: ImageSource | None,
    mask: ImageSource | None,
    settings: dict[str, Any],
) -> GeneratedImage:
    """An edit's rerun; `settings`: `_settings`' request fields (the seeds and the pictures given)."""
    mode = record["mode"]
    if source is None:
        raise GenerationError(
            f"this image is an edit ({mode}) of another image; pass that source image "
            "(--source SRC" + (" --mask MASK" if record.get("mask") else "") + ")"
        )
    if record.get("mask") and mask is None:
        raise GenerationError(f"this {mode} used a mask; pass it too (--mask MASK)")
    if mask is not None and not record.get("mask"):
        raise GenerationError(f"this {mode} used no mask; drop --mask")
    expand = record.get("expand")
    enlarged = record.get("source_upscale") or {}
    request = EditRequest(
        image=source,
        prompt=record["prompt"],
        mask=mask,
        strength=record["strength"],
        expand=tuple(expand) if expand else None,  # type: ignore[arg-type]
        fill=record.get("fill", "edge"),
        feather=int(record.get("feather", 0)),
        upscale=enlarged.get("scale"),
        inpaint_area=record.get("inpaint_area", "whole"),
        mask_padding=record.get("mask_padding"),
        # the size the masked area was drawn at: the record's, whatever the model's defaults are now
        inpaint_size=(record["width"], record["height"]) if record.get("inpaint_area") == "masked" else None,
        # the loaded model's name: check_upscaler found its hash to be the recorded one's, under any name
        upscaler=pipe.upscaler.name if recorded_upscaler(record)[0] and pipe.upscaler else None,
        **settings,
    )
    r, inputs = pipe.resolve_edit(request, reproducing=True)
    check_picture_pixels(record, r)
    check_controlnet_pixels(record, r)
    want, got = record["source_image"]["sha256"], inputs.source["sha256"]
    if want != got:
        raise GenerationError(
            f"the source image is not the one this edit was made from (its pixels hash to {got[:10]}, "
            f"the record says {want[:10]}); pass the original source image"
        )
    crop = record.get("crop")
    if inputs.area is not None and crop is not None and list(inputs.area.box) != crop:
        raise ProvenanceError(
            f"the pictor record's crop {crop} is not the box {list(inputs.area.box)} its mask and settings "
            "make (another pictor version's arithmetic, or edited metadata); it cannot be made again exactly"
        )
    if inputs.size != (record.get("width"), record.get("height")):  # what the source and settings make
        raise ProvenanceError(
            f"the pictor record's size {record.get('width')}x{record.get('height')} is not the "
            f"{inputs.size[0]}x{inputs.size[1]} its source and settings make; the image's metadata was "
            "edited or is damaged"
        )
    if record.get("mask") and inputs.mask_info and record["mask"]["sha256"] != inputs.mask_info["sha256"]:
        raise GenerationError(
            "the mask is not the one this edit was made with (hash mismatch); pass the original mask"
        )
    seeds = [int(s) for s in record.get("batch_seeds", [record["seed"]])]
    images = pipe.run_edit_seeds(r, inputs, seeds, progress or (lambda i, n: None))
    return images[int(record.get("batch_index", 0))]


def pixel_report(original: str | os.PathLike[str], image: Image.Image) -> str:
    """Whether a reproduction's pixels are the original's, in words."""
    with Image.open(original) as im:
        want = np.asarray(im.convert("RGB"), dtype=np.int16)
    got = np.asarray(image.convert("RGB"), dtype=np.int16)
    if want.shape != got.shape:
        size, was = f"{got.shape[1]}x{got.shape[0]}", f"{want.shape[1]}x{want.shape[0]}"
        return f"the pixels differ from {original}'s: the image is {size}, the original {was}"
    diff = np.abs(want - got)
    if not diff.any():
        return f"the pixels are identical to {original}'s"
    return (
        f"the pixels differ from {original}'s: max {int(diff.max())}, mean {float(diff.mean()):.3f} "
        f"(of 255), in {float((diff.max(axis=-1) > 0).mean()):.1%} of the pixels; another device, dtype or "
        "pictor version changes results slightly, a changed record more"
    )
