"""A1111's request fields as pictor's: seeds, guidance, LoRA tags, prompts, and what is refused or ignored
(names: `a1111_names`; the hires fix and img2img: `a1111_requests`). `a1111_api` answers with it; the
generation itself is pictor's own (`Service.params` / `edit_validation.edit_params`), so the images are
those the OpenAI endpoints make with the same settings.

A field that would change the picture in a way pictor cannot draw is refused, naming the field and what to
send instead; settings that change nothing here (saving, sampler noise knobs, UI options) are ignored and
listed in the answer's ``info`` (``ignored_fields``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pictor.composable_prompts import uses_and
from pictor.prompt_editing import has_editing
from pictor.serve.a1111_errors import LABELS, field_error
from pictor.serve.a1111_models import A1111Common
from pictor.serve.a1111_names import check_checkpoint, sampler_and_schedule
from pictor.serve.errors import APIError
from pictor.serve.service import Service

# What jobs sent through /sdapi carry in their settings: /sdapi/v1/progress and /interrupt look for it.
API_MARK = {"api": "a1111"}

# pictor's request fields -> A1111's, for the errors pictor's checks raise; `guidance` is set per request.
FIELD_NAMES = {
    "n": "batch_size",
    "size": "width",
    "sampler": "sampler_name",
    "schedule": "scheduler",
    "variation_seed": "subseed",
    "variation_strength": "subseed_strength",
    "seed_resize_from": "seed_resize_from_w",
    "hires_scale": "hr_scale",
    "hires_strength": "denoising_strength",
    "hires_steps": "hr_second_pass_steps",
    "hires_upscaler": "hr_upscaler",
    "loras": "prompt",
    "prompt_weights": "prompt",
    "prompt_editing": "prompt",
    "composable": "prompt",
    "model": "override_settings",
    # an edit's
    "image": "init_images",
    "strength": "denoising_strength",
    "inpaint_area": "inpaint_full_res",
    "mask_padding": "inpaint_full_res_padding",
    "inpaint_size": "width",
    "feather": "mask_blur",
}

# Set to anything but null, these change nothing here: ignored, and listed in the answer's info.
IGNORED_WHEN_SET = (
    "eta",
    "s_min_uncond",
    "s_churn",
    "s_tmax",
    "s_tmin",
    "s_noise",
    "comments",
    "force_task_id",
    "refiner_switch_at",
    "image_cfg_scale",
)


def translated(exc: APIError, names: dict[str, str]) -> APIError:
    """pictor's error about its own field, told in A1111's: named by the A1111 field it came from."""
    if exc.param is None:
        return exc
    name = names.get(exc.param, FIELD_NAMES.get(exc.param, exc.param))
    label = LABELS.get(name, name)
    message = exc.message if exc.message.startswith(label) else f"{label}: {exc.message}"
    return APIError(exc.status, message, exc.type, exc.code, name, exc.headers)


def validation_message(exc: ValidationError, names: dict[str, str]) -> APIError:
    """A pictor request that its schema refuses (a mapped value out of its range), told in A1111's words."""
    first = exc.errors()[0]
    param = str(first["loc"][0]) if first.get("loc") else None
    return translated(APIError(400, first.get("msg", "invalid value"), param=param), names)


# -- what is refused, what is ignored -----------------------------------------------------------------------


def refused(body: A1111Common) -> None:
    """Fields that would change the picture in ways pictor cannot: a 422 naming each and what to do."""
    if body.restore_faces:
        raise field_error("restore_faces", "pictor has no face restoration (GFPGAN, CodeFormer); send false")
    if body.tiling:
        raise field_error("tiling", "pictor does not draw tileable (seamless) images; send false")
    if body.styles:
        raise field_error(
            "styles",
            "prompt styles are texts saved in A1111, which pictor has not; put their words in the prompt",
        )
    if body.script_name:
        raise field_error(
            "script_name", f"pictor runs no A1111 scripts ({body.script_name!r}); leave script_name out"
        )
    scripts = sorted(k for k, v in (body.alwayson_scripts or {}).items() if not _no_args(v))
    if scripts:
        raise field_error(
            "alwayson_scripts",
            f"pictor runs no A1111 extensions ({', '.join(scripts)}); leave alwayson_scripts out "
            "(pictor's own ControlNets, IP-Adapter and regional prompts are on its /v1 API)",
        )
    if body.infotext:
        raise field_error(
            "infotext", "send the settings as fields (POST /sdapi/v1/png-info reads a text into them)"
        )
    if body.refiner_checkpoint not in (None, "", "None", "none"):
        raise field_error("refiner_checkpoint", "pictor switches to no refiner model; leave it out")
    if body.firstpass_image:
        raise field_error(
            "firstpass_image", "the hires fix draws its own first pass; leave firstpass_image out"
        )


def _no_args(value: Any) -> bool:
    return isinstance(value, dict) and not value.get("args")


def ignored_fields(body: A1111Common) -> list[str]:
    """What is taken and ignored: sampler knobs pictor's samplers fix, fields A1111 does not have, empty
    extension entries and override settings other than the checkpoint."""
    out = [name for name in IGNORED_WHEN_SET if getattr(body, name, None) is not None]
    out += [f"override_settings.{k}" for k in body.override_settings or {} if k != "sd_model_checkpoint"]
    out += [f"alwayson_scripts.{k}" for k in body.alwayson_scripts or {}]
    if body.script_args and not body.script_name:
        out.append("script_args")
    out += sorted(body.model_extra or {})
    return out


# -- the settings -------------------------------------------------------------------------------------------

LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>", re.IGNORECASE)


def lora_choices(svc: Service, body: A1111Common) -> tuple[str, list[dict[str, Any]] | None]:
    """The prompt without its `<lora:NAME:WEIGHT>` tags, and the LoRAs they choose (the server's --lora-dir,
    named by file stem); A1111's `disable_extra_networks` drops them."""
    if LORA_TAG.search(body.negative_prompt or ""):
        raise field_error("negative_prompt", "LoRA tags go in the prompt, not the negative prompt")
    prompt = body.prompt or ""
    tags = list(LORA_TAG.finditer(prompt))
    if not tags:
        return prompt, None
    text = re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)).strip()
    if body.disable_extra_networks:
        return text, None
    if not svc.library.files:
        where = "its --lora-dir holds none now" if svc.library.folder else "it was started without --lora-dir"
        raise field_error(
            "prompt",
            f"{tags[0].group(0)} chooses a LoRA, but this server offers none ({where}); take the tag out",
        )
    return text, [_lora(tag) for tag in tags]


def _lora(tag: re.Match[str]) -> dict[str, Any]:
    name, *args = tag.group(1).split(":")
    positional = [a.strip() for a in args if "=" not in a]
    named = {k.strip(): v for k, v in (a.split("=", 1) for a in args if "=" in a)}
    if not name.strip() or len(positional) > 2 or set(named) - {"te", "unet"}:
        raise field_error(
            "prompt", f"{tag.group(0)}: pictor reads <lora:NAME> and <lora:NAME:WEIGHT> (one weight per LoRA)"
        )
    try:
        te = float(positional[0] if positional else named.get("te", 1))
        unet = float(positional[1] if len(positional) > 1 else named.get("unet", te))
    except ValueError:
        raise field_error("prompt", f"{tag.group(0)}: its weight is not a number") from None
    if not (math.isfinite(te) and math.isfinite(unet)):
        raise field_error("prompt", f"{tag.group(0)}: its weight must be a finite number (e.g. 0.8)")
    if te != unet:
        raise field_error(
            "prompt",
            f"{tag.group(0)}: pictor gives a LoRA one weight (its transformer layers), not one for the text "
            "encoder and another for the model; send <lora:NAME:WEIGHT>",
        )
    return {"name": name.strip(), "scale": unet}


def seed_fields(body: A1111Common, edit: bool = False) -> dict[str, Any]:
    """seed (-1: random), subseed and its strength (variation seeds), seed resize from (generations)."""
    out: dict[str, Any] = {"seed": None if body.seed in (None, -1) else body.seed}
    if body.subseed_strength:
        out["variation_strength"] = body.subseed_strength
        out["variation_seed"] = None if body.subseed in (None, -1) else body.subseed
    w, h = body.seed_resize_from_w or 0, body.seed_resize_from_h or 0
    if w > 0 and h > 0:
        if edit:
            raise field_error(
                "seed_resize_from_w",
                "img2img takes its composition from its picture, so seed resize does not apply; send -1",
            )
        out["seed_resize_from"] = f"{w}x{h}"
    return out


def guidance(svc: Service, body: A1111Common, ignored: list[str]) -> tuple[float | None, str]:
    """The guidance pictor runs and the field it came from. A real-CFG model takes cfg_scale (Forge's
    distilled_cfg_scale is ignored, as Forge ignores it there); a guidance-distilled one (FLUX.1 [dev])
    distilled_cfg_scale, else cfg_scale (an A1111 client knows no other); a model without guidance none."""
    cfg, distilled = body.cfg_scale, body.distilled_cfg_scale
    if cfg is None and distilled is None:
        return None, "cfg_scale"
    pipe = svc.manager.pipeline
    if pipe is None:
        svc.need_model("cfg_scale and distilled_cfg_scale are read by the model's kind of guidance")
    mode = pipe.guidance_mode
    if mode == "distilled" and distilled is not None:
        if cfg is not None and cfg != 1:
            raise field_error(
                "cfg_scale",
                f"{cfg:g} asks for real classifier-free guidance on top of the model's distilled guidance "
                "(distilled_cfg_scale), which pictor does not run; send cfg_scale 1 or leave it out",
            )
        return distilled, "distilled_cfg_scale"
    if distilled is not None:
        ignored.append("distilled_cfg_scale")
    if mode == "none" and cfg == 1:
        return None, "cfg_scale"  # CFG 1 is no guidance: what this model runs anyway
    return cfg, "cfg_scale"


def image_count(svc: Service, body: A1111Common) -> int:
    n = (body.batch_size or 1) * (body.n_iter or 1)
    most = svc.settings.limits.max_images
    if n > most:
        raise field_error(
            "batch_size", f"batch_size x n_iter is {n} images; this server makes at most {most} per request"
        )
    return n


def prompt_fields(body: A1111Common, prompt: str) -> dict[str, Any]:
    """A1111 always reads its prompt syntax: weights, prompt editing and AND (composable)."""
    negative = body.negative_prompt or ""
    return {
        "prompt": prompt,
        "negative_prompt": negative or None,
        "prompt_weights": True,
        "prompt_editing": has_editing(prompt) or has_editing(negative),
        "composable": uses_and(prompt),
    }


@dataclass
class Mapped:
    """An A1111 request as pictor's: its fields, pictor's names for them (errors), what was ignored."""

    fields: dict[str, Any]
    names: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def common_fields(svc: Service, body: A1111Common, edit: bool = False) -> Mapped:
    """What txt2img and img2img share, checked and mapped."""
    refused(body)
    ignored = ignored_fields(body)
    check_checkpoint(svc, (body.override_settings or {}).get("sd_model_checkpoint"), "override_settings")
    prompt, loras = lora_choices(svc, body)
    sampler, schedule = sampler_and_schedule(body)
    value, source = guidance(svc, body, ignored)
    fields = {
        **prompt_fields(body, prompt),
        "n": image_count(svc, body),
        "steps": body.steps,
        "guidance": value,
        "sampler": sampler,
        "schedule": schedule,
        "loras": loras,
        **seed_fields(body, edit),
    }
    return Mapped(fields, {"guidance": source}, ignored)
