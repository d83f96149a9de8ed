"""Another image's settings as `pictor generate`'s options: A1111's "PNG Info, send to txt2img" for any PNG
with A1111's `parameters` text (A1111, Forge, Fooocus, ComfyUI savers that write it, pictor), a pictor
record, or ComfyUI's own graph (its `prompt` chunk). An image with several is read by the first of these:
pictor record, A1111 text, ComfyUI graph.

A pictor record gives its own fields as they were. A1111's text gives what pictor has an equivalent for:
prompt, negative prompt, steps, CFG scale (or Forge's "Distilled CFG Scale"), sampler (A1111's names;
"DPM++ 2M Karras" style names carry the schedule too), schedule type, seed, variation seed and strength,
seed resize, size, the hires fix (scale,
steps, denoising strength, a Lanczos or named model upscaler), pictor's tile and cache settings and its
guidance method ("Guidance method: apg, Guidance rescale: 0.7, Guidance interval: 0-0.7, APG eta: 0, ...",
which a record gives too, both through `_take_guidance_method`). A1111
always reads its emphasis syntax, so a prompt from its text is read with prompt weights; `<lora:name:w>`
tags are taken out of it (LoRAs are files here: --lora FILE:SCALE). Anything else it holds is listed in a
notice, not silently dropped; a sampler or upscaler pictor cannot run is an error unless the command line
gives its own.

A ComfyUI graph is read by `pictor.comfy_workflow`, in ComfyUI's terms, and mapped here the way A1111's text
is: its sampler and scheduler names onto pictor's (with a notice where ComfyUI's of that name differs in
detail), FLUX guidance (FluxGuidance) where the graph sets it, else a CFG other than 1 (CFG 1 without
FluxGuidance leaves the model's own default, as ComfyUI gives FLUX.1 its default guidance), the negative
prompt only where ComfyUI used it (real CFG, not 1), and its prompt's weight syntax (ComfyUI's) rewritten in
A1111's. Whatever the graph holds that cannot be read is an error that names the image.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pictor.comfy_graph import ComfyGraphError, shortened
from pictor.comfy_prompt_weights import comfy_prompt_as_a1111
from pictor.comfy_workflow import PROMPT_KEY, ComfySettings, read_comfy_graph
from pictor.composable_prompts import uses_and
from pictor.flow import resolution_mu
from pictor.generation_request import MAX_SEED
from pictor.guidance_methods import GuidanceMethod, GuidanceMethodError
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
# pictor writes): ER-SDE is "ER SDE" and "Extended Reverse SDE" in some forks.
SAMPLER_ALIASES = {"er sde": "er_sde", "extended reverse sde": "er_sde"}
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
# ComfyUI's sampler names (KSampler's sampler_name) -> pictor's. uni_pc is UniPC's bh1 variant and
# uni_pc_bh2 the bh2 one, which is pictor's unipc: the first is taken too, with a notice. The *_gpu ones
# (dpmpp_2m_sde_gpu, dpmpp_sde_gpu, ...) are the same samplers with their Brownian-tree noise drawn on the
# GPU (pictor draws its own noise from the seed either way, as for every stochastic sampler).
COMFY_SAMPLERS = {
    "euler": "euler",
    "euler_ancestral": "euler_ancestral",
    "heun": "heun",
    "dpmpp_2m": "dpmpp_2m",
    "dpmpp_2m_sde": "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",
    "deis": "deis",
    "ipndm": "ipndm",
    "res_multistep": "res_multistep",
    "lcm": "lcm",
    "lms": "lms",
    "dpm_2": "dpm_2",
    "dpm_2_ancestral": "dpm_2_ancestral",
    "dpmpp_2s_ancestral": "dpmpp_2s_ancestral",
    "dpmpp_sde": "dpmpp_sde",
    "dpmpp_sde_gpu": "dpmpp_sde",
    "dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde": "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu": "dpmpp_3m_sde",
    "heunpp2": "heunpp2",
    "gradient_estimation": "gradient_estimation",
    "ipndm_v": "ipndm_v",
    "res_multistep_ancestral": "res_multistep_ancestral",
    "er_sde": "er_sde",
}
# Those ComfyUI runs otherwise in detail: taken, with a notice. ComfyUI's UniPC (comfy/extra_samplers) runs
# at order 3, and its KSampler drops the second-to-last sigma for uni_pc samplers; its deis is DEIS with
# tabulated coefficients (`pictor.sampling_deis`); its res_multistep_ancestral renoises with the
# variance-exploding ancestral split on a flow model too, pictor's with the rectified-flow one
# (`pictor.sampling_res`).
_UNIPC = (
    "ComfyUI runs UniPC at order 3 (and its KSampler drops the second-to-last step for it), where pictor's "
    "unipc is bh2 at order 2"
)
COMFY_SAMPLER_NOTICES = {
    "uni_pc": (
        f"the graph's sampler uni_pc is UniPC's bh1 variant; pictor's unipc (bh2) is taken for it ({_UNIPC})"
    ),
    "uni_pc_bh2": (
        f"the graph's sampler uni_pc_bh2 is taken as pictor's unipc, which differs in detail: {_UNIPC}"
    ),
    "deis": (
        "the graph's sampler deis is taken as pictor's deis, which differs in detail: ComfyUI's is another "
        "DEIS variant (tabulated coefficients, no lower-order final steps), pictor's is diffusers' "
        "third-order log-rho DEIS"
    ),
    "res_multistep_ancestral": (
        "the graph's sampler res_multistep_ancestral is taken as pictor's, which differs in its renoising: "
        "ComfyUI's splits each step as for a variance-exploding model also on a flow model, which leaves the "
        "sample off the flow path; pictor's renoises with the rectified-flow ancestral step (as its "
        "euler_ancestral), so the images differ"
    ),
}
# ComfyUI's schedulers with a pictor schedule. simple and sgm_uniform space the model's own (shifted) times
# evenly, as pictor's own schedule does (its default, None); karras, exponential and beta space ComfyUI's
# table of the model's sigmas, not diffusers' FLUX.1 sigmas as pictor's of those names: taken, with a
# notice. kl_optimal, linear_quadratic and normal are ComfyUI's on a FLUX.1 model
# (pictor.sampling_schedules): taken as they are.
COMFY_SCHEDULERS = {
    "simple": None,
    "normal": "normal",
    "sgm_uniform": None,
    "karras": "karras",
    "exponential": "exponential",
    "beta": "beta",
    "kl_optimal": "kl_optimal",
    "linear_quadratic": "linear_quadratic",
}
COMFY_SCHEDULER_NOTICES = {
    name: (
        f"the graph's scheduler {name} is taken as pictor's {name} schedule, which differs: ComfyUI's "
        f"{name} spaces its table of the model's sigmas{to}, pictor's spaces diffusers' FLUX.1 sigmas "
        "(the last before 0 at the shifted 1/N): the steps differ"
    )
    for name, to in (
        ("karras", " (down to about 0.0003)"),
        ("exponential", " (down to about 0.0003)"),
        ("beta", ""),
    )
}
# ComfyUI's FLUX.1 [dev] without a ModelSamplingFlux node: this shift (mu) at every size; pictor's own
# schedule shifts by the image's size, and agrees where its shift is this close (about 4096 patches).
COMFY_FLUX_SHIFT = 1.15
SHIFT_CLOSE = 0.02
COMFY_MAX_SEED = 2**64 - 1  # ComfyUI's seeds (torch.manual_seed takes no more)
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


class SettingsImportError(ValueError):
    """An image whose settings cannot be taken as asked; the message says what to give instead."""


@dataclass
class ImportedSettings:
    """`pictor generate` option values (argparse dests) and what could not be taken, in words."""

    values: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    # The upscale model the image's hires fix used: a file (a pictor record's) or only a name (A1111's),
    # which the command line must then give with --hires-upscaler.
    hires_upscaler_file: str | None = None
    hires_upscaler_name: str | None = None
    sampler_name: str | None = None  # the image's sampler when pictor has none of that name
    # The image's guidance method (`pictor.guidance_methods`), not plain CFG; `values` hold it as the
    # guidance-method options (GUIDANCE_DESTS), each of which fills the command line's where it has none.
    guidance_method: GuidanceMethod | None = None
    source: str = "pictor"  # what the settings were read from: pictor (its record), a1111 or comfyui


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
        _take_guidance_method(GuidanceMethod.from_record(record["guidance_method"]), out)
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
        _take_guidance_method(_guidance_from_text(settings), out)
    skipped = [k for k in settings if k not in used and k not in QUIET]
    if "Model" in settings or "Model hash" in settings:
        name = settings.get("Model") or settings.get("Model hash")
        out.notices.append(f"the image was made by model '{name}'; this run uses the one you load (--model)")
        skipped = [k for k in skipped if k not in ("Model", "Model hash")]
    if skipped:
        out.notices.append(f"not taken (no pictor equivalent, or given another way): {', '.join(skipped)}")
    return out


def settings_from_comfy(text: str, path: str = "the image") -> ImportedSettings:
    """A ComfyUI graph's settings (`pictor.comfy_workflow`), mapped as A1111's text is (module docstring);
    `path` names the image in errors."""
    where = f"{path}: its ComfyUI graph (the 'prompt' chunk)"
    try:
        return _comfy_settings(text)
    except ComfyGraphError as exc:
        raise SettingsImportError(f"{where}: {exc}") from None
    except Exception as exc:  # a graph no rule here foresaw; the cause is kept, so a bug still shows
        raise SettingsImportError(
            f"{where} could not be read ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


def _comfy_settings(text: str) -> ImportedSettings:
    graph = read_comfy_graph(text)
    out = ImportedSettings(notices=list(graph.notices), source="comfyui")
    v = out.values
    if graph.prompt is not None:
        v["prompt"] = comfy_prompt_as_a1111(graph.prompt, out.notices)
    v["negative"] = comfy_prompt_as_a1111(_comfy_negative(graph, out), out.notices, "negative prompt")
    v["prompt_weights"] = True  # ComfyUI, like A1111, always reads its brackets as weights
    for dest, value in (("steps", graph.steps), ("size", graph.size)):
        if value is not None:
            v[dest] = value
    _comfy_seed(graph.seed, out)
    _comfy_guidance(graph, out)
    _comfy_tcfg(graph, out)
    if graph.sampler_name is not None:
        _comfy_sampler(graph.sampler_name, out)
    if graph.scheduler is not None:
        _comfy_schedule(graph.scheduler, out)
    _comfy_shift(graph, out)
    if graph.batch_size is not None and graph.batch_size > 1:
        # ComfyUI draws a batch's noise from one seed, so the graph does not say which of its pictures this
        # file is (A1111's text gives each picture its own seed, so its Batch size goes unsaid).
        out.notices.append(
            f"the graph drew a batch of {graph.batch_size} from one seed: this run draws -n images (one by "
            "default), each from its own seed"
        )
    return out


def _comfy_negative(graph: ComfySettings, out: ImportedSettings) -> str:
    """The negative prompt where ComfyUI used it: at CFG 1 it never evaluates one (comfy/samplers.py's
    sampling_function), and with FLUX guidance taken the real CFG it acts through is not."""
    negative = graph.negative or ""
    if not negative or graph.cfg is None or (graph.cfg != 1 and graph.guidance is None):
        return negative
    why = (
        "ComfyUI does not use it at CFG 1"
        if graph.cfg == 1
        else f"it acts through the sampler's CFG {graph.cfg:g}, which is not taken"
    )
    out.notices.append(f"the graph's negative prompt '{shortened(negative)}' is not taken: {why}")
    return ""


def _comfy_seed(seed: int | None, out: ImportedSettings) -> None:
    if seed is None:
        return
    if not 0 <= seed <= COMFY_MAX_SEED:
        raise ComfyGraphError(f"its seed {seed} is outside ComfyUI's seeds (0 to 2**64 - 1)")
    if seed <= MAX_SEED:
        out.values["seed"] = seed
        return
    # ComfyUI's seeds run to 2**64 - 1; torch's CPU generator (both seed it) keeps the low 32 bits
    low = seed % 2**32
    out.values["seed"] = low
    out.notices.append(
        f"the graph's seed {seed} is beyond pictor's; {low}, its low 32 bits, draws the same noise in "
        "torch's generator and is taken"
    )


def _comfy_guidance(graph: ComfySettings, out: ImportedSettings) -> None:
    """FLUX guidance where the graph sets it (as Forge's Distilled CFG Scale is taken); else a CFG other
    than 1, as real CFG (A1111's CFG scale); else nothing: without FluxGuidance, ComfyUI's FLUX.1 [dev]
    takes its default guidance 3.5 (comfy/model_base.py), and the model's own default is used here."""
    if graph.guidance is not None:
        out.values["guidance"] = graph.guidance
        if graph.cfg is not None and graph.cfg != 1:
            out.notices.append(
                f"the graph's FLUX guidance {graph.guidance:g} is taken as --guidance; its sampler's CFG "
                f"{graph.cfg:g} (real CFG on top, which pictor does not run beside distilled guidance) is not"
            )
        return
    if graph.cfg is None:
        return
    if graph.cfg != 1:
        out.values["guidance"] = graph.cfg
        return
    out.notices.append(
        "the graph sets no FLUX guidance (no FluxGuidance node) and samples at CFG 1: ComfyUI then gives a "
        "FLUX.1 [dev] model its default guidance 3.5 (FLUX.1 [schnell] takes none), so no guidance is taken "
        "and the model's own default is used (--guidance 3.5 for a FLUX.1 [dev] model)"
    )


def _comfy_tcfg(graph: ComfySettings, out: ImportedSettings) -> None:
    """ComfyUI's TCFG node is pictor's tcfg (`comfy_workflow.GUIDANCE_NODES`) where the graph's real CFG is
    taken; it does nothing at CFG 1, and acts through a CFG that is not taken beside FLUX guidance."""
    if not graph.tcfg:
        return
    if graph.guidance is None and graph.cfg is not None and graph.cfg != 1:
        _take_guidance_method(GuidanceMethod("tcfg"), out)
        return
    why = (
        f"it acts through the sampler's CFG {graph.cfg:g}, which is not taken beside the FLUX guidance"
        if graph.guidance is not None and graph.cfg is not None and graph.cfg != 1
        else "ComfyUI runs no negative pass at CFG 1, so it did nothing"
    )
    out.notices.append(f"the graph's TCFG (pictor's --guidance-method tcfg) is not taken: {why}")


def _comfy_sampler(name: str, out: ImportedSettings) -> None:
    if name in COMFY_SAMPLERS:
        out.values["sampler"] = COMFY_SAMPLERS[name]
        if name in COMFY_SAMPLER_NOTICES:
            out.notices.append(COMFY_SAMPLER_NOTICES[name])
    else:
        out.sampler_name = name


def _comfy_schedule(name: str, out: ImportedSettings) -> None:
    if name in COMFY_SCHEDULERS:
        if COMFY_SCHEDULERS[name] is not None:
            out.values["schedule"] = COMFY_SCHEDULERS[name]
        if name in COMFY_SCHEDULER_NOTICES:
            out.notices.append(COMFY_SCHEDULER_NOTICES[name])
    else:
        out.notices.append(
            f"the graph's scheduler '{name}' has no pictor equivalent: the model's own is used "
            f"(--schedule {', '.join(SCHEDULES)})"
        )


def _comfy_shift(graph: ComfySettings, out: ImportedSettings) -> None:
    """Without a ModelSampling node ComfyUI's FLUX.1 [dev] shifts its schedule by a constant 1.15, where
    pictor's own shifts by the image's size (`pictor.flow.resolution_mu`): said where they differ."""
    if graph.model_sampling or graph.size is None:
        return
    width, height = graph.size
    mu = resolution_mu((width // 16) * (height // 16))
    if abs(mu - COMFY_FLUX_SHIFT) <= SHIFT_CLOSE:
        return
    out.notices.append(
        f"the graph has no ModelSamplingFlux node: ComfyUI then shifts a FLUX.1 [dev] model's schedule by a "
        f"constant {COMFY_FLUX_SHIFT:g} at every size, where pictor's schedules shift by the image's size "
        f"({mu:.2f} at {width}x{height}; {COMFY_FLUX_SHIFT:g} at 1024x1024): the steps differ"
    )


def _take_guidance_method(method: GuidanceMethod, out: ImportedSettings) -> None:
    """A guidance method read from a record or A1111's text, as the request's and as `pictor generate`'s
    options (GUIDANCE_DESTS, each parameter the method reads): the one path both take. Plain CFG over every
    step is what runs without one: nothing is taken."""
    if method.is_default:
        return
    method = method.normalized()
    out.guidance_method = method
    v = out.values
    v["guidance_method"], v["guidance_rescale"] = method.method, method.rescale
    v["guidance_interval"] = [method.start, method.stop]
    if method.method == "apg":
        v["apg_eta"], v["apg_norm_threshold"] = method.eta, method.norm_threshold
        v["apg_momentum"] = method.momentum
    if method.method == "cfg-zero-star":
        v["zero_init_steps"] = method.zero_init_steps


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
    """A1111's hires fix: its scale, steps (0: the first pass's), denoising strength and upscaler."""
    try:
        out.values["hires"] = float(settings["Hires upscale"])
        steps = int(settings.get("Hires steps") or 0)
        if steps:
            out.values["hires_steps"] = steps
        if "Denoising strength" in settings:
            out.values["hires_strength"] = float(settings["Denoising strength"])
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
