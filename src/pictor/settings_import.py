"""Another image's settings as `pictor generate`'s options: A1111's "PNG Info, send to txt2img" for any PNG
with A1111's `parameters` text (A1111, Forge, Fooocus, ComfyUI savers that write it, pictor), a pictor
record, or ComfyUI's own graph (its `prompt` chunk). An image with several is read by the first of these:
pictor record, A1111 text, ComfyUI graph.

A pictor record gives its own fields as they were. A1111's text gives what pictor has an equivalent for:
prompt, negative prompt, steps, CFG scale (or Forge's "Distilled CFG Scale"), sampler (A1111's names;
"DPM++ 2M Karras" style names carry the schedule too), schedule type, seed, variation seed and strength,
seed resize, size, the hires fix (scale,
steps, denoising strength (as the noise level A1111's pass starts at: `pictor.a1111_denoise`), a Lanczos or
named model upscaler), pictor's tile and cache settings and its
guidance method ("Guidance method: apg, Guidance rescale: 0.7, Guidance interval: 0-0.7, APG eta: 0, ...",
which a record gives too, both through `imported_settings.take_guidance_method`). A1111
always reads its emphasis syntax, so a prompt from its text is read with prompt weights; `<lora:name:w>`
tags are taken out of it (LoRAs are files here: --lora FILE:SCALE). Anything else it holds is listed in a
notice, not silently dropped; a sampler or upscaler pictor cannot run is an error unless the command line
gives its own.

A ComfyUI graph is read by `pictor.comfy_workflow` and mapped by `pictor.comfy_settings_import`, the way
A1111's text is here. What both give is `pictor.imported_settings.ImportedSettings`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pictor.a1111_denoise import hires_start, is_pictors
from pictor.comfy_settings_import import settings_from_comfy
from pictor.comfy_workflow import PROMPT_KEY
from pictor.composable_prompts import uses_and
from pictor.guidance_methods import GuidanceMethod, GuidanceMethodError
from pictor.imported_settings import ImportedSettings, SettingsImportError, take_guidance_method
from pictor.prompt_editing import has_editing
from pictor.provenance import (
    PARAMETERS_KEY,
    RECORD_KEY,
    SAMPLER_DISPLAY,
    ProvenanceError,
    parse_parameters,
    read_text_chunks,
)
from pictor.sampling import SAMPLERS, SCHEDULES

# Other A1111 forks' labels for a pictor sampler, read back but never written (SAMPLER_DISPLAY is what
# pictor writes): ER-SDE is "ER SDE" and "Extended Reverse SDE" in some forks, Euler ancestral CFG++
# "Euler a CFG++" and DPM++ 2S ancestral CFG++ "DPM++ 2S a CFG++" (A1111's short "a" for ancestral), iPNDM_v
# "IPNDM V" (the name other tools' ComfyUI-to-A1111 tables give it).
SAMPLER_ALIASES = {
    "er sde": "er_sde",
    "extended reverse sde": "er_sde",
    "euler a cfg++": "euler_ancestral_cfg_pp",
    "dpm++ 2s a cfg++": "dpmpp_2s_ancestral_cfg_pp",
    "ipndm v": "ipndm_v",
    "sa-solver pece": "sa_solver_pece",  # reForge's is "SA-Solver-Pece"; A1111 extensions' this
}
# A1111's sampler names (and pictor's own) -> pictor's; "DPM++ 2M Karras"-style names end in a schedule.
SAMPLER_NAMES = (
    {shown.lower(): name for name, shown in SAMPLER_DISPLAY.items()}
    | SAMPLER_ALIASES
    | {n: n for n in SAMPLERS}
)
SCHEDULE_SUFFIXES = {" karras": "karras", " exponential": "exponential"}
# A1111's "Schedule type" values (its names; its labels are read with spaces as "_", "KL Optimal" as
# kl_optimal) with a pictor schedule; "Automatic" is the model's own (pictor's default).
SCHEDULE_NAMES = {
    "karras": "karras",
    "exponential": "exponential",
    "beta": "beta",
    "kl_optimal": "kl_optimal",
    "normal": "normal",
    "automatic": None,
}
# Those of A1111's that pictor's of that name (ComfyUI's) runs otherwise: taken, with a notice. A1111's KL
# Optimal lays N + 1 sigmas out down to the model's smallest and stops there, without a step to 0.
SCHEDULE_NOTICES = {
    "kl_optimal": (
        "the image's schedule type KL Optimal is taken as pictor's kl_optimal (ComfyUI's), which differs: "
        "A1111's spaces all its steps evenly in arctan(sigma) down to the model's smallest sigma and ends "
        "there, ComfyUI's and pictor's all but the last, which steps to 0 (most different at few steps)"
    ),
}
# A1111's samplers that drop its schedule's next-to-last sigma (its samplers_k_diffusion's
# discard_next_to_last_sigma, with every schedule type); pictor's of that name run the whole schedule.
DISCARDING_SAMPLERS = {"dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde"}
LANCZOS_NAMES = {"lanczos", "none", ""}
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::[^>]*)?>", re.IGNORECASE)
# Keys that say nothing about how to draw (A1111's own version, batch bookkeeping): not worth a notice.
QUIET = {"Version", "Batch size", "Batch pos", "First block cache full passes"}


# pictor's own A1111-text fields of a guidance method (`provenance._guidance_method_fields`) -> its field
GUIDANCE_KEYS = {
    "Guidance method": "method",
    "Guidance rescale": "rescale",
    "Guidance interval": "interval",
    "APG eta": "eta",
    "APG norm threshold": "norm_threshold",
    "APG momentum": "momentum",
    "Zero init steps": "zero_init_steps",
}
# `pictor generate`'s options for them (cli_guidance.OPTIONS' dests; the interval is one, [start, stop])
GUIDANCE_DESTS = (
    "guidance_method",
    "guidance_rescale",
    "guidance_interval",
    "apg_eta",
    "apg_norm_threshold",
    "apg_momentum",
    "zero_init_steps",
)
# Those that set one method's own parameters -> that method (the rest, method, rescale and interval, any's)
GUIDANCE_METHOD_OF = {
    "apg_eta": "apg",
    "apg_norm_threshold": "apg",
    "apg_momentum": "apg",
    "zero_init_steps": "cfg-zero-star",
}
# "0-0.7", "0.25-1", "1e-05-0.5": the start, a dash, the stop (a dash inside an exponent is not the split)
_INTERVAL = re.compile(r"^\s*(.*?[^eE\s])\s*-\s*(\S.*?)\s*$")

# Regional attention's options (`pictor.regional_attention`), taken with the regions they shape
REGIONAL_OPTIONS = (
    "regional_steps",
    "regional_double_interval",
    "regional_single_interval",
    "regional_base_ratio",
)


def settings_from_image(path: str | Path) -> ImportedSettings:
    """The settings of the image at `path`: its pictor record if it has one, else its A1111 text, else its
    ComfyUI graph."""
    return settings_from_chunks(read_text_chunks(path), str(path))


def settings_from_chunks(chunks: dict[str, str], path: str = "the image") -> ImportedSettings:
    """The settings of an image's text chunks (`settings_from_image`); `path` names it in errors."""
    if RECORD_KEY in chunks:
        import json

        try:
            return settings_from_record(json.loads(chunks[RECORD_KEY]))
        except (json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
            raise SettingsImportError(f"{path}: its pictor record is damaged ({exc})") from None
    if PARAMETERS_KEY in chunks:
        return settings_from_parameters(chunks[PARAMETERS_KEY])
    if PROMPT_KEY in chunks:
        return settings_from_comfy(chunks[PROMPT_KEY], path)
    raise SettingsImportError(
        f"{path}: no A1111 parameters and no pictor record in this image (nor a ComfyUI graph), so it names "
        "no settings"
    )


def settings_from_record(record: dict[str, Any]) -> ImportedSettings:
    """A pictor record's settings, as they were."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ProvenanceError("the pictor record has no prompt")
    out = ImportedSettings()
    v = out.values
    v["prompt"] = record["prompt"]
    v["negative"] = record.get("negative_prompt") or ""
    for key in ("steps", "guidance", "sampler", "schedule", "seed", "cache_threshold"):
        if record.get(key) is not None:
            v[key] = record[key]
    for key in ("vae_tile", "vae_tile_overlap", "denoise_tile", "denoise_tile_overlap"):
        if record.get(key):
            v[key] = record[key]
    v["prompt_weights"] = bool(record.get("prompt_weights"))
    v["prompt_editing"] = bool(record.get("prompt_editing"))
    v["composable"] = bool(record.get("composable"))
    if record.get("regions"):  # plain JSON, as --regions takes it: nothing to load
        v["regions"] = json.dumps(record["regions"])
        v["regional_attention"] = bool(record.get("regional_attention"))
        for key in REGIONAL_OPTIONS:  # Regional-Prompting-FLUX's controls, recorded where not the defaults
            if record.get(key) is not None:
                v[key] = record[key]
    if record.get("variation_strength"):  # the image's own variation seed: image 0 of the new run is it
        v["variation_seed"], v["variation_strength"] = record["variation_seed"], record["variation_strength"]
    if record.get("guidance_method"):  # its record (ValueError when damaged: the record is damaged)
        take_guidance_method(GuidanceMethod.from_record(record["guidance_method"]), out)
    if record.get("seed_resize_from"):
        v["seed_resize_from"] = tuple(record["seed_resize_from"])
    if isinstance(record.get("width"), int) and isinstance(record.get("height"), int):
        v["size"] = (record["width"], record["height"])
    hires = record.get("hires")
    if isinstance(hires, dict):
        v["hires"], v["hires_strength"], v["hires_steps"] = hires["scale"], hires["strength"], hires["steps"]
        if hires.get("upscaler", "lanczos") != "lanczos":
            entry = hires.get("upscaler_file") or {}
            out.hires_upscaler_name = str(hires["upscaler"])
            out.hires_upscaler_file = entry.get("file")
    if "mode" in record:  # an edit's settings, at its canvas's size, without its source picture
        out.notices.append(
            f"the image is an edit ({record['mode']}) of another picture: its prompt and settings are taken, "
            "not the picture (pictor edit takes one)"
        )
    for key, words in (
        ("loras", "LoRAs"),
        ("layout", "a layout"),
        ("reference_image", "a reference picture"),
        ("control_image", "a control picture"),
        ("controlnets", "ControlNets"),
        ("redux", "a Redux picture"),
        ("ip_adapter", "an IP-Adapter picture"),
        ("context_image", "a context image"),
    ):
        if record.get(key):
            out.notices.append(f"the image was made with {words}, which are not taken: give them as options")
    return out


def settings_from_parameters(text: str) -> ImportedSettings:
    """A1111 `parameters` text's settings (module docstring)."""
    parsed = parse_parameters(text)
    settings: dict[str, str] = dict(parsed["settings"])
    out = ImportedSettings(source="a1111")
    v = out.values
    prompt, loras = _without_lora_tags(parsed["prompt"])
    negative, _ = _without_lora_tags(parsed["negative_prompt"])
    v["prompt"], v["negative"], v["prompt_weights"] = prompt, negative, True
    # A1111 reads prompt editing always; on only where the texts use it, so records say what ran
    v["prompt_editing"] = has_editing(prompt) or has_editing(negative)
    v["composable"] = uses_and(prompt)  # likewise AND (A1111 never splits the negative prompt)
    if loras:
        out.notices.append(
            f"the prompt's LoRA tags ({', '.join(loras)}) are taken out: give the files with --lora "
            "FILE:SCALE"
        )
    used: set[str] = set()

    def take(key: str, dest: str, parse: Any) -> None:
        if key in settings:
            used.add(key)
            try:
                v[dest] = parse(settings[key])
            except ValueError:
                raise SettingsImportError(f"the image's {key} '{settings[key]}' is not readable") from None

    take("Steps", "steps", int)
    take("Seed", "seed", int)
    take("CFG scale", "guidance", float)
    take("Distilled CFG Scale", "guidance", float)  # Forge's FLUX.1 guidance: what a distilled model reads
    take("Size", "size", _size)
    take("VAE tile", "vae_tile", int)
    take("VAE tile overlap", "vae_tile_overlap", int)
    take("Denoise tile", "denoise_tile", int)
    take("Denoise tile overlap", "denoise_tile_overlap", int)
    take("First block cache", "cache_threshold", float)
    take("Variation seed", "variation_seed", int)
    take("Variation seed strength", "variation_strength", float)
    take("Seed resize from", "seed_resize_from", _size)
    if "Sampler" in settings:
        used.add("Sampler")
        _sampler(settings["Sampler"], out)
    if "Schedule type" in settings:
        used.add("Schedule type")
        _schedule(settings["Schedule type"], out)
    # pictor's own text names its schedule as pictor does ("karras", or nothing); A1111's by its labels
    pictors = settings.get("Schedule type", "").strip() in ("", *SCHEDULES) and "Schedule type" in settings
    if v.get("sampler") in DISCARDING_SAMPLERS and not pictors:
        out.notices.append(
            f"the image's sampler {settings['Sampler'].strip()} is taken as pictor's {v['sampler']}, which "
            "runs the whole schedule: A1111 drops the schedule's next-to-last step for DPM2, DPM2 a and "
            "DPM++ 3M SDE (with every schedule type), so the steps differ"
        )
    if "Hires upscale" in settings:
        used.update({"Hires upscale", "Hires steps", "Hires upscaler", "Denoising strength"})
        _hires(settings, out)
    if any(key in settings for key in GUIDANCE_KEYS):
        used.update(GUIDANCE_KEYS)
        take_guidance_method(_guidance_from_text(settings), out)
    skipped = [k for k in settings if k not in used and k not in QUIET]
    if "Model" in settings or "Model hash" in settings:
        name = settings.get("Model") or settings.get("Model hash")
        out.notices.append(f"the image was made by model '{name}'; this run uses the one you load (--model)")
        skipped = [k for k in skipped if k not in ("Model", "Model hash")]
    if skipped:
        out.notices.append(f"not taken (no pictor equivalent, or given another way): {', '.join(skipped)}")
    return out


def _guidance_from_text(settings: dict[str, str]) -> GuidanceMethod:
    """pictor's own A1111-text fields of a guidance method (GUIDANCE_KEYS; absent ones take their
    defaults); an unreadable or out-of-range value is an error that names its key."""
    values: dict[str, Any] = {}
    for key, name in GUIDANCE_KEYS.items():
        if key not in settings:
            continue
        text = settings[key].strip()
        try:
            if name == "method":
                values[name] = text.lower()
            elif name == "interval":
                match = _INTERVAL.match(text)
                if match is None:
                    raise ValueError(text)
                values["start"], values["stop"] = float(match[1]), float(match[2])
            elif name == "zero_init_steps":
                values[name] = int(text)
            else:
                values[name] = float(text)
        except ValueError:
            raise SettingsImportError(f"the image's {key} '{settings[key]}' is not readable") from None
    try:
        return GuidanceMethod(**values)
    except GuidanceMethodError as exc:
        field = "interval" if exc.field in ("start", "stop") else exc.field
        key = next(k for k, n in GUIDANCE_KEYS.items() if n == field)
        raise SettingsImportError(f"the image's {key} '{settings.get(key, '')}': {exc}") from None


def _without_lora_tags(text: str) -> tuple[str, list[str]]:
    names = LORA_TAG.findall(text)
    return re.sub(r"\s{2,}", " ", LORA_TAG.sub("", text)).strip(), names


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def _sampler(text: str, out: ImportedSettings) -> None:
    name = text.strip().lower()
    for suffix, schedule in SCHEDULE_SUFFIXES.items():
        if name.endswith(suffix) and name.removesuffix(suffix) in SAMPLER_NAMES:
            name = name.removesuffix(suffix)
            out.values["schedule"] = schedule
    if name in SAMPLER_NAMES:
        out.values["sampler"] = SAMPLER_NAMES[name]
    else:
        out.sampler_name = text.strip()


def _schedule(text: str, out: ImportedSettings) -> None:
    name = text.strip().lower()
    if name in SCHEDULES:  # pictor's own name, as pictor writes it
        out.values["schedule"] = name
        return
    name = name.replace(" ", "_")  # A1111's labels ("KL Optimal") as its names
    if name in SCHEDULE_NAMES:
        if SCHEDULE_NAMES[name] is not None:
            out.values["schedule"] = SCHEDULE_NAMES[name]
        if name in SCHEDULE_NOTICES:
            out.notices.append(SCHEDULE_NOTICES[name])
    elif name in SCHEDULES:  # pictor's own under a label ("Linear Quadratic")
        out.values["schedule"] = name
    else:
        out.notices.append(
            f"the image's schedule type '{text}' has no pictor equivalent: the model's own is used "
            f"(--schedule {', '.join(SCHEDULES)})"
        )


def _hires(settings: dict[str, str], out: ImportedSettings) -> None:
    """A1111's hires fix: its scale, steps (0: the first pass's), denoising strength (as the noise level the
    pass starts at, `pictor.a1111_denoise`) and upscaler."""
    try:
        out.values["hires"] = float(settings["Hires upscale"])
        steps = int(settings.get("Hires steps") or 0)
        if steps:
            out.values["hires_steps"] = steps
        if "Denoising strength" in settings:
            denoise = float(settings["Denoising strength"])
            out.values["hires_strength"] = denoise  # pictor's own text: its start level, as written
            if not is_pictors(settings):  # A1111's and Forge's: a step fraction, not the level (module)
                out.values["hires_strength"], notice = hires_start(settings, denoise)
                out.notices.append(notice)
    except ValueError:
        raise SettingsImportError(
            f"the image's hires settings are not readable: {settings.get('Hires upscale')!r}, "
            f"{settings.get('Hires steps')!r}, {settings.get('Denoising strength')!r}"
        ) from None
    upscaler = settings.get("Hires upscaler", "").strip()
    if upscaler.lower().startswith("latent"):
        out.notices.append(
            f"the image's hires upscaler '{upscaler}' enlarges latents, which pictor does not: Lanczos is "
            "used"
        )
    elif upscaler.lower() not in LANCZOS_NAMES:
        out.hires_upscaler_name = upscaler
