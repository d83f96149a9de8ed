"""An edit's validation: `edit_params` checks an edit's fields and pictures (limits, policy, model, the
pipeline's own checks), keeps its uploads and answers the job's settings. Shared by the edit and variation
forms (`edits`, `variations`) and A1111's img2img (`a1111_api`); apart from the forms' grammar, which only
reads fields, so that each can be read without the other.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from pictor.edit_upscale import MAX_UPSCALE
from pictor.editing import EditRequest, eight_bit
from pictor.generation_request import DENOISE_TILING_FIELDS
from pictor.ip_adapter_files import ip_adapter_pixels
from pictor.serve.controlnets import resolved_settings
from pictor.serve.edit_outpaint import check_outpaint_fields, expanded_size
from pictor.serve.errors import APIError
from pictor.serve.guidance_fields import checked_guidance_method, guidance_method_of
from pictor.serve.job_requests import EDIT_KEYS, TUPLE_KEYS
from pictor.serve.pipeline_errors import HIRES_UPSCALER_HELP, REQUEST_ERRORS, request_error
from pictor.serve.regional_fields import checked_regional_options
from pictor.serve.request_checks import (
    check_names,
    check_regional_attention,
    checked_layout,
    checked_regions,
    require_prompt,
)
from pictor.serve.security import check_limits, check_policy, check_text
from pictor.serve.service import Service
from pictor.serve.settings import Limits

# Variation seeds (`pictor.noise_variation`): an edit takes them as a generation does, but not
# seed_resize_from (an edit's composition is its picture's), and a variation takes none.
VARIATION_SEED_FIELDS = ("variation_seed", "variation_strength")


def _transparent(image: Image.Image) -> Image.Image | None:
    """White where the image is fully transparent (OpenAI's "edit here"), or None without alpha."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def edit_params(
    svc: Service,
    source: Image.Image,
    mask: Image.Image | None,
    form: dict[str, Any],
    reference: Image.Image | None = None,
    context: Image.Image | None = None,
    prompt_optional: bool = False,
    control: Image.Image | None = None,
    redux: Image.Image | None = None,
    controlnets: list[Image.Image] | None = None,
    ip_adapter: Image.Image | None = None,
) -> dict[str, Any]:
    """Validate an edit (limits, policy, model, the pipeline's own checks); keep its images; job settings.
    `prompt_optional`: an empty prompt is fine without a reference too (a variation draws from the image).
    `controlnets`: the ControlNets' pictures, in order, already 8-bit RGB (`controlnets.read_pictures`).
    `ip_adapter`: the IP-Adapter's picture."""
    limits = svc.settings.limits
    prompt, negative, n = form["prompt"], form["negative_prompt"] or "", form["n"]
    svc.check_model(form["model"])
    check_limits(limits, prompt, n, source.width, source.height, form["steps"])
    check_text(limits, prompt=prompt, negative_prompt=negative)
    check_names(form["sampler"], form["schedule"])
    pictured = any(picture is not None for picture in (reference, redux, ip_adapter))
    require_prompt(prompt, pictured or prompt_optional)
    layout = checked_layout(form.get("layout"))
    regions = checked_regions(form.get("regions"), limits)
    check_regional_attention(bool(form.get("regional_attention")), regions)
    rpf = checked_regional_options(form, bool(form.get("regional_attention")), regions)  # None where absent
    method = checked_guidance_method(form.get("guidance_method"))  # JSON text, checked by the dataclass
    check_policy(svc.policy, prompt, negative, [box["phrase"] for box in layout or []], regions)
    upscale = form.get("upscale")
    # An outpainting edit's output is the grown canvas, known without the model: the limits apply to it
    # before anything is allocated or queued.
    expanded = expanded_size(form.get("expand"), source.size)
    if expanded is not None:
        _check_larger(limits, prompt, n, list(expanded), form["steps"], "expand")
    out_w, out_h = expanded or source.size
    if form["size"] not in (None, "", "auto") and (upscale is not None or form["size"] != f"{out_w}x{out_h}"):
        if upscale is not None:
            keeps = "an upscaling edit's size follows from upscale"
        elif expanded is not None:
            keeps = f"an outpainting edit's size is the image's plus expand ({out_w}x{out_h})"
        else:
            keeps = f"an edit keeps the image's size ({source.width}x{source.height})"
        raise APIError(400, f"{keeps}; omit size", param="size", code="invalid_parameters")
    if upscale is not None and svc.manager.pipeline is None:  # the loaded model's own size is checked below
        _check_upscale_while_loading(limits, prompt, n, upscale, source.size, form.get("steps"))
    if form.get("inpaint_size") is not None:
        _check_larger(limits, prompt, n, form["inpaint_size"], form.get("steps"), "inpaint_size")
    # 16-bit greyscale scaled by its depth first, as the CLI and library do (Pillow's conversions clip).
    source, mask = eight_bit(source), eight_bit(mask) if mask is not None else None
    reference = eight_bit(reference) if reference is not None else None
    context = eight_bit(context) if context is not None else None
    control = eight_bit(control) if control is not None else None
    redux = eight_bit(redux).convert("RGB") if redux is not None else None
    # transparency on white, as CLIP's processor and the CLI take it (not dropped): the record's hash is then
    # the original file's too
    ip_adapter = Image.fromarray(ip_adapter_pixels(ip_adapter)) if ip_adapter is not None else None
    if mask is not None:
        mask = _transparent(mask) or mask.convert("L")
    else:
        mask = _transparent(source)
        if mask is not None and not mask.getbbox():
            mask = None  # alpha channel, but nothing transparent: plain img2img
    check_outpaint_fields(form, masked=mask is not None)
    source = source.convert("RGB")
    reference = reference.convert("RGB") if reference is not None else None
    context = context.convert("RGB") if context is not None else None
    control = control.convert("RGB") if control is not None else None
    keys = ("steps", "guidance", "sampler", "schedule", "seed", "strength", "cache_threshold")
    settings = {k: form[k] for k in keys}
    # variation seeds (the pipeline checks them: a variation seed needs a strength); absent from a variation
    settings |= {k: form.get(k) for k in VARIATION_SEED_FIELDS}
    settings |= {k: form.get(k) for k in DENOISE_TILING_FIELDS}  # pixels, or None
    settings["cache_threshold"] = settings["cache_threshold"] or None  # 0 is off: batches with absent
    settings["prompt_weights"] = bool(form.get("prompt_weights"))
    settings["prompt_editing"] = bool(form.get("prompt_editing"))
    settings["composable"] = bool(form.get("composable"))
    settings["regional_attention"] = bool(form.get("regional_attention"))  # absent from a variation's form
    settings |= rpf  # its RPF controls (regional_fields), absent from a variation's form too
    settings["guidance_method"] = method  # its record, or None for plain CFG (guidance_fields)
    # an edit's own settings, as EditRequest names them; absent ones take its defaults
    edit_settings = {k: form[k] for k in EDIT_KEYS if form.get(k) is not None}
    if str(edit_settings.get("upscaler", "")).lower() == "lanczos":
        del edit_settings["upscaler"]  # None means Lanczos, so equal edits read alike
    if svc.manager.pipeline is None:  # read again below: it never goes away once loaded
        _check_upscaler_while_loading(svc, edit_settings.get("upscaler"))
    settings["layout"] = layout
    settings["regions"] = regions
    settings["control_canny"] = form.get("control_canny")  # [low, high] or None (canny_form)
    settings["redux_strength"] = form.get("redux_strength")
    settings["ip_adapter_scale"] = form.get("ip_adapter_scale")
    # ControlNets' settings as sent (lists, words checked), spelled out below once the model resolved them.
    for key in ("controlnet_scales", "controlnet_modes", "controlnet_start", "controlnet_end"):
        settings[key] = form.get(key)
    loras = svc.library.choose_text(form.get("loras"))
    pipe = svc.manager.pipeline
    # The output's size: an outpainting's is the grown canvas; an upscaling edit's is larger, and known once
    # the model is (its pixel multiple).
    width, height = (None, None) if "upscale" in edit_settings else (out_w, out_h)
    if pipe is not None:
        request = EditRequest(
            image=source,
            prompt=prompt,
            mask=mask,
            negative_prompt=negative,
            num_images=n,
            reference=reference,
            context_image=context,  # resolve_edit refuses it on a model that is not Kontext
            control_image=control,  # and this one on a model that is not FLUX.1 Canny / Depth
            redux_image=redux,  # and this one without Redux loaded
            ip_adapter_image=ip_adapter,  # and this one without the IP-Adapter loaded
            controlnet_images=controlnets,  # and these without ControlNets loaded
            **{**settings, "guidance_method": guidance_method_of(settings)},
            **{k: tuple(v) if k in TUPLE_KEYS else v for k, v in edit_settings.items()},
        )
        try:
            r, inputs = pipe.resolve_edit(request)
        except REQUEST_ERRORS as exc:
            message, param = request_error(exc, form=True)
            raise APIError(400, message, param=param, code="invalid_parameters") from None
        settings.update(**resolved_settings(r))
        settings.update(
            steps=r.steps,
            guidance=r.guidance,
            sampler=r.sampler,
            schedule=r.schedule,
            strength=inputs.strength,
            layout=r.layout,
            regions=r.regions,
            redux_strength=r.redux_strength,
            ip_adapter_scale=r.ip_adapter_scale,
            denoise_tile=r.denoise_tile,  # the overlap's default filled in: equal edits read alike
            denoise_tile_overlap=r.denoise_tile_overlap,
        )
        if "upscale" in edit_settings:  # the output is the enlarged picture: the server's limits apply to it
            _check_larger(limits, prompt, n, list(inputs.size), r.steps, "upscale")
            width, height = inputs.size
        if inputs.area is not None:  # a masked area is drawn at its own size: the limits apply to that
            field = "inpaint_size" if "inpaint_size" in edit_settings else "inpaint_area"
            _check_larger(limits, prompt, n, list(inputs.size), r.steps, field)
    # context_image: the key job_requests.edit_request reads back, as for a JSON generation's context_image.
    pictures = {"image": source, "mask": mask, "reference": reference, "context_image": context}
    pictures |= {"control_image": control, "redux_image": redux, "ip_adapter_image": ip_adapter}
    return {
        "kind": "edit",
        **svc.keep_uploads({**pictures, "controlnet_images": controlnets}),
        "prompt": prompt,
        "negative_prompt": negative,
        "width": width,
        "height": height,
        "n": n,
        "loras": loras,
        **settings,
        **edit_settings,
    }


def _check_larger(
    limits: Limits, prompt: str, n: int, size: list[int], steps: int | None, field: str
) -> None:
    """The server's limits on the size an upscaling edit makes (or a masked area is drawn at), named by the
    field that sets it."""
    try:
        check_limits(limits, prompt, n, size[0], size[1], steps)
    except APIError as exc:
        message = f"{field} makes {size[0]}x{size[1]}: {exc.message}"
        raise APIError(400, message, code=exc.code, param=field) from None


def _check_upscale_while_loading(
    limits: Limits, prompt: str, n: int, scale: float, size: tuple[int, int], steps: int | None
) -> None:
    """Before the model is there, its pixel multiple is not known: the factor is checked as the pipeline
    checks it, and the enlarged size bounded from above (every model rounds to a multiple of 16 or a divisor
    of it), so that no job the limits refuse is queued."""
    if not 1 < scale <= MAX_UPSCALE:
        raise APIError(
            400,
            f"upscale must be a number above 1 and at most {MAX_UPSCALE:g} (e.g. 2), got {scale:g}",
            param="upscale",
            code="invalid_parameters",
        )
    bound = [math.ceil(side * scale / 16) * 16 for side in size]
    _check_larger(limits, prompt, n, bound, steps, "upscale")


def _check_upscaler_while_loading(svc: Service, name: str | None) -> None:
    """Before the model is there, the upscale model it loads with is known by its file (--upscaler): an
    upscaler that names another is refused now, as the loaded model would refuse it."""
    path = svc.settings.upscaler
    if name is not None and (path is None or name != path.stem):
        loaded = f"'{path.stem}' is" if path is not None else "none is"
        raise APIError(
            400,
            f"upscaler '{name}' is not loaded ({loaded}); {HIRES_UPSCALER_HELP}",
            param="upscaler",
            code="invalid_parameters",
        )
