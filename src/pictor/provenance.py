"""Provenance in every PNG: A1111's ``parameters`` text chunk and a ``pictor`` JSON chunk.

The ``parameters`` text is what the A1111 web UI writes (and what Civitai, sd-parsers, ComfyUI loaders and
image viewers read)::

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: Euler, Schedule type: flux, CFG scale: 4, Seed: 7, Size: 64x64, Model hash: ...

The ``pictor`` chunk is the full generation record as JSON: with it, `pictor reproduce` regenerates the
same pixels. Images that no model made (the shapes world's ground-truth renders that `pictor eval shapes
--save-images` writes) carry a ``pictor-render`` JSON chunk instead: what was drawn, from which seed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"
POSTPROCESSING_KEYS = ("postprocessing", "extras")  # A1111's Extras tab writes its text under both
RECORD_KEY = "pictor"
RENDER_KEY = "pictor-render"

# A1111's names, so tools that read its "parameters" text recognise the sampler (IPNDM, DEIS, Res Multistep
# and HeunPP2 are reForge's, the A1111 fork that has them, spelt as its case-sensitive lookup reads them;
# Gradient Estimation is ComfyUI's display name, no A1111 fork's verified; LCM is A1111's own; IPNDM_V is
# reForge's spelling, Extended Reverse-Time SDE Forge's (its alter samplers), Res Multistep Ancestral
# follows reForge's Res Multistep, no fork's verified)
SAMPLER_DISPLAY = {
    "euler": "Euler",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "unipc": "UniPC",
    "deis": "DEIS",
    "ipndm": "IPNDM",
    "res_multistep": "Res Multistep",
    "lms": "LMS",
    "dpm_2": "DPM2",
    "heunpp2": "HeunPP2",
    "gradient_estimation": "Gradient Estimation",
    "euler_ancestral": "Euler a",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "lcm": "LCM",
    "dpm_2_ancestral": "DPM2 a",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "ipndm_v": "IPNDM_V",
    "res_multistep_ancestral": "Res Multistep Ancestral",
    "er_sde": "Extended Reverse-Time SDE",
    # reForge's names for ComfyUI's CFG++ samplers (the RES ones follow their pattern)
    "euler_cfg_pp": "Euler CFG++",
    "euler_ancestral_cfg_pp": "Euler Ancestral CFG++",
    "dpmpp_2m_cfg_pp": "DPM++ 2M CFG++",
    "dpmpp_2s_ancestral_cfg_pp": "DPM++ 2S Ancestral CFG++",
    "res_multistep_cfg_pp": "Res Multistep CFG++",
    "res_multistep_ancestral_cfg_pp": "Res Multistep Ancestral CFG++",
    # ComfyUI's samplers of 2025, which no A1111 fork verified here lists: its names in the spelling above
    "gradient_estimation_cfg_pp": "Gradient Estimation CFG++",
    "exp_heun_2_x0": "Exp Heun 2 X0",
    "exp_heun_2_x0_sde": "Exp Heun 2 X0 SDE",
    "seeds_2": "SEEDS 2",
    "seeds_3": "SEEDS 3",
    # reForge's (modules_forge/forge_alter_samplers.py), as its lookup reads them; others' "SA-Solver PECE"
    # is read back too (`pictor.settings_import.SAMPLER_ALIASES`)
    "sa_solver": "SA-Solver",
    "sa_solver_pece": "SA-Solver-Pece",
}


class ProvenanceError(ValueError):
    """An image without readable pictor provenance."""


def quote(value: Any) -> str:
    """A1111's quoting: values holding a comma, colon or newline become JSON strings."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _fmt_number(x: float) -> str:
    return f"{x:g}"


def _upscaler_name(name: Any) -> str:
    """A1111 writes its own Lanczos capitalised; a model keeps its file's name."""
    return "Lanczos" if name == "lanczos" else str(name)


def postprocessing_text(record: dict[str, Any]) -> str | None:
    """A1111's Extras-tab text for an upscale by a model (`pictor upscale`), which it writes in PNG chunks of
    its own ("postprocessing", "extras") beside the source's unchanged "parameters"; None for no upscale."""
    up = record.get("upscale")
    if not isinstance(up, dict) or not isinstance(up.get("scale"), int | float):
        return None
    extras = up.get("a1111_extras")  # made through /sdapi/v1/extra-*: A1111's own text of its settings
    if isinstance(extras, dict) and isinstance(extras.get("infotext"), str):
        return extras["infotext"]
    fields = [
        ("Postprocess upscale by", _fmt_number(up["scale"])),
        ("Postprocess upscaler", up.get("upscaler")),
    ]
    return ", ".join(f"{k}: {quote(v)}" for k, v in fields)


def a1111_prompt(text: str, weighted: bool) -> str:
    """A prompt as A1111's text holds it: A1111 reads brackets as weights, so a prompt pictor read as plain
    text has its brackets (and backslashes) escaped; a weighted one is already in A1111's syntax."""
    return text if weighted else re.sub(r"([\\()\[\]])", r"\\\1", text)


def parameters_text(record: dict[str, Any]) -> str:
    """The A1111 ``parameters`` text for a generation record."""
    weighted = bool(record.get("prompt_weights"))
    lines = [a1111_prompt(record["prompt"], weighted)]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {a1111_prompt(record['negative_prompt'], weighted)}")
    fields: list[tuple[str, Any]] = [
        ("Steps", record["steps"]),
        ("Sampler", SAMPLER_DISPLAY.get(record["sampler"], record["sampler"])),
        ("Schedule type", record.get("schedule", "")),
    ]
    mode = record.get("guidance_mode", "cfg")
    if mode == "distilled":
        # Forge's name for FLUX.1-dev's embedded guidance; CFG scale 1 says no real CFG ran.
        fields += [("CFG scale", 1), ("Distilled CFG Scale", _fmt_number(record["guidance"]))]
    else:
        fields.append(("CFG scale", _fmt_number(record["guidance"])))
    fields += _guidance_method_fields(record.get("guidance_method"))
    fields += [
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
    ]
    model = record.get("model", {})
    if model.get("hash"):
        fields.append(("Model hash", model["hash"][:10]))
    if model.get("name"):
        fields.append(("Model", model["name"]))
    if record.get("variation_strength"):  # A1111's names and place
        fields += [
            ("Variation seed", record["variation_seed"]),
            ("Variation seed strength", _fmt_number(record["variation_strength"])),
        ]
    if record.get("seed_resize_from"):
        fields.append(("Seed resize from", "x".join(str(v) for v in record["seed_resize_from"])))
    if record.get("strength") is not None:
        fields.append(("Denoising strength", _fmt_number(record["strength"])))
    loras = record.get("loras") or []
    if loras:
        fields.append(("Lora hashes", ", ".join(f"{lo['name']}: {lo['hash'][:12]}" for lo in loras)))
    hires = record.get("hires")
    if isinstance(hires, dict):  # A1111's names; its "Denoising strength" is the second pass's
        fields += [
            ("Hires upscale", _fmt_number(hires["scale"])),
            ("Hires steps", hires["steps"]),
            ("Hires upscaler", _upscaler_name(hires.get("upscaler", ""))),
            ("Denoising strength", _fmt_number(hires["strength"])),
        ]
    if record.get("inpaint_area") == "masked":  # A1111's names; its Size is the size the area was drawn at
        fields += [("Inpaint area", "Only masked"), ("Masked area padding", record.get("mask_padding", ""))]
    enlarged = record.get("source_upscale")
    if isinstance(enlarged, dict):  # an upscaling edit (A1111 writes none for its SD upscale script)
        fields += [
            ("Source upscale", _fmt_number(enlarged["scale"])),
            ("Source upscaler", _upscaler_name(enlarged.get("upscaler", ""))),
        ]
    # A1111 has no names for these; the short hash of the fitted pixels tells which picture the image
    # needs (`pictor reproduce IMAGE --reference/--context PICTURE` checks the whole one).
    for key, name in (
        ("reference_image", "Reference image hash"),
        ("context_image", "Context image hash"),
        ("control_image", "Control image hash"),
        ("redux_image", "Redux image hash"),
        ("ip_adapter_image", "IP-Adapter image hash"),
    ):
        picture = record.get(key)
        if isinstance(picture, dict) and picture.get("sha256"):
            fields.append((name, str(picture["sha256"])[:12]))
    redux = record.get("redux")
    if isinstance(redux, dict) and isinstance(redux.get("strength"), int | float):
        fields.append(("Redux strength", _fmt_number(redux["strength"])))
        if redux.get("name") and redux.get("sha256"):  # as A1111 names a model: name and short hash
            fields.append(("Redux model", f"{redux['name']} [{str(redux['sha256'])[:10]}]"))
    ip = record.get("ip_adapter")
    if isinstance(ip, dict) and isinstance(ip.get("scale"), int | float):
        fields.append(("IP-Adapter scale", _fmt_number(ip["scale"])))
        if ip.get("name") and ip.get("sha256"):
            fields.append(("IP-Adapter model", f"{ip['name']} [{str(ip['sha256'])[:10]}]"))
    fields += _controlnet_fields(record)
    canny = record.get("control_canny")
    if isinstance(canny, list) and len(canny) == 2:  # the control picture's edges were drawn by pictor
        fields.append(("Control canny", f"{_fmt_number(canny[0])}/{_fmt_number(canny[1])}"))
    if record.get("vae_tile"):
        fields += [
            ("VAE tile", record["vae_tile"]),
            ("VAE tile overlap", record.get("vae_tile_overlap", "")),
        ]
    if record.get("denoise_tile"):
        fields += [
            ("Denoise tile", record["denoise_tile"]),
            ("Denoise tile overlap", record.get("denoise_tile_overlap", "")),
        ]
    if record.get("cache_threshold"):
        fields.append(("First block cache", _fmt_number(record["cache_threshold"])))
        passes = record.get("cache_passes")
        if isinstance(passes, dict) and passes.get("total"):  # how many of its passes ran every block
            fields.append(("First block cache full passes", f"{passes.get('full')}/{passes['total']}"))
    if record.get("batch_size", 1) > 1:
        fields += [("Batch size", record["batch_size"]), ("Batch pos", record["batch_index"])]
    fields.append(("Version", f"pictor {record.get('pictor_version', '')}".strip()))
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields if v != ""))
    return "\n".join(lines)


def _guidance_method_fields(method: Any) -> list[tuple[str, Any]]:
    """A record's guidance method (`pictor.guidance_methods`), in pictor's own names (A1111 has none)."""
    if not isinstance(method, dict) or not isinstance(method.get("method"), str):
        return []
    fields: list[tuple[str, Any]] = [("Guidance method", method["method"])]
    if method.get("rescale"):
        fields.append(("Guidance rescale", _fmt_number(method["rescale"])))
    start, stop = method.get("start", 0.0), method.get("stop", 1.0)
    if (start, stop) != (0.0, 1.0):
        fields.append(("Guidance interval", f"{_fmt_number(start)}-{_fmt_number(stop)}"))
    for key, name in (
        ("eta", "APG eta"),
        ("norm_threshold", "APG norm threshold"),
        ("momentum", "APG momentum"),
        ("zero_init_steps", "Zero init steps"),
    ):
        if key in method:
            fields.append((name, _fmt_number(method[key])))
    return fields


def png_info(record: dict[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    # iTXt is UTF-8; tEXt is Latin-1 only, and prompts are often not.
    if "prompt" in record:  # an upscale of a picture pictor did not make has no generation to tell
        info.add_itxt(PARAMETERS_KEY, parameters_text(record))
    post = postprocessing_text(record)
    if post is not None:
        for key in POSTPROCESSING_KEYS:
            info.add_itxt(key, post)
    info.add_itxt(RECORD_KEY, json.dumps(record, ensure_ascii=False, sort_keys=True))
    return info


def _save_atomic(image: Image.Image, info: PngImagePlugin.PngInfo, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_png(image: Image.Image, record: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the PNG with both chunks, atomically (temp name, then rename)."""
    return _save_atomic(image, png_info(record), path)


def save_render_png(image: Image.Image, render: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a rendered (not generated) PNG with its ``pictor-render`` chunk, atomically."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(RENDER_KEY, json.dumps(render, ensure_ascii=False, sort_keys=True))
    return _save_atomic(image, info, path)


def read_text_chunks(path: str | os.PathLike[str]) -> dict[str, str]:
    try:
        with Image.open(path) as im:
            im.load()  # text chunks after the image data are only read with the pixels
            return {k: v for k, v in (getattr(im, "text", {}) or {}).items() if isinstance(v, str)}
    except FileNotFoundError:
        raise ProvenanceError(f"{path}: no such file") from None
    except OSError as exc:
        raise ProvenanceError(f"{path}: not a readable image ({exc})") from exc


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The pictor JSON record of an image pictor wrote."""
    chunks = read_text_chunks(path)
    if RECORD_KEY not in chunks:
        hint = " It has A1111 parameters, which `pictor info` shows." if PARAMETERS_KEY in chunks else ""
        if RENDER_KEY in chunks:
            hint = " It is a shapes-world render, not a generated image; `pictor info` shows what it draws."
        raise ProvenanceError(f"{path}: no pictor record in this image, so it cannot be reproduced.{hint}")
    try:
        return json.loads(chunks[RECORD_KEY])
    except json.JSONDecodeError as exc:
        raise ProvenanceError(f"{path}: the pictor record is not valid JSON ({exc})") from exc


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 ``parameters`` text (from any tool) into prompt, negative prompt and settings."""
    lines = text.strip().split("\n")
    settings_line = lines[-1] if len(lines) > 1 and ": " in lines[-1] and "Steps:" in lines[-1] else ""
    body = lines[:-1] if settings_line else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    return {
        "prompt": "\n".join(prompt_lines),
        "negative_prompt": "\n".join(negative_lines),
        "settings": _parse_settings(settings_line),
    }


def _parse_settings(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        colon = line.find(": ", i)
        if colon < 0:
            break
        key = line[i:colon].strip()
        j = colon + 2
        if j < n and line[j] == '"':
            value, end = json.JSONDecoder().raw_decode(line, j)
            j = end
        else:
            end = line.find(", ", j)
            end = n if end < 0 else end
            value, j = line[j:end], end
        out[key] = value
        i = j + 2 if line.startswith(", ", j) else n
    return out


def _controlnet_fields(record: dict[str, Any]) -> list[tuple[str, Any]]:
    """A1111's ControlNet extension's "ControlNet N" entries: model with short hash, weight, window, and
    pictor's picture hash and Union mode."""
    entries = record.get("controlnets")
    if not isinstance(entries, list):
        return []
    out: list[tuple[str, Any]] = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            continue
        parts = [f"Model: {e.get('name')} [{str(e.get('sha256', ''))[:10]}]"]
        if isinstance(e.get("scale"), int | float):
            parts.append(f"Weight: {_fmt_number(e['scale'])}")
        if isinstance(e.get("mode"), int):
            parts.append(f"Mode: {e.get('mode_name') or e['mode']}")
        for key, name in (("controlnet_start", "Guidance Start"), ("controlnet_end", "Guidance End")):
            if isinstance(record.get(key), int | float):
                parts.append(f"{name}: {_fmt_number(record[key])}")
        picture = e.get("image")
        if isinstance(picture, dict) and picture.get("sha256"):
            parts.append(f"Image hash: {str(picture['sha256'])[:12]}")
        out.append((f"ControlNet {i}", ", ".join(parts)))
    return out
