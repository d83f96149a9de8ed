"""A1111's txt2img and img2img bodies as pictor's requests: a generation request (with the hires fix) for
`Service.params`, and an edit's picture, mask and form fields for `edit_validation.edit_params`.

img2img: the one init image is flattened onto white (A1111's img2img background) and, when width and height
differ from its size, resized to them (A1111's resize mode 0, Lanczos). A mask is read as A1111 reads it
(a transparent mask by its alpha, opaque = repaint; else white = repaint; both thresholded at 128) and may
be inverted. ``inpaint_full_res`` (A1111's "Only masked", its API's default) is pictor's inpaint area
``masked``: the mask's box grown by ``inpaint_full_res_padding`` pixels, drawn at width x height (the
model's default size when they are left out) and blended back into the picture at its own size.
"""

from __future__ import annotations

import json
from typing import Any

from PIL import Image, ImageOps
from pydantic import ValidationError

from pictor.editing import eight_bit
from pictor.hires import MAX_SCALE, hires_size
from pictor.serve.a1111_errors import field_error
from pictor.serve.a1111_models import Img2ImgRequest, Txt2ImgRequest
from pictor.serve.a1111_names import LANCZOS, check_checkpoint, sampler_of, schedule_of
from pictor.serve.a1111_params import Mapped, common_fields, translated, validation_message
from pictor.serve.errors import APIError
from pictor.serve.generation_body import ImageGenerationRequest
from pictor.serve.security import check_limits
from pictor.serve.service import Service
from pictor.serve.uploads import decode_base64_image

FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
# A1111's defaults where pictor's own differ: the hires pass's denoising strength, a mask's blur (pixels).
HIRES_STRENGTH = 0.75
MASK_BLUR = 4
# A1111's hires fields that must say what the first pass says, and the first pass's field.
HIRES_SAME = {
    "hr_prompt": "prompt",
    "hr_negative_prompt": "negative_prompt",
    "hr_cfg": "cfg_scale",
    "hr_distilled_cfg": "distilled_cfg_scale",
}


# -- txt2img ------------------------------------------------------------------------------------------------


def txt2img_request(svc: Service, body: Txt2ImgRequest) -> tuple[ImageGenerationRequest, Mapped]:
    """A txt2img body as pictor's generation request, and how its fields map (for errors and info)."""
    mapped = common_fields(svc, body)
    fields = mapped.fields
    fields["size"] = size_of(svc, body.width, body.height)
    if body.enable_hr:
        fields |= hires_fields(svc, body, fields, mapped.names)
    fields["response_format"] = "b64_json"
    try:
        return ImageGenerationRequest.model_validate(fields), mapped
    except ValidationError as exc:
        raise validation_message(exc, mapped.names) from None


def size_of(svc: Service, width: int | None, height: int | None) -> str | None:
    """WxH, or None for the model's default; one side alone takes the model's default for the other."""
    if width is None and height is None:
        return None
    if width is None or height is None:
        pipe = svc.manager.pipeline
        if pipe is None:
            svc.need_model("a width without a height (or a height without a width) takes the model's default")
        width, height = width or pipe.defaults["width"], height or pipe.defaults["height"]
    return f"{width}x{height}"


def hires_fields(
    svc: Service, body: Txt2ImgRequest, fields: dict[str, Any], names: dict[str, str]
) -> dict[str, Any]:
    """A1111's hires fix as pictor's: the same sampler, schedule, prompts and guidance in both passes."""
    if body.firstphase_width or body.firstphase_height:
        raise field_error(
            "firstphase_width",
            "A1111's old hires fields; send the first pass's width and height with hr_scale",
        )
    check_checkpoint(svc, body.hr_checkpoint_name, "hr_checkpoint_name")
    sampler = sampler_of(body.hr_sampler_name, "hr_sampler_name")[0]
    if sampler is not None and sampler != _first_pass(svc, "sampler", fields["sampler"]):
        raise field_error(
            "hr_sampler_name", "pictor's hires pass runs the first pass's sampler; leave it out"
        )
    schedule = schedule_of(body.hr_scheduler, "hr_scheduler")
    if schedule is not None and schedule != _first_pass(svc, "schedule", fields["schedule"]):
        raise field_error("hr_scheduler", "pictor's hires pass runs the first pass's schedule; leave it out")
    for name, first in HIRES_SAME.items():
        value = getattr(body, name)
        if value not in (None, "") and value != getattr(body, first):
            raise field_error(name, f"pictor's hires pass takes the first pass's {first}; leave {name} out")
    strength = body.denoising_strength
    if strength == 0:
        raise field_error(
            "denoising_strength",
            f"0 redraws nothing in the hires pass; send 0.1 to 1 (left out: {HIRES_STRENGTH:g}, A1111's)",
        )
    return {
        "hires_scale": hires_scale(svc, body, names),
        "hires_strength": HIRES_STRENGTH if strength is None else strength,
        "hires_steps": body.hr_second_pass_steps or None,
        "hires_upscaler": upscaler_of(body.hr_upscaler),
    }


def _first_pass(svc: Service, key: str, sent: str | None) -> str | None:
    """The first pass's sampler or schedule: as sent, else the model's default."""
    if sent is not None:
        return sent
    pipe = svc.manager.pipeline
    if pipe is None:
        svc.need_model(f"the hires pass's {key} is checked against the model's default")
    return pipe.defaults[key]


def upscaler_of(name: str | None) -> str:
    """hr_upscaler: A1111's None (a plain resize) and Lanczos are pictor's lanczos; left out, too (A1111's
    latent upscale, which pictor has not); another name must be the server's upscale model."""
    text = (name or "").strip()
    if not text or text.lower() in LANCZOS:
        return "lanczos"
    if text.lower().startswith("latent") or text.lower() == "nearest":
        raise field_error(
            "hr_upscaler",
            f"{text!r} is not one pictor has: send Lanczos (or None), or the server's upscale model "
            "(GET /sdapi/v1/upscalers)",
        )
    return text


def hires_scale(svc: Service, body: Txt2ImgRequest, names: dict[str, str]) -> float | None:
    """hr_scale, or the factor hr_resize_x / hr_resize_y ask for (one factor: pictor keeps the ratio)."""
    x, y = body.hr_resize_x or 0, body.hr_resize_y or 0
    if not x and not y:
        return body.hr_scale
    pipe = svc.manager.pipeline
    if pipe is None:
        svc.need_model("hr_resize_x and hr_resize_y are checked against the model's size multiple")
    width, height = body.width or pipe.defaults["width"], body.height or pipe.defaults["height"]
    name, side, first, what = (
        ("hr_resize_x", x, width, "width") if x else ("hr_resize_y", y, height, "height")
    )
    scale = side / first
    names["hires_scale"] = name
    if not 1 < scale <= MAX_SCALE:
        raise field_error(
            name,
            f"{side} is the hires pass's {what}: it must be larger than the first pass's {what} ({first}) "
            f"and at most {MAX_SCALE:g} times it ({int(first * MAX_SCALE)}); or send hr_scale",
        )
    if x and y and hires_size(width, height, scale, pipe.patch) != (x, y):
        raise field_error(
            "hr_resize_x",
            f"{x}x{y} (with hr_resize_y) is not {width}x{height} times one factor; pictor's hires fix keeps "
            "the picture's ratio: send one of them, or hr_scale",
        )
    return scale


# -- img2img ------------------------------------------------------------------------------------------------


def img2img_inputs(svc: Service, body: Img2ImgRequest) -> tuple[Image.Image, Image.Image | None, Mapped]:
    """An img2img body as an edit: its picture (flattened, resized as A1111 does), its mask (A1111's
    reading) and `edit_validation.edit_params`' form fields."""
    mapped = common_fields(svc, body, edit=True)
    refused_img2img(body)
    pictures = body.init_images or []
    if len(pictures) != 1:
        raise field_error(
            "init_images", f"send exactly one picture (got {len(pictures)}); one request edits one picture"
        )
    svc.manager.check_intake()  # a request refused anyway is refused before its pictures are decoded
    limits = svc.settings.limits
    source = flattened(decode_base64_image(pictures[0], "init_images", limits, fitted=True))
    mask = None
    if body.mask:
        mask = a1111_mask(
            decode_base64_image(body.mask, "mask", limits, fitted=True), body.inpainting_mask_invert
        )
        if mask.size != source.size:  # A1111 stretches the mask onto the picture
            mask = mask.resize(source.size, Image.NEAREST)
    sized = body.width is not None or body.height is not None
    size = (body.width or source.width, body.height or source.height)
    fields = mapped.fields
    if sized:  # the server's limits before anything is drawn at that size (a resize, an inpainted area)
        try:
            check_limits(limits, fields["prompt"], fields["n"], *size, fields["steps"])
        except APIError as exc:
            raise translated(exc, mapped.names) from None
    if mask is not None and body.inpaint_full_res:
        fields["inpaint_area"] = "masked"
        fields["mask_padding"] = body.inpaint_full_res_padding or 0
        fields["inpaint_size"] = list(size) if sized else None
    elif size != source.size:
        if body.resize_mode not in (None, 0):
            raise field_error(
                "resize_mode",
                f"{body.resize_mode} crops or fills; pictor resizes a picture to width x height only by "
                "stretching it (0, just resize): send resize_mode 0, or the picture at that size",
            )
        source = source.resize(size, Image.LANCZOS)
        mask = mask.resize(size, Image.NEAREST) if mask is not None else None
    if mask is not None:
        check_fill(body, mapped.ignored)
        fields["feather"] = mask_blur(body)
    fields["loras"] = json.dumps(fields["loras"]) if fields["loras"] else None
    fields |= {"size": None, "model": None, "cache_threshold": None, "strength": body.denoising_strength}
    return source, mask, mapped


def refused_img2img(body: Img2ImgRequest) -> None:
    if body.initial_noise_multiplier not in (None, 1):
        raise field_error(
            "initial_noise_multiplier", "pictor noises the picture by the schedule alone; send 1"
        )
    if body.latent_mask:
        raise field_error("latent_mask", "pictor's inpainting has one mask; send it as mask")
    if body.mask and body.mask_round is False:
        raise field_error("mask_round", "pictor's masks repaint or keep each pixel (binary); send true")


def flattened(image: Image.Image) -> Image.Image:
    """RGB, transparency on white: A1111 flattens an init image onto its img2img background (white)."""
    image = eight_bit(image)
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def a1111_mask(image: Image.Image, invert: Any) -> Image.Image:
    """A1111's binary mask (create_binary_mask): an RGBA mask that is not all opaque by its alpha, any other
    by its grey level, over 128 = repaint; inverted for inpainting_mask_invert 1."""
    image = eight_bit(image)
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        grey = image.getchannel("A")
    else:
        grey = image.convert("L")
    mask = grey.point(lambda v: 255 if v > 128 else 0)
    return ImageOps.invert(mask) if invert else mask


def check_fill(body: Img2ImgRequest, ignored: list[str]) -> None:
    """pictor's inpainting starts the masked area from the picture noised to the strength (A1111's
    "original"); at strength 1 it starts from noise alone, where every fill is the same. A1111's default,
    0 (fill), is taken as 1 and listed in `ignored` (clients send it unasked); 2 and 3 are refused."""
    fill = body.inpainting_fill
    if fill in (None, 1) or body.denoising_strength in (None, 1):
        return
    if fill == 0:
        ignored.append("inpainting_fill")
        return
    raise field_error(
        "inpainting_fill",
        f"{fill} ({FILLS[fill]}) is not how pictor starts the masked area: pictor's inpainting starts it "
        "from the picture (1, original; 0 is taken as 1); send inpainting_fill 1, or denoising_strength 1 "
        "(the area then starts from noise alone, and every fill is the same)",
    )


def mask_blur(body: Img2ImgRequest) -> int:
    """mask_blur (or mask_blur_x / _y, equal) as pictor's feather: pixels of blending inside the mask's
    edge, so pixels outside the mask stay the picture's. Left out: 4, A1111's."""
    if body.mask_blur is not None:
        return body.mask_blur
    x, y = body.mask_blur_x, body.mask_blur_y
    if x is not None and y is not None and x != y:
        raise field_error(
            "mask_blur_x", f"pictor blurs a mask's edge alike both ways; send one mask_blur ({x} or {y})"
        )
    return x if x is not None else y if y is not None else MASK_BLUR
