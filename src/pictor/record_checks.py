"""What a provenance record must hold before pictor trusts it: each field a reproduction or an upscale
reads, with the type it was written with, so that a damaged or hand-edited record is an error naming the
field rather than a crash deep in a run. Kept apart from `pictor.reproduce`, which also needs the models
and pictures: the server and `pictor upscale` check records without running anything.
"""

from __future__ import annotations

from typing import Any

from pictor.editing import EDIT_MODES
from pictor.guidance_methods import GuidanceMethod
from pictor.inpaint_area import INPAINT_AREAS
from pictor.provenance import ProvenanceError


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


# Where a record keeps an enlargement by an upscale model, what it enlarged, and the flag that gives the file.
ENLARGED = {
    "hires": ("hires fix enlarged its first pass", "--hires-upscaler"),
    "source_upscale": ("upscaling edit enlarged its source", "--source-upscaler"),
}


def recorded_upscaler(record: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The name and file entry (path, sha256) of the upscale model a hires image's first pass, or an
    upscaling edit's source, was enlarged with; (None, None) for Lanczos or neither."""
    for key in ENLARGED:
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
    return next((flag for key, (_, flag) in ENLARGED.items() if key in record), "--upscaler")
