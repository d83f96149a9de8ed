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

from pictor.controlnet_runs import (
    check_controlnet_pixels,
    check_recorded_controlnets,
    recorded_controlnet_settings,
)
from pictor.editing import EDIT_MODES, EditRequest, ImageSource, pixel_sha256
from pictor.generation_request import DENOISE_TILING_FIELDS, TILING_FIELDS
from pictor.guidance_methods import GuidanceMethod
from pictor.inpaint_area import INPAINT_AREAS
from pictor.notices import PictorWarning
from pictor.pipeline import GeneratedImage, GenerationError, GenerationRequest, Pipeline, ProgressFn
from pictor.provenance import ProvenanceError
from pictor.regional_attention import REGIONAL_OPTION_FIELDS


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _hashed(v: Any) -> bool:
    return isinstance(v, dict) and isinstance(v.get("sha256"), str)


def _strings(v: Any, *keys: str) -> bool:
    """An object whose `keys`, where present, are strings (or null)."""
    return isinstance(v, dict) and all(isinstance(v.get(k), (str, type(None))) for k in keys)


def _optional(check: Any) -> Any:
    return lambda v: v is None or check(v)


def _guidance_method(v: Any) -> bool:
    """A record's guidance method (`GuidanceMethod.record`), readable back."""
    try:
        GuidanceMethod.from_record(v)
    except (ValueError, TypeError):
        return False
    return True


# name -> (check, what it must be); the first group every record has, the second only edits'
_COMMON: dict[str, tuple[Any, str]] = {
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "steps": (_int, "an integer"),
    "guidance": (_optional(_number), "a number"),
    "sampler": (lambda v: isinstance(v, str), "a sampler name"),
    "seed": (_int, "an integer"),
    "model": (lambda v: _strings(v, "name", "hash", "ref"), "an object with the model's name and hash"),
}
_OPTIONAL: dict[str, tuple[Any, str]] = {
    "negative_prompt": (lambda v: isinstance(v, str), "a string"),
    "schedule": (_optional(lambda v: isinstance(v, str)), "a schedule name"),
    "width": (_int, "an integer"),
    "height": (_int, "an integer"),
    "batch_seeds": (lambda v: isinstance(v, list) and v and all(_int(s) for s in v), "a list of seeds"),
    "batch_index": (_int, "an integer"),
    "variation_seed": (_int, "an integer"),
    "variation_strength": (_number, "a number"),
    "seed_resize_from": (
        lambda v: isinstance(v, list) and len(v) == 2 and all(_int(x) for x in v),
        "a size [width, height]",
    ),
    "loras": (
        lambda v: (
            isinstance(v, list)
            and all(_hashed(lo) and _number(lo.get("scale")) and isinstance(lo.get("path"), str) for lo in v)
        ),
        "a list of LoRA entries with path, sha256 and scale",
    ),
    "layout": (_optional(lambda v: isinstance(v, list)), "a list of boxes"),
    "regions": (_optional(lambda v: isinstance(v, list)), "a list of regions"),
    "layout_adapter": (_optional(lambda v: _strings(v, "sha256")), "an object with the adapter's sha256"),
    "reference_image": (_optional(_hashed), "an object with the picture's sha256"),
    "reference_adapter": (_optional(lambda v: _strings(v, "sha256")), "an object with the adapter's sha256"),
    "context_image": (_optional(_hashed), "an object with the context image's sha256"),
    "control_image": (_optional(_hashed), "an object with the control picture's sha256"),
    "redux_image": (_optional(_hashed), "an object with the Redux picture's sha256"),
    "redux": (
        _optional(lambda v: _strings(v, "sha256", "path", "siglip") and _number(v.get("strength"))),
        "an object with the Redux file's sha256 and the strength",
    ),
    "ip_adapter_image": (_optional(_hashed), "an object with the IP-Adapter picture's sha256"),
    "ip_adapter": (
        _optional(lambda v: _strings(v, "sha256", "path", "clip") and _number(v.get("scale"))),
        "an object with the IP-Adapter file's sha256 and the scale",
    ),
    "controlnets": (
        lambda v: (
            isinstance(v, list)
            and all(
                _hashed(e) and _number(e.get("scale")) and _hashed(e.get("image")) and _strings(e, "path")
                for e in v
            )
        ),
        "a list of ControlNet entries with sha256, path, scale and picture",
    ),
    "controlnet_start": (_number, "a number"),
    "controlnet_end": (_number, "a number"),
    "control_canny": (
        _optional(lambda v: isinstance(v, list) and len(v) == 2 and all(map(_number, v))),
        "two numbers",
    ),
    "guidance_mode": (lambda v: isinstance(v, str), "a guidance mode"),
    "guidance_method": (_guidance_method, "an object with a guidance method and its parameters"),
    "mode": (lambda v: v in EDIT_MODES, f"one of {', '.join(EDIT_MODES)}"),
    "strength": (_number, "a number"),
    "source_image": (_hashed, "an object with the source's sha256"),
    "mask": (_optional(_hashed), "an object with the mask's sha256"),
    "expand": (_optional(lambda v: isinstance(v, list) and len(v) == 4 and all(map(_int, v))), "4 integers"),
    "feather": (_int, "an integer"),
    "vae_tile": (_optional(_int), "an integer"),
    "vae_tile_overlap": (_optional(_int), "an integer"),
    "denoise_tile": (_optional(_int), "an integer"),
    "denoise_tile_overlap": (_optional(_int), "an integer"),
    "cache_threshold": (_optional(_number), "a number"),
    "prompt_weights": (lambda v: isinstance(v, bool), "true or false"),
    "prompt_editing": (lambda v: isinstance(v, bool), "true or false"),
    "composable": (lambda v: isinstance(v, bool), "true or false"),
    "regional_attention": (lambda v: isinstance(v, bool), "true or false"),
    "regional_steps": (_number, "a number"),
    "regional_double_interval": (_int, "an integer"),
    "regional_single_interval": (_int, "an integer"),
    "regional_base_ratio": (_number, "a number"),
    "inpaint_area": (lambda v: v in INPAINT_AREAS, f"one of {', '.join(INPAINT_AREAS)}"),
    "mask_padding": (_int, "an integer"),
    "hires": (
        lambda v: (
            isinstance(v, dict)
            and _number(v.get("scale"))
            and _number(v.get("strength"))
            and _int(v.get("steps"))
        ),
        "an object with the hires fix's scale, strength and steps",
    ),
    "source_upscale": (
        lambda v: (
            isinstance(v, dict)
            and _number(v.get("scale"))
            and 1.0 < v["scale"] <= 4.0
            and isinstance(v.get("upscaler"), str)
            and _int(v.get("width"))
            and _int(v.get("height"))
        ),
        "an object with the upscaling edit's scale (above 1, at most 4), upscaler, width and height",
    ),
}


def check_record(record: Any) -> None:
    """A record read back from an image, checked before anything runs: each field a reproduction uses has
    the type it was written with (a damaged or hand-edited record is an error that names the field)."""
    if not isinstance(record, dict):
        raise ProvenanceError("the pictor record is not a JSON object; the image's metadata is damaged")
    needed = dict(_COMMON)
    if "mode" in record:
        needed.update({k: _OPTIONAL[k] for k in ("strength", "source_image")})
    else:
        needed.update({k: _OPTIONAL[k] for k in ("width", "height")})
    for name in needed:
        if name not in record:
            raise ProvenanceError(f"the pictor record has no '{name}'; the image's metadata is incomplete")
    for name, (check, what) in {**_OPTIONAL, **needed}.items():
        if name in record and not check(record[name]):
            raise ProvenanceError(
                f"the pictor record's '{name}' is {record[name]!r}, not {what}; the image's metadata was "
                "edited or is damaged"
            )
    if record.get("control_canny") and not record.get("control_image"):
        raise ProvenanceError(
            "the pictor record has Canny thresholds but no control picture; the image's metadata was edited "
            "or is damaged"
        )
    if record.get("variation_strength") and "variation_seed" not in record:
        raise ProvenanceError(
            "the pictor record has a variation strength but no variation seed; the image's metadata was "
            "edited or is damaged"
        )
    recorded_upscaler(record)
    seeds = record.get("batch_seeds", [record["seed"]])
    if not 0 <= record.get("batch_index", 0) < len(seeds):
        raise ProvenanceError(
            f"the pictor record's batch_index {record['batch_index']} is not a place in its batch_seeds "
            f"({len(seeds)} seeds); the image's metadata was edited or is damaged"
        )
    if seeds[record.get("batch_index", 0)] != record["seed"]:  # the run follows batch_seeds: they must agree
        raise ProvenanceError(
            f"the pictor record's seed {record['seed']} is not its batch_seeds' entry for this image "
            f"({seeds[record.get('batch_index', 0)]}); the image's metadata was edited or is damaged"
        )


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


# Where a record keeps an enlargement by an upscale model, what it enlarged, and the flag that gives the file.
_ENLARGED = {
    "hires": ("hires fix enlarged its first pass", "--hires-upscaler"),
    "source_upscale": ("upscaling edit enlarged its source", "--source-upscaler"),
}


def recorded_upscaler(record: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The name and file entry (path, sha256) of the upscale model a hires image's first pass, or an
    upscaling edit's source, was enlarged with; (None, None) for Lanczos or neither."""
    for key in _ENLARGED:
        enlarged = record.get(key)
        if not isinstance(enlarged, dict) or enlarged.get("upscaler", "lanczos") == "lanczos":
            continue
        entry = enlarged.get("upscaler_file")
        named = isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("file", "sha256"))
        if not (named and isinstance(enlarged.get("upscaler"), str)):
            raise ProvenanceError(
                f"the pictor record's '{key}' names an upscale model but not its file and sha256; the "
                "image's metadata was edited or is damaged"
            )
        return enlarged["upscaler"], entry
    return None, None


def upscaler_flag(record: dict[str, Any]) -> str:
    """The `pictor reproduce` option that gives the upscale model a record names."""
    return next((flag for key, (_, flag) in _ENLARGED.items() if key in record), "--upscaler")


def check_upscaler(pipe: Pipeline, record: dict[str, Any]) -> None:
    """The upscale model an image was made with (hires fix, upscaling edit) must be the one loaded: its
    hash, not only its name."""
    name, entry = recorded_upscaler(record)
    if entry is None:
        return
    if pipe.upscaler is None or pipe.upscaler.sha256 != entry["sha256"]:
        got = f"{pipe.upscaler.path} (SHA-256 {pipe.upscaler.sha256[:10]})" if pipe.upscaler else "none"
        what, flag = next(_ENLARGED[key] for key in _ENLARGED if key in record)
        raise GenerationError(
            f"the image's {what} with upscale model '{name}' (SHA-256 {entry['sha256'][:10]}), but the "
            f"loaded one is {got}; pass that file with {flag}"
        )


def check_reference(pipe: Pipeline, record: dict[str, Any], reference: ImageSource | None) -> None:
    """The reference adapter and picture the image was made with, before anything runs."""
    if not record.get("reference_image"):
        if reference is not None:
            raise GenerationError("this image was made without a reference image; drop --reference")
        return
    if reference is None:
        raise GenerationError("this image was made from a reference image; pass it with --reference IMAGE")
    want = (record.get("reference_adapter") or {}).get("sha256")
    have = (pipe.reference_info or {}).get("sha256")
    if have is None:
        raise GenerationError(
            "the image was made with a reference; load its reference adapter with --reference-adapter FILE"
        )
    if want and want != have:
        raise GenerationError(
            f"the image was made with reference adapter {want[:10]}, but the loaded one is {have[:10]}; "
            "pass the same file with --reference-adapter"
        )


def check_picture_pixels(record: dict[str, Any], r: GenerationRequest) -> None:
    """The reference and context pictures, as fitted for this run, are the ones the record names."""
    for key, pixels, what in (
        ("reference_image", r.reference, "reference image"),
        ("context_image", r.context_image, "context image"),
        ("control_image", r.control_image, "control picture"),
        ("redux_image", r.redux_image, "Redux picture"),
        ("ip_adapter_image", r.ip_adapter_image, "IP-Adapter picture"),
    ):
        if not record.get(key):
            continue
        want = record[key]["sha256"]
        got = pixel_sha256(pixels) if isinstance(pixels, np.ndarray) else ""
        if want != got:
            raise GenerationError(
                f"the {what} is not the one this image was made from (its fitted pixels hash to "
                f"{got[:10]}, the record says {want[:10]}); pass the original {what}"
            )


def check_context(record: dict[str, Any], context: ImageSource | None) -> None:
    """A FLUX.1 Kontext image's context picture is given exactly when the record has one."""
    if record.get("context_image") and context is None:
        raise GenerationError(
            "this image was made from a context image (FLUX.1 Kontext); pass it with --context IMAGE"
        )
    if context is not None and not record.get("context_image"):
        raise GenerationError("this image was made without a context image; drop --context")


def check_control(record: dict[str, Any], control: ImageSource | None) -> None:
    """A FLUX.1 Canny / Depth image's control picture is given exactly when the record has one."""
    if record.get("control_image") and control is None:
        raise GenerationError(
            "this image was made from a control picture (FLUX.1 Canny / Depth); pass it with --control IMAGE"
        )
    if control is not None and not record.get("control_image"):
        raise GenerationError("this image was made without a control picture; drop --control")


def check_redux(pipe: Pipeline, record: dict[str, Any], redux: ImageSource | None) -> None:
    """A FLUX.1 Redux image's picture is given exactly when the record has one, and the Redux file loaded
    is the one it was made with."""
    if not record.get("redux_image"):
        if redux is not None:
            raise GenerationError("this image was made without a Redux picture; drop --redux")
        return
    if redux is None:
        raise GenerationError("this image was made from a Redux picture; pass it with --redux IMAGE")
    want = (record.get("redux") or {}).get("sha256")
    have = pipe.redux.info["sha256"] if pipe.redux is not None else None
    if have is None:
        raise GenerationError(
            "the image was made with FLUX.1 Redux; load it with --redux-model FILE --siglip FOLDER"
        )
    if want and want != have:
        raise GenerationError(
            f"the image was made with Redux file {want[:10]}, but the loaded one is {have[:10]}; pass the "
            "same file with --redux-model"
        )
    want = (record.get("redux") or {}).get("siglip_sha256")
    assert pipe.redux is not None
    have = pipe.redux.info.get("siglip_sha256")
    if want and want != have:
        raise GenerationError(
            f"the image was made with SigLIP weights {want[:10]}, but the loaded ones (--siglip "
            f"{pipe.redux.info['siglip']}) are {str(have)[:10]}; pass the SigLIP folder it was made with"
        )


def check_ip_adapter(pipe: Pipeline, record: dict[str, Any], picture: ImageSource | None) -> None:
    """An IP-Adapter image's picture is given exactly when the record has one, and the IP-Adapter file and
    CLIP weights loaded are the ones it was made with."""
    if not record.get("ip_adapter_image"):
        if picture is not None:
            raise GenerationError("this image was made without an IP-Adapter picture; drop --ip-adapter")
        return
    if picture is None:
        raise GenerationError(
            "this image was made from an IP-Adapter picture; pass it with --ip-adapter IMAGE"
        )
    if pipe.ip_adapter is None:
        raise GenerationError(
            "the image was made with an IP-Adapter; load it with --ip-adapter-model FILE --clip-vision FOLDER"
        )
    entry, info = record.get("ip_adapter") or {}, pipe.ip_adapter.info
    for key, what, flag in (
        ("sha256", "IP-Adapter file", "--ip-adapter-model FILE"),
        ("clip_sha256", "CLIP vision weights", "--clip-vision FOLDER"),
        ("clip_processor_sha256", "CLIP image processor settings", "--clip-vision FOLDER"),
    ):
        want, have = entry.get(key), info.get(key)
        if want and want != have:
            raise GenerationError(
                f"the image was made with {what} {str(want)[:10]}, but the loaded ones are "
                f"{str(have)[:10]}; pass the ones it was made with ({flag})"
            )


def check_layout_adapter(pipe: Pipeline, record: dict[str, Any]) -> None:
    if not record.get("layout"):
        return
    want = (record.get("layout_adapter") or {}).get("sha256")
    have = (pipe.layout_info or {}).get("sha256")
    if have is None:
        raise GenerationError(
            "the image was made with a layout; load its layout adapter with --layout-adapter FILE"
        )
    if want and want != have:
        raise GenerationError(
            f"the image was made with layout adapter {want[:10]}, but the loaded one is {have[:10]}; "
            "pass the same file with --layout-adapter"
        )


def check_loras(pipe: Pipeline, record: dict[str, Any]) -> None:
    want = [(lo["sha256"], float(lo["scale"])) for lo in record.get("loras") or []]
    have = [(lo["sha256"], lo["scale"]) for lo in pipe.loras]
    if want != have:

        def names(loras: list[dict[str, Any]]) -> str:
            return ", ".join(f"{lo['name']}:{lo['scale']:g}" for lo in loras) or "none"

        raise GenerationError(
            f"the image was made with LoRAs [{names(record.get('loras') or [])}] but the loaded model "
            f"has [{names(pipe.loras)}]; pass the same files and scales with --lora FILE:SCALE"
        )


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
