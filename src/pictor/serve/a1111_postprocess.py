"""A1111's Extras upscale (``scripts/postprocessing_upscale.py`` over ``modules/upscaler.py``) on pictures:
the sizes it makes, its Lanczos and Nearest upscalers, its crop and its blend of a second upscaler, and the
text it reports. No FastAPI here: `a1111_extras` answers the requests, `upscale_runs` finishes an upscale
job sent through them with `finish`, so that the history keeps the picture the answer carries.

A1111's rules, kept exactly:

- The scale: ``upscaling_resize`` (resize_mode 0), or ``max(w / width, h / height)`` for a target w x h
  (resize_mode 1), so that the picture covers the target.
- ``Upscaler.upscale``: the size aimed at is ``int(width * scale)`` (likewise the height), a
  multiple of 8 rounded down. The upscaler runs up to 3 times, until the picture is at least that large (at
  scale 1 once all the same; below it never), stopping when a run changes nothing; then one Lanczos resize
  brings it to exactly that size. Lanczos and Nearest resize to ``int(width * scale)`` a run.
- resize_mode 1 with ``upscaling_crop``: the picture is pasted, centred, on a black canvas of exactly w x h
  (so a picture the rounding left smaller than the target keeps black edges, as in A1111).
- ``upscaler_2`` at ``extras_upscaler_2_visibility`` above 0 upscales the same picture the same way, and
  ``Image.blend(first, second, visibility)`` mixes them; with ``upscaler_1`` "None" nothing is done at all.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

NONE = "None"
PILLOW = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
BUILT_IN = (NONE, *PILLOW)
MAX_RUNS = 3  # Upscaler.upscale's loop


@dataclass(frozen=True)
class Sizing:
    """What A1111 makes of a width x height picture: `scale` as Upscaler.upscale gets it, `dest` the size
    it returns, `crop` the canvas of resize_mode 1 with crop (None otherwise)."""

    scale: float
    dest: tuple[int, int]
    crop: tuple[int, int] | None

    @property
    def size(self) -> tuple[int, int]:
        """The answer's size."""
        return self.crop or self.dest


def sizing(width: int, height: int, resize_mode: int, by: float, to_w: int, to_h: int, crop: bool) -> Sizing:
    scale = max(to_w / width, to_h / height) if resize_mode == 1 else by
    dest = (int((width * scale) // 8 * 8), int((height * scale) // 8 * 8))
    return Sizing(scale, dest, (to_w, to_h) if resize_mode == 1 and crop else None)


def runs(size: tuple[int, int], scale: float, dest: tuple[int, int], grow: Callable[..., Any]) -> int:
    """How many times Upscaler.upscale runs an upscaler whose run turns a (w, h) picture into `grow(w, h)`."""
    w, h = size
    for i in range(MAX_RUNS):
        if w >= dest[0] and h >= dest[1] and (i > 0 or scale != 1):
            return i
        nw, nh = grow(w, h)
        if (nw, nh) == (w, h):
            return i + 1
        w, h = nw, nh
    return MAX_RUNS


def model_runs(size: tuple[int, int], sizes: Sizing, model_scale: int) -> int:
    """Runs of an upscale model (x`model_scale` each) A1111 makes; 0 where it only resizes (scale below 1)."""
    return runs(size, sizes.scale, sizes.dest, lambda w, h: (w * model_scale, h * model_scale))


def pillow_sizes(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The size one Lanczos or Nearest run makes (the largest picture it makes on the way, at most 1 run
    that changes the size, since ``int(w * scale)`` is never below the size aimed at)."""
    return int(size[0] * scale), int(size[1] * scale)


def pillow_upscale(image: Image.Image, name: str, sizes: Sizing) -> Image.Image:
    """A1111's UpscalerLanczos / UpscalerNearest through Upscaler.upscale."""
    scale, dest = sizes.scale, sizes.dest
    for i in range(MAX_RUNS):
        if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
            break
        shape = image.size
        image = image.resize(pillow_sizes(image.size, scale), resample=PILLOW[name])
        if image.size == shape:
            break
    return to_dest(image, sizes)


def to_dest(image: Image.Image, sizes: Sizing) -> Image.Image:
    """Upscaler.upscale's last step: Lanczos to exactly the size aimed at, where the runs missed it."""
    return image if image.size == sizes.dest else image.resize(sizes.dest, resample=Image.Resampling.LANCZOS)


def cropped(image: Image.Image, sizes: Sizing) -> Image.Image:
    """resize_mode 1 with crop: centred on a black RGB canvas of the target's size."""
    if sizes.crop is None:
        return image
    w, h = sizes.crop
    canvas = Image.new("RGB", (w, h))
    canvas.paste(image, box=(w // 2 - image.width // 2, h // 2 - image.height // 2))
    return canvas


def blended(first: Image.Image, second: Image.Image, visibility: float) -> Image.Image:
    if second.mode != first.mode:
        second = second.convert(first.mode)
    return Image.blend(first, second, visibility)


def upscaled(
    source: Image.Image, spec: dict[str, Any], model_image: Image.Image | None = None
) -> Image.Image:
    """The Extras picture of `source` (RGB) by `spec` (`extras_spec`); `model_image` is the upscale model's
    result (its runs, before Lanczos) where one of the upscalers is the model (`spec["model"]`)."""
    names = spec["upscalers"]
    if names[0] == NONE:
        return source.copy()
    sizes = Sizing(spec["scale"], tuple(spec["dest"]), tuple(spec["crop"]) if spec["crop"] else None)

    def made(name: str) -> Image.Image:
        if name == spec.get("model") and model_image is not None:
            return cropped(to_dest(model_image, sizes), sizes)
        if name not in PILLOW:  # the model where A1111 would not run it (a scale below 1): a resize
            return cropped(to_dest(source, sizes), sizes)
        return cropped(pillow_upscale(source, name, sizes), sizes)

    image = made(names[0])
    if names[1] not in (None, NONE) and spec["visibility"] > 0:
        image = blended(image, made(names[1]), spec["visibility"])
    return image


def extras_spec(
    names: tuple[str, str | None],
    visibility: float,
    sizes: Sizing,
    model: str | None,
    mode: int,
    by: float,
    target: tuple[int, int],
) -> dict[str, Any]:
    """The settings a picture's Extras upscale is made with (JSON: an upscale job keeps them)."""
    return {
        "upscalers": list(names),
        "visibility": visibility,
        "resize_mode": mode,
        "upscaling_resize": by,
        "target": list(target),
        "scale": sizes.scale,
        "dest": list(sizes.dest),
        "crop": list(sizes.crop) if sizes.crop else None,
        "model": model,
    }


def model_picture(upscaler: Any, source: Image.Image, runs: int, tile: int, overlap: int) -> Image.Image:
    """The upscale model's `runs` runs on `source`, each at its own factor and back to 8 bits, as A1111's
    Upscaler.upscale runs it on a picture each time (no factor past pictor's x16 to fit: the pixel limit,
    checked when the job is sent, bounds the work)."""
    from pictor.upscaling import upscale_image  # torch: only where a model runs

    image = source
    for _ in range(runs):
        image = upscale_image(upscaler, image, None, tile, overlap)
    return image


def finish(
    source: Image.Image, model_image: Image.Image, spec: dict[str, Any]
) -> tuple[Image.Image, dict[str, Any]]:
    """An upscale job sent by an Extras request: its model result made into the Extras picture, and what
    its record keeps of that (A1111's settings and text)."""
    image = upscaled(source.convert("RGB"), spec, model_image.convert("RGB"))
    return image, {**spec, "width": image.width, "height": image.height, "infotext": infotext(spec)}


def _quote(value: Any) -> Any:
    """A1111's `infotext_utils.quote`."""
    text = str(value)
    return (
        value
        if "," not in text and "\n" not in text and ":" not in text
        else json.dumps(text, ensure_ascii=False)
    )


def infotext(spec: dict[str, Any]) -> str:
    """A1111's postprocessing text (the answer's html_info, a Pillow result's "postprocessing" chunk)."""
    names = spec["upscalers"]
    if names[0] == NONE:
        return ""
    info: dict[str, Any] = {}
    if spec["resize_mode"] == 1:
        info["Postprocess upscale to"] = "{}x{}".format(*spec["target"])
    else:
        info["Postprocess upscale by"] = spec["upscaling_resize"]
    if spec["crop"]:
        info["Postprocess crop to"] = f"{spec['crop'][0]}x{spec['crop'][1]}"
    info["Postprocess upscaler"] = names[0]
    if names[1] not in (None, NONE) and spec["visibility"] > 0:
        info["Postprocess upscaler 2"] = names[1]
    return ", ".join(f"{k}: {_quote(v)}" for k, v in info.items())


def html_info(text: str) -> str:
    """A1111's `ui_common.plaintext_to_html`."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"
