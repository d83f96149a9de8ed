"""What an A1111 answer says about its images: A1111's ``info`` (its ``Processed.js()`` keys, from the
images' pictor records and ``parameters`` texts), and a ``parameters`` text read into fields as A1111's
PNG Info reads it."""

from __future__ import annotations

import io
import json
import re
import time
from typing import Any

from PIL import Image

from pictor.provenance import PARAMETERS_KEY, RECORD_KEY, SAMPLER_DISPLAY, parse_parameters
from pictor.serve.a1111_models import A1111Common
from pictor.serve.a1111_names import served_model
from pictor.serve.a1111_params import Mapped
from pictor.serve.service import Service
from pictor.serve.store import JobRow


def png_text(png: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(png)) as im:
        return {k: v for k, v in (getattr(im, "text", {}) or {}).items() if isinstance(v, str)}


def info_of(svc: Service, body: A1111Common, job: JobRow, texts: list[dict[str, str]], mapped: Mapped) -> str:
    """A1111's `Processed.js()` for the job's images, from their records; with pictor's job id, the fields
    it ignored and its warnings."""
    records = [json.loads(t[RECORD_KEY]) for t in texts if RECORD_KEY in t]
    first = records[0] if records else {}
    seeds = [int(r["seed"]) for r in job.results]
    subseeds = [int(r["variation_seed"]) if r.get("variation_strength") else -1 for r in records]
    n = len(seeds)
    distilled = first.get("guidance_mode") == "distilled"
    hires = first.get("hires") if isinstance(first.get("hires"), dict) else {}
    resize = first.get("seed_resize_from") or [-1, -1]
    model = served_model(svc)
    started = time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created))
    info = {
        "prompt": body.prompt or "",
        "all_prompts": [body.prompt or ""] * n,
        "negative_prompt": body.negative_prompt or "",
        "all_negative_prompts": [body.negative_prompt or ""] * n,
        "seed": seeds[0] if seeds else -1,
        "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else -1,
        "all_subseeds": subseeds,
        "subseed_strength": body.subseed_strength or 0,
        "width": first.get("width"),
        "height": first.get("height"),
        "sampler_name": SAMPLER_DISPLAY.get(first.get("sampler", ""), first.get("sampler")),
        "scheduler": first.get("schedule"),
        "cfg_scale": 1 if distilled else first.get("guidance"),
        **({"distilled_cfg_scale": first.get("guidance")} if distilled else {}),
        "steps": first.get("steps"),
        "batch_size": body.batch_size or 1,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model.model_name,
        "sd_model_hash": model.hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": resize[0],
        "seed_resize_from_h": resize[1],
        "denoising_strength": first.get("strength", hires.get("strength")),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [t.get(PARAMETERS_KEY, "") for t in texts],
        "styles": [],
        "job_timestamp": started,
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        # pictor's: the history entry, what was taken and ignored, what the user should know
        "job_id": job.id,
        "ignored_fields": mapped.ignored,
        "warnings": job.warnings,
    }
    return json.dumps(info)


def parameters_fields(text: str) -> dict[str, Any]:
    """A1111's reading of a parameters text: Prompt, Negative prompt and each setting (a WxH one as its -1 and
    -2 parts); {} for no text, and the prompt alone for a text pictor cannot read further."""
    if not text.strip():
        return {}
    try:
        parsed = parse_parameters(text)
    except ValueError:  # a quoted value that is not JSON
        return {"Prompt": text}
    out: dict[str, Any] = {"Prompt": parsed["prompt"], "Negative prompt": parsed["negative_prompt"]}
    for key, value in parsed["settings"].items():
        size = re.fullmatch(r"(\d+)x(\d+)", str(value))
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out
